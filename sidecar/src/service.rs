//! The page service: the sidecar's unix socket, answering `neon_types::protocol` requests
//! from the store while ingest goes on. One thread per connection; each request waits (up to
//! the time it names) for its LSN to arrive, then reads the store. Pages go through the
//! [`PageCache`], which `Prefetch` requests (the extension's background worker) fill ahead of
//! readers with batched, pipelined redo. Errors go back as error
//! responses with a code and a message naming the LSN, relation and block; the connection
//! stays usable.
//!
//! The socket is created private to the sidecar's OS user (mode 0600, in a directory only it
//! can enter, which `bind` checks), because every page of the database can be read through it.

use crate::basebackup::shared::SharedBasebackups;
use crate::basebackup::{BasebackupError, Options, Progress};
use crate::page_cache::{Lookup, PageCache, PENDING_WAIT};
use crate::repo::catalog::{self, CatalogError};
use crate::repo::meta;
use crate::repo::point_in_time::{self, PointInTimeError};
use crate::repo::reconstruct::{self, GetPageError};
use crate::repo::store::Store;
use crate::repo::timeline::{RepoError, Timeline};
use crate::wal::consts::SIZE_OF_LONG_PAGE_HEADER;
use crate::walredo::WalRedoManager;
use neon_types::protocol::{ErrorCode, ProtocolError, Request, Response, TimelineHistory};
use neon_types::{Lsn, XLOG_BLCKSZ};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("page service socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("page service socket {path}: its directory {dir} must be private to this user (mode 0700), not {mode:o}")]
    NotPrivate { path: PathBuf, dir: PathBuf, mode: u32 },
}

/// Counters for `Status`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub get_page: AtomicU64,
    pub get_page_micros: AtomicU64,
    /// `GetPage` service times: bucket `i` counts those under 2^i µs.
    pub get_page_hist: [AtomicU64; 32],
    pub connections: AtomicU64,
    pub prefetch_requests: AtomicU64,
    pub prefetched_pages: AtomicU64,
    /// The compute's WAL flush position as its background worker last reported it.
    pub compute_flush_lsn: AtomicU64,
}

impl Metrics {
    fn record_get_page(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.get_page.fetch_add(1, Ordering::Relaxed);
        self.get_page_micros.fetch_add(us, Ordering::Relaxed);
        let bucket = (64 - us.leading_zeros() as usize).min(31);
        self.get_page_hist[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound (µs) of the bucket holding quantile `q` of `GetPage` times.
    fn get_page_quantile_us(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.get_page_hist.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return 1u64 << i;
            }
        }
        1 << 31
    }
}

/// The most blocks one `Prefetch` request may ask for.
pub const MAX_PREFETCH: u32 = 1024;
/// Blocks a prefetch hands to the redo manager at once (as one pipelined batch).
const PREFETCH_BATCH: usize = 64;

/// What a request is served from.
pub struct PageService {
    pub store: Arc<Store>,
    pub redo: Arc<dyn WalRedoManager>,
    pub metrics: Metrics,
    /// Where base backups go (`None`: the sidecar was started without a shared directory).
    pub basebackups: Option<SharedBasebackups>,
    /// Threads rebuilding a base backup's pages.
    pub basebackup_workers: usize,
    /// How often a base backup reports progress, and after how long it starts to.
    pub progress_every: Duration,
    pub cache: Arc<PageCache>,
    /// What ingest is doing (following, retrying, stopped and why).
    pub ingest: Arc<crate::follower::IngestState>,
    /// Branches (`None`: the sidecar was started without a shared directory).
    pub branches: Option<crate::branch::Branches>,
    /// Read-only servers on branches (`None`: no shared directory).
    pub past: Option<crate::past::PastServers>,
    /// The remote store's side of things, for status (`None`: no `--remote`).
    pub remote: Option<crate::remote::RemoteState>,
}

