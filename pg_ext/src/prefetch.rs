//! Prefetching: a queue in shared memory that backends fill (`neon_prefetch()`, and
//! `neon_get_page()`'s read-ahead when it sees a sequential scan), and the background worker
//! that drains it, asking the sidecar to rebuild those pages into its page cache before the
//! reader asks for them. The worker also keeps the sidecar told of the compute's WAL flush
//! position (`ComputeFlush`), which the sidecar reports as ingest lag.
//!
//! Both need `shared_preload_libraries = 'neon'` (`neon-sidecar init` sets it): without it
//! there is no queue, `neon_prefetch()` says so, and read-ahead is skipped.
//!
//! The queue is a ring of [`QUEUE_LEN`] requests of at most [`ENTRY_BLOCKS`] blocks under one
//! LWLock; when it is full, new requests are dropped and counted (prefetching is advice).

use crate::client::{ClientError, Slot};
use crate::guc;
use neon_types::protocol::{Request, Response};
use neon_types::{ForkNumber, Lsn, RelFileNode, RelTag};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{pg_shmem_init, PgLwLock};
use std::time::{Duration, Instant};

pub const QUEUE_LEN: usize = 256;
/// Blocks per queued request: what the sidecar rebuilds as one pipelined batch.
pub const ENTRY_BLOCKS: u32 = 64;
/// How long the worker waits for one answer; short, so it never holds up a shutdown for long.
const WORKER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Entry {
    spcnode: u32,
    dbnode: u32,
    relnode: u32,
    fork: u8,
    first: u32,
    n: u32,
    lsn: u64,
}

/// The shared state: the ring and the worker's counters.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Queue {
    head: u64,
    tail: u64,
    entries: [Entry; QUEUE_LEN],
    /// The worker's latch (an address in shared memory, the same in every process), or 0.
    worker_latch: usize,
    worker_pid: i32,
    connected: bool,
    /// Connections the worker has made to the sidecar: one more after each reconnect.
    connects: u64,
    dropped: u64,
    requests: u64,
    pages: u64,
    failures: u64,
}

impl Default for Queue {
    fn default() -> Queue {
        Queue {
            head: 0,
            tail: 0,
            entries: [Entry::default(); QUEUE_LEN],
            worker_latch: 0,
            worker_pid: 0,
            connected: false,
            connects: 0,
            dropped: 0,
            requests: 0,
            pages: 0,
            failures: 0,
        }
    }
}

// SAFETY: plain integers only, no pointers into one process's memory (the latch address is
// in shared memory, mapped at the same address in every backend).
unsafe impl PGRXSharedMemory for Queue {}

// SAFETY: the name is this extension's own.
static QUEUE: PgLwLock<Queue> = unsafe { PgLwLock::new(c"neon_prefetch_queue") };

/// From `_PG_init` while preloading: ask for the shared memory and register the worker.
pub fn init() {
    pg_shmem_init!(QUEUE);
    BackgroundWorkerBuilder::new("neon prefetch worker")
        .set_type("neon prefetch worker")
        .set_library("neon")
        .set_function("neon_prefetch_worker_main")
        .enable_shmem_access(None)
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(2)))
        .load();
}

/// Whether the queue exists (the library was preloaded).
pub fn active() -> bool {
    crate::preloaded()
}

