//! Times instead of LSNs. The oracle is PostgreSQL itself: for each time asked, a base backup
//! is recovered with `recovery_target_time` (inclusive and not) on the same WAL, and the LSN
//! `neon_lsn_at` answers must be the start of the very record the server says it stopped
//! before — found by `pg_waldump` from the transaction id and kind in the server's log. The
//! times are read from `pg_waldump` too: a commit's exact time, a microsecond before it, an
//! abort, a two-phase commit and rollback, an idle gap, a burst, and after the last commit
//! (where recovery runs out of WAL, and we answer the end of the WAL filed).

use anyhow::{Context, Result};
use neon_tests::recovery::{recover_to_time, RecoveryEnd};
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use neon_tests::{bench::archive_wal, workload, Cluster};
use neon_types::{Lsn, PgTime};
use std::path::Path;
use std::time::Duration;

/// A transaction end `pg_waldump` shows.
#[derive(Debug, Clone, Copy)]
struct XactEnd {
    lsn: Lsn,
    /// The transaction it ends (for two-phase records, the prepared one).
    xid: u32,
    commit: bool,
    time: PgTime,
}

/// Every commit and abort record (prepared or not) from `start` on, in WAL order.
fn xact_ends(archive: &Path, start: Lsn) -> Result<Vec<XactEnd>> {
    let out = std::process::Command::new(neon_tests::pg_bin("pg_waldump"))
        .env("TZ", "UTC")
        .arg("-p")
        .arg(archive)
        .args(["-r", "Transaction", "-s", &start.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let re = regex::Regex::new(
        r"tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), prev \S+, desc: (COMMIT_PREPARED|ABORT_PREPARED|COMMIT|ABORT) (?:(\d+): )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC",
    )?;
    let mut ends = Vec::new();
    for m in text.lines().filter_map(|l| re.captures(l)) {
        let prepared = m.get(4).map(|x| x.as_str().parse::<u32>()).transpose()?;
        ends.push(XactEnd {
            lsn: m[2].parse()?,
            xid: prepared.unwrap_or(m[1].parse()?),
            commit: m[3].starts_with("COMMIT"),
            time: PgTime::parse(&format!("{}+00", &m[5]))?,
        });
    }
    anyhow::ensure!(!ends.is_empty(), "pg_waldump found no transaction ends: {}", String::from_utf8_lossy(&out.stderr));
    Ok(ends)
}

fn backup_start(base: &Path) -> Result<Lsn> {
    let label = std::fs::read_to_string(base.join("backup_label"))?;
    let line = label.lines().find_map(|l| l.strip_prefix("START WAL LOCATION: ")).context("backup_label")?;
    Ok(line.split_whitespace().next().context("backup_label")?.parse()?)
}

fn lsn_at(c: &Cluster, ts: PgTime, inclusive: bool) -> Result<Lsn> {
    Ok(c.query_one_string(&format!("SELECT neon_lsn_at('{ts}', {inclusive})"))?.parse()?)
}

fn cli(s: &SidecarProcess, args: &[&str]) -> Result<String> {
    let out =
        std::process::Command::new(neon_tests::sidecar_bin()?).args(args).arg("--socket").arg(s.socket()).output()?;
    anyhow::ensure!(out.status.success(), "neon-sidecar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn lsn_at_is_where_postgres_recovery_to_that_time_stops() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    c.execute("CREATE EXTENSION neon")?;
    c.execute("CREATE TABLE tt (id int PRIMARY KEY, v text)")?;
    let base = c.root_dir().join("base");
    c.run_server_tool("pg_basebackup", &["-D", base.to_str().unwrap(), "-X", "none", "-c", "fast"])?;
    neon_tests::chown_to_server_user(&base)?;

    // The transactions: commits, an abort, two-phase commit and rollback, an idle gap, a burst.
    let pause = || std::thread::sleep(Duration::from_millis(120));
    let mut db = c.connect("postgres")?;
    for i in 0..4 {
        db.execute("INSERT INTO tt VALUES ($1, 'c')", &[&i])?;
        pause();
    }
    db.batch_execute("BEGIN; INSERT INTO tt VALUES (100, 'a'); ROLLBACK")?;
    pause();
    db.batch_execute("BEGIN; INSERT INTO tt VALUES (101, 'p'); PREPARE TRANSACTION 'p1'")?;
    pause();
    db.batch_execute("COMMIT PREPARED 'p1'")?;
    pause();
    db.batch_execute("BEGIN; INSERT INTO tt VALUES (102, 'q'); PREPARE TRANSACTION 'p2'")?;
    pause();
    db.batch_execute("ROLLBACK PREPARED 'p2'")?;
    std::thread::sleep(Duration::from_secs(2));
    for i in 200..260 {
        db.execute("INSERT INTO tt VALUES ($1, 'b')", &[&i])?;
    }
    pause();
    db.execute("INSERT INTO tt VALUES (300, 'last')", &[])?;
    let end = workload::flush_lsn(&c)?;
    sidecar.wait_durable(end)?;
    let archive = archive_wal(&c)?;
    let ends = xact_ends(&archive, backup_start(&base)?)?;
    let by_kind = |commit: bool, f: &dyn Fn(&XactEnd) -> bool| ends.iter().position(|e| e.commit == commit && f(e));
    // What each case is about, by its index in `ends` (the first two stay clear of the
    // backup's start, which recovery needs to pass).
    let abort = by_kind(false, &|_| true).context("no abort")?;
    let gap = (1..ends.len()).max_by_key(|i| ends[*i].time.0 - ends[i - 1].time.0).context("gap")?;
    let picks = [2, 3, abort, abort + 1, abort + 2, gap, gap + 20, ends.len() - 1];
    // (The abort, the two-phase commit and rollback, then the burst after the idle gap.)
    anyhow::ensure!(gap == abort + 3 && gap + 20 < ends.len() - 1, "workload shape: {ends:#?}");
    let mut cases: Vec<(PgTime, bool)> = Vec::new();
    for &k in &picks {
        let t = ends[k].time;
        cases.extend([(PgTime(t.0 - 1), true), (t, true), (t, false)]);
    }
    cases.push((PgTime((ends[gap - 1].time.0 + ends[gap].time.0) / 2), true));

    for (n, &(ts, inclusive)) in cases.iter().enumerate() {
        let ours = lsn_at(&c, ts, inclusive)?;
        let theirs = recover_to_time(&c, &base, &archive, &ts.to_string(), inclusive, n)?;
        match theirs {
            RecoveryEnd::Before { xid, commit, ref time } => {
                let at = ends
                    .iter()
                    .find(|e| e.xid == xid && e.commit == commit)
                    .with_context(|| format!("pg_waldump has no end of transaction {xid}"))?;
                anyhow::ensure!(
                    ours == at.lsn,
                    "{ts} (inclusive {inclusive}): we say {ours}, PostgreSQL stopped before {} of {xid} at {} ({time})",
                    if commit { "commit" } else { "abort" },
                    at.lsn
                );
                // And back: the record we name is the first transaction end at or after it.
                let around = c.query_rows(&format!(
                    "SELECT before_lsn, after_lsn, extract(epoch FROM after_time) * 1000000 - 946684800000000 FROM neon_time_at('{ours}')"
                ))?;
                let after_us: f64 = around[0][2].as_deref().context("after_time")?.parse()?;
                anyhow::ensure!(
                    around[0][1].as_deref() == Some(&at.lsn.to_string()[..]) && after_us as i64 == at.time.0,
                    "{around:?} vs {at:?}"
                );
            }
            RecoveryEnd::WalEnded => {
                let last = ends.last().expect("ends");
                anyhow::ensure!(
                    ts.0 >= last.time.0 && ours >= end,
                    "{ts} (inclusive {inclusive}): PostgreSQL ran out of WAL, we say {ours} (last transaction end {last:?})"
                );
            }
        }
    }

    // After the last commit, up to the compute's clock: the end of the WAL filed — also from
    // the command line, whose clock is the WAL sender's (asked for while the compute is idle).
    let last = *ends.last().expect("ends");
    let after_last = PgTime(last.time.0 + 1000);
    let ours = lsn_at(&c, after_last, true)?;
    anyhow::ensure!(ours >= end, "after the last commit: {ours}, the WAL written reached {end}");
    // (The WAL sender's clock vouches for times a second before its reading.)
    std::thread::sleep(Duration::from_millis(2500));
    let from_cli: Lsn = cli(&sidecar, &["lsn-at", "--time", &after_last.to_string()])?.trim().parse()?;
    anyhow::ensure!(from_cli >= end, "lsn-at after the last commit: {from_cli}, the WAL written reached {end}");
    let k = picks[4];
    let from_cli: Lsn =
        cli(&sidecar, &["lsn-at", "--time", &ends[k].time.to_string(), "--exclusive"])?.trim().parse()?;
    anyhow::ensure!(from_cli == ends[k].lsn, "lsn-at --exclusive at {:?}: {from_cli}", ends[k]);
    let around = cli(&sidecar, &["time-at", "--lsn", &ends[k].lsn.to_string()])?;
    let want = format!("before\t{}\t{}\nafter\t{}\t{}\n", ends[k - 1].lsn, ends[k - 1].time, ends[k].lsn, ends[k].time);
    anyhow::ensure!(around == want, "time-at: {around:?}, want {want:?}");

    // Every function that takes an LSN takes a time: typed, or as a literal (read as an LSN
    // when it looks like one), each reading as of neon_lsn_at of it.
    let ts = ends[picks[3]].time;
    let at = lsn_at(&c, ts, true)?;
    let same = |sql_time: &str, sql_lsn: &str| -> Result<()> {
        let (a, b) = (c.query_one_string(sql_time)?, c.query_one_string(sql_lsn)?);
        anyhow::ensure!(a == b, "{sql_time} = {a}, {sql_lsn} = {b}");
        Ok(())
    };
    same(
        &format!("SELECT neon_rel_size('tt', 'main', '{ts}'::timestamptz) || ' ' || md5(neon_get_page('tt', 'main', 0, '{ts}'::timestamptz))"),
        &format!("SELECT neon_rel_size('tt', 'main', '{at}'::pg_lsn) || ' ' || md5(neon_get_page('tt', 'main', 0, '{at}'::pg_lsn))"),
    )?;
    same(
        &format!("SELECT md5(neon_get_page('tt', 'main', 0, '{ts}')) || md5(neon_get_page('tt', 'main', 0, '{at}'))"),
        &format!("SELECT md5(neon_get_page('tt', 'main', 0, '{at}'::pg_lsn)) || md5(neon_get_page('tt', 'main', 0, '{at}'::pg_lsn))"),
    )?;
    same(&format!("SELECT lsn FROM neon_basebackup('{ts}', false)"), &format!("SELECT '{at}'::pg_lsn"))?;
    let e = c
        .execute("SELECT neon_rel_size('tt', 'main', 'yesterday-ish')")
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
    anyhow::ensure!(e.contains("neither an LSN") && e.contains("nor a time"), "{e}");

    // Clear errors for what cannot be answered, and nothing changes.
    let err = |sql: &str| c.execute(sql).err().map(|e| format!("{e:#}")).unwrap_or_default();
    let before = err("SELECT neon_lsn_at('1999-01-01 00:00:00+00')");
    anyhow::ensure!(before.contains("before the history") && before.contains("earliest transaction end"), "{before}");
    let future = err("SELECT neon_lsn_at(now() + interval '1 hour')");
    anyhow::ensure!(future.contains("has not happened yet"), "{future}");
    for bad in ["SELECT neon_lsn_at(NULL)", "SELECT neon_lsn_at('infinity')", "SELECT neon_lsn_at(now(), NULL)"] {
        let e = err(bad);
        anyhow::ensure!(e.contains("must"), "{bad}: {e}");
    }
    anyhow::ensure!(c.query_one_string("SELECT count(*) FROM tt")? == "66", "the compute's rows changed");
    Ok(())
}

/// A stopped and restarted sidecar still answers from the index it persisted (and files the
/// WAL after it without noting anything twice).
#[test]
fn commit_times_survive_a_restart_of_the_sidecar() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    c.execute("CREATE EXTENSION neon")?;
    c.execute("CREATE TABLE tt (id int)")?;
    // A time between two commits (a statement's own start, between the inserts).
    let mut ts = String::new();
    for i in 0..20 {
        if i == 10 {
            ts = c.query_one_string("SELECT now()")?;
        }
        c.execute(&format!("INSERT INTO tt VALUES ({i})"))?;
    }
    let mid = workload::flush_lsn(&c)?;
    sidecar.wait_durable(mid)?;
    let answer = c.query_one_string(&format!("SELECT neon_lsn_at('{ts}')"))?;
    let around = c.query_rows(&format!("SELECT * FROM neon_time_at('{answer}')"))?;
    sidecar.kill9()?;
    let sidecar = SidecarProcess::restart_for_compute(&c, &store, &[])?;
    for i in 0..20 {
        c.execute(&format!("INSERT INTO tt VALUES ({i})"))?;
    }
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let again = c.query_one_string(&format!("SELECT neon_lsn_at('{ts}')"))?;
    anyhow::ensure!(again == answer, "before the restart {answer}, after {again}");
    let around_again = c.query_rows(&format!("SELECT * FROM neon_time_at('{answer}')"))?;
    anyhow::ensure!(around == around_again, "{around:?} then {around_again:?}");
    Ok(())
}

/// What `<shared>/past` holds besides its next id: past servers' directories.
fn past_servers_on_disk(c: &Cluster) -> Result<Vec<String>> {
    Ok(std::fs::read_dir(c.root_dir().join("shared/past"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|n| n != "next-id")
        .collect())
}

/// Stops, however the test ends, every past server the sidecar runs (and drops their
/// branches), before the sidecar itself is killed: no server or mount is left behind.
struct StopPast<'a>(&'a SidecarProcess);

impl Drop for StopPast<'_> {
    fn drop(&mut self) {
        use neon_types::protocol::{Request, Response};
        if let Ok(Response::Past(servers)) = self.0.ask(&Request::PastList) {
            for p in servers {
                let _ = self.0.ask(&Request::PastStop { id: p.id });
            }
        }
    }
}

/// The "oops" stories, end to end from SQL: rows deleted by mistake found by time and put
/// back; an UPDATE by mistake undone; a dropped table read from the past and recreated; a
/// table whose columns changed since, read as it was; a TOASTed value as it was. The past is
/// read-only, bad calls are clear errors that leave nothing behind, and `neon_as_of_drop`
/// leaves no schema, server, branch, mount or process. Needs FUSE (as the branch tests).
#[test]
fn the_past_as_a_schema_puts_mistakes_right() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    let _stop_past = StopPast(&sidecar);
    c.execute("CREATE EXTENSION neon")?;
    c.execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int);
         INSERT INTO accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 200) g;
         CREATE TABLE docs (id int PRIMARY KEY, body text);
         INSERT INTO docs SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 4000) g;
         CREATE TABLE gone (id int, v text);
         INSERT INTO gone SELECT g, 'kept ' || g FROM generate_series(1, 50) g;
         CREATE TABLE shape (a int, b text, c int);
         INSERT INTO shape VALUES (1, 'one', 10), (2, 'two', 20);",
    )?;
    let q = |sql: &str| c.query_one_string(sql);
    let sum_then = q("SELECT sum(balance) FROM accounts")?;
    let docs_then = q("SELECT md5(body) FROM docs")?;
    let gone_then = q("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM gone")?;
    anyhow::ensure!(
        q("SELECT pg_column_size(body) < octet_length(body) OR pg_column_size(body) > 2000 FROM docs")? == "t"
    );
    std::thread::sleep(Duration::from_millis(50));
    let before_mistakes = q("SELECT now()")?;
    std::thread::sleep(Duration::from_millis(50));
    c.execute(
        "DELETE FROM accounts WHERE id % 10 = 0;
         UPDATE accounts SET balance = 0 WHERE id <= 50;
         DROP TABLE gone;
         ALTER TABLE shape DROP COLUMN b, ADD COLUMN d int;
         UPDATE docs SET body = 'short';",
    )?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;

    let made =
        c.query_rows(&format!("SELECT schema_name, lsn, tables FROM neon_as_of('{before_mistakes}', 'past')"))?;
    let want_lsn = q(&format!("SELECT neon_lsn_at('{before_mistakes}')"))?;
    anyhow::ensure!(
        made.len() == 1 && made[0][0].as_deref() == Some("past") && made[0][1].as_deref() == Some(&want_lsn[..]),
        "neon_as_of gave {made:?}, neon_lsn_at {want_lsn}"
    );
    anyhow::ensure!(made[0][2].as_deref() == Some("4"), "imported {:?} tables", made[0][2]);
    // A primary-key lookup runs there, with its condition sent along.
    anyhow::ensure!(q("SELECT owner || ' ' || balance FROM past.accounts WHERE id = 70")? == "owner 70 700");
    let plan = c.query_rows("EXPLAIN (VERBOSE, COSTS OFF) SELECT * FROM past.accounts WHERE id = 70")?;
    anyhow::ensure!(
        plan.iter().flatten().flatten().any(|l| l.contains("WHERE ((id = 70))")),
        "not pushed down: {plan:?}"
    );
    // Deleted rows found and put back; the update undone.
    anyhow::ensure!(q("SELECT count(*) FROM past.accounts")? == "200" && q("SELECT count(*) FROM accounts")? == "180");
    c.execute("INSERT INTO accounts SELECT * FROM past.accounts ON CONFLICT DO NOTHING")?;
    c.execute(
        "UPDATE accounts a SET balance = p.balance FROM past.accounts p WHERE a.id = p.id AND a.balance <> p.balance",
    )?;
    anyhow::ensure!(q("SELECT count(*) || ' ' || sum(balance) FROM accounts")? == format!("200 {sum_then}"));
    // The dropped table, recreated from the past.
    c.execute("CREATE TABLE gone AS SELECT * FROM past.gone")?;
    anyhow::ensure!(q("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM gone")? == gone_then);
    // Columns as they were; a TOASTed value as it was.
    let cols = q("SELECT string_agg(column_name, ',' ORDER BY ordinal_position) FROM information_schema.columns WHERE table_schema = 'past' AND table_name = 'shape'")?;
    anyhow::ensure!(cols == "a,b,c", "past.shape has columns {cols}");
    anyhow::ensure!(q("SELECT string_agg(b, ',' ORDER BY a) FROM past.shape")? == "one,two");
    anyhow::ensure!(q("SELECT md5(body) FROM past.docs")? == docs_then);
    // The past does not change.
    let err = |sql: &str| c.execute(sql).err().map(|e| format!("{e:#}")).unwrap_or_default();
    let e = err("INSERT INTO past.accounts VALUES (1000, 'x', 1)");
    anyhow::ensure!(e.contains("read-only transaction"), "{e}");

    // Bad calls: clear errors, nothing left behind.
    let branches = || q("SELECT count(*) FROM neon_branches()");
    let before = (branches()?, q("SELECT count(*) FROM pg_foreign_server")?, q("SELECT count(*) FROM pg_namespace")?);
    let e = err(&format!("SELECT * FROM neon_as_of('{before_mistakes}', 'past')"));
    anyhow::ensure!(e.contains("schema \"past\" already exists"), "{e}");
    // Made, then rolled back with its transaction: its server and branch go too.
    c.execute(&format!("BEGIN; SELECT * FROM neon_as_of('{before_mistakes}', 'past_rolled_back'); ROLLBACK"))?;
    let e = err(&format!("BEGIN; SELECT * FROM neon_as_of('{before_mistakes}', 'past_cancelled'); SELECT 1/0"));
    anyhow::ensure!(e.contains("division by zero"), "{e}");
    let e = err(&format!("SELECT * FROM neon_as_of('{before_mistakes}', 'past2', '{{nosuch}}')"));
    anyhow::ensure!(e.contains("nosuch"), "{e}");
    let e = err("SELECT * FROM neon_as_of(now() + interval '1 hour', 'past3')");
    anyhow::ensure!(e.contains("has not happened yet"), "{e}");
    let e = err(&format!("SET neon.max_as_of = 1; SELECT * FROM neon_as_of('{before_mistakes}', 'past4')"));
    anyhow::ensure!(e.contains("neon.max_as_of"), "{e}");
    c.execute("CREATE ROLE nobody_here")?;
    let e = err(&format!("SET ROLE nobody_here; SELECT * FROM neon_as_of('{before_mistakes}', 'past5')"));
    anyhow::ensure!(e.contains("permission denied"), "{e}");
    let e = err(&format!("SELECT * FROM neon_as_of('{before_mistakes}', 'past6', '{{pg_catalog}}')"));
    anyhow::ensure!(e.contains("system schemas"), "{e}");
    let after = (branches()?, q("SELECT count(*) FROM pg_foreign_server")?, q("SELECT count(*) FROM pg_namespace")?);
    anyhow::ensure!(before == after, "failed calls left something: {before:?} then {after:?}");

    // A reader who is no superuser: the mapping needs no password, and the grant is theirs.
    c.execute("CREATE ROLE reader IN ROLE pg_read_server_files")?;
    let read = q(&format!(
        "SET ROLE reader; SELECT tables FROM neon_as_of('{before_mistakes}', 'past_r', '{{public}}'); \
         SELECT count(*) FROM past_r.accounts"
    ))?;
    anyhow::ensure!(read == "200", "the reader's past: {read}");
    let e = err("SET ROLE nobody_here; SELECT count(*) FROM past_r.accounts");
    anyhow::ensure!(e.contains("permission denied"), "{e}");
    // A drop rolled back comes back whole, and is removed by the next drop, although its server
    // and branch went with the first.
    c.execute("BEGIN; SELECT neon_as_of_drop('past_r'); ROLLBACK")?;
    anyhow::ensure!(q("SELECT count(*) FROM neon_as_of_schemas")? == "2");
    anyhow::ensure!(q("SET ROLE reader; SELECT neon_as_of_drop('past_r')")? == want_lsn);

    // Dropped: nothing left.
    let dropped = q("SELECT neon_as_of_drop('past')")?;
    anyhow::ensure!(dropped == want_lsn, "neon_as_of_drop gave {dropped}");
    anyhow::ensure!(q("SELECT count(*) FROM pg_namespace WHERE nspname = 'past'")? == "0");
    anyhow::ensure!(q("SELECT count(*) FROM pg_foreign_server")? == "0");
    anyhow::ensure!(branches()? == "0" && q("SELECT count(*) FROM neon_as_of_schemas")? == "0");
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    anyhow::ensure!(!mounts.contains(&c.root_dir().display().to_string()), "a mount is left: {mounts}");
    anyhow::ensure!(past_servers_on_disk(&c)?.is_empty(), "a past server's directory is left");
    Ok(())
}

