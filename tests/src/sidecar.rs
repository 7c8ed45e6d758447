//! The real `neon-sidecar run` as a child process of a test: following a cluster through its
//! slot into a store and serving pages on a unix socket in a private directory. Stopped with
//! SIGTERM (a clean stop after a last flush) or killed with SIGKILL to test crash safety;
//! killed on drop whatever happens.

use crate::{sidecar_bin, Cluster};
use anyhow::{Context, Result};
use neon_types::protocol::{Request, Response};
use neon_types::Lsn;
use sidecar::service::Client;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A new cluster (the mixed workload's settings, autovacuum off) whose history a store holds
/// from its birth (`neon-sidecar init`), started; the store is `<root>/store`.
pub fn cluster_born_with_store() -> Result<(Cluster, PathBuf)> {
    cluster_born_with_store_and(&[])
}

/// [`cluster_born_with_store`] with more `initdb` arguments (`--data-checksums`).
pub fn cluster_born_with_store_and(initdb_args: &[&str]) -> Result<(Cluster, PathBuf)> {
    let mut builder = Cluster::builder().gucs(crate::workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]);
    for a in initdb_args {
        builder = builder.initdb_arg(a);
    }
    let mut c = builder.init()?;
    let store = c.root_dir().join("store");
    init_store(&c, &store)?;
    c.start_again()?;
    Ok((c, store))
}

