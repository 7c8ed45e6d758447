//! Following a live compute: the loop of `neon-sidecar run`. It owns a physical replication
//! slot, streams WAL from the followed timeline's durable LSN, files every record, flushes the
//! timeline on a timer or every so many bytes, and only then reports the new durable LSN to the
//! compute as flushed — so the slot never lets go of WAL the sidecar has not made durable,
//! whatever happens to the sidecar.
//!
//! **Which history.** The store follows one cluster (its system identifier) and refuses any
//! other. It follows the timeline the server is on: when that is a timeline the store has not
//! seen (a promoted standby, a compute restored to a past LSN), the server's history file says
//! which timeline it forked from and where; the store makes it a new timeline forking there
//! (catching the parent up to the fork first, from the server's copy of the old timeline, if
//! it was behind), and from then on the new timeline is the one reads follow. A server whose WAL
//! on the store's own timeline ends before what the store holds was restored without a new
//! timeline: its WAL would overwrite history, so it is refused.
//!
//! **What stops it.** Connection trouble and failures to write the store (a full disk) are
//! retried with backoff — nothing is lost, since the slot keeps the WAL and a failed flush keeps
//! its values. What reconnecting cannot cure stops ingest and is reported, while the page
//! service goes on serving the history on disk: another cluster, WAL the server no longer has
//! (a gap: `attach` continues after it), an invalidated slot, WAL that cannot be filed.

use crate::replication::client::{ReplicationConfig, ReplicationConn, ReplicationError, Slot, StreamEvent};
use crate::repo::ingest::{Ingest, IngestError};
use crate::repo::key::Key;
use crate::repo::layer::LayerError;
use crate::repo::store::{Store, StoreError};
use crate::repo::timeline::{RepoError, Timeline};
use crate::wal::decoder::{DecodeError, WalStreamDecoder};
use crate::wal::page::record_start;
use crate::wal::record::RecordError;
use neon_types::{Lsn, PgTime};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How stale the compute's clock may get while it sends nothing: the sidecar asks for a
/// keepalive, which carries it (times up to it are known to have happened).
const CLOCK_EVERY: Duration = Duration::from_secs(1);

/// How far behind a WAL sender's clock reading its WAL position may be: a flush, or with
/// `synchronous_commit = off` up to three `wal_writer_delay`s (200 ms by default).
const STREAM_CLOCK_MARGIN: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct FollowerConfig {
    pub replication: ReplicationConfig,
    pub store: PathBuf,
    pub slot: String,
    /// Flush at least this often while WAL arrives.
    pub flush_interval: Duration,
    /// Flush after this many bytes of WAL.
    pub flush_bytes: u64,
    /// Page chains longer than this are handed to `on_flush` for imaging (0: not tracked).
    pub chain_limit: u32,
    /// `--durability remote`: the compute is told its WAL is flushed only as far as the
    /// remote store holds the history (so its slot keeps the rest). `None`: as far as the
    /// local store does.
    pub remote_durable: Option<Arc<crate::remote::upload::UploadStatus>>,
}

