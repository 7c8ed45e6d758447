//! The repository: values by (key, LSN) in an in-memory layer, a frozen layer being written,
//! and layer files, with a manifest naming the layer files and the durable LSN. `flush`
//! freezes the in-memory layer, writes it to a new file without blocking readers or the
//! writer, and then, atomically, a new manifest: what the manifest says is durable has
//! survived a crash (a file written but not yet in the manifest is ignored and removed).
//!
//! The repository is shared (`&self` everywhere): one thread ingests and flushes while any
//! number read. A reader sees a consistent cut — every value of every record up to
//! [`Timeline::last_lsn`] — because a record's values are put before its end is published.
//!
//! Layer files hold delta values (everything WAL said about some keys over an LSN range) or
//! images (keys materialised at one LSN, see [`Timeline::add_image_layer`]). They are kept
//! ordered by their newest LSN, so walking them newest-first visits each key's values in
//! descending LSN order.
//!
//! ```text
//! manifest (file "manifest", replaced by rename):
//!   magic u64 "NEONMF03" | history origin u64 | retained from u64 | durable lsn u64 |
//!   n u32 | n × (u16 len | file name) | crc32c u32
//! layer files: "delta-<first lsn>-<last lsn>", "image-<lsn>" (some keys),
//!              "fullimage-<lsn>" (every key), LSNs in hex, "-<n>" added to a name in use
//! ```

use super::key::Key;
use super::layer::{DeltaLayer, DeltaLayerWriter, LayerError};
use super::memlayer::MemLayer;
use super::value::Value;
use neon_types::Lsn;
use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

const MANIFEST: &str = "manifest";
const MANIFEST_MAGIC: u64 = u64::from_le_bytes(*b"NEONMF03");

/// Problems of the repository as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Layer(#[from] LayerError),
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

/// The history a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBounds {
    /// Where history began (the import or the first streamed record).
    pub origin: Lsn,
    /// The oldest LSN still readable: `origin` until garbage collection moves it forward.
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
    layers: RwLock<Layers>,
    /// Serialises flushes and manifest writes.
    flush_lock: Mutex<()>,
    origin: AtomicU64,
    oldest: AtomicU64,
    durable: AtomicU64,
    last: AtomicU64,
    /// Readers waiting for `last` to move.
    arrivals: (Mutex<()>, Condvar),
    waiting: AtomicUsize,
}

impl Timeline {
    /// Opens (or creates) the repository in `dir` for writing: the one writer also removes
    /// layer files an interrupted flush left behind.
    pub fn open(dir: &Path) -> Result<Timeline, RepoError> {
        Self::open_inner(dir, true)
    }

    /// Opens the repository in `dir` to read what is durable, beside a running writer.
    pub fn open_read_only(dir: &Path) -> Result<Timeline, RepoError> {
        Self::open_inner(dir, false)
    }

