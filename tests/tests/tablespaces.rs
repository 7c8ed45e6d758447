//! Tablespaces end to end: created and dropped; tables, indexes and databases in them (a
//! database's default tablespace, a FILE_COPY database from a template spread over three
//! tablespaces); moved between them (`ALTER TABLE/INDEX … SET TABLESPACE`, `ALTER DATABASE …
//! SET TABLESPACE`). Every page of every relation fork of every database equals the compute's
//! at two LSNs, as do relation maps; base backups boot — tablespaces in place, or mapped to a
//! directory of their own — and dump the same as the compute did; and `attach` takes the
//! running server, tablespaces and all, into a new store that serves the same pages.

use anyhow::Result;
use neon_tests::sidecar::{basebackup_from_store, boot_basebackup, cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{compare, compare_metadata, Snapshot};
use neon_tests::workload::dump_all;
use neon_tests::Cluster;
use std::path::Path;

fn oid(c: &Cluster, sql: &str) -> Result<u32> {
    Ok(c.query_one_string(sql)?.parse()?)
}

#[test]
fn tables_indexes_and_databases_in_tablespaces_and_moved_between_them() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    let (ts1, ts2, ts3) = (c.tablespace_dir("ts1")?, c.tablespace_dir("ts2")?, c.tablespace_dir("ts3")?);
    for (name, dir) in [("ts1", &ts1), ("ts2", &ts2), ("ts3", &ts3)] {
        c.execute(&format!("CREATE TABLESPACE {name} LOCATION '{dir}'"))?;
    }
    c.execute(
        "CREATE TABLE t_ts (id int PRIMARY KEY USING INDEX TABLESPACE ts2, v text) TABLESPACE ts1;
         INSERT INTO t_ts SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 5000) g;
         CREATE INDEX t_ts_v ON t_ts (v) TABLESPACE ts1;
         CREATE UNLOGGED TABLE u_ts (id int) TABLESPACE ts2; INSERT INTO u_ts SELECT generate_series(1, 100);
         CREATE TABLE short_lived (id int) TABLESPACE ts3; INSERT INTO short_lived VALUES (1);",
    )?;
    // A database whose default is a tablespace, with tables in two others.
    c.execute("CREATE DATABASE db_ts TABLESPACE ts1")?;
    c.connect("db_ts")?.batch_execute(
        "CREATE TABLE home AS SELECT g, md5(g::text) AS v FROM generate_series(1, 3000) g;
         CREATE TABLE elsewhere (id int PRIMARY KEY) TABLESPACE ts2; INSERT INTO elsewhere SELECT generate_series(1, 2000);
         CREATE TABLE in_default (id int) TABLESPACE pg_default; INSERT INTO in_default SELECT generate_series(1, 500);",
    )?;
    c.execute("CREATE DATABASE db_move")?;
    c.connect("db_move")?.batch_execute("CREATE TABLE m AS SELECT g FROM generate_series(1, 2000) g")?;
    let past = Snapshot::take(&c, "past")?;

    // Copies and moves.
    c.execute("CREATE DATABASE db_fc TEMPLATE db_ts STRATEGY FILE_COPY")?;
    c.connect("db_fc")?.batch_execute("UPDATE home SET v = 'copied' WHERE g % 7 = 0")?;
    c.execute("ALTER TABLE t_ts SET TABLESPACE ts2")?;
    c.execute("ALTER INDEX t_ts_v SET TABLESPACE pg_default")?;
    c.execute("ALTER DATABASE db_move SET TABLESPACE ts2")?;
    c.connect("db_move")?.batch_execute("INSERT INTO m SELECT generate_series(1, 100)")?;
    c.execute("DROP TABLE short_lived")?;
    c.execute("DROP TABLESPACE ts3")?;
    c.execute("UPDATE t_ts SET v = 'after' WHERE id % 11 = 0")?;
    let now = Snapshot::take(&c, "now")?;
    let dumps = dump_all(&c)?;
    sidecar.wait_durable(now.lsn)?;

    // Visibility maps from WAL_LOG copies of template1: db_ts and db_move at past, and
    // db_fc (a file copy of db_ts) now.
    for (name, snap, wal_log_copies) in [("now", &now, 3), ("past", &past, 2)] {
        let n = compare(&sidecar, snap, wal_log_copies)?;
        eprintln!("{name} ({}): {n:?} equal the compute's", snap.lsn);
        assert!(n.databases >= 5 && n.pages > 1000, "{name}: {n:?}");
        let m = compare_metadata(&store, snap)?;
        eprintln!("{name}: {m:?} equal the compute's");
    }

    // A base backup boots: tablespaces in place, then one of them mapped to a directory.
    let tar = c.root_dir().join("base.tar");
    basebackup_from_store(&store, now.lsn, &tar, &[])?;
    let b = boot_basebackup(&tar)?;
    assert_eq!(dump_all(&b)?, dumps, "pg_dump of the copy with tablespaces in place");
    b.run_tool(
        "pg_amcheck",
        &["--all", "--heapallindexed", "--install-missing", "--maintenance-db", &b.conn_str("postgres")],
    )?;
    assert_eq!(b.query_one_string("SELECT count(*) FROM pg_tablespace WHERE spcname LIKE 'ts%'")?, "2");
    drop(b);
    let ts1_oid = oid(&c, "SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'")?;
    let mapped = c.root_dir().join("ts1-copy");
    let tar = c.root_dir().join("mapped.tar");
    basebackup_from_store(&store, now.lsn, &tar, &[&format!("--tablespace-map={ts1_oid}={}", mapped.display())])?;
    neon_tests::chown_to_server_user(&mapped)?;
    assert!(Path::new(&mapped).join("PG_15_202209061").is_dir());
    let b = boot_basebackup(&tar)?;
    assert_eq!(
        b.query_one_string("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts1'")?,
        mapped.display().to_string()
    );
    assert_eq!(dump_all(&b)?, dumps, "pg_dump of the copy with ts1 mapped");
    drop(b);
    sidecar.stop()?;

    // attach takes the running server, tablespaces and all.
    let attached = c.root_dir().join("attached");
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["attach", "--host"])
        .arg(c.socket_dir())
        .args(["--port", &c.port().to_string(), "--slot", "attached", "--store"])
        .arg(&attached)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "attach: {text}");
    let sidecar = SidecarProcess::start_with(&c, &attached, &["--slot", "attached"])?;
    c.execute("INSERT INTO t_ts SELECT g, 'late' FROM generate_series(5001, 5100) g")?;
    let later = Snapshot::take(&c, "later")?;
    sidecar.wait_durable(later.lsn)?;
    // Attached from a base backup: every page as the compute has it, no WAL_LOG copy.
    let n = compare(&sidecar, &later, 0)?;
    eprintln!("attached ({}): {n:?} equal the compute's", later.lsn);
    sidecar.stop()
}
