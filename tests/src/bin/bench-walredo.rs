//! `bench/walredo`: how fast wal-redo rebuilds pages on stock PostgreSQL 15. Real heap-insert
//! records from a real server (a fresh table's first page: an initialising insert, then plain
//! inserts) are replayed through one redo process — one request at a time, and pipelined — and
//! through pools of 1 and 2 processes fed by 4 client threads.
//!
//! The anchor, measured in the same run on the same machine: PostgreSQL's own startup process
//! replaying records of the same kind (one `int` row inserted into a table like ours, a page
//! initialised every 226 rows) in crash recovery, timed by the server itself (`redo starts` to
//! `redo done`), per record. A request of k records is set beside k of those records' worth of
//! PostgreSQL's replay: the same page work, done by PostgreSQL in its own buffers, without our
//! round trip. Neon's published `bench_walredo` figures (its machine, its patched PostgreSQL,
//! its records) are printed apart, as published, with no ratio taken against them.

use anyhow::{Context, Result};
use neon_tests::pg_waldump::parse_stats;
use neon_tests::{is_root, server_user, workload, Cluster};
use neon_types::walredo as proto;
use neon_types::{BufferTag, ForkNumber, Lsn, BLCKSZ};
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use sidecar::walredo::process::RedoProcess;
use sidecar::walredo::scratch::ScratchTemplate;
use sidecar::walredo::{redo_records_of, PostgresRedoManager, RedoConfig, RedoRecord, RedoRequest, WalRedoManager};
use std::time::{Duration, Instant};

/// Neon's bench_walredo on its patched Postgres (one client): µs per request. Published, not
/// measured here: shown for reference only.
const NEON_PUBLISHED: &str = "ping 21.9 µs, 2 records 32.1 µs, ~226 heap inserts 138.6 µs a request";

/// PostgreSQL's crash recovery of `rows` single-row heap INSERTs: what it replayed and how long
/// its redo loop took, as the server logs it.
struct Replay {
    records: u64,
    inserts: u64,
    seconds: f64,
}

impl Replay {
    fn us_per_record(&self) -> f64 {
        self.seconds * 1e6 / self.records as f64
    }
}

/// The anchor: a table like `bench` filled with `rows` rows (one INSERT record each, as the
/// bench's records are), then an immediate shutdown, so the next start replays all of them
/// from the checkpoint taken just before. The server times its own redo loop and logs it with
/// `redo done at ... elapsed: S s` (PostgreSQL 15, xlogrecovery.c); pg_waldump counts what lay
/// between `redo starts at` and the end of the WAL.
fn postgres_replay(c: &mut Cluster, rows: u64) -> Result<Replay> {
    c.execute("CREATE TABLE replay (i int) WITH (autovacuum_enabled = off); CHECKPOINT")?;
    c.execute(&format!("INSERT INTO replay SELECT g FROM generate_series(1, {rows}) g"))?;
    let end = workload::flush_lsn(c)?;
    let log_from = c.log_contents().len();
    c.crash()?;
    c.start_again()?;
    let log = c.log_contents().get(log_from..).unwrap_or_default().to_string();
    let after = |marker: &str| -> Result<&str> {
        let line = log.lines().find(|l| l.contains(marker)).with_context(|| format!("no {marker:?} in:\n{log}"))?;
        Ok(&line[line.find(marker).expect("found") + marker.len()..])
    };
    let start: Lsn = after("redo starts at ")?.trim().parse()?;
    let seconds: f64 = after("redo done at ")?
        .split("elapsed: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .context("no elapsed time on the redo done line")?
        .parse()?;
    let stats = c.run_tool(
        "pg_waldump",
        &["--stats=record", "-p", c.wal_dir().to_str().unwrap(), "-s", &start.to_string(), "-e", &end.to_string()],
    )?;
    let rows_seen = parse_stats(&stats);
    let records = rows_seen.iter().map(|r| r.count).sum();
    let inserts = rows_seen.iter().filter(|r| r.name.starts_with("Heap/INSERT")).map(|r| r.count).sum();
    anyhow::ensure!(inserts >= rows, "pg_waldump saw {inserts} heap inserts, not {rows}:\n{stats}");
    // The server logs elapsed time in hundredths of a second.
    anyhow::ensure!(
        seconds >= 0.2,
        "PostgreSQL replayed {records} records in {seconds} s: too few to time, raise --replay-rows"
    );
    Ok(Replay { records, inserts, seconds })
}

fn config(root: &std::path::Path, processes: usize) -> RedoConfig {
    let mut cfg = RedoConfig::new(root.to_path_buf());
    cfg.processes = processes;
    if is_root() {
        cfg.run_as = Some(server_user());
    }
    cfg
}

fn encode(tag: &BufferTag, records: &[RedoRecord], out: &mut Vec<u8>) {
    proto::encode_begin(out, tag);
    for r in records {
        if let RedoRecord::Postgres { end_lsn, raw } = r {
            proto::encode_apply(out, *end_lsn, raw);
        }
    }
    proto::encode_get(out);
}

/// Best-of-`rounds` mean µs per request, `n` requests per round, `batch` pipelined per exchange.
fn per_request_us(
    p: &mut RedoProcess,
    one: &[u8],
    reply_len: usize,
    n: usize,
    batch: usize,
    rounds: usize,
) -> Result<f64> {
    let mut msg = Vec::new();
    for _ in 0..batch {
        msg.extend_from_slice(one);
    }
    let mut reply = vec![0u8; reply_len * batch];
    let mut best = f64::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..n / batch {
            p.exchange(&msg, &mut reply, Instant::now() + Duration::from_secs(30))?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / (n / batch * batch) as f64);
    }
    Ok(best)
}

