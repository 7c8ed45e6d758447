//! The past as a running server: a read-only PostgreSQL the sidecar runs on a branch at an LSN
//! (or, where branches cannot be mounted, on a copy: a full base backup unpacked), for the
//! compute's `neon_as_of` to import as foreign tables (`postgres_fdw`).
//!
//! * [`postmaster`] — starting and stopping one server's postmaster, and one a killed sidecar
//!   left behind.
//! * [`front`]      — the socket the compute connects to, in front of the postmaster's own:
//!   the server is started when a connection arrives and stopped when it is idle.
//!
//! Each past server has its own id and directory, private (0700) to the sidecar's OS user,
//! which is the compute's:
//!
//! ```text
//! <shared dir>/past/<id>/
//!   past.conf        (conf_file) id, lsn, branch (0: a copy), datadir, idle_ms
//!   .s.PGSQL.5432    the front door (host = this directory, port 5432, for libpq)
//!   server/          the postmaster's own socket
//!   pg_hba.conf      `local all all trust`: only this user can reach the sockets
//!   server.log, pid  the postmaster's log (0600) and its pid while it runs
//!   data/            a copy's data directory (a branch's is its mount)
//! ```
//!
//! Ids are never reused (`past/next-id` holds the next). A server is made in `<id>.new/` and
//! renamed into place when complete; a leftover `.new` is removed at start, with the branch its
//! `past.conf` names (a sidecar killed before that file was written leaves its branch, listed
//! among the branches, to be dropped as one). No password exists anywhere; every
//! transaction is read-only (`default_transaction_read_only`), and the compute's settings that
//! do not belong on a copy (the `neon` library, archiving, its addresses) are overridden. The
//! sidecar stops every postmaster when it stops and keeps the servers: when it starts again it
//! stops any postmaster a killed sidecar left running, opens the doors, and each server starts
//! on its next connection. A server whose branch is gone is removed then; one whose branch is
//! not mounted (a sidecar run with `--no-fuse`) is kept, and fails to start until it is.

pub mod front;
pub mod postmaster;

use crate::basebackup::{self, Options, TimelineFiles};
use crate::branch::{BranchError, Branches};
use crate::repo::store::Store;
use crate::repo::timeline::{private_dir, write_durably, Timeline};
use crate::walredo::WalRedoManager;
use neon_types::protocol::PastInfo;
use neon_types::Lsn;
use postmaster::{Layout, PORT};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONF_FILE: &str = "past.conf";
/// In `<shared dir>/past/`: the next id to give (ids are never reused, so a foreign server
/// left naming a removed one can never reach another's past).
const NEXT_ID_FILE: &str = "next-id";

#[derive(Debug, thiserror::Error)]
pub enum PastError {
    #[error(transparent)]
    Branch(#[from] BranchError),
    #[error("past server {id}: {what} {path}: {source}")]
    Io { id: u32, what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("past server {id}: copying the past at {lsn}: {source}")]
    Copy { id: u32, lsn: Lsn, source: basebackup::BasebackupError },
    #[error("past server {id} at {lsn} did not start: {why}; its log ends:\n{log}")]
    Start { id: u32, lsn: Lsn, why: String, log: String },
    #[error("past server {id}: {path}: {why}")]
    BadConf { id: u32, path: PathBuf, why: String },
    #[error("there is no past server {id} (past servers: {have})")]
    NoSuch { id: u32, have: String },
}

/// What `past.conf` records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PastConf {
    id: u32,
    lsn: Lsn,
    /// `None`: the server runs on a copy in `data/`.
    branch: Option<u32>,
    datadir: PathBuf,
    /// Stop after this long unused; 0: never.
    idle_ms: u32,
}

impl PastConf {
    fn encode(&self) -> Vec<u8> {
        crate::conf_file::encode(&[
            ("id", self.id.to_string()),
            ("lsn", self.lsn.to_string()),
            ("branch", self.branch.unwrap_or(0).to_string()),
            ("datadir", self.datadir.display().to_string()),
            ("idle_ms", self.idle_ms.to_string()),
        ])
    }

