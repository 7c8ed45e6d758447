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
//!
//! ## Modules
//!
//! * `cluster`: [`Cluster`] and [`ClusterBuilder`].
//! * `os_user`: which OS user the server runs as ([`is_root`],
//!   [`server_user`], [`run_as_server_user`], [`chown_to_server_user`]).
//! * `process`: running commands and watching processes ([`run_command`],
//!   [`clear_pg_env`], [`tail_lines`], [`process_alive`],
//!   [`wait_process_gone`]).
//! * `bins`: where the binaries come from ([`pg_bin_dir`], [`pg_bin`],
//!   [`sidecar_bin`]).
//! * [`pagemask`], [`pg_waldump`], [`workload`]: page comparison, parsing
//!   `pg_waldump` output, and WAL-producing workloads; [`mount`]: a small tmpfs (a disk that
//!   fills up).
//!
//! Everything from the private modules is re-exported here, so it is used as
//! `neon_tests::Cluster`, `neon_tests::run_command`, ...

mod bins;
mod cluster;
mod os_user;
mod process;

pub mod bench;
pub mod demo;
pub mod mount;
pub mod pagemask;
pub mod pages;
pub mod pg_waldump;
pub mod recovery;
pub mod seaweed;
pub mod sidecar;
pub mod snapshot;
pub mod store;
pub mod workload;

pub use bins::{pg_bin, pg_bin_dir, sidecar_bin, DEFAULT_PG_BIN_DIR};
pub use cluster::{Cluster, ClusterBuilder, SUPERUSER};
pub use os_user::{chown_to_server_user, is_root, run_as_server_user, server_user, SERVER_OS_USER};
pub use process::{clear_pg_env, process_alive, run_command, tail_lines, wait_process_gone};
