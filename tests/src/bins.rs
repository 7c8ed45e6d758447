//! Where the binaries the tests run come from: the PostgreSQL 15 installation
//! ([`pg_bin_dir`], [`pg_bin`]) and this workspace's own `neon-sidecar`
//! ([`sidecar_bin`]). [`crate::Cluster`] starts its servers and tools from
//! [`pg_bin`]; tests that drive the sidecar get its path from [`sidecar_bin`].

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::process::run_command;

/// Where the PostgreSQL 15 binaries live unless `NEON_PG_BIN` says otherwise.
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

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

/// The `neon-sidecar` binary of this build (`target/<profile>/neon-sidecar`), built on demand
/// when a test runs before cargo has built it.
pub fn sidecar_bin() -> Result<PathBuf> {
    static BUILT: std::sync::OnceLock<std::result::Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
            // Test executables live in target/<profile>/deps, binaries (benchmarks, the demo)
            // in target/<profile>.
            let dir = exe.parent().ok_or("the executable has no directory")?;
            let profile_dir = if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent().ok_or("test executable has no target dir")?
            } else {
                dir
            };
            // Build it once per test process: a no-op when it is up to date, and never a stale
            // binary when only this package's tests were built.
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-q", "-p", "sidecar", "--bin", "neon-sidecar"]);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            run_command(&mut cmd).map_err(|e| format!("{e:#}"))?;
            Ok(profile_dir.join("neon-sidecar"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("building neon-sidecar: {e}"))
}