fn code_of(e: &GetPageError) -> ErrorCode {
    match e {
        GetPageError::OutOfHistory { lsn, start, .. } if lsn < start => ErrorCode::OutOfHistory,
        GetPageError::OutOfHistory { .. } => ErrorCode::NotYet,
        GetPageError::InGap { .. } => ErrorCode::OutOfHistory,
        GetPageError::NoSuchPage { .. } | GetPageError::NoSuchSlruPage { .. } => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error { code, message: message.into() }
}

fn branch_error(e: crate::branch::BranchError) -> Response {
    use crate::branch::BranchError;
    let code = match &e {
        BranchError::BadMountPoint { .. } | BranchError::InUse { .. } => ErrorCode::BadRequest,
        BranchError::NoSuchBranch { .. } => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    };
    error(code, e.to_string())
}

fn past_error(e: crate::past::PastError) -> Response {
    match e {
        crate::past::PastError::Branch(b) => branch_error(b),
        crate::past::PastError::NoSuch { .. } => error(ErrorCode::NotFound, e.to_string()),
        e => error(ErrorCode::Internal, e.to_string()),
    }
}

fn time_error(e: PointInTimeError) -> Response {
    let code = match &e {
        PointInTimeError::BeforeHistory { .. } | PointInTimeError::Removed { .. } | PointInTimeError::Lost { .. } => {
            ErrorCode::OutOfHistory
        }
        PointInTimeError::NotYet { .. } | PointInTimeError::NoTransactions { .. } => ErrorCode::NotYet,
        PointInTimeError::Index(_) => ErrorCode::Internal,
    };
    error(code, e.to_string())
}

impl PageService {
    /// Waits for `lsn` on timeline `t` and checks it against the history it holds.
    fn ready(&self, t: &Timeline, lsn: Lsn, wait_ms: u32) -> Result<(), Response> {
        match t.wait_for_lsn(lsn, Duration::from_millis(wait_ms.into())) {
            Ok(()) => {}
            Err(e @ RepoError::NotYet { .. }) => return Err(error(ErrorCode::NotYet, e.to_string())),
            Err(e) => return Err(error(ErrorCode::Internal, e.to_string())),
        }
        reconstruct::check_in_history(t, lsn).map_err(|e| error(code_of(&e), e.to_string()))
    }

    /// Answers one request; a long one (a base backup) first sends `Progress` responses
    /// through `progress`, every `progress_every` once it has taken that long.
    pub fn handle(&self, req: Request, caller: &mut dyn Caller) -> Response {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self.answer(req, caller).unwrap_or_else(|e| e);
        if matches!(resp, Response::Error { .. }) {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        resp
    }

    fn answer(&self, req: Request, caller: &mut dyn Caller) -> Result<Response, Response> {
        match req {
            Request::OnTimeline { timeline, request } => {
                let t = self.store.timeline(timeline).ok_or_else(|| {
                    let have: Vec<String> = self.store.timelines().iter().map(|t| t.id().to_string()).collect();
                    error(
                        ErrorCode::NotFound,
                        format!("the sidecar has no timeline {timeline} (it has {})", have.join(", ")),
                    )
                })?;
                self.answer_on(&t, *request, caller)
            }
            req => self.answer_on(&self.store.current(), req, caller),
        }
    }

    /// Answers `req` on timeline `t`.
    fn answer_on(&self, t: &Arc<Timeline>, req: Request, caller: &mut dyn Caller) -> Result<Response, Response> {
        let internal = |e: RepoError| error(ErrorCode::Internal, e.to_string());
        let generation = self.store.generation();
        let repo = t.as_ref();
        Ok(match req {
            Request::GetPage { tag, lsn, wait_ms } => {
                self.ready(repo, lsn, wait_ms)?;
                let started = Instant::now();
                let rebuild = || {
                    reconstruct::get_page(repo, self.redo.as_ref(), tag, lsn)
                        .map_err(|e| error(code_of(&e), e.to_string()))
                };
                let page = if self.store.on_current_lineage(t, lsn, generation) {
                    match self.cache.lookup((tag, lsn), PENDING_WAIT) {
                        Lookup::Hit(page) => page,
                        Lookup::Claimed(claim) => {
                            let page = rebuild()?;
                            // Filed only if the followed timeline did not change meanwhile.
                            if self.store.on_current_lineage(t, lsn, generation) {
                                claim.fill(&page);
                            }
                            page
                        }
                    }
                } else {
                    rebuild()?
                };
                self.metrics.record_get_page(started.elapsed());
                Response::Page(page)
            }
            Request::Prefetch { rel, first, n, lsn, wait_ms } => {
                if n > MAX_PREFETCH {
                    return Err(error(
                        ErrorCode::BadRequest,
                        format!("prefetch of {n} blocks (at most {MAX_PREFETCH})"),
                    ));
                }
                self.ready(repo, lsn, wait_ms)?;
                self.metrics.prefetch_requests.fetch_add(1, Ordering::Relaxed);
                // The cache serves the current lineage only: elsewhere there is nothing to fill.
                if !self.store.on_current_lineage(t, lsn, generation) {
                    return Ok(Response::Prefetched(0));
                }
                Response::Prefetched(self.prefetch(t, rel, first, n, lsn, generation)?)
            }
            Request::ComputeFlush { lsn } => {
                self.metrics.compute_flush_lsn.fetch_max(lsn.0, Ordering::Relaxed);
                Response::Lsn(repo.last_lsn())
            }
            Request::RelationFile { dbnode, reloid, lsn, wait_ms } => {
                self.ready(repo, lsn, wait_ms)?;
                let node = catalog::relation_file_at(repo, self.redo.as_ref(), dbnode, reloid, lsn).map_err(|e| {
                    let code = match &e {
                        CatalogError::Page(p) => code_of(p),
                        CatalogError::NoDatabase { .. } => ErrorCode::NotFound,
                        _ => ErrorCode::Internal,
                    };
                    error(code, e.to_string())
                })?;
                Response::RelationFile(node)
            }
            Request::RelSize { rel, lsn, wait_ms } => {
                self.ready(repo, lsn, wait_ms)?;
                Response::Size(reconstruct::rel_size(repo, &rel, lsn).map_err(internal)?)
            }
            Request::ListDatabases { lsn, wait_ms } => {
                self.ready(repo, lsn, wait_ms)?;
                let dbs = meta::list_databases(repo, lsn).map_err(internal)?;
                Response::Databases(dbs.into_iter().map(|d| (d.dbnode, d.spcnode)).collect())
            }
            Request::ListRelations { dbnode, lsn, wait_ms } => {
                self.ready(repo, lsn, wait_ms)?;
                if dbnode != 0 && meta::database(repo, dbnode, lsn).map_err(internal)?.is_none() {
                    return Err(error(ErrorCode::NotFound, format!("database {dbnode} does not exist at {lsn}")));
                }
                let rels = meta::list_relations(repo, dbnode, lsn).map_err(internal)?;
                Response::Relations(rels.into_iter().collect())
            }
            Request::WaitForLsn { lsn, wait_ms } => {
                repo.wait_for_lsn(lsn, Duration::from_millis(wait_ms.into()))
                    .map_err(|e| error(ErrorCode::NotYet, e.to_string()))?;
                Response::Lsn(repo.last_lsn())
            }
            Request::History => Response::History(self.history()),
            Request::Status => Response::Status(self.status_text()),
            Request::OnTimeline { .. } => {
                return Err(error(ErrorCode::BadRequest, "a timeline request inside another"));
            }
            Request::BranchCreate { lsn, mount, wait_ms } => {
                let branches = self.branches()?;
                self.ready(repo, lsn, wait_ms)?;
                let flush_grace = Duration::from_millis(wait_ms.into()) + Duration::from_secs(5);
                repo.wait_for_durable(lsn, flush_grace).map_err(|e| error(ErrorCode::NotYet, e.to_string()))?;
                let made =
                    branches.create(&self.store, t, &self.redo, lsn, mount.map(PathBuf::from)).map_err(branch_error)?;
                Response::Branches(vec![made])
            }
            Request::BranchList => Response::Branches(self.branches()?.list()),
            Request::LsnAt { time, inclusive, clock, wait_ms } => {
                let live = Arc::ptr_eq(t, &self.store.current());
                if let Some((now, flushed)) = clock.filter(|_| live) {
                    // A position at the start of a WAL page (just past its header) is where the
                    // last record before it ended, as far as the records filed can say.
                    let in_header = flushed.0 % XLOG_BLCKSZ as u64 <= SIZE_OF_LONG_PAGE_HEADER as u64;
                    let flushed = if in_header { Lsn(flushed.0 - flushed.0 % XLOG_BLCKSZ as u64) } else { flushed };
                    // The compute's reading counts once its WAL up to there is filed: waited
                    // for here, and if it is not in time, older readings answer.
                    repo.note_clock(now, flushed);
                    let _ = repo.wait_for_lsn(flushed, Duration::from_millis(wait_ms.into()));
                }
                Response::Lsn(point_in_time::lsn_at(t, time, inclusive, live).map_err(time_error)?)
            }
            Request::TimeAt { lsn } => {
                let (before, after) = point_in_time::around(t, lsn).map_err(time_error)?;
                Response::Commits { before: before.map(|e| (e.lsn, e.time)), after: after.map(|e| (e.lsn, e.time)) }
            }
            Request::BranchDrop { id } => {
                if let Some(past) = self.past.as_ref().and_then(|p| p.on_branch(id)) {
                    return Err(error(
                        ErrorCode::BadRequest,
                        format!(
                            "branch {id} holds past server {past} (neon_as_of): drop that instead (neon_as_of_drop)"
                        ),
                    ));
                }
                let dropped = self.branches()?.drop_branch(id).map_err(branch_error)?;
                Response::Branches(vec![dropped])
            }
            Request::PastStart { lsn, wait_ms, idle_ms } => {
                let (branches, past) = (self.branches()?, self.past()?);
                self.ready(repo, lsn, wait_ms)?;
                let flush_grace = Duration::from_millis(wait_ms.into()) + Duration::from_secs(5);
                repo.wait_for_durable(lsn, flush_grace).map_err(|e| error(ErrorCode::NotYet, e.to_string()))?;
                Response::Past(vec![past
                    .start(branches, &self.store, t, &self.redo, lsn, idle_ms)
                    .map_err(past_error)?])
            }
            Request::PastStop { id } => {
                let (branches, past) = (self.branches()?, self.past()?);
                Response::Past(vec![past.stop(branches, id).map_err(past_error)?])
            }
            Request::PastList => Response::Past(self.past()?.list()),
            Request::Basebackup { lsn, full, new_timeline, wait_ms } => {
                let shared = self.basebackups.as_ref().ok_or_else(|| {
                    error(ErrorCode::BadRequest, "the sidecar runs without a shared directory (--shared-dir)")
                })?;
                self.ready(repo, lsn, wait_ms)?;
                // Base backups are of what is durable: wait for the flush that makes `lsn` so.
                let flush_grace = Duration::from_millis(wait_ms.into()) + Duration::from_secs(5);
                repo.wait_for_durable(lsn, flush_grace).map_err(|e| error(ErrorCode::NotYet, e.to_string()))?;
                let opts = Options {
                    relation_pages: full,
                    workers: self.basebackup_workers,
                    new_timeline,
                    progress_every: self.progress_every,
                    tablespace_map: Default::default(),
                };
                let mut watch = BuildWatch { caller, progress_every: self.progress_every };
                let made = shared.get(&self.store, t, self.redo.as_ref(), lsn, opts, &mut watch).map_err(|e| {
                    let code = match &e {
                        BasebackupError::Page { source, .. } => code_of(source),
                        BasebackupError::Cancelled { .. } => ErrorCode::BadRequest,
                        _ => ErrorCode::Internal,
                    };
                    error(code, e.to_string())
                })?;
                Response::Basebackup {
                    lsn,
                    bytes: made.bytes,
                    micros: (made.seconds * 1e6) as u64,
                    path: made.path.display().to_string(),
                }
            }
        })
    }

    fn past(&self) -> Result<&crate::past::PastServers, Response> {
        self.past.as_ref().ok_or_else(|| {
            error(ErrorCode::BadRequest, "the sidecar runs without a shared directory (--shared-dir): no past servers")
        })
    }

    fn branches(&self) -> Result<&crate::branch::Branches, Response> {
        self.branches.as_ref().ok_or_else(|| {
            error(ErrorCode::BadRequest, "the sidecar runs without a shared directory (--shared-dir): no branches")
        })
    }

    /// Rebuilds blocks `first..first + n` of `rel` at `lsn` into the cache (those not there or
    /// under way already), in batches so the first are ready soon; blocks past the fork's end
    /// are skipped. Returns how many of the blocks are in the cache or being rebuilt.
    fn prefetch(
        &self,
        t: &Arc<Timeline>,
        rel: neon_types::RelTag,
        first: u32,
        n: u32,
        lsn: Lsn,
        generation: u64,
    ) -> Result<u32, Response> {
        let r = reconstruct::relation_at(t, rel, lsn).map_err(|e| error(ErrorCode::Internal, e.to_string()))?;
        let end = first.saturating_add(n).min(r.nblocks.unwrap_or(0));
        let blocks: Vec<u32> = (first..end).collect();
        // One lane per redo process, so a batch keeps them all busy.
        let lanes = (self.basebackup_workers / 2).max(1);
        let done = AtomicU64::new(0);
        for chunk in blocks.chunks(PREFETCH_BATCH) {
            std::thread::scope(|s| {
                for lane in chunk.chunks(chunk.len().div_ceil(lanes)) {
                    s.spawn(|| self.prefetch_lane(t, &r, lane, &done, generation));
                }
            });
        }
        Ok(done.into_inner() as u32)
    }

    /// Claims what of `blocks` nobody has or is rebuilding, rebuilds that as one batch and
    /// files it; counts in `done` the blocks now cached or under way.
    fn prefetch_lane(
        &self,
        t: &Arc<Timeline>,
        r: &reconstruct::RelationAt,
        blocks: &[u32],
        done: &AtomicU64,
        generation: u64,
    ) {
        let claims: Vec<_> = blocks
            .iter()
            .filter_map(|&blkno| self.cache.try_claim((neon_types::BufferTag { rel: r.rel, blkno }, r.lsn)))
            .collect();
        done.fetch_add((blocks.len() - claims.len()) as u64, Ordering::Relaxed);
        let pages = reconstruct::pages_of(t, self.redo.as_ref(), claims.iter().map(|c| (r, c.key().0.blkno)));
        let filed = self.store.on_current_lineage(t, r.lsn, generation);
        for (claim, page) in claims.into_iter().zip(pages) {
            // A page that fails is left for GetPage, which reports the error to its reader.
            if let (Ok(page), true) = (page, filed) {
                claim.fill(&page);
                done.fetch_add(1, Ordering::Relaxed);
                self.metrics.prefetched_pages.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Every timeline's history, the followed one first.
    pub fn history(&self) -> Vec<TimelineHistory> {
        let current = self.store.current();
        let mut all = self.store.timelines();
        all.sort_by_key(|t| (!Arc::ptr_eq(t, &current), t.id()));
        all.iter()
            .map(|t| {
                let b = t.bounds();
                TimelineHistory {
                    timeline: t.id(),
                    parent: t.parent(),
                    origin: b.origin,
                    oldest: b.oldest,
                    durable: b.durable,
                    last: b.last,
                    gaps: t.gaps().iter().map(|g| (g.from, g.to)).collect(),
                }
            })
            .collect()
    }

    /// `name value` lines: history, ingest lag, layers, cache, redo, requests and latencies.
    pub fn status_text(&self) -> String {
        let repo = self.store.current();
        let b = repo.bounds();
        let layers = repo.layers();
        let bytes: u64 = layers.iter().map(|l| l.size_bytes()).sum();
        let m = &self.metrics;
        let n = m.get_page.load(Ordering::Relaxed);
        let mut s = String::new();
        let _ = writeln!(s, "ingest_state {}", self.ingest.get());
        let _ = writeln!(s, "timeline {}", repo.id());
        let _ = writeln!(s, "timelines {}", self.store.timelines().len());
        let _ = writeln!(s, "history_origin {}", b.origin);
        let _ = writeln!(s, "history_oldest {}", b.oldest);
        let _ = writeln!(s, "durable_lsn {}", b.durable);
        let _ = writeln!(s, "last_record_lsn {}", b.last);
        let _ = writeln!(s, "layer_files {}", layers.len());
        let _ = writeln!(s, "layer_bytes {bytes}");
        let _ = writeln!(s, "inmem_values {}", repo.inmem_len());
        let (building, running) = self.basebackups.as_ref().map_or((0, 0), |b| (b.building(), b.running()));
        let _ = writeln!(s, "basebackups_building {building}");
        let _ = writeln!(s, "basebackups_running {running}");
        let (built, reused) = self.basebackups.as_ref().map_or((0, 0), |b| (b.built(), b.reused()));
        let _ = writeln!(s, "basebackups_built {built}");
        let _ = writeln!(s, "basebackups_reused {reused}");
        let _ = writeln!(s, "requests {}", m.requests.load(Ordering::Relaxed));
        let _ = writeln!(s, "request_errors {}", m.errors.load(Ordering::Relaxed));
        let _ = writeln!(s, "connections {}", m.connections.load(Ordering::Relaxed));
        let _ = writeln!(s, "get_page_requests {n}");
        let mean = m.get_page_micros.load(Ordering::Relaxed).checked_div(n).unwrap_or(0);
        let _ = writeln!(s, "get_page_mean_us {mean}");
        let _ = writeln!(s, "get_page_p50_us_under {}", m.get_page_quantile_us(0.5));
        let _ = writeln!(s, "get_page_p99_us_under {}", m.get_page_quantile_us(0.99));
        let _ = writeln!(s, "prefetch_requests {}", m.prefetch_requests.load(Ordering::Relaxed));
        let _ = writeln!(s, "prefetched_pages {}", m.prefetched_pages.load(Ordering::Relaxed));
        let c = &self.cache.stats;
        let _ = writeln!(s, "cache_pages {}", self.cache.len());
        let _ = writeln!(s, "cache_capacity_pages {}", self.cache.capacity());
        let _ = writeln!(s, "cache_hits {}", c.hits.load(Ordering::Relaxed));
        let _ = writeln!(s, "cache_misses {}", c.misses.load(Ordering::Relaxed));
        let _ = writeln!(s, "cache_waits {}", c.waits.load(Ordering::Relaxed));
        let r = self.redo.stats();
        let _ = writeln!(s, "redo_requests {}", r.requests);
        let _ = writeln!(s, "redo_failures {}", r.failures);
        let _ = writeln!(s, "redo_process_starts {}", r.process_starts);
        let flush = Lsn(m.compute_flush_lsn.load(Ordering::Relaxed));
        let _ = writeln!(s, "compute_flush_lsn {flush}");
        // How far ingest is behind the compute, as the compute last said where it was.
        let _ = writeln!(s, "ingest_lag_bytes {}", if flush.is_valid() { flush.0.saturating_sub(b.last.0) } else { 0 });
        let (files, bytes) = self.store.local_layers();
        let _ = writeln!(s, "local_layer_files {files}");
        let _ = writeln!(s, "local_layer_bytes {bytes}");
        if let Some(r) = &self.remote {
            r.write_status(&mut s);
        }
        s
    }

    fn serve_connection(&self, mut conn: UnixStream) {
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        loop {
            let req = match Request::read_from(&mut conn) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(ProtocolError::Io(_)) => return,
                Err(e @ ProtocolError::Malformed(_)) => {
                    // The stream can no longer be trusted to be in step: answer, then hang up.
                    let _ = error(ErrorCode::BadRequest, e.to_string()).write_to(&mut conn);
                    return;
                }
            };
            let mut caller = Connection { conn: &mut conn, checked: Instant::now(), gone: false };
            let resp = self.handle(req, &mut caller);
            if resp.write_to(&mut conn).is_err() {
                return;
            }
        }
    }
}

/// Whoever asked: where a long request reports how far it has come, and how it learns that the
/// caller no longer waits (a cancelled query closes its connection).
pub trait Caller {
    fn progress(&mut self, p: Response);
    fn gone(&mut self) -> bool;
}

/// A caller that only hears progress (tests, commands in process).
impl<F: FnMut(Response)> Caller for F {
    fn progress(&mut self, p: Response) {
        self(p)
    }

    fn gone(&mut self) -> bool {
        false
    }
}

/// A client on the socket. It sends nothing while it waits for its answer, so anything to
/// read — in practice the end of the stream — means it has gone.
struct Connection<'a> {
    conn: &'a mut UnixStream,
    /// When it was last looked at (at most every [`GONE_CHECK`]).
    checked: Instant,
    gone: bool,
}

/// How often a long request looks whether its client is still there.
const GONE_CHECK: Duration = Duration::from_millis(100);

impl Caller for Connection<'_> {
    fn progress(&mut self, p: Response) {
        self.gone |= p.write_to(self.conn).is_err();
    }

    fn gone(&mut self) -> bool {
        if !self.gone && self.checked.elapsed() >= GONE_CHECK {
            use std::os::fd::AsRawFd;
            self.checked = Instant::now();
            let mut byte = 0u8;
            // SAFETY: a one-byte peek into our own buffer on a socket this connection owns.
            let n = unsafe {
                libc::recv(self.conn.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT)
            };
            let would_block = n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock;
            self.gone = !would_block;
        }
        self.gone
    }
}

/// A base backup's watch over its caller: progress once it has taken a while, and a stop when
/// the caller has gone.
struct BuildWatch<'a> {
    caller: &'a mut dyn Caller,
    progress_every: Duration,
}

impl crate::basebackup::Watch for BuildWatch<'_> {
    fn progress(&mut self, p: &Progress) {
        // Quick ones say nothing; the final figures are in the answer.
        if p.elapsed >= self.progress_every && p.pages < p.total_pages {
            let micros = p.elapsed.as_micros() as u64;
            self.caller.progress(Response::Progress { done: p.pages, total: p.total_pages, bytes: p.bytes, micros });
        }
    }

    fn cancelled(&mut self) -> bool {
        self.caller.gone()
    }
}

