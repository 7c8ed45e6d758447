//! `bench/branch`: a copy of the database as of a past LSN, queried — how long from the request
//! to the first answer of `SELECT count(*) FROM pgbench_branches` on it, at each pgbench scale
//! of `--scales` (default 10,70), one run per scale, four ways:
//!
//! * branch: a `BranchCreate` request to the running sidecar (what `neon_branch_create()`
//!   sends), PostgreSQL 15 started on the mount, the query;
//! * (a) our base backup at L (`Basebackup`, what `neon_basebackup()` sends), unpacked, booted,
//!   the query;
//! * (b) what users do today for L: restore the base backup taken before the run and replay
//!   the archived WAL to `recovery_target_lsn = L` until promoted;
//! * (c) `pg_basebackup` of the database *now*, booted, the query — a copy-speed anchor only.
//!
//! Every server is started the same way: `pg_ctl start`, ready when its `postmaster.pid` says
//! so (looked at every 5 ms; `pg_ctl -w` alone looks every 100 ms), then a first connection.
//! `--sidecar-args` are added to the sidecar's `run` (e.g. `--chain-limit 8`).
//!
//! L lies 80 % into `--wal-mb` of pgbench WAL written after the start backup. Every copy of L
//! is checked (after its timing) against what the compute held at L: pgbench_history's rows
//! and sum(abalance). Then cold sequential scans of pgbench_accounts (server restarted, the
//! kernel's page cache dropped) on the branch and on (a)'s local copy in turn, `--scans` of
//! each (default 3, this machine is noisy): their medians.
//!
//! Goals: first answer on a branch ≤ 1 s at every scale (flat in the database's size);
//! ≥ 10 × faster than (b) at scale 70; cold scan on the branch ≤ 2 × the local copy's.

use anyhow::{Context, Result};
use neon_tests::bench::{restore_and_replay, state};
use neon_tests::sidecar::{boot_basebackup, init_store, SidecarProcess};
use neon_tests::{chown_to_server_user, is_root, workload, Cluster};
use neon_types::protocol::{Request, Response};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FIRST_ANSWER: &str = "SELECT count(*) FROM pgbench_branches";
const SCAN: &str = "SELECT count(*), sum(abalance) FROM pgbench_accounts";

/// Empties the kernel's page cache (root only); says whether it could.
fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    is_root() && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// `sql` on `b`, timed.
fn timed(b: &Cluster, sql: &str) -> Result<Duration> {
    let mut db = b.connect("postgres")?;
    let t = Instant::now();
    db.simple_query(sql)?;
    Ok(t.elapsed())
}

/// The cold scan: `b` restarted (nothing in shared buffers), the page cache dropped; the scan
/// alone profiled if asked (see `profile_start`).
fn cold_scan(b: &mut Cluster, profile: bool) -> Result<Duration> {
    b.stop()?;
    drop_caches();
    b.start_again()?;
    let perf = if profile { profile_start("NEON_BENCH_PERF", 499)? } else { None };
    let took = timed(b, SCAN);
    profile_stop(perf)?;
    took
}

/// With `<var>=FILE`, `perf record` of the whole machine (call graphs, `hz` samples a second)
/// into FILE: `NEON_BENCH_PERF` while the branch is scanned (where a cold scan's time goes),
/// `NEON_BENCH_PERF_FIRST` from the branch's request to its first answer.
fn profile_start(var: &str, hz: u32) -> Result<Option<std::process::Child>> {
    let Some(out) = std::env::var_os(var) else { return Ok(None) };
    let child = std::process::Command::new("perf")
        .args(["record", "-a", "-g", "-F", &hz.to_string(), "-o"])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Some(child))
}

fn profile_stop(perf: Option<std::process::Child>) -> Result<()> {
    if let Some(mut child) = perf {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait()?;
    }
    Ok(())
}

struct Row {
    scale: u32,
    db_mb: f64,
    wal_mb: f64,
    branch: Duration,
    ours: Duration,
    replay: Duration,
    now: Duration,
    scan_branch: Duration,
    scan_local: Duration,
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d[d.len() / 2]
}

