//! Rust-native records against a real PostgreSQL 15: the CLOG, multixact offsets and members
//! pages we rebuild from the WAL alone (zero pages plus every derived native record, in WAL
//! order) must equal the pg_xact and pg_multixact files the server wrote; and the
//! visibility-map page of a frozen table, rebuilt from its on-disk copy at a checkpoint plus
//! the "clear VM bits" records derived from the heap records after it, must equal the VM page
//! on disk at the next checkpoint.
//!
//! The workload covers commits, aborts, subtransactions (SAVEPOINT / ROLLBACK TO / RELEASE,
//! more than 64 so that XACT_ASSIGNMENT records appear), a committed and an aborted prepared
//! transaction, and three sessions sharing row locks on the same rows, which creates enough
//! multixacts to fill more than one offsets page and several members pages.

use anyhow::{bail, ensure, Context, Result};
use neon_tests::workload;
use neon_tests::Cluster;
use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag, BLCKSZ};
use sidecar::wal::consts::*;
use sidecar::wal::segment::{SegmentSet, StopReason, WalFileReader};
use sidecar::walredo::derive::native_records;
use sidecar::walredo::native::{
    apply, clog_status, vm_flags, NativeRecord, NativeTarget, XactStatus, CLOG_XACTS_PER_PAGE,
    MULTIXACT_MEMBERS_PER_PAGE, MULTIXACT_OFFSETS_PER_PAGE, SLRU_PAGES_PER_SEGMENT, VISIBILITYMAP_ALL_FROZEN,
    VISIBILITYMAP_VALID_BITS,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const GUCS: &[(&str, &str)] = &[
    ("max_prepared_transactions", "10"),
    // Keep every segment since initdb: the CLOG comparison replays from the very first one.
    ("wal_keep_size", "4GB"),
    ("max_wal_size", "4GB"),
    ("checkpoint_timeout", "1h"),
    // No VACUUM behind our back: it would set VM bits (VISIBLE records need wal-redo).
    ("autovacuum", "off"),
];

/// Rows locked by three sessions: each row gets a 2-member multixact, then a 3-member one.
const LOCKED_ROWS: u32 = 1200;

/// Commits, aborts, subtransactions and prepared transactions.
fn transactions(c: &Cluster) -> Result<()> {
    c.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")?;
    c.execute(&format!("INSERT INTO t SELECT g, 0 FROM generate_series(1, {LOCKED_ROWS}) g"))?;
    for i in 0..40 {
        let end = if i % 3 == 0 { "ROLLBACK" } else { "COMMIT" };
        c.execute(&format!("BEGIN; INSERT INTO t VALUES ({}, {i}); {end};", 100_000 + i))?;
    }
    // 100 subtransactions with writes (each gets an xid; past 64 XACT_ASSIGNMENT is logged):
    // some released, some rolled back; once committed, once aborted at the top.
    for (base, end) in [(200_000, "COMMIT"), (300_000, "ROLLBACK")] {
        let mut sql = String::from("BEGIN; INSERT INTO t VALUES (") + &base.to_string() + ", 0);";
        for i in 1..=100 {
            sql += &format!(" SAVEPOINT s{i}; INSERT INTO t VALUES ({}, {i});", base + i);
            if i % 4 == 0 {
                sql += &format!(" ROLLBACK TO s{i};");
            } else if i % 2 == 0 {
                sql += &format!(" RELEASE s{i};");
            }
        }
        sql += &format!(" {end};");
        c.execute(&sql)?;
    }
    // Prepared transactions with a subtransaction each: one committed, one rolled back.
    for (gid, finish, id) in [("p_commit", "COMMIT PREPARED", 400_000), ("p_abort", "ROLLBACK PREPARED", 400_010)] {
        c.execute(&format!(
            "BEGIN; INSERT INTO t VALUES ({id}, 1); SAVEPOINT a; INSERT INTO t VALUES ({}, 2); RELEASE a;
             PREPARE TRANSACTION '{gid}';",
            id + 1
        ))?;
        c.execute(&format!("{finish} '{gid}'"))?;
    }
    Ok(())
}

/// Three sessions lock the same rows: the first FOR SHARE in one go, the second FOR KEY
/// SHARE and the third FOR SHARE one row per subtransaction. A backend reuses a multixact for
/// the same set of members within a transaction, so the lockers must differ row by row for
/// every row to get its own multixacts: a 2-member one, then a 3-member one.
fn multixacts(c: &Cluster) -> Result<()> {
    let mut sessions = [c.connect("postgres")?, c.connect("postgres")?, c.connect("postgres")?];
    sessions[0].batch_execute(&format!("BEGIN; SELECT id FROM t WHERE id <= {LOCKED_ROWS} FOR SHARE"))?;
    for (s, mode) in sessions[1..].iter_mut().zip(["KEY SHARE", "SHARE"]) {
        let mut sql = String::from("BEGIN;");
        for id in 1..=LOCKED_ROWS {
            sql += &format!(" SAVEPOINT s; SELECT id FROM t WHERE id = {id} FOR {mode}; RELEASE s;");
        }
        s.batch_execute(&sql)?;
    }
    for s in &mut sessions {
        s.batch_execute("COMMIT")?;
    }
    Ok(())
}

/// Reads page `pageno` of an SLRU from the data directory; `None` past the file's end.
fn slru_page(data_dir: &Path, target: &NativeTarget) -> Result<Option<[u8; BLCKSZ]>> {
    let (rel, offset) = target.slru_file_location().context("not an SLRU target")?;
    let path = data_dir.join(rel);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.get(offset as usize..offset as usize + BLCKSZ).map(|b| b.try_into().expect("a page")))
}

