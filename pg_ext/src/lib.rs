//! The `neon` extension: the compute side of time-travel storage. It runs inside a stock
//! PostgreSQL 15 server (`CREATE EXTENSION neon`); it will grow the SQL API and the background
//! worker. It also carries the wal-redo loop ([`walredo`]) that the sidecar runs in
//! `postgres --single` processes to rebuild pages with PostgreSQL's own redo routines.

use pgrx::prelude::*;

mod walredo;

::pgrx::pg_module_magic!(name, version);

/// The extension's version, as built (`SELECT neon_version()`).
#[pg_extern(immutable, parallel_safe)]
fn neon_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The page size the extension was built for; must equal the server's (`SHOW block_size`).
#[pg_extern(immutable, parallel_safe)]
fn neon_block_size() -> i32 {
    neon_types::BLCKSZ as i32
}
