//! History from a cluster's birth as the sidecar knows it: a compute is stopped cleanly, its
//! data files are imported as images at its shutdown checkpoint, and `follower::run` streams
//! from there. After pgbench and DDL, every page of every relation of database `postgres` —
//! catalogs and tables that existed before the import included — equals the compute's.

use anyhow::{Context, Result};
use neon_tests::pages::{compare_store_at, redo_config};
use neon_tests::{workload, Cluster};
use neon_types::Lsn;
use sidecar::follower::{self, FollowerConfig};
use sidecar::ingest::replication::{ReplicationConfig, ReplicationConn};
use sidecar::repo::import::import_datadir;
use sidecar::repo::store::Repository;
use sidecar::walredo::PostgresRedoManager;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[test]
fn imported_cluster_then_streamed_history_serves_every_page() -> Result<()> {
    let mut c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    let replication = ReplicationConfig {
        host: c.socket_dir().display().to_string(),
        port: c.port(),
        user: "postgres".into(),
        password: None,
        application_name: "neon-sidecar".into(),
    };
    ReplicationConn::connect(&replication)?.create_slot("neon_sidecar")?;
    c.execute("CREATE TABLE before_history (id int PRIMARY KEY, v text); INSERT INTO before_history SELECT g, md5(g::text) FROM generate_series(1, 3000) g")?;
    c.stop()?;
    let control = c.run_tool("pg_controldata", &[c.data_dir().to_str().unwrap()])?;
    let line =
        control.lines().find(|l| l.starts_with("Latest checkpoint location:")).context("no checkpoint location")?;
    let at: Lsn = line.rsplit(' ').next().unwrap_or_default().parse()?;

    let store = c.root_dir().join("store");
    let mut repo = Repository::open(&store)?;
    let stats = import_datadir(&mut repo, c.data_dir(), at)?;
    repo.flush()?;
    drop(repo);
    eprintln!("imported {} pages of {} relation forks at {at}", stats.pages, stats.relation_forks);
    assert!(stats.pages > 500);

    c.start_again()?;
    let cfg = FollowerConfig {
        replication,
        store: store.clone(),
        slot: "neon_sidecar".into(),
        flush_interval: Duration::from_millis(200),
        flush_bytes: 16 << 20,
    };
    let stop = AtomicBool::new(false);
    let now = std::thread::scope(|s| -> Result<Lsn> {
        let follower = s.spawn(|| follower::run(&cfg, &stop));
        let work = (|| -> Result<Lsn> {
            c.pgbench(&["-i", "-q", "-s", "1"])?;
            c.pgbench(&["-n", "-t", "200"])?;
            c.execute("UPDATE before_history SET v = 'changed' WHERE id % 10 = 0")?;
            c.execute("DELETE FROM before_history WHERE id > 2500")?;
            c.execute("VACUUM before_history")?;
            c.execute("CREATE INDEX ON before_history (v)")?;
            c.execute("CHECKPOINT")?;
            let now = workload::flush_lsn(&c)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while Repository::open_read_only(&store)?.durable_lsn() < now {
                anyhow::ensure!(Instant::now() < deadline, "the follower never reached {now}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(now)
        })();
        stop.store(true, Ordering::Relaxed);
        follower.join().expect("follower thread")?;
        work
    })?;

    let repo = Repository::open(&store)?;
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "")?;
    eprintln!("{n} pages of every relation of database postgres equal the compute's at {now}");
    assert!(n > 2000);
    Ok(())
}

#[test]
fn neon_sidecar_init_starts_history_at_the_clusters_birth() -> Result<()> {
    let mut c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).init()?;
    let store = c.root_dir().join("store");
    let init = |what: &str| -> Result<std::process::Output> {
        let out = std::process::Command::new(neon_tests::sidecar_bin()?)
            .args(["init", "--pgdata", c.data_dir().to_str().unwrap(), "--store", store.to_str().unwrap()])
            .output()?;
        eprintln!("{what}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok(out)
    };
    let first = init("init")?;
    assert!(first.status.success() && String::from_utf8_lossy(&first.stdout).contains("imported"));
    let again = init("init again")?;
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already holds history"));

    c.start_again()?;
    let cfg = FollowerConfig {
        replication: ReplicationConfig {
            host: c.socket_dir().display().to_string(),
            port: c.port(),
            user: "postgres".into(),
            password: None,
            application_name: "neon-sidecar".into(),
        },
        store: store.clone(),
        slot: "neon_sidecar".into(),
        flush_interval: Duration::from_millis(200),
        flush_bytes: 16 << 20,
    };
    let stop = AtomicBool::new(false);
    let now = std::thread::scope(|s| -> Result<Lsn> {
        let follower = s.spawn(|| follower::run(&cfg, &stop));
        let work = (|| -> Result<Lsn> {
            c.pgbench(&["-i", "-q", "-s", "1"])?;
            c.execute("CHECKPOINT")?;
            let now = workload::flush_lsn(&c)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while Repository::open_read_only(&store)?.durable_lsn() < now {
                anyhow::ensure!(Instant::now() < deadline, "the follower never reached {now}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(now)
        })();
        stop.store(true, Ordering::Relaxed);
        follower.join().expect("follower thread")?;
        work
    })?;
    let repo = Repository::open(&store)?;
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "")?;
    eprintln!("after init: {n} pages of every relation of database postgres equal the compute's at {now}");
    assert!(n > 2000);
    Ok(())
}