/// `neon-sidecar init` of the (stopped) cluster `c` into `store`: history from its birth.
pub fn init_store(c: &Cluster, store: &Path) -> Result<()> {
    let out = Command::new(sidecar_bin()?)
        .arg("init")
        .arg("--pgdata")
        .arg(c.data_dir())
        .arg("--store")
        .arg(store)
        .output()?;
    anyhow::ensure!(out.status.success(), "neon-sidecar init: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

pub struct SidecarProcess {
    child: Option<Child>,
    store: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// Its `--shared-dir`, if it has one.
    shared: Option<PathBuf>,
}

impl SidecarProcess {
    /// Starts `neon-sidecar run` for `c` into `store`, with its socket in `<root>/sidecar/`,
    /// and waits until the socket answers.
    pub fn start(c: &Cluster, store: &Path) -> Result<SidecarProcess> {
        Self::start_with(c, store, &[])
    }

    /// [`SidecarProcess::start`] with more `run` options.
    pub fn start_with(c: &Cluster, store: &Path, extra: &[&str]) -> Result<SidecarProcess> {
        Self::spawn(c, store, extra, false, &[])
    }

    /// The product's own arrangement: the sidecar runs as the server's OS user (so only it and
    /// the compute can reach the socket and the shared directory `<root>/shared`), and the
    /// compute's `neon.sidecar_socket` / `neon.shared_dir` point at them (reloaded).
    pub fn start_for_compute(c: &Cluster, store: &Path, extra: &[&str]) -> Result<SidecarProcess> {
        Self::start_for_compute_with_env(c, store, extra, &[])
    }

    /// [`SidecarProcess::start_for_compute`] with `env` in the sidecar's environment (an object
    /// store's credentials, which are never arguments).
    pub fn start_for_compute_with_env(
        c: &Cluster,
        store: &Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Result<SidecarProcess> {
        let s = Self::restart_for_compute_with_env(c, store, extra, env)?;
        c.append_conf(&format!(
            "neon.sidecar_socket = '{}'\nneon.shared_dir = '{}'\n",
            s.socket.display(),
            c.root_dir().join("shared").display()
        ))?;
        c.reload()?;
        Ok(s)
    }

    /// Starts the sidecar again after a stop, as [`SidecarProcess::start_for_compute`] did
    /// (the compute's settings already point at it).
    pub fn restart_for_compute(c: &Cluster, store: &Path, extra: &[&str]) -> Result<SidecarProcess> {
        Self::restart_for_compute_with_env(c, store, extra, &[])
    }

    /// [`SidecarProcess::restart_for_compute`] with `env` in the sidecar's environment.
    pub fn restart_for_compute_with_env(
        c: &Cluster,
        store: &Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Result<SidecarProcess> {
        let shared = c.root_dir().join("shared");
        std::fs::create_dir_all(&shared)?;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700))?;
        let mut args = vec!["--shared-dir", shared.to_str().context("path is not UTF-8")?];
        args.extend_from_slice(extra);
        Self::spawn(c, store, &args, true, env)
    }

    fn spawn(
        c: &Cluster,
        store: &Path,
        extra: &[&str],
        as_server_user: bool,
        env: &[(&str, String)],
    ) -> Result<SidecarProcess> {
        let dir = c.root_dir().join("sidecar");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        if as_server_user {
            for d in [&dir, store, &c.root_dir().join("shared")] {
                crate::chown_to_server_user(d)?;
            }
        }
        let socket = dir.join("sidecar.sock");
        let log = dir.join("sidecar.log");
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let mut cmd = Command::new(if as_server_user { server_user_copy_of_sidecar(c)? } else { sidecar_bin()? });
        if as_server_user {
            crate::chown_to_server_user(&log)?;
            crate::run_as_server_user(&mut cmd);
        }
        let child = cmd
            .args(["run", "--host"])
            .arg(c.socket_dir())
            .args(["--port", &c.port().to_string(), "--user", crate::SUPERUSER, "--store"])
            .arg(store)
            .arg("--socket")
            .arg(&socket)
            .args(["--flush-ms", "200"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting neon-sidecar run")?;
        let shared = extra.iter().position(|a| *a == "--shared-dir").and_then(|i| extra.get(i + 1)).map(PathBuf::from);
        let mut s = SidecarProcess { child: Some(child), store: store.to_path_buf(), socket, log, shared };
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.client().and_then(|mut cl| Ok(cl.request(&Request::History)?)).is_err() {
            if let Some(status) = s.child.as_mut().expect("running").try_wait()? {
                anyhow::bail!("neon-sidecar exited with {status}: {}", s.log_text());
            }
            anyhow::ensure!(Instant::now() < deadline, "the sidecar socket never answered: {}", s.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.socket)?)
    }

    /// One request on a fresh connection; error responses become errors.
    pub fn ask(&self, req: &Request) -> Result<Response> {
        match self.client()?.request(req)? {
            Response::Error { code, message } => anyhow::bail!("{code:?}: {message}"),
            r => Ok(r),
        }
    }

    /// (durable, last record) LSNs of the timeline followed now.
    pub fn history(&self) -> Result<(Lsn, Lsn)> {
        let t = self.timelines()?.into_iter().next().context("no timeline")?;
        Ok((t.durable, t.last))
    }

    /// Every timeline's history, the followed one first.
    pub fn timelines(&self) -> Result<Vec<neon_types::protocol::TimelineHistory>> {
        match self.ask(&Request::History)? {
            Response::History(t) => Ok(t),
            r => anyhow::bail!("unexpected {r:?}"),
        }
    }

    /// One value of the sidecar's status report (`neon-sidecar status`: `name value` lines).
    pub fn status(&self, name: &str) -> Result<String> {
        match self.ask(&Request::Status)? {
            Response::Status(text) => text
                .lines()
                .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).map(str::to_string))
                .with_context(|| format!("no {name} in the status report:\n{text}")),
            r => anyhow::bail!("unexpected {r:?}"),
        }
    }

    /// Waits (up to a minute) until `n` redo processes have started (they start beside the
    /// page service, copying their scratch directory first).
    pub fn wait_redo_started(&self, n: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.status("redo_process_starts")?.parse::<u64>()? < n {
            anyhow::ensure!(Instant::now() < deadline, "redo processes did not start: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits (up to two minutes) until the sidecar is durable to `lsn`.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (durable, _) = self.history()?;
            if durable >= lsn {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the sidecar is durable only to {durable}, not {lsn}; its log:\n{}",
                crate::tail_lines(&self.log_text(), 30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal_and_wait(&mut self, sig: i32) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(child.id() as i32, sig) };
        Ok(child.wait()?)
    }

    /// The sidecar's process ID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `sig` (SIGSTOP, SIGCONT, ...) to the running sidecar.
    pub fn signal(&self, sig: i32) -> Result<()> {
        let child = self.child.as_ref().context("not running")?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        anyhow::ensure!(
            unsafe { libc::kill(child.id() as i32, sig) } == 0,
            "kill: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// SIGTERM: the sidecar flushes and exits cleanly.
    pub fn stop(mut self) -> Result<()> {
        let status = self.signal_and_wait(libc::SIGTERM)?;
        anyhow::ensure!(status.success(), "neon-sidecar exited with {status}: {}", self.log_text());
        Ok(())
    }

    /// Waits up to `timeout` for the sidecar to exit by itself: its exit status, or None if it
    /// still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL at whatever moment this is.
    pub fn kill9(mut self) -> Result<()> {
        self.signal_and_wait(libc::SIGKILL)?;
        Ok(())
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal_and_wait(libc::SIGKILL);
        }
        // A killed sidecar leaves its shared page file's data in /dev/shm for the next one
        // to remove; there is no next one after a test.
        if let Some(data) = self.shared.as_ref().and_then(|d| std::fs::read_link(d.join("pages")).ok()) {
            let _ = std::fs::remove_file(data);
        }
    }
}

/// The sidecar binary where the server's OS user can run it: when we are root, the build's
/// own may sit in a directory only root can enter (a clean clone under `mktemp -d`), so it is
/// copied into the cluster's directory.
fn server_user_copy_of_sidecar(c: &Cluster) -> Result<PathBuf> {
    sidecar_bin_in(c.root_dir())
}

/// `neon-sidecar <args>` as the server's OS user (as `run` runs in these tests), with `env`
/// added to its environment; what it printed, or an error with it.
pub fn sidecar_cli_as_server_user(c: &Cluster, args: &[&str], env: &[(&str, String)]) -> Result<String> {
    let mut cmd = Command::new(server_user_copy_of_sidecar(c)?);
    crate::run_as_server_user(&mut cmd);
    let out = cmd.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "neon-sidecar {args:?} failed: {text}");
    Ok(text)
}

/// [`sidecar_bin`], or as root a copy in `<dir>/bin/` the server's OS user can run.
pub fn sidecar_bin_in(dir: &Path) -> Result<PathBuf> {
    let built = sidecar_bin()?;
    if !crate::is_root() {
        return Ok(built);
    }
    let copy = dir.join("bin/neon-sidecar");
    if !copy.exists() {
        std::fs::create_dir_all(copy.parent().expect("has a parent"))?;
        // By `cp`, not in this process: a child another test thread forks while our write
        // descriptor is open would hold it until its exec, and running the copy then fails
        // with "Text file busy" (ETXTBSY).
        let ok = Command::new("cp").arg(&built).arg(&copy).status()?;
        anyhow::ensure!(ok.success(), "copying {} to {}", built.display(), copy.display());
        crate::chown_to_server_user(copy.parent().expect("has a parent"))?;
    }
    Ok(copy)
}

/// `neon-sidecar basebackup --store <store> --lsn <lsn> --out <tar>` (plus `extra`), straight from
/// the store's files; returns what it printed.
pub fn basebackup_from_store(store: &Path, lsn: Lsn, tar: &Path, extra: &[&str]) -> Result<String> {
    let out = Command::new(sidecar_bin()?)
        .arg("basebackup")
        .arg("--store")
        .arg(store)
        .args(["--lsn", &lsn.to_string(), "--out"])
        .arg(tar)
        .args(extra)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "neon-sidecar basebackup at {lsn} failed: {text}");
    Ok(text)
}

/// Starts stock PostgreSQL 15 on a base backup tar: a fresh harness cluster (for its port,
/// socket directory and `pg_hba.conf`) whose data directory is replaced by the archive's
/// contents. Logs at level LOG, so a test can see whether startup replayed anything.
pub fn boot_basebackup(tar: &Path) -> Result<Cluster> {
    let mut b = Cluster::builder().guc("log_min_messages", "log").init()?;
    let data = b.data_dir().to_path_buf();
    let keep: Vec<(&str, Vec<u8>)> = ["postgresql.conf", "pg_hba.conf"]
        .into_iter()
        .map(|f| Ok((f, std::fs::read(data.join(f))?)))
        .collect::<Result<_>>()?;
    std::fs::remove_dir_all(&data)?;
    std::fs::create_dir_all(&data)?;
    let ok = Command::new("tar").arg("-xf").arg(tar).arg("-C").arg(&data).status()?;
    anyhow::ensure!(ok.success(), "unpacking {}", tar.display());
    for (f, text) in keep {
        std::fs::write(data.join(f), text)?;
    }
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
    crate::chown_to_server_user(&data)?;
    b.start_again()?;
    Ok(b)
}
