//! `neon_tests::pagemask` against real PostgreSQL 15 pages.
//!
//! * Two copies of the same heap / btree page, read from the relation's file after a
//!   `CHECKPOINT` before and after a read-only query that sets hint bits or kills index
//!   items without WAL, differ raw but mask equal; a WAL-logged change still shows after
//!   masking.
//! * With `wal_consistency_checking = all` every WAL record carries an image of each page it
//!   touched, taken as the record is inserted (after the change). For every page of every
//!   access method, the last such image and the page on disk after a `CHECKPOINT` may differ
//!   only in what the page's mask function masks, which is exactly what PostgreSQL's own
//!   consistency check relies on.

use anyhow::{ensure, Context, Result};
use neon_tests::pagemask::{
    first_difference, item_id, mask_lsn_and_checksum, mask_unused_space, try_mask_page, PageKind, BTP_HAS_GARBAGE,
    HEAP_XMIN_COMMITTED, LP_DEAD, LP_NORMAL,
};
use neon_tests::workload::{self, MIXED_GUCS};
use neon_tests::Cluster;
use neon_types::BLCKSZ;
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use std::collections::{BTreeMap, HashMap};

/// Block `blkno` of relation `rel` as it is in the relation's file (call after `CHECKPOINT`).
fn read_block(c: &Cluster, rel: &str, blkno: usize) -> Result<Vec<u8>> {
    let path = c.query_one_string(&format!("SELECT pg_relation_filepath('{rel}')"))?;
    let file = std::fs::read(c.data_dir().join(&path)).with_context(|| format!("reading {path}"))?;
    let page = file.get(blkno * BLCKSZ..(blkno + 1) * BLCKSZ).with_context(|| format!("{rel} has no block {blkno}"))?;
    Ok(page.to_vec())
}

fn masked(kind: PageKind, page: &[u8], blkno: u32) -> Vec<u8> {
    let mut p = page.to_vec();
    try_mask_page(kind, &mut p, blkno).unwrap_or_else(|e| panic!("{kind:?} block {blkno}: {e}"));
    p
}

#[test]
fn hint_bits_and_killed_items_mask_away() -> Result<()> {
    let c = Cluster::builder().guc("autovacuum", "off").start()?;
    c.execute("CREATE TABLE t (a int PRIMARY KEY, b text)")?;
    c.execute("INSERT INTO t SELECT g, repeat('x', 20) FROM generate_series(1, 100) g")?;
    c.execute("CHECKPOINT")?;
    let heap_before = read_block(&c, "t", 0)?;

    // A sequential scan sets HEAP_XMIN_COMMITTED on every tuple, without WAL.
    c.query_one_string("SELECT count(*) FROM t")?;
    c.execute("CHECKPOINT")?;
    let heap_after = read_block(&c, "t", 0)?;
    let at = first_difference(&heap_before, &heap_after).context("the scan set no hint bits")?;
    let lp = item_id(&heap_after, 1).unwrap();
    assert_eq!(lp.flags, LP_NORMAL);
    let infomask = |p: &[u8]| u16::from_le_bytes([p[lp.off as usize + 20], p[lp.off as usize + 21]]);
    assert_eq!(infomask(&heap_before) & HEAP_XMIN_COMMITTED, 0);
    assert_ne!(infomask(&heap_after) & HEAP_XMIN_COMMITTED, 0);
    assert_eq!(
        first_difference(&masked(PageKind::Heap, &heap_before, 0), &masked(PageKind::Heap, &heap_after, 0)),
        None,
        "heap pages differing first at byte {at} still differ after masking"
    );

    // A WAL-logged change is not masked away.
    c.execute("DELETE FROM t WHERE a % 2 = 0")?;
    c.execute("CHECKPOINT")?;
    let heap_deleted = read_block(&c, "t", 0)?;
    assert!(
        first_difference(&masked(PageKind::Heap, &heap_after, 0), &masked(PageKind::Heap, &heap_deleted, 0)).is_some()
    );

    // An index scan meeting the deleted (dead to everyone) rows marks their index items
    // LP_DEAD and the leaf BTP_HAS_GARBAGE, without WAL. The 100-key index is a single leaf,
    // block 1 (block 0 is the metapage).
    let leaf_before = read_block(&c, "t_pkey", 1)?;
    let rows = c.query_rows(
        "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(b) FROM t WHERE a BETWEEN 1 AND 100",
    )?;
    assert_eq!(rows, vec![vec![Some("50".to_string())]]);
    c.execute("CHECKPOINT")?;
    let leaf_after = read_block(&c, "t_pkey", 1)?;
    let opaque = |p: &[u8]| {
        let special = u16::from_le_bytes([p[16], p[17]]) as usize;
        u16::from_le_bytes([p[special + 12], p[special + 13]])
    };
    assert_eq!(opaque(&leaf_before) & BTP_HAS_GARBAGE, 0);
    assert_ne!(opaque(&leaf_after) & BTP_HAS_GARBAGE, 0, "the index scan killed no items");
    let dead = (1..=200).filter_map(|off| item_id(&leaf_after, off)).filter(|l| l.flags == LP_DEAD).count();
    assert!(dead >= 40, "only {dead} index items marked dead");
    assert_eq!(
        first_difference(&masked(PageKind::Btree, &leaf_before, 1), &masked(PageKind::Btree, &leaf_after, 1)),
        None
    );

    // VACUUM removing the dead items is a real (logged) change.
    c.execute("VACUUM t")?;
    c.execute("CHECKPOINT")?;
    let leaf_vacuumed = read_block(&c, "t_pkey", 1)?;
    assert!(first_difference(&masked(PageKind::Btree, &leaf_after, 1), &masked(PageKind::Btree, &leaf_vacuumed, 1))
        .is_some());
    Ok(())
}

