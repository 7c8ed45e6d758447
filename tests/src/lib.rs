//! # neon-tests: throwaway PostgreSQL 15 clusters for integration tests
//!
//! This crate is the test harness used by every integration test of the
//! project. It starts real, disposable PostgreSQL 15 servers (the Debian
//! packages, binaries in `/usr/lib/postgresql/15/bin`, overridable with the
//! `NEON_PG_BIN` environment variable) and tears them down again.
//!
//! ```no_run
//! use neon_tests::Cluster;
//!
//! let mut pg = Cluster::builder()
//!     .initdb_arg("--data-checksums")
//!     .guc("checkpoint_timeout", "1h")
//!     .start()?;
//! pg.execute("create table t(x int); insert into t values (1)")?;
//! assert_eq!(pg.query_one_string("select count(*) from t")?, "1");
//! pg.crash()?;          // immediate shutdown: no shutdown checkpoint
//! pg.start_again()?;    // crash recovery
//! # anyhow::Ok(())
//! ```
//!
//! ## How a cluster is laid out and run
//!
//! * Every cluster lives in its own temporary directory
//!   `$TMPDIR/neon-XXXXXX/` (falling back to `/tmp` when `$TMPDIR` is long or
//!   not reachable by the server user), containing `data/` (the data
//!   directory), `server.log` (the server's stderr) and the unix socket
//!   `.s.PGSQL.<port>`. Clusters never share anything, so tests may run in
//!   parallel.
//! * `initdb -U postgres --auth=trust -E UTF8 --locale=C --no-sync` is always
//!   used, so the database superuser is `postgres` whichever OS user ran it.
//!   (`--no-sync` only skips flushing initdb's own files to disk; a simulated
//!   crash of the server does not lose the OS page cache, so this is safe.)
//! * The server listens only on the unix socket in its own directory
//!   (`listen_addresses = ''`); [`ClusterBuilder::tcp`] additionally makes it
//!   listen on `127.0.0.1` at a free port.
//! * PostgreSQL refuses to run as root. When the tests run as root (CI, dev
//!   containers), `initdb`, `pg_ctl` and `postgres` are run as the `postgres`
//!   OS user ([`run_as_server_user`]) and the cluster directory is owned by
//!   it ([`chown_to_server_user`]). When not root, everything runs as the
//!   current user.
//! * Client tools ([`Cluster::tool`], [`Cluster::run_tool`]) run as the current
//!   user with `PGHOST`/`PGPORT`/`PGUSER`/`PGDATABASE`/`PGDATA` pointing at the
//!   cluster; tools that must run as the data directory's owner (`pg_resetwal`,
//!   `pg_rewind`, `postgres --single`, ...) go through [`Cluster::server_tool`].
//! * The server is stopped with `pg_ctl stop -m fast` (falling back to
//!   `-m immediate`, then to SIGKILL of the postmaster pid read from
//!   `postmaster.pid`). Processes are never killed by name.
//! * Dropping a [`Cluster`] — also while unwinding from a panic — stops its
//!   server and deletes its directory. When a test panics, the tail of the
//!   server log is printed (libtest shows it with the failure).
//!
//! ## Defaults
//!
//! `max_connections = 30`, `shared_buffers = 32MB`,
//! `max_prepared_transactions = 10`, `max_wal_senders = 10`,
//! `max_replication_slots = 10`, `log_line_prefix = '%m [%p] %q%a '`, PG15's
//! default `wal_level = replica` and `log_min_messages = warning`; `fsync`
//! stays on. Every default can be overridden with [`ClusterBuilder::guc`]
//! (gucs are appended to `postgresql.conf`; the last setting wins).
//!
//! ## Environment variables
//!
//! * `NEON_TEST_KEEP=1`: do not delete cluster directories on drop; their path
//!   is printed to stderr (run the test with `--nocapture` to see it).
//! * `NEON_PG_BIN=<dir>`: use PostgreSQL binaries from another directory.

