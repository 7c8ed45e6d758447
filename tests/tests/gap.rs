//! A gap is a gap, not an end. The sidecar is stopped while the compute writes on; the
//! compute's `max_slot_wal_keep_size` invalidates the sidecar's slot and removes the WAL it
//! kept. Started again, the sidecar says exactly that, creates no slot behind the operator's
//! back, and goes on serving the history it has. `neon-sidecar attach` into the same store then
//! continues history after a recorded gap: reads before the gap work as before, reads inside it
//! are refused naming it, and reads after it come from the new base backup.

use anyhow::Result;
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{compare, Snapshot};
use neon_tests::workload;
use neon_types::protocol::{ErrorCode, Request, Response};
use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};
use std::time::{Duration, Instant};

#[test]
fn an_invalidated_slot_then_attach_continues_after_a_gap() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let before = Snapshot::take(&c, "before")?;
    sidecar.wait_durable(before.lsn)?;
    sidecar.stop()?;

    // The compute goes on without the sidecar, and lets its slot go.
    for (name, value) in
        [("wal_keep_size", "0"), ("max_slot_wal_keep_size", "1MB"), ("max_wal_size", "32MB"), ("min_wal_size", "32MB")]
    {
        c.set_guc(name, value)?;
    }
    c.reload()?;
    c.execute("CREATE TABLE made_in_the_gap AS SELECT g, md5(g::text) AS v FROM generate_series(1, 1000) g")?;
    let in_gap = workload::flush_lsn(&c)?;
    let in_gap_rel: u32 = c.query_one_string("SELECT pg_relation_filenode('made_in_the_gap')")?.parse()?;
    let slot_state = "SELECT coalesce(wal_status, 'none') FROM pg_replication_slots WHERE slot_name = 'neon_sidecar'";
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.query_one_string(slot_state)? != "lost" {
        anyhow::ensure!(Instant::now() < deadline, "the slot was never invalidated");
        c.execute("INSERT INTO made_in_the_gap SELECT g, repeat(md5(g::text), 20) FROM generate_series(1, 20000) g")?;
        c.execute("SELECT pg_switch_wal(); CHECKPOINT")?;
    }

    // Started again: it says what happened, creates nothing, serves what it has.
    let sidecar = SidecarProcess::start(&c, &store)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let state = sidecar.status("ingest_state")?;
        if state.starts_with("stopped") {
            break state;
        }
        anyhow::ensure!(Instant::now() < deadline, "ingest never stopped: {state}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(state.contains("invalidated") && state.contains("attach"), "{state}");
    assert_eq!(c.query_one_string("SELECT count(*) FROM pg_replication_slots")?, "1");
    assert_eq!(c.query_one_string(slot_state)?, "lost", "the slot was touched");
    let n = compare(&sidecar, &before, 0)?;
    eprintln!("with ingest stopped: {n:?} still served at {}", before.lsn);
    sidecar.stop()?;

    // The operator gives the slot room again, and attaches into the same store: history goes
    // on after a recorded gap.
    c.set_guc("max_slot_wal_keep_size", "-1")?;
    c.reload()?;
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["attach", "--host"])
        .arg(c.socket_dir())
        .args(["--port", &c.port().to_string(), "--store"])
        .arg(&store)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("attach: {text}");
    assert!(out.status.success() && text.contains("gap"), "{text}");
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    let after = Snapshot::take(&c, "after")?;
    sidecar.wait_durable(after.lsn)?;
    let n = compare(&sidecar, &after, 0)?;
    eprintln!("after the gap: {n:?} equal the compute's at {}", after.lsn);
    let n = compare(&sidecar, &before, 0)?;
    eprintln!("before the gap: {n:?} still equal at {}", before.lsn);
    let gaps = &sidecar.timelines()?[0].gaps;
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (from, to) = gaps[0];
    assert!(from >= before.lsn && from < in_gap && to > in_gap && to <= after.lsn, "gap {from}..{to}");
    // Inside the gap: refused, naming it.
    let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: in_gap_rel };
    let tag = BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno: 0 };
    match sidecar.client()?.request(&Request::GetPage { tag, lsn: in_gap, wait_ms: 0 })? {
        Response::Error { code: ErrorCode::OutOfHistory, message } => {
            assert!(message.contains("was lost") && message.contains(&to.to_string()), "{message}")
        }
        r => panic!("a read in the gap: {r:?}"),
    }
    sidecar.stop()
}