/// Binds the socket at `path` (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ServiceError> {
    let io = |source| ServiceError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mode = std::fs::metadata(dir).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ServiceError::NotPrivate { path: path.to_path_buf(), dir: dir.to_path_buf(), mode });
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// How long the accept loop waits for a connection before looking at `stop` again.
const ACCEPT_TICK_MS: libc::c_int = 50;

/// Serves connections on `listener` until `stop` is set.
pub fn serve(service: Arc<PageService>, listener: UnixListener, stop: &AtomicBool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        // Backends read cached pages without asking: keep them from pages out of history.
        service.cache.set_oldest_lsn(service.store.current().bounds().oldest);
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                let service = service.clone();
                std::thread::Builder::new()
                    .name("neon-page-service".into())
                    .spawn(move || service.serve_connection(conn))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Wake for the next connection at once (a new backend's first call), or
                // after a tick to look at `stop`.
                let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd for the listening socket this loop owns.
                unsafe { libc::poll(&mut fd, 1, ACCEPT_TICK_MS) };
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A blocking client of the page service.
pub struct Client {
    conn: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ProtocolError> {
        Ok(Client { conn: UnixStream::connect(path)? })
    }

    /// Sends `req` and returns its final response (skipping `Progress`).
    pub fn request(&mut self, req: &Request) -> Result<Response, ProtocolError> {
        req.write_to(&mut self.conn)?;
        loop {
            match Response::read_from(&mut self.conn)? {
                Response::Progress { .. } => {}
                r => return Ok(r),
            }
        }
    }
}
