//! Branches: writable data directories as of any LSN that stock PostgreSQL 15 boots at once,
//! whatever the database's size, because relation pages are rebuilt only when read.
//!
//! * [`history`] — which blocks of a branch's relation files still come from history.
//! * [`fs`]      — the FUSE file system over the branch's overlay directory.
//! * [`read_ahead`] — history's pages rebuilt ahead of a sequential reader.
//!
//! A branch is, under `<shared dir>/branches/<id>/`:
//!
//! ```text
//! branch.meta   "name = value" lines: id, lsn, timeline (the branch's own PostgreSQL
//!               timeline), source (the store's timeline holding lsn), mount; then
//!               "crc = <crc32c of the lines before, hex>"
//! overlay/      the data directory's files: at creation what a base backup without relation
//!               pages holds (pg_control with a checkpoint at the LSN on a new timeline, its
//!               WAL segment and .history file, pg_xact, pg_multixact, relation maps,
//!               two-phase files, configuration) and the relation files' directories; each
//!               relation segment file appears (sparse, of its size at the LSN) when the
//!               server first looks it up; and whatever the branch's server writes
//! relations, blocks.log   see [`history`]
//! making/       relation files being made in the overlay (sized here, then linked there)
//! data/         the default mount point
//! ```
//!
//! A branch is made in `<id>.new/` and renamed into place when complete, so a crash leaves no
//! half branch (a leftover `.new` is removed at start). It pins its LSN in the store (no
//! retention or garbage collection removes what it reads) for as long as it exists. The
//! sidecar mounts its branches when it starts (clearing a mount a killed sidecar left behind;
//! one it cannot mount is listed with the reason, still pinned, and can be dropped) and
//! unmounts them when it stops; dropping a branch unmounts it and deletes its directory.
//! History's pages are read through the page service's cache, shared with `GetPage`.
//! The mount is private to the sidecar's OS user, which must be the branch server's (and to
//! root, where `/etc/fuse.conf` has `user_allow_other`).

pub mod fs;
pub mod history;
pub mod read_ahead;

use crate::basebackup::{self, Options, TimelineFiles};
use crate::page_cache::{PageCache, PENDING_WAIT};
use crate::repo::reconstruct::{self, GetPageError};
use crate::repo::store::Store;
use crate::repo::timeline::{private_dir, write_durably, Timeline};
use crate::walredo::WalRedoManager;
use history::HistoryFiles;
use neon_types::protocol::BranchInfo;
use neon_types::{BufferTag, Lsn, BLCKSZ};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    #[error("branch {id}: {path}: {source}")]
    Io { id: u32, path: PathBuf, source: std::io::Error },
    #[error("branch {id}: {source}")]
    History { id: u32, source: history::HistoryError },
    #[error("branch at {lsn}: {source}")]
    Basebackup { lsn: Lsn, source: basebackup::BasebackupError },
    #[error("branch {id}: {path}: {why}")]
    BadMeta { id: u32, path: PathBuf, why: String },
    #[error("there is no branch {id} (branches: {have})")]
    NoSuchBranch { id: u32, have: String },
    #[error("branch {id} is in use by PostgreSQL (postmaster pid {pid}): stop that server first")]
    InUse { id: u32, pid: i32 },
    #[error("branch {id}: mounting at {mount}: {source}")]
    Mount { id: u32, mount: PathBuf, source: std::io::Error },
    #[error("branch at {lsn}: mount point {mount}: {why}")]
    BadMountPoint { lsn: Lsn, mount: PathBuf, why: String },
    #[error("branch at {lsn}: this sidecar does not mount branches (it runs with --no-fuse)")]
    NoFuse { lsn: Lsn },
}

/// What `branch.meta` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchMeta {
    pub id: u32,
    pub lsn: Lsn,
    /// The branch's own PostgreSQL timeline.
    pub timeline: u32,
    /// The store's timeline whose lineage holds `lsn`.
    pub source: u32,
    pub mount: PathBuf,
}