/// Statements run one by one (each in its own transaction).
const WORKLOAD: &[&str] = &[
    "CREATE TABLE h (id int PRIMARY KEY, v int, t text, arr int[], p point, r int4range, doc tsvector)",
    "INSERT INTO h SELECT g, g % 100, md5(g::text), ARRAY[g % 10, g % 7, g % 13], point(g % 100, g / 100), \
     int4range(g, g + 10), to_tsvector('simple', md5(g::text) || ' w' || (g % 50)) FROM generate_series(1, 4000) g",
    "CREATE INDEX h_v_hash ON h USING hash (v)",
    "CREATE INDEX h_arr_gin ON h USING gin (arr) WITH (fastupdate = off)",
    "CREATE INDEX h_doc_gin ON h USING gin (doc) WITH (fastupdate = on)",
    "CREATE INDEX h_p_gist ON h USING gist (p)",
    "CREATE INDEX h_r_gist ON h USING gist (r)",
    "CREATE INDEX h_t_spgist ON h USING spgist (t)",
    "CREATE INDEX h_id_brin ON h USING brin (id) WITH (pages_per_range = 2)",
    "CREATE INDEX h_t_btree ON h (t)",
    // Incremental inserts into every index.
    "INSERT INTO h SELECT g, g % 100, md5(g::text), ARRAY[g % 10, g % 7, g % 13], point(g % 100, g / 100), \
     int4range(g, g + 10), to_tsvector('simple', md5(g::text) || ' w' || (g % 50)) FROM generate_series(4001, 7000) g",
    "UPDATE h SET t = t || 'x', v = v + 1 WHERE id % 10 = 0",
    "DELETE FROM h WHERE id % 7 = 0",
    "BEGIN; INSERT INTO h (id, v, t) SELECT g, 1, 'aborted' FROM generate_series(100001, 100100) g; ROLLBACK",
    // Speculative insertions (t_ctid holds a token until confirmed).
    "INSERT INTO h (id, v, t) SELECT g, 0, 'upsert' FROM generate_series(6990, 7020) g \
     ON CONFLICT (id) DO UPDATE SET v = excluded.v",
    "CREATE TABLE hot (id int, x int) WITH (fillfactor = 50)",
    "INSERT INTO hot SELECT g, 0 FROM generate_series(1, 2000) g",
    "UPDATE hot SET x = x + 1",
    "UPDATE hot SET x = x + 1 WHERE id % 3 = 0",
    "CREATE SEQUENCE s",
    "SELECT nextval('s') FROM generate_series(1, 100)",
    // The last change to the sequence must be a setval: nextval logs a state 32 values ahead
    // of the one it leaves on the page.
    "SELECT setval('s', 1000)",
    "VACUUM h",
    "VACUUM hot",
    "INSERT INTO h (id, v, t) SELECT g, g % 100, md5(g::text) FROM generate_series(7101, 8000) g",
    "SELECT brin_summarize_new_values('h_id_brin')",
    "DELETE FROM h WHERE id % 11 = 0",
    // Reads that set hint bits and kill index items, without WAL.
    "SELECT count(*) FROM h",
    "SELECT count(*) FROM hot",
    "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(v) FROM h WHERE id BETWEEN 1 AND 8000",
    "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(id) FROM h WHERE v = 11",
    "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(id) FROM h WHERE p <@ box '((0,0),(60,60))'",
    "SET enable_seqscan = off; SET enable_bitmapscan = off; SELECT count(id) FROM h WHERE r && int4range(100, 3000)",
    "SET enable_seqscan = off; SELECT count(id) FROM h WHERE t >= '8' AND t < '9'",
    "SELECT count(id) FROM h WHERE arr @> ARRAY[3] AND doc @@ 'w7'::tsquery",
];