/// Every page of segment 0 of an SLRU that the file holds.
fn slru_pages(data_dir: &Path, make: fn(u32) -> NativeTarget) -> Result<Vec<(NativeTarget, [u8; BLCKSZ])>> {
    let mut v = Vec::new();
    for pageno in 0..SLRU_PAGES_PER_SEGMENT {
        match slru_page(data_dir, &make(pageno))? {
            Some(p) => v.push((make(pageno), p)),
            None => break,
        }
    }
    Ok(v)
}

/// What the WAL told us: every native record per target, in WAL order, with the end LSN of
/// the WAL record it came from.
#[derive(Default)]
struct Derived {
    per_target: BTreeMap<NativeTarget, Vec<(u64, NativeRecord)>>,
    /// Transactions whose final status a WAL record set.
    xids: BTreeMap<u32, XactStatus>,
    assignments: usize,
    commit_prepared: usize,
    abort_prepared: usize,
    commits_with_subxacts: usize,
    vm_clear_kinds: BTreeSet<&'static str>,
}

fn derive_all(c: &Cluster, end: neon_types::Lsn) -> Result<Derived> {
    let set = SegmentSet::collect(&[c.wal_dir()], None)?;
    let first = set.first_lsn();
    ensure!(first.0 == set.seg_size as u64, "the first WAL segment since initdb is gone (first LSN {first})");
    let mut reader = WalFileReader::new(set, None, Some(end))?;
    let mut d = Derived::default();
    while let Some(rec) = reader.next_view()? {
        let out = native_records(&rec).with_context(|| format!("deriving from the record at {}", rec.lsn))?;
        let op = rec.header.info & XLOG_XACT_OPMASK;
        match rec.header.rmid {
            RM_XACT_ID if op == XLOG_XACT_ASSIGNMENT => d.assignments += 1,
            RM_XACT_ID if op == XLOG_XACT_COMMIT_PREPARED => d.commit_prepared += 1,
            RM_XACT_ID if op == XLOG_XACT_ABORT_PREPARED => d.abort_prepared += 1,
            RM_XACT_ID if op == XLOG_XACT_COMMIT => {
                let n: usize = out
                    .iter()
                    .map(|(_, r)| matches!(r, NativeRecord::ClogSetStatus { xids, .. } if xids.len() > 1) as usize)
                    .sum();
                d.commits_with_subxacts += (n > 0) as usize;
            }
            _ => {}
        }
        for (target, r) in out {
            match &r {
                NativeRecord::ClogSetStatus { xids, status } => {
                    for &x in xids.iter() {
                        d.xids.insert(x, *status);
                    }
                }
                NativeRecord::ClearVisibilityMapFlags { .. } => {
                    d.vm_clear_kinds
                        .insert(sidecar::wal::rmgr::record_type(rec.header.rmid, rec.header.info).unwrap_or("?"));
                }
                _ => {}
            }
            d.per_target.entry(target).or_default().push((rec.end_lsn.0, r));
        }
    }
    ensure!(
        reader.stop_reason() == Some(&StopReason::ReachedEnd),
        "WAL reading stopped early: {:?}",
        reader.stop_reason()
    );
    Ok(d)
}

/// Rebuilds `target` from `base` by applying its records with end LSN in `(after, ..]`.
fn rebuild(d: &Derived, target: &NativeTarget, base: [u8; BLCKSZ], after: u64) -> Result<[u8; BLCKSZ]> {
    let mut page = base;
    for (lsn, r) in d.per_target.get(target).into_iter().flatten().filter(|(lsn, _)| *lsn > after) {
        apply(target, r, &mut page).with_context(|| format!("applying {r:?} from {lsn:X} to {target}"))?;
    }
    Ok(page)
}

