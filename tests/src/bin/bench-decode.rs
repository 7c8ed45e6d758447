//! `bench/decode`: WAL decoding throughput of our decoder beside `pg_waldump` on the same files,
//! in the same run. A real PostgreSQL 15 server writes pgbench WAL (the bulk load of
//! `pgbench -i`, then a pgbench run of small OLTP records) until at least `--mb` megabytes
//! exist; each tool then reads each range several times and the best time counts (this machine
//! is noisy). Ratios are the figures to read.

use anyhow::{ensure, Result};
use neon_tests::workload;
use neon_tests::Cluster;
use neon_types::Lsn;
use sidecar::wal::segment::{SegmentSet, StopReason, WalFileReader};
use sidecar::wal::stats::WalStats;
use std::path::Path;
use std::time::{Duration, Instant};

struct Args {
    mb: u64,
    scale: u32,
    runs: usize,
}

fn parse_args() -> Result<Args> {
    let f = neon_tests::bench::Flags::parse(
        "bench-decode [--mb MB of pgbench-run WAL] [--scale pgbench scale] [--runs N]",
        &[("mb", "256"), ("scale", "10"), ("runs", "5")],
    )?;
    Ok(Args { mb: f.get("mb")?, scale: f.get("scale")?, runs: f.get("runs")? })
}

/// Decodes [start, end) with our reader, keeping `--stats`-style totals as pg_waldump does.
fn ours(wal: &Path, start: Lsn, end: Lsn) -> Result<(Duration, u64)> {
    let t = Instant::now();
    let mut reader = WalFileReader::new(SegmentSet::collect(&[wal.to_path_buf()], None)?, Some(start), Some(end))?;
    let mut stats = WalStats::default();
    while let Some(rec) = reader.next_view()? {
        stats.add(&rec);
    }
    let elapsed = t.elapsed();
    ensure!(reader.stop_reason() == Some(&StopReason::ReachedEnd), "stopped early: {:?}", reader.stop_reason());
    Ok((elapsed, stats.total().count))
}

fn pg_waldump(c: &Cluster, wal: &Path, start: Lsn, end: Lsn, mode: &str) -> Result<Duration> {
    let t = Instant::now();
    c.run_tool("pg_waldump", &[mode, "-p", wal.to_str().unwrap(), "-s", &start.to_string(), "-e", &end.to_string()])?;
    Ok(t.elapsed())
}

fn best<T>(runs: usize, mut f: impl FnMut() -> Result<(Duration, T)>) -> Result<(Duration, T)> {
    let mut best = f()?;
    for _ in 1..runs {
        let r = f()?;
        if r.0 < best.0 {
            best = r;
        }
    }
    Ok(best)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let c = Cluster::builder()
        .guc("wal_keep_size", "16GB")
        .guc("max_wal_size", "16GB")
        .guc("checkpoint_timeout", "30s")
        .guc("synchronous_commit", "off")
        .guc("shared_buffers", "256MB")
        .start()?;
    let wal = c.wal_dir();

    eprintln!("bench: pgbench -i -s {} ...", args.scale);
    let init_start = workload::insert_lsn(&c)?;
    c.pgbench(&["-i", "-q", "-s", &args.scale.to_string()])?;
    let run_start = workload::insert_lsn(&c)?;
    eprintln!("bench: pgbench run until {} MB of WAL ...", args.mb);
    while workload::insert_lsn(&c)? - run_start < args.mb << 20 {
        c.pgbench(&["-n", "-c", "4", "-j", "2", "-T", "5"])?;
    }
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;

    println!(
        "WAL decoding throughput, best of {} runs (files in the page cache; CRC32C checked by every tool)",
        args.runs
    );
    println!();
    println!(
        "{:<22} {:>9} {:>10} | {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>8} {:>8}",
        "range", "MB", "records", "ours s", "ours MB/s", "Mrec/s", "waldump s", "MB/s", "vs stats", "vs quiet"
    );
    for (name, start, stop) in
        [("pgbench -i (bulk)", init_start, run_start), ("pgbench run (OLTP)", run_start, end), ("all", init_start, end)]
    {
        let mb = (stop - start) as f64 / (1 << 20) as f64;
        let (ours_t, records) = best(args.runs, || ours(&wal, start, stop))?;
        let (stats_t, ()) = best(args.runs, || Ok((pg_waldump(&c, &wal, start, stop, "--stats")?, ())))?;
        let (quiet_t, ()) = best(args.runs, || Ok((pg_waldump(&c, &wal, start, stop, "--quiet")?, ())))?;
        let s = |d: Duration| d.as_secs_f64();
        println!(
            "{:<22} {:>9.1} {:>10} | {:>9.3} {:>9.0} {:>9.2} | {:>9.3} {:>9.0} | {:>7.2}x {:>7.2}x",
            name,
            mb,
            records,
            s(ours_t),
            mb / s(ours_t),
            records as f64 / s(ours_t) / 1e6,
            s(stats_t),
            mb / s(stats_t),
            s(stats_t) / s(ours_t),
            s(quiet_t) / s(ours_t),
        );
    }
    println!();
    println!("ours: sidecar::wal::segment::WalFileReader + WalStats, in process, release build.");
    println!("waldump: pg_waldump --stats (MB/s column); 'vs quiet' compares with pg_waldump --quiet (decode only).");
    println!("Ratios > 1 mean our decoder is faster. Process start of pg_waldump (~1 ms) is included in its times.");
    Ok(())
}
