//! Pages the sidecar has cached, read straight from its shared page file
//! (`neon_types::page_file`, `<neon.shared_dir>/pages`) with no round trip: what makes a
//! prefetched page cheap. `neon_get_page` looks here first and asks the sidecar only on a miss.
//!
//! Each backend maps the file read-only on first use. It serves nothing while the sidecar is
//! not running (the file's lock is free), and moves to the new file when a restarted sidecar
//! has retired the old one. If there is no file, or it cannot be read, calls simply go to the
//! socket — this is only a shortcut — and opening is retried at most once a second.

use crate::guc;
use neon_types::page_file::{PageFileReader, PageKey};
use neon_types::BLCKSZ;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a backend without a usable file looks for one again.
const RETRY_OPEN: Duration = Duration::from_secs(1);

/// Hits and misses of every backend, for `neon_sidecar_status()`.
#[derive(Default)]
#[repr(C)]
pub struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
}

// SAFETY: two atomics, no pointers.
unsafe impl PGRXSharedMemory for Counters {}

// SAFETY: the name is this extension's own.
static COUNTERS: PgAtomic<Counters> = unsafe { PgAtomic::new(c"neon_shared_page_counters") };

#[derive(Default)]
struct State {
    reader: Option<(PathBuf, PageFileReader)>,
    last_try: Option<Instant>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// From `_PG_init` while preloading: the counters' shared memory.
pub fn init() {
    pg_shmem_init!(COUNTERS);
}

fn counters() -> Option<&'static Counters> {
    crate::preloaded().then(|| COUNTERS.get())
}

/// The page under `key` if the sidecar has it cached.
pub fn get(key: &PageKey) -> Option<Vec<u8>> {
    let dir = guc::shared_dir()?;
    let mut page = vec![0u8; BLCKSZ];
    let hit = STATE.with(|s| {
        let mut s = s.borrow_mut();
        if s.reader.as_ref().is_some_and(|(d, r)| *d != dir || r.retired()) {
            // Another directory, or a restarted sidecar's new file: look again now.
            s.reader = None;
            s.last_try = None;
        }
        if s.reader.is_none() && s.last_try.is_none_or(|t| t.elapsed() >= RETRY_OPEN) {
            s.last_try = Some(Instant::now());
            // A missing or unreadable file only means asking over the socket.
            s.reader = PageFileReader::open(&dir).ok().flatten().map(|r| (dir.clone(), r));
        }
        let out: &mut [u8; BLCKSZ] = page.as_mut_slice().try_into().expect("BLCKSZ bytes");
        s.reader.as_ref().is_some_and(|(_, r)| r.get(key, out))
    });
    if let Some(c) = counters() {
        let n = if hit { &c.hits } else { &c.misses };
        n.fetch_add(1, Ordering::Relaxed);
    }
    hit.then_some(page)
}

/// Counters for `neon_sidecar_status()`.
pub fn status() -> Vec<(&'static str, String)> {
    let Some(c) = counters() else { return Vec::new() };
    vec![
        ("shared_page_hits", c.hits.load(Ordering::Relaxed).to_string()),
        ("shared_page_misses", c.misses.load(Ordering::Relaxed).to_string()),
    ]
}