#[test]
fn consistency_images_equal_disk_pages_after_masking() -> Result<()> {
    let c =
        Cluster::builder().gucs(MIXED_GUCS).guc("autovacuum", "off").guc("wal_consistency_checking", "all").start()?;
    let start = workload::insert_lsn(&c)?;
    for sql in WORKLOAD {
        c.execute(sql)?;
    }
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;

    // (spcnode, dbnode, relnode) -> (kind, name, path) for every permanent relation of database
    // postgres, catalogs included.
    let db = c.query_rows("SELECT oid, dattablespace FROM pg_database WHERE datname = current_database()")?;
    let (dboid, dbspc): (u32, u32) = (db[0][0].as_ref().unwrap().parse()?, db[0][1].as_ref().unwrap().parse()?);
    let mut rels = HashMap::new();
    for row in c.query_rows(
        "SELECT pg_relation_filenode(c.oid), c.reltablespace, c.relisshared, c.relkind, coalesce(a.amname, ''), \
         c.relname, pg_relation_filepath(c.oid) FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam \
         WHERE c.relpersistence = 'p' AND pg_relation_filenode(c.oid) IS NOT NULL",
    )? {
        let col = |i: usize| row[i].clone().unwrap_or_default();
        let kind = PageKind::of_relation(&col(3), &col(4));
        let Some(kind) = kind else { continue };
        let spc: u32 = col(1).parse()?;
        let shared = col(2) == "t";
        let key = (if spc == 0 { dbspc } else { spc }, if shared { 0 } else { dboid }, col(0).parse::<u32>()?);
        rels.insert(key, (kind, col(5), col(6)));
    }

    // The last image of every main-fork block of those relations.
    // (spc, db, rel), block -> the last image of that block.
    type BlockKey = ((u32, u32, u32), u32);
    let mut images: BTreeMap<BlockKey, Vec<u8>> = BTreeMap::new();
    let set = SegmentSet::collect(&[c.wal_dir()], None)?;
    for rec in WalFileReader::new(set, Some(start), Some(end))? {
        let rec = rec?;
        for b in &rec.blocks {
            let Some(img) = &b.image else { continue };
            let n = b.tag.rel.node;
            let key = (n.spcnode, n.dbnode, n.relnode);
            if b.tag.rel.fork as u8 != 0 || !rels.contains_key(&key) {
                continue;
            }
            let mut page = [0u8; BLCKSZ];
            rec.restore_image(img, &mut page).with_context(|| format!("restoring {} at {}", b.tag, rec.lsn))?;
            images.insert((key, b.tag.blkno), page.to_vec());
        }
    }

    // kind -> (blocks compared, equal apart from LSN, checksum and hole, equal only after the
    // access method's masking)
    let mut stats: BTreeMap<&'static str, (usize, usize, usize)> = BTreeMap::new();
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut mismatches = Vec::new();
    let mut spgist_meta = 0;
    for ((key, blkno), image) in &images {
        let (kind, name, path) = &rels[key];
        if !files.contains_key(path) {
            files.insert(
                path.clone(),
                std::fs::read(c.data_dir().join(path)).with_context(|| format!("reading {path}"))?,
            );
        }
        let file = &files[path];
        let Some(disk) = file.get(*blkno as usize * BLCKSZ..(*blkno as usize + 1) * BLCKSZ) else {
            continue; // truncated since
        };
        let basic = |p: &[u8]| {
            let mut p = p.to_vec();
            mask_lsn_and_checksum(&mut p);
            mask_unused_space(&mut p);
            p
        };
        let (mut a, mut b) = (image.clone(), disk.to_vec());
        let ra = try_mask_page(*kind, &mut a, *blkno);
        let rb = try_mask_page(*kind, &mut b, *blkno);
        ensure!(ra.is_ok() && rb.is_ok(), "{name} block {blkno}: masking failed: {ra:?} {rb:?}");
        let s = stats.entry(kind.mask_function()).or_default();
        s.0 += 1;
        if first_difference(&basic(image), &basic(disk)).is_none() {
            s.1 += 1;
        } else if let Some(at) = first_difference(&a, &b) {
            // SpGistUpdateMetaPage() stores its cache of last-used pages (SpGistMetaPageData's
            // lastUsedPages, bytes 28..92) in the metapage without WAL, and spg_mask does not
            // mask it: PostgreSQL never compares that page after such an update, as no WAL
            // record but the build's touches it.
            if *kind == PageKind::SpGist && *blkno == 0 && (0..BLCKSZ).all(|i| a[i] == b[i] || (28..92).contains(&i)) {
                spgist_meta += 1;
                continue;
            }
            mismatches.push(format!("{name} ({kind:?}) block {blkno}: differs after masking at byte {at}"));
        } else {
            s.2 += 1;
        }
    }
    for (f, (n, basic, masked)) in &stats {
        eprintln!("{f}: {n} blocks compared, {basic} equal but for LSN/checksum/hole, {masked} equal only after {f}");
    }
    eprintln!("spgist metapages differing in their unlogged last-used-pages cache: {spgist_meta}");
    assert!(mismatches.is_empty(), "{} pages differ:\n{}", mismatches.len(), mismatches.join("\n"));

    // Every initialized page of those relations, with an image or not, is a valid page to its
    // mask function.
    let mut all_pages = 0;
    for (kind, name, path) in rels.values() {
        let file = std::fs::read(c.data_dir().join(path)).with_context(|| format!("reading {path}"))?;
        for (blkno, page) in file.chunks_exact(BLCKSZ).enumerate() {
            if page.iter().all(|&b| b == 0) {
                continue;
            }
            let mut p = page.to_vec();
            let r = try_mask_page(*kind, &mut p, blkno as u32);
            ensure!(r.is_ok(), "{name} ({kind:?}) block {blkno}: {r:?}");
            all_pages += 1;
        }
    }
    eprintln!("{all_pages} pages on disk masked without error");
    for kind in PageKind::ALL.into_iter().filter(|k| *k != PageKind::Generic) {
        let n = stats.get(kind.mask_function()).map_or(0, |s| s.0);
        assert!(n > 0, "no {kind:?} page compared");
    }
    // The masks did some work: hint bits on heap pages, killed items on btree, hash and gist
    // leaves.
    for kind in [PageKind::Heap, PageKind::Btree, PageKind::Hash, PageKind::Gist] {
        let masked = stats[kind.mask_function()].2;
        assert!(masked > 0, "no {kind:?} page needed masking");
    }
    Ok(())
}