    fn open_inner(dir: &Path, writer: bool) -> Result<Timeline, RepoError> {
        let io = |source| RepoError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(MANIFEST);
        let manifest = match std::fs::read(&path) {
            Ok(b) => parse_manifest(&path, &b)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
            Err(source) => return Err(RepoError::Io { path, source }),
        };
        let mut files = Vec::new();
        for name in &manifest.names {
            files.push(Arc::new(DeltaLayer::open(&dir.join(name))?));
        }
        sort_layers(&mut files);
        // Files not in the manifest were written by a flush that never completed.
        for entry in std::fs::read_dir(dir).map_err(io)?.filter(|_| writer) {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_layer_name(&name) && !manifest.names.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Timeline {
            dir: dir.to_path_buf(),
            layers: RwLock::new(Layers { inmem: MemLayer::default(), frozen: None, files }),
            flush_lock: Mutex::new(()),
            origin: AtomicU64::new(manifest.origin.0),
            oldest: AtomicU64::new(manifest.oldest.0),
            durable: AtomicU64::new(manifest.durable.0),
            last: AtomicU64::new(manifest.durable.0),
            arrivals: (Mutex::new(()), Condvar::new()),
            waiting: AtomicUsize::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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
            oldest: self.history_start(),
            durable: self.durable_lsn(),
            last: self.last_lsn(),
        }
    }

    /// Records where history begins, once: the LSN the first record was read from.
    pub fn begin_history(&self, lsn: Lsn) {
        if self.origin.compare_exchange(0, lsn.0, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.oldest.store(lsn.0, Ordering::Release);
            self.advance(lsn);
        }
    }

    /// Makes reads before `from` out of history (a base backup's files are consistent only
    /// from its end LSN); recorded in the manifest at the next flush.
    pub fn restrict_history(&self, from: Lsn) {
        self.oldest.fetch_max(from.0, Ordering::AcqRel);
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
        let (upto, frozen) = {
            let mut l = self.write();
            let upto = self.last_lsn();
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
            (upto, frozen)
        };
        let written = if frozen.is_empty() {
            None
        } else {
            let (first, last) = frozen.lsn_range().unwrap_or((upto, upto));
            let name = self.fresh_name(format!("{DELTA_PREFIX}-{:016X}-{:016X}", first.0, last.0));
            let written = self.write_layer(&name, frozen.sorted());
            match written {
                Ok(layer) => Some(layer),
                Err(e) => {
                    // Nothing is lost: the values go back to memory for the next attempt.
                    let mut l = self.write();
                    let frozen = l.frozen.take().expect("frozen while flushing");
                    let newer = std::mem::take(&mut l.inmem);
                    l.inmem = Arc::try_unwrap(frozen).unwrap_or_else(|a| (*a).clone());
                    l.inmem.append(newer);
                    return Err(e);
                }
            }
        };
        let mut names = self.file_names();
        if let Some(layer) = &written {
            names.push(file_name(layer.path()));
        }
        self.write_manifest(self.history_start(), upto, &names)?;
        {
            let mut l = self.write();
            if let Some(layer) = written {
                l.files.push(Arc::new(layer));
                sort_layers(&mut l.files);
            }
            l.frozen = None;
        }
        self.durable.store(upto.0, Ordering::Release);
        self.wake_waiters();
        Ok(upto)
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
        Ok(DeltaLayer::open(&path)?)
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
        self.write_manifest(self.history_start(), self.durable_lsn(), &names)?;
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
        self.write_manifest(image_lsn, self.durable_lsn(), &keep)?;
        self.oldest.store(image_lsn.0, Ordering::Release);
        self.write().files.retain(|l| !doomed.iter().any(|d| Arc::ptr_eq(d, l)));
        let mut removed = Vec::new();
        for l in doomed {
            // Readers may still hold the map; unlinking a mapped file is safe on Linux.
            let _ = std::fs::remove_file(l.path());
            removed.push(l.path().to_path_buf());
        }
        Ok(removed)
    }

    /// Merges the oldest run of up to `run` consecutive small layer files (full images and
    /// files already larger than `max_bytes / run` excepted, at most `max_bytes` together)
    /// into one, when there are more than `keep` files: reads walk fewer files, and what they
    /// find is the same (the merged file holds every value of the run; where an image and a
    /// record share a key and LSN, the image, which already includes the record). Merged files
    /// are not merged again, so each value is rewritten once. Returns the merged file, if any.
    pub fn merge_layers(&self, keep: usize, run: usize, max_bytes: u64) -> Result<Option<PathBuf>, RepoError> {
        let _flushing = self.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        let files = self.layers();
        if files.len() <= keep || run < 2 {
            return Ok(None);
        }
        let small = max_bytes / run as u64;
        // The first run of mergeable files, oldest first. An image layer at the LSN the file
        // before it ends at stays with that file: it may neither start a run (the merged file
        // would begin where another ends) nor be left out of the run that file ends.
        let mergeable = |l: &Arc<DeltaLayer>| !is_full_image(l) && l.size_bytes() <= small;
        let at_end_of =
            |l: &Arc<DeltaLayer>, before: &Arc<DeltaLayer>| is_image(l) && l.lsn_range().0 == before.lsn_range().1;
        let mut chosen: Vec<Arc<DeltaLayer>> = Vec::new();
        for (i, l) in files.iter().enumerate() {
            let follows_its_file = i > 0 && at_end_of(l, &files[i - 1]);
            if !mergeable(l) || (chosen.is_empty() && follows_its_file) {
                if chosen.len() >= 2 {
                    break;
                }
                chosen.clear();
                continue;
            }
            chosen.push(l.clone());
            if chosen.len() >= run {
                match files.get(i + 1) {
                    Some(next) if at_end_of(next, l) && mergeable(next) => continue,
                    Some(next) if at_end_of(next, l) => {
                        chosen.pop();
                    }
                    _ => {}
                }
                break;
            }
        }
        if chosen.len() < 2 {
            return Ok(None);
        }
        let mut merged = MemLayer::default();
        let all = Key::default()..Key { kind: u8::MAX, ..Key::default() };
        for l in &chosen {
            l.for_each_in_range(all.clone(), |k, at, v| merged.put(k, at, v))?;
        }
        let (first, last) = merged.lsn_range().unwrap_or_default();
        let name = self.fresh_name(format!("{DELTA_PREFIX}-{:016X}-{:016X}", first.0, last.0));
        let layer = self.write_layer(&name, merged.sorted())?;
        let is_chosen = |l: &Arc<DeltaLayer>| chosen.iter().any(|c| Arc::ptr_eq(c, l));
        let mut names: Vec<String> = files.iter().filter(|l| !is_chosen(l)).map(|l| file_name(l.path())).collect();
        names.push(name);
        self.write_manifest(self.history_start(), self.durable_lsn(), &names)?;
        let path = layer.path().to_path_buf();
        {
            let mut l = self.write();
            l.files.retain(|f| !is_chosen(f));
            l.files.push(Arc::new(layer));
            sort_layers(&mut l.files);
        }
        for l in &chosen {
            let _ = std::fs::remove_file(l.path());
        }
        Ok(Some(path))
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

    fn file_names(&self) -> Vec<String> {
        self.read().files.iter().map(|l| file_name(l.path())).collect()
    }

    fn write_manifest(&self, oldest: Lsn, durable: Lsn, names: &[String]) -> Result<(), RepoError> {
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join("manifest.tmp");
        let io = |source| RepoError::Io { path: tmp.clone(), source };
        let mut b = Vec::new();
        b.extend_from_slice(&MANIFEST_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.origin.load(Ordering::Acquire).to_le_bytes());
        b.extend_from_slice(&oldest.0.to_le_bytes());
        b.extend_from_slice(&durable.0.to_le_bytes());
        b.extend_from_slice(&(names.len() as u32).to_le_bytes());
        for n in names {
            b.extend_from_slice(&(n.len() as u16).to_le_bytes());
            b.extend_from_slice(n.as_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&b).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// The values of `key` needed to rebuild it as of `lsn`, oldest first: back from the
    /// newest value at or before `lsn` to the first one that needs no earlier value.
    pub fn values_for(&self, key: Key, lsn: Lsn) -> Result<Vec<(Lsn, Value)>, RepoError> {
        let l = self.read();
        let mut newest_first: Vec<(Lsn, Value)> = Vec::new();
        let upto = Lsn(lsn.0.saturating_add(1));
        let mems = [Some(&l.inmem), l.frozen.as_deref()];
        for mem in mems.into_iter().flatten() {
            for (at, v) in mem.newest_first(&key, lsn) {
                newest_first.push((*at, v.clone()));
                if v.will_init() {
                    newest_first.reverse();
                    return Ok(newest_first);
                }
            }
        }
        for layer in l.files.iter().rev() {
            if layer.lsn_range().0 > lsn {
                continue;
            }
            for value in layer.newest_first(key, upto) {
                let (at, v) = value?;
                let init = v.will_init();
                newest_first.push((at, v));
                if init {
                    newest_first.reverse();
                    return Ok(newest_first);
                }
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The newest value at or before `lsn` of every key in `keys` that has one.
    pub fn latest_in_range(&self, keys: Range<Key>, lsn: Lsn) -> Result<BTreeMap<Key, (Lsn, Value)>, RepoError> {
        let l = self.read();
        let mut out: BTreeMap<Key, (Lsn, Value)> = BTreeMap::new();
        let mut offer = |k: Key, at: Lsn, v: Value| {
            if at <= lsn && out.get(&k).is_none_or(|(have, _)| *have < at) {
                out.insert(k, (at, v));
            }
        };
        for layer in &l.files {
            if layer.lsn_range().0 <= lsn {
                layer.for_each_in_range(keys.clone(), &mut offer)?;
            }
        }
        let mems = [l.frozen.as_deref(), Some(&l.inmem)];
        for mem in mems.into_iter().flatten() {
            for (k, at, v) in mem.in_range(keys.clone()) {
                offer(k, at, v.clone());
            }
        }
        Ok(out)
    }
}

const DELTA_PREFIX: &str = "delta";
const IMAGE_PREFIX: &str = "image";
const FULL_IMAGE_PREFIX: &str = "fullimage";

fn is_layer_name(name: &str) -> bool {
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

#[derive(Default)]
struct Manifest {
    origin: Lsn,
    oldest: Lsn,
    durable: Lsn,
    names: Vec<String>,
}

fn parse_manifest(path: &Path, b: &[u8]) -> Result<Manifest, RepoError> {
    let bad = |what: &str| RepoError::Manifest { path: path.to_path_buf(), what: what.to_string() };
    if b.len() < 40 {
        return Err(bad("too short"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
    if u64_at(0) != MANIFEST_MAGIC {
        return Err(bad("bad magic"));
    }
    let n = u32::from_le_bytes(body[32..36].try_into().expect("4 bytes")) as usize;
    let mut r = &body[36..];
    let mut names = Vec::new();
    for _ in 0..n {
        if r.len() < 2 {
            return Err(bad("truncated"));
        }
        let len = u16::from_le_bytes([r[0], r[1]]) as usize;
        let name = r.get(2..2 + len).ok_or_else(|| bad("truncated"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("file name is not UTF-8"))?;
        if !is_layer_name(name) || name.contains('/') {
            return Err(bad("not a layer file name"));
        }
        names.push(name.to_string());
        r = &r[2 + len..];
    }
    Ok(Manifest { origin: Lsn(u64_at(8)), oldest: Lsn(u64_at(16)), durable: Lsn(u64_at(24)), names })
}
