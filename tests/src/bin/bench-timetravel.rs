//! `bench/timetravel`: times into LSNs, from SQL, as a user meets them.
//!
//! `neon_lsn_at` p50/p99, timed inside the backend (`bench_calls`), first on this run's own
//! history, then with a year of one transaction end a second in the index: the sidecar is
//! stopped, timeline 1's index is replaced by `--years` × 31 536 000 entries (LSNs one byte
//! apart inside the WAL this run wrote, so every answer is inside history; times a second
//! apart with up to ±0.3 s of jitter, so the clock steps back now and then), written through
//! the index's own code, and the sidecar started again. A few answers are checked against the
//! entries written (the first whose time is after the asked time). Anchors, same run and
//! connection: `neon_rel_size` (a round trip to the sidecar that does no time lookup) and
//! `pg_current_wal_lsn()` (no sidecar at all).
//!
//! Before that, the past as a schema at pgbench `--scale`: a time recorded after `pgbench -i`
//! and some traffic later, `neon_as_of(time, 'past')` and the first row of
//! `past.pgbench_accounts` (wall time from the client), then primary-key lookups of random
//! accounts through the past schema (each reads pages the branch has not read yet) beside the
//! same lookups on the compute's own table.
//!
//! Goals (issue 15): `neon_lsn_at` p50 ≤ 1 ms with a year of history; `neon_as_of` to the
//! first row ≤ 2 s and a primary-key lookup through it p50 ≤ 5 ms at scale 70.

use anyhow::{Context, Result};
use neon_tests::bench::{call_percentiles, Flags, CALL_TIMER};
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use neon_tests::workload;
use neon_types::{Lsn, PgTime};
use sidecar::repo::commit_times::{CommitTimes, CHUNK};
use std::time::{Duration, Instant};

const SECONDS_A_YEAR: i64 = 365 * 86_400;

/// The synthetic entry `i`: its time (µs) from the year's start `t0`.
fn synthetic_time(t0: i64, i: u64) -> i64 {
    // A fixed LCG: jitter of up to ±300 ms around one a second.
    let jitter = (i.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407) >> 33) % 600_001;
    t0 + i as i64 * 1_000_000 + jitter as i64 - 300_000
}

/// Whether the sidecar's one past server's postmaster runs.
fn past_server_runs(sidecar: &SidecarProcess) -> Result<bool> {
    use neon_types::protocol::{Request, Response};
    match sidecar.ask(&Request::PastList)? {
        Response::Past(p) if p.len() == 1 => Ok(p[0].running),
        r => anyhow::bail!("expected one past server, the sidecar has {r:?}"),
    }
}

