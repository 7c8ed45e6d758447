//! The redo manager: the page store's one way to rebuild a page. [`WalRedoManager`] is the
//! interface; [`PostgresRedoManager`] implements it with a pool of wal-redo processes, one
//! worker thread each, fed from a shared `crossbeam` queue. Processes start lazily, from a
//! scratch template made once, and are replaced after a crash, a timeout or any error, so a
//! bad request fails alone and the next one finds a fresh process.
//!
//! A request's records may mix PostgreSQL records and Rust-native ones (DESIGN.md §3, §5): runs
//! of PostgreSQL records go to a redo process in one pipelined exchange, native records are
//! applied in Rust in between, in LSN order.

use super::native::{self, NativeRecord, NativeTarget};
use super::process::{ProcessError, RedoProcess};
use super::scratch::{ScratchError, ScratchTemplate};
use super::RedoConfig;
use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender};
use neon_types::walredo as proto;
use neon_types::{BufferTag, Lsn, BLCKSZ};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

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
    #[error("the wal-redo manager is shut down")]
    ShutDown,
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

/// What a worker is asked to do: requests (one, or a batch it may pipeline), and where their
/// results go, in order.
type Job = (Vec<RedoRequest>, Sender<Vec<Result<Page, RedoError>>>);

/// A pool of `postgres --single` redo processes.
pub struct PostgresRedoManager {
    queue: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    template: Arc<ScratchTemplate>,
    stats: Arc<Mutex<RedoStats>>,
    /// The OS process id of each worker's redo process, while it has one.
    pids: Arc<Mutex<Vec<Option<u32>>>>,
}

/// Counters for status reports and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedoStats {
    pub requests: u64,
    pub failures: u64,
    pub process_starts: u64,
}

impl PostgresRedoManager {
    /// Prepares the scratch template (initdb: a second or two) and the worker threads; redo
    /// processes start on first use.
    pub fn new(cfg: RedoConfig) -> Result<PostgresRedoManager, RedoError> {
        let template = Arc::new(ScratchTemplate::create(&cfg)?);
        let (tx, rx) = bounded::<Job>(cfg.processes.max(1) * 4);
        let stats = Arc::new(Mutex::new(RedoStats::default()));
        let pids = Arc::new(Mutex::new(vec![None; cfg.processes.max(1)]));
        let cfg = Arc::new(cfg);
        let workers = (0..cfg.processes.max(1))
            .map(|n| {
                let shared =
                    Shared { cfg: cfg.clone(), template: template.clone(), stats: stats.clone(), pids: pids.clone() };
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("walredo-{n}"))
                    .spawn(move || worker(n, rx, shared))
                    .expect("spawning a thread")
            })
            .collect();
        Ok(PostgresRedoManager { queue: Some(tx), workers, template, stats, pids })
    }

    /// Process ids of the redo processes running now.
    pub fn process_ids(&self) -> Vec<u32> {
        self.pids.lock().expect("pids lock").iter().flatten().copied().collect()
    }

    /// Where the scratch data directories are.
    pub fn scratch_root(&self) -> &std::path::Path {
        self.template.root()
    }
}

impl WalRedoManager for PostgresRedoManager {
    fn redo(&self, request: RedoRequest) -> Result<Box<[u8; BLCKSZ]>, RedoError> {
        self.redo_many(vec![request]).pop().expect("one result per request")
    }

    fn stats(&self) -> RedoStats {
        self.stats.lock().expect("stats lock").clone()
    }

    fn redo_many(&self, requests: Vec<RedoRequest>) -> Vec<Result<Box<[u8; BLCKSZ]>, RedoError>> {
        let n = requests.len();
        let (tx, rx) = bounded(1);
        let sent = self.queue.as_ref().is_some_and(|q| q.send((requests, tx)).is_ok());
        match sent.then(|| rx.recv().ok()).flatten() {
            Some(results) => results,
            None => (0..n).map(|_| Err(RedoError::ShutDown)).collect(),
        }
    }
}

impl Drop for PostgresRedoManager {
    fn drop(&mut self) {
        // Closing the queue ends the workers, whose processes are killed as they exit.
        self.queue.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        self.template.remove();
    }
}

/// What every worker shares.
struct Shared {
    cfg: Arc<RedoConfig>,
    template: Arc<ScratchTemplate>,
    stats: Arc<Mutex<RedoStats>>,
    pids: Arc<Mutex<Vec<Option<u32>>>>,
}

fn worker(n: usize, rx: Receiver<Job>, shared: Shared) {
    let mut process: Option<RedoProcess> = None;
    let mut served = 0u64;
    let mut scratch = Vec::with_capacity(64 * 1024);
    // Start the process now, not at the first request, which would wait for the template's
    // copy and the start (tens of milliseconds); a failure here is retried by that request.
    let _ = ensure_process(&mut process, n, &shared, RedoError::Start);
    for (requests, reply) in rx {
        let results = rebuild_many(&requests, &mut process, &mut scratch, n, &shared);
        {
            let mut s = shared.stats.lock().expect("stats lock");
            s.requests += results.len() as u64;
            s.failures += results.iter().filter(|r| r.is_err()).count() as u64;
        }
        served += results.len() as u64;
        if results.iter().any(|r| matches!(r, Err(RedoError::Process { .. }))) || served >= shared.cfg.recycle_after {
            // After a process error its state is not to be trusted; after many requests a
            // fresh process sheds the files and handles a long-lived one accumulates.
            process = None;
            served = 0;
        }
        shared.pids.lock().expect("pids lock")[n] = process.as_ref().map(RedoProcess::pid);
        let _ = reply.send(results);
    }
    drop(process);
    shared.pids.lock().expect("pids lock")[n] = None;
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

/// This worker's process, started (from the template) if it has none or it died while idle
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
        shared.pids.lock().expect("pids lock")[n] = Some(p.pid());
        *process = Some(p);
        shared.stats.lock().expect("stats lock").process_starts += 1;
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
                p.exchange(scratch, &mut out[..], Instant::now() + shared.cfg.request_timeout).map_err(fail)?;
                page = Some(out);
                i = run_end;
            }
        }
    }
    Ok(page.unwrap_or_else(|| Box::new([0; BLCKSZ])))
}
