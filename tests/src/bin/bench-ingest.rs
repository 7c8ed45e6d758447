//! `bench/ingest`: the page store's ingest and read path, each figure beside its anchor from
//! the same run. Every anchor and every figure but lag is measured with nothing else of ours
//! running, one after the other:
//!
//! 1. pgbench alone (no follower, no sampler) for `--seconds`: the rate at which the compute
//!    writes WAL on this machine, the anchor for ingest.
//! 2. Ingest throughput of that same WAL (decode + file values + durable layer files, in
//!    process, from an archive), beside (1) and beside a PostgreSQL standby replaying the same
//!    WAL from the archive (a restore to `recovery_target_lsn`, timed from start to its
//!    shutdown at the target).
//! 3. Page-at-LSN latency in process on the store of (2): an image hit, a 10-record and a
//!    100-record chain. Bytes of layer files per byte of WAL.
//! 4. Replication lag, the one figure that needs both running: a second pgbench run of
//!    `--seconds` with the follower streaming into a store while a sampler reads the compute's
//!    flush LSN every 10 ms and times how long until the store has it. pgbench's WAL rate in
//!    that run is printed beside (1): what the follower costs the compute on a shared machine.

use anyhow::Result;
use neon_tests::pages::redo_config;
use neon_tests::store::replication_config;
use neon_tests::{run_as_server_user, workload, Cluster};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag};
use sidecar::follower::{self, FollowerConfig};
use sidecar::replication::client::ReplicationConn;
use sidecar::repo::key::Key;
use sidecar::repo::reconstruct::get_page;
use sidecar::repo::timeline::Timeline;
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use sidecar::walredo::PostgresRedoManager;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Args {
    scale: u32,
    seconds: u32,
}

fn parse_args() -> Result<Args> {
    let f = neon_tests::bench::Flags::parse(
        "bench-ingest [--scale pgbench scale] [--seconds of pgbench]",
        &[("scale", "10"), ("seconds", "30")],
    )?;
    Ok(Args { scale: f.get("scale")?, seconds: f.get("seconds")? })
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Ingests [start, end) of the WAL in `wal` into a new store at `dir`, flushing every 64 MB
/// and at the end. Returns the time taken and the store; prints where the time went (decoding
/// alone, filing values, writing layer files).
fn ingest(wal: &Path, start: Lsn, end: Lsn, dir: &Path) -> Result<(Duration, Timeline)> {
    let reader = || -> Result<WalFileReader> {
        Ok(WalFileReader::new(SegmentSet::collect(&[wal.to_path_buf()], None)?, Some(start), Some(end))?)
    };
    let t = Instant::now();
    let mut r = reader()?;
    let mut records = 0u64;
    while r.next_record()?.is_some() {
        records += 1;
    }
    let decode = t.elapsed();

    let _ = std::fs::remove_dir_all(dir);
    let t = Instant::now();
    let repo = Timeline::open(dir)?;
    repo.begin_history(start);
    let filed = sidecar::follower::file_wal_files(&repo, &mut reader()?, 64 << 20, |_| {})?;
    anyhow::ensure!(filed.records == records, "filed {} records of {records}", filed.records);
    let flushing = filed.flushing;
    let total = t.elapsed();
    eprintln!(
        "bench: ingest of {records} records: {total:?}; alone, decoding takes {decode:?}; layer files were written \
         for {flushing:?} of it, beside filing"
    );
    Ok((total, repo))
}

/// A standby restored from `backup` replaying the archive in `archive` up to `end`.
fn standby_replay(c: &Cluster, backup: &Path, archive: &Path, end: Lsn) -> Result<Duration> {
    let conf = format!(
        "restore_command = 'cp {}/%f %p'\nrecovery_target_lsn = '{end}'\nrecovery_target_action = 'shutdown'\n\
         listen_addresses = ''\nunix_socket_directories = '{}'\n",
        archive.display(),
        backup.display()
    );
    std::fs::write(backup.join("postgresql.auto.conf"), conf)?;
    std::fs::write(backup.join("recovery.signal"), "")?;
    neon_tests::chown_to_server_user(backup)?;
    let t = Instant::now();
    let log = backup.join("replay.log");
    let mut cmd = std::process::Command::new(c.server_tool("postgres").get_program());
    cmd.arg("-D").arg(backup).stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log)?);
    run_as_server_user(&mut cmd);
    let status = cmd.status()?;
    let elapsed = t.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    anyhow::ensure!(text.contains("shutdown at recovery target"), "standby exited with {status}: {text}");
    Ok(elapsed)
}