    fn read(id: u32, path: &Path) -> Result<PastConf, PastError> {
        let bad = |why: String| PastError::BadConf { id, path: path.to_path_buf(), why };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let s = crate::conf_file::decode(&text).map_err(bad)?;
        let conf = PastConf {
            id: s.parse("id").map_err(bad)?,
            lsn: s.parse("lsn").map_err(bad)?,
            branch: Some(s.parse::<u32>("branch").map_err(bad)?).filter(|b| *b != 0),
            datadir: PathBuf::from(s.get("datadir").map_err(bad)?),
            idle_ms: s.parse("idle_ms").map_err(bad)?,
        };
        if conf.id != id {
            return Err(bad(format!("says it is past server {}", conf.id)));
        }
        Ok(conf)
    }
}

fn start_error(conf: &PastConf, layout: &Layout, why: String) -> PastError {
    PastError::Start { id: conf.id, lsn: conf.lsn, why, log: postmaster::log_tail(layout) }
}

/// Whether `child` has not exited.
fn alive(child: &mut Child) -> bool {
    matches!(child.try_wait(), Ok(None))
}

/// One past server: its postmaster, while it runs.
struct Server {
    conf: PastConf,
    layout: Layout,
    pg_bin_dir: PathBuf,
    postmaster: Mutex<Option<Child>>,
}

impl Server {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.postmaster.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn info(&self) -> PastInfo {
        PastInfo {
            id: self.conf.id,
            branch: self.conf.branch,
            lsn: self.conf.lsn,
            socket_dir: self.layout.dir.display().to_string(),
            port: PORT,
            running: front::Backend::running(self),
        }
    }
}

impl front::Backend for Server {
    fn ensure_running(&self) -> Result<PathBuf, String> {
        let mut pm = self.lock();
        // One that died (crashed, or was killed) is started again.
        if !pm.as_mut().is_some_and(alive) {
            let started = postmaster::start(&self.pg_bin_dir, &self.layout);
            *pm = Some(started.map_err(|why| start_error(&self.conf, &self.layout, why).to_string())?);
        }
        Ok(self.layout.socket())
    }

    fn running(&self) -> bool {
        let mut pm = match self.postmaster.try_lock() {
            Ok(pm) => pm,
            // Being started or stopped: reported as running, not waited for.
            Err(std::sync::TryLockError::WouldBlock) => return true,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        };
        pm.as_mut().is_some_and(alive)
    }

    fn stop(&self) {
        if let Some(mut child) = self.lock().take() {
            postmaster::stop(&mut child, &self.layout);
        }
    }

    fn name(&self) -> String {
        format!("past server {} at {}", self.conf.id, self.conf.lsn)
    }
}

struct Served {
    server: Arc<Server>,
    /// Dropped (closed) before the server stops.
    door: Option<front::FrontDoor>,
}

impl Served {
    /// Closes the door, then stops the postmaster.
    fn stop(&mut self) {
        drop(self.door.take());
        front::Backend::stop(self.server.as_ref());
    }
}

/// The sidecar's past servers, by id.
pub struct PastServers {
    dir: PathBuf,
    pg_bin_dir: PathBuf,
    servers: Mutex<BTreeMap<u32, Served>>,
    /// Serialises the choice of ids.
    changing: Mutex<()>,
}

/// Stops every postmaster a killed sidecar left running on a past server under `<shared>/past`:
/// before the branches are mounted again, which a process inside a dead mount can prevent.
pub fn stop_orphans(shared: &Path) {
    let Ok(entries) = std::fs::read_dir(shared.join("past")) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(id) = name.trim_end_matches(".new").parse::<u32>() else { continue };
        if let Ok(conf) = PastConf::read(id, &e.path().join(CONF_FILE)) {
            postmaster::stop_orphan(&Layout { dir: e.path(), datadir: conf.datadir });
        }
    }
}

