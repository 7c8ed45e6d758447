//! The page store end to end, as far as it goes so far: WAL streamed from a real compute
//! through the replication slot is filed into the repository (flushed to layer files, the slot
//! told only what is durable), the repository is reopened from its files, and every page of
//! the relations created during the stream equals the compute's own — at the end (against the
//! data files after CHECKPOINT) and in the past (against a copy of the files taken at an
//! earlier CHECKPOINT) — as do the relation sizes. A corrupted layer file is refused, by name.

use anyhow::{Context, Result};
use neon_tests::pages::{block, compare_store_at, redo_config};
use neon_tests::{workload, Cluster};
use neon_types::{ForkNumber, Lsn};
use sidecar::ingest::replication::{ReplicationConfig, ReplicationConn, StreamEvent};
use sidecar::repo::ingest::Ingest;
use sidecar::repo::reconstruct::get_page;
use sidecar::repo::store::Repository;
use sidecar::wal::decoder::WalStreamDecoder;
use sidecar::walredo::PostgresRedoManager;
use std::path::Path;
use std::time::{Duration, Instant};

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().context("no parent")?)?;
    let ok = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status()?.success();
    anyhow::ensure!(ok, "cp -a {} {}", from.display(), to.display());
    Ok(())
}

#[test]
fn streamed_history_serves_pages_now_and_in_the_past() -> Result<()> {
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    let cfg = ReplicationConfig {
        host: c.socket_dir().display().to_string(),
        port: c.port(),
        user: "postgres".into(),
        password: None,
        application_name: "neon-sidecar".into(),
    };
    let mut conn = ReplicationConn::connect(&cfg)?;
    let sys = conn.identify_system()?;
    let start = conn.create_slot("neon_sidecar")?;

    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-t", "100"])?;
    c.execute("CHECKPOINT")?;
    let past = workload::flush_lsn(&c)?;
    let snapshot = c.root_dir().join("past");
    copy_dir(&c.data_dir().join("base"), &snapshot.join("base"))?;
    c.pgbench(&["-n", "-c", "2", "-t", "300"])?;
    c.execute("UPDATE pgbench_accounts SET filler = 'x' WHERE aid % 97 = 0")?;
    c.execute("VACUUM pgbench_accounts")?;
    c.execute("CHECKPOINT")?;
    let now = workload::flush_lsn(&c)?;

    let dir = c.root_dir().join("store");
    let mut repo = Repository::open(&dir)?;
    repo.begin_history(start);
    let mut ingest = Ingest::new();
    let seg_size: u32 =
        c.query_one_string("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?.parse()?;
    let mut dec = WalStreamDecoder::new(start, seg_size)?;
    let mut stream = conn.start_replication(Some("neon_sidecar"), start, sys.timeline)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut flushed_past = false;
    while repo.last_lsn() < now {
        anyhow::ensure!(Instant::now() < deadline, "ingested only to {}", repo.last_lsn());
        match stream.next_event(Duration::from_secs(10))?.context("stream ended")? {
            StreamEvent::XLogData { data, .. } => {
                dec.feed(data);
                while let Some(rec) = dec.poll()? {
                    ingest.ingest(&mut repo, &rec)?;
                    if !flushed_past && rec.end_lsn >= past {
                        // A layer boundary in the middle of history.
                        let durable = repo.flush()?;
                        stream.send_status(durable, durable, durable, false)?;
                        flushed_past = true;
                    }
                }
            }
            StreamEvent::Keepalive { reply_requested: true, .. } => {
                let d = repo.durable_lsn();
                stream.send_status(d, d, d, false)?;
            }
            StreamEvent::Keepalive { .. } => {}
        }
    }
    let durable = repo.flush()?;
    stream.send_status(durable, durable, durable, false)?;
    assert!(repo.layers().len() >= 2, "expected at least two layer files");
    drop(repo);

    // Everything comes back from the files.
    let repo = Repository::open(&dir)?;
    assert_eq!(repo.durable_lsn(), durable);
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n_now = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "pgbench_")?;
    let n_past = compare_store_at(&c, &repo, &redo, &snapshot, past, "pgbench_")?;
    eprintln!(
        "{n_now} pages equal the compute's at {now}, {n_past} equal its files at {past}; {} layer files",
        repo.layers().len()
    );
    assert!(n_now > 1000 && n_past > 1000);

    // A page from before its relation existed is refused, naming the page.
    let accounts: u32 = c.query_one_string("SELECT pg_relation_filenode('pgbench_accounts')")?.parse()?;
    let first = block(accounts, ForkNumber::Main, 0);
    let err = get_page(&repo, &redo, first, start).expect_err("a page before its relation");
    assert!(err.to_string().contains("does not exist"), "{err}");
    // LSNs outside the history are refused, naming the bounds.
    for outside in [Lsn(start.0 - 8), Lsn(durable.0 + 8)] {
        let err = get_page(&repo, &redo, first, outside).expect_err("an LSN outside history");
        let text = err.to_string();
        assert!(text.contains(&start.to_string()) && text.contains(&durable.to_string()), "{text}");
    }

    // A corrupted layer file is detected and named, never served.
    let layer = repo.layers()[0].path().to_path_buf();
    let name = layer.file_name().unwrap().to_string_lossy().to_string();
    drop(repo);
    let good = std::fs::read(&layer)?;
    // A flipped byte in its index: the repository refuses to open, naming the file.
    let mut bad = good.clone();
    let at = bad.len() - 60;
    bad[at] ^= 0x40;
    std::fs::write(&layer, &bad)?;
    let err = Repository::open(&dir).err().context("opened a repository with a corrupt index")?;
    assert!(err.to_string().contains(&name), "{err}");
    // A flipped byte in a value (the first blob, whose payload starts at byte 8): the page
    // needing it is refused, naming the file.
    std::fs::write(&layer, &good)?;
    let (key, lsn) = sidecar::repo::layer::DeltaLayer::open(&layer)?.entries().next().context("an empty layer")?;
    anyhow::ensure!(key.buffer_tag().is_some(), "the first value is not a block's: {key}");
    let mut bad = good;
    bad[9] ^= 0x40;
    std::fs::write(&layer, &bad)?;
    let repo = Repository::open(&dir)?;
    let err =
        get_page(&repo, &redo, key.buffer_tag().expect("a block"), lsn).err().context("served a corrupted value")?;
    assert!(err.to_string().contains(&name) && err.to_string().contains("checksum mismatch"), "{err}");
    Ok(())
}
