//! The page store's acceptance: the real `neon-sidecar run` follows a compute whose history
//! starts at its birth (`neon-sidecar init`) while pgbench and a DDL mix run — every index
//! type, TOAST, CREATE DATABASE with both strategies, DROP DATABASE, TRUNCATE, ALTER TABLE
//! rewrites, VACUUM FULL, prepared transactions, an unlogged table — and serves, over its
//! socket, every page of every relation fork of every database:
//!
//! * now: equal to the compute's files after CHECKPOINT, sizes included;
//! * in the past: at LSNs where the test copied the files after a CHECKPOINT, equal to those
//!   copies; relations and databases dropped later still read there, ones created later do not
//!   exist there;
//! * the metadata a data directory needs equals the compute's files at each of those LSNs:
//!   relation maps, CLOG and multixact pages, prepared transactions' state, the counters of
//!   pg_control's checkpoint;
//! * bad input gets clear errors: an LSN before history (naming the bounds), one that never
//!   arrives (after the wait), an unknown relation.

use anyhow::{Context, Result};
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{compare, compare_metadata, Snapshot};
use neon_tests::{workload, Cluster};
use neon_types::protocol::{ErrorCode, Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag};
use std::time::{Duration, Instant};

fn relnode(c: &Cluster, db: &str, rel: &str) -> Result<RelFileNode> {
    let mut conn = c.connect(db)?;
    let row = conn.query_one(
        "SELECT pg_relation_filenode($1::text::regclass)::oid, (SELECT oid FROM pg_database WHERE datname = current_database())",
        &[&rel],
    )?;
    Ok(RelFileNode { spcnode: 1663, dbnode: row.get(1), relnode: row.get(0) })
}

fn db_oid(c: &Cluster, db: &str) -> Result<u32> {
    Ok(c.query_one_string(&format!("SELECT oid FROM pg_database WHERE datname = '{db}'"))?.parse()?)
}