/// Called after each flush with the timeline, its durable LSN and the page keys whose chains
/// grew long.
pub type OnFlush<'a> = &'a mut (dyn FnMut(&Arc<Timeline>, Lsn, Vec<Key>) + Send);

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("decoding streamed WAL: {0}")]
    Decode(#[from] DecodeError),
    #[error("server reports an unusable wal_segment_size {0:?}")]
    SegmentSize(String),
    #[error("the compute's WAL segments are {server} bytes, the store's {store}: it is another cluster")]
    SegmentSizeMismatch { server: u32, store: u32 },
    #[error(transparent)]
    Files(#[from] crate::wal::segment::SegmentError),
    #[error(
        "replication slot {slot} was invalidated by the server (its WAL was removed: max_slot_wal_keep_size): \
         history on timeline {timeline} ends at {durable}, and the store keeps serving it. To continue after a \
         gap, stop the sidecar and run `neon-sidecar attach` into this store"
    )]
    SlotInvalidated { slot: String, timeline: u32, durable: Lsn },
    #[error(
        "the compute no longer has the WAL after {from} on timeline {timeline} ({message}): history ends there, \
         and the store keeps serving it. To continue after a gap, stop the sidecar and run `neon-sidecar attach` \
         into this store"
    )]
    WalRemoved { timeline: u32, from: Lsn, message: String },
    #[error(
        "the compute's WAL on timeline {timeline} ends at {server}, before the store's history (durable to \
         {durable}): it was restored to an earlier point without starting a new timeline, and its WAL would \
         overwrite history. Restore it with a new timeline (`neon_basebackup`'s copies are), or give it a new \
         store"
    )]
    Diverged { timeline: u32, server: Lsn, durable: Lsn },
    #[error(
        "the compute's WAL on timeline {timeline} does not continue the store's history at {at} ({why}). It was \
         restored to another point without starting a new timeline, and its WAL would overwrite history. Restore \
         it with a new timeline (`neon-sidecar basebackup --new-timeline`), or give it a new store"
    )]
    DivergedAt { timeline: u32, at: Lsn, why: String },
    #[error("the compute is on timeline {server}, whose history ({history:?}) shares no timeline with the store's ({ours:?})")]
    UnrelatedTimeline { server: u32, history: String, ours: Vec<u32> },
    #[error(
        "the compute's timeline {timeline} is not the store's timeline {timeline}: its history file says \
         {theirs:?}, the store's {ours:?} (timeline IDs repeat across branches of a cluster)"
    )]
    OtherBranch { timeline: u32, theirs: String, ours: String },
    #[error(
        "timeline {timeline} cannot fork from timeline {parent} at {fork}: the store does not hold that \
         history ({why})"
    )]
    ForkNotHeld { timeline: u32, parent: u32, fork: Lsn, why: String },
    #[error("the compute ended timeline {timeline} at {last}, short of its switch point {end}")]
    EndedShort { timeline: u32, last: Lsn, end: Lsn },
    #[error("timeline history file of timeline {timeline}: bad line {line:?}")]
    HistoryFile { timeline: u32, line: String },
}

impl FollowError {
    /// Whether reconnecting (and waiting) can cure it. Failing to write the store is retried:
    /// the disk may get room again; so is failing to fetch an evicted layer file that filing
    /// a record reads: the remote store may be back (or repaired).
    pub fn is_final(&self) -> bool {
        let fetch = |e: &RepoError| matches!(e, RepoError::Layer(LayerError::Remote { .. }));
        match self {
            FollowError::Replication(_) | FollowError::Repo(_) | FollowError::Store(StoreError::Io { .. }) => false,
            FollowError::Store(StoreError::Timeline(e)) => !(matches!(e, RepoError::Io { .. }) || fetch(e)),
            FollowError::Ingest(IngestError::Repo(e)) => !fetch(e),
            _ => true,
        }
    }
}

/// What ingest is doing, for status reports (`ingest_state`).
#[derive(Default)]
pub struct IngestState(Mutex<String>);

impl IngestState {
    pub fn set(&self, s: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = s.into();
    }

    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What filing WAL from segment files did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiledFiles {
    pub records: u64,
    /// Time the flusher spent writing layer files (beside filing).
    pub flushing: Duration,
}

/// Files every record `reader` gives into `repo` as streaming does: layer files are written
/// by a flusher thread beside ingest, every `flush_bytes` of WAL read and at the end;
/// `progress` hears the bytes read at each flush.
pub fn file_wal_files(
    repo: &Timeline,
    reader: &mut crate::wal::segment::WalFileReader,
    flush_bytes: u64,
    mut progress: impl FnMut(u64),
) -> Result<FiledFiles, FollowError> {
    let mut ingest = Ingest::new();
    std::thread::scope(|s| {
        let (requests, pending) = crossbeam_channel::bounded::<()>(1);
        let flusher = s.spawn(move || -> Result<Duration, RepoError> {
            let mut busy = Duration::ZERO;
            for () in pending {
                let started = Instant::now();
                repo.flush()?;
                busy += started.elapsed();
            }
            Ok(busy)
        });
        let (mut records, mut next_flush) = (0u64, flush_bytes);
        let filed = (|| -> Result<(), FollowError> {
            while let Some(rec) = reader.next_record()? {
                ingest.ingest(repo, &rec)?;
                records += 1;
                if reader.bytes_read() >= next_flush {
                    // At most one flush waits: filing pauses when the disk is behind. A
                    // flusher gone has failed; joining it below says why.
                    if requests.send(()).is_err() {
                        break;
                    }
                    progress(reader.bytes_read());
                    next_flush += flush_bytes;
                }
            }
            Ok(())
        })();
        drop(requests);
        let busy = flusher.join().expect("flusher thread")?;
        filed?;
        let started = Instant::now();
        repo.flush()?;
        Ok(FiledFiles { records, flushing: busy + started.elapsed() })
    })
}

fn segment_size(conn: &mut ReplicationConn) -> Result<u32, FollowError> {
    let rows = conn.command("SHOW wal_segment_size")?;
    let text = rows.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
    let mb = text.strip_suffix("MB").and_then(|n| n.parse::<u32>().ok());
    let gb = text.strip_suffix("GB").and_then(|n| n.parse::<u32>().ok()).map(|g| g * 1024);
    mb.or(gb).map(|m| m << 20).ok_or(FollowError::SegmentSize(text))
}

/// One line of a PostgreSQL timeline history file: the parent timeline, where the child
/// forked from it, and the line as written (with its reason).
#[derive(Debug, Clone, PartialEq, Eq)]
struct HistoryEntry {
    parent: u32,
    switchpoint: Lsn,
    line: String,
}

/// Parses a history file (`parentTLI <tab> switchpoint <tab> reason` lines, oldest ancestor
/// first; blank lines and `#` comments skipped, as `readTimeLineHistory` does).
fn parse_history(timeline: u32, file: &[u8]) -> Result<Vec<HistoryEntry>, FollowError> {
    let text = String::from_utf8_lossy(file);
    let mut out = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let bad = || FollowError::HistoryFile { timeline, line: line.to_string() };
        let mut fields = trimmed.split_whitespace();
        let parent = fields.next().and_then(|f| f.parse::<u32>().ok()).ok_or_else(bad)?;
        let switchpoint = fields.next().and_then(|f| f.parse::<Lsn>().ok()).ok_or_else(bad)?;
        out.push(HistoryEntry { parent, switchpoint, line: line.to_string() });
    }
    Ok(out)
}