/// A sidecar that is restarted during a test: whichever runs when the test ends, however it
/// ends, has its past servers stopped (and their branches dropped) first.
struct Restarted(Option<SidecarProcess>);

impl Restarted {
    fn get(&self) -> &SidecarProcess {
        self.0.as_ref().expect("a sidecar runs")
    }

    fn take(&mut self) -> SidecarProcess {
        self.0.take().expect("a sidecar runs")
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            drop(StopPast(s));
        }
    }
}

/// The one past server a test made, as the sidecar reports it.
fn the_past_server(sidecar: &SidecarProcess) -> Result<neon_types::protocol::PastInfo> {
    use neon_types::protocol::{Request, Response};
    match sidecar.ask(&Request::PastList)? {
        Response::Past(p) if p.len() == 1 => Ok(p[0].clone()),
        r => anyhow::bail!("expected one past server, the sidecar has {r:?}"),
    }
}

/// The pid of the postmaster a past server runs, if it runs (its `pid` file, checked live).
fn past_postmaster(info: &neon_types::protocol::PastInfo) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(Path::new(&info.socket_dir).join("pid")).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}/cmdline")).exists().then_some(pid)
}

/// The extension, and a table `t` of `rows` rows (`id`, `'v' || id`); the LSN after them.
fn extension_and_table_t(c: &Cluster, rows: u32) -> Result<Lsn> {
    c.execute(&format!(
        "CREATE EXTENSION neon;
         CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, {rows}) g;"
    ))?;
    workload::flush_lsn(c)
}

