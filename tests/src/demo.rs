//! The product for a newcomer, end to end — what `make demo` prints, and what
//! `tests/tests/demo.rs` runs to check each claim it prints (every claim is an `ensure!`).
//!
//! A compute made by `neon-sidecar init` (the unprivileged `postgres` user when run as root),
//! the sidecar following it, pgbench; then a page as it was, read with pageinspect through
//! `neon_get_page`; a base backup at the earlier LSN from `neon_basebackup`, booted by stock
//! PostgreSQL 15 beside the running compute and shown to hold the data as of then; finally
//! everything stopped.

use crate::sidecar::{boot_basebackup, cluster_born_with_store, SidecarProcess};
use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What the demo showed, for the test to look at beyond the demo's own checks.
#[derive(Debug)]
pub struct Shown {
    pub then_lsn: String,
    pub balance_then: i64,
    pub balance_now: i64,
    pub history_then: i64,
    pub history_now: i64,
    pub backup_bytes: i64,
}

/// Runs the demo on a pgbench database of `scale`, writing the story to `out`.
pub fn run(out: &mut dyn Write, scale: u32, pgbench_secs: u32) -> Result<Shown> {
    writeln!(out, "== 1. A compute made by `neon-sidecar init`, and the sidecar following it")?;
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    writeln!(
        out,
        "   compute: {} (PostgreSQL {})",
        c.data_dir().display(),
        c.query_one_string("SHOW server_version")?
    )?;
    writeln!(out, "   sidecar: store {}, socket {}", store.display(), sidecar.socket().display())?;
    writeln!(out, "   shared_preload_libraries = {}", c.query_one_string("SHOW shared_preload_libraries")?)?;
    c.execute("CREATE EXTENSION neon; CREATE EXTENSION pageinspect")?;

    writeln!(out, "== 2. pgbench -i -s {scale}, and the moment we will travel back to")?;
    c.pgbench(&["-i", "-q", "-s", &scale.to_string()])?;
    let then = c.query_one_string("SELECT pg_current_wal_insert_lsn()::text")?;
    let balance_then: i64 = c.query_one_string("SELECT sum(abalance)::text FROM pgbench_accounts")?.parse()?;
    let teller_then: i64 = c.query_one_string("SELECT tbalance::text FROM pgbench_tellers WHERE tid = 1")?.parse()?;
    let block_of_teller_1 =
        || c.query_one_string("SELECT ((ctid::text::point)[0])::int::text FROM pgbench_tellers WHERE tid = 1");
    let block_then = block_of_teller_1()?;
    writeln!(out, "   LSN {then}: sum(abalance) = {balance_then}, teller 1's tbalance = {teller_then}")?;

    writeln!(out, "== 3. pgbench for {pgbench_secs} s: balances move, history grows")?;
    c.pgbench(&["-n", "-c", "2", "-T", &pgbench_secs.to_string()])?;
    let balance_now: i64 = c.query_one_string("SELECT sum(abalance)::text FROM pgbench_accounts")?.parse()?;
    let history_now: i64 = c.query_one_string("SELECT count(*)::text FROM pgbench_history")?.parse()?;
    let teller_now: i64 = c.query_one_string("SELECT tbalance::text FROM pgbench_tellers WHERE tid = 1")?.parse()?;
    let block_now = block_of_teller_1()?;
    writeln!(out, "   now: sum(abalance) = {balance_now}, {history_now} rows in pgbench_history, teller 1's tbalance = {teller_now}")?;
    ensure!(history_now > 0, "pgbench wrote no history");

    writeln!(out, "== 4. The page of pgbench_tellers holding teller 1, as it was at {then} and as it is now")?;
    let page_sql = |lsn: &str, block: &str| {
        format!(
            "SELECT lp, t_xmin, t_xmax, t_ctid, (tuple_data_split('pgbench_tellers'::regclass, t_data, t_infomask, \
             t_infomask2, t_bits))[3] AS tbalance FROM heap_page_items(neon_get_page('pgbench_tellers', 'main', {block}, \
             '{lsn}')) WHERE t_xmax = 0 AND (tuple_data_split('pgbench_tellers'::regclass, t_data, t_infomask, \
             t_infomask2, t_bits))[1] = '\\x01000000'"
        )
    };
    let now_lsn = c.query_one_string("SELECT pg_current_wal_insert_lsn()::text")?;
    writeln!(
        out,
        "   SELECT lp, t_xmin, t_xmax, t_ctid, tbalance FROM heap_page_items(neon_get_page('pgbench_tellers', 'main', <block>, <lsn>)) ..."
    )?;
    let mut balances = Vec::new();
    for (label, lsn, block) in [("then", &then, &block_then), ("now ", &now_lsn, &block_now)] {
        let rows = c.query_rows(&page_sql(lsn, block))?;
        ensure!(rows.len() == 1, "teller 1 has {} live versions on the page at {lsn}", rows.len());
        let r = &rows[0];
        let cell = |i: usize| r[i].clone().unwrap_or_default();
        let tbalance =
            i32::from_le_bytes(hex(&cell(4)).and_then(|b| b.try_into().ok()).context("tbalance is not an int4")?);
        writeln!(
            out,
            "   {label} {lsn:>12}: block {block} lp {} xmin {} xmax {} ctid {} tbalance {tbalance}",
            cell(0),
            cell(1),
            cell(2),
            cell(3)
        )?;
        balances.push(i64::from(tbalance));
    }
    ensure!(balances[0] == teller_then, "the page at {then} says {} but the table said {teller_then}", balances[0]);
    ensure!(balances[1] == teller_now, "the page now says {} but the table says {teller_now}", balances[1]);
    writeln!(out, "   Both agree with what SELECT showed at the time.")?;

    writeln!(out, "== 5. SELECT * FROM neon_basebackup('{then}')")?;
    let t = Instant::now();
    let row = c.query_rows(&format!(
        "SELECT path, lsn::text, bytes::text, round(seconds::numeric, 2)::text FROM neon_basebackup('{then}')"
    ))?;
    let cell = |i: usize| row[0][i].clone().unwrap_or_default();
    let (path, bytes): (String, i64) = (cell(0), cell(2).parse()?);
    writeln!(out, "   {path}: {:.1} MB at {} in {} s", bytes as f64 / 1048576.0, cell(1), cell(3))?;
    ensure!(cell(1) == then, "the backup is at {} not {then}", cell(1));
    let asked = t.elapsed();

    writeln!(out, "== 6. Stock PostgreSQL 15 boots it beside the running compute")?;
    let t = Instant::now();
    let copy = boot_basebackup(Path::new(&path))?;
    writeln!(
        out,
        "   unpacked and started in {:.1} s on {} (no WAL replayed: {})",
        t.elapsed().as_secs_f64(),
        copy.socket_dir().display(),
        !copy.log_contents().contains("redo starts")
    )?;
    ensure!(!copy.log_contents().contains("redo starts"), "the copy replayed WAL at startup");
    let balance_copy: i64 = copy.query_one_string("SELECT sum(abalance)::text FROM pgbench_accounts")?.parse()?;
    let history_copy: i64 = copy.query_one_string("SELECT count(*)::text FROM pgbench_history")?.parse()?;
    let teller_copy: i64 =
        copy.query_one_string("SELECT tbalance::text FROM pgbench_tellers WHERE tid = 1")?.parse()?;
    writeln!(out, "   the copy: sum(abalance) = {balance_copy}, {history_copy} rows in pgbench_history, teller 1's tbalance = {teller_copy}")?;
    ensure!(
        (balance_copy, history_copy, teller_copy) == (balance_then, 0, teller_then),
        "the copy does not hold the data as of {then}"
    );
    writeln!(out, "   = the database as of {then}, while the compute goes on with {history_now} transactions more.")?;
    let status = c.query_rows("SELECT name, value FROM neon_sidecar_status() WHERE name IN ('ingest_lag_bytes', 'layer_files', 'cache_hits', 'redo_requests', 'prefetch_worker_connected') ORDER BY name")?;
    let status: Vec<String> = status
        .iter()
        .map(|r| format!("{} {}", r[0].clone().unwrap_or_default(), r[1].clone().unwrap_or_default()))
        .collect();
    writeln!(out, "   neon_sidecar_status(): {}", status.join(", "))?;

    writeln!(
        out,
        "== Done ({:.1} s for the base backup request). Stopping the copy, the sidecar and the compute.",
        asked.as_secs_f64()
    )?;
    drop(copy);
    sidecar.stop()?;
    drop(c);
    Ok(Shown {
        then_lsn: then,
        balance_then,
        balance_now,
        history_then: history_copy,
        history_now,
        backup_bytes: bytes,
    })
}

fn hex(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("\\x")?;
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}
