//! One timeline of the store: values by (key, LSN) in an in-memory layer, a frozen layer being
//! written, and layer files, with a manifest naming the layer files and the durable LSN.
//! `flush` freezes the in-memory layer, writes it to a new file without blocking readers or
//! the writer, and then, atomically, a new manifest: what the manifest says is durable has
//! survived a crash (a file written but not yet in the manifest is ignored and removed).
//!
//! The timeline is shared (`&self` everywhere): one thread ingests and flushes while any
//! number read. A reader sees a consistent cut — every value of every record up to
//! [`Timeline::last_lsn`] — because a record's values are put before its end is published.
//!
//! Layer files hold delta values (everything WAL said about some keys over an LSN range) or
//! images (keys materialised at one LSN, see [`Timeline::add_image_layer`]). They are kept
//! ordered by their newest LSN, so walking them newest-first visits each key's values in
//! descending LSN order.
//!
//! **Lineage.** A timeline that PostgreSQL forked from another (a promoted standby, a compute
//! restored to a past LSN: its history file names the parent and the switch point) holds only
//! the values of its own WAL, all after the fork; a read at L goes on into the parent as of
//! `min(L, fork)` for whatever the timeline's own values do not settle, as Neon's timelines
//! do. What the parent holds after the fork is never seen from the child.
//!
//! **Gaps.** History that was lost (an invalidated slot) is a recorded [`Gap`]: reads inside
//! it are refused, and reads after it see only values from the gap's new base (an `attach`'s
//! images) on — never values from before the gap, and nothing from an ancestor.
//!
//! ```text
//! manifest (file "manifest", replaced by rename):
//!   magic u64 "NEONMF04" | timeline u32 | parent u32 (0: none) | fork lsn u64 |
//!   history origin u64 | retained from u64 | durable lsn u64 | start of the record ending
//!   there u64 (0: none) | its xl_crc u32 (a stream resuming there must begin with that
//!   record: the CRC covers its xl_prev, and so tells a compute with another history) |
//!   gaps u32 | gaps × (from u64 | base u64 | to u64) |
//!   n u32 | n × (u16 len | file name) | crc32c u32
//! layer files: "delta-<first lsn>-<last lsn>", "image-<lsn>" (some keys),
//!              "fullimage-<lsn>" (every key), LSNs in hex, "-<n>" added to a name in use
//! ```

use super::commit_times::{CommitTimes, CommitTimesError};
use super::key::Key;
use super::layer::{
    DeltaLayer, DeltaLayerWriter, LayerError, LayerSource, MergeInputs, RemoteStub, INPUTS_SUFFIX, STUB_SUFFIX,
};
use super::memlayer::MemLayer;
use super::value::Value;
use neon_types::{Lsn, PgTime};
use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub const MANIFEST: &str = "manifest";
const MANIFEST_MAGIC: u64 = u64::from_le_bytes(*b"NEONMF05");
/// Version 4: the same, without the record ending at the durable LSN (read as none known).
const MANIFEST_MAGIC_V4: u64 = u64::from_le_bytes(*b"NEONMF04");
const OLD_MANIFEST_MAGICS: [&[u8; 8]; 1] = [b"NEONMF03"];

/// Problems of the repository as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    CommitTimes(#[from] CommitTimesError),
    #[error("repository {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("manifest {path} is corrupt: {what}")]
    Manifest { path: PathBuf, what: String },
    #[error("{lsn} has not {what} after waiting {waited:?}: the store has reached {last}")]
    NotYet {
        lsn: Lsn,
        what: &'static str,
        last: Lsn,
        /// The wait asked for (what was spent is that, give or take a scheduling slice).
        waited: Duration,
    },
}

/// A record filed: where it begins and ends, and its CRC (`xl_crc`, which covers its header's
/// `xl_prev`, and so ties it to the history before it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FiledRecord {
    pub start: Lsn,
    pub end: Lsn,
    pub crc: u32,
}

/// History that was lost: WAL after `from` was gone before the sidecar had it (an
/// invalidated slot). A base backup's files were imported as images at `base`, and history is
/// readable again from `to` (the backup's end, where its files are consistent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub from: Lsn,
    pub base: Lsn,
    pub to: Lsn,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the history from {} to {} was lost (its WAL was removed before the sidecar had it)",
            self.from, self.to
        )
    }
}

/// Why an LSN cannot be read on a timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Before the oldest LSN the lineage holds (or no history yet: `oldest` invalid).
    Before { oldest: Lsn },
    /// After the end of the last record filed.
    After { last: Lsn },
    /// Inside a recorded gap.
    InGap(Gap),
}

/// The history a timeline holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBounds {
    /// Where this timeline's own history began (the import, the first streamed record, or
    /// the fork from its parent).
    pub origin: Lsn,
    /// The oldest LSN still readable on its lineage: `origin` (or the parent's oldest, for a
    /// forked timeline) until garbage collection moves it forward.
    pub oldest: Lsn,
    /// Everything up to here survives a crash.
    pub durable: Lsn,
    /// The end of the last record filed: reads may ask up to here.
    pub last: Lsn,
}

struct Layers {
    inmem: MemLayer,
    /// The in-memory layer being written to a file by `flush`.
    frozen: Option<Arc<MemLayer>>,
    /// Layer files ordered by newest LSN (deltas before an image at the same LSN).
    files: Vec<Arc<DeltaLayer>>,
}

/// Values by key and LSN, in memory and in layer files.
pub struct Timeline {
    dir: PathBuf,
    /// PostgreSQL's timeline ID.
    id: u32,
    /// The parent timeline's ID and the fork LSN (its history file's switch point).
    parent: Option<(u32, Lsn)>,
    /// The parent, once the store has linked it.
    ancestor: std::sync::OnceLock<Arc<Timeline>>,
    gaps: RwLock<Vec<Gap>>,
    /// Fork LSNs of child timelines: history they read from here is kept.
    pins: Mutex<Vec<Lsn>>,
    layers: RwLock<Layers>,
    /// Serialises flushes and manifest writes.
    flush_lock: Mutex<()>,
    origin: AtomicU64,
    oldest: AtomicU64,
    durable: AtomicU64,
    /// The record ending at `durable`, if one does (not after an import or a fork).
    durable_record: Mutex<FiledRecord>,
    last: AtomicU64,
    /// The last record filed.
    last_record: Mutex<FiledRecord>,
    /// Readers waiting for `last` to move.
    arrivals: (Mutex<()>, Condvar),
    waiting: AtomicUsize,
    /// When each transaction in this timeline's own WAL ended.
    commit_times: CommitTimes,
    /// Readings of the compute's clock (from its WAL sender, or passed with a request), each
    /// with how far its WAL reached then, oldest first: a time up to a reading whose WAL is
    /// all filed has happened, and its transaction ends are all in the index.
    clock: Mutex<std::collections::VecDeque<(PgTime, Lsn)>>,
    /// Where evicted layer files come back from (with a remote store).
    source: Option<Arc<dyn LayerSource>>,
}

impl Timeline {
    /// Opens (or creates, as timeline 1 with no parent) the timeline in `dir` for writing: the
    /// one writer also removes layer files an interrupted flush left behind.
    pub fn open(dir: &Path) -> Result<Timeline, RepoError> {
        Self::open_inner(dir, true, None, None)
    }

