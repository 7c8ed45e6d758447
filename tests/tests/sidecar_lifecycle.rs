//! The running sidecar over time: crashes, long chains and retention.
//!
//! * `kill -9` at random moments while pgbench writes, again and again: each restart resumes
//!   from the manifest, the slot's `restart_lsn` never passes what the store had made durable,
//!   and afterwards every page of every database equals the compute's.
//! * With a chain limit and a retention window: hot pages get image layers so no read replays
//!   more than about the limit; old layer files are merged so reads walk few; once a full image lies behind the horizon, older layer files
//!   are removed, reads before the new history start are refused naming the bounds, and every
//!   page still equals the compute's.

use anyhow::{Context, Result};
use neon_tests::sidecar::{basebackup_from_store, boot_basebackup, cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{compare, Snapshot};
use neon_tests::{workload, Cluster};
use neon_types::protocol::{ErrorCode, Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag};
use sidecar::repo::key::Key;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn slot_restart_lsn(c: &Cluster) -> Result<Lsn> {
    Ok(c.query_one_string("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'neon_sidecar'")?.parse()?)
}

/// A small deterministic generator, seeded from the clock (and printed, to replay a failure).
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let load = s.spawn(|| {
            let r = c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "14"]);
            done.store(true, Ordering::Relaxed);
            r
        });
        let mut kills = 0;
        let mut sidecar = SidecarProcess::start(&c, &store)?;
        // At least three kills, however slowly the machine restarts the sidecar.
        while !done.load(Ordering::Relaxed) || kills < 3 {
            std::thread::sleep(Duration::from_millis(300 + rng.below(2200)));
            sidecar.kill9()?;
            kills += 1;
            let durable = neon_tests::store::current_timeline(&store)?.durable_lsn();
            let restart = slot_restart_lsn(&c)?;
            eprintln!("kill {kills}: store durable to {durable}, slot restart_lsn {restart}");
            anyhow::ensure!(restart <= durable, "the slot let go of WAL up to {restart}; the store has {durable}");
            sidecar = SidecarProcess::start(&c, &store)?;
        }
        load.join().expect("pgbench thread")?;
        let now = Snapshot::live(&c)?;
        sidecar.wait_durable(now.lsn)?;
        let n = compare(&sidecar, &now, 0)?;
        eprintln!("after {kills} kills: {n:?} equal the compute's at {}", now.lsn);
        assert!(n.pages > 2000);
        sidecar.stop()?;
        neon_tests::store::current_timeline(&store)?.check_layer_order().map_err(anyhow::Error::msg)
    })
}

