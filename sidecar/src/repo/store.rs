//! The store: the directory where the sidecar keeps one cluster's history, as PostgreSQL
//! timelines. It is set up once (`neon-sidecar init` or `attach`), which records the cluster's
//! identity; from then on it follows that cluster only, whatever server it is pointed at. It
//! is private to its OS user (every row of the database is in it) and has one writer at a time.
//!
//! ```text
//! <store>/                       0700; refused at open if group or others may enter it
//!   identity                     "NEONID01" | system identifier u64 | wal_segment_size u32 |
//!                                crc32c u32
//!   lock                         held (flock) by the one writer, and holding its PID
//!   current                      "NEONCT01" | timeline u32 | crc32c u32: the timeline followed
//!                                now, which reads without a timeline follow
//!   timelines/<timeline, 8 hex>/ one timeline (`repo::timeline`): manifest and layer files,
//!                                and `history`, PostgreSQL's history file of the timeline
//!                                (none for the first)
//! ```
//!
//! Every file is written to a temporary name, fsync'd and renamed.

use super::layer::LayerSource;
use super::timeline::{private_dir, write_durably, RepoError, Timeline};
use neon_types::Lsn;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub const IDENTITY: &str = "identity";
const IDENTITY_MAGIC: &[u8; 8] = b"NEONID01";
pub const CURRENT: &str = "current";
const CURRENT_MAGIC: &[u8; 8] = b"NEONCT01";
const LOCK: &str = "lock";
pub const TIMELINES: &str = "timelines";
/// PostgreSQL's history file of a timeline, inside its directory.
pub const HISTORY: &str = "history";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Timeline(#[from] RepoError),
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "store {dir} was never set up: make it with `neon-sidecar init` (a new cluster, or a stopped one) or \
         `neon-sidecar attach` (a running server)"
    )]
    NotSetUp { dir: PathBuf },
    #[error("store {dir} is set up already, for the cluster with system identifier {system_id}")]
    SetUp { dir: PathBuf, system_id: u64 },
    #[error(
        "store {dir} is readable by other users (mode {mode:o}), and it holds every row of the database: \
         make it private with `chmod 700 {dir}` (as its owner), then start again"
    )]
    NotPrivate { dir: PathBuf, mode: u32 },
    #[error("store {dir} is in use by another neon-sidecar (PID {pid}); one process writes a store at a time")]
    InUse { dir: PathBuf, pid: String },
    #[error("store {dir}: {what} is corrupt: {why}")]
    Corrupt { dir: PathBuf, what: String, why: String },
    #[error("store {dir} has no timeline {id} (it has {have:?})")]
    NoTimeline { dir: PathBuf, id: u32, have: Vec<u32> },
    #[error("store {dir}: timeline {id} exists already")]
    TimelineExists { dir: PathBuf, id: u32 },
    #[error(
        "store {dir} holds the history of the cluster with system identifier {ours}, not of this one ({theirs}: \
         another initdb); give it a store of its own"
    )]
    OtherCluster { dir: PathBuf, ours: u64, theirs: u64 },
}

/// Which cluster a store is for: fixed when it is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// `pg_control`'s system identifier (`IDENTIFY_SYSTEM`'s `systemid`).
    pub system_id: u64,
    pub wal_segment_size: u32,
}