/// Queues blocks `first..first + n` of `rel` at `lsn`; returns how many blocks were queued
/// (fewer when the queue is full).
pub fn enqueue(rel: RelTag, lsn: Lsn, first: u32, n: u32) -> u32 {
    if !active() || n == 0 {
        return 0;
    }
    let mut queued = 0;
    let latch = {
        let mut q = QUEUE.exclusive();
        while queued < n {
            if (q.tail - q.head) as usize >= QUEUE_LEN {
                q.dropped += 1;
                break;
            }
            let take = (n - queued).min(ENTRY_BLOCKS);
            let slot = (q.tail % QUEUE_LEN as u64) as usize;
            q.entries[slot] = Entry {
                spcnode: rel.node.spcnode,
                dbnode: rel.node.dbnode,
                relnode: rel.node.relnode,
                fork: rel.fork as u8,
                first: first + queued,
                n: take,
                lsn: lsn.0,
            };
            q.tail += 1;
            queued += take;
        }
        q.worker_latch
    };
    if latch != 0 {
        // SAFETY: the worker's own latch in shared memory, set only while it runs.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
    queued
}

/// The worker's counters, for `neon_sidecar_status()`.
pub fn status() -> Vec<(&'static str, String)> {
    if !active() {
        return vec![("prefetch_worker", "not running (neon is not in shared_preload_libraries)".into())];
    }
    let q = QUEUE.share();
    vec![
        ("prefetch_worker_pid", q.worker_pid.to_string()),
        ("prefetch_worker_connected", q.connected.to_string()),
        ("prefetch_worker_connects", q.connects.to_string()),
        ("prefetch_queued", (q.tail - q.head).to_string()),
        ("prefetch_dropped", q.dropped.to_string()),
        ("prefetch_sent", q.requests.to_string()),
        ("prefetch_pages", q.pages.to_string()),
        ("prefetch_failures", q.failures.to_string()),
    ]
}

fn pop() -> Option<Entry> {
    let mut q = QUEUE.exclusive();
    if q.head == q.tail {
        return None;
    }
    let e = q.entries[(q.head % QUEUE_LEN as u64) as usize];
    q.head += 1;
    Some(e)
}

/// SIGTERM, once seen: pgrx's `sigterm_received()` clears the flag it reads, so the worker
/// keeps its own.
static TERMINATING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the worker was told to stop (checked between and during its waits).
fn terminating() -> bool {
    use std::sync::atomic::Ordering;
    if BackgroundWorker::sigterm_received() {
        TERMINATING.store(true, Ordering::Relaxed);
    }
    TERMINATING.load(Ordering::Relaxed)
}

/// The background worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn neon_prefetch_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    {
        let mut q = QUEUE.exclusive();
        // SAFETY: MyLatch is this process's latch, valid for its life; MyProcPid is set.
        q.worker_latch = unsafe { pg_sys::MyLatch } as usize;
        q.worker_pid = unsafe { pg_sys::MyProcPid };
    }
    let mut slot = Slot::new();
    let mut last_report: Option<Instant> = None;
    let mut last_complaint: Option<Instant> = None;
    let mut complain = |e: &ClientError| {
        // One line per minute at most while the sidecar is away.
        if last_complaint.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            log!("neon prefetch worker: {e}");
            last_complaint = Some(Instant::now());
        }
    };
    while !terminating() {
        let socket = guc::sidecar_socket();
        while let Some(e) = pop().filter(|_| !terminating()) {
            let Some(path) = &socket else { continue };
            let Ok(fork) = ForkNumber::try_from(e.fork) else { continue };
            let rel = RelTag { node: RelFileNode { spcnode: e.spcnode, dbnode: e.dbnode, relnode: e.relnode }, fork };
            let req = Request::Prefetch { rel, first: e.first, n: e.n, lsn: Lsn(e.lsn), wait_ms: 1000 };
            let result = slot.call(path, &req, Some(WORKER_TIMEOUT), &mut terminating, &mut |_| {});
            let mut q = QUEUE.exclusive();
            q.requests += 1;
            q.connects = slot.connects();
            q.connected = !matches!(result, Err(ClientError::Connect { .. } | ClientError::Closed { .. }));
            match result {
                Ok(Response::Prefetched(n)) => q.pages += u64::from(n),
                Ok(_) => q.failures += 1,
                Err(err) => {
                    q.failures += 1;
                    drop(q);
                    complain(&err);
                }
            }
        }
        if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_report = Some(Instant::now());
            if let Some(path) = &socket {
                let req = Request::ComputeFlush { lsn: crate::flush_lsn() };
                let result = slot.call(path, &req, Some(WORKER_TIMEOUT), &mut terminating, &mut |_| {});
                let mut q = QUEUE.exclusive();
                q.connected = result.is_ok();
                q.connects = slot.connects();
                drop(q);
                if let Err(e) = result {
                    complain(&e);
                }
            }
        }
        // False on SIGTERM (and postmaster death), whose flag it clears as it reports it.
        if terminating() || !BackgroundWorker::wait_latch(Some(Duration::from_millis(1000))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the standard reload of postgresql.conf in a background worker.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    let mut q = QUEUE.exclusive();
    q.worker_latch = 0;
    q.worker_pid = 0;
    q.connected = false;
}
