//! The page store end to end, as far as it goes so far: WAL streamed from a real compute
//! through the replication slot is filed into the repository (flushed to layer files, the slot
//! told only what is durable), the repository is reopened from its files, and every page of
//! the relations created during the stream equals the compute's own — at the end (against the
//! data files after CHECKPOINT) and in the past (against a copy of the files taken at an
//! earlier CHECKPOINT) — as do the relation sizes. A corrupted layer file is refused, by name.

use anyhow::{Context, Result};
use neon_tests::pages::{block, compare_store_at, redo_config};
use neon_tests::store::{copy_data_files, replication_config};
use neon_tests::{workload, Cluster};
use neon_types::{ForkNumber, Lsn, BLCKSZ};
use sidecar::replication::client::{ReplicationConn, StreamEvent};
use sidecar::repo::ingest::Ingest;
use sidecar::repo::reconstruct::get_page;
use sidecar::repo::timeline::Timeline;
use sidecar::wal::decoder::WalStreamDecoder;
use sidecar::walredo::PostgresRedoManager;
use std::time::{Duration, Instant};

#[test]
fn streamed_history_serves_pages_now_and_in_the_past() -> Result<()> {
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    let mut conn = ReplicationConn::connect(&replication_config(&c))?;
    let start = conn.create_slot("neon_sidecar")?;

    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-t", "100"])?;
    c.execute("CHECKPOINT")?;
    let past = workload::flush_lsn(&c)?;
    let snapshot = copy_data_files(&c, "past")?;
    c.pgbench(&["-n", "-c", "2", "-t", "300"])?;
    c.execute("UPDATE pgbench_accounts SET filler = 'x' WHERE aid % 97 = 0")?;
    c.execute("VACUUM pgbench_accounts")?;
    c.execute("CHECKPOINT")?;
    let now = workload::flush_lsn(&c)?;

    let dir = c.root_dir().join("store");
    // A layer boundary in the middle of history, at `past`.
    let repo = stream_into(&c, conn, start, now, &dir, Some(past))?;
    let durable = repo.durable_lsn();
    assert!(repo.layers().len() >= 2, "expected at least two layer files");
    drop(repo);

    // Everything comes back from the files.
    let repo = Timeline::open(&dir)?;
    assert_eq!(repo.durable_lsn(), durable);
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let n_now = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "pgbench_")?.expect_no_exceptions()?.pages;
    let n_past = compare_store_at(&c, &repo, &redo, &snapshot, past, "pgbench_")?.expect_no_exceptions()?.pages;
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
    let err = Timeline::open(&dir).err().context("opened a repository with a corrupt index")?;
    assert!(err.to_string().contains(&name), "{err}");
    // A flipped byte in a value (the first blob, whose payload starts at byte 8): the page
    // needing it is refused, naming the file.
    std::fs::write(&layer, &good)?;
    let (key, lsn) =
        sidecar::repo::layer::DeltaLayer::open(&layer)?.entries()?.into_iter().next().context("an empty layer")?;
    anyhow::ensure!(key.buffer_tag().is_some(), "the first value is not a block's: {key}");
    let mut bad = good;
    bad[9] ^= 0x40;
    std::fs::write(&layer, &bad)?;
    let repo = Timeline::open(&dir)?;
    let err =
        get_page(&repo, &redo, key.buffer_tag().expect("a block"), lsn).err().context("served a corrupted value")?;
    assert!(err.to_string().contains(&name) && err.to_string().contains("checksum mismatch"), "{err}");
    Ok(())
}