fn main() -> Result<()> {
    let f = Flags::parse(
        "bench-timetravel [--years N] [--calls N] [--scale N]",
        &[("years", "1"), ("calls", "2000"), ("scale", "70")],
    )?;
    let (years, calls, scale): (u64, u32, u32) = (f.get("years")?, f.get("calls")?, f.get("scale")?);
    let entries = years * SECONDS_A_YEAR as u64;
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    c.execute("CREATE EXTENSION neon")?;
    c.execute(CALL_TIMER)?;

    // The past as a schema.
    eprintln!("bench: pgbench -i -s {scale} ...");
    c.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
    let then = c.query_one_string("SELECT now()")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "5"])?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let mut db = c.connect("postgres")?;
    // Stopped when idle for 3 s, to time its waking below (the lookups keep it busy).
    db.batch_execute("SET neon.as_of_idle_timeout = '3s'")?;
    let t = Instant::now();
    db.query_one(&format!("SELECT tables FROM neon_as_of('{then}'::timestamptz, 'past')"), &[])?;
    let made = t.elapsed();
    let first: i32 = db.query_one("SELECT abalance FROM past.pgbench_accounts WHERE aid = 1", &[])?.get(0);
    let first_row = t.elapsed();
    anyhow::ensure!(first == 0, "an account's balance right after pgbench -i is 0, not {first}");
    let accounts = scale as u64 * 100_000;
    let lookup = |table: &str| format!("SELECT abalance FROM {table} WHERE aid = ($1::int8 * 7919) % {accounts} + 1");
    let past_pk = call_percentiles(&mut db, &lookup("past.pgbench_accounts"), calls)?;
    let local_pk = call_percentiles(&mut db, &lookup("pgbench_accounts"), calls)?;
    // Idle: stopped; the next lookup starts it again (and postgres_fdw reconnects).
    let stopped = Instant::now();
    while past_server_runs(&sidecar)? {
        anyhow::ensure!(stopped.elapsed() < Duration::from_secs(30), "the idle past server never stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = Instant::now();
    let again: i32 = db.query_one("SELECT abalance FROM past.pgbench_accounts WHERE aid = 1", &[])?.get(0);
    let woken = t.elapsed();
    anyhow::ensure!(again == first && past_server_runs(&sidecar)?);
    db.query_one("SELECT neon_as_of_drop('past')", &[])?;
    drop(db);
    // WAL enough for one LSN a byte apart per entry, and a little more.
    c.execute("CREATE TABLE filler (id int, pad text)")?;
    let start = workload::flush_lsn(&c)?;
    let began = c.query_one_string("SELECT now()")?;
    eprintln!("bench: writing {} MB of WAL ...", entries >> 20);
    while workload::flush_lsn(&c)? - start < entries + (8 << 20) {
        c.execute("INSERT INTO filler SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g")?;
    }
    let end = workload::flush_lsn(&c)?;
    sidecar.wait_durable(end)?;
    let mut db = c.connect("postgres")?;
    // Times spread over this run's own transactions.
    let own_q = format!("SELECT neon_lsn_at('{began}'::timestamptz + (now() - '{began}') * (($1 % 1000) / 1000.0))");
    let own = call_percentiles(&mut db, &own_q, calls)?;
    let rel_size =
        call_percentiles(&mut db, &format!("SELECT neon_rel_size('filler', 'main', '{end}'::pg_lsn)"), calls)?;
    let plain = call_percentiles(&mut db, "SELECT pg_current_wal_lsn()", calls)?;
    drop(db);

    // A year in the index, between this run's start and end.
    sidecar.stop()?;
    let dir = store.join("timelines").join(format!("{:08X}", 1));
    for name in ["commit-times", "commit-times.log"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let t0 = PgTime::now().0 - (years as i64 * SECONDS_A_YEAR + 3600) * 1_000_000;
    let first = start + 4096;
    eprintln!("bench: writing {entries} transaction ends into the index ...");
    let written = Instant::now();
    let times = CommitTimes::open(&dir, true)?;
    for i in 0..entries {
        let lsn = Lsn(first.0 + i);
        times.note(lsn, Lsn(lsn.0 + 1), PgTime(synthetic_time(t0, i)));
        if (i + 1) % CHUNK as u64 == 0 {
            times.persist(Lsn(lsn.0 + 1))?;
        }
    }
    times.persist(Lsn(first.0 + entries))?;
    let write_secs = written.elapsed().as_secs_f64();
    drop(times);
    let bytes: u64 = ["commit-times", "commit-times.log"]
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum();
    neon_tests::chown_to_server_user(&dir)?;
    let _sidecar = SidecarProcess::restart_for_compute(&c, &store, &[])?;

    // Answers checked against what was written: the first entry whose time is after ts.
    let mut db = c.connect("postgres")?;
    for k in [7u64, entries / 3, entries - 20] {
        let ts = PgTime(synthetic_time(t0, k) - 1);
        let want = (k.saturating_sub(2)..entries).find(|i| synthetic_time(t0, *i) > ts.0).context("an entry after")?;
        let got: String = db.query_one(&format!("SELECT neon_lsn_at('{ts}')::text"), &[])?.get(0);
        anyhow::ensure!(
            got == Lsn(first.0 + want).to_string(),
            "neon_lsn_at('{ts}') = {got}, entry {want} is at {}",
            Lsn(first.0 + want)
        );
    }
    let year_q = format!(
        "SELECT neon_lsn_at('{}'::timestamptz + interval '1 second' * (($1::int8 * 7919) % {}) + interval '0.5 second')",
        PgTime(t0),
        entries - 2
    );
    let year = call_percentiles(&mut db, &year_q, calls)?;

    println!("The past as a schema at pgbench scale {scale} ({accounts} accounts)");
    println!();
    println!("{:<58} {:>9.2} s", "neon_as_of(time, 'past')", made.as_secs_f64());
    println!("{:<58} {:>9.2} s", "... and the first row of past.pgbench_accounts", first_row.as_secs_f64());
    println!(
        "{:<58} {:>9.2} s  ({:.2}x the first row)",
        "a row after an idle stop (the server started again)",
        woken.as_secs_f64(),
        woken.as_secs_f64() / first_row.as_secs_f64()
    );
    println!("{:<58} {:>9} {:>9}", "primary-key lookup, random accounts (µs)", "p50", "p99");
    println!("{:<58} {:>9.0} {:>9.0}", "  through past.pgbench_accounts (pages read cold)", past_pk.0, past_pk.1);
    println!("{:<58} {:>9.0} {:>9.0}", "  anchor: the compute's own pgbench_accounts", local_pk.0, local_pk.1);
    println!("Goals: first row <= 2 s; past lookup p50 <= 5000 µs.");
    println!();
    println!("neon_lsn_at from SQL, {calls} calls each, timed in the backend (µs)");
    println!();
    println!("{:<58} {:>9} {:>9}", "call", "p50", "p99");
    println!("{:<58} {:>9.0} {:>9.0}", format!("neon_lsn_at, a year in the index ({entries} ends)"), year.0, year.1);
    println!("{:<58} {:>9.0} {:>9.0}", "neon_lsn_at, this run's own history", own.0, own.1);
    println!(
        "{:<58} {:>9.0} {:>9.0}",
        "anchor: neon_rel_size (a sidecar round trip, no lookup)", rel_size.0, rel_size.1
    );
    println!("{:<58} {:>9.0} {:>9.0}", "anchor: pg_current_wal_lsn() (no sidecar)", plain.0, plain.1);
    println!();
    println!(
        "a year / neon_rel_size p50 = {:.2}x; index: {bytes} bytes for {entries} ends ({:.1} bytes each), written in {write_secs:.1} s",
        year.0 / rel_size.0,
        bytes as f64 / entries as f64
    );
    println!("Goal: neon_lsn_at p50 <= 1000 µs with a year of history.");
    Ok(())
}