impl Identity {
    fn encode(&self) -> Vec<u8> {
        let mut b = IDENTITY_MAGIC.to_vec();
        b.extend_from_slice(&self.system_id.to_le_bytes());
        b.extend_from_slice(&self.wal_segment_size.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Identity> {
        let (body, crc) = b.split_at_checked(20)?;
        if crc.len() != 4 || !body.starts_with(IDENTITY_MAGIC) || crc32c::crc32c(body).to_le_bytes() != crc {
            return None;
        }
        Some(Identity {
            system_id: u64::from_le_bytes(body[8..16].try_into().ok()?),
            wal_segment_size: u32::from_le_bytes(body[16..20].try_into().ok()?),
        })
    }

    /// Refuses a cluster that is not this store's.
    pub fn check(&self, dir: &Path, system_id: u64) -> Result<(), StoreError> {
        if system_id != self.system_id {
            return Err(StoreError::OtherCluster { dir: dir.to_path_buf(), ours: self.system_id, theirs: system_id });
        }
        Ok(())
    }
}

/// One cluster's history: its timelines, in a private directory.
pub struct Store {
    dir: PathBuf,
    identity: Identity,
    timelines: RwLock<BTreeMap<u32, Arc<Timeline>>>,
    current: AtomicU32,
    /// Counts changes of the current timeline (what reads without a timeline see).
    generation: AtomicU64,
    /// Told when the current timeline changes (the page cache, which must forget).
    on_switch: std::sync::Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    /// The writer's lock (`None`: opened to read beside a writer).
    _lock: Option<std::fs::File>,
    /// Where layer files not on local disk come from (with a remote store).
    source: Option<Arc<dyn LayerSource>>,
}

impl Store {
    /// Sets up the store in `dir` (new, or empty of history) for the cluster `identity`, with
    /// an empty first timeline `timeline`, current; locked for writing.
    pub fn create(dir: &Path, identity: Identity, timeline: u32) -> Result<Store, StoreError> {
        private_dir(dir).map_err(io(dir))?;
        // A directory made beforehand (mkdir with the usual umask) is made private too.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let lock = lock(dir)?;
        if let Some(have) = read_identity(dir)? {
            return Err(StoreError::SetUp { dir: dir.to_path_buf(), system_id: have.system_id });
        }
        // What a set-up that never finished (no identity) left behind goes — but not history:
        // a store whose identity file was lost is not to be wiped by a new `init`.
        if let Some(t) = timeline_dirs(&dir.join(TIMELINES))?.into_iter().find(|t| holds_layers(t)) {
            return Err(corrupt(
                dir,
                IDENTITY,
                &format!(
                    "is missing, yet {} holds history: restore the identity file, or remove the store to start \
                     afresh",
                    t.display()
                ),
            ));
        }
        match std::fs::remove_dir_all(dir.join(TIMELINES)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(dir)(e)),
            _ => {}
        }
        private_dir(&dir.join(TIMELINES)).map_err(io(dir))?;
        let t = Arc::new(Timeline::create(&timeline_dir(dir, timeline), timeline, None)?);
        write_current(dir, timeline)?;
        // Last: a store without an identity is not set up, whatever else it holds.
        write_durably(&dir.join("identity.tmp"), &dir.join(IDENTITY), &identity.encode()).map_err(io(dir))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            identity,
            timelines: RwLock::new(BTreeMap::from([(timeline, t)])),
            current: AtomicU32::new(timeline),
            generation: AtomicU64::new(0),
            on_switch: Default::default(),
            _lock: Some(lock),
            source: None,
        })
    }

    /// Opens the store in `dir` to write it (follow a compute, import WAL): it must be set up,
    /// private, and not in use.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_source(dir, true, None)
    }

    /// Opens the store in `dir` to read what is durable, beside a running writer.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        Self::open_with_source(dir, false, None)
    }

    /// [`Store::open`] (`writer`) or [`Store::open_read_only`], with layer files that are not
    /// on local disk (evicted, or never downloaded) fetched from `source` when read.
    pub fn open_with_source(
        dir: &Path,
        writer: bool,
        source: Option<Arc<dyn LayerSource>>,
    ) -> Result<Store, StoreError> {
        if !dir.is_dir() {
            return Err(StoreError::NotSetUp { dir: dir.to_path_buf() });
        }
        let identity = read_identity(dir)?.ok_or_else(|| StoreError::NotSetUp { dir: dir.to_path_buf() })?;
        check_private(dir)?;
        let lock = if writer { Some(lock(dir)?) } else { None };
        let mut timelines = BTreeMap::new();
        let tdir = dir.join(TIMELINES);
        for e in std::fs::read_dir(&tdir).map_err(io(&tdir))? {
            let e = e.map_err(io(&tdir))?;
            let Some(id) = e.file_name().to_str().and_then(|n| u32::from_str_radix(n, 16).ok()) else { continue };
            if !e.path().join("manifest").exists() {
                // A fork a crash interrupted before its manifest: not a timeline yet. Layer
                // files without a manifest are another matter: refused, not removed.
                if holds_layers(&e.path()) {
                    return Err(corrupt(
                        dir,
                        &format!("timeline directory {}", e.path().display()),
                        "has layer files but no manifest",
                    ));
                }
                if writer {
                    std::fs::remove_dir_all(e.path()).map_err(io(&e.path()))?;
                }
                continue;
            }
            let t = Timeline::open_with_source(&e.path(), writer, source.clone())?;
            if t.id() != id {
                return Err(corrupt(
                    dir,
                    &format!("timeline directory {}", e.path().display()),
                    "holds another timeline",
                ));
            }
            timelines.insert(id, Arc::new(t));
        }
        for t in timelines.values() {
            if let Some((parent, _)) = t.parent() {
                let p = timelines.get(&parent).ok_or_else(|| {
                    corrupt(dir, &format!("timeline {}", t.id()), &format!("its parent {parent} is missing"))
                })?;
                t.set_ancestor(p.clone());
                p.pin(t.parent().expect("a parent").1);
            }
        }
        let current = read_current(dir)?;
        if !timelines.contains_key(&current) {
            return Err(corrupt(dir, CURRENT, &format!("names timeline {current}, which the store does not have")));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            identity,
            timelines: RwLock::new(timelines),
            current: AtomicU32::new(current),
            generation: AtomicU64::new(0),
            on_switch: Default::default(),
            _lock: lock,
            source,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Undoes a set-up whose first import failed (nothing in it is history yet): without its
    /// identity the store is not set up, and what it made goes.
    pub fn abandon(self) -> Result<(), StoreError> {
        let path = self.dir.join(IDENTITY);
        std::fs::remove_file(&path).map_err(io(&path))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        let _ = std::fs::remove_file(self.dir.join(CURRENT));
        std::fs::remove_dir_all(self.dir.join(TIMELINES)).map_err(io(&self.dir))
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The timeline followed now: what reads that name no timeline read.
    pub fn current(&self) -> Arc<Timeline> {
        let id = self.current.load(Ordering::Acquire);
        self.timelines.read().unwrap_or_else(|p| p.into_inner())[&id].clone()
    }

    /// Timeline `id`, if the store has it.
    pub fn timeline(&self, id: u32) -> Option<Arc<Timeline>> {
        self.timelines.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Timeline `id`, or the current one for `None`.
    pub fn get(&self, id: Option<u32>) -> Result<Arc<Timeline>, StoreError> {
        match id {
            None => Ok(self.current()),
            Some(id) => self.timeline(id).ok_or_else(|| StoreError::NoTimeline {
                dir: self.dir.clone(),
                id,
                have: self.timelines().iter().map(|t| t.id()).collect(),
            }),
        }
    }

    /// Every timeline, by ID.
    pub fn timelines(&self) -> Vec<Arc<Timeline>> {
        self.timelines.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Layer files on local disk: how many and their bytes.
    pub fn local_layers(&self) -> (usize, u64) {
        let local = self.local_layer_list();
        (local.len(), local.iter().map(|l| l.size_bytes()).sum())
    }

    fn local_layer_list(&self) -> Vec<Arc<super::layer::DeltaLayer>> {
        self.timelines().iter().flat_map(|t| t.layers()).filter(|l| l.is_local()).collect()
    }

    /// Local disk as a cache of the remote store: evicts the least recently read layer files
    /// that are in the remote store (they have a stub) until the local ones take at most
    /// `limit` bytes, or none is left to evict. One read in the last `keep` stays even above
    /// the limit: a read walking more history than the limit holds (a scan, a base backup)
    /// would otherwise fetch the same files again after every eviction. The files and bytes
    /// evicted.
    pub fn evict_layers(&self, limit: u64, keep: std::time::Duration) -> Result<(usize, u64), StoreError> {
        let mut local = self.local_layer_list();
        let mut bytes: u64 = local.iter().map(|l| l.size_bytes()).sum();
        local.sort_by_key(|l| l.last_used());
        let (mut files, mut freed) = (0, 0);
        for l in local {
            if bytes <= limit {
                break;
            }
            if u128::from(l.idle_ms()) < keep.as_millis() {
                continue;
            }
            if l.evict().map_err(RepoError::from)? {
                bytes -= l.size_bytes();
                freed += l.size_bytes();
                files += 1;
            }
        }
        Ok((files, freed))
    }

    /// Counts changes of the current timeline: a cache of pages read without a timeline is
    /// stale once it moves.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a page of timeline `t` at `lsn` is the page readers without a timeline get:
    /// only those go into the shared page file, which backends read by page and LSN alone.
    /// `generation` is the store's when the read began: a switch of the followed timeline
    /// since then makes it another history.
    pub fn on_current_lineage(&self, t: &Arc<Timeline>, lsn: Lsn, generation: u64) -> bool {
        self.generation() == generation && Arc::ptr_eq(&t.owner_at(lsn), &self.current().owner_at(lsn))
    }

    /// Makes timeline `id`, forked from `parent` at `fork` (its history file's switch point),
    /// with PostgreSQL's history file `history`. The parent must hold history up to the fork.
    pub fn fork(&self, id: u32, parent: u32, fork: Lsn, history: &[u8]) -> Result<Arc<Timeline>, StoreError> {
        self.add_timeline(id, Some((parent, fork)), history)
    }

    /// Makes timeline `id` with no parent the store knows (its history starts with an import).
    pub fn fork_unrelated(&self, id: u32) -> Result<Arc<Timeline>, StoreError> {
        self.add_timeline(id, None, b"")
    }

    fn add_timeline(&self, id: u32, parent: Option<(u32, Lsn)>, history: &[u8]) -> Result<Arc<Timeline>, StoreError> {
        let mut timelines = self.timelines.write().unwrap_or_else(|p| p.into_inner());
        if timelines.contains_key(&id) {
            return Err(StoreError::TimelineExists { dir: self.dir.clone(), id });
        }
        let ancestor = match parent {
            Some((parent, _)) => Some(timelines.get(&parent).cloned().ok_or_else(|| StoreError::NoTimeline {
                dir: self.dir.clone(),
                id: parent,
                have: timelines.keys().copied().collect(),
            })?),
            None => None,
        };
        let dir = timeline_dir(&self.dir, id);
        // A directory a crash left half made (no manifest yet) is made again.
        if dir.is_dir() && !dir.join("manifest").exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        private_dir(&dir).map_err(io(&dir))?;
        if !history.is_empty() {
            write_durably(&dir.join("history.tmp"), &dir.join(HISTORY), history).map_err(io(&dir))?;
        }
        let t = Arc::new(Timeline::create(&dir, id, parent)?.with_source(self.source.clone()));
        if let Some(p) = ancestor {
            p.pin(t.parent().expect("a parent").1);
            t.set_ancestor(p);
        }
        timelines.insert(id, t.clone());
        Ok(t)
    }

    /// Makes `id` the current timeline (durably), and tells those listening.
    pub fn set_current(&self, id: u32) -> Result<(), StoreError> {
        self.get(Some(id))?;
        if self.current.load(Ordering::Acquire) != id {
            write_current(&self.dir, id)?;
            self.current.store(id, Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
            for f in self.on_switch.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                f();
            }
        }
        Ok(())
    }

    /// Calls `f` whenever the current timeline changes.
    pub fn on_switch(&self, f: Box<dyn Fn() + Send + Sync>) {
        self.on_switch.lock().unwrap_or_else(|p| p.into_inner()).push(f);
    }

    /// PostgreSQL's history file of timeline `id` (empty for a timeline without a parent).
    pub fn history_file(&self, id: u32) -> Result<Vec<u8>, StoreError> {
        let path = timeline_dir(&self.dir, id).join(HISTORY);
        match std::fs::read(&path) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(StoreError::Io { path, source: e }),
        }
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn corrupt(dir: &Path, what: &str, why: &str) -> StoreError {
    StoreError::Corrupt { dir: dir.to_path_buf(), what: what.to_string(), why: why.to_string() }
}

/// The timeline directories under `tdir` (none if it does not exist).
fn timeline_dirs(tdir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match std::fs::read_dir(tdir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(tdir)(e)),
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()),
    }
}

/// Whether a timeline directory holds layer files (history, whatever its manifest says).
fn holds_layers(tdir: &Path) -> bool {
    std::fs::read_dir(tdir)
        .map(|entries| {
            entries.flatten().any(|e| crate::repo::timeline::is_layer_name(&e.file_name().to_string_lossy()))
        })
        .unwrap_or(false)
}

/// Timeline `id`'s directory in the store in `dir`.
pub fn timeline_dir(dir: &Path, id: u32) -> PathBuf {
    dir.join(TIMELINES).join(format!("{id:08X}"))
}

/// Refuses a store directory group or others may enter.
fn check_private(dir: &Path) -> Result<(), StoreError> {
    let mode = std::fs::metadata(dir).map_err(io(dir))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::NotPrivate { dir: dir.to_path_buf(), mode });
    }
    Ok(())
}

/// Takes the writer's lock, recording our PID in it; fails naming the holder's.
fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    // SAFETY: flock on a descriptor we own; the lock goes when it is closed, however the
    // process ends.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let pid = pid.trim().to_string();
        return Err(StoreError::InUse {
            dir: dir.to_path_buf(),
            pid: if pid.is_empty() { "unknown".into() } else { pid },
        });
    }
    let me = std::process::id().to_string();
    f.set_len(0).and_then(|()| f.rewind()).and_then(|()| f.write_all(me.as_bytes())).map_err(io(&path))?;
    Ok(f)
}

