//! The past as a running server: a read-only PostgreSQL the sidecar starts on a branch at an
//! LSN, for the compute's `neon_as_of` to import as foreign tables (`postgres_fdw`). It listens
//! on a unix socket only, in `<shared dir>/past/<branch id>/` — private (0700) to the
//! sidecar's OS user, which is the compute's — with `trust` for that socket alone, so no
//! password exists anywhere; every transaction is read-only (`default_transaction_read_only`),
//! and the compute's own settings that do not belong on a copy (the `neon` library, archiving,
//! its addresses) are overridden. The sidecar stops them all when it stops; a branch whose
//! server stops keeps its pin until it is dropped.

use crate::branch::{BranchError, Branches};
use crate::repo::store::Store;
use crate::repo::timeline::{private_dir, Timeline};
use crate::walredo::WalRedoManager;
use neon_types::protocol::PastInfo;
use neon_types::Lsn;
use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The port in each past server's own socket directory (the directory tells them apart).
const PORT: u16 = 5432;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PastError {
    #[error(transparent)]
    Branch(#[from] BranchError),
    #[error("past server on branch {id}: {what} {path}: {source}")]
    Io { id: u32, what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("past server on branch {id} at {lsn} did not start: {why}; its log ends:\n{log}")]
    Start { id: u32, lsn: Lsn, why: String, log: String },
    #[error("there is no past server or branch {id} (running: {have})")]
    NoSuch { id: u32, have: String },
}

struct Running {
    child: Child,
    info: PastInfo,
}

/// The sidecar's past servers, by branch id.
pub struct PastServers {
    dir: PathBuf,
    pg_bin_dir: PathBuf,
    running: Mutex<BTreeMap<u32, Running>>,
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Whether the postmaster of `datadir` says it accepts connections (postmaster.pid's status
/// line, as `pg_ctl -w` reads it).
fn ready(datadir: &Path) -> bool {
    std::fs::read_to_string(datadir.join("postmaster.pid"))
        .is_ok_and(|t| t.lines().nth(7).is_some_and(|s| s.trim() == "ready"))
}

/// Asks `child` to stop (fast shutdown: SIGINT) and waits; after `STOP_TIMEOUT`, an
/// immediate shutdown (SIGQUIT, which ends its backends too), and SIGKILL as the last resort.
fn stop_child(child: &mut Child) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    for (signal, wait) in [(Signal::SIGINT, STOP_TIMEOUT), (Signal::SIGQUIT, Duration::from_secs(5))] {
        let _ = kill(pid, signal);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl PastServers {
    pub fn new(shared: &Path, pg_bin_dir: PathBuf) -> std::io::Result<PastServers> {
        let dir = shared.join("past");
        private_dir(&dir)?;
        Ok(PastServers { dir, pg_bin_dir, running: Mutex::new(BTreeMap::new()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error for branch `id`, which has no past server: naming those that run.
    fn no_such(&self, id: u32) -> PastError {
        let have = self.lock().keys().map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
        PastError::NoSuch { id, have: if have.is_empty() { "none".into() } else { have } }
    }

    /// A branch at `lsn` of `t` and a read-only server on it, ready for connections.
    pub fn start(
        &self,
        branches: &Branches,
        store: &Store,
        t: &Arc<Timeline>,
        redo: &Arc<dyn WalRedoManager>,
        lsn: Lsn,
    ) -> Result<PastInfo, PastError> {
        let made = branches.create(store, t, redo, lsn, None)?;
        self.start_on(made.id, made.lsn, Path::new(&made.path)).inspect_err(|_| {
            let _ = branches.drop_branch(made.id);
        })
    }

    fn start_on(&self, id: u32, lsn: Lsn, datadir: &Path) -> Result<PastInfo, PastError> {
        let dir = self.dir.join(id.to_string());
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| PastError::Io { id, what, path, source }
        };
        private_dir(&dir).map_err(io("making", &dir))?;
        let hba = dir.join("pg_hba.conf");
        crate::repo::timeline::write_durably(&dir.join("pg_hba.conf.tmp"), &hba, b"local all all trust\n")
            .map_err(io("writing", &hba))?;
        let log_path = dir.join("server.log");
        // Private like everything here: the log may quote the past's rows.
        let log = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(io("creating", &log_path))?;
        let set = |k: &str, v: &str| ["-c".to_string(), format!("{k}={v}")];
        let mut cmd = Command::new(self.pg_bin_dir.join("postgres"));
        cmd.arg("-D").arg(datadir);
        for (k, v) in [
            ("listen_addresses", String::new()),
            ("port", PORT.to_string()),
            ("unix_socket_directories", dir.display().to_string()),
            ("unix_socket_permissions", "0700".into()),
            ("hba_file", hba.display().to_string()),
            ("default_transaction_read_only", "on".into()),
            ("shared_preload_libraries", String::new()),
            ("logging_collector", "off".into()),
            ("archive_mode", "off".into()),
            ("max_wal_senders", "0".into()),
            ("max_replication_slots", "0".into()),
            // A copy to read from, not the compute: its memory and preloads are not wanted.
            ("shared_buffers", "32MB".into()),
            ("max_connections", "20".into()),
            ("session_preload_libraries", String::new()),
            ("local_preload_libraries", String::new()),
        ] {
            cmd.args(set(k, &v));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting postgres for", datadir))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(datadir) {
                break;
            }
            let why = match child.try_wait() {
                Ok(Some(status)) => Some(format!("postgres exited ({status})")),
                _ if Instant::now() > deadline => Some(format!("not ready after {START_TIMEOUT:?}")),
                _ => None,
            };
            if let Some(why) = why {
                stop_child(&mut child);
                return Err(PastError::Start { id, lsn, why, log: tail(&log_path) });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let info = PastInfo { id, lsn, socket_dir: dir.display().to_string(), port: PORT };
        self.lock().insert(id, Running { child, info: info.clone() });
        Ok(info)
    }

    /// Stops the server on branch `id` (if it runs: one the sidecar started before a restart
    /// does not), then drops the branch.
    pub fn stop(&self, branches: &Branches, id: u32) -> Result<PastInfo, PastError> {
        let dir = self.dir.join(id.to_string());
        if !self.lock().contains_key(&id) && !dir.is_dir() {
            // Not a past server's branch: branches are dropped as branches.
            return Err(self.no_such(id));
        }
        let running = self.lock().remove(&id);
        if let Some(mut r) = running {
            stop_child(&mut r.child);
        }
        let dropped = branches.drop_branch(id).map_err(|e| match e {
            BranchError::NoSuchBranch { .. } => self.no_such(id),
            e => PastError::Branch(e),
        })?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(PastInfo { id, lsn: dropped.lsn, socket_dir: dir.display().to_string(), port: PORT })
    }

    pub fn list(&self) -> Vec<PastInfo> {
        self.lock().values().map(|r| r.info.clone()).collect()
    }

    /// Stops every past server (the sidecar stops; their branches stay).
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, mut r) in all {
            stop_child(&mut r.child);
        }
    }
}