#[test]
fn long_chains_get_images_and_old_history_is_collected() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let limit = 16;
    let sidecar =
        SidecarProcess::start_with(&c, &store, &["--chain-limit", &limit.to_string(), "--retention-mb", "24"])?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    // Kept across collection: a table in a tablespace, and a database moved into it (its
    // relation map read through the copy's source until a full image has its own).
    c.execute(&format!("CREATE TABLESPACE ts_kept LOCATION '{}'", c.tablespace_dir("ts_kept")?))?;
    c.execute("CREATE TABLE in_ts TABLESPACE ts_kept AS SELECT g FROM generate_series(1, 1000) g")?;
    c.execute("CREATE DATABASE moved")?;
    c.connect("moved")?.batch_execute("CREATE TABLE m AS SELECT g FROM generate_series(1, 500) g")?;
    c.execute("ALTER DATABASE moved SET TABLESPACE ts_kept")?;
    c.execute("CHECKPOINT")?;
    let early = workload::flush_lsn(&c)?;
    let branches: u32 = c.query_one_string("SELECT pg_relation_filenode('pgbench_branches')")?.parse()?;
    // Enough WAL for a full image and a horizon past it.
    let deadline = Instant::now() + Duration::from_secs(240);
    // pgbench for the hot pages; bulk WAL (a table filled and emptied) so two full images
    // and a horizon past the first come soon even on a busy machine.
    c.execute("CREATE TABLE filler (id int, pad text)")?;
    loop {
        c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "1000"])?;
        c.execute("INSERT INTO filler SELECT g, repeat('x', 400) FROM generate_series(1, 20000) g")?;
        c.execute("TRUNCATE filler")?;
        let (durable, _) = sidecar.history()?;
        let oldest = sidecar.timelines()?[0].oldest;
        if oldest > early {
            eprintln!("history now starts at {oldest} (durable {durable})");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "history never moved past {early}: {}", sidecar.log_text());
    }
    // Quiet now: two more flushes (of writes elsewhere) let compaction image what the last
    // of the load left past the limit.
    for round in 0..2 {
        c.execute(&format!("CREATE TABLE quiet_{round} AS SELECT 1 AS x"))?;
        sidecar.wait_durable(workload::flush_lsn(&c)?)?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let now = Snapshot::live(&c)?;
    sidecar.wait_durable(now.lsn)?;
    // The database "moved" is a WAL_LOG copy of template1 (its move copies its files).
    let n = compare(&sidecar, &now, 1)?;
    eprintln!("with images and collected history: {n:?} equal the compute's at {}", now.lsn);

    let tag = BufferTag {
        rel: RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: branches }, fork: ForkNumber::Main },
        blkno: 0,
    };
    let mut client = sidecar.client()?;
    match client.request(&Request::GetPage { tag, lsn: early, wait_ms: 0 })? {
        Response::Error { code: ErrorCode::OutOfHistory, message } => {
            assert!(message.contains(&early.to_string()) && message.contains("outside the history"), "{message}")
        }
        r => panic!("a page before the retained history: {r:?}"),
    }
    sidecar.stop()?;

    // The hottest page's chain stays near the limit: images, not thousands of records.
    let repo = neon_tests::store::current_timeline(&store)?;
    repo.check_layer_order().map_err(anyhow::Error::msg)?;
    let chain = repo.values_for(Key::rel_block(&tag), repo.durable_lsn())?;
    let names: Vec<String> =
        repo.layers().iter().map(|l| l.path().file_name().unwrap().to_string_lossy().into_owned()).collect();
    let count = |p: &str| names.iter().filter(|n| n.starts_with(p)).count();
    eprintln!(
        "chain of {tag}: {} values; layer files: {} delta, {} image, {} full image",
        chain.len(),
        count("delta-"),
        count("image-"),
        count("fullimage-")
    );
    // An image and fewer than `limit` records after it: every chain that reached the limit
    // was imaged at a flush, and no record came after the last one.
    assert!(chain.len() <= limit as usize + 1, "chain of {} values", chain.len());
    assert!(count("fullimage-") >= 1, "{names:?}");
    // Merging keeps the number of files a read walks bounded (32 and the last few flushes').
    assert!(names.len() <= 40, "{} layer files", names.len());
    assert!(repo.layers().iter().all(|l| l.lsn_range().1 >= repo.history_start()));
    drop(repo);
    // A base backup after collection has the tablespace and the moved database.
    let tar = c.root_dir().join("after-gc.tar");
    basebackup_from_store(&store, now.lsn, &tar, &[])?;
    let b = boot_basebackup(&tar)?;
    assert_eq!(b.query_one_string("SELECT count(*) FROM in_ts")?, "1000");
    assert_eq!(b.connect("moved")?.query_one("SELECT count(*) FROM m", &[])?.get::<_, i64>(0), 500);
    Ok(())
}

