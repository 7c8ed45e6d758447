//! [`Cluster`], one throwaway PostgreSQL 15 server in its own temp directory,
//! and [`ClusterBuilder`], which configures and creates it. This is the heart
//! of the harness: the crate documentation describes the layout, defaults and
//! lifecycle implemented here. It runs its programs through
//! [`crate::process`], as the user chosen by [`crate::os_user`], from the
//! binaries located by [`crate::bins`].

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bins::pg_bin;
use crate::os_user::{chown_to_server_user, is_root, run_as_server_user};
use crate::process::{
    children_of, clear_pg_env, describe_failure, process_alive, run_command, tail_lines, wait_process_gone,
    LOG_TAIL_LINES,
};

/// Name of the database superuser of every cluster (`initdb -U postgres`).
pub const SUPERUSER: &str = "postgres";

/// Port used in unix-socket-only mode. The socket lives in the cluster's own
/// directory, so every cluster can use the same number without colliding.
const UNIX_ONLY_PORT: u16 = 5432;

/// How long to wait for start/stop (pg_ctl `-t`) and for the first connection.
/// Generous because CI machines are small and busy.
const PG_CTL_TIMEOUT_SECS: u32 = 120;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Quotes a value for a libpq-style `key=value` connection string.
fn conn_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Quotes a value for postgresql.conf.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Base directory for cluster dirs: `std::env::temp_dir()` unless that path is
/// long (the socket path must stay below ~100 bytes) or, when root, not
/// traversable by the server user — then `/tmp`.
fn temp_base() -> PathBuf {
    let t = std::env::temp_dir();
    let short = t.as_os_str().len() <= 60;
    let reachable = !is_root()
        || t.ancestors().all(|p| fs::metadata(p).map(|m| m.permissions().mode() & 0o001 != 0).unwrap_or(false));
    if short && reachable {
        t
    } else {
        PathBuf::from("/tmp")
    }
}

fn keep_requested() -> bool {
    std::env::var_os("NEON_TEST_KEEP").is_some_and(|v| !v.is_empty() && v != OsStr::new("0"))
}

// ---------------------------------------------------------------------------
// ClusterBuilder
// ---------------------------------------------------------------------------

/// Configures a throwaway cluster; create with [`Cluster::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct ClusterBuilder {
    gucs: Vec<(String, String)>,
    initdb_args: Vec<String>,
    tcp: bool,
    env: Vec<(String, String)>,
    /// A data directory that exists already (a branch's mount): no initdb, and it is not
    /// removed on drop.
    existing: Option<PathBuf>,
}

