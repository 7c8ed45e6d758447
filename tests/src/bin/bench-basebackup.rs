//! `bench/basebackup`: a data directory as of a past LSN, three ways, in one run on one
//! pgbench database (default scale 70, about 1 GB) with at least `--wal-mb` of WAL (default
//! 1024) written after the first backup:
//!
//! (a) ours: a `Basebackup` request at L to the sidecar that followed pgbench (what the
//!     extension's `neon_basebackup()` sends), L deep in the past (80 % into the run's WAL);
//! (b) `pg_basebackup -Ft` of the database now — the copy-speed anchor, for *now* only;
//! (c) what users do today for L: restore the base backup taken at the start and replay the
//!     archived WAL to `recovery_target_lsn = L`, until the copy is promoted and accepts
//!     connections.
//!
//! Each copy of L is checked after its timing stops: the tar (a) wrote is unpacked and booted
//! by stock PostgreSQL 15 (as the server's OS user), and it and the copy (c) produced must both
//! hold what the compute held at L — pgbench_history's row count and the sum of the accounts'
//! balances, read from the compute when L was taken (pgbench idle, so nothing moved them since).
//!
//! Goals: (a) ≤ 1.5 × (b) in seconds, and (a) ≥ 10 × faster than (c).

use anyhow::{Context, Result};
use neon_tests::bench::{dir_bytes, restore_and_replay, state};
use neon_tests::sidecar::{boot_basebackup, init_store, SidecarProcess};
use neon_tests::{workload, Cluster};
use neon_types::protocol::{Request, Response};
use std::path::Path;
use std::time::{Duration, Instant};

struct Args {
    scale: u32,
    wal_mb: u64,
}

fn parse_args() -> Result<Args> {
    let f = neon_tests::bench::Flags::parse(
        "bench-basebackup [--scale pgbench scale] [--wal-mb MB of WAL after the backup]",
        &[("scale", "70"), ("wal-mb", "1024")],
    )?;
    Ok(Args { scale: f.get("scale")?, wal_mb: f.get("wal-mb")? })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let mut c = Cluster::builder()
        .guc("wal_keep_size", "64GB")
        .guc("max_wal_size", "8GB")
        .guc("checkpoint_timeout", "30min")
        .guc("shared_buffers", "512MB")
        .init()?;
    let store = c.root_dir().join("store");
    init_store(&c, &store)?;
    c.start_again()?;
    let shared = c.root_dir().join("shared");
    let sidecar = SidecarProcess::start_with(&c, &store, &["--shared-dir", shared.to_str().unwrap()])?;
    eprintln!("bench: pgbench -i -s {} ...", args.scale);
    c.pgbench(&["-i", "-q", "-s", &args.scale.to_string()])?;
    let base = c.root_dir().join("start-backup");
    c.run_server_tool("pg_basebackup", &["-D", base.to_str().unwrap(), "-X", "none", "-c", "fast"])?;
    let run_start = workload::flush_lsn(&c)?;
    eprintln!("bench: pgbench until {} MB of WAL ...", args.wal_mb);
    let mut target = None;
    loop {
        c.pgbench(&["-n", "-c", "4", "-j", "2", "-T", "5"])?;
        let written = workload::flush_lsn(&c)? - run_start;
        if target.is_none() && written >= args.wal_mb * (1 << 20) * 8 / 10 {
            // pgbench has stopped and every commit is flushed: the state read now is the
            // state at L.
            let lsn = workload::flush_lsn(&c)?;
            target = Some((lsn, state(&mut c.connect("postgres")?)?));
        }
        if written >= args.wal_mb << 20 {
            break;
        }
    }
    let (target, at_target) = target.context("no target LSN")?;
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;
    eprintln!("bench: waiting for the sidecar to be durable to {end} ...");
    sidecar.wait_durable(end)?;
    let db_bytes: u64 = c.query_one_string("SELECT sum(pg_database_size(oid)) FROM pg_database")?.parse()?;

    // (a) as users get it: a request to the running sidecar (what `neon_basebackup()` sends).
    eprintln!("bench: (a) our base backup at {target} ...");
    let t = Instant::now();
    let (ours, a_bytes) =
        match sidecar.ask(&Request::Basebackup { lsn: target, full: true, new_timeline: false, wait_ms: 0 })? {
            Response::Basebackup { path, bytes, .. } => (path, bytes),
            r => anyhow::bail!("unexpected {r:?}"),
        };
    let a = t.elapsed();
    eprintln!("bench: {ours}; booting it ...");
    sidecar.stop()?;
    // Not timed: the tar just timed must be a data directory of the database at L.
    let booted = boot_basebackup(Path::new(&ours))?;
    let a_held = state(&mut booted.connect("postgres")?)?;
    drop(booted);
    anyhow::ensure!(a_held == at_target, "(a) booted holds {a_held}, the compute held {at_target} at {target}");

    eprintln!("bench: (b) pg_basebackup -Ft now ...");
    let now_dir = c.root_dir().join("now");
    let t = Instant::now();
    c.run_server_tool("pg_basebackup", &["-D", now_dir.to_str().unwrap(), "-Ft", "-X", "none", "-c", "fast"])?;
    let b = t.elapsed();
    let b_bytes = dir_bytes(&now_dir);

    eprintln!("bench: (c) restore the start backup and replay to {target} ...");
    let archive = neon_tests::bench::archive_wal(&c)?;
    let replay_mb = (target - run_start) as f64 / 1048576.0;
    c.stop()?;
    let (r, c_held) = restore_and_replay(&c, &base, &archive, target)?;
    anyhow::ensure!(c_held == at_target, "(c) holds {c_held}, the compute held {at_target} at {target}");

    let mb = |bytes: u64| bytes as f64 / 1048576.0;
    println!(
        "A data directory as of a past LSN (pgbench -s {}, {:.0} MB of databases, {:.0} MB of WAL replayed by (c))",
        args.scale,
        mb(db_bytes),
        replay_mb
    );
    println!();
    println!("{:<58} {:>9} {:>9} {:>9}", "way", "seconds", "MB", "MB/s");
    let row = |name: &str, d: Duration, bytes: u64| {
        println!("{name:<58} {:>9.2} {:>9.0} {:>9.0}", d.as_secs_f64(), mb(bytes), mb(bytes) / d.as_secs_f64())
    };
    row(&format!("(a) running sidecar: Basebackup at {target}"), a, a_bytes);
    row("(b) pg_basebackup -Ft, now (copy-speed anchor)", b, b_bytes);
    row("(c) restore start backup + replay to the LSN", r, db_bytes);
    println!();
    let (rows, sum) = at_target.split_once(' ').unwrap_or((&at_target, ""));
    println!("(a) booted by PostgreSQL 15 and (c) both hold the compute's state at {target}: {rows} rows in");
    println!("pgbench_history, sum(abalance) = {sum}. (b) is a copy of now, not of L: an anchor for copy speed only.");
    println!("(a) / (b) = {:.2}  (goal <= 1.5)", a.as_secs_f64() / b.as_secs_f64());
    println!("(c) / (a) = {:.1}x faster  (goal >= 10x)", r.as_secs_f64() / a.as_secs_f64());
    // (a) grows with the database, (c) with the WAL between the last full backup and L: at the
    // replay rate measured here, this much WAL makes (c) ten times (a).
    let replay_rate = replay_mb / r.as_secs_f64();
    println!(
        "(c) replayed {replay_rate:.0} MB/s of WAL: (c) = 10 x (a) from {:.1} GB of WAL between the full backup and L",
        10.0 * a.as_secs_f64() * replay_rate / 1024.0
    );
    Ok(())
}