const META_FILE: &str = "branch.meta";

impl BranchMeta {
    fn encode(&self) -> Vec<u8> {
        crate::conf_file::encode(&[
            ("id", self.id.to_string()),
            ("lsn", self.lsn.to_string()),
            ("timeline", self.timeline.to_string()),
            ("source", self.source.to_string()),
            ("mount", self.mount.display().to_string()),
        ])
    }

    fn read(id: u32, path: &Path) -> Result<BranchMeta, BranchError> {
        let bad = |why: String| BranchError::BadMeta { id, path: path.to_path_buf(), why };
        let text = std::fs::read_to_string(path).map_err(|source| BranchError::Io { id, path: path.into(), source })?;
        let s = crate::conf_file::decode(&text).map_err(bad)?;
        let meta = BranchMeta {
            id: s.parse("id").map_err(bad)?,
            lsn: s.parse("lsn").map_err(bad)?,
            timeline: s.parse("timeline").map_err(bad)?,
            source: s.parse("source").map_err(bad)?,
            mount: PathBuf::from(s.get("mount").map_err(bad)?),
        };
        if meta.id != id {
            return Err(bad(format!("says it is branch {}", meta.id)));
        }
        Ok(meta)
    }
}

/// Rebuilds history's pages for a branch, through the page service's cache and the redo pool
/// that serve `GetPage`; checksums stamped when the cluster has them.
struct HistoryPages {
    timeline: Arc<Timeline>,
    redo: Arc<dyn WalRedoManager>,
    lsn: Lsn,
    checksums: bool,
    shared: SharedCache,
}

/// What every branch's pages share with the page service: its cache of rebuilt pages (keyed
/// by page and LSN: a branch at L reads what `GetPage` at L filed, and files for it), which
/// holds pages of the followed timeline's lineage only, as the store tells.
#[derive(Clone)]
struct SharedCache {
    store: Arc<Store>,
    cache: Arc<PageCache>,
}

impl HistoryPages {
    /// `tags` rebuilt at the branch's LSN, as one batch, unstamped.
    fn rebuild(&self, tags: &[BufferTag]) -> Vec<Result<Box<[u8; BLCKSZ]>, String>> {
        let mut rels: BTreeMap<neon_types::RelTag, reconstruct::RelationAt> = BTreeMap::new();
        for tag in tags {
            if let std::collections::btree_map::Entry::Vacant(e) = rels.entry(tag.rel) {
                match reconstruct::relation_at(&self.timeline, tag.rel, self.lsn) {
                    Ok(r) => {
                        e.insert(r);
                    }
                    Err(err) => return tags.iter().map(|_| Err(err.to_string())).collect(),
                }
            }
        }
        // A panic in a FUSE callback would end one of the mount's few threads: it is an error
        // for these pages instead.
        let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            reconstruct::pages_of(&self.timeline, self.redo.as_ref(), tags.iter().map(|t| (&rels[&t.rel], t.blkno)))
        }));
        let Ok(pages) = rebuilt else {
            return tags.iter().map(|t| Err(format!("rebuilding {t} at {} panicked", self.lsn))).collect();
        };
        pages.into_iter().map(|page| page.map_err(|e: GetPageError| e.to_string())).collect()
    }
}

impl fs::PageSource for HistoryPages {
    fn pages(&self, tags: &[BufferTag]) -> Vec<Result<Box<[u8; BLCKSZ]>, String>> {
        let SharedCache { store, cache } = &self.shared;
        let generation = store.generation();
        let pages = if store.on_current_lineage(&self.timeline, self.lsn, generation) {
            let keys: Vec<_> = tags.iter().map(|t| (*t, self.lsn)).collect();
            cache.pages(
                &keys,
                PENDING_WAIT,
                |at: &[usize]| self.rebuild(&at.iter().map(|n| tags[*n]).collect::<Vec<_>>()),
                || store.on_current_lineage(&self.timeline, self.lsn, generation),
            )
        } else {
            self.rebuild(tags)
        };
        pages
            .into_iter()
            .zip(tags)
            .map(|(page, tag)| {
                let mut page = page?;
                if self.checksums {
                    basebackup::checksum::stamp(&mut page, tag.blkno);
                }
                Ok(page)
            })
            .collect()
    }
}

