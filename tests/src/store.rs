//! Driving the sidecar's store against a test cluster: the replication settings that reach it,
//! copies of its data files as the oracle for an earlier LSN, waiting until a store is durable
//! to an LSN, and following the cluster with `follower::run` while a workload runs. Tests of
//! the page store share these so each says only what it checks.

use crate::Cluster;
use anyhow::{Context, Result};
use neon_types::Lsn;
use sidecar::follower::{self, FollowerConfig};
use sidecar::replication::client::ReplicationConfig;
use sidecar::repo::store::{Identity, Store};
use sidecar::repo::timeline::Timeline;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Replication as the superuser over the cluster's unix socket.
pub fn replication_config(c: &Cluster) -> ReplicationConfig {
    ReplicationConfig {
        host: c.socket_dir().display().to_string(),
        port: c.port(),
        user: crate::SUPERUSER.into(),
        password: None,
        application_name: "neon-sidecar".into(),
    }
}

/// A copy of the cluster's `base/` (take it right after a CHECKPOINT) under `<root>/<name>`,
/// to compare pages at that LSN with; returns the directory to read relation paths from.
pub fn copy_data_files(c: &Cluster, name: &str) -> Result<PathBuf> {
    let dest = c.root_dir().join(name);
    std::fs::create_dir_all(&dest)?;
    let ok = std::process::Command::new("cp").arg("-a").arg(c.data_dir().join("base")).arg(&dest).status()?.success();
    anyhow::ensure!(ok, "copying {} to {}", c.data_dir().join("base").display(), dest.display());
    Ok(dest)
}

/// Sets up a store in `dir` for the running cluster `c` (its system identifier, timeline 1)
/// with no history: history then begins wherever following begins, without a base, so only
/// relations created since are complete (`neon-sidecar init` and `attach` import a base).
pub fn new_store(c: &Cluster, dir: &Path) -> Result<Store> {
    let system_id = c.query_one_string("SELECT system_identifier FROM pg_control_system()")?.parse()?;
    let seg: u32 = c.query_one_string("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?.parse()?;
    Ok(Store::create(dir, Identity { system_id, wal_segment_size: seg }, 1)?)
}

/// The followed timeline of the store in `dir`, opened to read what is durable.
pub fn current_timeline(dir: &Path) -> Result<std::sync::Arc<Timeline>> {
    Ok(Store::open_read_only(dir)?.current())
}

/// Waits (up to a minute) until the store in `dir` is durable to `lsn`.
pub fn wait_durable(dir: &Path, lsn: Lsn) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let durable = current_timeline(dir)?.durable_lsn();
        if durable >= lsn {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the store reached only {durable}, not {lsn}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `follower::run` into the store at `dir` (slot `neon_sidecar`) while `work` runs, then
/// until the store is durable to the LSN `work` returns; stops the follower and returns it.
pub fn follow_while(c: &Cluster, dir: &Path, work: impl FnOnce() -> Result<Lsn>) -> Result<Lsn> {
    let cfg = FollowerConfig {
        replication: replication_config(c),
        store: dir.to_path_buf(),
        slot: "neon_sidecar".into(),
        flush_interval: Duration::from_millis(200),
        flush_bytes: 16 << 20,
        chain_limit: 0,
        remote_durable: None,
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let follower = s.spawn(|| follower::run(&cfg, &stop));
        let reached = work().and_then(|lsn| wait_durable(dir, lsn).map(|()| lsn));
        stop.store(true, Ordering::Relaxed);
        follower.join().expect("follower thread").context("the follower failed")?;
        reached
    })
}
