//! One cluster's lineage across failovers and restores. The store follows the cluster
//! (its system identifier), on whatever server and timeline it lives now:
//!
//! * a standby promoted while the primary was still writing: the sidecar, pointed at the new
//!   primary, follows timeline 2 from the history file's switch point — every page on it
//!   equals the promoted server's — while what the old primary wrote after the switch point
//!   stays readable on timeline 1 only;
//! * the compute restored from our own `--new-timeline` base backup at an LSN the store has
//!   long passed: followed as a new timeline forking there, the old history intact beside it;
//! * the compute restored in place from a same-timeline backup and written past the store's
//!   history while the sidecar was down: refused (its WAL does not continue the store's last
//!   record), nothing of it filed;
//! * another cluster (another `initdb`) is refused, and the history already held is still
//!   served.

use anyhow::{Context, Result};
use neon_tests::sidecar::{basebackup_from_store, boot_basebackup, cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{compare, compare_on, Snapshot};
use neon_tests::{workload, Cluster};
use neon_types::protocol::{ErrorCode, Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag};
use std::time::{Duration, Instant};

fn relnode(c: &Cluster, rel: &str) -> Result<RelFileNode> {
    let relnode: u32 = c.query_one_string(&format!("SELECT pg_relation_filenode('{rel}')"))?.parse()?;
    Ok(RelFileNode { spcnode: 1663, dbnode: 5, relnode })
}

fn size_on(s: &SidecarProcess, timeline: Option<u32>, node: RelFileNode, lsn: Lsn) -> Result<Option<u32>> {
    let req = Request::RelSize { rel: RelTag { node, fork: ForkNumber::Main }, lsn, wait_ms: 10_000 };
    let req = match timeline {
        Some(timeline) => Request::OnTimeline { timeline, request: Box::new(req) },
        None => req,
    };
    match s.ask(&req)? {
        Response::Size(n) => Ok(n),
        r => anyhow::bail!("unexpected {r:?}"),
    }
}

/// Waits until the sidecar follows timeline `id`.
fn wait_following(s: &SidecarProcess, id: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.timelines()?[0].timeline != id {
        anyhow::ensure!(Instant::now() < deadline, "the sidecar never followed timeline {id}: {}", s.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn a_standby_promoted_mid_pgbench_is_followed_on_a_new_timeline() -> Result<()> {
    let (primary, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&primary, &store)?;
    primary.pgbench(&["-i", "-q", "-s", "1"])?;
    let standby = primary.standby()?;
    let before = workload::flush_lsn(&primary)?;
    // Promoted while the primary goes on: the old primary's WAL runs past the switch point.
    std::thread::scope(|s| -> Result<()> {
        let load = s.spawn(|| primary.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"]));
        std::thread::sleep(Duration::from_millis(1500));
        standby.promote()?;
        load.join().expect("pgbench thread")?;
        Ok(())
    })?;
    let switch: Lsn = standby
        .query_one_string("SELECT pg_read_file('pg_wal/00000002.history')")?
        .split_whitespace()
        .nth(1)
        .context("no switch point in 00000002.history")?
        .parse()?;
    primary.execute("CREATE TABLE only_on_old AS SELECT g FROM generate_series(1, 1000) g")?;
    let old = Snapshot::take(&primary, "old")?;
    assert!(old.lsn > switch, "the old primary wrote nothing after the switch point {switch}");
    sidecar.wait_durable(old.lsn)?;
    sidecar.stop()?;

    // The same store, pointed at the promoted standby.
    let sidecar = SidecarProcess::start(&standby, &store)?;
    wait_following(&sidecar, 2)?;
    standby.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    standby.execute("CREATE TABLE only_on_new AS SELECT g FROM generate_series(1, 1000) g")?;
    let new = Snapshot::take(&standby, "new")?;
    sidecar.wait_durable(new.lsn)?;

    let timelines = sidecar.timelines()?;
    assert_eq!(timelines.len(), 2, "{timelines:?}");
    assert_eq!((timelines[0].timeline, timelines[0].parent), (2, Some((1, switch))), "{timelines:?}");
    // Timeline 2 is the promoted server's, page for page.
    let n = compare(&sidecar, &new, 0)?;
    eprintln!("timeline 2 at {}: {n:?} equal the promoted server's", new.lsn);
    // Timeline 1 keeps what the old primary wrote after the switch point, and only it does.
    let n = compare_on(&sidecar, &old, Some(1), 0)?;
    eprintln!("timeline 1 at {}: {n:?} equal the old primary's", old.lsn);
    let (only_old, only_new) = (relnode(&primary, "only_on_old")?, relnode(&standby, "only_on_new")?);
    assert!(size_on(&sidecar, Some(1), only_old, old.lsn)?.is_some());
    assert_eq!(size_on(&sidecar, None, only_old, new.lsn)?, None, "the old primary's table on timeline 2");
    assert!(size_on(&sidecar, None, only_new, new.lsn)?.is_some());
    // Before the switch point the two timelines are one history.
    let accounts = relnode(&standby, "pgbench_accounts")?;
    let tag = BufferTag { rel: RelTag { node: accounts, fork: ForkNumber::Main }, blkno: 1 };
    let page = |req| match sidecar.ask(&req) {
        Ok(Response::Page(p)) => Ok(p),
        r => anyhow::bail!("unexpected {r:?}"),
    };
    let on_1 = page(Request::OnTimeline {
        timeline: 1,
        request: Box::new(Request::GetPage { tag, lsn: before, wait_ms: 0 }),
    })?;
    assert_eq!(page(Request::GetPage { tag, lsn: before, wait_ms: 0 })?, on_1);
    // An unknown timeline is a clear error.
    let req = Request::OnTimeline { timeline: 7, request: Box::new(Request::GetPage { tag, lsn: before, wait_ms: 0 }) };
    match sidecar.client()?.request(&req)? {
        Response::Error { code: ErrorCode::NotFound, message } => {
            assert!(message.contains("no timeline 7"), "{message}")
        }
        r => panic!("timeline 7: {r:?}"),
    }
    // A base backup of timeline 2 boots on timeline 2 with its history file.
    sidecar.stop()?;
    let tar = standby.root_dir().join("base.tar");
    basebackup_from_store(&store, new.lsn, &tar, &[])?;
    let b = boot_basebackup(&tar)?;
    assert_eq!(b.query_one_string("SELECT timeline_id FROM pg_control_checkpoint()")?, "2");
    assert!(b.query_one_string("SELECT pg_read_file('pg_wal/00000002.history')")?.contains(&switch.to_string()));
    assert_eq!(b.query_one_string("SELECT count(*) FROM only_on_new")?, "1000");
    assert!(b.query_rows("SELECT 1 FROM pg_class WHERE relname = 'only_on_old'")?.is_empty());
    Ok(())
}

/// A followed cluster with pgbench tables, and the LSN after they were made, before a run.
fn followed_pgbench() -> Result<(Cluster, std::path::PathBuf, SidecarProcess, Lsn)> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let at = workload::flush_lsn(&c)?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    Ok((c, store, sidecar, at))
}

#[test]
fn a_compute_restored_to_an_old_lsn_is_followed_as_a_new_timeline() -> Result<()> {
    let (mut c, store, sidecar, at) = followed_pgbench()?;
    c.execute("CREATE TABLE after_the_restore_point AS SELECT 1 AS x")?;
    let gone = relnode(&c, "after_the_restore_point")?;
    let old = Snapshot::take(&c, "old")?;
    sidecar.wait_durable(old.lsn)?;
    sidecar.stop()?;
    c.stop()?;

    // The compute comes back from a base backup at `at`, on a new timeline, and goes on.
    let tar = c.root_dir().join("restore.tar");
    basebackup_from_store(&store, at, &tar, &["--new-timeline"])?;
    let restored = boot_basebackup(&tar)?;
    assert_eq!(restored.query_one_string("SELECT timeline_id FROM pg_control_checkpoint()")?, "2");
    let sidecar = SidecarProcess::start(&restored, &store)?;
    wait_following(&sidecar, 2)?;
    // A few bytes after the fork, then a reconnect: the stream resumes on the new timeline's
    // first page, whose bytes before the fork are zeroes (the generated segment), not records.
    let small: Lsn = restored.query_one_string("SELECT pg_logical_emit_message(false, 'neon', 'x')")?.parse()?;
    sidecar.wait_durable(small)?;
    let (durable, _) = sidecar.history()?;
    eprintln!("durable {durable} after the fork's page start {:X}", at.0 & !0x1FFF);
    sidecar.stop()?;
    let sidecar = SidecarProcess::start(&restored, &store)?;
    restored.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    let new = Snapshot::take(&restored, "new")?;
    sidecar.wait_durable(new.lsn)?;
    let timelines = sidecar.timelines()?;
    let fork = timelines[0].parent.context("timeline 2 has no parent")?.1;
    assert!(fork >= at && fork < old.lsn, "timeline 2 forks at {fork}, not at {at}");
    let n = compare(&sidecar, &new, 0)?;
    eprintln!("timeline 2 at {}: {n:?} equal the restored compute's", new.lsn);
    let n = compare_on(&sidecar, &old, Some(1), 0)?;
    eprintln!("timeline 1 at {}: {n:?} still equal the old compute's", old.lsn);
    assert!(size_on(&sidecar, Some(1), gone, old.lsn)?.is_some());
    assert_eq!(size_on(&sidecar, None, gone, new.lsn)?, None);
    sidecar.stop()
}

/// Waits until ingest stops for good; returns its state.
fn wait_stopped(sidecar: &SidecarProcess) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = sidecar.status("ingest_state")?;
        if state.starts_with("stopped") {
            return Ok(state);
        }
        anyhow::ensure!(Instant::now() < deadline, "ingest never stopped: {state}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_compute_restored_in_place_on_the_same_timeline_is_refused_not_filed() -> Result<()> {
    let (mut c, store, sidecar, at) = followed_pgbench()?;
    let old = Snapshot::take(&c, "old")?;
    sidecar.wait_durable(old.lsn)?;
    sidecar.stop()?;
    c.stop()?;

    // Restored from a same-timeline backup while the sidecar was down, and written past the
    // store's history: its WAL at the store's durable LSN is another history's.
    let tar = c.root_dir().join("restore.tar");
    basebackup_from_store(&store, at, &tar, &[])?;
    let restored = boot_basebackup(&tar)?;
    assert_eq!(restored.query_one_string("SELECT timeline_id FROM pg_control_checkpoint()")?, "1");
    while workload::flush_lsn(&restored)? <= old.lsn {
        restored.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"])?;
    }
    let sidecar = SidecarProcess::start(&restored, &store)?;
    let state = wait_stopped(&sidecar)?;
    eprintln!("ingest: {state}");
    assert!(state.contains("does not continue the store's history"), "{state}");
    // Nothing of it was filed, and the history held is still served.
    let (durable, last) = sidecar.history()?;
    assert!(durable >= old.lsn && last == durable, "durable {durable}, last {last} after refusing");
    let n = compare(&sidecar, &old, 0)?;
    eprintln!("after refusing the restored compute's WAL: {n:?} still served at {}", old.lsn);
    sidecar.stop()
}

#[test]
fn another_cluster_is_refused_and_the_history_held_is_still_served() -> Result<()> {
    let (mut c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let at = Snapshot::take(&c, "at")?;
    sidecar.wait_durable(at.lsn)?;
    sidecar.stop()?;
    c.stop()?;

    let other = Cluster::builder().start()?;
    let sidecar = SidecarProcess::start(&other, &store)?;
    let state = wait_stopped(&sidecar)?;
    assert!(state.contains("another initdb"), "{state}");
    // Nothing was made on the other cluster, and the history held is still read.
    assert!(other.query_rows("SELECT 1 FROM pg_replication_slots")?.is_empty());
    let (durable, _) = sidecar.history()?;
    assert!(durable >= at.lsn);
    let n = compare(&sidecar, &at, 0)?;
    eprintln!("after refusing another cluster: {n:?} still served at {}", at.lsn);
    sidecar.stop()
}
