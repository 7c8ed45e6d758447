//! The SQL API: pages, sizes, history, status, prefetch, base backups and branches as of any LSN the
//! sidecar holds. Arguments follow pageinspect and pg_walinspect (`regclass`, fork names,
//! `int8` block numbers, `pg_lsn`).
//!
//! Every function is revoked from PUBLIC and granted to `pg_read_server_files` (they expose
//! every byte of the database), and a relation is served only to a caller who may `SELECT`
//! it. A relation is named by OID (`regclass`), so LSNs before a rewrite read the file it had
//! then. Bad input and every sidecar failure end as a PostgreSQL `ERROR` naming the relation,
//! block and LSN; nothing here brings a backend down.

use crate::client::{ClientError, Slot};
use crate::sqltypes::{PgLsn, RegClass};
use crate::{guc, prefetch, shared_pages};
use neon_types::protocol::{ErrorCode, Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::Instant;

/// The largest valid block number (`MaxBlockNumber`).
const MAX_BLOCK: i64 = 0xFFFF_FFFE;

/// A relation (OID) at an LSN on a timeline (`None`: the followed one).
type OlderFileKey = (u32, Lsn, Option<u32>);

thread_local! {
    /// This backend's connection to the sidecar.
    static SIDECAR: RefCell<Slot> = const { RefCell::new(Slot::new()) };
    /// Older files of relations at LSNs (see [`older_file`]).
    static OLDER_FILES: RefCell<HashMap<OlderFileKey, RelFileNode>> = RefCell::new(HashMap::new());
    /// Read-ahead state: the relation and LSN last read, its last block, and the block up
    /// to which pages are already queued.
    static READ_AHEAD: Cell<Option<(RelTag, Lsn, u32, u32)>> = const { Cell::new(None) };
}

pub(crate) fn fail(code: PgSqlErrorCode, message: String, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message, "neon");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

pub(crate) fn required<T>(v: Option<T>, what: &str) -> T {
    v.unwrap_or_else(|| fail(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("{what} must not be NULL"), None))
}

/// One request to the sidecar; `what` says what was asked, for the error message. Waits at
/// most `timeout` (`None`: until cancelled), and always honours query cancel.
pub(crate) fn ask(req: &Request, what: &str, timeout: Option<std::time::Duration>) -> Response {
    ask_with_progress(req, what, timeout, &mut |_| {})
}

/// [`ask`], handing the sidecar's `Progress` reports to `progress` as they come.
fn ask_with_progress(
    req: &Request,
    what: &str,
    timeout: Option<std::time::Duration>,
    progress: &mut dyn FnMut(&Response),
) -> Response {
    call(req, timeout, progress).unwrap_or_else(|e| failed(what, e))
}

/// One request to the sidecar, its failure left to the caller.
fn call(
    req: &Request,
    timeout: Option<std::time::Duration>,
    progress: &mut dyn FnMut(&Response),
) -> Result<Response, ClientError> {
    let path = guc::sidecar_socket().ok_or(ClientError::NotConfigured)?;
    SIDECAR.with(|s| {
        s.borrow_mut().call(
            &path,
            req,
            timeout,
            &mut || {
                pg_sys::check_for_interrupts!();
                false
            },
            progress,
        )
    })
}

/// One request while a transaction aborts, where nothing may raise an ERROR: no interrupt
/// checks, no panic out of it, and a connection in use (an error cut a call short) means no
/// call. The failure is the caller's to ignore.
pub(crate) fn call_during_abort(req: &Request, timeout: std::time::Duration) -> Result<Response, String> {
    let Some(path) = guc::sidecar_socket() else { return Err("no neon.sidecar_socket".into()) };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        SIDECAR.with(|s| match s.try_borrow_mut() {
            Ok(mut slot) => slot.call(&path, req, Some(timeout), &mut || false, &mut |_| {}).map_err(|e| e.to_string()),
            Err(_) => Err("the sidecar connection is in use".into()),
        })
    }))
    .unwrap_or_else(|_| Err("a panic".into()))
}

