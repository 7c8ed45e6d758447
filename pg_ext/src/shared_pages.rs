//! Pages the sidecar has cached, read straight from its shared page file
//! (`neon_types::page_file`, `<neon.shared_dir>/pages`) with no round trip: what makes a
//! prefetched page cheap. `neon_get_page` looks here first and asks the sidecar only on a miss.
//!
//! Each backend maps the file read-only on first use. It serves nothing while the sidecar is
//! not running (the file's lock is free), and maps the file again when the one it has is
//! retired or its sidecar gone — a restarted sidecar has made a new one. If there is no file,
//! or it cannot be read, calls simply go to the socket: this is only a shortcut.

use crate::guc;
use neon_types::page_file::{PageFileReader, PageKey};
use neon_types::BLCKSZ;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgAtomic};
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

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

thread_local! {
    /// The file this backend has mapped, and the directory it was found in.
    static READER: RefCell<Option<(PathBuf, PageFileReader)>> = const { RefCell::new(None) };
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
    let hit = READER.with(|r| {
        let mut r = r.borrow_mut();
        let out: &mut [u8; BLCKSZ] = page.as_mut_slice().try_into().expect("BLCKSZ bytes");
        // A hit checks the file is usable once (inside `get`); only a miss asks why.
        match r.as_ref().filter(|(d, _)| *d == dir) {
            Some((_, reader)) if reader.get(key, out) => return true,
            Some((_, reader)) if reader.usable() => return false,
            _ => {}
        }
        // None yet, another directory, or a stopped or replaced sidecar's: look again (an open
        // of a missing file is one failed system call). A missing or unreadable file only
        // means asking over the socket.
        *r = PageFileReader::open(&dir).ok().flatten().map(|reader| (dir.clone(), reader));
        r.as_ref().is_some_and(|(_, reader)| reader.get(key, out))
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