fn one_scale(scale: u32, wal_mb: u64, scans: usize, sidecar_args: &[&str]) -> Result<Row> {
    let mut c = Cluster::builder()
        .guc("wal_keep_size", "64GB")
        .guc("max_wal_size", "8GB")
        .guc("checkpoint_timeout", "30min")
        .guc("shared_buffers", "256MB")
        .init()?;
    let store = c.root_dir().join("store");
    init_store(&c, &store)?;
    c.start_again()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, sidecar_args)?;
    eprintln!("bench: scale {scale}: pgbench -i ...");
    c.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
    let base = c.root_dir().join("start-backup");
    c.run_server_tool("pg_basebackup", &["-D", base.to_str().unwrap(), "-X", "none", "-c", "fast"])?;
    let run_start = workload::flush_lsn(&c)?;
    let mut target = None;
    loop {
        c.pgbench(&["-n", "-c", "4", "-j", "2", "-T", "3"])?;
        let written = workload::flush_lsn(&c)? - run_start;
        if target.is_none() && written >= wal_mb * (1 << 20) * 8 / 10 {
            let lsn = workload::flush_lsn(&c)?;
            target = Some((lsn, state(&mut c.connect("postgres")?)?));
        }
        if written >= wal_mb << 20 {
            break;
        }
    }
    let (target, at_target) = target.context("no target LSN")?;
    c.execute("CHECKPOINT")?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let db_bytes: u64 = c.query_one_string("SELECT sum(pg_database_size(oid)) FROM pg_database")?.parse()?;
    drop_caches();

    // The branch: request, boot, first answer.
    eprintln!("bench: scale {scale}: branch at {target} ...");
    let perf = profile_start("NEON_BENCH_PERF_FIRST", 9999)?;
    let t = Instant::now();
    let path = match sidecar.ask(&Request::BranchCreate { lsn: target, mount: None, wait_ms: 0 })? {
        Response::Branches(b) if b.len() == 1 => PathBuf::from(&b[0].path),
        r => anyhow::bail!("unexpected {r:?}"),
    };
    let created = t.elapsed();
    let mut on_branch = Cluster::builder().existing_data_dir(&path).init()?;
    on_branch.start_again()?;
    let booted = t.elapsed();
    on_branch.query_one_string(FIRST_ANSWER)?;
    let branch = t.elapsed();
    profile_stop(perf)?;
    eprintln!(
        "bench: scale {scale}: branch made in {:.3} s, its server ready at {:.3} s, first answer at {:.3} s",
        created.as_secs_f64(),
        booted.as_secs_f64(),
        branch.as_secs_f64()
    );
    let held = state(&mut on_branch.connect("postgres")?)?;
    anyhow::ensure!(held == at_target, "the branch holds {held}, the compute held {at_target} at {target}");
    on_branch.stop()?;

    // (a) our base backup, booted.
    eprintln!("bench: scale {scale}: (a) base backup at {target} ...");
    drop_caches();
    let t = Instant::now();
    let tar = match sidecar.ask(&Request::Basebackup { lsn: target, full: true, new_timeline: false, wait_ms: 0 })? {
        Response::Basebackup { path, .. } => path,
        r => anyhow::bail!("unexpected {r:?}"),
    };
    let mut local = boot_basebackup(Path::new(&tar))?;
    local.query_one_string(FIRST_ANSWER)?;
    let ours = t.elapsed();
    let held = state(&mut local.connect("postgres")?)?;
    anyhow::ensure!(held == at_target, "(a) holds {held}, the compute held {at_target} at {target}");

    // Cold scans, the branch's and the local copy's in turn (this machine is noisy): medians.
    let cache = || -> Result<(u64, u64)> {
        Ok((sidecar.status("cache_hits")?.parse()?, sidecar.status("cache_misses")?.parse()?))
    };
    let cache_before = cache()?;
    let (mut scans_branch, mut scans_local) = (Vec::new(), Vec::new());
    for n in 0..scans {
        eprintln!("bench: scale {scale}: cold scans, round {} of {scans} ...", n + 1);
        scans_branch.push(cold_scan(&mut on_branch, n == 0)?);
        on_branch.stop()?;
        scans_local.push(cold_scan(&mut local, false)?);
        local.stop()?;
    }
    let written = match sidecar.ask(&Request::BranchList)? {
        Response::Branches(b) => b[0].written_blocks,
        r => anyhow::bail!("unexpected {r:?}"),
    };
    let cache_after = cache()?;
    // (The sidecar's page cache is not emptied between rounds: its hits say what it saved.)
    eprintln!(
        "bench: scale {scale}: cold scans (s): branch {scans_branch:.2?}, local {scans_local:.2?}; {written} blocks \
         of the branch are its own (its server wrote them: hint bits), the others are read from history: {} hits \
         and {} misses of the sidecar's page cache",
        cache_after.0 - cache_before.0,
        cache_after.1 - cache_before.1
    );
    let (scan_branch, scan_local) = (median(scans_branch), median(scans_local));
    drop(on_branch);
    drop(local);
    let id = match sidecar.ask(&Request::BranchList)? {
        Response::Branches(b) => b[0].id,
        r => anyhow::bail!("unexpected {r:?}"),
    };
    sidecar.ask(&Request::BranchDrop { id })?;
    sidecar.stop()?;

    // (c) pg_basebackup of now, booted.
    eprintln!("bench: scale {scale}: (c) pg_basebackup now ...");
    drop_caches();
    let now_dir = c.root_dir().join("now");
    let t = Instant::now();
    c.run_server_tool("pg_basebackup", &["-D", now_dir.to_str().unwrap(), "-X", "stream", "-c", "fast"])?;
    chown_to_server_user(&now_dir)?;
    let mut copy = Cluster::builder().existing_data_dir(&now_dir).init()?;
    copy.start_again()?;
    copy.query_one_string(FIRST_ANSWER)?;
    let now = t.elapsed();
    copy.stop()?;
    drop(copy);

    // (b) restore + replay to L.
    eprintln!("bench: scale {scale}: (b) restore + replay to {target} ...");
    let archive = neon_tests::bench::archive_wal(&c)?;
    c.stop()?;
    drop_caches();
    let (replay, held) = restore_and_replay(&c, &base, &archive, target)?;
    anyhow::ensure!(held == at_target, "(b) holds {held}, the compute held {at_target} at {target}");
    Ok(Row {
        scale,
        db_mb: db_bytes as f64 / 1048576.0,
        wal_mb: (target - run_start) as f64 / 1048576.0,
        branch,
        ours,
        replay,
        now,
        scan_branch,
        scan_local,
    })
}

