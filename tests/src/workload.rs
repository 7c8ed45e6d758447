//! Workloads that make a real PostgreSQL 15 server write every kind of WAL the product must
//! understand: pgbench, TOAST, every index type, CREATE/DROP DATABASE (both strategies),
//! TRUNCATE, DROP TABLE, VACUUM, prepared and sub-transactions, an unlogged table, stretches
//! under each `wal_compression` method, and a segment switch. Tests and the demo share them, so
//! what the demo shows is what the tests check.

use crate::Cluster;
use anyhow::{Context, Result};
use neon_types::Lsn;

/// The file of `pgbench_accounts` now (in the connection's database, `postgres`).
pub fn pgbench_accounts_file(c: &Cluster) -> Result<neon_types::RelFileNode> {
    let ids = c.query_one_string(
        "SELECT (SELECT oid FROM pg_database WHERE datname = current_database()) || ' ' || \
         pg_relation_filenode('pgbench_accounts')",
    )?;
    let (db, rel) = ids.split_once(' ').context("two numbers")?;
    Ok(neon_types::RelFileNode { spcnode: 1663, dbnode: db.parse()?, relnode: rel.parse()? })
}

/// The server's current WAL insert position.
pub fn insert_lsn(c: &Cluster) -> Result<Lsn> {
    lsn_query(c, "SELECT pg_current_wal_insert_lsn()::text")
}

/// The server's current WAL flush position (everything before it is on disk).
pub fn flush_lsn(c: &Cluster) -> Result<Lsn> {
    lsn_query(c, "SELECT pg_current_wal_flush_lsn()::text")
}

fn lsn_query(c: &Cluster, sql: &str) -> Result<Lsn> {
    let text = c.query_one_string(sql)?;
    text.parse().with_context(|| format!("server returned {text:?} for {sql}"))
}

/// Sets `wal_compression` for the whole server and forces the next change of every page to
/// carry a full-page image, so the following work writes images compressed that way.
pub fn set_wal_compression(c: &Cluster, method: &str) -> Result<()> {
    c.execute(&format!("ALTER SYSTEM SET wal_compression = '{method}'"))?;
    c.execute("SELECT pg_reload_conf()")?;
    // Wait until this backend sees the new value, then start a new checkpoint cycle.
    let mut seen = String::new();
    for _ in 0..250 {
        seen = c.query_one_string("SHOW wal_compression")?;
        if seen == method {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::ensure!(seen == method, "wal_compression is still '{seen}' 5 s after setting '{method}'");
    c.execute("CHECKPOINT")
}

/// GUCs the mixed workload needs (prepared transactions; no WAL removed while tests read it).
pub const MIXED_GUCS: &[(&str, &str)] = &[
    ("max_prepared_transactions", "10"),
    ("wal_keep_size", "4GB"),
    ("max_wal_size", "4GB"),
    ("checkpoint_timeout", "1h"),
];

/// The mixed workload. `scale` is pgbench's scale factor; 1 keeps tests quick.
pub fn mixed(c: &Cluster, scale: u32) -> Result<()> {
    c.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;

    // TOAST (every tenth body is ~25 kB of incompressible text) and a table for every index.
    c.execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, tags text[], pos point, words tsvector, span int4range);
         INSERT INTO docs
         SELECT g,
                (SELECT string_agg(md5(g::text || ':' || i), '') FROM generate_series(1, CASE WHEN g % 10 = 0 THEN 800 ELSE 3 END) i),
                ARRAY['t' || (g % 7), 'u' || (g % 13)],
                point(g % 100, g / 100),
                to_tsvector('simple', 'word' || (g % 50) || ' other' || (g % 17)),
                int4range(g, g + 10)
         FROM generate_series(1, 4000) g;",
    )?;
    c.execute(
        "CREATE INDEX docs_btree ON docs (left(body, 16), id);
         CREATE INDEX docs_hash ON docs USING hash (id);
         CREATE INDEX docs_gin ON docs USING gin (tags);
         CREATE INDEX docs_gin_ts ON docs USING gin (words);
         CREATE INDEX docs_gist ON docs USING gist (pos);
         CREATE INDEX docs_gist_range ON docs USING gist (span);
         CREATE INDEX docs_spgist ON docs USING spgist (pos);
         CREATE INDEX docs_brin ON docs USING brin (id) WITH (pages_per_range = 4);",
    )?;
    // Changes after the builds write the indexes' own insert/split/vacuum records.
    c.execute(
        "INSERT INTO docs SELECT g, md5(g::text), ARRAY['t' || (g % 5)], point(g % 30, g % 70),
                to_tsvector('simple', 'fresh' || (g % 9)), int4range(g, g + 3)
         FROM generate_series(4001, 7000) g;
         UPDATE docs SET tags = tags || 'x'::text, pos = point(pos[0] + 1, pos[1]) WHERE id % 3 = 0;
         DELETE FROM docs WHERE id % 11 = 0;",
    )?;
    c.execute("VACUUM docs")?;

    // Transactions: subtransactions, a committed and an open prepared transaction, row locks.
    c.execute(
        "BEGIN;
         INSERT INTO docs (id, body) VALUES (100001, 'outer');
         SAVEPOINT a;
         INSERT INTO docs (id, body) VALUES (100002, 'rolled back');
         ROLLBACK TO a;
         SAVEPOINT b;
         INSERT INTO docs (id, body) VALUES (100003, 'kept');
         RELEASE b;
         COMMIT;
         BEGIN; INSERT INTO docs (id, body) VALUES (100004, 'prepared'); PREPARE TRANSACTION 'w1';",
    )?;
    c.execute("COMMIT PREPARED 'w1'")?;
    c.execute("BEGIN; UPDATE docs SET body = 'pending' WHERE id = 1; PREPARE TRANSACTION 'w2';")?;
    // Two sessions sharing row locks create multixacts.
    {
        let mut a = c.connect("postgres")?;
        let mut b = c.connect("postgres")?;
        a.batch_execute("BEGIN; SELECT id FROM docs WHERE id BETWEEN 2 AND 60 FOR SHARE")?;
        b.batch_execute("BEGIN; SELECT id FROM docs WHERE id BETWEEN 2 AND 60 FOR KEY SHARE")?;
        a.batch_execute("COMMIT")?;
        b.batch_execute("COMMIT")?;
    }

    // Databases: PG15's default WAL_LOG strategy and the old FILE_COPY one; then drop one.
    c.execute("CREATE DATABASE db_wal_log")?;
    c.execute("CREATE DATABASE db_file_copy STRATEGY = FILE_COPY")?;
    {
        let mut db = c.connect("db_wal_log")?;
        db.batch_execute(
            "CREATE TABLE t AS SELECT g, repeat('y', g % 100) AS v FROM generate_series(1, 3000) g;
             CREATE INDEX ON t (g);",
        )?;
    }
    c.execute("DROP DATABASE db_file_copy")?;

    // Relation life cycle: TRUNCATE, rewrite, DROP, an unlogged table, a sequence.
    // (VACUUM refuses to run in the implicit transaction of a multi-statement string.)
    for sql in [
        "CREATE TABLE scratch AS SELECT g FROM generate_series(1, 20000) g",
        "TRUNCATE scratch",
        "INSERT INTO scratch SELECT generate_series(1, 500)",
        "ALTER TABLE scratch ALTER COLUMN g TYPE bigint",
        "VACUUM FULL scratch",
        "DROP TABLE scratch",
        "CREATE UNLOGGED TABLE scratch_unlogged AS SELECT g FROM generate_series(1, 1000) g",
        "CREATE SEQUENCE seq",
        "SELECT nextval('seq') FROM generate_series(1, 100)",
    ] {
        c.execute(sql)?;
    }

    // Full-page images under each compression method.
    for method in ["lz4", "pglz", "zstd"] {
        set_wal_compression(c, method)?;
        c.pgbench(&["-n", "-c", "1", "-t", "100"])?;
        c.execute("UPDATE docs SET span = int4range(id, id + 20) WHERE id % 7 = 0")?;
    }
    set_wal_compression(c, "off")?;

    c.execute("SELECT pg_switch_wal()")?;
    c.execute("INSERT INTO docs (id, body) VALUES (100005, 'after the switch')")?;
    c.execute("ROLLBACK PREPARED 'w2'")?;
    Ok(())
}