/// Waits (up to 20 s) for `done`.
fn wait_for(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done()? {
        anyhow::ensure!(std::time::Instant::now() < deadline, "waited 20 s for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A past server stops when idle (`neon.as_of_idle_timeout`) but never inside a transaction
/// that uses it, and starts again on the next query — in the same session, whose
/// `postgres_fdw` connection it cut, and in a new one. The sidecar stops them all when it
/// stops; after a restart, clean or `kill -9` (which leaves a postmaster running, stopped by
/// the next sidecar), they serve again on demand. Needs FUSE (as the branch tests).
#[test]
fn past_servers_sleep_when_idle_and_wake_on_demand() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let mut sidecar = Restarted(Some(SidecarProcess::start_for_compute(&c, &store, &[])?));
    let at = extension_and_table_t(&c, 100)?;
    c.execute("DELETE FROM t WHERE id > 10")?;
    sidecar.get().wait_durable(workload::flush_lsn(&c)?)?;
    let mut session = c.connect("postgres")?;
    session.batch_execute(&format!("SET neon.as_of_idle_timeout = '1s'; SELECT * FROM neon_as_of('{at}', 'past')"))?;
    let count = |s: &mut postgres::Client| -> Result<i64> {
        Ok(s.query_one("SELECT count(*) FROM past.t WHERE v LIKE 'v%'", &[])?.get(0))
    };
    anyhow::ensure!(count(&mut session)? == 100);
    let info = the_past_server(sidecar.get())?;
    anyhow::ensure!(info.branch.is_some() && info.running, "{info:?}");
    let first = past_postmaster(&info).context("no postmaster runs")?;

    // Idle: stopped, postmaster and all.
    wait_for("the idle past server to stop", || Ok(!the_past_server(sidecar.get())?.running))?;
    anyhow::ensure!(past_postmaster(&info).is_none(), "its postmaster {first} still runs");
    // Its branch is not to be dropped from under it, running or not.
    let branch = info.branch.context("on a branch")?;
    let e = c.execute(&format!("SELECT neon_branch_drop({branch})")).err().context("the branch was dropped")?;
    anyhow::ensure!(format!("{e:#}").contains("neon_as_of_drop"), "{e:#}");
    // The same session reads on (its connection was cut; postgres_fdw connects again).
    anyhow::ensure!(count(&mut session)? == 100);
    anyhow::ensure!(the_past_server(sidecar.get())?.running);
    // Inside a transaction the connection is in use, however long it waits.
    session.batch_execute("BEGIN")?;
    anyhow::ensure!(count(&mut session)? == 100);
    std::thread::sleep(Duration::from_millis(2500));
    anyhow::ensure!(the_past_server(sidecar.get())?.running, "stopped inside a transaction");
    anyhow::ensure!(count(&mut session)? == 100);
    session.batch_execute("COMMIT")?;
    wait_for("the past server to stop again", || Ok(!the_past_server(sidecar.get())?.running))?;
    // A new session wakes it too.
    anyhow::ensure!(c.query_one_string("SELECT count(*) FROM past.t")? == "100");

    // The sidecar stops: so does the server; started again: the server serves on demand.
    anyhow::ensure!(the_past_server(sidecar.get())?.running);
    sidecar.take().stop()?;
    anyhow::ensure!(past_postmaster(&info).is_none(), "a stopped sidecar left its past server running");
    sidecar.0 = Some(SidecarProcess::restart_for_compute(&c, &store, &[])?);
    anyhow::ensure!(!the_past_server(sidecar.get())?.running);
    anyhow::ensure!(count(&mut session)? == 100);

    // Killed with the server running: the next sidecar stops that postmaster and serves anew.
    let orphan = past_postmaster(&the_past_server(sidecar.get())?).context("no postmaster runs")?;
    sidecar.take().kill9()?;
    anyhow::ensure!(past_postmaster(&info) == Some(orphan), "the postmaster went with the sidecar");
    sidecar.0 = Some(SidecarProcess::restart_for_compute(&c, &store, &[])?);
    anyhow::ensure!(past_postmaster(&info).is_none(), "postmaster {orphan} a killed sidecar left still runs");
    anyhow::ensure!(count(&mut session)? == 100);
    anyhow::ensure!(past_postmaster(&info).is_some_and(|p| p != orphan));

    // Dropped: nothing left.
    let dropped: String = session.query_one("SELECT neon_as_of_drop('past')::text", &[])?.get(0);
    anyhow::ensure!(dropped == at.to_string(), "dropped {dropped}, made at {at}");
    anyhow::ensure!(c.query_one_string("SELECT count(*) FROM neon_branches()")? == "0");
    anyhow::ensure!(past_servers_on_disk(&c)?.is_empty());
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    anyhow::ensure!(!mounts.contains(&c.root_dir().display().to_string()), "a mount is left: {mounts}");
    sidecar.take().stop()
}

/// Where the sidecar mounts no branches (`--no-fuse`), `neon_as_of` says so and reads the
/// past from a full copy: the same answers, and the drop removes the copy.
#[test]
fn without_fuse_the_past_is_a_copy() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &["--no-fuse"])?;
    let _stop_past = StopPast(&sidecar);
    let at = extension_and_table_t(&c, 1000)?;
    let then = c.query_one_string("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM t")?;
    c.execute("UPDATE t SET v = 'changed' WHERE id % 3 = 0")?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let e =
        c.query_one_string(&format!("SELECT id FROM neon_branch_create('{at}')")).err().context("a branch was made")?;
    anyhow::ensure!(format!("{e:#}").contains("--no-fuse"), "{e:#}");

    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut config: postgres::Config = c.conn_str("postgres").parse()?;
    let seen = notices.clone();
    config.notice_callback(move |n| seen.lock().expect("notices").push(n.message().to_string()));
    let mut session = config.connect(postgres::NoTls)?;
    session.batch_execute(&format!("SELECT * FROM neon_as_of('{at}', 'past')"))?;
    let notices = notices.lock().expect("notices").clone();
    let info = the_past_server(&sidecar)?;
    anyhow::ensure!(info.branch.is_none(), "{info:?}");
    anyhow::ensure!(
        notices.iter().any(|n| n.contains("full copy") && n.contains(&info.socket_dir)),
        "no NOTICE of the copy: {notices:?}"
    );
    let past: String = session.query_one("SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM past.t", &[])?.get(0);
    anyhow::ensure!(past == then, "the copy's rows differ from the table's then");
    let one: String = session.query_one("SELECT v FROM past.t WHERE id = 3", &[])?.get(0);
    anyhow::ensure!(one == "v3");
    anyhow::ensure!(Path::new(&info.socket_dir).join("data/PG_VERSION").exists());
    session.query_one("SELECT neon_as_of_drop('past')", &[])?;
    anyhow::ensure!(past_servers_on_disk(&c)?.is_empty(), "the copy is left");
    Ok(())
}
