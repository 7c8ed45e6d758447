//! The `neon-sidecar` command line, one module per group of subcommands, each a thin shell over
//! the library:
//!
//! * [`args`] — arguments several commands share (a block, how to run redo, how to reach a
//!   compute); [`conf`] — what `init` and `attach` record in the store for `run`;
//! * [`waldump`] — `waldump`, the WAL decoder as `pg_waldump`;
//! * [`redo`] — `redo`, one page rebuilt by hand through a wal-redo process;
//! * [`init`] — `init` and `attach`: a compute's history into a new store;
//! * [`run`] — `run`, the daemon: follow the compute, serve pages;
//! * [`store`] — `get-page`, `status`, `import-wal`, `basebackup` against a store or a running
//!   sidecar;
//! * [`branch`] — `branch create|list|drop` against a running sidecar;
//! * [`time`] — `lsn-at` and `time-at`: times as LSNs and back;
//! * [`remote`] — `attach-remote`: a store made from the remote store alone.
pub mod args;
pub mod branch;
pub mod conf;
pub mod init;
pub mod redo;
pub mod remote;
pub mod run;
pub mod store;
pub mod time;
pub mod waldump;
