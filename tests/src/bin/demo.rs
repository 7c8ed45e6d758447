//! `make demo`: the product as it stands, end to end. Starts a real PostgreSQL 15 server (as the
//! unprivileged `postgres` user when run as root), loads the `neon` extension, runs pgbench and
//! a DDL mix, then decodes the server's WAL with our decoder and prints a per-resource-manager
//! summary beside `pg_waldump --stats` on the same WAL, with both tools' speed; finally it
//! rebuilds every page of `pgbench_accounts` from the WAL alone through wal-redo processes and
//! checks each against the server's own page.

use anyhow::{ensure, Context, Result};
use neon_tests::pages::{block_requests, compare_masked, fork_path, read_block, redo_config, relations};
use neon_tests::pg_waldump::parse_stats;
use neon_tests::workload::{self, MIXED_GUCS};
use neon_tests::Cluster;
use sidecar::wal::segment::{SegmentSet, StopReason, WalFileReader};
use sidecar::wal::stats::WalStats;
use sidecar::walredo::{PostgresRedoManager, WalRedoManager};
use std::time::Instant;

fn main() -> Result<()> {
    println!("== 1. A real PostgreSQL 15 server");
    let c = Cluster::builder().gucs(MIXED_GUCS).start()?;
    println!("   data directory {}, socket in {}", c.data_dir().display(), c.socket_dir().display());
    println!("   {}", c.query_one_string("SELECT version()")?);
    c.execute("CREATE EXTENSION neon")?;
    println!("   CREATE EXTENSION neon -> neon_version() = {}", c.query_one_string("SELECT neon_version()")?);

    println!(
        "== 2. pgbench and a DDL mix (every index type, TOAST, databases, prepared transactions, wal_compression)"
    );
    let start = workload::insert_lsn(&c)?;
    let t = Instant::now();
    workload::mixed(&c, 5)?;
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;
    println!(
        "   WAL {start} .. {end}: {:.1} MB written in {:.1} s",
        (end - start) as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    println!("== 3. Our decoder and pg_waldump --stats over the same WAL");
    let wal_dir = c.wal_dir();
    let t = Instant::now();
    let mut reader = WalFileReader::new(SegmentSet::collect(&[&wal_dir], None)?, Some(start), Some(end))?;
    let mut stats = WalStats::default();
    while let Some(rec) = reader.next_view()? {
        stats.add(&rec);
    }
    let ours_secs = t.elapsed().as_secs_f64();
    ensure!(reader.stop_reason() == Some(&StopReason::ReachedEnd), "decoder stopped early: {:?}", reader.stop_reason());

    let t = Instant::now();
    let theirs = c.run_tool(
        "pg_waldump",
        &["--stats", "-p", wal_dir.to_str().unwrap(), "-s", &start.to_string(), "-e", &end.to_string()],
    )?;
    let theirs_secs = t.elapsed().as_secs_f64();

    let ours_rows = parse_stats(&stats.render(false));
    let their_rows = parse_stats(&theirs);
    println!();
    println!(
        "   {:<18} {:>10} {:>10} {:>14} {:>14} {:>14} {:>14}  same?",
        "rmgr", "N ours", "N theirs", "rec bytes ours", "rec bytes th.", "FPI bytes ours", "FPI bytes th."
    );
    let mut all_same = ours_rows.len() == their_rows.len();
    for (o, t) in ours_rows.iter().zip(&their_rows) {
        if o.count == 0 && t.count == 0 {
            continue;
        }
        let same = o == t;
        all_same &= same;
        println!(
            "   {:<18} {:>10} {:>10} {:>14} {:>14} {:>14} {:>14}  {}",
            o.name,
            o.count,
            t.count,
            o.rec_len,
            t.rec_len,
            o.fpi_len,
            t.fpi_len,
            if same { "yes" } else { "NO" }
        );
    }
    let total = stats.total();
    println!("   {:<18} {:>10} {:>10}", "total records", total.count, their_rows.iter().map(|r| r.count).sum::<u64>());
    println!();
    println!(
        "   decoded in {ours_secs:.2} s (debug build; pg_waldump took {theirs_secs:.2} s) — for throughput, `make bench`"
    );
    ensure!(all_same, "the summaries differ");
    println!("   Every resource manager's count and sizes agree with pg_waldump.");

    println!("== 4. Rebuild every page of pgbench_accounts from the WAL alone, with wal-redo processes");
    let rels = relations(&c)?;
    let accounts: u32 = c.query_one_string("SELECT pg_relation_filenode('pgbench_accounts')")?.parse()?;
    let nothing = c.root_dir().join("no-base-images");
    let requests: Vec<_> = block_requests(&nothing, &rels, &wal_dir, start, end)?
        .into_iter()
        .filter(|r| r.target.rel.node.relnode == accounts)
        .collect();
    let records: usize = requests.iter().map(|r| r.records.len()).sum();
    let manager = PostgresRedoManager::new(redo_config(c.root_dir(), 2))?;
    let t = Instant::now();
    let pages = requests.iter().map(|r| manager.redo(r.clone())).collect::<Result<Vec<_>, _>>()?;
    let secs = t.elapsed().as_secs_f64();
    let rel = &rels[&accounts];
    let mut differ = 0;
    for (req, page) in requests.iter().zip(&pages) {
        let disk = read_block(&fork_path(c.data_dir(), &rel.path, req.target.rel.fork), req.target.blkno)
            .with_context(|| format!("{} is not on disk", req.target))?;
        differ += compare_masked(rel, &req.target, &page[..], &disk).is_some() as usize;
    }
    println!(
        "   {} pages ({} records) rebuilt in {:.2} s by 2 `postgres --single` redo processes: {} equal the server's own pages",
        pages.len(),
        records,
        secs,
        if differ == 0 { "all".to_string() } else { format!("{} of them do NOT", differ) }
    );
    println!("   (compared after masking hint bits and LSNs as PostgreSQL's heap_mask does)");
    ensure!(differ == 0 && !pages.is_empty(), "rebuilt pages differ");
    println!("== Done. Stopping the redo processes and the server.");
    Ok(())
}
