//! `bench/sql`: the SQL API as a user meets it, on a compute with its sidecar.
//!
//! 1. `neon_get_page` round trips timed inside the backend (a PL/pgSQL loop around each call,
//!    `clock_timestamp()`), p50/p99: a page the sidecar has cached, and pages needing redo
//!    (each block once, strided, and `neon.prefetch_distance = 0` so read-ahead stays out of
//!    it) — beside pageinspect's `get_raw_page` of the same page from shared buffers, the
//!    anchor. All on one connection, the one its settings were made on.
//! 2. A sequential read of a `--pages` relation at a past LSN through `neon_get_page`, with
//!    prefetch off (`neon.prefetch_distance = 0`) and on, each from a cold sidecar cache (the
//!    sidecar restarted before every run, and its redo processes up), best of `--runs`; the
//!    setting made, and read back, on the connection that runs the timed query.
//!
//! Goals: cached p50 < 50 µs from SQL; prefetch ≥ 3 × faster on the sequential read.

use anyhow::Result;
use neon_tests::bench::{call_percentiles as percentiles, CALL_TIMER as TIMER};
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use std::time::{Duration, Instant};

/// Sets `neon.prefetch_distance` on `db` and reads it back there: the timed queries run on
/// `db`, so that is where the setting has to be.
fn set_prefetch_distance(db: &mut postgres::Client, distance: u32) -> Result<()> {
    db.batch_execute(&format!("SET neon.prefetch_distance = {distance}"))?;
    let shown: String = db.query_one("SHOW neon.prefetch_distance", &[])?.get(0);
    anyhow::ensure!(shown == distance.to_string(), "neon.prefetch_distance is {shown}, not {distance}");
    Ok(())
}