struct Live {
    meta: BranchMeta,
    history: Arc<HistoryFiles>,
    owner: Arc<Timeline>,
    source: Arc<HistoryPages>,
    session: Option<fuser::BackgroundSession>,
}

/// A branch on disk that the sidecar could not mount when it started: listed with the reason,
/// droppable, its history still pinned (when its metadata could be read) so that nothing it
/// needs is collected before it is mounted at a later start.
struct Unloaded {
    meta: Option<BranchMeta>,
    /// The store's timeline its pin is on.
    owner: Option<Arc<Timeline>>,
    why: String,
}

/// The sidecar's branches.
pub struct Branches {
    dir: PathBuf,
    live: Mutex<BTreeMap<u32, Live>>,
    unloaded: Mutex<BTreeMap<u32, Unloaded>>,
    /// Serialises creations (ids) and drops.
    changing: Mutex<()>,
    /// False: branches are kept (pinned, listed, dropped) but neither mounted nor made, where
    /// FUSE is not to be used.
    mounting: bool,
    shared: SharedCache,
}

fn io_err(id: u32, path: &Path) -> impl FnOnce(std::io::Error) -> BranchError + '_ {
    move |source| BranchError::Io { id, path: path.to_path_buf(), source }
}

impl Branches {
    /// The branches under `<shared>/branches`, mounted unless `mounting` is false (half-made
    /// ones removed).
    pub fn open(
        shared: &Path,
        store: &Arc<Store>,
        redo: &Arc<dyn WalRedoManager>,
        cache: &Arc<PageCache>,
        mounting: bool,
    ) -> Result<Branches, BranchError> {
        let dir = shared.join("branches");
        private_dir(&dir).map_err(io_err(0, &dir))?;
        let branches = Branches {
            dir: dir.clone(),
            live: Mutex::new(BTreeMap::new()),
            unloaded: Mutex::new(BTreeMap::new()),
            changing: Mutex::new(()),
            mounting,
            shared: SharedCache { store: store.clone(), cache: cache.clone() },
        };
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err(0, &dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".new") {
                let _ = std::fs::remove_dir_all(e.path());
            } else if let Ok(id) = name.parse::<u32>() {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        for id in ids {
            // One branch that cannot be mounted does not stop the sidecar (nor ingest): it
            // is reported (logged, and listed with the reason), and left on disk as it is.
            let loaded = match BranchMeta::read(id, &branches.branch_dir(id).join(META_FILE)) {
                Ok(m) => branches.load(store, redo, m.clone()).map_err(|(owner, e)| (Some(m), owner, e)),
                Err(e) => Err((None, None, e)),
            };
            match loaded {
                Ok(live) => {
                    branches.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
                }
                Err((meta, owner, e)) => {
                    eprintln!("neon-sidecar: branch {id} is not mounted: {e}");
                    let unloaded = Unloaded { meta, owner, why: e.to_string() };
                    branches.unloaded.lock().unwrap_or_else(|p| p.into_inner()).insert(id, unloaded);
                }
            }
        }
        Ok(branches)
    }

    fn branch_dir(&self, id: u32) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Opens a branch's state, pins its LSN and mounts it.
    /// When it cannot be mounted, the pin stays (if it was taken: its timeline is returned),
    /// for the branch stays on disk, to be dropped or mounted at a later start.
    fn load(
        &self,
        store: &Store,
        redo: &Arc<dyn WalRedoManager>,
        meta: BranchMeta,
    ) -> Result<Live, (Option<Arc<Timeline>>, BranchError)> {
        let timeline = store.timeline(meta.source).ok_or_else(|| {
            let why = format!("the store has no timeline {}", meta.source);
            (None, BranchError::BadMeta { id: meta.id, path: self.branch_dir(meta.id).join(META_FILE), why })
        })?;
        let owner = timeline.owner_at(meta.lsn);
        owner.pin(meta.lsn);
        self.attach(redo, timeline, meta, false).map_err(|e| (Some(owner), e))
    }

    /// Opens the state of a branch whose LSN the caller has pinned on `timeline`'s lineage, and
    /// mounts it (`new`: made just now, its catalogs warmed for the server about to start).
    fn attach(
        &self,
        redo: &Arc<dyn WalRedoManager>,
        timeline: Arc<Timeline>,
        meta: BranchMeta,
        new: bool,
    ) -> Result<Live, BranchError> {
        let (id, dir) = (meta.id, self.branch_dir(meta.id));
        let history = Arc::new(
            HistoryFiles::open(&dir, &dir.join("overlay")).map_err(|source| BranchError::History { id, source })?,
        );
        let owner = timeline.owner_at(meta.lsn);
        let checksums = crate::repo::meta::compute_has_checksums(&timeline);
        let source = Arc::new(HistoryPages {
            timeline,
            redo: redo.clone(),
            lsn: meta.lsn,
            checksums,
            shared: self.shared.clone(),
        });
        let mut live = Live { meta, history, owner, source, session: None };
        self.mount(&mut live, new)?;
        Ok(live)
    }

    fn mount(&self, live: &mut Live, warm: bool) -> Result<(), BranchError> {
        if !self.mounting {
            return Ok(());
        }
        let source = live.source.clone();
        let (id, mount) = (live.meta.id, live.meta.mount.clone());
        let mount_err = |source| BranchError::Mount { id, mount: mount.clone(), source };
        clear_stale_mount(&mount, id);
        private_dir(&mount).map_err(mount_err)?;
        let fs = fs::BranchFs::new(
            format!("{id}"),
            self.branch_dir(id).join("overlay"),
            live.history.clone(),
            source as Arc<dyn fs::PageSource>,
        );
        if warm {
            fs.warm_catalogs();
        }
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("neon-branch-{id}")),
            fuser::MountOption::Subtype("neon".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoDev,
        ];
        // Root may enter it too (to back it up, or clean up), where FUSE allows that.
        if allow_root() {
            config.acl = fuser::SessionACL::RootAndOwner;
        }
        config.n_threads = Some(4);
        config.clone_fd = true;
        live.session = Some(fuser::spawn_mount(fs, &mount, &config).map_err(mount_err)?);
        Ok(())
    }