fn first_differences(ours: &[u8; BLCKSZ], theirs: &[u8; BLCKSZ]) -> String {
    let diffs: Vec<usize> = (0..BLCKSZ).filter(|&i| ours[i] != theirs[i]).collect();
    let shown: Vec<String> =
        diffs.iter().take(8).map(|&i| format!("byte {i}: ours {:#04x} theirs {:#04x}", ours[i], theirs[i])).collect();
    format!("{} bytes differ; {}", diffs.len(), shown.join(", "))
}

/// A heap table whose VM page 0 we rebuild.
struct VmTable {
    name: &'static str,
    target: NativeTarget,
    path: std::path::PathBuf,
    base: [u8; BLCKSZ],
}

fn read_vm_page(path: &Path) -> Result<[u8; BLCKSZ]> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.get(..BLCKSZ).context("empty VM fork")?.try_into()?)
}

/// Creates the tables, freezes them (every page all-visible and all-frozen) and checkpoints,
/// so the VM pages on disk are the bases.
fn frozen_tables(c: &Cluster, tables: &[(&'static str, u32)]) -> Result<Vec<VmTable>> {
    for (name, rows) in tables {
        c.execute(&format!(
            "CREATE TABLE {name} (id int, pad text) WITH (autovacuum_enabled = off);
             INSERT INTO {name} SELECT g, repeat('x', 100) FROM generate_series(1, {rows}) g;"
        ))?;
        c.execute(&format!("VACUUM (FREEZE) {name}"))?;
    }
    c.execute("CHECKPOINT")?;
    let db: u32 = c.query_one_string("SELECT oid FROM pg_database WHERE datname = 'postgres'")?.parse()?;
    let mut v = Vec::new();
    for (name, _) in tables {
        let filenode: u32 = c.query_one_string(&format!("SELECT pg_relation_filenode('{name}')"))?.parse()?;
        let rel_path = c.query_one_string(&format!("SELECT pg_relation_filepath('{name}')"))?;
        let path = c.data_dir().join(format!("{rel_path}_vm"));
        let base = read_vm_page(&path)?;
        let pages: u32 = c.query_one_string(&format!("SELECT pg_relation_size('{name}') / 8192"))?.parse()?;
        ensure!((0..pages).all(|b| vm_flags(&base, b) == VISIBILITYMAP_VALID_BITS), "{name}: VACUUM FREEZE left pages");
        let node = RelFileNode { spcnode: 1663, dbnode: db, relnode: filenode };
        let tag = BufferTag { rel: RelTag { node, fork: ForkNumber::VisibilityMap }, blkno: 0 };
        v.push(VmTable { name, target: NativeTarget::VisibilityMap(tag), path, base });
    }
    Ok(v)
}

/// Changes that clear VM bits: UPDATE (old and new page), DELETE, row locks (ALL_FROZEN only),
/// INSERT, COPY (multi-insert). Each insert kind gets a table of its own, so its page is still
/// all-visible when it comes.
fn clear_vm_bits(c: &Cluster) -> Result<()> {
    c.execute("UPDATE vmt SET pad = pad || 'y' WHERE ctid = '(1,1)'")?;
    c.execute("DELETE FROM vmt WHERE ctid = '(3,2)'")?;
    c.execute("BEGIN; SELECT id FROM vmt WHERE ctid = '(5,1)' FOR SHARE; COMMIT;")?;
    c.execute("BEGIN; SELECT id FROM vmt WHERE ctid = '(6,1)' FOR KEY SHARE; COMMIT;")?;
    c.execute("UPDATE vmt SET id = -id WHERE ctid = '(8,3)'")?;
    c.execute("INSERT INTO vmt_insert VALUES (-1, 'single')")?;
    let mut client = c.connect("postgres")?;
    let mut w = client.copy_in("COPY vmt_copy FROM STDIN")?;
    for i in 0..20 {
        std::io::Write::write_all(&mut w, format!("{}\tcopied\n", 900_000 + i).as_bytes())?;
    }
    w.finish()?;
    Ok(())
}

#[test]
fn native_records_rebuild_clog_multixact_and_vm_pages() -> Result<()> {
    let c = Cluster::builder().gucs(GUCS).start()?;
    let vm_tables = frozen_tables(&c, &[("vmt", 3000), ("vmt_insert", 10), ("vmt_copy", 10)])?;
    let vm_base_lsn = workload::insert_lsn(&c)?;
    clear_vm_bits(&c)?;
    transactions(&c)?;
    multixacts(&c)?;
    // The last xid: its commit is in the WAL we read and in the CLOG the checkpoint writes.
    let last_xid: u32 = c.query_one_string("SELECT txid_current()")?.parse()?;
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;

    let d = derive_all(&c, end)?;
    ensure!(d.assignments >= 1, "no XACT_ASSIGNMENT record");
    ensure!(d.commit_prepared >= 1 && d.abort_prepared >= 1, "prepared: {} / {}", d.commit_prepared, d.abort_prepared);
    ensure!(d.commits_with_subxacts >= 1, "no commit with subtransactions");
    ensure!(d.xids.values().any(|s| *s == XactStatus::Aborted), "no abort");

    // --- CLOG. initdb's own transactions (xids from 3 on, in its single-user post-bootstrap
    // steps) are in the first segment too, so every transaction that ever ended is in the WAL
    // we decode and every page must be equal as a whole. Check that premise first, so that a
    // failure says which one broke.
    let data = c.data_dir();
    let clog = slru_pages(data, |pageno| NativeTarget::Clog { pageno })?;
    ensure!(!clog.is_empty(), "pg_xact/0000 is empty");
    let mut missing = Vec::new();
    for (target, page) in &clog {
        let first = target.slru_pageno().unwrap_or(0) * CLOG_XACTS_PER_PAGE;
        for xid in first.max(3)..=last_xid.min(first + CLOG_XACTS_PER_PAGE - 1) {
            let st = clog_status(page, xid);
            if st != XactStatus::InProgress && d.xids.get(&xid) != Some(&st) {
                missing.push((xid, st, d.xids.get(&xid).copied()));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "{} xids have a status on disk the WAL does not give (xid, disk, ours): {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    for (target, theirs) in &clog {
        let ours = rebuild(&d, target, [0; BLCKSZ], 0)?;
        if &ours != theirs {
            bail!("{target} differs: {}", first_differences(&ours, theirs));
        }
    }
    eprintln!(
        "CLOG: {} page(s) equal; {} xids got a status from the WAL (last xid {last_xid})",
        clog.len(),
        d.xids.len()
    );

    // --- multixacts: offsets and members, every page of segment 0.
    let offsets = slru_pages(data, |pageno| NativeTarget::MultiXactOffsets { pageno })?;
    let members = slru_pages(data, |pageno| NativeTarget::MultiXactMembers { pageno })?;
    ensure!(offsets.len() as u32 > 2 * LOCKED_ROWS / MULTIXACT_OFFSETS_PER_PAGE, "offsets pages: {}", offsets.len());
    ensure!(members.len() as u32 > 5 * LOCKED_ROWS / MULTIXACT_MEMBERS_PER_PAGE, "members pages: {}", members.len());
    for (target, theirs) in offsets.iter().chain(&members) {
        let ours = rebuild(&d, target, [0; BLCKSZ], 0)?;
        if &ours != theirs {
            bail!("{target} differs: {}", first_differences(&ours, theirs));
        }
        ensure!(d.per_target.contains_key(target) || theirs.iter().all(|&b| b == 0), "{target}: data but no records");
    }
    eprintln!("multixact: {} offsets and {} members pages equal", offsets.len(), members.len());

    // --- VM: each table's page at the checkpoint plus the clears after it equals the page now.
    for t in &vm_tables {
        let now = read_vm_page(&t.path)?;
        let ours = rebuild(&d, &t.target, t.base, vm_base_lsn.0)?;
        if ours != now {
            bail!("{} ({}) differs: {}", t.target, t.name, first_differences(&ours, &now));
        }
    }
    // The workload really cleared what it should have: both bits of updated/deleted/inserted
    // pages, only ALL_FROZEN of locked ones.
    let vmt = read_vm_page(&vm_tables[0].path)?;
    for blk in [1, 3, 8] {
        ensure!(vm_flags(&vmt, blk) == 0, "vmt page {blk}: {}", vm_flags(&vmt, blk));
    }
    for blk in [5, 6] {
        ensure!(vm_flags(&vmt, blk) == VISIBILITYMAP_VALID_BITS & !VISIBILITYMAP_ALL_FROZEN, "vmt locked page {blk}");
    }
    ensure!(vm_flags(&vmt, 10) == VISIBILITYMAP_VALID_BITS, "untouched vmt page 10");
    for t in &vm_tables[1..] {
        ensure!(vm_flags(&read_vm_page(&t.path)?, 0) == 0, "{}: page 0 still all-visible", t.name);
    }
    for kind in ["UPDATE", "DELETE", "LOCK", "INSERT", "MULTI_INSERT"] {
        ensure!(d.vm_clear_kinds.contains(kind), "no VM clear derived from a {kind} record: {:?}", d.vm_clear_kinds);
    }
    eprintln!("VM: {} pages equal; clears derived from {:?}", vm_tables.len(), d.vm_clear_kinds);
    Ok(())
}
