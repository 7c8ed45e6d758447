//! Our decoder against PostgreSQL's own `pg_waldump`, record for record, over WAL written by a
//! real PostgreSQL 15 server running the mixed workload: same start LSN, resource manager,
//! lengths, xid, prev-link, record type and block references, and the same record count. The
//! `--stats` tables agree too.

use anyhow::Result;
use neon_tests::pg_waldump::{parse_records, parse_stats, WaldumpBlock, WaldumpRecord};
use neon_tests::workload::{self, MIXED_GUCS};
use neon_tests::Cluster;
use neon_types::{ForkNumber, Lsn};
use sidecar::wal::consts::*;
use sidecar::wal::record::DecodedRecord;
use sidecar::wal::rmgr::{record_type, RmgrId};
use sidecar::wal::segment::{SegmentSet, StopReason, WalFileReader};
use sidecar::wal::stats::{rmgr_name, WalStats};
use std::collections::BTreeSet;

/// Our decoder's record in `pg_waldump`'s terms.
fn summarize(rec: &DecodedRecord) -> WaldumpRecord {
    WaldumpRecord {
        lsn: rec.lsn,
        rmgr: rmgr_name(rec.header.rmid),
        rec_len: rec.total_len() - rec.fpi_len(),
        tot_len: rec.total_len(),
        xid: rec.xid(),
        prev: rec.prev(),
        record_type: record_type(rec.header.rmid, rec.header.info)
            .map(str::to_string)
            .unwrap_or_else(|| format!("UNKNOWN ({:x})", rec.info())),
        blocks: rec
            .blocks
            .iter()
            .map(|b| WaldumpBlock {
                block_id: b.block_id,
                rel: b.tag.rel.node.to_string(),
                fork: b.tag.rel.fork.name().to_string(),
                blkno: b.tag.blkno,
                has_image: b.has_image(),
            })
            .collect(),
    }
}

#[test]
fn decoder_agrees_with_pg_waldump_on_mixed_workload() -> Result<()> {
    let c = Cluster::builder().gucs(MIXED_GUCS).start()?;
    let start = workload::insert_lsn(&c)?;
    workload::mixed(&c, 2)?;
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;
    let wal_dir = c.wal_dir();

    let theirs_text =
        c.run_tool("pg_waldump", &["-p", wal_dir.to_str().unwrap(), "-s", &start.to_string(), "-e", &end.to_string()])?;
    let theirs = parse_records(&theirs_text);

    let set = SegmentSet::collect(&[&wal_dir], None)?;
    let mut reader = WalFileReader::new(set, Some(start), Some(end))?;
    let mut ours = Vec::new();
    let mut stats = WalStats::default();
    let mut rmgrs = BTreeSet::new();
    let (mut switches, mut cross_segment, mut compressed) = (0, 0, [0usize; 3]);
    let seg_size = reader.segments().seg_size;
    while let Some(rec) = reader.next_record()? {
        stats.add(&rec);
        rmgrs.insert(rec.rmgr().map(RmgrId::name).unwrap_or("custom"));
        switches += rec.is_switch() as usize;
        cross_segment += (rec.lsn.segment_number(seg_size) != Lsn(rec.end_lsn.0 - 1).segment_number(seg_size)) as usize;
        for img in rec.blocks.iter().filter_map(|b| b.image.as_ref()) {
            for (i, flag) in
                [BKPIMAGE_COMPRESS_LZ4, BKPIMAGE_COMPRESS_PGLZ, BKPIMAGE_COMPRESS_ZSTD].into_iter().enumerate()
            {
                compressed[i] += (img.bimg_info & flag != 0) as usize;
            }
        }
        ours.push(summarize(&rec));
    }
    assert_eq!(
        reader.stop_reason(),
        Some(&StopReason::ReachedEnd),
        "our reader stopped early at {}",
        reader.end_of_valid_wal()
    );

    let mismatches: Vec<String> = ours
        .iter()
        .zip(&theirs)
        .filter(|(a, b)| a != b)
        .take(10)
        .map(|(a, b)| format!("ours:   {a:?}\ntheirs: {b:?}"))
        .collect();
    assert!(mismatches.is_empty(), "{} first mismatches:\n{}", mismatches.len(), mismatches.join("\n"));
    assert_eq!(ours.len(), theirs.len(), "record counts differ (ours {}, pg_waldump {})", ours.len(), theirs.len());
    eprintln!("{} records agree between {start} and {end}", ours.len());

    // The workload really produced what the issue asks the comparison to cover.
    for needed in [
        "XLOG",
        "Transaction",
        "Storage",
        "Database",
        "Heap",
        "Heap2",
        "Btree",
        "Hash",
        "Gin",
        "Gist",
        "SPGist",
        "BRIN",
        "Sequence",
        "MultiXact",
    ] {
        assert!(rmgrs.contains(needed), "workload wrote no {needed} records: {rmgrs:?}");
    }
    assert!(switches >= 1, "no XLOG_SWITCH decoded");
    assert!(cross_segment >= 1, "no record crossed a segment boundary");
    assert!(compressed.iter().all(|&n| n > 0), "compressed images lz4/pglz/zstd: {compressed:?}");
    assert!(ours.iter().any(|s| s.blocks.iter().any(|b| b.fork != ForkNumber::Main.name())), "no non-main fork block");

    // And the --stats tables agree on every count and size.
    let their_stats = c.run_tool(
        "pg_waldump",
        &["--stats=record", "-p", wal_dir.to_str().unwrap(), "-s", &start.to_string(), "-e", &end.to_string()],
    )?;
    let (ours_rows, their_rows) = (parse_stats(&stats.render(true)), parse_stats(&their_stats));
    assert!(their_rows.len() > 20, "pg_waldump printed {} stats rows", their_rows.len());
    assert_eq!(ours_rows, their_rows, "--stats=record tables differ");
    Ok(())
}