fn read_identity(dir: &Path) -> Result<Option<Identity>, StoreError> {
    let path = dir.join(IDENTITY);
    match std::fs::read(&path) {
        Ok(b) => Identity::decode(&b).map(Some).ok_or_else(|| corrupt(dir, IDENTITY, "bad magic or checksum")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Io { path, source: e }),
    }
}

fn write_current(dir: &Path, id: u32) -> Result<(), StoreError> {
    let mut b = CURRENT_MAGIC.to_vec();
    b.extend_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    write_durably(&dir.join("current.tmp"), &dir.join(CURRENT), &b).map_err(io(dir))
}

fn read_current(dir: &Path) -> Result<u32, StoreError> {
    let path = dir.join(CURRENT);
    let b = std::fs::read(&path).map_err(io(&path))?;
    decode_current(&b).ok_or_else(|| corrupt(dir, CURRENT, "bad magic or checksum"))
}

/// The timeline a `current` file's bytes name, if they are one.
pub fn decode_current(b: &[u8]) -> Option<u32> {
    let ok = b.len() == 16 && b.starts_with(CURRENT_MAGIC) && crc32c::crc32c(&b[..12]).to_le_bytes() == b[12..];
    ok.then(|| u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::key::Key;
    use crate::repo::timeline::Gap;
    use crate::repo::value::Value;
    use bytes::Bytes;

    fn image(n: u8) -> Value {
        Value::Image(Bytes::from(vec![n; 16]))
    }

    #[test]
    fn set_up_once_private_locked_and_for_one_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        assert!(matches!(Store::open(&dir), Err(StoreError::NotSetUp { .. })));
        std::fs::create_dir(&dir).unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::NotSetUp { .. })));
        let id = Identity { system_id: 7, wal_segment_size: 16 << 20 };
        let s = Store::create(&dir, id, 1).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let e = Store::open(&dir).err().expect("locked");
        assert!(matches!(&e, StoreError::InUse { pid, .. } if *pid == std::process::id().to_string()), "{e}");
        drop(s);
        assert!(matches!(Store::create(&dir, id, 1), Err(StoreError::SetUp { system_id: 7, .. })));
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.identity(), id);
        assert!(s.identity().check(&dir, 7).is_ok());
        let e = s.identity().check(&dir, 8).unwrap_err().to_string();
        assert!(e.contains("system identifier 7") && e.contains("(8: another initdb)"), "{e}");
        drop(s);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = Store::open_read_only(&dir).err().expect("not private").to_string();
        assert!(e.contains("chmod 700"), "{e}");
    }

    #[test]
    fn a_fork_reads_its_parent_up_to_the_fork_and_never_after() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let s = Store::create(&dir, Identity { system_id: 1, wal_segment_size: 16 << 20 }, 1).unwrap();
        let (a, b) = (Key::meta(1, 1), Key::meta(1, 2));
        let t1 = s.current();
        t1.begin_history(Lsn(100));
        t1.put(a, Lsn(100), image(1));
        t1.put(b, Lsn(100), image(1));
        t1.put(a, Lsn(200), image(2));
        t1.put(a, Lsn(300), image(3));
        t1.advance(Lsn(300));
        t1.flush().unwrap();
        let t2 = s.fork(2, 1, Lsn(250), b"1\t0/FA\tno recovery target specified\n").unwrap();
        t2.put(b, Lsn(260), image(9));
        t2.advance(Lsn(270));
        s.set_current(2).unwrap();
        assert_eq!(s.generation(), 1);
        let newest = |t: &Timeline, k, l| t.values_for(k, Lsn(l)).unwrap().last().cloned().map(|(at, _)| at.0);
        // Before the fork, the parent's history; after, the child's own and the parent's as of
        // the fork, never the parent's later values.
        assert_eq!(newest(&t2, a, 150), Some(100));
        assert_eq!(newest(&t2, a, 270), Some(200));
        assert_eq!(newest(&t2, b, 270), Some(260));
        assert_eq!(newest(&t1, a, 300), Some(300));
        let range = t2.latest_in_range(Key::meta(1, 0)..Key::meta(2, 0), Lsn(270)).unwrap();
        assert_eq!(range.values().map(|(at, _)| at.0).collect::<Vec<_>>(), vec![200, 260]);
        assert!(t2.check_readable(Lsn(120)).is_ok() && t2.check_readable(Lsn(270)).is_ok());
        assert!(t2.check_readable(Lsn(280)).is_err() && t2.check_readable(Lsn(50)).is_err());
        assert_eq!(t2.bounds().oldest, Lsn(100));
        drop((t1, t2));
        drop(s);
        // All of it survives reopening, the lineage included.
        let s = Store::open_read_only(&dir).unwrap();
        assert_eq!(s.current().id(), 2);
        assert_eq!(s.current().parent(), Some((1, Lsn(250))));
        assert_eq!(s.history_file(2).unwrap(), b"1\t0/FA\tno recovery target specified\n");
        assert_eq!(newest(&s.current(), a, 250), Some(200));
        // A gap: refused inside, and after it nothing older than its base.
        let t1 = s.timeline(1).unwrap();
        t1.add_gap(Gap { from: Lsn(300), base: Lsn(400), to: Lsn(450) });
        t1.put(b, Lsn(400), image(4));
        t1.advance(Lsn(460));
        assert!(matches!(t1.check_readable(Lsn(420)), Err(crate::repo::timeline::Unreadable::InGap(_))));
        assert_eq!(newest(&t1, b, 460), Some(400));
        assert_eq!(newest(&t1, a, 460), None);
        assert_eq!(newest(&t1, a, 300), Some(300));
    }
}