impl PastServers {
    /// The past servers under `<shared>/past`, their doors open (half-made ones, and those
    /// whose branch is gone, removed). Call [`stop_orphans`] first.
    pub fn open(shared: &Path, pg_bin_dir: PathBuf, branches: &Branches) -> std::io::Result<PastServers> {
        let dir = shared.join("past");
        private_dir(&dir)?;
        let past = PastServers { dir, pg_bin_dir, servers: Mutex::new(BTreeMap::new()), changing: Mutex::new(()) };
        for e in std::fs::read_dir(&past.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(id) = name.trim_end_matches(".new").parse::<u32>() else { continue };
            let conf = PastConf::read(id, &e.path().join(CONF_FILE));
            if name.ends_with(".new") {
                if let Ok(PastConf { branch: Some(b), .. }) = conf {
                    let _ = branches.drop_branch(b);
                }
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            let conf = match conf {
                Ok(c) => c,
                Err(err) => {
                    eprintln!("neon-sidecar: past server {id} is left as it is: {err}");
                    continue;
                }
            };
            let layout = Layout { dir: e.path(), datadir: conf.datadir.clone() };
            if conf.branch.is_some_and(|b| !branches.exists(b)) {
                eprintln!(
                    "neon-sidecar: removing past server {id}: its branch {} is gone",
                    conf.branch.unwrap_or_default()
                );
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            if let Err(err) = past.serve(conf, layout, None) {
                eprintln!("neon-sidecar: past server {id} is not served: {err}");
            }
        }
        Ok(past)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Served>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error for `id`, which is no past server: naming those there are.
    fn no_such(&self, id: u32) -> PastError {
        let have = self.lock().keys().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
        PastError::NoSuch { id, have: if have.is_empty() { "none".into() } else { have } }
    }

    /// Opens the door of a server in place, whose postmaster runs as `postmaster` (if at all).
    fn serve(&self, conf: PastConf, layout: Layout, postmaster: Option<Child>) -> Result<Arc<Server>, PastError> {
        let id = conf.id;
        let idle = (conf.idle_ms > 0).then(|| Duration::from_millis(u64::from(conf.idle_ms)));
        let door_path = layout.front_door();
        let server =
            Arc::new(Server { conf, layout, pg_bin_dir: self.pg_bin_dir.clone(), postmaster: Mutex::new(postmaster) });
        let door = match front::FrontDoor::open(door_path.clone(), server.clone(), idle) {
            Ok(door) => door,
            Err(source) => {
                front::Backend::stop(server.as_ref());
                return Err(PastError::Io { id, what: "listening on", path: door_path, source });
            }
        };
        self.lock().insert(id, Served { server: server.clone(), door: Some(door) });
        Ok(server)
    }

    /// A read-only server on the past at `lsn` of `t`, running: on a branch, or on a copy
    /// where this sidecar cannot mount one (said in its log). Stopped after `idle_ms` unused
    /// (0: never) and started again by the next connection.
    pub fn start(
        &self,
        branches: &Branches,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &Arc<dyn WalRedoManager>,
        lsn: Lsn,
        idle_ms: u32,
    ) -> Result<PastInfo, PastError> {
        let (id, building) = self.reserve_id()?;
        let dir = self.dir.join(id.to_string());
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| PastError::Io { id, what, path, source }
        };
        let mut branch = None;
        let made = match branches.create(store, t, redo, lsn, None) {
            Ok(b) => {
                branch = Some(b.id);
                Ok(PastConf { id, lsn: b.lsn, branch, datadir: PathBuf::from(b.path), idle_ms })
            }
            Err(e @ (BranchError::Mount { .. } | BranchError::NoFuse { .. })) => {
                eprintln!("neon-sidecar: past server {id}: no branch ({e}): copying the past at {lsn} instead");
                self.copy(store, t, redo, lsn, id, &building.join("data")).map(|()| PastConf {
                    id,
                    lsn,
                    branch: None,
                    datadir: dir.join("data"),
                    idle_ms,
                })
            }
            Err(e) => Err(e.into()),
        };
        let started = made.and_then(|conf| {
            let path = building.join(CONF_FILE);
            write_durably(&building.join("past.conf.tmp"), &path, &conf.encode()).map_err(io("writing", &path))?;
            let hba = building.join("pg_hba.conf");
            write_durably(&building.join("pg_hba.conf.tmp"), &hba, b"local all all trust\n")
                .map_err(io("writing", &hba))?;
            std::fs::rename(&building, &dir).map_err(io("renaming into", &dir))?;
            crate::branch::sync_dir(&self.dir).map_err(io("syncing", &self.dir))?;
            // Running before its door opens: its idle time starts then.
            let layout = Layout { dir: dir.clone(), datadir: conf.datadir.clone() };
            match postmaster::start(&self.pg_bin_dir, &layout) {
                Ok(pm) => self.serve(conf, layout, Some(pm)).map(|server| server.info()),
                Err(why) => Err(start_error(&conf, &layout, why)),
            }
        });
        started.inspect_err(|_| {
            if let Some(mut served) = self.lock().remove(&id) {
                served.stop();
            }
            if let Some(b) = branch {
                let _ = branches.drop_branch(b);
            }
            let _ = std::fs::remove_dir_all(&building);
            let _ = std::fs::remove_dir_all(&dir);
        })
    }

    /// A new id, never used before (`next-id` records the next, durably), and its `.new`
    /// directory, made: the rest of a start needs no lock.
    fn reserve_id(&self) -> Result<(u32, PathBuf), PastError> {
        let _changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let on_disk = crate::branch::highest_id_in(&self.dir).map_err(|source| PastError::Io {
            id: 0,
            what: "listing",
            path: self.dir.clone(),
            source,
        })?;
        let next_path = self.dir.join(NEXT_ID_FILE);
        let recorded = std::fs::read_to_string(&next_path).ok().and_then(|t| t.trim().parse::<u32>().ok());
        let id = on_disk.map_or(1, |m| m + 1).max(recorded.unwrap_or(1));
        write_durably(&self.dir.join("next-id.tmp"), &next_path, format!("{}\n", id + 1).as_bytes())
            .map_err(|source| PastError::Io { id, what: "writing", path: next_path.clone(), source })?;
        let building = self.dir.join(format!("{id}.new"));
        private_dir(&building).map_err(|source| PastError::Io {
            id,
            what: "making",
            path: building.clone(),
            source,
        })?;
        Ok((id, building))
    }

    /// A full base backup at `lsn` (on a timeline of its own) unpacked into `datadir`, durably.
    fn copy(
        &self,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &Arc<dyn WalRedoManager>,
        lsn: Lsn,
        id: u32,
        datadir: &Path,
    ) -> Result<(), PastError> {
        let copy_err = |source| PastError::Copy { id, lsn, source };
        private_dir(datadir).map_err(|source| PastError::Io { id, what: "making", path: datadir.into(), source })?;
        let files = TimelineFiles::of(store, t, lsn).map_err(|e| copy_err(e.into()))?;
        let opts = Options {
            relation_pages: true,
            workers: 2,
            new_timeline: true,
            progress_every: Duration::from_secs(5),
            tablespace_map: Default::default(),
        };
        let out = crate::replication::tar_reader::TarUnpacker::new(datadir);
        let mut progress = |p: &basebackup::Progress| {
            eprintln!(
                "neon-sidecar: past server {id}: copying the past at {lsn}: {} of {} pages, {:?}",
                p.pages, p.total_pages, p.elapsed
            );
        };
        let (out, _) =
            basebackup::write_basebackup(t, redo.as_ref(), lsn, &files, opts, out, &mut progress).map_err(copy_err)?;
        if !out.is_done() {
            return Err(copy_err(basebackup::BasebackupError::Io(std::io::Error::other("the archive did not end"))));
        }
        crate::branch::sync_fs(datadir).map_err(|source| PastError::Io {
            id,
            what: "syncing",
            path: datadir.into(),
            source,
        })
    }

    /// The past server on branch `branch`, if one is.
    pub fn on_branch(&self, branch: u32) -> Option<u32> {
        self.lock().values().find(|s| s.server.conf.branch == Some(branch)).map(|s| s.server.conf.id)
    }

    /// Stops server `id` and removes it, with its branch or copy.
    pub fn stop(&self, branches: &Branches, id: u32) -> Result<PastInfo, PastError> {
        let Some(mut served) = self.lock().remove(&id) else { return Err(self.no_such(id)) };
        served.stop();
        let mut info = served.server.info();
        info.running = false;
        if let Some(b) = served.server.conf.branch {
            match branches.drop_branch(b) {
                Ok(_) | Err(BranchError::NoSuchBranch { .. }) => {}
                Err(e) => {
                    // It stays, as it was: served again, on its branch.
                    let (conf, layout) = (served.server.conf.clone(), served.server.layout.clone());
                    drop(served);
                    let _ = self.serve(conf, layout, None);
                    return Err(e.into());
                }
            }
        }
        let dir = &served.server.layout.dir;
        std::fs::remove_dir_all(dir).map_err(|source| PastError::Io {
            id,
            what: "removing",
            path: dir.clone(),
            source,
        })?;
        Ok(info)
    }

    pub fn list(&self) -> Vec<PastInfo> {
        self.lock().values().map(|s| s.server.info()).collect()
    }

    /// Stops every postmaster and closes every door (the sidecar stops; the servers stay).
    pub fn stop_all(&self) {
        let mut all = std::mem::take(&mut *self.lock());
        for served in all.values_mut() {
            served.stop();
        }
    }
}