/// Follows the compute until `stop` is set, reconnecting after errors, into the store at
/// `cfg.store`.
pub fn run(cfg: &FollowerConfig, stop: &AtomicBool) -> Result<(), FollowError> {
    run_into(&Store::open(&cfg.store)?, cfg, stop, &mut |_, _, _| {}, &IngestState::default())
}

/// Like [`run`], into an open store that others may be reading, telling `on_flush` about each
/// flush and `state` what ingest is doing. Returns when `stop` is set, or with an error
/// reconnecting cannot cure ([`FollowError::is_final`]).
pub fn run_into(
    store: &Store,
    cfg: &FollowerConfig,
    stop: &AtomicBool,
    on_flush: OnFlush<'_>,
    state: &IngestState,
) -> Result<(), FollowError> {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    let mut ingest: Option<(u32, Ingest)> = None;
    let mut backoff = FIRST_BACKOFF;
    state.set(format!("connecting to the compute at {}", cfg.replication.host));
    while !stop.load(Ordering::Relaxed) {
        let durable_before = store.current().durable_lsn();
        let result = follow(cfg, store, &mut ingest, stop, on_flush, state);
        if store.current().durable_lsn() > durable_before {
            // It got somewhere: the next trouble starts waiting afresh.
            backoff = FIRST_BACKOFF;
        }
        match result {
            Ok(Followed::Stopped) => break,
            // A timeline reached its end (a parent caught up to its fork): on to the next.
            Ok(Followed::TimelineEnded) => continue,
            Err(e) if e.is_final() => {
                let _ = store.current().flush();
                state.set(format!("stopped: {e}"));
                return Err(e);
            }
            Err(mut e) => loop {
                eprintln!("neon-sidecar: following the compute: {e}; trying again in {backoff:?}");
                state.set(format!("retrying in {backoff:?}: {e}"));
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                // Values a failed flush kept in memory are written before more WAL is read,
                // so memory holds no more than it did when the disk failed; the page service
                // serves them meanwhile.
                match store.current().flush() {
                    Err(again) if !stop.load(Ordering::Relaxed) => e = again.into(),
                    _ => break,
                }
            },
        }
    }
    store.current().flush()?;
    state.set("stopped");
    Ok(())
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
    }
}

enum Followed {
    Stopped,
    TimelineEnded,
}