    /// Makes a branch as of `lsn` on timeline `t` (whose lineage holds it, durably), mounted
    /// at `mount` (default: `<branch>/data`).
    pub fn create(
        &self,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &Arc<dyn WalRedoManager>,
        lsn: Lsn,
        mount: Option<PathBuf>,
    ) -> Result<BranchInfo, BranchError> {
        if !self.mounting {
            return Err(BranchError::NoFuse { lsn });
        }
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        // Past every branch, live or only on disk (one that failed to load keeps its id).
        let on_disk = highest_id_in(&self.dir).map_err(io_err(0, &self.dir))?;
        let id = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.keys().copied().chain(on_disk).max().map_or(1, |m| m + 1)
        };
        let mount = match mount {
            Some(m) => {
                let bad = |why: &str| BranchError::BadMountPoint { lsn, mount: m.clone(), why: why.to_string() };
                if !m.is_absolute() {
                    return Err(bad("must be an absolute path"));
                }
                if m.to_str().is_none_or(|p| p.chars().any(char::is_control)) {
                    return Err(bad("must be UTF-8 without control characters"));
                }
                if m.starts_with(&self.dir) {
                    return Err(bad("is inside the sidecar's branches directory"));
                }
                if let Some(other) = self.list().iter().find(|b| Path::new(&b.path) == m) {
                    return Err(bad(&format!("is the mount point of branch {}", other.id)));
                }
                if let Ok(mut entries) = std::fs::read_dir(&m) {
                    if entries.next().is_some() {
                        return Err(bad("is not empty"));
                    }
                }
                m
            }
            None => self.branch_dir(id).join("data"),
        };
        // Pinned before anything is read, and then checked to be (still) in history: garbage
        // collection cannot take what the branch is being made of.
        let owner = t.owner_at(lsn);
        owner.pin(lsn);
        let made = crate::repo::reconstruct::check_in_history(t, lsn)
            .map_err(|source| BranchError::Basebackup {
                lsn,
                source: basebackup::BasebackupError::Page { lsn, source },
            })
            .and_then(|()| self.make(store, t, redo, lsn, id, mount));
        let (meta, dir) = match made {
            Ok(made) => made,
            Err(e) => {
                owner.unpin(lsn);
                return Err(e);
            }
        };
        let live = match self.attach(redo, t.clone(), meta, true) {
            Ok(live) => live,
            Err(e) => {
                owner.unpin(lsn);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let info = info(&live);
        self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
        Ok(info)
    }

    /// Builds branch `id` in `<id>.new` and renames it into place; its metadata and directory.
    fn make(
        &self,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &Arc<dyn WalRedoManager>,
        lsn: Lsn,
        id: u32,
        mount: PathBuf,
    ) -> Result<(BranchMeta, PathBuf), BranchError> {
        let building = self.dir.join(format!("{id}.new"));
        let _ = std::fs::remove_dir_all(&building);
        let overlay = building.join("overlay");
        private_dir(&overlay).map_err(io_err(id, &overlay))?;
        let meta = match self.build(store, t, redo, lsn, id, &building, &overlay, mount) {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&building);
                return Err(e);
            }
        };
        let dir = self.branch_dir(id);
        std::fs::rename(&building, &dir).map_err(io_err(id, &dir))?;
        sync_dir(&self.dir).map_err(io_err(id, &self.dir))?;
        Ok((meta, dir))
    }

    /// Writes the overlay and state of a new branch into `building`.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &self,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &Arc<dyn WalRedoManager>,
        lsn: Lsn,
        id: u32,
        building: &Path,
        overlay: &Path,
        mount: PathBuf,
    ) -> Result<BranchMeta, BranchError> {
        let bb = |source| BranchError::Basebackup { lsn, source };
        let files = TimelineFiles::of(store, t, lsn).map_err(|e| bb(e.into()))?;
        let opts = Options {
            relation_pages: false,
            workers: 1,
            new_timeline: true,
            progress_every: std::time::Duration::from_secs(3600),
            tablespace_map: Default::default(),
        };
        // Unpacked as it is written (its errors name the overlay).
        let unpack = crate::replication::tar_reader::TarUnpacker::new(overlay);
        let (_, stats) =
            basebackup::write_basebackup(t, redo.as_ref(), lsn, &files, opts, unpack, &mut |_: &_| {}).map_err(bb)?;
        // Only time is lost without it: said, not fatal.
        let pg_wal = overlay.join("pg_wal");
        if let Err(e) = preallocate_next_segment(&pg_wal) {
            eprintln!("neon-sidecar: branch {id}: the next WAL segment is not preallocated: {}: {e}", pg_wal.display());
        }
        // Relation segment files: listed, and made in the overlay when first looked up (see
        // `history`); only their directories now.
        let mut segments = Vec::new();
        let dbs = crate::repo::meta::list_databases(t, lsn).map_err(|e| bb(e.into()))?;
        for db in std::iter::once(0).chain(dbs.iter().map(|d| d.dbnode)) {
            let rels = crate::repo::meta::list_relations(t, db, lsn).map_err(|e| bb(e.into()))?;
            segments.extend(basebackup::relation_segments(&rels));
        }
        let dirs: std::collections::BTreeSet<&Path> =
            segments.iter().filter_map(|s| Path::new(&s.path).parent()).collect();
        for dir in dirs {
            let path = overlay.join(dir);
            private_dir(&path).map_err(io_err(id, &path))?;
        }
        HistoryFiles::create(building, &segments).map_err(|source| BranchError::History { id, source })?;
        let meta = BranchMeta { id, lsn, timeline: stats.timeline, source: t.owner_at(lsn).id(), mount };
        // Everything written so far, durable at once (the files are many and small).
        sync_fs(overlay).map_err(io_err(id, overlay))?;
        let path = building.join(META_FILE);
        write_durably(&building.join("branch.meta.tmp"), &path, &meta.encode()).map_err(io_err(id, &path))?;
        Ok(meta)
    }

    /// Whether branch `id` exists: loaded, or on disk though it could not be loaded (a mount
    /// that failed is not a branch gone).
    pub fn exists(&self, id: u32) -> bool {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
            || self.branch_dir(id).join(META_FILE).exists()
    }

    /// Every branch, by id: those mounted, and those the sidecar could not mount (with why).
    pub fn list(&self) -> Vec<BranchInfo> {
        let mut all: Vec<BranchInfo> = self.live.lock().unwrap_or_else(|p| p.into_inner()).values().map(info).collect();
        let unloaded = self.unloaded.lock().unwrap_or_else(|p| p.into_inner());
        all.extend(unloaded.iter().map(|(id, u)| unloaded_info(*id, u)));
        all.sort_by_key(|b| b.id);
        all
    }

    /// Deletes branch `id`, which could not be mounted (refused while a server runs on it): its
    /// directory, its mount point if it was one of the user's (when empty), and its pin.
    fn drop_unloaded(&self, id: u32) -> Option<Result<BranchInfo, BranchError>> {
        // Out of the list while its files go (slow: the lock is not held meanwhile), back in if
        // they cannot.
        let u = self.unloaded.lock().unwrap_or_else(|p| p.into_inner()).remove(&id)?;
        let put_back = |u: Unloaded, e: BranchError| {
            self.unloaded.lock().unwrap_or_else(|p| p.into_inner()).insert(id, u);
            Some(Err(e))
        };
        let info = unloaded_info(id, &u);
        let dir = self.branch_dir(id);
        if let Some(pid) = running_postmaster(&dir.join("overlay")) {
            return put_back(u, BranchError::InUse { id, pid });
        }
        // Mounts a killed sidecar left behind.
        clear_stale_mount(&dir.join("data"), id);
        if let Some(m) = &u.meta {
            clear_stale_mount(&m.mount, id);
        }
        let doomed = self.dir.join(format!("{id}.new"));
        if let Err(e) = std::fs::rename(&dir, &doomed) {
            return put_back(u, io_err(id, &dir)(e));
        }
        if let (Some(owner), Some(m)) = (&u.owner, &u.meta) {
            owner.unpin(m.lsn);
        }
        Some(self.delete(id, &doomed, u.meta.as_ref().map(|m| m.mount.as_path())).map(|()| info))
    }

    /// Deletes the directory of branch `id`, renamed to `doomed`, and its mount point if that
    /// was one of the user's (when empty).
    fn delete(&self, id: u32, doomed: &Path, mount: Option<&Path>) -> Result<(), BranchError> {
        std::fs::remove_dir_all(doomed).map_err(io_err(id, doomed))?;
        if let Some(m) = mount.filter(|m| *m != self.branch_dir(id).join("data")) {
            let _ = std::fs::remove_dir(m);
        }
        Ok(())
    }

    /// Unmounts branch `id` and deletes it (refused while a server runs on it).
    pub fn drop_branch(&self, id: u32) -> Result<BranchInfo, BranchError> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(dropped) = self.drop_unloaded(id) {
            return dropped;
        }
        let mut live = {
            let mut all = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let unloaded = self.unloaded.lock().unwrap_or_else(|p| p.into_inner());
            let mut ids: Vec<u32> = all.keys().chain(unloaded.keys()).copied().collect();
            drop(unloaded);
            ids.sort_unstable();
            let have = ids.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
            let Some(live) = all.remove(&id) else {
                return Err(BranchError::NoSuchBranch { id, have: if have.is_empty() { "none".into() } else { have } });
            };
            if let Some(pid) = running_postmaster(&self.branch_dir(id).join("overlay")) {
                all.insert(id, live);
                return Err(BranchError::InUse { id, pid });
            }
            live
        };
        let info = info(&live);
        // Out of the way first (a crash from here on leaves a `.new`, removed at the next
        // start): if that fails, the branch stays as it was.
        let dir = self.branch_dir(id);
        let doomed = self.dir.join(format!("{id}.new"));
        unmount(&live.meta.mount);
        drop(live.session.take());
        if let Err(e) = std::fs::rename(&dir, &doomed) {
            // It stays as it was: mounted again, pinned, listed.
            let remounted = self.mount(&mut live, false);
            self.live.lock().unwrap_or_else(|p| p.into_inner()).insert(id, live);
            remounted?;
            return Err(io_err(id, &dir)(e));
        }
        live.owner.unpin(live.meta.lsn);
        self.delete(id, &doomed, Some(&live.meta.mount))?;
        Ok(info)
    }

    /// Unmounts every branch (the sidecar stops; they are mounted again when it starts).
    pub fn unmount_all(&self) {
        let mut all = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for live in all.values_mut() {
            // First writes not yet journalled are made durable and journalled (their files
            // synced first).
            let overlay = self.branch_dir(live.meta.id).join("overlay");
            if let Err(e) = live.history.sync_all(&overlay) {
                eprintln!("neon-sidecar: branch {}: journalling its writes at stop: {e}", live.meta.id);
            }
            unmount(&live.meta.mount);
            drop(live.session.take());
        }
    }
}

