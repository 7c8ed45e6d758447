//! `bench/remote`: history in an object store (SeaweedFS's S3 gateway, started here), three
//! figures each beside its anchor from the same run:
//!
//! 1. **Uploads keep up.** A sidecar with `--remote` (uploads every second, the default)
//!    follows `pgbench -i -s --scale` and `--secs` seconds of pgbench. Sampled every 100 ms:
//!    the local durable LSN, the remote's durable LSN, layer bytes written and uploaded. The
//!    *lag* of a moment is how long after the local store was durable to its LSN the remote
//!    was too (p50, p99, max over the run, and over the pgbench part alone: `-i` is a bulk
//!    load). Upload rate beside the local layer-writing rate.
//! 2. **A cold page read.** Random blocks of `pgbench_accounts` at an LSN of the run, each a
//!    block the sidecar has not read: first with every layer file on local disk (the anchor),
//!    then by a sidecar started with `--local-cache-mb 0 --local-cache-keep-ms 0` — before
//!    each read every layer file is evicted, so the read takes from the store what it needs:
//!    the summaries of the files, then index blocks and values of those that hold the page,
//!    as byte ranges (p50, p99; ranges, bytes and whole files per read).
//! 3. **attach-remote.** pgbench goes on until the layer files hold `--history-mb`; the
//!    sidecar is stopped; `attach-remote` on a fresh directory, `run` on it, the first page
//!    answered — beside fetching every layer object the index names (what restoring a copy of
//!    the whole history would take) and the original sidecar started again to its first page.
//!
//! Goals (issue 16): the uploads keep up with ingest at scale 10, lag p99 ≤ 5 s.

use anyhow::{Context, Result};
use neon_tests::bench::Flags;
use neon_tests::seaweed::SeaweedFs;
use neon_tests::sidecar::{cluster_born_with_store, sidecar_cli_as_server_user, SidecarProcess};
use neon_tests::{chown_to_server_user, workload};
use neon_types::protocol::{Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag};
use sidecar::remote::Remote;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One look at the sidecar: when, local durable, remote durable, layer bytes, uploaded bytes.
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    local: Lsn,
    remote: Lsn,
    layer_bytes: u64,
    uploaded: u64,
    queued_files: u64,
    queued_bytes: u64,
}

fn sample(s: &SidecarProcess, t0: Instant) -> Result<Sample> {
    let Response::Status(text) = s.ask(&Request::Status)? else { anyhow::bail!("no status") };
    let get = |name: &str| -> Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_string))
            .with_context(|| format!("no {name} in the status"))
    };
    Ok(Sample {
        at: t0.elapsed(),
        local: s.history()?.0,
        remote: get("remote_durable_lsn")?.parse()?,
        layer_bytes: get("layer_bytes")?.parse()?,
        uploaded: get("remote_uploaded_bytes")?.parse()?,
        queued_files: get("remote_queue_files")?.parse()?,
        queued_bytes: get("remote_queue_bytes")?.parse()?,
    })
}

/// For each moment the local durable LSN moved at or after `from`: how long until the
/// remote's reached it, sorted.
fn lags(samples: &[Sample], from: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    for (j, s) in samples.iter().enumerate() {
        if (j > 0 && s.local == samples[j - 1].local) || s.at < from {
            continue;
        }
        if let Some(r) = samples[j..].iter().find(|r| r.remote >= s.local) {
            out.push(r.at - s.at);
        }
    }
    out.sort();
    out
}