/// The ERROR for a failed request: `what` was asked.
fn failed(what: &str, e: ClientError) -> ! {
    let (code, hint) = match &e {
        ClientError::Sidecar { code: ErrorCode::OutOfHistory, .. } => (
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            Some("SELECT * FROM neon_history() shows the LSNs the sidecar holds."),
        ),
        ClientError::Sidecar { code: ErrorCode::NotYet, .. } => (
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            Some("The sidecar has not received WAL up to that LSN; it waited neon.request_timeout."),
        ),
        ClientError::Sidecar { code: ErrorCode::NotFound | ErrorCode::BadRequest, .. } => {
            (PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, None)
        }
        ClientError::Sidecar { code: ErrorCode::Internal, .. } => (PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, None),
        ClientError::NotConfigured => (PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, None),
        ClientError::Connect { .. } | ClientError::Closed { .. } | ClientError::Io { .. } => (
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            Some("Is neon-sidecar running? Calls reconnect by themselves once it is back."),
        ),
        ClientError::Timeout { .. } => (
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            Some("Raise neon.request_timeout, or look at the sidecar's log."),
        ),
        ClientError::Protocol { .. } => (PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION, None),
        ClientError::Interrupted { .. } => (PgSqlErrorCode::ERRCODE_QUERY_CANCELED, None),
    };
    // The sidecar's message may already say what was asked (a base backup's does).
    let message = e.to_string();
    let message = if message.starts_with(what) { message } else { format!("{what}: {message}") };
    fail(code, message, hint)
}

pub(crate) fn unexpected(what: &str, r: Response) -> ! {
    fail(PgSqlErrorCode::ERRCODE_PROTOCOL_VIOLATION, format!("{what}: unexpected answer from the sidecar: {r:?}"), None)
}

/// How long a call that waits for its LSN at the sidecar (for `neon.request_timeout`) waits
/// for the answer: that, and time to rebuild the page.
pub(crate) fn lsn_call_timeout() -> Option<std::time::Duration> {
    Some(guc::request_timeout() + std::time::Duration::from_secs(5))
}

pub(crate) fn wait_ms() -> u32 {
    guc::request_timeout().as_millis().min(u32::MAX as u128) as u32
}

pub(crate) fn lsn_arg(lsn: Option<PgLsn>) -> Lsn {
    let lsn = required(lsn, "lsn").0;
    if !lsn.is_valid() {
        fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid LSN {lsn}"), None);
    }
    lsn
}

fn fork_arg(fork: Option<&str>) -> ForkNumber {
    let name = required(fork, "fork");
    match name.parse::<ForkNumber>() {
        Ok(ForkNumber::Fsm) => fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "the sidecar does not keep free space map forks (fsm)".into(),
            Some("PostgreSQL rebuilds the free space map from the heap; read the main or vm fork."),
        ),
        Ok(f) => f,
        Err(_) => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid fork name \"{name}\""),
            Some("Valid fork names are \"main\", \"vm\" and \"init\"."),
        ),
    }
}

/// The `timeline` argument: `None` (NULL) reads the timeline the sidecar follows now, and
/// earlier LSNs on it its ancestors' history up to its fork.
pub(crate) fn timeline_arg(timeline: Option<i32>) -> Option<u32> {
    match timeline {
        None => None,
        Some(t) if t >= 1 => Some(t as u32),
        Some(t) => fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid timeline {t}"), None),
    }
}

/// `req` on `timeline` (`None`: as the sidecar follows now).
pub(crate) fn on(timeline: Option<u32>, req: Request) -> Request {
    match timeline {
        Some(timeline) => Request::OnTimeline { timeline, request: Box::new(req) },
        None => req,
    }
}

/// " on timeline N" for messages, when one was asked for.
pub(crate) fn on_text(timeline: Option<u32>) -> String {
    timeline.map(|t| format!(" on timeline {t}")).unwrap_or_default()
}

fn block_arg(blkno: Option<i64>, what: &str) -> u32 {
    let b = required(blkno, what);
    if !(0..=MAX_BLOCK).contains(&b) {
        fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid {what} {b}"), None);
    }
    b as u32
}