/// The timeline to stream next, and where to stop (a timeline the server has left: its
/// switch point), making and switching timelines as the server's history says.
fn choose_timeline(
    conn: &mut ReplicationConn,
    store: &Store,
    server: u32,
) -> Result<(Arc<Timeline>, Option<Lsn>), FollowError> {
    let current = store.current();
    if let Some(t) = store.timeline(server) {
        // Timeline IDs repeat across branches: the server's must have the store's history.
        let ours = store.history_file(server)?;
        if server != 1 && !ours.is_empty() {
            let theirs = conn.timeline_history(server)?;
            let entries = |h: &[u8]| -> Result<Vec<(u32, Lsn)>, FollowError> {
                Ok(parse_history(server, h)?.into_iter().map(|e| (e.parent, e.switchpoint)).collect())
            };
            if entries(&theirs)? != entries(&ours)? {
                return Err(FollowError::OtherBranch {
                    timeline: server,
                    theirs: String::from_utf8_lossy(&theirs).into_owned(),
                    ours: String::from_utf8_lossy(&ours).into_owned(),
                });
            }
        }
        if current.id() != server {
            current.flush()?;
            store.set_current(server)?;
        }
        return Ok((t, None));
    }
    if server == 1 {
        // Timeline 1 has no history file: it can only be the store's own first timeline.
        return Err(FollowError::UnrelatedTimeline {
            server,
            history: String::new(),
            ours: store.timelines().iter().map(|t| t.id()).collect(),
        });
    }
    let history = conn.timeline_history(server)?;
    let entries = parse_history(server, &history)?;
    // The newest ancestor the store has; the timelines after it (the server's own, and any
    // between) are made one by one, each forking where the history file says.
    let Some(known) = entries.iter().rposition(|e| store.timeline(e.parent).is_some()) else {
        return Err(FollowError::UnrelatedTimeline {
            server,
            history: String::from_utf8_lossy(&history).into_owned(),
            ours: store.timelines().iter().map(|t| t.id()).collect(),
        });
    };
    let HistoryEntry { parent, switchpoint: fork, .. } = entries[known];
    let child = entries.get(known + 1).map_or(server, |e| e.parent);
    let p = store.timeline(parent).expect("known");
    // A fork just past a page header (a base backup's new timeline, as of a page boundary)
    // leaves nothing of the parent's between its last record and the fork.
    if record_start(p.last_lsn(), store.identity().wal_segment_size) < fork {
        // The parent's history must reach the fork first: the server still has the old
        // timeline's WAL up to its switch point.
        if current.id() != parent {
            current.flush()?;
            store.set_current(parent)?;
        }
        return Ok((p, Some(fork)));
    }
    // The parent's history must hold the fork (not collected, not in a gap), or the child
    // would read history that is not there.
    if let Err(why) = p.check_readable(fork.min(p.last_lsn())) {
        return Err(FollowError::ForkNotHeld { timeline: child, parent, fork, why: format!("{why:?}") });
    }
    // What the parent holds after the fork stays the parent's.
    p.flush()?;
    current.flush()?;
    let child_history: String = entries[..=known].iter().map(|e| format!("{}\n", e.line)).collect();
    let t = store.fork(child, parent, fork, child_history.as_bytes())?;
    eprintln!("neon-sidecar: timeline {child} forks from timeline {parent} at {fork}; following it");
    store.set_current(child)?;
    Ok((t, entries.get(known + 1).map(|e| e.switchpoint)))
}

/// A server error that says the WAL asked for is gone.
fn wal_removed(e: &ReplicationError) -> Option<String> {
    match e {
        ReplicationError::Server { message, .. } if message.contains("has already been removed") => {
            Some(message.clone())
        }
        _ => None,
    }
}