/// Replication lag under pgbench: `pgbench -T seconds` on `c` with the follower streaming into
/// a new store at `dir` and a sampler timing, every 10 ms, how long until the store has the
/// compute's flush LSN. Returns the lags (ms) and pgbench's WAL rate in that run (MB/s).
fn lag_under_pgbench(c: &Cluster, dir: &Path, seconds: u32) -> Result<(Vec<f64>, f64)> {
    let store = neon_tests::store::new_store(c, dir)?;
    let repo = store.current();
    let slot_start = ReplicationConn::connect(&replication_config(c))?.create_slot("bench")?;
    repo.begin_history(slot_start);
    let cfg = FollowerConfig {
        replication: replication_config(c),
        store: dir.to_path_buf(),
        slot: "bench".into(),
        flush_interval: Duration::from_millis(1000),
        flush_bytes: 64 << 20,
        chain_limit: 0,
        remote_durable: None,
    };
    let stop = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let run_start = workload::flush_lsn(c)?;
    let (pgbench_time, lags) = std::thread::scope(|s| -> Result<(Duration, Vec<f64>)> {
        let follower =
            s.spawn(|| follower::run_into(&store, &cfg, &stop, &mut |_, _, _| {}, &follower::IngestState::default()));
        let sampler = s.spawn(|| -> Result<Vec<f64>> {
            let mut conn = c.connect("postgres")?;
            let mut lags = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let l: String = conn.query_one("SELECT pg_current_wal_flush_lsn()::text", &[])?.get(0);
                let t = Instant::now();
                repo.wait_for_lsn(l.parse()?, Duration::from_secs(10))?;
                lags.push(t.elapsed().as_secs_f64() * 1e3);
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(lags)
        });
        let t = Instant::now();
        let r = c.pgbench(&["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string()]);
        let elapsed = t.elapsed();
        done.store(true, Ordering::Relaxed);
        let lags = sampler.join().expect("sampler")?;
        stop.store(true, Ordering::Relaxed);
        follower.join().expect("follower")?;
        r?;
        Ok((elapsed, lags))
    })?;
    let run_end = workload::flush_lsn(c)?;
    anyhow::ensure!(!lags.is_empty(), "no lag samples");
    Ok((lags, (run_end - run_start) as f64 / 1048576.0 / pgbench_time.as_secs_f64()))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let c = Cluster::builder()
        .guc("wal_keep_size", "16GB")
        .guc("max_wal_size", "16GB")
        .guc("checkpoint_timeout", "1h")
        .guc("shared_buffers", "256MB")
        .start()?;
    eprintln!("bench: pgbench -i -s {} ...", args.scale);
    c.pgbench(&["-i", "-q", "-s", &args.scale.to_string()])?;
    let backup = c.root_dir().join("standby");
    c.run_server_tool("pg_basebackup", &["-D", backup.to_str().unwrap(), "-X", "none", "-c", "fast"])?;

    // (1) The compute's WAL rate with the machine to itself: nothing of ours runs yet, so the
    // anchor is not slowed by the thing it is compared with. The run's WAL starts where the next
    // record goes: past the segment switch that ended the backup, whose skipped rest of a
    // segment is no WAL anyone reads.
    let run_start = workload::insert_lsn(&c)?;
    eprintln!("bench: pgbench -T {} alone ...", args.seconds);
    let t = Instant::now();
    c.pgbench(&["-n", "-c", "4", "-j", "2", "-T", &args.seconds.to_string()])?;
    let pgbench_time = t.elapsed();
    let run_end = workload::flush_lsn(&c)?;
    let compute_rate = (run_end - run_start) as f64 / 1048576.0 / pgbench_time.as_secs_f64();
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;
    // The standby stops after the record starting at its target: the checkpoint just taken.
    let target: Lsn = c.query_one_string("SELECT checkpoint_lsn FROM pg_control_checkpoint()")?.parse()?;

    // (2) Ingest of that WAL (the run and the checkpoint after it), and a standby replaying it
    // from the backup, each alone. Both rates are of the run's WAL: what the standby replays
    // before it (the backup's checkpoint and end) is a few records.
    let archive = neon_tests::bench::archive_wal(&c)?;
    let wal_mb = (end - run_start) as f64 / 1048576.0;
    eprintln!("bench: ingesting {wal_mb:.0} MB ...");
    let (ingest_time, store) = ingest(&archive, run_start, end, &c.root_dir().join("store"))?;
    let layer_bytes: u64 = store.layers().iter().map(|l| l.size_bytes()).sum();
    eprintln!("bench: standby replay of the same WAL ...");
    let replay_time = standby_replay(&c, &backup, &archive, target)?;

    // (3) Page latency on the hottest page: pgbench_branches block 0.
    let branches: u32 = c.query_one_string("SELECT pg_relation_filenode('pgbench_branches')")?.parse()?;
    let tag = BufferTag {
        rel: RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: branches }, fork: ForkNumber::Main },
        blkno: 0,
    };
    let chain = store.values_for(Key::rel_block(&tag), end)?;
    anyhow::ensure!(chain.len() > 101, "the hot page's chain has only {} values", chain.len());
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 1))?;
    let mut latencies = Vec::new();
    for (name, records) in [("image hit", 0usize), ("10-record chain", 10), ("100-record chain", 100)] {
        let lsn = chain[records].0;
        anyhow::ensure!(store.values_for(Key::rel_block(&tag), lsn)?.len() == records + 1);
        let mut v = Vec::new();
        for _ in 0..2000 {
            let t = Instant::now();
            get_page(&store, &redo, tag, lsn)?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
        latencies.push((name, percentile(&mut v, 0.5), percentile(&mut v, 0.99)));
    }
    drop(redo);

    // (4) Lag: the follower and pgbench together, as in production.
    eprintln!("bench: pgbench -T {} with the follower streaming ...", args.seconds);
    let (mut lags, shared_rate) = lag_under_pgbench(&c, &c.root_dir().join("store-live"), args.seconds)?;

    let ingest_rate = wal_mb / ingest_time.as_secs_f64();
    let replay_rate = wal_mb / replay_time.as_secs_f64();
    println!("Page store ingest and reads (pgbench -s {}, {} s runs, release build)", args.scale, args.seconds);
    println!();
    println!("{:<42} {:>12} | {:<40} {:>10} | {:>7}", "figure", "ours", "anchor (same run)", "anchor", "ratio");
    let row = |name: &str, ours: String, anchor: &str, theirs: String, ratio: String| {
        println!("{name:<42} {ours:>12} | {anchor:<40} {theirs:>10} | {ratio:>7}")
    };
    row(
        &format!("ingest of {wal_mb:.0} MB WAL alone, MB/s"),
        format!("{ingest_rate:.0}"),
        "pgbench producing it alone, MB/s",
        format!("{compute_rate:.1}"),
        format!("{:.1}x", ingest_rate / compute_rate),
    );
    row(
        "ingest alone, MB/s",
        format!("{ingest_rate:.0}"),
        "standby replay of the same WAL, MB/s",
        format!("{replay_rate:.0}"),
        format!("{:.1}x", ingest_rate / replay_rate),
    );
    row(
        "pgbench with the follower beside, MB/s",
        format!("{shared_rate:.1}"),
        "pgbench alone, MB/s",
        format!("{compute_rate:.1}"),
        format!("{:.2}x", shared_rate / compute_rate),
    );
    row(
        "lag under pgbench p50, ms",
        format!("{:.2}", percentile(&mut lags, 0.5)),
        "goal p99 < 50 ms",
        "".into(),
        "".into(),
    );
    row("lag under pgbench p99, ms", format!("{:.2}", percentile(&mut lags, 0.99)), "", "".into(), "".into());
    for (name, p50, p99) in latencies {
        row(&format!("{name} p50 / p99, us"), format!("{p50:.1} / {p99:.1}"), "", "".into(), "".into());
    }
    row(
        "bytes on disk per byte of WAL",
        format!("{:.2}", layer_bytes as f64 / (end - run_start) as f64),
        "",
        "".into(),
        "".into(),
    );
    println!();
    println!("Ingest, its anchors and page reads were each timed with nothing else of ours running; only the");
    println!("lag run has pgbench and the follower share this machine's 2 cores (its pgbench rate shows the cost).");
    println!("Goals: ingest >= 5x the compute's WAL rate and >= 300 MB/s; lag p99 < 50 ms;");
    println!("image hit p50 < 20 us; 10-record chain p50 < 60 us (in process). Lag is until the record is");
    println!("readable in the store (durability follows at the next flush, every second here).");
    Ok(())
}
