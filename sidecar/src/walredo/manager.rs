//! The redo manager: the page store's one way to rebuild a page. [`WalRedoManager`] is the
//! interface; [`PostgresRedoManager`] implements it with a pool of wal-redo processes, each in
//! a slot that a caller takes and talks to directly from its own thread. Processes start with
//! the manager, from a scratch template made once, and are replaced after a crash, a timeout
//! or any error, so a bad request fails alone and the next one finds a fresh process.
//!
//! A request's records may mix PostgreSQL records and Rust-native ones (DESIGN.md §3, §5): runs
//! of PostgreSQL records go to a redo process in one pipelined exchange, native records are
//! applied in Rust in between, in LSN order.

use super::native::{self, NativeRecord, NativeTarget};
use super::process::{ProcessError, RedoProcess};
use super::scratch::{ScratchError, ScratchTemplate};
use super::RedoConfig;
use bytes::Bytes;
use neon_types::walredo as proto;
use neon_types::{BufferTag, Lsn, BLCKSZ};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One record of a redo request.
#[derive(Debug, Clone)]
pub enum RedoRecord {
    /// A WAL record for PostgreSQL's redo: its bytes (`xl_tot_len` long) and end LSN.
    Postgres { end_lsn: Lsn, raw: Bytes },
    /// A record the sidecar applies itself.
    Native { lsn: Lsn, record: NativeRecord },
}

impl RedoRecord {
    pub fn lsn(&self) -> Lsn {
        match self {
            RedoRecord::Postgres { end_lsn, .. } => *end_lsn,
            RedoRecord::Native { lsn, .. } => *lsn,
        }
    }
}

/// Sorts one decoded WAL record into what redo needs, per block: the record itself for every
/// block it references when it is page-level, and the Rust-native records it implies for
/// visibility-map blocks. SLRU pages (CLOG, multixacts) are not blocks of relations; their
/// native records come from [`super::derive::native_records`] directly.
pub fn redo_records_of(
    rec: &super::super::wal::record::DecodedRecord,
    mut emit: impl FnMut(BufferTag, RedoRecord),
) -> Result<(), super::derive::DeriveError> {
    for (target, record) in super::derive::native_records(&rec.view())? {
        if let NativeTarget::VisibilityMap(tag) = target {
            emit(tag, RedoRecord::Native { lsn: rec.end_lsn, record });
        }
    }
    if proto::is_page_level(rec.header.rmid, rec.header.info) {
        for b in &rec.blocks {
            emit(b.tag, RedoRecord::Postgres { end_lsn: rec.end_lsn, raw: rec.raw.clone() });
        }
    }
    Ok(())
}

/// Rebuild `target` from `base` (or from nothing, when the first record initialises the page)
/// by applying `records` in order.
#[derive(Debug, Clone)]
pub struct RedoRequest {
    pub target: BufferTag,
    pub base: Option<Bytes>,
    pub records: Vec<RedoRecord>,
}

/// Why a page could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum RedoError {
    #[error("redo of {tag} up to {lsn}: {source}")]
    Process { tag: BufferTag, lsn: Lsn, source: ProcessError },
    #[error("redo of {tag} up to {lsn}: native record at {at}: {source}")]
    Native { tag: BufferTag, lsn: Lsn, at: Lsn, source: native::NativeError },
    #[error("redo of {tag}: base page has {len} bytes, expected {BLCKSZ}")]
    BasePage { tag: BufferTag, len: usize },
    #[error("could not prepare wal-redo scratch directories: {0}")]
    Scratch(#[from] ScratchError),
    #[error("could not start a wal-redo process: {0}")]
    Start(ProcessError),
}

/// Rebuilds pages.
pub trait WalRedoManager: Send + Sync {
    fn redo(&self, request: RedoRequest) -> Result<Box<[u8; BLCKSZ]>, RedoError>;

    /// Rebuilds many pages; the results in request order, each failing alone. Callers with
    /// many pages to rebuild at once (base backups) use this so an implementation can pipeline
    /// them.
    fn redo_many(&self, requests: Vec<RedoRequest>) -> Vec<Result<Box<[u8; BLCKSZ]>, RedoError>> {
        requests.into_iter().map(|r| self.redo(r)).collect()
    }

