//! The sidecar library: everything the `neon-sidecar` daemon does, usable from tests and
//! benchmarks without the binary. Modules follow the data: WAL arrives over `replication`,
//! `wal` decodes it, `repo` files it by (key, LSN) (the `follower` loop drives the two),
//! `walredo` rebuilds pages from it, `basebackup` writes data directories as of an LSN,
//! `branch` mounts writable ones whose pages are rebuilt when read, `past` runs read-only
//! servers on branches for the compute to query, `remote` keeps history in an object store,
//! and `service` (with its `page_cache`) answers the compute; `cli` is the command line over
//! all of them.

pub mod basebackup;
pub mod branch;
pub mod cli;
pub mod conf_file;
pub mod follower;
pub mod page_cache;
pub mod past;
pub mod remote;
pub mod replication;
pub mod repo;
pub mod service;
pub mod wal;
pub mod walredo;
