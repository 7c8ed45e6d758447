//! Crash safety of `neon-sidecar run`: the sidecar follows a real compute through pgbench while
//! it is killed with SIGKILL at random moments and restarted. At every kill the slot has kept
//! all WAL past the store's durable LSN; after the last restart the store has caught up, and
//! every page of the pgbench relations equals the compute's, now and at an earlier checkpoint.

use anyhow::{Context, Result};
use neon_tests::pages::{compare_store_at, redo_config};
use neon_tests::store::{copy_data_files, wait_durable};
use neon_tests::{sidecar_bin, workload, Cluster};
use neon_types::Lsn;
use sidecar::walredo::PostgresRedoManager;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn spawn_sidecar(c: &Cluster, store: &std::path::Path) -> Result<Child> {
    Ok(Command::new(sidecar_bin()?)
        .args([
            "run",
            "--host",
            &c.socket_dir().display().to_string(),
            "--port",
            &c.port().to_string(),
            "--flush-ms",
            "100",
        ])
        .arg("--store")
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

fn slot_restart(c: &Cluster) -> Result<Option<Lsn>> {
    let rows = c.query_rows("SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = 'neon_sidecar'")?;
    Ok(rows.first().and_then(|r| r[0].clone()).map(|t| t.parse()).transpose()?)
}

#[test]
fn kill_9_at_random_moments_loses_nothing() -> Result<()> {
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    let store = c.root_dir().join("store");
    drop(neon_tests::store::new_store(&c, &store)?);
    let child = Mutex::new(spawn_sidecar(&c, &store)?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_restart(&c)?.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "the sidecar never created its slot");
        std::thread::sleep(Duration::from_millis(50));
    }

    let done = AtomicBool::new(false);
    let kills = AtomicUsize::new(0);
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 | 1;
    eprintln!("kill schedule seed {seed}");
    let (past, now, snapshot) = std::thread::scope(|s| -> Result<_> {
        let killer = s.spawn(|| -> Result<()> {
            while !done.load(Ordering::Relaxed) || kills.load(Ordering::Relaxed) < 3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                std::thread::sleep(Duration::from_millis(200 + seed % 700));
                let mut ch = child.lock().expect("child lock");
                ch.kill()?;
                ch.wait()?;
                // What the store says is durable, the slot still has.
                let durable = neon_tests::store::current_timeline(&store)?.durable_lsn();
                let restart = slot_restart(&c)?.context("slot gone")?;
                anyhow::ensure!(
                    restart <= durable || !durable.is_valid(),
                    "slot restart {restart} passed the durable {durable}"
                );
                kills.fetch_add(1, Ordering::Relaxed);
                *ch = spawn_sidecar(&c, &store)?;
            }
            Ok(())
        });
        c.pgbench(&["-i", "-q", "-s", "1"])?;
        c.pgbench(&["-n", "-t", "200"])?;
        c.execute("CHECKPOINT")?;
        let past = workload::flush_lsn(&c)?;
        let snapshot = copy_data_files(&c, "past")?;
        c.pgbench(&["-n", "-c", "2", "-t", "400"])?;
        c.execute("CHECKPOINT")?;
        let now = workload::flush_lsn(&c)?;
        done.store(true, Ordering::Relaxed);
        killer.join().expect("killer thread")?;
        Ok((past, now, snapshot))
    })?;
    eprintln!("{} kills", kills.load(Ordering::Relaxed));

    // The last sidecar catches up.
    let caught_up = wait_durable(&store, now);
    let mut ch = child.into_inner().expect("child lock");
    let killed = ch.kill();
    ch.wait()?;
    killed?;
    caught_up?;

    let repo = neon_tests::store::current_timeline(&store)?;
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n_now = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "pgbench_")?.expect_no_exceptions()?.pages;
    let n_past = compare_store_at(&c, &repo, &redo, &snapshot, past, "pgbench_")?.expect_no_exceptions()?.pages;
    eprintln!("after the kills: {n_now} pages equal the compute's at {now}, {n_past} at {past}");
    assert!(n_now > 1000 && n_past > 1000);

    // The store's commands: status, and a page at an LSN equal to the library's.
    let cli = |args: &[&str]| -> Result<String> {
        let out = Command::new(sidecar_bin()?).args(args).output()?;
        anyhow::ensure!(out.status.success(), "neon-sidecar {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    let store_arg = store.display().to_string();
    let status = cli(&["status", "--store", &store_arg])?;
    assert!(status.contains(&repo.durable_lsn().to_string()) && status.contains("layer files"), "{status}");
    let accounts: u32 = c.query_one_string("SELECT pg_relation_filenode('pgbench_accounts')")?.parse()?;
    let page_file = c.root_dir().join("page.bin");
    let (rel, lsn) = (format!("1663/5/{accounts}"), past.to_string());
    cli(&[
        "get-page",
        "--store",
        &store_arg,
        "--rel",
        &rel,
        "--blkno",
        "3",
        "--lsn",
        &lsn,
        "--out",
        page_file.to_str().unwrap(),
    ])?;
    let ours = sidecar::repo::reconstruct::get_page(
        &repo,
        &redo,
        neon_tests::pages::block(accounts, neon_types::ForkNumber::Main, 3),
        past,
    )?;
    assert!(std::fs::read(&page_file)? == ours.to_vec(), "get-page wrote a different page");
    let beyond = Command::new(sidecar_bin()?)
        .args(["get-page", "--store", &store_arg, "--rel", &rel, "--blkno", "3", "--lsn", "FF/0"])
        .output()?;
    assert!(!beyond.status.success() && String::from_utf8_lossy(&beyond.stderr).contains("beyond"));
    Ok(())
}