#[test]
fn every_page_of_every_database_now_and_in_the_past() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    let (origin, _) = sidecar.history()?;

    // Phase 1: everything the mixed workload does (leaves prepared transaction w2 open).
    c.execute("CREATE TABLE dropped_later AS SELECT g, md5(g::text) AS v FROM generate_series(1, 5000) g")?;
    c.execute("CREATE INDEX ON dropped_later (v)")?;
    workload::mixed(&c, 1)?;
    c.execute("CREATE TABLE prepared_target AS SELECT g FROM generate_series(1, 100) g")?;
    c.execute("BEGIN; UPDATE prepared_target SET g = -g WHERE g < 10; PREPARE TRANSACTION 'open_across';")?;
    let dropped = relnode(&c, "postgres", "dropped_later")?;
    let wal_db = db_oid(&c, "db_wal_log")?;
    let past1 = Snapshot::take(&c, "past1")?;

    // Phase 2: a FILE_COPY database from one that is then dropped, rewrites, drops, creations
    // — while a reader compares everything at past1 through the socket, beside ingest.
    let during = std::thread::scope(|s| -> Result<_> {
        let reader = s.spawn(|| compare(&sidecar, &past1, 1));
        c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
        c.execute("CREATE DATABASE db_copy STRATEGY = FILE_COPY TEMPLATE = db_wal_log")?;
        c.connect("db_copy")?
            .batch_execute("UPDATE t SET v = 'copy' WHERE g % 5 = 0; CREATE TABLE own AS SELECT 1 AS x")?;
        c.execute("DROP DATABASE db_wal_log")?;
        for sql in [
            "DROP TABLE dropped_later",
            "CREATE TABLE created_later AS SELECT g FROM generate_series(1, 3000) g",
            "TRUNCATE pgbench_history",
            "ALTER TABLE docs ALTER COLUMN id TYPE bigint",
            "VACUUM FULL pgbench_tellers",
            "COMMIT PREPARED 'open_across'",
        ] {
            c.execute(sql)?;
        }
        reader.join().expect("reader thread").context("comparing past1 during phase 2")
    })?;
    eprintln!("past1, read during phase 2: {during:?}");
    let created = relnode(&c, "postgres", "created_later")?;
    let past2 = Snapshot::take(&c, "past2")?;

    // Phase 3: more OLTP, deletes that let VACUUM truncate, a late database.
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    c.execute("DELETE FROM created_later WHERE g > 100")?;
    c.execute("VACUUM created_later")?;
    c.execute("CREATE DATABASE db_late")?;
    let now = Snapshot::live(&c)?;
    sidecar.wait_durable(now.lsn)?;

    // Databases whose visibility maps come from a WAL_LOG copy of template1: db_wal_log at
    // past1; db_copy (its file copy) at past2; db_copy and db_late now.
    for (name, snap, wal_log_copies) in [("now", &now, 2), ("past2", &past2, 1), ("past1", &past1, 1)] {
        let started = Instant::now();
        let n = compare(&sidecar, snap, wal_log_copies).with_context(|| format!("comparing {name}"))?;
        eprintln!("{name} ({}): {n:?} equal the compute's files, in {:?}", snap.lsn, started.elapsed());
        assert!(n.databases >= 4 && n.pages > 3000, "{name}: {n:?}");
        let m = compare_metadata(&store, snap).with_context(|| format!("metadata at {name}"))?;
        eprintln!("{name}: {m:?} equal the compute's");
        assert!(m.relmaps >= 5 && m.slru_pages >= 3, "{name}: {m:?}");
        // 'open_across' is prepared at past1 and committed by past2.
        assert_eq!(m.prepared, usize::from(name == "past1"), "{name}: {m:?}");
    }

    // Dropped later: still there in the past; created later: not there yet.
    let size = |rel: RelFileNode, lsn: Lsn| -> Result<Option<u32>> {
        match sidecar.ask(&Request::RelSize { rel: RelTag { node: rel, fork: ForkNumber::Main }, lsn, wait_ms: 0 })? {
            Response::Size(n) => Ok(n),
            r => anyhow::bail!("unexpected {r:?}"),
        }
    };
    assert!(size(dropped, past1.lsn)?.is_some_and(|n| n > 10));
    assert_eq!(size(dropped, now.lsn)?, None);
    assert_eq!(size(created, past1.lsn)?, None);
    assert!(size(created, past2.lsn)?.is_some());
    let dbs_at = |lsn| -> Result<Vec<u32>> {
        match sidecar.ask(&Request::ListDatabases { lsn, wait_ms: 0 })? {
            Response::Databases(d) => Ok(d.into_iter().map(|x| x.0).collect()),
            r => anyhow::bail!("unexpected {r:?}"),
        }
    };
    assert!(dbs_at(past1.lsn)?.contains(&wal_db) && !dbs_at(now.lsn)?.contains(&wal_db));

    // Bad input: clear errors, and the service goes on.
    let page = |lsn: Lsn, wait_ms: u32, node: RelFileNode| {
        let tag = BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno: 0 };
        sidecar.client().and_then(|mut cl| Ok(cl.request(&Request::GetPage { tag, lsn, wait_ms })?))
    };
    let accounts = relnode(&c, "postgres", "pgbench_accounts")?;
    match page(Lsn(origin.0 - 8), 0, accounts)? {
        Response::Error { code: ErrorCode::OutOfHistory, message } => {
            assert!(message.contains(&origin.to_string()), "{message}")
        }
        r => panic!("before history: {r:?}"),
    }
    let future = Lsn(now.lsn.0 + (1 << 30));
    let asked = Instant::now();
    match page(future, 300, accounts)? {
        Response::Error { code: ErrorCode::NotYet, message } => {
            assert!(message.contains(&future.to_string()), "{message}");
            assert!(asked.elapsed() >= Duration::from_millis(300));
        }
        r => panic!("future: {r:?}"),
    }
    match page(now.lsn, 0, RelFileNode { relnode: 999_999, ..accounts })? {
        Response::Error { code: ErrorCode::NotFound, message } => assert!(message.contains("999999"), "{message}"),
        r => panic!("unknown relation: {r:?}"),
    }
    assert!(matches!(page(now.lsn, 0, accounts)?, Response::Page(_)));

    // The command line over the socket.
    let cli = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(neon_tests::sidecar_bin()?)
            .args(args)
            .arg("--socket")
            .arg(sidecar.socket())
            .output()?;
        anyhow::ensure!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let status = cli(&["status"])?;
    assert!(status.contains(&format!("history_origin {origin}")) && status.contains("get_page_requests"), "{status}");
    let rel = format!("1663/5/{}", accounts.relnode);
    let shown = cli(&["get-page", "--rel", &rel, "--blkno", "0", "--lsn", &past1.lsn.to_string()])?;
    assert!(shown.contains(&format!("{rel} blk 0 at {}", past1.lsn)) && shown.contains("line pointers"), "{shown}");
    sidecar.stop()?;
    Ok(())
}
