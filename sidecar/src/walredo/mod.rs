//! Page reconstruction: given a base page (or none) and the WAL records after it, the page as
//! PostgreSQL itself would have it.
//!
//! * [`native`]   — records the sidecar applies itself, in Rust (CLOG and multixact SLRU
//!   pages, visibility-map bit clearing): PostgreSQL would act on its own cluster for these.
//! * [`derive`]   — which decoded WAL records imply native records, split per target page.
//! * [`scratch`]  — the scratch data directories redo processes run on.
//! * [`process`]  — one `postgres --single` redo process and the pipes to it.
//! * [`manager`]  — [`WalRedoManager`], and the process pool that implements it.

pub mod derive;
pub mod manager;
pub mod native;
pub mod process;
pub mod scratch;

pub use manager::{redo_records_of, PostgresRedoManager, RedoError, RedoRecord, RedoRequest, WalRedoManager};

use std::path::PathBuf;
use std::time::Duration;

/// How redo processes are run.
#[derive(Debug, Clone)]
pub struct RedoConfig {
    /// PostgreSQL 15's binaries (`postgres`, `initdb`, `pg_resetwal`).
    pub pg_bin_dir: PathBuf,
    /// A directory of the sidecar's for the template and the processes' data directories;
    /// created, and removed when the manager is dropped.
    pub scratch_root: PathBuf,
    /// Pool size.
    pub processes: usize,
    /// The compute's `data_checksums`: with checksums (or `wal_log_hints`), redo of some
    /// records stamps page LSNs it otherwise leaves alone.
    pub data_checksums: bool,
    /// The compute's `wal_log_hints`.
    pub wal_log_hints: bool,
    /// OS user and group to run PostgreSQL as (it refuses to run as root).
    pub run_as: Option<(u32, u32)>,
    /// How long a request may take.
    pub request_timeout: Duration,
    /// How long a process may take to start.
    pub start_timeout: Duration,
    /// How long a client looks for a reply before sleeping: a reply often comes sooner than a
    /// sleeping thread wakes up (measured with bench/walredo on 2 cores: 2-record requests
    /// 10.6 µs with 50 µs of spin, 29–51 µs without; a pool of 2 also does better with it).
    /// Only for exchanges with one page to come back: a batch's replies stream in while the
    /// process works, and spinning there takes the core the process and the reader need (a
    /// cold scan on a branch at scale 70: 4.1–5.7 s with it, 3.4–3.6 s without).
    pub reply_spin: Duration,
    /// Requests a process serves before it is replaced by a fresh one.
    pub recycle_after: u64,
}

impl RedoConfig {
    /// Defaults: Debian's PostgreSQL 15, one process per core, 60 s per request (Neon's
    /// figure), 30 s to start.
    pub fn new(scratch_root: PathBuf) -> RedoConfig {
        RedoConfig {
            pg_bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            scratch_root,
            processes: std::thread::available_parallelism().map_or(2, |n| n.get()),
            data_checksums: false,
            wal_log_hints: false,
            run_as: None,
            request_timeout: Duration::from_secs(60),
            start_timeout: Duration::from_secs(30),
            reply_spin: Duration::from_micros(50),
            recycle_after: 100_000,
        }
    }
}