/// The relation's file and fork, after checking the caller may read it and the sidecar can
/// have it.
fn relation(rel: Option<RegClass>, fork: ForkNumber) -> (RelTag, String, u32) {
    let oid = required(rel, "rel").0;
    // SAFETY: catalog lookups in a transaction; a missing OID is PostgreSQL's own ERROR.
    let allowed = unsafe { pg_sys::pg_class_aclcheck(oid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode) };
    // SAFETY: opens (and on drop closes) the relation with the weakest lock.
    let r = unsafe { pgrx::PgRelation::with_lock(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    let name = r.name().to_string();
    if allowed != pg_sys::AclResult::ACLCHECK_OK {
        fail(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("permission denied for relation {name}"), None);
    }
    // SAFETY: rd_rel is set for every open relation.
    let (kind, persistence) = unsafe { ((*r.rd_rel).relkind as u8, (*r.rd_rel).relpersistence as u8) };
    if !matches!(kind, b'r' | b'i' | b'S' | b't' | b'm') {
        fail(PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE, format!("relation \"{name}\" has no storage"), None);
    }
    if persistence == pg_sys::RELPERSISTENCE_TEMP {
        fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "relation \"{name}\" is temporary: its pages are not WAL-logged, so the sidecar does not have them"
            ),
            None,
        );
    }
    if persistence == pg_sys::RELPERSISTENCE_UNLOGGED && fork != ForkNumber::Init {
        fail(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("relation \"{name}\" is unlogged: only its init fork is WAL-logged, so the sidecar has only that"),
            None,
        );
    }
    let node = r.rd_node;
    let node = RelFileNode { spcnode: node.spcNode.into(), dbnode: node.dbNode.into(), relnode: node.relNode.into() };
    (RelTag { node, fork }, name, oid.into())
}

/// The file of relation `oid` at `lsn` when that is not its current one, `current`: after a
/// TRUNCATE, VACUUM FULL or rewrite, earlier LSNs belong to an older file, which the sidecar
/// finds in `pg_class` as it was then. Asked when [`file_at`] knows no older file, and found
/// only when `current` did not exist at `lsn` (then remembered for `file_at`); the sidecar
/// waits at most `wait_ms` for the LSN.
fn older_file(oid: u32, current: RelTag, lsn: Lsn, timeline: Option<u32>, wait_ms: u32) -> Option<RelTag> {
    let timeout = lsn_call_timeout();
    // Any failure here leaves the caller's own error to be reported.
    let main = RelTag { fork: ForkNumber::Main, ..current };
    let size = on(timeline, Request::RelSize { rel: main, lsn, wait_ms });
    if !matches!(call(&size, timeout, &mut |_| {}), Ok(Response::Size(None))) {
        return None;
    }
    let req = on(timeline, Request::RelationFile { dbnode: current.node.dbnode, reloid: oid, lsn, wait_ms });
    match call(&req, timeout, &mut |_| {}) {
        Ok(Response::RelationFile(Some(node))) if node != current.node => {
            OLDER_FILES.with(|m| {
                let mut m = m.borrow_mut();
                if m.len() >= 1024 {
                    m.clear();
                }
                m.insert((oid, lsn, timeline), node);
            });
            Some(RelTag { node, fork: current.fork })
        }
        _ => None,
    }
}

/// The file to read relation `oid` from at `lsn`: an older one already found, or `current`.
fn file_at(oid: u32, current: RelTag, lsn: Lsn, timeline: Option<u32>) -> RelTag {
    OLDER_FILES
        .with(|m| m.borrow().get(&(oid, lsn, timeline)).copied())
        .map_or(current, |node| RelTag { node, fork: current.fork })
}