fn info(live: &Live) -> BranchInfo {
    let (files, written) = live.history.counts();
    BranchInfo {
        id: live.meta.id,
        lsn: live.meta.lsn,
        timeline: live.meta.timeline,
        source: live.owner.id(),
        history_files: files as u32,
        written_blocks: written,
        path: live.meta.mount.display().to_string(),
        problem: String::new(),
    }
}

fn unloaded_info(id: u32, u: &Unloaded) -> BranchInfo {
    let m = u.meta.as_ref();
    BranchInfo {
        id,
        lsn: m.map_or(Lsn(0), |m| m.lsn),
        timeline: m.map_or(0, |m| m.timeline),
        // (The timeline holding its pin, as for a mounted branch.)
        source: u.owner.as_ref().map_or(m.map_or(0, |m| m.source), |o| o.id()),
        history_files: 0,
        written_blocks: 0,
        path: m.map_or(String::new(), |m| m.mount.display().to_string()),
        problem: format!("not mounted: {}", u.why),
    }
}

/// Makes the WAL segment after the last in `pg_wal` (the checkpoint's), as a sparse file of its
/// size. PostgreSQL's start-up preallocates that segment when its checkpoint lies in the last
/// quarter of its segment — 16 MB of zeros written through the mount, half the branch server's
/// start — but takes a file already there as it is; a hole reads as zeros, as the bytes of a
/// segment PostgreSQL filled itself do.
fn preallocate_next_segment(pg_wal: &Path) -> std::io::Result<()> {
    use crate::wal::segment::SegmentId;
    use std::os::unix::fs::OpenOptionsExt;
    let mut last: Option<(SegmentId, u32)> = None;
    for e in std::fs::read_dir(pg_wal)? {
        let e = e?;
        let size = u32::try_from(e.metadata()?.len()).unwrap_or(0);
        if let Some(id) = e.file_name().to_str().filter(|_| size > 0).and_then(|n| SegmentId::parse(n, size)) {
            if last.is_none_or(|(l, _)| id.segno > l.segno) {
                last = Some((id, size));
            }
        }
    }
    let Some((last, seg_size)) = last else {
        return Err(std::io::Error::other("no WAL segment there"));
    };
    let next = SegmentId { tli: last.tli, segno: last.segno + 1 };
    let path = pg_wal.join(next.file_name(seg_size));
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.set_len(u64::from(seg_size))
}