pub mod pagemask;
pub mod pg_waldump;
pub mod workload;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where the PostgreSQL 15 binaries live unless `NEON_PG_BIN` says otherwise.
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Name of the database superuser of every cluster (`initdb -U postgres`).
pub const SUPERUSER: &str = "postgres";

/// OS user that runs the server when the tests run as root.
pub const SERVER_OS_USER: &str = "postgres";

/// Port used in unix-socket-only mode. The socket lives in the cluster's own
/// directory, so every cluster can use the same number without colliding.
const UNIX_ONLY_PORT: u16 = 5432;

/// How long to wait for start/stop (pg_ctl `-t`) and for the first connection.
/// Generous because CI machines are small and busy.
const PG_CTL_TIMEOUT_SECS: u32 = 120;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of server log included in error messages.
const LOG_TAIL_LINES: usize = 40;

// ---------------------------------------------------------------------------
// Free functions: binaries, users, commands
// ---------------------------------------------------------------------------

/// Directory with the PostgreSQL binaries (`$NEON_PG_BIN` or
/// [`DEFAULT_PG_BIN_DIR`]).
pub fn pg_bin_dir() -> PathBuf {
    match std::env::var_os("NEON_PG_BIN") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_PG_BIN_DIR),
    }
}

/// Full path of the PostgreSQL binary `name`, e.g. `pg_bin("pg_waldump")`.
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `(uid, gid)` the server runs as: the `postgres` OS user when we are root,
/// otherwise the current user and group.
///
/// # Panics
/// When running as root and no `postgres` OS user exists (install the
/// `postgresql-15` package, which creates it).
pub fn server_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        if is_root() {
            match nix::unistd::User::from_name(SERVER_OS_USER) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                Ok(None) => panic!(
                    "running as root, but there is no `{SERVER_OS_USER}` OS user to run \
                     PostgreSQL as (PostgreSQL refuses to run as root)"
                ),
                Err(e) => panic!("looking up OS user `{SERVER_OS_USER}`: {e}"),
            }
        } else {
            (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
        }
    })
}

/// Makes `cmd` run as the server OS user when we are root (no-op otherwise).
///
/// Uses [`CommandExt::uid`]/[`CommandExt::gid`]; when switching away from root
/// std also drops all supplementary groups (`setgroups(0, NULL)`), so the child
/// has exactly the `postgres` user's uid and primary gid. The child keeps the
/// parent's environment (including `HOME`) and working directory, so make sure
/// the working directory is accessible to that user (e.g. set
/// `current_dir` to a directory owned by it) and that all paths passed are
/// reachable by it.
pub fn run_as_server_user(cmd: &mut Command) -> &mut Command {
    if is_root() {
        let (uid, gid) = server_user();
        cmd.gid(gid).uid(uid);
    }
    cmd
}

/// Recursively gives `path` (file or directory tree, symlinks not followed) to
/// the server OS user when we are root; no-op otherwise.
pub fn chown_to_server_user(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = server_user();
    chown_recursive(path, uid, gid)
}