/// Queues the blocks after `blkno` when the reads of `rel` at `lsn` are sequential, keeping
/// `neon.prefetch_distance` blocks ahead (topped up by at least a queue entry at a time).
fn read_ahead(rel: RelTag, lsn: Lsn, blkno: u32) {
    let distance = guc::prefetch_distance();
    if distance == 0 || !prefetch::active() {
        return;
    }
    let state = READ_AHEAD.get();
    let queued_to = match state {
        Some((r, l, last, queued_to)) if r == rel && l == lsn && last.checked_add(1) == Some(blkno) => {
            queued_to.max(blkno + 1)
        }
        _ => {
            READ_AHEAD.set(Some((rel, lsn, blkno, blkno + 1)));
            return;
        }
    };
    let want = blkno.saturating_add(1).saturating_add(distance);
    let mut new_to = queued_to;
    if want.saturating_sub(queued_to) >= prefetch::ENTRY_BLOCKS.min(distance) {
        new_to = queued_to + prefetch::enqueue(rel, lsn, queued_to, want - queued_to);
    }
    READ_AHEAD.set(Some((rel, lsn, blkno, new_to)));
}

/// Block `blkno` of `rel`'s `fork` as it was at `lsn`: 8192 bytes, which pageinspect reads
/// (`heap_page_items(neon_get_page('t', 'main', 0, '0/16B3748'))`). `timeline`: another
/// PostgreSQL timeline than the one the sidecar follows now.
#[pg_extern(volatile, parallel_safe)]
pub(crate) fn neon_get_page(
    rel: Option<RegClass>,
    fork: Option<&str>,
    blkno: Option<i64>,
    lsn: Option<PgLsn>,
    timeline: default!(Option<i32>, "NULL"),
) -> Vec<u8> {
    let fork = fork_arg(fork);
    let blkno = block_arg(blkno, "block number");
    let lsn = lsn_arg(lsn);
    let timeline = timeline_arg(timeline);
    let (current, name, oid) = relation(rel, fork);
    let rel = file_at(oid, current, lsn, timeline);
    // The shared page file and read-ahead are of the followed timeline's pages.
    if timeline.is_none() {
        read_ahead(rel, lsn, blkno);
        if let Some(page) = shared_pages::get(&(BufferTag { rel, blkno }, lsn)) {
            return page;
        }
    }
    let get = |rel| on(timeline, Request::GetPage { tag: BufferTag { rel, blkno }, lsn, wait_ms: wait_ms() });
    let what = |rel: RelTag| format!("block {blkno} of relation \"{name}\" ({rel}) at {lsn}{}", on_text(timeline));
    let answer = match call(&get(rel), lsn_call_timeout(), &mut |_| {}) {
        // Not in this file: maybe the relation had another then.
        Err(e @ ClientError::Sidecar { code: ErrorCode::NotFound, .. }) if rel == current => {
            match older_file(oid, rel, lsn, timeline, wait_ms()) {
                Some(older) => ask(&get(older), &what(older), lsn_call_timeout()),
                None => failed(&what(rel), e),
            }
        }
        r => r.unwrap_or_else(|e| failed(&what(rel), e)),
    };
    match answer {
        Response::Page(p) => {
            debug_assert_eq!(p.len(), BLCKSZ);
            p.to_vec()
        }
        r => unexpected(&what(rel), r),
    }
}

/// The number of blocks of `rel`'s `fork` at `lsn`.
#[pg_extern(volatile, parallel_safe)]
pub(crate) fn neon_rel_size(
    rel: Option<RegClass>,
    fork: Option<&str>,
    lsn: Option<PgLsn>,
    timeline: default!(Option<i32>, "NULL"),
) -> i64 {
    let fork = fork_arg(fork);
    let lsn = lsn_arg(lsn);
    let timeline = timeline_arg(timeline);
    let (current, name, oid) = relation(rel, fork);
    let size = |rel: RelTag| {
        let what = format!("size of relation \"{name}\" ({rel}) at {lsn}{}", on_text(timeline));
        match ask(&on(timeline, Request::RelSize { rel, lsn, wait_ms: wait_ms() }), &what, lsn_call_timeout()) {
            Response::Size(n) => n,
            r => unexpected(&what, r),
        }
    };
    let rel = file_at(oid, current, lsn, timeline);
    let n = size(rel).or_else(|| {
        if rel == current {
            older_file(oid, rel, lsn, timeline, wait_ms()).and_then(size)
        } else {
            None
        }
    });
    match n {
        Some(n) => i64::from(n),
        None => fail(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("size of relation \"{name}\" at {lsn}: the relation did not exist at that LSN"),
            Some("SELECT * FROM neon_history() shows the LSNs the sidecar holds."),
        ),
    }
}