fn follow(
    cfg: &FollowerConfig,
    store: &Store,
    ingest: &mut Option<(u32, Ingest)>,
    stop: &AtomicBool,
    on_flush: OnFlush<'_>,
    state: &IngestState,
) -> Result<Followed, FollowError> {
    let mut conn = ReplicationConn::connect(&cfg.replication)?;
    let sys = conn.identify_system()?;
    store.identity().check(store.dir(), sys.system_id)?;
    let seg_size = segment_size(&mut conn)?;
    if seg_size != store.identity().wal_segment_size {
        return Err(FollowError::SegmentSizeMismatch { server: seg_size, store: store.identity().wal_segment_size });
    }
    let (t, end) = choose_timeline(&mut conn, store, sys.timeline)?;
    if end.is_none() && t.durable_lsn().is_valid() && sys.xlogpos < t.durable_lsn() {
        return Err(FollowError::Diverged { timeline: t.id(), server: sys.xlogpos, durable: t.durable_lsn() });
    }
    let (slot_lsn, created) = match conn.read_slot(&cfg.slot)? {
        Slot::Invalidated => {
            return Err(FollowError::SlotInvalidated {
                slot: cfg.slot.clone(),
                timeline: t.id(),
                durable: t.durable_lsn(),
            })
        }
        Slot::Reserving(lsn) => (lsn, false),
        // A new server (a promoted standby, a restored compute) has no slot of ours yet.
        Slot::Missing => (conn.create_slot(&cfg.slot)?, true),
    };
    let durable = t.durable_lsn();
    let start = if durable.is_valid() { durable } else { slot_lsn };
    t.begin_history(start);
    let mut filing = match ingest.take() {
        Some((id, i)) if id == t.id() => i,
        _ => {
            if cfg.chain_limit > 0 {
                Ingest::with_chain_limit(cfg.chain_limit)
            } else {
                Ingest::new()
            }
        }
    };
    // The stream must continue the last record filed: a compute restored elsewhere on this
    // timeline has other WAL here. Read again, that record must be the same (its CRC covers
    // its xl_prev, so the history before it too) — unless it began in an older segment,
    // which the server may have removed: then the next record must name it as its xl_prev.
    let last = t.durable_record().filter(|r| r.end == start);
    let again = last.filter(|r| r.start.segment_number(seg_size) == start.segment_number(seg_size));
    // A record begins at where the stream starts (the last record filed, or the end of it,
    // aligned as PostgreSQL aligns it; a fork; a slot's restart point), whatever its page
    // holds before it: a new timeline's first page may hold nothing else (a base backup's
    // generated segment).
    let from = again.map_or(start, |r| r.start);
    let mut dec = WalStreamDecoder::at_record(from, seg_size)?;
    match (again, last) {
        (Some(r), _) => dec.expect_first(r.end, r.crc),
        (None, Some(r)) => dec.expect_prev(r.start),
        (None, None) => {}
    }
    let streamed = (|| -> Result<Followed, FollowError> {
        let mut stream = conn.start_replication(Some(&cfg.slot), from, t.id())?;
        state.set(format!("following timeline {} from {start}", t.id()));
        // Layer files are written by a flusher thread while ingest goes on (the timeline's
        // frozen layer is made for this); the compute hears of each new durable LSN
        // afterwards. One flush runs at a time; when ingest gets twice the flush size ahead,
        // it waits.
        std::thread::scope(|s| {
            let (requests, pending) = crossbeam_channel::bounded::<Vec<Key>>(1);
            let t = &t;
            let flusher = s.spawn(move || -> Result<(), FollowError> {
                for keys in pending {
                    let durable = t.flush()?;
                    on_flush(t, durable, keys);
                }
                Ok(())
            });
            let result = stream_loop(cfg, t, &mut filing, stop, end, &mut dec, &mut stream, &requests, &flusher);
            drop(requests);
            let flushed = flusher.join().expect("flusher thread");
            result.and_then(|r| flushed.map(|()| r))
        })
    })();
    *ingest = Some((t.id(), filing));
    match streamed {
        // What the store holds ends with a record; the compute's WAL has another there, or a
        // record boundary elsewhere.
        // (Not a record that is whole, CRC and all, but that the decoder cannot parse: that
        // is the decoder's failing, reported as it is.)
        Err(FollowError::Decode(e))
            if last.is_some()
                && dec.position() <= start
                && !matches!(e, DecodeError::Record(ref r) if !matches!(r, RecordError::Crc { .. })) =>
        {
            let why = match e {
                DecodeError::PrevLink { prev, expected, .. } => {
                    format!("its record there follows one at {prev}, the store's last record began at {expected}")
                }
                DecodeError::OtherRecord { lsn, end, crc, expected_end, expected_crc } => format!(
                    "its record at {lsn} ends at {end} with CRC {crc:08X}, the store's ended at {expected_end} with \
                     CRC {expected_crc:08X}"
                ),
                e => format!("its WAL does not read as records there: {e}"),
            };
            Err(FollowError::DivergedAt { timeline: t.id(), at: start, why })
        }
        Err(FollowError::Replication(e)) => match wal_removed(&e) {
            Some(message) => {
                if created {
                    // Nothing of ours is left holding WAL nobody will read.
                    let _ = ReplicationConn::connect(&cfg.replication).and_then(|mut c| c.drop_slot(&cfg.slot));
                }
                Err(FollowError::WalRemoved { timeline: t.id(), from: start, message })
            }
            None => Err(FollowError::Replication(e)),
        },
        Ok(Followed::TimelineEnded) => {
            t.flush()?;
            match end {
                Some(end) if record_start(t.last_lsn(), seg_size) < end => {
                    Err(FollowError::EndedShort { timeline: t.id(), last: t.last_lsn(), end })
                }
                _ => Ok(Followed::TimelineEnded),
            }
        }
        r => r,
    }
}