#[test]
fn wal_files_import_into_the_same_history_as_streaming() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    // Nobody streams yet: the slot keeps the WAL in pg_wal.
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    c.execute("CREATE DATABASE imported_db")?;
    let now = Snapshot::live(&c)?;
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["import-wal", "--store", store.to_str().unwrap()])
        .arg(c.wal_dir())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("import-wal: {text}");
    anyhow::ensure!(out.status.success() && text.contains("imported"), "import-wal failed: {text}");
    let durable = neon_tests::store::current_timeline(&store)?.durable_lsn();
    anyhow::ensure!(durable >= now.lsn, "import-wal reached {durable}, not {}", now.lsn);
    // A second import must continue the history, not restart it.
    let again = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["import-wal", "--store", store.to_str().unwrap(), "--start", "0/1000000"])
        .arg(c.wal_dir())
        .output()?;
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("can only continue"));

    // The running sidecar carries on from there, and serves what the files held.
    // imported_db is a WAL_LOG copy of template1, at both LSNs.
    let sidecar = SidecarProcess::start(&c, &store)?;
    let n = compare(&sidecar, &now, 1)?;
    eprintln!("after import-wal: {n:?} equal the compute's at {}", now.lsn);
    assert!(n.databases >= 4 && n.pages > 2000);
    c.execute("CREATE TABLE after_import AS SELECT 1 AS x")?;
    let later = Snapshot::live(&c)?;
    sidecar.wait_durable(later.lsn)?;
    compare(&sidecar, &later, 1)?;
    sidecar.stop()
}

#[test]
fn attach_takes_a_running_server_with_history_of_its_own() -> Result<()> {
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    c.pgbench(&["-i", "-q", "-s", "2"])?;
    c.execute("CREATE DATABASE before_attach")?;
    c.connect("before_attach")?.batch_execute("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g")?;
    let before = workload::flush_lsn(&c)?;
    let store = c.root_dir().join("store");
    // The backup is taken while pgbench writes: its files are fuzzy until its end LSN.
    let out = std::thread::scope(|s| -> Result<std::process::Output> {
        let load = s.spawn(|| c.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "4"]));
        std::thread::sleep(Duration::from_millis(500));
        let out = std::process::Command::new(neon_tests::sidecar_bin()?)
            .args(["attach", "--host"])
            .arg(c.socket_dir())
            .args(["--port", &c.port().to_string(), "--user", neon_tests::SUPERUSER, "--store"])
            .arg(&store)
            .output()?;
        load.join().expect("pgbench thread")?;
        Ok(out)
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("attach: {text}");
    anyhow::ensure!(out.status.success() && text.contains("history from"), "attach failed: {text}");

    let sidecar = SidecarProcess::start(&c, &store)?;
    let now = Snapshot::live(&c)?;
    sidecar.wait_durable(now.lsn)?;
    let n = compare(&sidecar, &now, 0)?;
    eprintln!("after attach: {n:?} equal the compute's at {}", now.lsn);
    assert!(n.databases >= 4 && n.pages > 3000);
    let accounts: u32 = c.query_one_string("SELECT pg_relation_filenode('pgbench_accounts')")?.parse()?;
    let tag = BufferTag {
        rel: RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: accounts }, fork: ForkNumber::Main },
        blkno: 0,
    };
    // History begins at the backup's end: before it, and while it was copied (its files are
    // fuzzy then), pages are refused.
    let span = text.split("base backup ").nth(1).context("no backup span in attach's output")?;
    let mut lsns = span.split_whitespace();
    let start: Lsn = lsns.next().context("backup start")?.parse()?;
    let end: Lsn = lsns.nth(1).context("backup end")?.parse()?;
    anyhow::ensure!(start < end, "the backup ran from {start} to {end}");
    for lsn in [before, start, Lsn((start.0 + end.0) / 2)] {
        match sidecar.client()?.request(&Request::GetPage { tag, lsn, wait_ms: 0 })? {
            Response::Error { code: ErrorCode::OutOfHistory, .. } => {}
            r => panic!("a page at {lsn}, before the backup's end {end}: {r:?}"),
        }
    }
    match sidecar.client()?.request(&Request::GetPage { tag, lsn: end, wait_ms: 0 })? {
        Response::Page(_) => {}
        r => panic!("a page at the backup's end {end}: {r:?}"),
    }
    sidecar.stop()
}