/// The history the sidecar holds, one row per PostgreSQL timeline (the one it follows now
/// first), and where the compute is.
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn neon_history() -> TableIterator<
    'static,
    (
        name!(timeline, i32),
        name!(followed, bool),
        name!(parent_timeline, Option<i32>),
        name!(fork_lsn, Option<PgLsn>),
        name!(oldest_lsn, PgLsn),
        name!(durable_lsn, PgLsn),
        name!(last_record_lsn, PgLsn),
        name!(origin_lsn, PgLsn),
        name!(compute_flush_lsn, PgLsn),
        name!(gaps, Option<String>),
        name!(branch_pins, Option<String>),
    ),
> {
    let what = "history";
    let timelines = match ask(&Request::History, what, Some(guc::request_timeout())) {
        Response::History(t) => t,
        r => unexpected(what, r),
    };
    // Branches pin their LSNs (a sidecar without a shared directory has none).
    let branches = match call(&Request::BranchList, Some(guc::request_timeout()), &mut |_| {}) {
        Ok(Response::Branches(b)) => b,
        Err(ClientError::Sidecar { code: ErrorCode::BadRequest, .. }) => Vec::new(),
        Ok(r) => unexpected(what, r),
        Err(e) => failed(what, e),
    };
    let flush = PgLsn(crate::flush_lsn());
    let rows: Vec<_> = timelines
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let gaps = (!t.gaps.is_empty())
                .then(|| t.gaps.iter().map(|(from, to)| format!("{from}..{to}")).collect::<Vec<_>>().join(", "));
            (
                t.timeline as i32,
                i == 0,
                t.parent.map(|p| p.0 as i32),
                t.parent.map(|p| PgLsn(p.1)),
                PgLsn(t.oldest),
                PgLsn(t.durable),
                PgLsn(t.last),
                PgLsn(t.origin),
                flush,
                gaps,
                {
                    let pins: Vec<String> = branches
                        .iter()
                        .filter(|b| b.source == t.timeline)
                        .map(|b| format!("branch {} at {}", b.id, b.lsn))
                        .collect();
                    (!pins.is_empty()).then(|| pins.join(", "))
                },
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// The sidecar's state (ingest lag, layers, cache, redo pool, request latencies) and the
/// prefetch worker's, as name/value rows.
#[pg_extern(volatile, parallel_safe)]
fn neon_sidecar_status() -> TableIterator<'static, (name!(name, String), name!(value, String))> {
    let what = "sidecar status";
    let text = match ask(&Request::Status, what, Some(guc::request_timeout())) {
        Response::Status(t) => t,
        r => unexpected(what, r),
    };
    let mut rows: Vec<(String, String)> =
        text.lines().filter_map(|l| l.split_once(' ')).map(|(n, v)| (n.to_string(), v.to_string())).collect();
    rows.extend(prefetch::status().into_iter().chain(shared_pages::status()).map(|(n, v)| (n.to_string(), v)));
    TableIterator::new(rows)
}

/// Queues blocks `first_block .. first_block + nblocks` of `rel` at `lsn` for the background
/// worker to have rebuilt ahead of reads; returns how many were queued.
#[pg_extern(volatile, parallel_safe)]
fn neon_prefetch(rel: Option<RegClass>, lsn: Option<PgLsn>, first_block: Option<i64>, nblocks: Option<i64>) -> i64 {
    let lsn = lsn_arg(lsn);
    let first = block_arg(first_block, "first block");
    let n = required(nblocks, "nblocks");
    if n < 0 {
        fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid nblocks {n}"), None);
    }
    if n > MAX_BLOCK + 1 - i64::from(first) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("blocks {first} to {} go past the largest block number, {MAX_BLOCK}", i64::from(first) + n - 1),
            None,
        );
    }
    // Queueing never waits for the sidecar, so the LSN is checked against what is known here:
    // this compute's own WAL, and the history the running sidecar publishes.
    let flush = crate::flush_lsn();
    if lsn > flush {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{lsn} is beyond this compute's WAL (flushed to {flush}): there are no pages at it to prefetch"),
            None,
        );
    }
    if let Some(oldest) = shared_pages::oldest_lsn().filter(|oldest| lsn < *oldest) {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{lsn} is before the history the sidecar holds (from {oldest})"),
            Some("SELECT * FROM neon_history() shows the LSNs the sidecar holds."),
        );
    }
    let (current, _, oid) = relation(rel, ForkNumber::Main);
    if !prefetch::active() {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "neon_prefetch needs the background worker: add neon to shared_preload_libraries".into(),
            None,
        );
    }
    // Blocks of the file the relation had at `lsn` (an older one before a rewrite), if the
    // sidecar can say at once: queueing never waits.
    let rel = match file_at(oid, current, lsn, None) {
        rel if rel == current => older_file(oid, current, lsn, None, 0).unwrap_or(current),
        older => older,
    };
    i64::from(prefetch::enqueue(rel, lsn, first, n as u32))
}