impl ClusterBuilder {
    /// Sets a server parameter, appended to `postgresql.conf` before the first
    /// start (after the harness defaults, so it overrides them). The value is
    /// quoted for you: `.guc("shared_buffers", "64MB")`.
    pub fn guc(mut self, name: &str, value: &str) -> Self {
        self.gucs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets several GUCs, as [`ClusterBuilder::guc`] does.
    pub fn gucs(mut self, gucs: &[(&str, &str)]) -> Self {
        for (name, value) in gucs {
            self = self.guc(name, value);
        }
        self
    }

    /// Adds an extra `initdb` argument, e.g. `"--data-checksums"` or
    /// `"--wal-segsize=1"`.
    pub fn initdb_arg(mut self, arg: &str) -> Self {
        self.initdb_args.push(arg.to_owned());
        self
    }

    /// Sets an environment variable of the server (and so of every backend).
    pub fn server_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Also listen on `127.0.0.1` at a free port (see [`Cluster::tcp_conn_str`]).
    /// Without this the server only listens on its unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// Runs the server on `data`, a data directory made elsewhere (a branch's mount), instead
    /// of an initdb'd one; its socket and log are in the cluster's own temp directory.
    pub fn existing_data_dir(mut self, data: &Path) -> Self {
        self.existing = Some(data.to_path_buf());
        self
    }

    /// Runs initdb (unless the data directory exists: [`ClusterBuilder::existing_data_dir`]) and writes the configuration, but does not start the
    /// server; start it with [`Cluster::start_again`]. Useful to tamper with
    /// the data directory before the first start.
    pub fn init(self) -> Result<Cluster> {
        let base = temp_base();
        let dir = tempfile::Builder::new()
            .prefix("neon-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a temp dir in {}", base.display()))?;
        chown_to_server_user(dir.path())?;
        let root = dir.path().to_path_buf();
        let port = if self.tcp { free_tcp_port()? } else { UNIX_ONLY_PORT };
        let cluster = Cluster {
            data_dir: self.existing.clone().unwrap_or_else(|| root.join("data")),
            root,
            dir: Some(dir),
            port,
            tcp: self.tcp,
            env: self.env.clone(),
            running: false,
            started_pid: std::sync::atomic::AtomicI32::new(0),
            keep: keep_requested(),
        };

        if self.existing.is_none() {
            let mut initdb = cluster.server_command(pg_bin("initdb"));
            initdb
                .arg("-D")
                .arg(&cluster.data_dir)
                .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
                .args(["--no-sync", "--no-instructions"])
                .args(&self.initdb_args);
            run_command(&mut initdb).context("initdb failed")?;
        }

        let mut conf = String::from("\n# ---- added by the neon-tests harness ----\n");
        let listen = if self.tcp { "127.0.0.1" } else { "" };
        let socket_dir = cluster.root.to_str().context("temp dir path is not UTF-8")?;
        let port_s = port.to_string();
        let defaults: [(&str, &str); 10] = [
            ("listen_addresses", listen),
            ("port", &port_s),
            ("unix_socket_directories", socket_dir),
            ("max_connections", "30"),
            ("shared_buffers", "32MB"),
            ("max_prepared_transactions", "10"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("log_line_prefix", "%m [%p] %q%a "),
            ("log_min_messages", "warning"),
        ];
        for (k, v) in defaults {
            let _ = writeln!(conf, "{k} = {}", conf_quote(v));
        }
        if !self.gucs.is_empty() {
            conf.push_str("# ---- from ClusterBuilder::guc ----\n");
            for (k, v) in &self.gucs {
                let _ = writeln!(conf, "{k} = {}", conf_quote(v));
            }
        }
        cluster.append_conf(&conf)?;
        Ok(cluster)
    }

    /// initdb + start + wait until ready (`pg_ctl -w`, then a successful
    /// connection). In TCP mode a start that fails because the chosen port
    /// was grabbed in the meantime is retried with another port.
    pub fn start(self) -> Result<Cluster> {
        let tcp = self.tcp;
        let mut cluster = self.init()?;
        let mut attempt = 0;
        loop {
            match cluster.start_again() {
                Ok(()) => return Ok(cluster),
                Err(e) if tcp && attempt < 5 && is_port_conflict(&format!("{e:#}")) => {
                    attempt += 1;
                    cluster.port = free_tcp_port()?;
                    cluster.append_conf(&format!("port = {}\n", cluster.port))?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn is_port_conflict(msg: &str) -> bool {
    msg.contains("could not bind IPv4 address")
        || msg.contains("could not create any TCP/IP sockets")
        || msg.contains("Address already in use")
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A throwaway PostgreSQL 15 cluster in its own temp directory.
///
/// Dropping it stops the server (fast, then immediate, then SIGKILL) and
/// removes the directory, also when the test panics; set `NEON_TEST_KEEP=1`
/// to keep the directory.
#[derive(Debug)]
pub struct Cluster {
    /// `None` only transiently inside `drop`.
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    data_dir: PathBuf,
    port: u16,
    tcp: bool,
    /// The server's own environment variables.
    env: Vec<(String, String)>,
    /// We started the server and have not stopped it since.
    running: bool,
    /// The postmaster's pid as last read: a data directory that cannot be read any more (a
    /// branch whose sidecar died) still lets it be stopped.
    started_pid: std::sync::atomic::AtomicI32,
    keep: bool,
}

impl Cluster {
    /// A builder for a new cluster.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts a cluster with default settings (`Cluster::builder().start()`).
    pub fn start() -> Result<Cluster> {
        Self::builder().start()
    }

    // ---- paths and connection info ----

    /// The cluster's temp directory (contains `data/`, `server.log`, socket).
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// A new directory under the cluster's root for `CREATE TABLESPACE … LOCATION`, owned by
    /// the server's OS user; returns its path.
    pub fn tablespace_dir(&self, name: &str) -> Result<String> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir)?;
        chown_to_server_user(&dir)?;
        Ok(dir.display().to_string())
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `<data_dir>/pg_wal`.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir.join("pg_wal")
    }

    /// Directory holding the unix socket (`host=` for libpq).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The server's port (also names the unix socket `.s.PGSQL.<port>`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server also listens on 127.0.0.1.
    pub fn is_tcp(&self) -> bool {
        self.tcp
    }

    /// The server log (stderr of the postmaster, `pg_ctl -l`).
    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The whole server log; empty if it cannot be read.
    pub fn log_contents(&self) -> String {
        fs::read(self.log_file()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log_contents(), n)
    }

    /// Connection string for database `db` via the unix socket, as superuser
    /// `postgres` (usable by the `postgres` crate and by libpq tools).
    pub fn conn_str(&self, db: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={} connect_timeout=30",
            conn_quote(&self.root.to_string_lossy()),
            self.port,
            conn_quote(db)
        )
    }

    /// Connection string via `127.0.0.1`; `None` unless built with
    /// [`ClusterBuilder::tcp`].
    pub fn tcp_conn_str(&self, db: &str) -> Option<String> {
        self.tcp.then(|| {
            format!("host=127.0.0.1 port={} user={SUPERUSER} dbname={} connect_timeout=30", self.port, conn_quote(db))
        })
    }

    /// A new connection to database `db` (unix socket, `NoTls`).
    pub fn connect(&self, db: &str) -> Result<postgres::Client> {
        postgres::Client::connect(&self.conn_str(db), postgres::NoTls)
            .with_context(|| format!("connecting to database {db:?} of cluster {}", self.root.display()))
    }

    // ---- SQL helpers (fresh connection to db "postgres" each time) ----

    /// Runs `sql` (may contain several statements) in database `postgres`.
    pub fn execute(&self, sql: &str) -> Result<()> {
        let mut client = self.connect("postgres")?;
        client.batch_execute(sql).map_err(|e| sql_error(sql, e))
    }

    /// Runs a query that must return exactly one row and returns its first
    /// column as text. Uses the simple query protocol, so any type works (the
    /// server's text output, e.g. `t`/`f` for booleans); casting with `::text`
    /// is not needed. NULL is an error.
    pub fn query_one_string(&self, sql: &str) -> Result<String> {
        let rows = self.query_rows(sql)?;
        match rows.as_slice() {
            [row] => match row.first() {
                Some(Some(v)) => Ok(v.clone()),
                Some(None) => bail!("query {sql:?} returned NULL"),
                None => bail!("query {sql:?} returned no columns"),
            },
            _ => bail!("query {sql:?} returned {} rows, expected exactly 1", rows.len()),
        }
    }

    /// Runs `sql` in database `postgres` (simple query protocol) and returns
    /// all rows of the last result as text (`None` for NULL).
    pub fn query_rows(&self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut client = self.connect("postgres")?;
        let msgs = client.simple_query(sql).map_err(|e| sql_error(sql, e))?;
        let mut rows = Vec::new();
        for m in msgs {
            match m {
                postgres::SimpleQueryMessage::Row(r) => {
                    rows.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                }
                // A new result set starts: keep only the last one.
                postgres::SimpleQueryMessage::RowDescription(_) => rows.clear(),
                _ => {}
            }
        }
        Ok(rows)
    }

    // ---- tools ----

    /// A `Command` for PostgreSQL binary `name` with `PGHOST`, `PGPORT`,
    /// `PGUSER=postgres`, `PGDATABASE=postgres` and `PGDATA` set for this
    /// cluster (other inherited `PG*` variables removed). Runs as the current
    /// user: right for client tools (psql, pg_dump, pgbench, pg_waldump,
    /// pg_amcheck, pg_controldata, pg_checksums, ...).
    pub fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(pg_bin(name));
        clear_pg_env(&mut cmd);
        cmd.env("PGHOST", &self.root)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGDATABASE", "postgres")
            .env("PGDATA", &self.data_dir);
        cmd
    }

    /// Like [`tool`](Self::tool) but runs as the server OS user (when root)
    /// with the cluster dir as working directory — for programs that refuse
    /// root or must own what they write: `postgres --single`, `pg_resetwal`,
    /// `pg_rewind`, `pg_ctl`, ...
    pub fn server_tool(&self, name: &str) -> Command {
        let mut cmd = self.tool(name);
        run_as_server_user(&mut cmd).current_dir(&self.root);
        cmd
    }

    /// Runs [`tool`](Self::tool)`(name)` with `args`, returns its stdout;
    /// errors (with stderr) when it exits non-zero.
    pub fn run_tool(&self, name: &str, args: &[&str]) -> Result<String> {
        run_command(self.tool(name).args(args))
    }

    /// Runs [`server_tool`](Self::server_tool)`(name)` with `args`, returns
    /// its stdout; errors (with stderr) when it exits non-zero.
    pub fn run_server_tool(&self, name: &str, args: &[&str]) -> Result<String> {
        run_command(self.server_tool(name).args(args))
    }

    /// Runs `pgbench` with `args` (e.g. `["-i", "-s", "1"]`), returns stdout.
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        self.run_tool("pgbench", args)
    }

    /// Runs `psql -X -q -v ON_ERROR_STOP=1 -At -c <sql>` on database
    /// `postgres`, returns stdout.
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.run_tool("psql", &["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
    }

    // ---- configuration ----

    /// Appends `name = 'value'` to `postgresql.conf`. Takes effect after
    /// [`reload`](Self::reload) or a restart, depending on the parameter.
    pub fn set_guc(&self, name: &str, value: &str) -> Result<()> {
        self.append_conf(&format!("{name} = {}\n", conf_quote(value)))
    }

    /// Appends raw text to `postgresql.conf`.
    pub fn append_conf(&self, text: &str) -> Result<()> {
        let path = self.data_dir.join("postgresql.conf");
        let mut f =
            fs::OpenOptions::new().append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
    }

    /// Reloads the configuration (`select pg_reload_conf()`).
    pub fn reload(&self) -> Result<()> {
        self.execute("select pg_reload_conf()")
    }

    // ---- lifecycle ----

    /// Pid of the postmaster, from the first line of `postmaster.pid`
    /// (`None` when the file is absent, i.e. the server is not running).
    pub fn postmaster_pid(&self) -> Option<i32> {
        let read = || -> Option<i32> {
            let s = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
            s.lines().next()?.trim().parse().ok()
        };
        match read() {
            Some(pid) => {
                self.started_pid.store(pid, std::sync::atomic::Ordering::Relaxed);
                Some(pid)
            }
            // Unreadable (not merely absent): the last pid seen, if that process lives.
            None if fs::symlink_metadata(&self.data_dir).is_err() => {
                Some(self.started_pid.load(std::sync::atomic::Ordering::Relaxed))
                    .filter(|p| *p > 0 && process_alive(*p))
            }
            None => None,
        }
    }

    /// Whether the server we started is still up (postmaster alive).
    pub fn is_running(&self) -> bool {
        self.running && self.postmaster_pid().is_some_and(process_alive)
    }

    /// Starts the server (again): after [`stop`](Self::stop),
    /// [`crash`](Self::crash), [`kill9`](Self::kill9), or after
    /// [`ClusterBuilder::init`]. Waits until the postmaster says in
    /// `postmaster.pid` that it is ready (after crash recovery; see
    /// `pg_ctl_start`) and then for a successful connection. On failure the
    /// error contains the tail of the server log.
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("start_again: the server of {} is already running", self.root.display());
        }
        // Set before starting: if pg_ctl times out the postmaster may still
        // be up, and drop must then stop it.
        self.running = true;
        let mut cmd = self.pg_ctl();
        cmd.arg("-l").arg(self.log_file()).arg("start");
        let Some(out) = self.pg_ctl_start(&mut cmd)? else {
            return self.wait_connectable();
        };
        if !out.status.success() {
            let still_up = self.postmaster_pid().is_some_and(process_alive);
            self.running = still_up;
            bail!(
                "starting the server failed: {}\n--- server log (tail) ---\n{}",
                describe_failure(&cmd, &out),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        self.wait_connectable()
    }

    /// Clean shutdown (`pg_ctl stop -m fast`). Idempotent: Ok if not running.
    /// If fast mode fails, the server is still brought down (immediate, then
    /// SIGKILL) and an error is returned.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let fast = self.pg_ctl_stop("fast");
        if fast.is_ok() {
            self.running = false;
            return Ok(());
        }
        let fast_err = fast.unwrap_err();
        let rescue = self.force_down();
        bail!(
            "fast shutdown failed ({fast_err:#}); {}\n--- server log (tail) ---\n{}",
            match rescue {
                Ok(()) => "server was forced down".to_owned(),
                Err(e) => format!("forcing it down also failed: {e:#}"),
            },
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    /// Stop then start again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Simulated crash: `pg_ctl stop -m immediate` (no shutdown checkpoint;
    /// the next start runs crash recovery). Falls back to SIGKILL.
    pub fn crash(&mut self) -> Result<()> {
        if !self.running {
            bail!("crash: the server of {} is not running", self.root.display());
        }
        self.force_down()
    }

    /// Harsher crash: SIGKILL the postmaster and all its children at once (no
    /// process gets to run any exit code), wait until they are gone, then
    /// remove the stale `postmaster.pid`. The next start runs crash recovery.
    pub fn kill9(&mut self) -> Result<()> {
        let pid = self
            .postmaster_pid()
            .filter(|p| self.running && process_alive(*p))
            .ok_or_else(|| anyhow!("kill9: the server of {} is not running", self.root.display()))?;
        self.kill_tree(pid)?;
        self.running = false;
        Ok(())
    }

    /// A streaming standby of this (running) cluster: a new cluster directory whose data
    /// directory is `pg_basebackup -R` of this one, listening on its own socket, started.
    pub fn standby(&self) -> Result<Cluster> {
        let mut b = Cluster::builder().init()?;
        let own_conf = fs::read_to_string(b.data_dir.join("postgresql.conf"))?;
        fs::remove_dir_all(&b.data_dir)?;
        let mut backup = self.server_tool("pg_basebackup");
        backup.arg("-D").arg(&b.data_dir).args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run_command(&mut backup).context("pg_basebackup of the primary")?;
        // The standby's own socket and port, after the primary's settings it copied.
        let ours: String = own_conf
            .lines()
            .filter(|l| ["listen_addresses", "port", "unix_socket_directories"].iter().any(|k| l.starts_with(k)))
            .map(|l| format!("{l}\n"))
            .collect();
        b.append_conf(&ours)?;
        b.start_again()?;
        Ok(b)
    }

    /// Promotes a standby (`pg_ctl promote`, waiting until it is done).
    pub fn promote(&self) -> Result<()> {
        run_command(self.pg_ctl().arg("promote")).map(drop)
    }

    /// Keep this cluster's directory when dropped (like `NEON_TEST_KEEP=1`).
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    // ---- internals ----

    /// A command for a server-side binary: runs as the server user, cwd =
    /// cluster dir, clean PG* environment, C locale, stdin closed.
    fn server_command(&self, program: PathBuf) -> Command {
        let mut cmd = Command::new(program);
        clear_pg_env(&mut cmd);
        // `cargo run` and `cargo test` set it to dozens of build directories, which the dynamic
        // loader would search for every library at each start of `pg_ctl` and `postgres`: time
        // a benchmark of boot times would count, for a server that needs none of them.
        cmd.env_remove("LD_LIBRARY_PATH");
        run_as_server_user(&mut cmd).current_dir(&self.root).env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.server_command(pg_bin("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir).arg("-w").arg("-t").arg(PG_CTL_TIMEOUT_SECS.to_string());
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs `cmd` (`pg_ctl -w start`) until the postmaster it starts says in `postmaster.pid`
    /// that it is ready (looked at every 5 ms: pg_ctl looks every 100 ms, time a benchmark of
    /// boot times would count) — pg_ctl is then left to notice by itself, reaped in the
    /// background — or until pg_ctl ends first: its output then.
    fn pg_ctl_start(&self, cmd: &mut Command) -> Result<Option<Output>> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let pid_in = |text: &str| text.lines().next().and_then(|l| l.trim().parse::<i32>().ok());
        // A pid file a crashed postmaster left says "ready" too: only a new pid counts.
        let stale = fs::read_to_string(&pid_file).ok().and_then(|t| pid_in(&t));
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not run pg_ctl start for {}", self.data_dir.display()))?;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(Some(child.wait_with_output()?));
            }
            let ready = fs::read_to_string(&pid_file).ok().is_some_and(|t| {
                let status = t.lines().nth(7).map(str::trim);
                pid_in(&t).is_some_and(|pid| Some(pid) != stale && process_alive(pid))
                    && matches!(status, Some("ready") | Some("standby"))
            });
            if ready {
                thread::spawn(move || child.wait_with_output());
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let Some(pid) = self.postmaster_pid().filter(|p| process_alive(*p)) else {
            // Not running (never came up, or died): nothing to stop.
            return Ok(());
        };
        run_command(self.pg_ctl().args(["stop", "-m", mode]))?;
        // pg_ctl returns once postmaster.pid is gone, which the postmaster
        // removes just *before* exiting; wait for the process itself.
        if !wait_process_gone(pid, Duration::from_secs(30)) {
            bail!("postmaster {pid} still alive after `pg_ctl stop -m {mode}`");
        }
        Ok(())
    }

    /// Immediate shutdown, falling back to SIGKILL of the process tree.
    fn force_down(&mut self) -> Result<()> {
        let imm = self.pg_ctl_stop("immediate");
        if imm.is_ok() {
            self.running = false;
            return Ok(());
        }
        match self.postmaster_pid() {
            Some(pid) if process_alive(pid) => {
                self.kill_tree(pid)?;
                self.running = false;
                Ok(())
            }
            _ => {
                self.running = false;
                Ok(())
            }
        }
    }

    /// SIGSTOP the postmaster (no new children), SIGKILL its children, then
    /// itself, and wait for all of them to be gone.
    fn kill_tree(&self, pid: i32) -> Result<()> {
        let pm = Pid::from_raw(pid);
        let _ = kill(pm, Signal::SIGSTOP);
        let kids = children_of(pid);
        for &k in &kids {
            let _ = kill(Pid::from_raw(k), Signal::SIGKILL);
        }
        let _ = kill(pm, Signal::SIGKILL);
        for p in std::iter::once(pid).chain(kids) {
            if !wait_process_gone(p, Duration::from_secs(10)) {
                bail!("process {p} of cluster {} did not die after SIGKILL", self.root.display());
            }
        }
        // A killed process is a zombie until init reaps it, and a zombie
        // still "exists" for kill(pid, 0) — which is how a new postmaster
        // decides whether a lock file is stale. Give init a moment to reap,
        // then remove the lock files ourselves so the next start cannot trip
        // over them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let sock = self.root.join(format!(".s.PGSQL.{}", self.port));
        let _ = fs::remove_file(self.data_dir.join("postmaster.pid"));
        let _ = fs::remove_file(self.root.join(format!(".s.PGSQL.{}.lock", self.port)));
        let _ = fs::remove_file(&sock);
        Ok(())
    }

    fn wait_connectable(&self) -> Result<()> {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match postgres::Client::connect(&self.conn_str("postgres"), postgres::NoTls) {
                Ok(mut c) => {
                    if c.simple_query("select 1").is_ok() {
                        let _ = self.postmaster_pid(); // remembered
                        return Ok(());
                    }
                }
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "server started but does not accept connections: {e}\n\
                         --- server log (tail) ---\n{}",
                        self.log_tail(LOG_TAIL_LINES)
                    );
                }
                Err(_) => {}
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn sql_error(sql: &str, e: postgres::Error) -> anyhow::Error {
    let mut msg = String::from("SQL failed: ");
    if let Some(db) = e.as_db_error() {
        let _ = write!(msg, "{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
        if let Some(d) = db.detail() {
            let _ = write!(msg, "\nDETAIL: {d}");
        }
        if let Some(h) = db.hint() {
            let _ = write!(msg, "\nHINT: {h}");
        }
    } else {
        let _ = write!(msg, "{e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            let _ = write!(msg, ": {s}");
            src = s.source();
        }
    }
    let _ = write!(msg, "\n--- SQL ---\n{sql}");
    anyhow!(msg)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "neon-tests: test panicked; tail of server log {}:\n{}",
                self.log_file().display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        if self.running {
            if let Err(e) = self.stop() {
                eprintln!("neon-tests: stopping cluster {} on drop: {e:#}", self.root.display());
            }
        }
        if let Some(dir) = self.dir.take() {
            if self.keep {
                let path = dir.keep();
                eprintln!("neon-tests: NEON_TEST_KEEP: kept cluster dir {}", path.display());
            } else if let Err(e) = dir.close() {
                eprintln!("neon-tests: removing {}: {e}", self.root.display());
            }
        }
    }
}
