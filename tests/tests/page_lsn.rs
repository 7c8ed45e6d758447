//! Pages as a standby has them, `pd_lsn` included. PostgreSQL's redo stamps a page restored
//! from a full-page image with the record's LSN (`XLogReadBufferForRedoExtended`); the store
//! must too, or a page whose last change was an image keeps the LSN the image was taken with.
//! That is not cosmetic: a GiST scan compares a child's NSN with the LSN its parent had when
//! the scan read it, and when the parent looks older than the child's split it follows the
//! child's right-link a second time, returning rows twice.
//!
//! The test makes exactly that: a GiST index built by the sorted build (whose pages are logged
//! as images that still carry the build's fake LSN 0/1), then enough inserts to split leaves,
//! so that the parent's first change after the build is logged as an image. A base backup at
//! that LSN, booted by stock PostgreSQL, must count with an index scan what the compute
//! counted then — and every page of the index must carry the compute's `pd_lsn`.

use anyhow::Result;
use neon_tests::sidecar::{basebackup_from_store, boot_basebackup, cluster_born_with_store, SidecarProcess};
use neon_tests::snapshot::{compare, Snapshot};
use neon_tests::workload;

const INDEX_SCAN: &str = "SET enable_seqscan = off; SET enable_bitmapscan = off; \
                          SELECT count(*) FROM pts WHERE p <@ box '((-1,-1),(1000,1000))'";

#[test]
fn gist_index_scans_on_a_booted_copy_count_what_the_compute_counted() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.execute("CREATE TABLE pts (id int, p point)")?;
    c.execute("INSERT INTO pts SELECT g, point(g % 211, g / 211) FROM generate_series(1, 20000) g")?;
    c.execute("CREATE INDEX pts_gist ON pts USING gist (p)")?;
    // After a checkpoint, the first change of each page is logged with its image. Split one
    // leaf, once: its parent's one change (the new downlink) is then an image, and the split
    // leaves carry an NSN newer than the LSN that image was taken with.
    c.execute("CHECKPOINT")?;
    let pages = |c: &neon_tests::Cluster| -> Result<u64> {
        Ok(c.query_one_string("SELECT pg_relation_size('pts_gist') / 8192")?.parse()?)
    };
    let before = pages(&c)?;
    let mut inserted = 0;
    while pages(&c)? == before {
        c.execute("INSERT INTO pts SELECT -g, point(50 + g * 0.001, 50) FROM generate_series(1, 10) g")?;
        inserted += 10;
        anyhow::ensure!(inserted < 5000, "no leaf split after {inserted} inserts");
    }
    eprintln!("a leaf split after {inserted} inserts ({before} -> {} pages)", pages(&c)?);
    let expected = c.query_one_string(INDEX_SCAN)?;
    assert_eq!(expected, (20000 + inserted).to_string(), "the compute's own index scan");
    // Every page of every relation now, pd_lsn compared exactly (the GiST index among them).
    let snap = Snapshot::take(&c, "at")?;
    sidecar.wait_durable(snap.lsn)?;
    let compared = compare(&sidecar, &snap, 0)?;
    eprintln!("{compared:?} equal the compute's at {}, pd_lsn exact", snap.lsn);
    // The index pages the split and the inserts left alone still have the build's LSN on the
    // compute's disk (and a real one in the store, as on a standby); they are the exception,
    // and counted: most of the index.
    let index_pages: usize = c.query_one_string("SELECT pg_relation_size('pts_gist') / 8192")?.parse()?;
    assert!(
        compared.exceptions.gist_build_lsn > index_pages / 2 && compared.exceptions.gist_build_lsn < index_pages,
        "{} of {index_pages} index pages with the build's LSN",
        compared.exceptions.gist_build_lsn
    );

    // The compute goes on; the copy is of the moment the count was taken.
    c.execute("DELETE FROM pts WHERE id % 2 = 0")?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;
    let tar = c.root_dir().join("base.tar");
    basebackup_from_store(&store, snap.lsn, &tar, &[])?;
    let b = boot_basebackup(&tar)?;
    let plan_copy = b.query_rows(&format!(
        "SET enable_seqscan = off; SET enable_bitmapscan = off; EXPLAIN {}",
        INDEX_SCAN.rsplit("; ").next().unwrap_or_default()
    ))?;
    let uses_index = |rows: &Vec<Vec<Option<String>>>| rows.iter().flatten().flatten().any(|l| l.contains("pts_gist"));
    assert!(uses_index(&plan_copy), "the copy's plan does not scan pts_gist: {plan_copy:?} ");
    assert_eq!(b.query_one_string(INDEX_SCAN)?, expected, "index scan on the copy at {}", snap.lsn);
    sidecar.stop()
}
