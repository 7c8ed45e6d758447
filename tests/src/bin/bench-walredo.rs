//! `bench/walredo`: how fast wal-redo rebuilds pages on stock PostgreSQL 15, beside Neon's
//! published `bench_walredo` figures for its patched Postgres. Real heap-insert records from a
//! real server (a fresh table's first page: an initialising insert, then plain inserts) are
//! replayed through one redo process — one request at a time, and pipelined — and through
//! pools of 1 and 2 processes fed by 4 client threads.

use anyhow::{Context, Result};
use neon_tests::{is_root, server_user, workload, Cluster};
use neon_types::walredo as proto;
use neon_types::{BufferTag, ForkNumber, BLCKSZ};
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use sidecar::walredo::process::RedoProcess;
use sidecar::walredo::scratch::ScratchTemplate;
use sidecar::walredo::{redo_records_of, PostgresRedoManager, RedoConfig, RedoRecord, RedoRequest, WalRedoManager};
use std::time::{Duration, Instant};

/// Neon's bench_walredo on its patched Postgres (one client): µs per request.
const NEON_PING_US: f64 = 21.9;
const NEON_2_US: f64 = 32.1;
const NEON_226_US: f64 = 138.6;

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
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).start()?;
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

    let root = c.root_dir().join("bench-walredo");
    let cfg = config(&root.join("direct"), 1);
    let template = ScratchTemplate::create(&cfg)?;
    let dir = template.copy_for(0, &cfg)?;
    let t = Instant::now();
    let mut p = RedoProcess::start(&dir, &cfg)?;
    let start_ms = t.elapsed().as_secs_f64() * 1e3;

    println!("wal-redo on stock PostgreSQL 15 (postgres --single + neon_walredo_loop), one process unless noted");
    println!("records: real heap INSERTs on one page (first one initialises it), from {} to {}", from, to);
    println!();
    println!("{:<34} {:>12} {:>12} {:>10}", "request", "ours µs", "Neon µs", "ratio");
    let mut ping = Vec::new();
    proto::encode_ping(&mut ping);
    let ping_us = per_request_us(&mut p, &ping, 1, 20_000, 1, 3)?;
    println!("{:<34} {:>12.1} {:>12.1} {:>9.2}x", "ping (round trip)", ping_us, NEON_PING_US, NEON_PING_US / ping_us);
    for (label, k, anchor) in [
        ("2 records", 2, Some(NEON_2_US)),
        ("10 records", 10, None),
        (&*format!("{n226} records"), n226, Some(NEON_226_US)),
    ] {
        let mut one = Vec::new();
        encode(&tag, &records[..k], &mut one);
        let n = if k > 100 { 3_000 } else { 10_000 };
        let seq = per_request_us(&mut p, &one, BLCKSZ, n, 1, 3)?;
        let piped = per_request_us(&mut p, &one, BLCKSZ, n, 16, 3)?;
        let (a, r) =
            anchor.map_or(("-".to_string(), "-".to_string()), |a| (format!("{a:.1}"), format!("{:.2}x", a / seq)));
        println!("{:<34} {:>12.1} {:>12} {:>10}", format!("{label}, sequential"), seq, a, r);
        println!("{:<34} {:>12.1} {:>12} {:>10}", format!("{label}, pipelined x16"), piped, "-", "-");
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
    println!("Neon figures: bench_walredo on Neon's patched Postgres (ping 21.9 µs, 2 records 32.1 µs, ~226 heap inserts 138.6 µs).");
    println!(
        "ratio > 1: we are faster. This machine has 2 cores; the pool's clients share them with the redo processes."
    );
    Ok(())
}