/// The samples as tab-separated text, one a line, for a look at where the lag came from.
fn write_trace(path: &Path, t0: std::time::SystemTime, samples: &[Sample]) -> Result<()> {
    let t0 = t0.duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let mut out = format!("# ms after {t0} ms since the Unix epoch\n");
    out.push_str("ms\tlocal\tremote\tlayer_bytes\tuploaded\tqueued_files\tqueued_bytes\n");
    for s in samples {
        out += &format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            s.at.as_millis(),
            s.local,
            s.remote,
            s.layer_bytes,
            s.uploaded,
            s.queued_files,
            s.queued_bytes
        );
    }
    std::fs::write(path, out).with_context(|| format!("writing the trace {}", path.display()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One GetPage, timed; an error answer is an error.
fn timed_page(s: &SidecarProcess, node: RelFileNode, blkno: u32, lsn: Lsn) -> Result<Duration> {
    let tag = BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno };
    let t = Instant::now();
    match s.ask(&Request::GetPage { tag, lsn, wait_ms: 30_000 })? {
        Response::Page(_) => Ok(t.elapsed()),
        r => anyhow::bail!("GetPage of {tag} at {lsn}: {r:?}"),
    }
}

fn status_u64(s: &SidecarProcess, name: &str) -> Result<u64> {
    Ok(s.status(name)?.parse()?)
}

/// Distinct pseudo-random blocks below `blocks`, from `seed`.
fn blocks(n: usize, blocks: u32, seed: u64) -> Vec<u32> {
    let mut x = seed;
    let mut out: Vec<u32> = Vec::new();
    while out.len() < n.min(blocks as usize) {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let b = ((x >> 33) % blocks as u64) as u32;
        if !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

fn p50_p99(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    (ms(percentile(&v, 0.5)), ms(percentile(&v, 0.99)))
}

fn main() -> Result<()> {
    let f = Flags::parse(
        "bench-remote [--scale N] [--secs N] [--clients N] [--reads N] [--history-mb N] [--trace FILE]",
        &[("scale", "10"), ("secs", "30"), ("clients", "4"), ("reads", "30"), ("history-mb", "1024"), ("trace", "")],
    )?;
    let trace: String = f.get("trace")?;
    let (scale, secs, clients): (u32, u32, u32) = (f.get("scale")?, f.get("secs")?, f.get("clients")?);
    let (reads, history_mb): (usize, u64) = (f.get("reads")?, f.get("history-mb")?);
    let (c, store) = cluster_born_with_store()?;
    let mut weed = SeaweedFs::start(&c.root_dir().join("seaweedfs"))?;
    let url = weed.url("bench");
    let mut remote_flags = vec!["--remote".to_string(), url.clone()];
    remote_flags.extend(weed.flags());
    let env = weed.env();
    let args: Vec<&str> = remote_flags.iter().map(String::as_str).collect();
    let sidecar = SidecarProcess::start_for_compute_with_env(&c, &store, &args, &env)?;

    // 1. Uploads beside ingest.
    eprintln!("bench: pgbench -i -s {scale}, then {secs} s of pgbench with {clients} clients, sampled ...");
    let (t0, t0_wall) = (Instant::now(), std::time::SystemTime::now());
    let done = AtomicBool::new(false);
    let wal_start = workload::flush_lsn(&c)?;
    let loaded = std::sync::Mutex::new(Duration::ZERO);
    let (samples, wal_end) = std::thread::scope(|s| -> Result<_> {
        let sampler = s.spawn(|| -> Result<Vec<Sample>> {
            let mut v = Vec::new();
            while !done.load(Ordering::Relaxed) {
                v.push(sample(&sidecar, t0)?);
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(v)
        });
        let ran = (|| -> Result<Lsn> {
            c.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
            *loaded.lock().expect("unpoisoned") = t0.elapsed();
            let n = clients.to_string();
            c.pgbench(&["-n", "-c", &n, "-j", &n, "-T", &secs.to_string()])?;
            let end = workload::flush_lsn(&c)?;
            let deadline = Instant::now() + Duration::from_secs(300);
            while sample(&sidecar, t0)?.remote < end {
                anyhow::ensure!(Instant::now() < deadline, "the remote never caught up with {end}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(end)
        })();
        done.store(true, Ordering::Relaxed);
        let samples = sampler.join().expect("the sampler panicked")?;
        Ok((samples, ran?))
    })?;
    if !trace.is_empty() {
        write_trace(Path::new(&trace), t0_wall, &samples)?;
    }
    let lag = lags(&samples, Duration::ZERO);
    let lag_pgbench = lags(&samples, *loaded.lock().expect("unpoisoned"));
    let (first, last) = (samples[0], *samples.last().context("no samples")?);
    let span = (last.at - first.at).as_secs_f64();
    let wal_mb = (wal_end.0 - wal_start.0) as f64 / 1e6;
    let layer_rate = last.layer_bytes.saturating_sub(first.layer_bytes) as f64 / 1e6 / span;
    let upload_rate = last.uploaded.saturating_sub(first.uploaded) as f64 / 1e6 / span;
    let mid = samples[samples.len() / 2].local;

    // 2. Cold page reads beside local ones, at the run's middle.
    let node = workload::pgbench_accounts_file(&c)?;
    let nblocks: u32 = c.query_one_string("SELECT pg_relation_size('pgbench_accounts') / 8192")?.parse()?;
    let picks = blocks(reads * 2, nblocks, 7);
    eprintln!("bench: {reads} page reads with every layer file local, then {reads} cold from the store ...");
    let local: Vec<Duration> =
        picks[..reads].iter().map(|&b| timed_page(&sidecar, node, b, mid)).collect::<Result<_>>()?;
    sidecar.stop()?;
    let mut cold_args = args.clone();
    cold_args.extend(["--local-cache-mb", "0", "--local-cache-keep-ms", "0", "--remote-upload-ms", "50"]);
    let sidecar = SidecarProcess::restart_for_compute_with_env(&c, &store, &cold_args, &env)?;
    let (mut cold, mut fetched) = (Vec::new(), Vec::new());
    for &b in &picks[reads..] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while status_u64(&sidecar, "local_layer_files")? > 0 {
            anyhow::ensure!(Instant::now() < deadline, "layer files stay on local disk: {}", sidecar.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = remote_reads(&sidecar)?;
        cold.push(timed_page(&sidecar, node, b, mid)?);
        let after = remote_reads(&sidecar)?;
        fetched.push([after[0] - before[0], after[1] - before[1], after[2] - before[2]]);
    }
    let layer_files = status_u64(&sidecar, "layer_files")?;
    sidecar.stop()?;

    // 3. attach-remote of a history of --history-mb.
    let sidecar = SidecarProcess::restart_for_compute_with_env(&c, &store, &args, &env)?;
    eprintln!("bench: pgbench until the history holds {history_mb} MB of layer files ...");
    while status_u64(&sidecar, "layer_bytes")? < history_mb << 20 {
        let n = clients.to_string();
        c.pgbench(&["-n", "-c", &n, "-j", &n, "-T", "10"])?;
    }
    let end = workload::flush_lsn(&c)?;
    sidecar.wait_durable(end)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while sidecar.status("remote_durable_lsn")?.parse::<Lsn>()? < end {
        anyhow::ensure!(Instant::now() < deadline, "the remote never caught up with {end}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let history_bytes = status_u64(&sidecar, "layer_bytes")?;
    sidecar.stop()?;
    let store2 = c.root_dir().join("store2");
    std::fs::create_dir(&store2)?;
    chown_to_server_user(&store2)?;
    let t = Instant::now();
    let attach: Vec<&str> = ["attach-remote", "--store", store2.to_str().context("UTF-8")?]
        .into_iter()
        .chain(remote_flags.iter().map(String::as_str))
        .collect();
    sidecar_cli_as_server_user(&c, &attach, &env)?;
    let attached = t.elapsed();
    let attached_sidecar = SidecarProcess::restart_for_compute_with_env(&c, &store2, &args, &env)?;
    let started = t.elapsed();
    timed_page(&attached_sidecar, node, 0, end)?;
    let first_page = t.elapsed();
    let fetched_on_first =
        status_u64(&attached_sidecar, "remote_fetched_bytes")? + status_u64(&attached_sidecar, "remote_range_bytes")?;
    attached_sidecar.stop()?;
    // Anchors: the whole history fetched; the original store started to its first page.
    let remote = Remote::new(Arc::new(weed.storage_at("bench")?));
    let (_, index) = sidecar::remote::upload::newest_index(&remote)?.context("no index")?;
    let t = Instant::now();
    let mut copied = 0;
    for tl in &index.timelines {
        for (_, stub) in &tl.files {
            copied += remote.get_object(&stub.object)?.len() as u64;
        }
    }
    let copy_all = t.elapsed();
    let t = Instant::now();
    let original = SidecarProcess::restart_for_compute_with_env(&c, &store, &args, &env)?;
    timed_page(&original, node, 0, end)?;
    let local_first = t.elapsed();
    original.stop()?;
    weed.stop()?;
    drop_dir(&store2);

    println!("History in an object store (SeaweedFS S3 gateway on this machine), pgbench scale {scale}");
    println!();
    println!("{:<62} {:>10}", "1. uploads beside ingest", "");
    println!("{:<62} {:>10.1}", format!("  WAL written (pgbench -i, {secs} s of pgbench), MB"), wal_mb);
    println!("{:<62} {:>10.2}", "  local layer files written, MB/s", layer_rate);
    println!("{:<62} {:>10.2}", "  uploaded to the store, MB/s", upload_rate);
    println!("{:<62} {:>10.2}", "  ratio uploaded / written", upload_rate / layer_rate.max(1e-9));
    for (what, lag) in [("whole run", &lag), ("pgbench after -i", &lag_pgbench)] {
        println!(
            "{:<62} {:>10.0} {:>8.0} {:>8.0}",
            format!("  lag to remote durable, {what}, ms (p50 p99 max, n={})", lag.len()),
            ms(percentile(lag, 0.5)),
            ms(percentile(lag, 0.99)),
            ms(*lag.last().unwrap_or(&Duration::ZERO))
        );
    }
    println!("Goal: lag p99 <= 5000 ms, uploads keep up (ratio ~1).");
    println!();
    let (l50, l99) = p50_p99(local);
    let (c50, c99) = p50_p99(cold);
    let mean = |i: usize| fetched.iter().map(|f| f[i]).sum::<u64>() as f64 / fetched.len().max(1) as f64;
    let (mean_files, mean_ranges, mean_kb) = (mean(0), mean(1), mean(2) / 1024.0);
    println!("{:<62} {:>10} {:>8}", format!("2. page reads at {mid}, ms ({reads} each)"), "p50", "p99");
    println!("{:<62} {:>10.2} {:>8.2}", "  anchor: every layer file on local disk", l50, l99);
    println!("{:<62} {:>10.2} {:>8.2}", format!("  cold: every layer file evicted ({layer_files} files)"), c50, c99);
    println!(
        "{:<62}",
        format!("    a read: {mean_ranges:.1} ranges ({mean_kb:.0} KB) and {mean_files:.2} whole files from the store")
    );
    println!("{:<62} {:>10.1}", "  ratio cold / local (p50)", c50 / l50.max(1e-9));
    println!();
    println!("{:<62} {:>10}", format!("3. a history of {} MB in the store", history_bytes >> 20), "s");
    println!("{:<62} {:>10.2}", "  attach-remote on a fresh directory", attached.as_secs_f64());
    println!("{:<62} {:>10.2}", "  ... sidecar serving", started.as_secs_f64());
    println!(
        "{:<62} {:>10.2}",
        format!("  ... first page answered ({} MB fetched)", fetched_on_first >> 20),
        first_page.as_secs_f64()
    );
    println!(
        "{:<62} {:>10.2}",
        format!("  anchor: every layer object fetched ({} MB)", copied >> 20),
        copy_all.as_secs_f64()
    );
    println!("{:<62} {:>10.2}", "  anchor: the original store's sidecar to its first page", local_first.as_secs_f64());
    println!(
        "{:<62} {:>10.2}",
        "  ratio first page after attach / fetch everything",
        first_page.as_secs_f64() / copy_all.as_secs_f64()
    );
    Ok(())
}

/// Layer files fetched whole, byte ranges read (summaries too) and their bytes, so far.
fn remote_reads(s: &SidecarProcess) -> Result<[u64; 3]> {
    let whole = status_u64(s, "remote_fetched_files")?;
    Ok([whole, status_u64(s, "remote_range_reads")?, status_u64(s, "remote_range_bytes")?])
}

fn drop_dir(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}
