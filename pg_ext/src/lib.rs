//! The `neon` extension: the compute side of time-travel storage. It runs inside a stock
//! PostgreSQL 15 server (`shared_preload_libraries = 'neon'`, `CREATE EXTENSION neon`):
//!
//! * [`api`]: the SQL functions — pages, sizes, history and base backups as of any LSN;
//! * [`as_of`]: the past as a schema (`neon_as_of`): foreign tables of a read-only server on
//!   a branch;
//! * [`time`]: times as LSNs (`neon_lsn_at`) and back (`neon_time_at`);
//! * [`client`]: the link to the sidecar (its unix socket, `neon_types::protocol`);
//! * [`prefetch`]: the shared-memory prefetch queue and the background worker draining it;
//! * [`shared_pages`]: pages the sidecar has cached, read from its shared page file;
//! * [`guc`]: the `neon.*` settings; [`sqltypes`]: `pg_lsn` and `regclass` for pgrx;
//! * [`walredo`]: the wal-redo loop the sidecar runs in `postgres --single` processes to
//!   rebuild pages with PostgreSQL's own redo routines.

use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

mod api;
mod as_of;
mod client;
mod guc;
mod prefetch;
mod shared_pages;
mod sqltypes;
mod time;
mod walredo;

::pgrx::pg_module_magic!(name, version);

/// The compute's WAL flush position now.
pub(crate) fn flush_lsn() -> neon_types::Lsn {
    // SAFETY: reads the flush position from shared memory; no timeline is asked for.
    neon_types::Lsn(unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) })
}

static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Whether the library was loaded by `shared_preload_libraries`, so that its shared memory
/// (the prefetch queue, counters) and the background worker exist.
pub(crate) fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // pgrx raises every ERROR through a Rust unwind whose hook captures a backtrace, shown in
    // the ERROR's DETAIL when the server's environment has RUST_BACKTRACE: users get messages,
    // not our stack. RUST_LIB_BACKTRACE decides for `Backtrace::capture` over RUST_BACKTRACE
    // (a panic's own message is unaffected). Set while loading, before any thread exists.
    // SAFETY: no other thread of this process reads the environment yet.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    guc::define();
    // SAFETY: a flag PostgreSQL sets while loading shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        prefetch::init();
        shared_pages::init();
        PRELOADED.store(true, Ordering::Relaxed);
    }
}

/// The extension's version and the build's identity (`build_id.rs`): `0.2.0+<commit>`, with
/// `-dirty-<digest>` when built from uncommitted sources — what tells an installed `neon.so`
/// from the one the checkout would build (`SELECT neon_version()`).
#[pg_extern(immutable, parallel_safe)]
fn neon_version() -> &'static str {
    concat!(env!("CARGO_PKG_VERSION"), "+", env!("NEON_BUILD_ID"))
}

/// The page size the extension was built for; must equal the server's (`SHOW block_size`).
#[pg_extern(immutable, parallel_safe)]
fn neon_block_size() -> i32 {
    neon_types::BLCKSZ as i32
}