/// A base backup as of `lsn` (NULL: the compute's WAL flush position now) in the shared
/// directory: a tar stock PostgreSQL 15 boots from. `full => false` leaves out relation pages
/// (for a compute that fetches them itself; it does not start on its own).
#[pg_extern(volatile, parallel_safe)]
pub(crate) fn neon_basebackup(
    lsn: default!(Option<PgLsn>, "NULL"),
    full: default!(Option<bool>, "true"),
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<'static, (name!(path, String), name!(lsn, PgLsn), name!(bytes, i64), name!(seconds, f64))> {
    let lsn = match lsn {
        None => crate::flush_lsn(),
        l => lsn_arg(l),
    };
    let full = required(full, "full");
    let timeline = timeline_arg(timeline);
    let what = format!("base backup at {lsn}{}", on_text(timeline));
    let started = Instant::now();
    // Building takes as long as the database is big: no deadline but query cancel, and a
    // NOTICE about once a second once it has taken a second.
    let mut progress = |p: &Response| {
        if let Response::Progress { done, total, bytes, micros } = *p {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            let secs = micros as f64 / 1e6;
            notice!("{what}: {done} of {total} pages ({pct}%), {} MB written, {secs:.0} s", bytes >> 20);
        }
    };
    let req = on(timeline, Request::Basebackup { lsn, full, new_timeline: false, wait_ms: wait_ms() });
    match ask_with_progress(&req, &what, None, &mut progress) {
        Response::Basebackup { lsn, bytes, path, .. } => {
            TableIterator::once((path, PgLsn(lsn), bytes as i64, started.elapsed().as_secs_f64()))
        }
        r => unexpected(&what, r),
    }
}

/// A branch the sidecar has, as a row.
fn branch_row(b: neon_types::protocol::BranchInfo) -> BranchRow {
    (b.id as i32, b.path, PgLsn(b.lsn), b.timeline as i32, b.source as i32, b.written_blocks as i64)
}

type BranchRow = (i32, String, PgLsn, i32, i32, i64);

/// A writable branch as of `lsn` (NULL: the compute's WAL flush position now): a data directory
/// the sidecar mounts, on which PostgreSQL 15, run as this server's OS user, boots at once and
/// without replay; relation pages are rebuilt when read, writes stay in the branch.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)]
pub(crate) fn neon_branch_create(
    lsn: default!(Option<PgLsn>, "NULL"),
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, i32),
        name!(path, String),
        name!(lsn, PgLsn),
        name!(timeline, i32),
        name!(source_timeline, i32),
        name!(written_blocks, i64),
    ),