    /// Opens the timeline in `dir` to read what is durable, beside a running writer.
    pub fn open_read_only(dir: &Path) -> Result<Timeline, RepoError> {
        Self::open_inner(dir, false, None, None)
    }

    /// [`Timeline::open`] (`writer`) or [`Timeline::open_read_only`], with layer files that
    /// are not on local disk fetched from `source` when read.
    pub fn open_with_source(
        dir: &Path,
        writer: bool,
        source: Option<Arc<dyn LayerSource>>,
    ) -> Result<Timeline, RepoError> {
        Self::open_inner(dir, writer, None, source)
    }

    /// Where layer files evicted from local disk come back from (for a timeline made new).
    pub fn with_source(mut self, source: Option<Arc<dyn LayerSource>>) -> Timeline {
        self.source = source;
        self
    }

    /// Makes timeline `id` in `dir` (which must not hold one), forked from `parent` at an LSN,
    /// or with no parent; its manifest says so before it holds anything.
    pub fn create(dir: &Path, id: u32, parent: Option<(u32, Lsn)>) -> Result<Timeline, RepoError> {
        if dir.join(MANIFEST).exists() {
            return Err(RepoError::Manifest {
                path: dir.join(MANIFEST),
                what: format!("timeline {id} exists already"),
            });
        }
        let t = Self::open_inner(dir, true, Some((id, parent)), None)?;
        let durable = t.durable_lsn();
        t.write_manifest(t.history_start(), (durable, FiledRecord::default()), &[])?;
        Ok(t)
    }