/// `pg_dump` of `db`, without what cannot survive a restore by design (unlogged tables' rows)
/// or differs on every run (the `\restrict` key of pg_dump 15.14+).
pub fn dump(c: &Cluster, db: &str) -> Result<String> {
    let text = c.run_tool("pg_dump", &["--no-sync", "--no-unlogged-table-data", "-d", &c.conn_str(db)])?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// [`dump`] of every database that takes connections, by name.
pub fn dump_all(c: &Cluster) -> Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for row in c.query_rows("SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY 1")? {
        let db = row[0].clone().unwrap_or_default();
        out.insert(db.clone(), dump(c, &db)?);
    }
    Ok(out)
}

/// The `setval` lines of a dump: sequence name and value.
fn dump_sequences(dump: &str) -> std::collections::BTreeMap<String, i64> {
    dump.lines()
        .filter_map(|l| l.strip_prefix("SELECT pg_catalog.setval('"))
        .filter_map(|l| {
            let (name, rest) = l.split_once("', ")?;
            Some((name.to_string(), rest.split(',').next()?.trim().parse().ok()?))
        })
        .collect()
}

fn without_setval(dump: &str) -> String {
    dump.lines().filter(|l| !l.starts_with("SELECT pg_catalog.setval(")).collect::<Vec<_>>().join("\n")
}

/// Fails unless `booted` (every database's dump of a copy as of `lsn`) equals `recorded` (the
/// compute's dumps at `lsn`): sequences may be up to 32 values ahead (SEQ_LOG_VALS), as redo
/// leaves them and any point-in-time recovery gives them. A difference is shown as a diff
/// (files written under `scratch`).
pub fn expect_dumps_equal(
    scratch: &std::path::Path,
    lsn: Lsn,
    recorded: &std::collections::BTreeMap<String, String>,
    booted: &std::collections::BTreeMap<String, String>,
) -> Result<()> {
    anyhow::ensure!(
        booted.keys().eq(recorded.keys()),
        "databases at {lsn}: booted {:?}, recorded {:?}",
        booted.keys(),
        recorded.keys()
    );
    for (db, text) in recorded {
        let (ours, theirs) = (dump_sequences(&booted[db]), dump_sequences(text));
        anyhow::ensure!(ours.keys().eq(theirs.keys()), "sequences of {db} at {lsn}: {ours:?} vs {theirs:?}");
        for (name, v) in &theirs {
            let got = ours[name];
            anyhow::ensure!((*v..=*v + 32).contains(&got), "sequence {name} of {db} at {lsn}: {got}, recorded {v}");
        }
        if without_setval(&booted[db]) != without_setval(text) {
            let (x, y) = (scratch.join("recorded.sql"), scratch.join("booted.sql"));
            std::fs::write(&x, text)?;
            std::fs::write(&y, &booted[db])?;
            let diff = std::process::Command::new("diff").arg(&x).arg(&y).output()?;
            let diff = String::from_utf8_lossy(&diff.stdout);
            anyhow::bail!("pg_dump of {db} at {lsn} differs from the recorded one:\n{}", &diff[..diff.len().min(2000)]);
        }
    }
    Ok(())
}
