//! Faults never take reads down, and lose nothing.
//!
//! * The store's disk fills up (a small tmpfs) while the compute writes: ingest pauses and
//!   says why in `status`, the slot keeps the WAL, reads of the history on disk go on; when
//!   space is freed ingest resumes by itself, and every page equals the compute's.
//! * A second sidecar on the same store is refused, naming the first one's PID; a directory
//!   never set up is refused, saying how to set it up.

use anyhow::Result;
use neon_tests::mount::Tmpfs;
use neon_tests::sidecar::{init_store, SidecarProcess};
use neon_tests::snapshot::{compare, Snapshot};
use neon_tests::{workload, Cluster};
use std::time::{Duration, Instant};

fn wait_for_state(s: &SidecarProcess, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = s.status("ingest_state")?;
        if ok(&state) {
            return Ok(state);
        }
        anyhow::ensure!(Instant::now() < deadline, "ingest never {what}: {state}\n{}", s.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_store_disk_pauses_ingest_reads_go_on_and_nothing_is_lost() -> Result<()> {
    let mut c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).init()?;
    let disk = Tmpfs::mount(&c.root_dir().join("disk"), 96)?;
    let store = disk.path().join("store");
    init_store(&c, &store)?;
    c.start_again()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let before = Snapshot::take(&c, "before")?;
    sidecar.wait_durable(before.lsn)?;

    let filler = disk.fill()?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "500"])?;
    let state = wait_for_state(&sidecar, "paused", |s| s.contains("No space left on device"))?;
    eprintln!("with the store's disk full: {state}");
    assert!(state.starts_with("retrying"), "{state}");
    assert_eq!(state.matches("os error 28").count(), 1, "the cause said once: {state}");
    // Reads go on, and the slot holds what is not durable.
    let n = compare(&sidecar, &before, 0)?;
    eprintln!("read with the disk full: {n:?}");
    let (durable, _) = sidecar.history()?;
    let restart: neon_types::Lsn =
        c.query_one_string("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'neon_sidecar'")?.parse()?;
    assert!(restart <= durable, "the slot let go of WAL at {restart}, the store is durable to {durable}");

    // Room again: ingest resumes by itself, and nothing was lost.
    std::fs::remove_file(filler)?;
    let now = Snapshot::take(&c, "now")?;
    sidecar.wait_durable(now.lsn)?;
    let state = wait_for_state(&sidecar, "resumed", |s| s.starts_with("following"))?;
    eprintln!("after freeing space: {state}");
    let n = compare(&sidecar, &now, 0)?;
    eprintln!("{n:?} equal the compute's at {}", now.lsn);
    sidecar.stop()?;
    drop(disk);
    Ok(())
}

#[test]
fn a_store_in_use_or_never_set_up_is_refused() -> Result<()> {
    let (c, store) = neon_tests::sidecar::cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    let run = |store: &std::path::Path| -> Result<String> {
        let out = std::process::Command::new(neon_tests::sidecar_bin()?)
            .args(["run", "--host"])
            .arg(c.socket_dir())
            .args(["--port", &c.port().to_string(), "--store"])
            .arg(store)
            .output()?;
        anyhow::ensure!(!out.status.success(), "a second run started");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let text = run(&store)?;
    assert!(text.contains("in use by another neon-sidecar (PID"), "{text}");
    let empty = c.root_dir().join("empty-store");
    std::fs::create_dir_all(&empty)?;
    let text = run(&empty)?;
    assert!(text.contains("was never set up") && text.contains("neon-sidecar init"), "{text}");
    // The first goes on.
    assert!(sidecar.history()?.0.is_valid());
    sidecar.stop()
}