fn main() -> Result<()> {
    let f = neon_tests::bench::Flags::parse(
        "bench-branch [--scales 10,70] [--wal-mb MB of WAL after the start backup] [--scans N cold scans of each] \
         [--sidecar-args 'ARGS of run']",
        &[("scales", "10,70"), ("wal-mb", "200"), ("scans", "3"), ("sidecar-args", "")],
    )?;
    let scans: usize = f.get::<usize>("scans")?.max(1);
    let scales: Vec<u32> = f.get::<String>("scales")?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let wal_mb: u64 = f.get("wal-mb")?;
    let sidecar_args: String = f.get("sidecar-args")?;
    let sidecar_args: Vec<&str> = sidecar_args.split_whitespace().collect();
    let rows: Vec<Row> = scales.iter().map(|s| one_scale(*s, wal_mb, scans, &sidecar_args)).collect::<Result<_>>()?;
    let cold = if is_root() { "page cache dropped" } else { "page cache NOT dropped (not root): warm" };
    println!("A copy of the database as of a past LSN, queried: seconds from the request to the first answer of");
    println!("`{FIRST_ANSWER}` (one run per scale, same run for every column)");
    println!();
    println!(
        "{:>5} {:>8} {:>7} | {:>7} {:>12} {:>14} {:>12} | {:>8} {:>8} | {:>10} {:>10} {:>6}",
        "scale",
        "DB MB",
        "WAL MB",
        "branch",
        "(a) ours+boot",
        "(b) restore+replay",
        "(c) now+boot",
        "(b)/br",
        "(a)/br",
        "scan br s",
        "scan (a) s",
        "ratio"
    );
    for r in &rows {
        let s = |d: Duration| d.as_secs_f64();
        println!(
            "{:>5} {:>8.0} {:>7.0} | {:>7.2} {:>12.2} {:>14.2} {:>12.2} | {:>7.1}x {:>7.1}x | {:>10.2} {:>10.2} {:>6.2}",
            r.scale,
            r.db_mb,
            r.wal_mb,
            s(r.branch),
            s(r.ours),
            s(r.replay),
            s(r.now),
            s(r.replay) / s(r.branch),
            s(r.ours) / s(r.branch),
            s(r.scan_branch),
            s(r.scan_local),
            s(r.scan_branch) / s(r.scan_local)
        );
    }
    println!();
    println!("Every copy of L held the compute's state at L (pgbench_history rows, sum(abalance)); (c) is a copy of");
    println!("now, not of L: an anchor for copy speed only. Cold scan: `{SCAN}` after a restart, {cold};");
    println!("the median of {scans}, the branch's and the local copy's taken in turn.");
    println!("Goals: branch <= 1 s at every scale; (b)/branch >= 10x at scale 70; scan ratio <= 2.");
    Ok(())
}