fn chown_recursive(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {} to {uid}:{gid}", path.display()))?;
    let meta = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            chown_recursive(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Removes all `PG*` variables (PGDATA, PGHOST, PGOPTIONS, PGSERVICE, ...)
/// inherited from the environment, so the developer's settings cannot leak
/// into a test.
pub fn clear_pg_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `cmd` to completion (stdin closed unless configured otherwise) and
/// returns its stdout as (lossy) UTF-8. Fails when it cannot be started or
/// exits non-zero; the error contains the command line, exit status, stderr
/// and stdout.
pub fn run_command(cmd: &mut Command) -> Result<String> {
    let out = output_of(cmd)?;
    if !out.status.success() {
        bail!("{}", describe_failure(cmd, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn output_of(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("could not run {}", command_line(cmd)))
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn describe_failure(cmd: &Command, out: &Output) -> String {
    let mut msg = format!("`{}` failed ({})", command_line(cmd), out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stderr.trim().is_empty() {
        let _ = write!(msg, "\n--- stderr ---\n{}", stderr.trim_end());
    }
    if !stdout.trim().is_empty() {
        let _ = write!(msg, "\n--- stdout (tail) ---\n{}", tail_lines(&stdout, LOG_TAIL_LINES));
    }
    msg
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether process `pid` exists and is not a zombie. (The postmaster is
/// reparented to init once `pg_ctl` exits; if init does not reap promptly a
/// dead postmaster lingers as a zombie, for which `kill(pid, 0)` still
/// succeeds — so this looks at `/proc/<pid>/stat` instead.)
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => match stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) {
            Some("Z") | Some("X") | Some("x") => false,
            Some(_) => true,
            // Unparseable: fall back to kill(pid, 0).
            None => kill(Pid::from_raw(pid), None).is_ok(),
        },
    }
}

/// Waits up to `timeout` for `pid` to be gone (or a zombie); true if it is.
pub fn wait_process_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !process_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of the live children of `pid` (from `/proc/*/stat`).
fn children_of(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return kids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) && !matches!(state, Some("Z") | Some("X")) {
            kids.push(child);
        }
    }
    kids
}

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
}

impl ClusterBuilder {
    /// Sets a server parameter, appended to `postgresql.conf` before the first
    /// start (after the harness defaults, so it overrides them). The value is
    /// quoted for you: `.guc("shared_buffers", "64MB")`.
    pub fn guc(mut self, name: &str, value: &str) -> Self {
        self.gucs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds an extra `initdb` argument, e.g. `"--data-checksums"` or
    /// `"--wal-segsize=1"`.
    pub fn initdb_arg(mut self, arg: &str) -> Self {
        self.initdb_args.push(arg.to_owned());
        self
    }

    /// Also listen on `127.0.0.1` at a free port (see [`Cluster::tcp_conn_str`]).
    /// Without this the server only listens on its unix socket.
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// Runs initdb and writes the configuration, but does not start the
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
            data_dir: root.join("data"),
            root,
            dir: Some(dir),
            port,
            tcp: self.tcp,
            running: false,
            keep: keep_requested(),
        };

        let mut initdb = cluster.server_command(pg_bin("initdb"));
        initdb
            .arg("-D")
            .arg(&cluster.data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .args(&self.initdb_args);
        run_command(&mut initdb).context("initdb failed")?;

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
    /// We started the server and have not stopped it since.
    running: bool,
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
        let s = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        s.lines().next()?.trim().parse().ok()
    }

    /// Whether the server we started is still up (postmaster alive).
    pub fn is_running(&self) -> bool {
        self.running && self.postmaster_pid().is_some_and(process_alive)
    }

    /// Starts the server (again): after [`stop`](Self::stop),
    /// [`crash`](Self::crash), [`kill9`](Self::kill9), or after
    /// [`ClusterBuilder::init`]. Waits with `pg_ctl -w` (which also waits for
    /// crash recovery to finish) and then for a successful connection. On
    /// failure the error contains the tail of the server log.
    pub fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("start_again: the server of {} is already running", self.root.display());
        }
        // Set before starting: if pg_ctl times out the postmaster may still
        // be up, and drop must then stop it.
        self.running = true;
        let mut cmd = self.pg_ctl();
        cmd.arg("-l").arg(self.log_file()).arg("start");
        let out = output_of(&mut cmd)?;
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
        run_as_server_user(&mut cmd).current_dir(&self.root).env("LC_ALL", "C").stdin(Stdio::null());
        cmd
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.server_command(pg_bin("pg_ctl"));
        cmd.arg("-D").arg(&self.data_dir).arg("-w").arg("-t").arg(PG_CTL_TIMEOUT_SECS.to_string());
        cmd
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

/// The `neon-sidecar` binary of this build (`target/<profile>/neon-sidecar`), built on demand
/// when a test runs before cargo has built it.
pub fn sidecar_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let profile_dir = exe.parent().and_then(Path::parent).context("test executable has no target dir")?;
    let bin = profile_dir.join("neon-sidecar");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "sidecar", "--bin", "neon-sidecar"]);
        if release {
            cmd.arg("--release");
        }
        run_command(&mut cmd)?;
    }
    Ok(bin)
}