    /// Counters for status reports.
    fn stats(&self) -> RedoStats {
        RedoStats::default()
    }
}

type Page = Box<[u8; BLCKSZ]>;

/// A pool of `postgres --single` redo processes.
pub struct PostgresRedoManager {
    /// One per process; a caller takes a free one and talks to its process itself.
    slots: Arc<[Mutex<Slot>]>,
    /// Where the next caller starts looking for a free slot.
    next: AtomicUsize,
    /// Signalled when a slot is given back, for callers that found none free.
    released: (Mutex<()>, Condvar),
    shared: Arc<Shared>,
    /// The threads starting the processes beside the caller's start-up.
    starters: Vec<JoinHandle<()>>,
}

/// A process and what goes with it.
struct Slot {
    process: Option<RedoProcess>,
    /// Requests served by this process (it is replaced after `recycle_after`).
    served: u64,
    /// The buffer requests are encoded into.
    scratch: Vec<u8>,
}

/// Counters for status reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedoStats {
    pub requests: u64,
    pub failures: u64,
    pub process_starts: u64,
}

impl PostgresRedoManager {
    /// Prepares the scratch template (initdb: a second or two) and starts the processes in
    /// the background (a request meanwhile waits for its process to be up).
    pub fn new(cfg: RedoConfig) -> Result<PostgresRedoManager, RedoError> {
        let processes = cfg.processes.max(1);
        let shared = Arc::new(Shared {
            template: ScratchTemplate::create(&cfg)?,
            cfg,
            stats: Mutex::default(),
            pids: Mutex::new(vec![None; processes]),
        });
        let slots: Arc<[Mutex<Slot>]> = (0..processes)
            .map(|_| Mutex::new(Slot { process: None, served: 0, scratch: Vec::with_capacity(64 * 1024) }))
            .collect();
        // Started now, not at the first request, which would wait for the template's copy and
        // the start (tens of milliseconds; more on a slow disk). A failure here is retried by
        // that request.
        let starters = (0..processes)
            .map(|n| {
                let (slots, shared) = (slots.clone(), shared.clone());
                std::thread::Builder::new()
                    .name(format!("walredo-start-{n}"))
                    .spawn(move || {
                        let mut slot = lock(&slots[n]);
                        let _ = ensure_process(&mut slot.process, n, &shared, RedoError::Start);
                    })
                    .expect("spawning a thread")
            })
            .collect();
        Ok(PostgresRedoManager { slots, next: AtomicUsize::new(0), released: Default::default(), shared, starters })
    }

    /// Process ids of the redo processes running now.
    pub fn process_ids(&self) -> Vec<u32> {
        lock(&self.shared.pids).iter().flatten().copied().collect()
    }

    /// Where the scratch data directories are.
    pub fn scratch_root(&self) -> &std::path::Path {
        self.shared.template.root()
    }

