//! Base backups at five LSNs of a compute living through pgbench and the DDL mix (every index
//! type, TOAST, CREATE DATABASE both ways, DROP DATABASE, TRUNCATE, rewrites, VACUUM FULL,
//! an unlogged table, multixacts from shared row locks, prepared transactions, a transaction
//! open across the LSN). At each LSN the test records `pg_dump` of every database while the
//! compute is quiet; afterwards each LSN's backup boots on stock PostgreSQL 15 without replay
//! and every database dumps the same (sequences up to 32 values ahead, as redo logs them and
//! any point-in-time recovery gives them), and `pg_amcheck --heapallindexed` passes.

use anyhow::{Context, Result};
use neon_tests::sidecar::{boot_basebackup, cluster_born_with_store, SidecarProcess};
use neon_tests::workload::dump_all;
use neon_tests::{workload, Cluster};
use neon_types::Lsn;
use std::collections::BTreeMap;

#[test]
fn five_past_lsns_boot_and_equal_their_dumps() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    let mut marks: Vec<(Lsn, BTreeMap<String, String>)> = Vec::new();
    let mut mark = |c: &Cluster| -> Result<()> {
        marks.push((workload::flush_lsn(c)?, dump_all(c)?));
        Ok(())
    };

    c.pgbench(&["-i", "-q", "-s", "1"])?;
    mark(&c)?;
    workload::mixed(&c, 1)?;
    mark(&c)?;
    // Prepared and open across the next mark; row locks of two sessions (multixacts).
    c.execute("CREATE TABLE held AS SELECT g FROM generate_series(1, 100) g")?;
    c.execute("BEGIN; UPDATE held SET g = -g WHERE g < 5; PREPARE TRANSACTION 'across';")?;
    let mut open = c.connect("postgres")?;
    open.batch_execute("BEGIN; INSERT INTO held VALUES (1000)")?;
    {
        let mut a = c.connect("postgres")?;
        let mut b = c.connect("postgres")?;
        a.batch_execute("BEGIN; SELECT * FROM held WHERE g > 50 FOR SHARE")?;
        b.batch_execute("BEGIN; SELECT * FROM held WHERE g > 50 FOR SHARE")?;
        a.batch_execute("COMMIT")?;
        b.batch_execute("COMMIT")?;
    }
    mark(&c)?;
    open.batch_execute("COMMIT")?;
    c.execute("COMMIT PREPARED 'across'")?;
    c.execute("CREATE DATABASE late_copy STRATEGY = FILE_COPY TEMPLATE = db_wal_log")?;
    c.connect("late_copy")?.batch_execute("UPDATE t SET v = 'late' WHERE g % 3 = 0")?;
    c.execute("DROP DATABASE db_wal_log")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    c.execute("TRUNCATE pgbench_history")?;
    c.execute("VACUUM FULL docs")?;
    mark(&c)?;
    c.execute("ALTER TABLE pgbench_tellers ADD COLUMN note text DEFAULT 'x'")?;
    c.execute("ALTER TABLE held ALTER COLUMN g TYPE bigint")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    mark(&c)?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    sidecar.stop()?;

    for (i, (lsn, dumps)) in marks.iter().enumerate() {
        let tar = c.root_dir().join(format!("base-{i}.tar"));
        let out = std::process::Command::new(neon_tests::sidecar_bin()?)
            .args(["basebackup", "--store", store.to_str().unwrap(), "--lsn", &lsn.to_string(), "--out"])
            .arg(&tar)
            .output()?;
        anyhow::ensure!(out.status.success(), "basebackup at {lsn}: {}", String::from_utf8_lossy(&out.stderr));
        let b = boot_basebackup(&tar).with_context(|| format!("booting the backup at {lsn}"))?;
        let log = b.log_contents();
        anyhow::ensure!(!log.contains("redo starts"), "the backup at {lsn} replayed WAL: {log}");
        let theirs = dump_all(&b)?;
        workload::expect_dumps_equal(c.root_dir(), *lsn, dumps, &theirs)?;
        b.run_tool(
            "pg_amcheck",
            &["--all", "--heapallindexed", "--install-missing", "--maintenance-db", &b.conn_str("postgres")],
        )
        .with_context(|| format!("pg_amcheck of the backup at {lsn}"))?;
        eprintln!("{lsn}: boots without replay; {} databases dump as recorded; pg_amcheck passes", dumps.len());
    }
    Ok(())
}
