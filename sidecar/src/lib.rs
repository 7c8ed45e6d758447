//! The sidecar library: everything the `neon-sidecar` daemon does, usable from tests and
//! benchmarks without the binary: the WAL decoder (`wal`), page reconstruction (`walredo`), and
//! the commands built on them (`waldump`, `redo_cli`).

pub mod basebackup;
pub mod cli_args;
pub mod follower;
pub mod ingest;
pub mod init_cli;
pub mod page_cache;
pub mod redo_cli;
pub mod repo;
pub mod service;
pub mod store_cli;
pub mod wal;
pub mod waldump;
pub mod walredo;