#[allow(clippy::too_many_arguments)]
fn stream_loop(
    cfg: &FollowerConfig,
    repo: &Timeline,
    ingest: &mut Ingest,
    stop: &AtomicBool,
    end: Option<Lsn>,
    dec: &mut WalStreamDecoder,
    stream: &mut crate::replication::client::WalStream,
    requests: &crossbeam_channel::Sender<Vec<Key>>,
    flusher: &std::thread::ScopedJoinHandle<'_, Result<(), FollowError>>,
) -> Result<Followed, FollowError> {
    let mut last_flush = Instant::now();
    let mut unflushed = 0u64;
    let mut reported = Lsn::INVALID;
    // The server's clock comes with what it sends; while it sends nothing, it is asked.
    let (mut heard, mut asked) = (Instant::now(), Instant::now());
    while !stop.load(Ordering::Relaxed) {
        if flusher.is_finished() {
            // It only stops early on an error, which joining reports.
            return Ok(Followed::Stopped);
        }
        if end.is_some_and(|e| repo.last_lsn() >= e) {
            return Ok(Followed::TimelineEnded);
        }
        let event = match stream.next_event(Duration::from_millis(50)) {
            Ok(Some(e)) => Some(e),
            // The server ends a timeline it has left at the switch point.
            Ok(None) if end.is_some() => return Ok(Followed::TimelineEnded),
            Ok(None) => return Err(ReplicationError::Protocol("the server ended the stream".into()).into()),
            Err(ReplicationError::Timeout(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut reply = false;
        match &event {
            Some(
                StreamEvent::XLogData { server_end, sent_at, .. } | StreamEvent::Keepalive { server_end, sent_at, .. },
            ) => {
                // The WAL position beside the clock may lack a commit already timestamped (and,
                // with asynchronous commit, acknowledged) but not yet sent: the reading vouches
                // only for times a margin before it.
                repo.note_clock(PgTime(sent_at.0 - STREAM_CLOCK_MARGIN.as_micros() as i64), *server_end);
                heard = Instant::now();
            }
            None => {}
        }
        match event {
            Some(StreamEvent::XLogData { data, .. }) => {
                unflushed += data.len() as u64;
                dec.feed(data);
                while let Some(rec) = dec.poll()? {
                    // A timeline the server left: nothing after its switch point is its own
                    // (the server may send part of what follows).
                    if end.is_some_and(|e| rec.end_lsn > e) {
                        break;
                    }
                    ingest.ingest(repo, &rec)?;
                }
            }
            Some(StreamEvent::Keepalive { reply_requested, .. }) => reply = reply_requested,
            None => {}
        }
        if repo.last_lsn() > repo.durable_lsn()
            && (unflushed >= cfg.flush_bytes || last_flush.elapsed() >= cfg.flush_interval)
        {
            let keys = ingest.take_long_chains();
            let sent = if unflushed >= 2 * cfg.flush_bytes {
                requests.send(keys).is_ok()
            } else {
                match requests.try_send(keys) {
                    Ok(()) => true,
                    Err(crossbeam_channel::TrySendError::Full(keys)) => {
                        // A flush is still running: these keys wait for the next one.
                        ingest.return_long_chains(keys);
                        false
                    }
                    Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
                }
            };
            if sent {
                last_flush = Instant::now();
                unflushed = 0;
            }
        }
        let durable = repo.durable_lsn();
        let flushed = cfg.remote_durable.as_ref().map_or(durable, |r| durable.min(r.durable()));
        let ask = heard.elapsed() >= CLOCK_EVERY && asked.elapsed() >= CLOCK_EVERY;
        if reply || flushed > reported || ask {
            stream.send_status(durable, flushed, flushed, ask)?;
            reported = flushed;
            if ask {
                asked = Instant::now();
            }
        }
    }
    Ok(Followed::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files_parse_as_postgres_reads_them() {
        let file = b"1\t0/361FF70\tno recovery target specified\n\n2\t0/5000000\tbefore 2026-01-01\n# comment\n";
        let e = parse_history(3, file).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].parent, e[0].switchpoint), (1, Lsn(0x361FF70)));
        assert_eq!((e[1].parent, e[1].switchpoint), (2, Lsn(0x5000000)));
        assert_eq!(e[1].line, "2\t0/5000000\tbefore 2026-01-01");
        assert!(matches!(parse_history(3, b"x\t0/1\tr\n"), Err(FollowError::HistoryFile { timeline: 3, .. })));
    }
}