/// Streams everything from `start` up to `to` into a fresh store through slot `neon_sidecar`,
/// flushing once the first record at or past `flush_at` is filed and at the end, and telling
/// the compute each time (and whenever it asks) what is durable.
fn stream_into(
    c: &Cluster,
    mut conn: ReplicationConn,
    start: Lsn,
    to: Lsn,
    dir: &std::path::Path,
    flush_at: Option<Lsn>,
) -> Result<Timeline> {
    let timeline = conn.identify_system()?.timeline;
    let repo = Timeline::open(dir)?;
    repo.begin_history(start);
    let mut ingest = Ingest::new();
    let seg_size: u32 =
        c.query_one_string("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?.parse()?;
    let mut dec = WalStreamDecoder::new(start, seg_size)?;
    let mut stream = conn.start_replication(Some("neon_sidecar"), start, timeline)?;
    let mut flush_at = flush_at;
    let deadline = Instant::now() + Duration::from_secs(120);
    while repo.last_lsn() < to {
        anyhow::ensure!(Instant::now() < deadline, "ingested only to {}", repo.last_lsn());
        let mut reply = false;
        match stream.next_event(Duration::from_secs(10))?.context("stream ended")? {
            StreamEvent::XLogData { data, .. } => {
                dec.feed(data);
                while let Some(rec) = dec.poll()? {
                    ingest.ingest(&repo, &rec)?;
                    if flush_at.is_some_and(|at| rec.end_lsn >= at) {
                        repo.flush()?;
                        flush_at = None;
                        reply = true;
                    }
                }
            }
            StreamEvent::Keepalive { reply_requested, .. } => reply = reply_requested,
        }
        if reply {
            let d = repo.durable_lsn();
            stream.send_status(d, d, d, false)?;
        }
    }
    let durable = repo.flush()?;
    stream.send_status(durable, durable, durable, false)?;
    Ok(repo)
}

#[test]
fn dropped_truncated_and_recreated_relations_across_history() -> Result<()> {
    use neon_tests::pages::{compare_store_at, fork_path, read_block};
    use sidecar::repo::reconstruct::{rel_size, GetPageError};
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).gucs(&[("autovacuum", "off")]).start()?;
    let mut conn = ReplicationConn::connect(&replication_config(&c))?;
    let start = conn.create_slot("neon_sidecar")?;
    c.execute(
        "CREATE TABLE lc_keep (id int, v text); INSERT INTO lc_keep SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
         CREATE TABLE lc_doomed (id int); INSERT INTO lc_doomed SELECT generate_series(1, 5000);
         CREATE TABLE lc_emptied (id int); INSERT INTO lc_emptied SELECT generate_series(1, 5000);",
    )?;
    c.execute("CHECKPOINT")?;
    let then = workload::flush_lsn(&c)?;
    let snapshot = copy_data_files(&c, "then")?;
    let node = |name: &str| -> Result<(u32, String)> {
        Ok((
            c.query_one_string(&format!("SELECT pg_relation_filenode('{name}')"))?.parse()?,
            c.query_one_string(&format!("SELECT pg_relation_filepath('{name}')"))?,
        ))
    };
    let (doomed, doomed_path) = node("lc_doomed")?;
    let (emptied_old, _) = node("lc_emptied")?;
    let (keep, keep_path) = node("lc_keep")?;
    let keep_then = std::fs::metadata(c.data_dir().join(&keep_path))?.len() as u32 / BLCKSZ as u32;
    c.execute("DROP TABLE lc_doomed")?;
    c.execute("DELETE FROM lc_keep WHERE id > 500")?;
    c.execute("VACUUM lc_keep")?;
    c.execute("TRUNCATE lc_emptied")?;
    c.execute("INSERT INTO lc_emptied SELECT generate_series(1, 10)")?;
    c.execute("CHECKPOINT")?;
    let now = workload::flush_lsn(&c)?;

    let repo = stream_into(&c, conn, start, now, &c.root_dir().join("store"), None)?;
    let redo = PostgresRedoManager::new(redo_config(c.root_dir(), 1))?;
    let main = |relnode| block(relnode, ForkNumber::Main, 0).rel;
    // Dropped: there then, gone now.
    assert_eq!(
        rel_size(&repo, &main(doomed), then)?,
        Some(std::fs::metadata(snapshot.join(&doomed_path))?.len() as u32 / BLCKSZ as u32)
    );
    assert_eq!(rel_size(&repo, &main(doomed), now)?, None);
    let page = get_page(&repo, &redo, block(doomed, ForkNumber::Main, 0), then)?;
    let disk = read_block(&fork_path(&snapshot, &doomed_path, ForkNumber::Main), 0).context("doomed block 0 then")?;
    assert!(neon_tests::pagemask::first_difference(
        &{
            let mut p = page.to_vec();
            neon_tests::pagemask::mask_page(neon_tests::pagemask::PageKind::Heap, &mut p, 0);
            p
        },
        &{
            let mut d = disk;
            neon_tests::pagemask::mask_page(neon_tests::pagemask::PageKind::Heap, &mut d, 0);
            d
        }
    )
    .is_none());
    assert!(matches!(
        get_page(&repo, &redo, block(doomed, ForkNumber::Main, 0), now),
        Err(GetPageError::NoSuchPage { .. })
    ));
    // Truncated by VACUUM: smaller now, whole then; blocks past the end are gone now.
    let keep_now = std::fs::metadata(c.data_dir().join(&keep_path))?.len() as u32 / BLCKSZ as u32;
    assert!(keep_now < keep_then, "VACUUM did not truncate ({keep_now} of {keep_then} blocks)");
    assert_eq!(rel_size(&repo, &main(keep), then)?, Some(keep_then));
    assert_eq!(rel_size(&repo, &main(keep), now)?, Some(keep_now));
    assert!(matches!(
        get_page(&repo, &redo, block(keep, ForkNumber::Main, keep_now), now),
        Err(GetPageError::NoSuchPage { .. })
    ));
    get_page(&repo, &redo, block(keep, ForkNumber::Main, keep_now), then)?;
    // TRUNCATE: the old relfilenode is gone now, the new one did not exist then.
    assert!(rel_size(&repo, &main(emptied_old), then)?.is_some());
    assert_eq!(rel_size(&repo, &main(emptied_old), now)?, None);
    // And every page of what exists equals the compute's, now and then.
    let n_now = compare_store_at(&c, &repo, &redo, c.data_dir(), now, "lc_")?.expect_no_exceptions()?.pages;
    let n_then = compare_store_at(&c, &repo, &redo, &snapshot, then, "lc_")?.expect_no_exceptions()?.pages;
    eprintln!("life cycle: {n_now} pages equal now, {n_then} then");
    Ok(())
}