    fn open_inner(
        dir: &Path,
        writer: bool,
        new: Option<(u32, Option<(u32, Lsn)>)>,
        source: Option<Arc<dyn LayerSource>>,
    ) -> Result<Timeline, RepoError> {
        let io = |source| RepoError::Io { path: dir.to_path_buf(), source };
        private_dir(dir).map_err(io)?;
        let path = dir.join(MANIFEST);
        let manifest = match (std::fs::read(&path), new) {
            (Ok(b), _) => parse_manifest(&path, &b)?,
            (Err(e), Some((id, parent))) if e.kind() == std::io::ErrorKind::NotFound => {
                // A forked timeline's history begins at the fork.
                let fork = parent.map(|p| p.1).unwrap_or_default();
                Manifest { id, parent, origin: fork, oldest: fork, durable: fork, ..Manifest::default() }
            }
            (Err(e), None) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            (Err(source), _) => return Err(RepoError::Io { path, source }),
        };
        let mut files = Vec::new();
        for name in &manifest.names {
            files.push(Arc::new(DeltaLayer::open_or_stub(&dir.join(name), source.clone())?));
        }
        sort_layers(&mut files);
        // Files not in the manifest were written by a flush that never completed.
        for entry in std::fs::read_dir(dir).map_err(io)?.filter(|_| writer) {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A stub and merge inputs go with their layer file (evicted or not).
            let layer = name.strip_suffix(STUB_SUFFIX).or_else(|| name.strip_suffix(INPUTS_SUFFIX)).unwrap_or(&name);
            if is_layer_name(layer) && !manifest.names.iter().any(|n| n == layer) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let commit_times = CommitTimes::open(dir, writer)?;
        Ok(Timeline {
            source,
            commit_times,
            clock: Mutex::new(std::collections::VecDeque::new()),
            dir: dir.to_path_buf(),
            id: manifest.id,
            parent: manifest.parent,
            ancestor: std::sync::OnceLock::new(),
            gaps: RwLock::new(manifest.gaps),
            pins: Mutex::new(Vec::new()),
            layers: RwLock::new(Layers { inmem: MemLayer::default(), frozen: None, files }),
            flush_lock: Mutex::new(()),
            origin: AtomicU64::new(manifest.origin.0),
            oldest: AtomicU64::new(manifest.oldest.0),
            durable: AtomicU64::new(manifest.durable.0),
            durable_record: Mutex::new(manifest.durable_record),
            last_record: Mutex::new(manifest.durable_record),
            last: AtomicU64::new(manifest.durable.0),
            arrivals: (Mutex::new(()), Condvar::new()),
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PostgreSQL's timeline ID of this timeline.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The parent timeline's ID and the fork LSN, if this timeline was forked.
    pub fn parent(&self) -> Option<(u32, Lsn)> {
        self.parent
    }

    /// Links the parent (the store does, once every timeline is open).
    pub fn set_ancestor(&self, parent: Arc<Timeline>) {
        debug_assert_eq!(Some(parent.id), self.parent.map(|p| p.0));
        let _ = self.ancestor.set(parent);
    }

    /// The parent and the fork LSN.
    fn ancestor(&self) -> Option<(&Arc<Timeline>, Lsn)> {
        Some((self.ancestor.get()?, self.parent?.1))
    }

    /// The parent, where a read's own values may go on into it: not past a gap's base, and not
    /// once garbage collection took this timeline's history from the fork (its full image then
    /// holds everything, and what it dropped since the fork must not come back from the
    /// parent).
    fn ancestor_below(&self, floor: Option<Lsn>) -> Option<(&Arc<Timeline>, Lsn)> {
        self.ancestor().filter(|(_, fork)| floor.is_none() && self.history_start() == *fork)
    }

    /// Keeps history at and after `lsn` from garbage collection: a child timeline forks here,
    /// or a branch is at it.
    pub fn pin(&self, lsn: Lsn) {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).push(lsn);
    }

    /// Ends one [`Timeline::pin`] of `lsn`.
    pub fn unpin(&self, lsn: Lsn) {
        let mut pins = self.pins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pins.iter().position(|p| *p == lsn) {
            pins.swap_remove(i);
        }
    }

    /// The oldest pinned LSN (a child timeline's fork, a branch), if any: garbage collection
    /// keeps all after it.
    pub fn oldest_pin(&self) -> Option<Lsn> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).iter().min().copied()
    }

    /// The recorded gaps, oldest first.
    pub fn gaps(&self) -> Vec<Gap> {
        self.gaps.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records a gap: reads in it are refused from now on, and reads after it see nothing
    /// older than its base. Written to the manifest by the next flush, in the same write that
    /// names the layer holding the base's images: a gap on disk always has its base.
    pub fn add_gap(&self, gap: Gap) {
        self.gaps.write().unwrap_or_else(|p| p.into_inner()).push(gap);
    }

    /// Values before this LSN are not part of the history read at `lsn`: the base of the
    /// newest gap `lsn` lies after.
    fn floor(&self, lsn: Lsn) -> Option<Lsn> {
        self.gaps.read().unwrap_or_else(|p| p.into_inner()).iter().filter(|g| g.to <= lsn).map(|g| g.base).max()
    }

    /// The oldest LSN readable on this timeline's lineage.
    pub fn lineage_start(&self) -> Lsn {
        match self.ancestor() {
            Some((a, fork)) if self.history_start() == fork => a.lineage_start(),
            _ => self.history_start(),
        }
    }

    /// Whether `lsn` can be read here: inside the lineage's history, up to the last record
    /// filed, and not in a gap.
    pub fn check_readable(&self, lsn: Lsn) -> Result<(), Unreadable> {
        let last = self.last_lsn();
        if lsn > last {
            return Err(Unreadable::After { last });
        }
        if let Some(g) = self.gaps().into_iter().find(|g| lsn > g.from && lsn < g.to) {
            return Err(Unreadable::InGap(g));
        }
        let oldest = self.history_start();
        if oldest.is_valid() && lsn >= oldest {
            return Ok(());
        }
        match self.ancestor() {
            Some((a, fork)) if oldest == fork && lsn <= fork => a.check_readable(lsn),
            _ => Err(Unreadable::Before { oldest: self.lineage_start() }),
        }
    }

    /// The timeline whose own history holds `lsn` on this lineage: this one, or an ancestor
    /// for LSNs at or before the fork. Two reads of one key at one LSN resolving to the same
    /// timeline see the same value.
    pub fn owner_at(self: &Arc<Self>, lsn: Lsn) -> Arc<Timeline> {
        match self.ancestor() {
            Some((a, fork)) if lsn <= fork => a.owner_at(lsn),
            _ => self.clone(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Layers> {
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Layers> {
        self.layers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything up to this LSN has been made durable by [`Timeline::flush`].
    pub fn durable_lsn(&self) -> Lsn {
        Lsn(self.durable.load(Ordering::Acquire))
    }

    /// The end of the last record stored.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.last.load(Ordering::Acquire))
    }

    /// The first LSN the store holds history for (invalid until history begins).
    pub fn history_start(&self) -> Lsn {
        Lsn(self.oldest.load(Ordering::Acquire))
    }

    pub fn bounds(&self) -> HistoryBounds {
        HistoryBounds {
            origin: Lsn(self.origin.load(Ordering::Acquire)),
            oldest: self.lineage_start(),
            durable: self.durable_lsn(),
            last: self.last_lsn(),
        }
    }

    /// Records where history begins, once: the LSN the first record was read from.
    pub fn begin_history(&self, lsn: Lsn) {
        if self.origin.compare_exchange(0, lsn.0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // A restriction made before (attach: from the backup's end) stays.
            let _ = self.oldest.compare_exchange(0, lsn.0, Ordering::AcqRel, Ordering::Acquire);
            self.advance(lsn);
        }
    }

    /// Makes reads before `from` out of history (a base backup's files are consistent only
    /// from its end LSN); recorded in the manifest at the next flush.
    pub fn restrict_history(&self, from: Lsn) {
        self.oldest.fetch_max(from.0, Ordering::AcqRel);
    }

    /// When transactions in this timeline's own WAL ended.
    pub fn commit_times(&self) -> &CommitTimes {
        &self.commit_times
    }

    /// Notes a commit or abort record (start, end, `xact_time`), made durable with the flush
    /// that makes its end durable.
    pub fn note_commit(&self, start: Lsn, end: Lsn, time: PgTime) {
        self.commit_times.note(start, end, time);
    }

    /// Notes a reading of the compute's clock and how far its WAL reached then.
    pub fn note_clock(&self, time: PgTime, wal_end: Lsn) {
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        if c.back().is_some_and(|(t, _)| time <= *t) {
            return;
        }
        // Readings older than the newest whose WAL is filed say nothing more.
        let last = self.last_lsn();
        while c.len() >= 2 && c[1].1 <= last {
            c.pop_front();
        }
        if c.len() >= CLOCK_READINGS {
            c.pop_front();
        }
        c.push_back((time, wal_end));
    }

    /// The newest reading of the compute's clock whose WAL is filed up to `last`.
    pub fn clock_filed(&self, last: Lsn) -> Option<(PgTime, Lsn)> {
        let c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().rev().find(|(_, at)| *at <= last).copied()
    }

    /// The parent timeline and the fork LSN, once linked.
    pub fn linked_parent(&self) -> Option<(Arc<Timeline>, Lsn)> {
        self.ancestor().map(|(a, fork)| (a.clone(), fork))
    }

    /// The layer files, oldest first.
    pub fn layers(&self) -> Vec<Arc<DeltaLayer>> {
        self.read().files.clone()
    }

    /// The LSN of the newest full image layer.
    pub fn newest_full_image(&self) -> Option<Lsn> {
        self.read().files.iter().filter(|l| is_full_image(l)).map(|l| l.lsn_range().1).max()
    }

    /// Values in the in-memory layer (not yet being flushed).
    pub fn inmem_len(&self) -> usize {
        self.read().inmem.len()
    }

    /// Files a value. LSNs of successive records must not go backwards.
    pub fn put(&self, key: Key, lsn: Lsn, value: Value) {
        self.write().inmem.put(key, lsn, value);
    }

    /// Notes that every record ending at or before `lsn` has been put.
    pub fn advance(&self, lsn: Lsn) {
        if self.last.fetch_max(lsn.0, Ordering::AcqRel) < lsn.0 {
            self.wake_waiters();
        }
    }

    /// Notes that `record` has been put, and every one before it.
    pub fn advance_record(&self, record: FiledRecord) {
        *self.last_record.lock().unwrap_or_else(|p| p.into_inner()) = record;
        self.advance(record.end);
    }

    /// The record ending at the durable LSN, if one is known: WAL that continues this history
    /// begins with it.
    pub fn durable_record(&self) -> Option<FiledRecord> {
        let r = *self.durable_record.lock().unwrap_or_else(|p| p.into_inner());
        (r.start.is_valid() && r.end == self.durable_lsn()).then_some(r)
    }

    fn wake_waiters(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            let _guard = self.arrivals.0.lock().unwrap_or_else(|p| p.into_inner());
            self.arrivals.1.notify_all();
        }
    }

    /// Waits until records up to `lsn` have been filed, for at most `timeout`.
    pub fn wait_for_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<(), RepoError> {
        self.wait_until(|r| r.last_lsn(), "arrived", lsn, timeout)
    }

    /// Waits until records up to `lsn` are durable, for at most `timeout`.
    pub fn wait_for_durable(&self, lsn: Lsn, timeout: Duration) -> Result<(), RepoError> {
        self.wait_until(|r| r.durable_lsn(), "become durable", lsn, timeout)
    }

    fn wait_until(
        &self,
        reached: impl Fn(&Self) -> Lsn,
        what: &'static str,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<(), RepoError> {
        if reached(self) >= lsn {
            return Ok(());
        }
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut guard = self.arrivals.0.lock().unwrap_or_else(|p| p.into_inner());
        let result = loop {
            if reached(self) >= lsn {
                break Ok(());
            }
            let waited = started.elapsed();
            if waited >= timeout {
                break Err(RepoError::NotYet { lsn, what, last: reached(self), waited: timeout });
            }
            // Wake up now and then in any case: a change only signals when it sees a waiter.
            let slice = (timeout - waited).min(Duration::from_millis(50));
            guard = self.arrivals.1.wait_timeout(guard, slice).unwrap_or_else(|p| p.into_inner()).0;
        };
        drop(guard);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        result
    }

    /// Writes the in-memory values to a new layer file and records it, with the new durable
    /// LSN, in the manifest. Returns the durable LSN. Readers and `put` go on meanwhile.
    pub fn flush(&self) -> Result<Lsn, RepoError> {
        let _flushing = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (upto, upto_record, frozen) = {
            let mut l = self.write();
            let upto = self.last_lsn();
            let last = *self.last_record.lock().unwrap_or_else(|p| p.into_inner());
            let upto_record = if last.end == upto { last } else { FiledRecord::default() };
            if upto <= self.durable_lsn() {
                return Ok(self.durable_lsn());
            }
            // Values of a record still being filed (after `upto`) stay in memory: a file
            // never holds values newer than the durable LSN it is flushed for, which keeps
            // layer files from overlapping an image layer made at that LSN.
            let mut frozen = std::mem::take(&mut l.inmem);
            l.inmem = frozen.split_newer(upto);
            let frozen = Arc::new(frozen);
            l.frozen = Some(frozen.clone());
            (upto, upto_record, frozen)
        };
        let written = if frozen.is_empty() {
            None
        } else {
            let (first, last) = frozen.lsn_range().unwrap_or((upto, upto));
            let name = self.fresh_name(format!("{DELTA_PREFIX}-{:016X}-{:016X}", first.0, last.0));
            match self.write_layer(&name, frozen.sorted()) {
                Ok(layer) => Some(layer),
                Err(e) => {
                    drop(frozen);
                    self.unfreeze();
                    return Err(e);
                }
            }
        };
        drop(frozen);
        let mut names = self.file_names();
        if let Some(layer) = &written {
            names.push(file_name(layer.path()));
        }
        // The index of transaction ends first: what the manifest calls durable has its ends.
        let persisted = self.commit_times.persist(upto).map_err(RepoError::from);
        if let Err(e) = persisted.and_then(|()| self.write_manifest(self.history_start(), (upto, upto_record), &names))
        {
            // The new file is not history yet — unless the manifest got renamed into place
            // before the failure (an fsync of the directory): so it stays, and the next
            // writer's open removes it if no manifest names it. Its values go back to memory.
            self.unfreeze();
            return Err(e);
        }
        {
            let mut l = self.write();
            if let Some(layer) = written {
                l.files.push(Arc::new(layer));
                sort_layers(&mut l.files);
            }
            l.frozen = None;
        }
        *self.durable_record.lock().unwrap_or_else(|p| p.into_inner()) = upto_record;
        self.durable.store(upto.0, Ordering::Release);
        self.wake_waiters();
        Ok(upto)
    }

    /// Gives the values of a flush that failed back to memory, for the next attempt: nothing
    /// is lost. (The caller has dropped its handle of the frozen layer, so it moves, not
    /// copies.)
    fn unfreeze(&self) {
        let mut l = self.write();
        let frozen = l.frozen.take().expect("frozen while flushing");
        let newer = std::mem::take(&mut l.inmem);
        l.inmem = Arc::try_unwrap(frozen).unwrap_or_else(|a| (*a).clone());
        l.inmem.append(newer);
    }

    fn write_layer<'a>(
        &self,
        name: &str,
        values: impl Iterator<Item = (Key, Lsn, &'a Value)>,
    ) -> Result<DeltaLayer, RepoError> {
        let mut w = DeltaLayerWriter::new(&self.dir.join(name))?;
        for (key, lsn, value) in values {
            w.put(key, lsn, value)?;
        }
        let path = w.finish()?;
        Ok(DeltaLayer::open(&path)?.with_source(self.source.clone()))
    }

    /// Adds a layer of images at `lsn`: values of keys materialised there, so reconstruction
    /// at or after `lsn` stops at them. `lsn` must be the durable LSN as of some moment after
    /// every existing file was made (no file may span it; see `merge_layers`). A `full` image
    /// layer holds every key that has a value at `lsn`; history before it can then be
    /// dropped ([`Timeline::collect_garbage`]).
    pub fn add_image_layer(&self, lsn: Lsn, images: &BTreeMap<Key, Value>, full: bool) -> Result<(), RepoError> {
        let _flushing = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        let name = self.fresh_name(format!("{}-{:016X}", if full { FULL_IMAGE_PREFIX } else { IMAGE_PREFIX }, lsn.0));
        let layer = self.write_layer(&name, images.iter().map(|(k, v)| (*k, lsn, v)))?;
        let mut names = self.file_names();
        names.push(name);
        self.write_manifest(self.history_start(), self.durable_point(), &names)?;
        let mut l = self.write();
        l.files.push(Arc::new(layer));
        sort_layers(&mut l.files);
        Ok(())
    }

    /// Forgets history before `horizon`: layer files whose values all lie before it are
    /// removed, provided `horizon` is at most the newest image layer's LSN — so every key
    /// readable at `horizon` or later still has its base. Returns the files removed.
    pub fn collect_garbage(&self, horizon: Lsn) -> Result<Vec<PathBuf>, RepoError> {
        let _flushing = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Child timelines read this one as of their forks: that history stays.
        let horizon = self.oldest_pin().map_or(horizon, |p| horizon.min(p));
        let files = self.layers();
        let full_image =
            files.iter().filter(|l| is_full_image(l) && l.lsn_range().1 <= horizon).map(|l| l.lsn_range().1).max();
        let Some(image_lsn) = full_image else { return Ok(Vec::new()) };
        // Layers entirely older than the full image (and deltas ending at it): the image has
        // every key they could give a read at or after it.
        let doomed: Vec<Arc<DeltaLayer>> = files
            .iter()
            .filter(|l| l.lsn_range().1 < image_lsn || (l.lsn_range().1 == image_lsn && !is_image(l)))
            .cloned()
            .collect();
        if doomed.is_empty() && self.history_start() >= image_lsn {
            return Ok(Vec::new());
        }
        let keep: Vec<String> =
            files.iter().filter(|l| !doomed.iter().any(|d| Arc::ptr_eq(d, l))).map(|l| file_name(l.path())).collect();
        self.write_manifest(image_lsn, self.durable_point(), &keep)?;
        self.oldest.store(image_lsn.0, Ordering::Release);
        self.write().files.retain(|l| !doomed.iter().any(|d| Arc::ptr_eq(d, l)));
        let mut removed = Vec::new();
        for l in doomed {
            // Readers may still hold the map; unlinking a mapped file is safe on Linux.
            l.remove_files();
            removed.push(l.path().to_path_buf());
        }
        Ok(removed)
    }

    /// Merges the oldest run of up to `run` consecutive small layer files (full images and
    /// files already larger than `max_bytes / run` excepted, at most `max_bytes` together)
    /// into one, when there are more than `keep` files: reads walk fewer files, and what they
    /// find is the same (the merged file holds every value of the run; where an image and a
    /// record share a key and LSN, the image, which already includes the record). A file
    /// larger than the rest of its run together is left out of it, so a value is rewritten a
    /// few times at most (size-tiered). The merge streams (see
    /// `write_merged`): its memory does not grow with the files. Returns the merged file, if
    /// any.
    ///
    /// The files are written without holding up flushes (a merge may rewrite a gigabyte); the
    /// manifest is swapped under the flush lock, if the chosen files are all still there.
    pub fn merge_layers(&self, keep: usize, run: usize, max_bytes: u64) -> Result<Option<PathBuf>, RepoError> {
        let files = self.layers();
        if files.len() <= keep || run < 2 {
            return Ok(None);
        }
        let small = max_bytes / run as u64;
        // The first run of mergeable files, oldest first. An image layer at the LSN the file
        // before it ends at stays with that file: it may neither start a run (the merged file
        // would begin where another ends) nor be left out of the run that file ends.
        // With a remote store, only files already uploaded are merged: until the merged file
        // is up too, an index can name them in its place (and no upload is lost).
        let uploaded = |l: &Arc<DeltaLayer>| self.source.is_none() || RemoteStub::path_for(l.path()).exists();
        let mergeable = |l: &Arc<DeltaLayer>| !is_full_image(l) && l.size_bytes() <= small && uploaded(l);
        let at_end_of =
            |l: &Arc<DeltaLayer>, before: &Arc<DeltaLayer>| is_image(l) && l.lsn_range().0 == before.lsn_range().1;
        // Runs are tried in order: where tiering leaves fewer than two files of one, the next
        // may still merge (else a large file before a full image would stop merging for good).
        let mut from = 0;
        let chosen = loop {
            let mut chosen: Vec<Arc<DeltaLayer>> = Vec::new();
            let mut next = files.len();
            for (i, l) in files.iter().enumerate().skip(from) {
                let follows_its_file = i > 0 && at_end_of(l, &files[i - 1]);
                if !mergeable(l) || (chosen.is_empty() && follows_its_file) {
                    if chosen.len() >= 2 {
                        next = i;
                        break;
                    }
                    chosen.clear();
                    continue;
                }
                chosen.push(l.clone());
                if chosen.len() >= run {
                    match files.get(i + 1) {
                        Some(after) if at_end_of(after, l) && mergeable(after) => continue,
                        Some(after) if at_end_of(after, l) => {
                            chosen.pop();
                        }
                        _ => {}
                    }
                    next = i + 1;
                    break;
                }
            }
            // Size-tiered: a file larger than the rest of the run together is left out (with
            // an image layer at its end), or a merged file would be rewritten at every flush
            // as it takes in one or two new small files: each value is rewritten a few times
            // at most.
            while chosen.len() >= 2 && chosen[0].size_bytes() > chosen[1..].iter().map(|l| l.size_bytes()).sum::<u64>()
            {
                let first = chosen.remove(0);
                while chosen.first().is_some_and(|l| at_end_of(l, &first)) {
                    chosen.remove(0);
                }
            }
            if chosen.len() >= 2 {
                break chosen;
            }
            if next >= files.len() {
                return Ok(None);
            }
            from = next;
        };
        // The merged file holds every value of the run: its LSN range is theirs together.
        let first = chosen.iter().map(|l| l.lsn_range().0).min().unwrap_or_default();
        let last = chosen.iter().map(|l| l.lsn_range().1).max().unwrap_or_default();
        let name = self.fresh_name(format!("{DELTA_PREFIX}-{:016X}-{:016X}", first.0, last.0));
        let layer = self.write_merged(&name, &chosen)?;
        let _flushing = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Flushes may have added files meanwhile; a collection may have removed chosen ones.
        let files = self.layers();
        let is_chosen = |l: &Arc<DeltaLayer>| chosen.iter().any(|c| Arc::ptr_eq(c, l));
        if files.iter().filter(|l| is_chosen(l)).count() != chosen.len() {
            let _ = std::fs::remove_file(layer.path());
            return Ok(None);
        }
        let mut names: Vec<String> = files.iter().filter(|l| !is_chosen(l)).map(|l| file_name(l.path())).collect();
        names.push(name);
        if self.source.is_some() {
            // Until the merged file is uploaded, an index may name these in its place.
            let inputs = MergeInputs { files: chosen.iter().map(|l| (file_name(l.path()), l.facts())).collect() };
            let path = MergeInputs::path_for(layer.path());
            put_durably(&path, &inputs.encode()).map_err(|source| RepoError::Io { path, source })?;
        }
        self.write_manifest(self.history_start(), self.durable_point(), &names)?;
        let path = layer.path().to_path_buf();
        {
            let mut l = self.write();
            l.files.retain(|f| !is_chosen(f));
            l.files.push(Arc::new(layer));
            sort_layers(&mut l.files);
        }
        for l in &chosen {
            l.remove_files();
        }
        Ok(Some(path))
    }

    /// Writes the values of `files` (oldest first) as one file, streaming: a k-way merge by
    /// (key, LSN) that holds one value per file in memory. Where files share a key and LSN (an
    /// image layer at the end of a delta's range), the later file's value wins: the image,
    /// which already includes the record.
    fn write_merged(&self, name: &str, files: &[Arc<DeltaLayer>]) -> Result<DeltaLayer, RepoError> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let mut iters: Vec<_> = files.iter().map(|f| f.values_in_order()).collect();
        let mut heads: Vec<Option<Value>> = vec![None; files.len()];
        let mut heap = BinaryHeap::new();
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(v) = it.next() {
                let (k, l, v) = v?;
                heads[i] = Some(v);
                heap.push(Reverse((k, l, i)));
            }
        }
        let mut w = DeltaLayerWriter::new(&self.dir.join(name))?;
        while let Some(Reverse((key, lsn, mut from))) = heap.pop() {
            // Every file's value at this (key, LSN), the latest file's kept.
            let mut taken = vec![from];
            while let Some(Reverse((k, l, i))) = heap.peek().copied() {
                if (k, l) != (key, lsn) {
                    break;
                }
                heap.pop();
                taken.push(i);
                from = from.max(i);
            }
            w.put(key, lsn, heads[from].as_ref().expect("a head for every file in the heap"))?;
            for i in taken {
                heads[i] = None;
                if let Some(v) = iters[i].next() {
                    let (k, l, v) = v?;
                    heads[i] = Some(v);
                    heap.push(Reverse((k, l, i)));
                }
            }
        }
        let path = w.finish()?;
        Ok(DeltaLayer::open(&path)?.with_source(self.source.clone()))
    }

    /// Checks what reads rely on: in newest-LSN order, no file's values reach back into an
    /// earlier file's range (an image layer may sit exactly at the end of the file before it).
    pub fn check_layer_order(&self) -> Result<(), String> {
        let files = self.layers();
        for w in files.windows(2) {
            let (a, b) = (w[0].lsn_range(), w[1].lsn_range());
            // An image layer may sit at the very LSN the file before it ends at.
            let ordered = b.0 > a.1 || (b.0 == a.1 && is_image(&w[1]));
            if !ordered {
                return Err(format!("layer files overlap: {} and {}", file_name(w[0].path()), file_name(w[1].path())));
            }
        }
        Ok(())
    }

    /// `base`, or `base-<n>` if a layer file of that name exists (two image layers at one
    /// LSN, a merged file with a member's range): a name is never reused, so no file is
    /// overwritten while the manifest still names it.
    fn fresh_name(&self, base: String) -> String {
        let taken = self.file_names();
        let mut name = base.clone();
        let mut n = 1;
        while taken.contains(&name) || self.dir.join(&name).exists() {
            n += 1;
            name = format!("{base}-{n}");
        }
        name
    }

    /// The durable LSN and the record ending there, as the manifest records them.
    fn durable_point(&self) -> (Lsn, FiledRecord) {
        (self.durable_lsn(), *self.durable_record.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn file_names(&self) -> Vec<String> {
        self.read().files.iter().map(|l| file_name(l.path())).collect()
    }

    /// `durable`: the durable LSN, and the record ending there (all zero if none did: an
    /// import, a fork).
    fn write_manifest(&self, oldest: Lsn, durable: (Lsn, FiledRecord), names: &[String]) -> Result<(), RepoError> {
        let (durable, record) = durable;
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join("manifest.tmp");
        let io = |source| RepoError::Io { path: tmp.clone(), source };
        let mut b = Vec::new();
        b.extend_from_slice(&MANIFEST_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.id.to_le_bytes());
        let (parent, fork) = self.parent.unwrap_or_default();
        b.extend_from_slice(&parent.to_le_bytes());
        b.extend_from_slice(&fork.0.to_le_bytes());
        b.extend_from_slice(&self.origin.load(Ordering::Acquire).to_le_bytes());
        b.extend_from_slice(&oldest.0.to_le_bytes());
        b.extend_from_slice(&durable.0.to_le_bytes());
        b.extend_from_slice(&record.start.0.to_le_bytes());
        b.extend_from_slice(&record.crc.to_le_bytes());
        let gaps = self.gaps();
        b.extend_from_slice(&(gaps.len() as u32).to_le_bytes());
        for g in &gaps {
            for l in [g.from, g.base, g.to] {
                b.extend_from_slice(&l.0.to_le_bytes());
            }
        }
        b.extend_from_slice(&(names.len() as u32).to_le_bytes());
        for n in names {
            b.extend_from_slice(&(n.len() as u16).to_le_bytes());
            b.extend_from_slice(n.as_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        write_durably(&tmp, &path, &b).map_err(io)
    }

    /// The values of `key` needed to rebuild it as of `lsn`, oldest first: back from the
    /// newest value at or before `lsn` to the first one that needs no earlier value — on into
    /// the parent as of the fork when this timeline's own values do not reach one, never
    /// below a gap's base.
    pub fn values_for(&self, key: Key, lsn: Lsn) -> Result<Vec<(Lsn, Value)>, RepoError> {
        let floor = self.floor(lsn);
        let mut newest_first: Vec<(Lsn, Value)> = Vec::new();
        if self.own_values(key, lsn, floor.unwrap_or_default(), &mut newest_first)? {
            newest_first.reverse();
            return Ok(newest_first);
        }
        newest_first.reverse();
        match self.ancestor_below(floor) {
            Some((a, fork)) => {
                let mut older = a.values_for(key, lsn.min(fork))?;
                older.extend(newest_first);
                Ok(older)
            }
            None => Ok(newest_first),
        }
    }

    /// This timeline's own values of `key` in `floor..=lsn`, newest first, into `out`, down to
    /// the first that needs no earlier value; true if one was found.
    fn own_values(&self, key: Key, lsn: Lsn, floor: Lsn, out: &mut Vec<(Lsn, Value)>) -> Result<bool, RepoError> {
        let start = out.len();
        walk_fetching(self, |fetched| {
            out.truncate(start);
            self.own_values_local(key, lsn, floor, out, fetched)
        })
    }

    /// [`Timeline::own_values`] under the layers' lock, stopping at the first evicted layer
    /// file that may hold the key and is not in `fetched` (its values read from the remote
    /// store, or the file fetched: evicted again already, it is then fetched under the lock
    /// rather than in a loop).
    fn own_values_local(
        &self,
        key: Key,
        lsn: Lsn,
        floor: Lsn,
        out: &mut Vec<(Lsn, Value)>,
        fetched: &[Fetched],
    ) -> Result<Walk<bool>, RepoError> {
        let l = self.read();
        let upto = Lsn(lsn.0.saturating_add(1));
        // Takes a value, newest first: the walk's answer once one is below the floor or
        // needs no earlier value.
        let mut take = |at: Lsn, v: Value| {
            if at < floor {
                return Some(false);
            }
            let init = v.will_init();
            out.push((at, v));
            init.then_some(true)
        };
        let mems = [Some(&l.inmem), l.frozen.as_deref()];
        for mem in mems.into_iter().flatten() {
            for (at, v) in mem.newest_first(&key, lsn) {
                if let Some(done) = take(*at, v.clone()) {
                    return Ok(Walk::Done(done));
                }
            }
        }
        for layer in l.files.iter().rev() {
            if layer.lsn_range().0 > lsn || !layer.might_contain(key) {
                continue;
            }
            if !layer.is_local() {
                match fetched.iter().find(|f| Arc::ptr_eq(&f.layer, layer)) {
                    Some(Fetched { values: Some(values), .. }) => {
                        for (at, v) in values {
                            if let Some(done) = take(*at, v.clone()) {
                                return Ok(Walk::Done(done));
                            }
                        }
                        continue;
                    }
                    Some(Fetched { values: None, .. }) => {}
                    None => return Ok(Walk::Fetch(layer.clone(), Some((key, upto)))),
                }
            }
            for value in layer.newest_first(key, upto) {
                let (at, v) = value?;
                if let Some(done) = take(at, v) {
                    return Ok(Walk::Done(done));
                }
            }
        }
        Ok(Walk::Done(false))
    }

    /// The newest value at or before `lsn` of every key in `keys` that has one (this
    /// timeline's own, else its parent's as of the fork; never older than a gap's base).
    pub fn latest_in_range(&self, keys: Range<Key>, lsn: Lsn) -> Result<BTreeMap<Key, (Lsn, Value)>, RepoError> {
        let floor = self.floor(lsn);
        let mut out = walk_fetching(self, |fetched| self.latest_in_range_local(keys.clone(), lsn, floor, fetched))?;
        if let Some((a, fork)) = self.ancestor_below(floor) {
            for (k, v) in a.latest_in_range(keys, lsn.min(fork))? {
                out.entry(k).or_insert(v);
            }
        }
        Ok(out)
    }

    /// This timeline's own part of [`Timeline::latest_in_range`] under the layers' lock, as
    /// [`Timeline::own_values_local`] walks.
    fn latest_in_range_local(
        &self,
        keys: Range<Key>,
        lsn: Lsn,
        floor: Option<Lsn>,
        fetched: &[Fetched],
    ) -> Result<Walk<Latest>, RepoError> {
        let mut out = Latest::new();
        let l = self.read();
        let lowest = floor.unwrap_or_default();
        let relevant: Vec<&Arc<DeltaLayer>> =
            l.files.iter().filter(|f| f.lsn_range().0 <= lsn && f.lsn_range().1 >= lowest).collect();
        if let Some(layer) = relevant.iter().find(|f| must_fetch(f, fetched)) {
            return Ok(Walk::Fetch(Arc::clone(layer), None));
        }
        let mut offer = |k: Key, at: Lsn, v: Value| {
            if at <= lsn && at >= lowest && out.get(&k).is_none_or(|(have, _)| *have < at) {
                out.insert(k, (at, v));
            }
        };
        for layer in relevant {
            layer.newest_each_in_range(keys.clone(), lsn, lowest, &mut offer)?;
        }
        let mems = [l.frozen.as_deref(), Some(&l.inmem)];
        for mem in mems.into_iter().flatten() {
            for (k, at, v) in mem.in_range(keys.clone()) {
                offer(k, at, v.clone());
            }
        }
        Ok(Walk::Done(out))
    }
}

/// The newest value of each key, as [`Timeline::latest_in_range`] gives them.
type Latest = BTreeMap<Key, (Lsn, Value)>;

/// How a walk of the layers under their lock ended: with its answer, or at an evicted layer
/// file to read from the remote store first — without the lock, which ingest and every other
/// reader need meanwhile: one key's values before an LSN, or (`None`) the whole file.
enum Walk<T> {
    Done(T),
    Fetch(Arc<DeltaLayer>, Option<(Key, Lsn)>),
}

/// What a walk read of an evicted file without the lock: the key's values, newest first
/// (`DeltaLayer::newest_first_remote`), or `None` when the file itself was fetched.
struct Fetched {
    layer: Arc<DeltaLayer>,
    values: Option<Vec<(Lsn, Value)>>,
}

/// Runs `walk` (under the layers' lock) until it ends with an answer, reading what it stops
/// at in between, without the lock; `walk` is told what it has read already. A file merged
/// or collected away meanwhile (its read failed, and it is no longer one of `timeline`'s) is
/// passed by: the next walk does not meet it.
fn walk_fetching<T>(
    timeline: &Timeline,
    mut walk: impl FnMut(&[Fetched]) -> Result<Walk<T>, RepoError>,
) -> Result<T, RepoError> {
    let mut fetched = Vec::new();
    loop {
        match walk(&fetched)? {
            Walk::Done(answer) => return Ok(answer),
            Walk::Fetch(layer, one_key) => {
                // `newest_first_remote` makes the file local itself when it answers `None`.
                let read = match one_key {
                    Some((key, upto)) => layer.newest_first_remote(key, upto),
                    None => layer.make_local().map(|()| None),
                };
                match read {
                    Ok(values) => fetched.push(Fetched { layer, values }),
                    Err(_) if !timeline.read().files.iter().any(|f| Arc::ptr_eq(f, &layer)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Whether `layer` is evicted and not already fetched once by this walk.
fn must_fetch(layer: &Arc<DeltaLayer>, fetched: &[Fetched]) -> bool {
    !layer.is_local() && !fetched.iter().any(|f| Arc::ptr_eq(&f.layer, layer))
}

/// Creates `dir` private to this user (every value of the database is in there), and missing
/// parents as `mkdir -p` would (they may be the way in for another user of a subdirectory).
/// An existing directory is left as it is.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// Writes `bytes` to `tmp` (new, private), fsyncs it, renames it to `path` and fsyncs the
/// directory: `path` then holds either its old contents or all of the new, whatever happens.
pub fn write_durably(tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably_with(tmp, path, |f| f.write_all(bytes))
}

/// [`write_durably`] through `<path>.tmp`: a file beside a layer file (its stub, its merge
/// inputs), or what `attach-remote` sets up.
pub fn put_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    write_durably(Path::new(&tmp), path, bytes)
}

/// [`write_durably`] with the contents written by `write` into `tmp` — made new and private
/// (a leftover is unlinked, never followed) — which may also set its owner and mode before it
/// takes `path`'s place. On any error `tmp` is removed and `path` is as it was.
pub fn write_durably_with<T, E: From<std::io::Error>>(
    tmp: &Path,
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<T, E>,
) -> Result<T, E> {
    use std::os::unix::fs::OpenOptionsExt;
    let done = (|| -> Result<T, E> {
        let _ = std::fs::remove_file(tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(tmp)?;
        let written = write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()?;
        Ok(written)
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    done
}

/// Clock readings kept while their WAL is being filed.
const CLOCK_READINGS: usize = 256;

const DELTA_PREFIX: &str = "delta";
const IMAGE_PREFIX: &str = "image";
const FULL_IMAGE_PREFIX: &str = "fullimage";

pub(crate) fn is_layer_name(name: &str) -> bool {
    [DELTA_PREFIX, IMAGE_PREFIX, FULL_IMAGE_PREFIX]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(|r| r.starts_with('-')))
}

fn is_image(l: &DeltaLayer) -> bool {
    !file_name(l.path()).starts_with(DELTA_PREFIX)
}

fn is_full_image(l: &DeltaLayer) -> bool {
    file_name(l.path()).starts_with(FULL_IMAGE_PREFIX)
}

fn file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Newest LSN ascending; at equal LSN, deltas before images (an image at L already contains
/// what a delta ending at L says).
fn sort_layers(files: &mut [Arc<DeltaLayer>]) {
    files.sort_by_key(|l| (l.lsn_range().1, is_image(l), l.lsn_range().0));
}

struct Manifest {
    id: u32,
    parent: Option<(u32, Lsn)>,
    origin: Lsn,
    oldest: Lsn,
    durable: Lsn,
    durable_record: FiledRecord,
    gaps: Vec<Gap>,
    names: Vec<String>,
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest {
            id: 1,
            parent: None,
            origin: Lsn(0),
            oldest: Lsn(0),
            durable: Lsn(0),
            durable_record: FiledRecord::default(),
            gaps: Vec::new(),
            names: Vec::new(),
        }
    }
}

/// What a timeline directory holds durably, as its manifest says: the manifest's bytes, the
/// layer files it names, and its durable LSN (what an uploader copies elsewhere).
pub fn read_durable_manifest(dir: &Path) -> Result<(Vec<u8>, Vec<String>, Lsn), RepoError> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|source| RepoError::Io { path: path.clone(), source })?;
    let (names, durable) = manifest_layers(&path, &bytes)?;
    Ok((bytes, names, durable))
}

/// The layer files a manifest's bytes name and its durable LSN; `path` names it in errors.
pub fn manifest_layers(path: &Path, bytes: &[u8]) -> Result<(Vec<String>, Lsn), RepoError> {
    let m = parse_manifest(path, bytes)?;
    Ok((m.names, m.durable))
}

/// A manifest's bytes with `names` for its layer files (the same values in other files: a
/// merged file's inputs in its place), all else as it was.
pub fn manifest_with_names(path: &Path, bytes: &[u8], names: &[String]) -> Result<Vec<u8>, RepoError> {
    let m = parse_manifest(path, bytes)?;
    let names_len: usize = 4 + m.names.iter().map(|n| 2 + n.len()).sum::<usize>();
    let mut b = bytes[..bytes.len() - 4 - names_len].to_vec();
    b.extend_from_slice(&(names.len() as u32).to_le_bytes());
    for n in names {
        b.extend_from_slice(&(n.len() as u16).to_le_bytes());
        b.extend_from_slice(n.as_bytes());
    }
    b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
    parse_manifest(path, &b)?;
    Ok(b)
}

fn parse_manifest(path: &Path, b: &[u8]) -> Result<Manifest, RepoError> {
    let bad = |what: &str| RepoError::Manifest { path: path.to_path_buf(), what: what.to_string() };
    if OLD_MANIFEST_MAGICS.iter().any(|m| b.starts_with(&m[..])) {
        return Err(bad("written by an older neon-sidecar, whose stores this one does not read; make a new \
                        store with `neon-sidecar init` or `attach`"));
    }
    if b.len() < 60 {
        return Err(bad("too short"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    let mut r = body;
    let mut take = |n: usize| -> Result<&[u8], RepoError> {
        if r.len() < n {
            return Err(bad("truncated"));
        }
        let (a, rest) = r.split_at(n);
        r = rest;
        Ok(a)
    };
    let u32_ = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let lsn = |b: &[u8]| Lsn(u64::from_le_bytes(b.try_into().expect("8 bytes")));
    let v4 = match take(8)? {
        m if m == MANIFEST_MAGIC.to_le_bytes() => false,
        m if m == MANIFEST_MAGIC_V4.to_le_bytes() => true,
        _ => return Err(bad("bad magic")),
    };
    let id = u32_(take(4)?);
    let (parent, fork) = (u32_(take(4)?), lsn(take(8)?));
    let (origin, oldest, durable) = (lsn(take(8)?), lsn(take(8)?), lsn(take(8)?));
    let durable_record = match v4 {
        true => FiledRecord::default(),
        false => FiledRecord { start: lsn(take(8)?), end: durable, crc: u32_(take(4)?) },
    };
    let mut gaps = Vec::new();
    for _ in 0..u32_(take(4)?) {
        gaps.push(Gap { from: lsn(take(8)?), base: lsn(take(8)?), to: lsn(take(8)?) });
    }
    let mut names = Vec::new();
    for _ in 0..u32_(take(4)?) {
        let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let name = std::str::from_utf8(take(len)?).map_err(|_| bad("file name is not UTF-8"))?;
        if !is_layer_name(name) || name.contains('/') {
            return Err(bad("not a layer file name"));
        }
        names.push(name.to_string());
    }
    if !r.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let parent = (parent != 0).then_some((parent, fork));
    Ok(Manifest { id, parent, origin, oldest, durable, durable_record, gaps, names })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(n: u64) -> Value {
        Value::WalRecord { will_init: false, raw: Bytes::from(n.to_le_bytes().to_vec()) }
    }

    #[test]
    fn merged_files_read_as_the_files_did() {
        let dir = tempfile::tempdir().unwrap();
        let t = Timeline::open(dir.path()).unwrap();
        t.begin_history(Lsn(10));
        let keys: Vec<Key> = (0..50).map(|i| Key::meta(1, i)).collect();
        let mut lsn = 10;
        for round in 0..6u64 {
            for (i, k) in keys.iter().enumerate() {
                if !(i as u64 + round).is_multiple_of(3) {
                    lsn += 8;
                    t.put(*k, Lsn(lsn), record(lsn));
                }
            }
            t.advance(Lsn(lsn));
            t.flush().unwrap();
            if round == 2 {
                // An image layer at the durable LSN: it shares (key, LSN) with the last delta's
                // values there, and must win over them.
                let images: BTreeMap<Key, Value> =
                    keys.iter().map(|k| (*k, Value::Image(Bytes::from_static(b"image")))).collect();
                t.add_image_layer(t.durable_lsn(), &images, false).unwrap();
            }
        }
        let before: Vec<Vec<(Lsn, Value)>> =
            keys.iter().flat_map(|k| (10..=lsn).step_by(24).map(|l| t.values_for(*k, Lsn(l)).unwrap())).collect();
        let files = t.layers().len();
        assert!(t.merge_layers(1, 16, 1 << 30).unwrap().is_some());
        assert!(t.layers().len() < files, "{} files, were {files}", t.layers().len());
        t.check_layer_order().unwrap();
        let after: Vec<Vec<(Lsn, Value)>> =
            keys.iter().flat_map(|k| (10..=lsn).step_by(24).map(|l| t.values_for(*k, Lsn(l)).unwrap())).collect();
        assert_eq!(before, after);
        // Reopened: the same.
        let newest = t.values_for(keys[7], Lsn(lsn)).unwrap();
        drop(t);
        let t = Timeline::open(dir.path()).unwrap();
        assert_eq!(t.values_for(keys[7], Lsn(lsn)).unwrap(), newest);
    }

    #[test]
    fn a_file_larger_than_the_rest_of_its_run_is_left_out_of_the_merge() {
        let dir = tempfile::tempdir().unwrap();
        let t = Timeline::open(dir.path()).unwrap();
        t.begin_history(Lsn(10));
        let mut lsn = 10;
        // One large file, then three small ones.
        for n in [400u64, 5, 5, 5] {
            for i in 0..n {
                lsn += 8;
                t.put(Key::meta(1, i as u32), Lsn(lsn), record(lsn));
            }
            t.advance(Lsn(lsn));
            t.flush().unwrap();
        }
        let large = t.layers()[0].clone();
        let merged = t.merge_layers(0, 16, 1 << 30).unwrap().expect("the small ones merged");
        let files = t.layers();
        assert_eq!(files.len(), 2);
        assert!(Arc::ptr_eq(&files[0], &large), "the large file was rewritten");
        assert_eq!(files[1].path(), merged);
        assert!(files[1].size_bytes() < large.size_bytes());
        t.check_layer_order().unwrap();
    }

    #[test]
    fn a_run_that_tiering_leaves_alone_does_not_stop_later_runs_merging() {
        let dir = tempfile::tempdir().unwrap();
        let t = Timeline::open(dir.path()).unwrap();
        t.begin_history(Lsn(10));
        let mut lsn = 10;
        let mut flush = |t: &Timeline, n: u64| {
            for i in 0..n {
                lsn += 8;
                t.put(Key::meta(1, i as u32), Lsn(lsn), record(lsn));
            }
            t.advance(Lsn(lsn));
            t.flush().unwrap();
        };
        // A large file and a small one (tiering leaves that run with one file), a full image
        // (never merged), then three small files.
        flush(&t, 400);
        flush(&t, 5);
        let images: BTreeMap<Key, Value> =
            (0..5).map(|i| (Key::meta(1, i), Value::Image(Bytes::from_static(b"image")))).collect();
        t.add_image_layer(t.durable_lsn(), &images, true).unwrap();
        for _ in 0..3 {
            flush(&t, 5);
        }
        let before = t.layers();
        assert_eq!(before.len(), 6);
        t.merge_layers(0, 16, 1 << 30).unwrap().expect("the three small files after the full image merged");
        let after = t.layers();
        assert_eq!(after.len(), 4);
        assert!(before[..3].iter().zip(&after[..3]).all(|(b, a)| Arc::ptr_eq(b, a)), "the first run was rewritten");
        t.check_layer_order().unwrap();
        assert_eq!(t.values_for(Key::meta(1, 2), Lsn(lsn)).unwrap().len(), 4);
    }

    #[test]
    fn a_version_4_manifest_reads_with_no_record_known() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Vec::new();
        b.extend_from_slice(b"NEONMF04");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for lsn in [0u64, 16, 16, 40] {
            b.extend_from_slice(&lsn.to_le_bytes()); // fork, origin, oldest, durable
        }
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.path().join(MANIFEST), &b).unwrap();
        let t = Timeline::open(dir.path()).unwrap();
        assert_eq!((t.durable_lsn(), t.history_start(), t.durable_record()), (Lsn(40), Lsn(16), None));
        // Trailing bytes are refused.
        drop(t);
        let mut b2 = b[..b.len() - 4].to_vec();
        b2.push(0);
        let crc = crc32c::crc32c(&b2);
        b2.extend_from_slice(&crc.to_le_bytes());
        assert!(parse_manifest(dir.path(), &b2).is_err());
    }

    #[test]
    fn the_record_ending_at_the_durable_lsn_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let t = Timeline::open(dir.path()).unwrap();
        t.begin_history(Lsn(16));
        t.put(Key::meta(1, 1), Lsn(40), record(1));
        let r = FiledRecord { start: Lsn(16), end: Lsn(40), crc: 0xDEAD_BEEF };
        t.advance_record(r);
        assert_eq!(t.durable_record(), None, "not durable yet");
        t.flush().unwrap();
        assert_eq!(t.durable_record(), Some(r));
        // Advanced past it without a record (an import): no record ends at the durable LSN.
        t.advance(Lsn(48));
        t.flush().unwrap();
        assert_eq!(t.durable_record(), None);
        t.advance_record(FiledRecord { start: Lsn(48), end: Lsn(64), crc: 7 });
        t.flush().unwrap();
        drop(t);
        let t = Timeline::open(dir.path()).unwrap();
        assert_eq!(t.durable_record(), Some(FiledRecord { start: Lsn(48), end: Lsn(64), crc: 7 }));
    }
}