> {
    let lsn = match lsn {
        None => crate::flush_lsn(),
        l => lsn_arg(l),
    };
    let timeline = timeline_arg(timeline);
    let what = format!("branch at {lsn}{}", on_text(timeline));
    let req = on(timeline, Request::BranchCreate { lsn, mount: None, wait_ms: wait_ms() });
    match ask(&req, &what, None) {
        Response::Branches(b) => TableIterator::new(b.into_iter().map(branch_row)),
        r => unexpected(&what, r),
    }
}

/// Every branch: its id, mount path, LSN, own timeline, the timeline whose history it pins,
/// how many blocks it has written, and — for one the sidecar could not mount when it started
/// (kept, pinned, droppable) — why (NULL for the others).
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn neon_branches() -> TableIterator<
    'static,
    (
        name!(id, i32),
        name!(path, String),
        name!(lsn, PgLsn),
        name!(timeline, i32),
        name!(source_timeline, i32),
        name!(written_blocks, i64),
        name!(problem, Option<String>),
    ),
> {
    let what = "branches";
    match ask(&Request::BranchList, what, Some(guc::request_timeout())) {
        Response::Branches(b) => TableIterator::new(b.into_iter().map(|b| {
            let problem = Some(b.problem.clone()).filter(|p| !p.is_empty());
            let (id, path, lsn, timeline, source, written) = branch_row(b);
            (id, path, lsn, timeline, source, written, problem)
        })),
        r => unexpected(what, r),
    }
}

/// Unmounts branch `id` and deletes it (its server must be stopped); returns its path.
#[pg_extern(volatile, parallel_unsafe)]
fn neon_branch_drop(id: Option<i32>) -> String {
    let id = required(id, "id");
    if id < 1 {
        fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("invalid branch id {id}"), None);
    }
    let what = format!("dropping branch {id}");
    match ask(&Request::BranchDrop { id: id as u32 }, &what, Some(guc::request_timeout())) {
        Response::Branches(b) if b.len() == 1 => b[0].path.clone(),
        r => unexpected(&what, r),
    }
}

extension_sql!(
    r#"
DO $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['neon_get_page(regclass, text, int8, pg_lsn, int4)', 'neon_rel_size(regclass, text, pg_lsn, int4)',
                             'neon_history()', 'neon_sidecar_status()', 'neon_prefetch(regclass, pg_lsn, int8, int8)',
                             'neon_basebackup(pg_lsn, boolean, int4)', 'neon_branch_create(pg_lsn, int4)',
                             'neon_branches()', 'neon_branch_drop(int4)'] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_read_server_files', f);
    END LOOP;
END $$;
COMMENT ON FUNCTION neon_get_page(regclass, text, int8, pg_lsn, int4) IS 'a block of a relation as it was at an LSN (8192 bytes, for pageinspect), on the followed timeline or the one given';
COMMENT ON FUNCTION neon_rel_size(regclass, text, pg_lsn, int4) IS 'the number of blocks of a relation fork at an LSN';
COMMENT ON FUNCTION neon_history() IS 'the timelines and LSNs the sidecar holds history for';
COMMENT ON FUNCTION neon_sidecar_status() IS 'the sidecar''s and the prefetch worker''s state and counters';
COMMENT ON FUNCTION neon_prefetch(regclass, pg_lsn, int8, int8) IS 'queue blocks of a relation at an LSN for the background worker to have rebuilt';
COMMENT ON FUNCTION neon_basebackup(pg_lsn, boolean, int4) IS 'a bootable base backup as of an LSN, written into the shared directory';
COMMENT ON FUNCTION neon_branch_create(pg_lsn, int4) IS 'a writable data directory as of an LSN, mounted by the sidecar, that PostgreSQL boots at once';
COMMENT ON FUNCTION neon_branches() IS 'the branches the sidecar has, and the LSNs they pin';
COMMENT ON FUNCTION neon_branch_drop(int4) IS 'unmount and delete a branch (its server stopped)';
"#,
    name = "api_permissions",
    requires = [
        neon_get_page,
        neon_rel_size,
        neon_history,
        neon_sidecar_status,
        neon_prefetch,
        neon_basebackup,
        neon_branch_create,
        neon_branches,
        neon_branch_drop
    ]
);
