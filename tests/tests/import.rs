//! History from a cluster's birth as the sidecar knows it: a compute is stopped cleanly, its
//! data files are imported as images at its shutdown checkpoint, and `follower::run` streams
//! from there. After pgbench and DDL, every page of every relation of database `postgres` —
//! catalogs and tables that existed before the import included — equals the compute's.

use anyhow::Result;
use neon_tests::pages::{compare_store_at, redo_config};
use neon_tests::store::{follow_while, replication_config};
use neon_tests::{workload, Cluster};
use sidecar::cli::init::checkpoint_lsn;
use sidecar::replication::client::ReplicationConn;
use sidecar::repo::import::import_datadir;
use sidecar::walredo::PostgresRedoManager;

#[test]
fn imported_cluster_then_streamed_history_serves_every_page() -> Result<()> {
    let mut c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    ReplicationConn::connect(&replication_config(&c))?.create_slot("neon_sidecar")?;
    c.execute("CREATE TABLE before_history (id int PRIMARY KEY, v text); INSERT INTO before_history SELECT g, md5(g::text) FROM generate_series(1, 3000) g")?;
    c.stop()?;
    let at = checkpoint_lsn(&neon_tests::pg_bin_dir(), c.data_dir())?;

    let store = c.root_dir().join("store");
    c.start_again()?;
    let s = neon_tests::store::new_store(&c, &store)?;
    c.stop()?;
    let repo = s.current();
    let stats = import_datadir(&repo, c.data_dir(), at, &Default::default())?;
    repo.flush()?;
    drop((repo, s));
    eprintln!("imported {} pages of {} relation forks at {at}", stats.pages, stats.relation_forks);
    assert!(stats.pages > 500);

    c.start_again()?;
    let now = follow_while(&c, &store, || {
        c.pgbench(&["-i", "-q", "-s", "1"])?;
        c.pgbench(&["-n", "-t", "200"])?;
        c.execute("UPDATE before_history SET v = 'changed' WHERE id % 10 = 0")?;
        c.execute("DELETE FROM before_history WHERE id > 2500")?;
        c.execute("VACUUM before_history")?;
        c.execute("CREATE INDEX ON before_history (v)")?;
        c.execute("CHECKPOINT")?;
        workload::flush_lsn(&c)
    })?;

    let repo = neon_tests::store::current_timeline(&store)?;
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "")?.expect_no_exceptions()?.pages;
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
    // Again: nothing is imported twice or appended twice.
    let again = init("init again")?;
    assert!(
        again.status.success()
            && String::from_utf8_lossy(&again.stdout).contains("already holds this cluster's history")
    );
    let conf = std::fs::read_to_string(c.data_dir().join("postgresql.conf"))?;
    assert_eq!(conf.matches("added by neon-sidecar init").count(), 1, "{conf}");

    c.start_again()?;
    // The product's settings are in effect: the extension preloaded, told where the sidecar is.
    assert_eq!(c.query_one_string("SHOW shared_preload_libraries")?, "neon");
    assert_eq!(c.query_one_string("SHOW wal_level")?, "replica");
    let socket = c.query_one_string("SHOW neon.sidecar_socket")?;
    assert_eq!(std::path::Path::new(&socket), c.root_dir().join("run/sidecar.sock"));
    let now = follow_while(&c, &store, || {
        c.pgbench(&["-i", "-q", "-s", "1"])?;
        c.execute("CHECKPOINT")?;
        workload::flush_lsn(&c)
    })?;
    let repo = neon_tests::store::current_timeline(&store)?;
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "")?.expect_no_exceptions()?.pages;
    eprintln!("after init: {n} pages of every relation of database postgres equal the compute's at {now}");
    assert!(n > 2000);
    Ok(())
}