fn main() -> Result<()> {
    let f = neon_tests::bench::Flags::parse(
        "bench-sql [--pages N] [--calls N] [--runs N]",
        &[("pages", "10000"), ("calls", "2000"), ("runs", "3")],
    )?;
    let (pages, calls, runs): (u32, u32, u32) = (f.get("pages")?, f.get("calls")?, f.get("runs")?);
    let (c, store) = cluster_born_with_store()?;
    let mut sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    sidecar.wait_redo_started(2)?;
    c.execute("CREATE EXTENSION neon; CREATE EXTENSION pageinspect")?;
    c.execute(TIMER)?;
    eprintln!("bench: a table of {pages} pages ...");
    // About 9 rows of 800 bytes a page, one INSERT record each: a page at the LSN after the
    // load is rebuilt from its records.
    c.execute(&format!(
        "CREATE TABLE seq (id int, pad text) WITH (autovacuum_enabled = off); \
         INSERT INTO seq SELECT g, repeat(md5(g::text), 25) FROM generate_series(1, {}) g",
        pages as u64 * 9
    ))?;
    let n: u32 = c.query_one_string("SELECT (pg_relation_size('seq') / 8192)::text")?.parse()?;
    let lsn = c.query_one_string("SELECT pg_current_wal_insert_lsn()::text")?;
    // Move on, so `lsn` is in the past.
    c.execute("UPDATE seq SET id = -id WHERE id % 10 = 0")?;
    c.execute("CHECKPOINT")?;
    // Timed calls should not share the machine with the sidecar's ingest of all that.
    sidecar.wait_durable(c.query_one_string("SELECT pg_current_wal_insert_lsn()::text")?.parse()?)?;

    eprintln!("bench: round trips ...");
    let mut db = c.connect("postgres")?;
    set_prefetch_distance(&mut db, 0)?;
    let cached_q = format!("SELECT neon_get_page('seq', 'main', 0, '{lsn}')");
    db.batch_execute(&cached_q)?;
    let cached = percentiles(&mut db, &cached_q, calls)?;
    // Each block once, 7 apart: never sequential, never cached.
    let redo_calls = calls.min(n / 14);
    let redo_q = format!("SELECT neon_get_page('seq', 'main', $1 * 7, '{lsn}')");
    let redo = percentiles(&mut db, &redo_q, redo_calls)?;
    // The same from the table's far end, where its newest pages are.
    let redo_end_q = format!("SELECT neon_get_page('seq', 'main', {} - $1 * 7, '{lsn}')", n - 1);
    let redo_end = percentiles(&mut db, &redo_end_q, redo_calls)?;
    let raw = percentiles(&mut db, "SELECT get_raw_page('seq', 'main', 0)", calls)?;
    drop(db);
    // The sidecar's own view of those GetPage requests: time spent serving them.
    let served = c.query_rows(
        "SELECT string_agg(name || ' ' || value, ', ' ORDER BY name) FROM neon_sidecar_status() \
         WHERE name IN ('get_page_mean_us', 'get_page_p50_us_under', 'get_page_p99_us_under', 'get_page_requests')",
    )?;
    let served = served[0][0].clone().unwrap_or_default();

    eprintln!("bench: sequential reads of {n} pages ...");
    let scan = format!(
        "SELECT count(*)::text FROM generate_series(0, {}) b, LATERAL neon_get_page('seq', 'main', b, '{lsn}') p",
        n - 1
    );
    let mut best = [Duration::MAX; 2];
    for _ in 0..runs {
        for (i, distance) in [0, 256].into_iter().enumerate() {
            sidecar.stop()?;
            sidecar = SidecarProcess::restart_for_compute(&c, &store, &[])?;
            // A cold cache, not cold processes: a running sidecar's redo processes are up.
            sidecar.wait_redo_started(2)?;
            let mut db = c.connect("postgres")?;
            set_prefetch_distance(&mut db, distance)?;
            let t = Instant::now();
            let got: String = db.query_one(scan.as_str(), &[])?.get(0);
            best[i] = best[i].min(t.elapsed());
            anyhow::ensure!(got == n.to_string(), "read {got} pages, not {n}");
        }
    }
    let status = c.query_rows(
        "SELECT name, value FROM neon_sidecar_status() WHERE name IN ('prefetched_pages', 'cache_hits', 'cache_waits')",
    )?;

    println!(
        "neon_get_page from SQL (timed in the backend on one connection with neon.prefetch_distance = 0; \
         {calls} calls, {redo_calls} for redo)"
    );
    println!();
    println!("{:<46} {:>10} {:>10}", "call", "p50 µs", "p99 µs");
    println!("{:<46} {:>10.1} {:>10.1}", "get_raw_page, shared buffers (anchor)", raw.0, raw.1);
    println!("{:<46} {:>10.1} {:>10.1}", "neon_get_page, cached in the sidecar", cached.0, cached.1);
    println!("{:<46} {:>10.1} {:>10.1}", "neon_get_page, rebuilt by redo (first half)", redo.0, redo.1);
    println!("{:<46} {:>10.1} {:>10.1}", "neon_get_page, rebuilt by redo (second half)", redo_end.0, redo_end.1);
    println!("cached p50 / anchor p50 = {:.1}x   (goal: cached p50 < 50 µs)", cached.0 / raw.0);
    println!("inside the sidecar, all of those: {served}");
    println!();
    println!("sequential read of {n} pages at {lsn}, cold sidecar cache, best of {runs}");
    println!("{:<46} {:>10} {:>10}", "prefetch", "seconds", "pages/s");
    for (i, name) in ["off (neon.prefetch_distance = 0)", "on  (neon.prefetch_distance = 256)"].iter().enumerate() {
        let s = best[i].as_secs_f64();
        println!("{name:<46} {s:>10.3} {:>10.0}", n as f64 / s);
    }
    println!("off / on = {:.2}x faster with prefetch   (goal >= 3x)", best[0].as_secs_f64() / best[1].as_secs_f64());
    let status: Vec<String> =
        status.iter().map(|r| r.iter().flatten().cloned().collect::<Vec<_>>().join(" ")).collect();
    println!("last run's sidecar: {}", status.join(", "));
    sidecar.stop()?;
    Ok(())
}