fn main() -> Result<()> {
    let f = neon_tests::bench::Flags::parse(
        "bench-walredo [--replay-rows rows PostgreSQL replays for the anchor]",
        &[("replay-rows", "2000000")],
    )?;
    let replay_rows: u64 = f.get("replay-rows")?;
    // Room for the anchor's table in shared buffers, so PostgreSQL's replay does not write
    // pages out mid-redo (ours never does); LOG level for its `redo done` line.
    let mut c = Cluster::builder()
        .gucs(workload::MIXED_GUCS)
        .guc("shared_buffers", "256MB")
        .guc("log_min_messages", "log")
        .start()?;
    c.execute("CREATE TABLE bench (i int)")?;
    let from = workload::insert_lsn(&c)?;
    // One statement per row: one heap INSERT record each, all on the first page.
    for i in 0..226 {
        c.execute(&format!("INSERT INTO bench VALUES ({i})"))?;
    }
    let to = workload::flush_lsn(&c)?;
    let filenode: u32 = c.query_one_string("SELECT pg_relation_filenode('bench')")?.parse()?;
    let mut records = Vec::new();
    let mut target = None;
    let mut reader = WalFileReader::new(SegmentSet::collect(&[c.wal_dir()], None)?, Some(from), Some(to))?;
    while let Some(rec) = reader.next_record()? {
        redo_records_of(&rec, |tag, r| {
            if tag.rel.node.relnode == filenode && tag.rel.fork == ForkNumber::Main && tag.blkno == 0 {
                target = Some(tag);
                records.push(r);
            }
        })?;
    }
    let tag = target.context("no records for the bench table")?;
    let n226 = records.len();
    anyhow::ensure!(n226 >= 200, "only {n226} records on the first page");

    eprintln!("bench: anchor: PostgreSQL's crash recovery of {replay_rows} heap inserts ...");
    let replay = postgres_replay(&mut c, replay_rows)?;
    let pg_us = replay.us_per_record();

    let root = c.root_dir().join("bench-walredo");
    let cfg = config(&root.join("direct"), 1);
    let template = ScratchTemplate::create(&cfg)?;
    let dir = template.copy_for(0, &cfg)?;
    let t = Instant::now();
    let mut p = RedoProcess::start(&dir, &cfg)?;
    let start_ms = t.elapsed().as_secs_f64() * 1e3;

    println!("wal-redo on stock PostgreSQL 15 (postgres --single + neon_walredo_loop), one process unless noted");
    println!("records: real heap INSERTs on one page (first one initialises it), from {} to {}", from, to);
    println!(
        "anchor (same run): PostgreSQL 15 crash recovery replayed {} records ({} heap inserts of the same kind)",
        replay.records, replay.inserts
    );
    println!(
        "        in {:.2} s of redo (its own log) = {pg_us:.3} µs a record, in its shared buffers",
        replay.seconds
    );
    println!();
    println!("{:<34} {:>12} {:>16} {:>10}", "request", "ours µs", "PG replay µs", "ratio");
    let mut ping = Vec::new();
    proto::encode_ping(&mut ping);
    let ping_us = per_request_us(&mut p, &ping, 1, 20_000, 1, 3)?;
    println!("{:<34} {:>12.1} {:>16} {:>10}", "ping (round trip)", ping_us, "-", "-");
    for (label, k) in [("2 records", 2), ("10 records", 10), (&*format!("{n226} records"), n226)] {
        let mut one = Vec::new();
        encode(&tag, &records[..k], &mut one);
        let n = if k > 100 { 3_000 } else { 10_000 };
        let seq = per_request_us(&mut p, &one, BLCKSZ, n, 1, 3)?;
        let piped = per_request_us(&mut p, &one, BLCKSZ, n, 16, 3)?;
        // What PostgreSQL's own replay spends on k records of this kind.
        let anchor = k as f64 * pg_us;
        for (how, ours) in [("sequential", seq), ("pipelined x16", piped)] {
            println!("{:<34} {:>12.1} {:>16.1} {:>9.2}x", format!("{label}, {how}"), ours, anchor, anchor / ours);
        }
    }
    println!("{:<34} {:>12.1}", "process start to ready (ms)", start_ms);
    drop(p);
    template.remove();

    println!();
    println!("{:<34} {:>12} {:>12}", "pool (4 client threads, 10 records)", "requests/s", "vs pool 1");
    let mut base_rate = 0.0;
    for size in [1, 2] {
        let manager = PostgresRedoManager::new(config(&root.join(format!("pool{size}")), size))?;
        let req = RedoRequest { target: tag, base: None, records: records[..10].to_vec() };
        manager.redo(req.clone())?; // start processes before timing
        let per_thread = 5_000;
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (m, r) = (&manager, &req);
                s.spawn(move || {
                    for _ in 0..per_thread {
                        m.redo(r.clone()).expect("redo");
                    }
                });
            }
        });
        let rate = (4 * per_thread) as f64 / t.elapsed().as_secs_f64();
        if size == 1 {
            base_rate = rate;
        }
        println!("{:<34} {:>12.0} {:>11.2}x", format!("pool of {size}"), rate, rate / base_rate);
    }
    println!();
    println!("PG replay µs: k records × PostgreSQL's replay time a record, measured above: the same page work");
    println!("done by PostgreSQL's startup process (WAL read, decoded and applied in its buffers) with no request");
    println!("round trip. ratio = PG replay / ours; > 1: we are faster.");
    println!("This machine has 2 cores; the pool's clients share them with the redo processes.");
    println!();
    println!("Published, not measured here and not comparable (no ratio taken): Neon's bench_walredo on its");
    println!("patched PostgreSQL 14, on another machine with other records:");
    println!("  {NEON_PUBLISHED}.");
    Ok(())
}
