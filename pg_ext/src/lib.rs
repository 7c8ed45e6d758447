//! The `neon` extension: the compute side of time-travel storage. It runs inside a stock
//! PostgreSQL 15 server (`CREATE EXTENSION neon`) and will grow the SQL API, the background
//! worker and the wal-redo loop; for now it proves the build, install and load path with a
//! version function.

use pgrx::prelude::*;

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