/// The pid of a live postmaster whose `postmaster.pid` is in `datadir`.
fn running_postmaster(datadir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(datadir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    // SAFETY: kill with signal 0 only checks that the process exists (EPERM: it does, as
    // another user's).
    let alive =
        unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    (pid > 0 && alive).then_some(pid)
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// The highest id among `dir`'s entries named `<id>` or `<id>.new` (branches, past servers).
pub(crate) fn highest_id_in(dir: &Path) -> std::io::Result<Option<u32>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.trim_end_matches(".new").parse::<u32>().ok())
        .max())
}

/// `syncfs` of the file system holding `path`.
pub(crate) fn sync_fs(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    // SAFETY: `f` is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the FUSE mount at `mount` (lazily: a file still open keeps the connection until
/// it is closed). As root directly; otherwise through `fusermount3`, as FUSE requires.
pub fn unmount(mount: &Path) {
    let Ok(c) = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(mount.as_os_str())) else { return };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return;
    }
    let _ = std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(mount)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Whether the mount may let root in besides the owner: as root, or where `/etc/fuse.conf`
/// has `user_allow_other` (which `fusermount3` requires for `allow_root`).
fn allow_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root || std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|c| c.lines().any(|l| l.trim() == "user_allow_other"))
}

/// A mount a killed sidecar left is detached. Known by the mount table (and by an access
/// failing with `ENOTCONN`): for a second after the kill the kernel may still answer from its
/// attribute cache, and only a change then fails.
fn clear_stale_mount(mount: &Path, id: u32) {
    let dead = std::fs::metadata(mount).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
    if dead || branch_mounted_at(mount, id) {
        unmount(mount);
    }
}

