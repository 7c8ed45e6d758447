//! The sidecar library: everything the `neon-sidecar` daemon does, usable from tests and
//! benchmarks without the binary. For now it holds the WAL decoder (`wal`), which every later
//! part (ingest, the page store, base backups) consumes.

pub mod wal;
pub mod waldump;
pub mod walredo;
