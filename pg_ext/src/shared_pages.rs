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

/// Runs `f` on this backend's mapping of the running sidecar's page file, mapping it (again)
/// if there is none yet, it is of another directory, or its sidecar is gone or replaced; `None`
/// if there is no usable file. `reuse` says whether the mapping held can answer as it is.
fn with_reader<T>(reuse: impl Fn(&PageFileReader) -> Option<T>, f: impl Fn(&PageFileReader) -> T) -> Option<T> {
    let dir = guc::shared_dir()?;
    READER.with(|r| {
        let mut r = r.borrow_mut();
        if let Some(answer) = r.as_ref().filter(|(d, _)| *d == dir).and_then(|(_, reader)| reuse(reader)) {
            return Some(answer);
        }
        // None yet, another directory, or a stopped or replaced sidecar's: look again (an open
        // of a missing file is one failed system call). A missing or unreadable file only
        // means asking over the socket.
        *r = PageFileReader::open(&dir).ok().flatten().map(|reader| (dir.clone(), reader));
        r.as_ref().filter(|(_, reader)| reader.usable()).map(|(_, reader)| f(reader))
    })
}

/// The page under `key` if the sidecar has it cached.
pub fn get(key: &PageKey) -> Option<Vec<u8>> {
    let copy = |reader: &PageFileReader| {
        let mut page = vec![0u8; BLCKSZ];
        let out: &mut [u8; BLCKSZ] = page.as_mut_slice().try_into().expect("BLCKSZ bytes");
        reader.get(key, out).then_some(page)
    };
    // A hit checks the file is usable once (inside `get`); only a miss asks why.
    let found = with_reader(
        |reader| {
            let page = copy(reader);
            (page.is_some() || reader.usable()).then_some(page)
        },
        copy,
    )
    .flatten();
    if let Some(c) = counters() {
        let n = if found.is_some() { &c.hits } else { &c.misses };
        n.fetch_add(1, Ordering::Relaxed);
    }
    found
}

/// The oldest LSN the running sidecar holds history for, as it publishes it in its page file
/// (`None`: no running sidecar's file to ask).
pub fn oldest_lsn() -> Option<neon_types::Lsn> {
    with_reader(|reader| reader.usable().then(|| reader.oldest_lsn()), |reader| reader.oldest_lsn())
        .filter(|l| l.is_valid())
}

/// Counters for `neon_sidecar_status()`.
pub fn status() -> Vec<(&'static str, String)> {
    let Some(c) = counters() else { return Vec::new() };
    vec![
        ("shared_page_hits", c.hits.load(Ordering::Relaxed).to_string()),
        ("shared_page_misses", c.misses.load(Ordering::Relaxed).to_string()),
    ]
}