    /// A free slot (looking from a rotating start), waiting for the first to come free.
    fn take_slot(&self) -> (usize, MutexGuard<'_, Slot>) {
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let len = self.slots.len();
        let try_all = || {
            (0..len).map(|i| (first + i) % len).find_map(|n| match self.slots[n].try_lock() {
                Ok(slot) => Some((n, slot)),
                Err(TryLockError::Poisoned(e)) => {
                    // A caller panicked mid-exchange: its process's pipes are not to be trusted.
                    let mut slot = e.into_inner();
                    slot.process = None;
                    self.slots[n].clear_poison();
                    Some((n, slot))
                }
                Err(TryLockError::WouldBlock) => None,
            })
        };
        if let Some(taken) = try_all() {
            return taken;
        }
        // Tried again under the lock a releaser takes to notify, so no release is missed; the
        // timeout covers a caller that panicked before notifying.
        let mut waiting = lock(&self.released.0);
        loop {
            if let Some(taken) = try_all() {
                return taken;
            }
            waiting =
                self.released.1.wait_timeout(waiting, Duration::from_millis(10)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn give_back(&self, slot: MutexGuard<'_, Slot>) {
        drop(slot);
        let _guard = lock(&self.released.0);
        self.released.1.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WalRedoManager for PostgresRedoManager {
    fn redo(&self, request: RedoRequest) -> Result<Box<[u8; BLCKSZ]>, RedoError> {
        self.redo_many(vec![request]).pop().expect("one result per request")
    }

    fn stats(&self) -> RedoStats {
        lock(&self.shared.stats).clone()
    }

    /// Runs in the caller's thread, which talks to the process itself: no hand-off to another
    /// thread and back, each a wake-up of an idle core.
    fn redo_many(&self, requests: Vec<RedoRequest>) -> Vec<Result<Box<[u8; BLCKSZ]>, RedoError>> {
        let (n, mut slot) = self.take_slot();
        let shared = &self.shared;
        let Slot { process, served, scratch } = &mut *slot;
        let results = rebuild_many(&requests, process, scratch, n, shared);
        {
            let mut s = lock(&shared.stats);
            s.requests += results.len() as u64;
            s.failures += results.iter().filter(|r| r.is_err()).count() as u64;
        }
        *served += results.len() as u64;
        // (A process whose exchange failed is gone already: `rebuild_many` and `rebuild` drop
        // it at once, so the batch's next request gets a fresh one.) After many requests a
        // fresh process sheds the files and handles a long-lived one accumulates.
        if *served >= shared.cfg.recycle_after {
            *process = None;
        }
        if process.is_none() {
            *served = 0;
        }
        lock(&shared.pids)[n] = process.as_ref().map(RedoProcess::pid);
        self.give_back(slot);
        results
    }
}

impl Drop for PostgresRedoManager {
    fn drop(&mut self) {
        for s in self.starters.drain(..) {
            let _ = s.join();
        }
        for slot in self.slots.iter() {
            // Dropping a process ends it (stdin closed, then killed if it lingers).
            lock(slot).process = None;
        }
        lock(&self.shared.pids).iter_mut().for_each(|p| *p = None);
        self.shared.template.remove();
    }
}

/// What every caller shares.
struct Shared {
    cfg: RedoConfig,
    template: ScratchTemplate,
    stats: Mutex<RedoStats>,
    /// The OS process id of each slot's redo process, while it has one.
    pids: Mutex<Vec<Option<u32>>>,
}

/// A batch: the requests made only of PostgreSQL records (nearly all) go to the process in
/// one pipelined exchange, which saves a round trip and a wake-up per page; the rest, and all
/// of them again one by one if the exchange fails, go through [`rebuild`], so a bad request
/// fails alone with its own error.
fn rebuild_many(
    reqs: &[RedoRequest],
    process: &mut Option<RedoProcess>,
    scratch: &mut Vec<u8>,
    n: usize,
    shared: &Shared,
) -> Vec<Result<Page, RedoError>> {
    let pipelined = |r: &RedoRequest| {
        !r.records.is_empty()
            && r.records.iter().all(|r| matches!(r, RedoRecord::Postgres { .. }))
            && r.base.as_ref().is_none_or(|b| b.len() == BLCKSZ)
    };
    let batch: Vec<usize> = (0..reqs.len()).filter(|&i| pipelined(&reqs[i])).collect();
    let mut results: Vec<Option<Result<Page, RedoError>>> = (0..reqs.len()).map(|_| None).collect();
    if batch.len() > 1 {
        scratch.clear();
        for &i in &batch {
            let r = &reqs[i];
            encode_run(
                scratch,
                &r.target,
                r.base.as_deref().map(|b| b.try_into().expect("checked: BLCKSZ")),
                &r.records,
            );
        }
        let mut replies = vec![0u8; batch.len() * BLCKSZ];
        let first = &reqs[batch[0]];
        let fail = |source| RedoError::Process { tag: first.target, lsn: first.records[0].lsn(), source };
        let done = ensure_process(process, n, shared, fail).and_then(|p| {
            let deadline = Instant::now() + shared.cfg.request_timeout;
            p.exchange(scratch, &mut replies, deadline).map_err(fail)
        });
        match done {
            Ok(()) => {
                for (&i, page) in batch.iter().zip(replies.chunks_exact(BLCKSZ)) {
                    results[i] = Some(Ok(Box::new(page.try_into().expect("BLCKSZ bytes"))));
                }
            }
            // Which request broke it is not known: each is tried alone below on a fresh
            // process.
            Err(_) => *process = None,
        }
    }
    reqs.iter()
        .zip(results)
        .map(|(req, done)| done.unwrap_or_else(|| rebuild(req, process, scratch, n, shared)))
        .collect()
}

/// Encodes one exchange: the target, its base page if any, the PostgreSQL records (native
/// ones are not sent) and the request for the page back.
fn encode_run(scratch: &mut Vec<u8>, tag: &BufferTag, base: Option<&[u8; BLCKSZ]>, records: &[RedoRecord]) {
    proto::encode_begin(scratch, tag);
    if let Some(p) = base {
        proto::encode_push(scratch, p);
    }
    for r in records {
        if let RedoRecord::Postgres { end_lsn, raw } = r {
            proto::encode_apply(scratch, *end_lsn, raw);
        }
    }
    proto::encode_get(scratch);
}

/// A slot's process, started (from the template) if it has none or it died while idle
/// — which then costs the request nothing.
fn ensure_process<'p>(
    process: &'p mut Option<RedoProcess>,
    n: usize,
    shared: &Shared,
    fail: impl FnOnce(ProcessError) -> RedoError,
) -> Result<&'p mut RedoProcess, RedoError> {
    if process.as_mut().is_some_and(|p| !p.is_alive()) {
        *process = None;
    }
    if process.is_none() {
        let dir = shared.template.copy_for(n, &shared.cfg)?;
        let p = RedoProcess::start(&dir, &shared.cfg).map_err(fail)?;
        lock(&shared.pids)[n] = Some(p.pid());
        *process = Some(p);
        lock(&shared.stats).process_starts += 1;
    }
    Ok(process.as_mut().expect("started above"))
}

fn rebuild(
    req: &RedoRequest,
    process: &mut Option<RedoProcess>,
    scratch: &mut Vec<u8>,
    n: usize,
    shared: &Shared,
) -> Result<Box<[u8; BLCKSZ]>, RedoError> {
    let tag = req.target;
    let last = req.records.last().map_or(Lsn::INVALID, RedoRecord::lsn);
    let mut page: Option<Box<[u8; BLCKSZ]>> = match &req.base {
        Some(b) => Some(Box::new(b[..].try_into().map_err(|_| RedoError::BasePage { tag, len: b.len() })?)),
        None => None,
    };
    let mut i = 0;
    while i < req.records.len() {
        match &req.records[i] {
            RedoRecord::Native { lsn, record } => {
                let p = page.get_or_insert_with(|| Box::new([0; BLCKSZ]));
                native::apply(&NativeTarget::VisibilityMap(tag), record, p).map_err(|source| RedoError::Native {
                    tag,
                    lsn: last,
                    at: *lsn,
                    source,
                })?;
                i += 1;
            }
            RedoRecord::Postgres { .. } => {
                // The whole run of PostgreSQL records goes in one pipelined exchange.
                let run_end = req.records[i..]
                    .iter()
                    .position(|r| matches!(r, RedoRecord::Native { .. }))
                    .map_or(req.records.len(), |p| i + p);
                scratch.clear();
                encode_run(scratch, &tag, page.as_deref(), &req.records[i..run_end]);
                let mut out = page.take().unwrap_or_else(|| Box::new([0; BLCKSZ]));
                let fail = |source| RedoError::Process { tag, lsn: last, source };
                let p = ensure_process(process, n, shared, fail)?;
                if let Err(e) = p.exchange(scratch, &mut out[..], Instant::now() + shared.cfg.request_timeout) {
                    // Its reply may still come (a timeout), or half a request may be in the
                    // pipe: the next request must not read that as its page.
                    *process = None;
                    return Err(fail(e));
                }
                page = Some(out);
                i = run_end;
            }
        }
    }
    Ok(page.unwrap_or_else(|| Box::new([0; BLCKSZ])))
}