/// Whether branch `id`'s file system is mounted at `mount`: a FUSE mount (`fuse` when mounted
/// by root, `fuse.neon` through `fusermount3`) named `neon-branch-<id>`, at the path the kernel
/// resolves `mount` to (another branch's mount there is not this one's to clear).
fn branch_mounted_at(mount: &Path, id: u32) -> bool {
    let resolved = match (mount.parent().and_then(|p| p.canonicalize().ok()), mount.file_name()) {
        (Some(parent), Some(name)) => parent.join(name),
        _ => mount.to_path_buf(),
    };
    let Ok(table) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    table.lines().any(|line| {
        let mut fields = line.split(' ');
        let (Some(source), Some(point), Some(kind)) = (fields.next(), fields.next(), fields.next()) else {
            return false;
        };
        (kind == "fuse" || kind.starts_with("fuse."))
            && source == format!("neon-branch-{id}")
            && Path::new(&unescape_mount_field(point)) == resolved
    })
}

/// A `/proc/self/mounts` field with its octal escapes (`\040` for a space) undone.
fn unescape_mount_field(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code =
            b.get(i + 1..i + 4).and_then(|d| std::str::from_utf8(d).ok()).and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(c) if b[i] == b'\\' => {
                out.push(c);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_table_fields_are_unescaped() {
        assert_eq!(super::unescape_mount_field(r"/tmp/a\040b\134c/data"), r"/tmp/a b\c/data");
        assert_eq!(super::unescape_mount_field(r"/tmp/plain\0"), r"/tmp/plain\0");
    }
}
