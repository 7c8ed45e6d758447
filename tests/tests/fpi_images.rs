//! Full-page images restored right: `CREATE INDEX` logs every page of the new index as a
//! full-page image (XLOG FPI records). After a `CHECKPOINT`, each image we restore from the WAL
//! must equal the index's page on disk, apart from `pd_lsn` and `pd_checksum` — for images
//! stored plain, with a hole, and compressed with lz4, pglz and zstd.
//!
//! The hole (free space between `pd_lower` and `pd_upper`) is compared only when the page on
//! disk has zeros there: a btree build "moves" the last item of a full page by lowering
//! `pd_lower`, leaving stale line-pointer bytes in what becomes the hole, which the image rightly
//! omits. PostgreSQL's `wal_consistency_checking` masks the hole for the same reason
//! (`mask_unused_space`); we count those pages and require the rest to match byte for byte.

use anyhow::{Context, Result};
use neon_tests::pagemask::{first_difference, mask_lsn_and_checksum, mask_unused_space};
use neon_tests::workload::{self, MIXED_GUCS};
use neon_tests::Cluster;
use neon_types::BLCKSZ;
use sidecar::wal::consts::*;
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use std::collections::BTreeMap;

#[test]
fn restored_index_images_equal_pages_on_disk() -> Result<()> {
    let c = Cluster::builder().gucs(MIXED_GUCS).start()?;
    // Keys compressible enough for pglz's default strategy (it gives up below 25% savings).
    c.execute("CREATE TABLE t AS SELECT g, substr(md5(g::text), 1, 8) || repeat('-', 24) AS h FROM generate_series(1, 30000) g")?;
    let start = workload::insert_lsn(&c)?;

    // (compression, bimg_info flag expected on its images, relfilenode, path)
    let mut indexes = Vec::new();
    for (method, flag) in [
        ("off", 0u8),
        ("lz4", BKPIMAGE_COMPRESS_LZ4),
        ("pglz", BKPIMAGE_COMPRESS_PGLZ),
        ("zstd", BKPIMAGE_COMPRESS_ZSTD),
    ] {
        workload::set_wal_compression(&c, method)?;
        let name = format!("t_idx_{method}");
        c.execute(&format!("CREATE INDEX {name} ON t (h, g)"))?;
        let filenode: u32 = c.query_one_string(&format!("SELECT pg_relation_filenode('{name}')::text"))?.parse()?;
        let path = c.query_one_string(&format!("SELECT pg_relation_filepath('{name}')"))?;
        indexes.push((method, flag, filenode, path));
    }
    workload::set_wal_compression(&c, "off")?;
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;

    // The last image of every block of each index, as restored from the WAL.
    let mut images: BTreeMap<(u32, u32), ([u8; BLCKSZ], u8)> = BTreeMap::new();
    let set = SegmentSet::collect(&[c.wal_dir()], None)?;
    for rec in WalFileReader::new(set, Some(start), Some(end))? {
        let rec = rec?;
        for b in &rec.blocks {
            let Some(img) = &b.image else { continue };
            if !indexes.iter().any(|i| i.2 == b.tag.rel.node.relnode) {
                continue;
            }
            let mut page = [0u8; BLCKSZ];
            rec.restore_image(img, &mut page).with_context(|| format!("restoring {} at {}", b.tag, rec.lsn))?;
            images.insert((b.tag.rel.node.relnode, b.tag.blkno), (page, img.bimg_info));
        }
    }

    for (method, flag, filenode, path) in &indexes {
        let file = std::fs::read(c.data_dir().join(path))?;
        let nblocks = file.len() / BLCKSZ;
        assert!(nblocks > 10, "index {method} has only {nblocks} blocks");
        let (mut holes, mut flagged, mut stale_holes) = (0, 0, 0);
        for blk in 0..nblocks {
            let (page, bimg_info) = images
                .get(&(*filenode, blk as u32))
                .unwrap_or_else(|| panic!("no image of block {blk} of the {method} index in the WAL"));
            let mut disk = file[blk * BLCKSZ..(blk + 1) * BLCKSZ].to_vec();
            let mut restored = page.to_vec();
            mask_lsn_and_checksum(&mut disk);
            mask_lsn_and_checksum(&mut restored);
            if first_difference(&restored, &disk).is_some() {
                // Only a stale hole on disk may differ; the image's hole is zeros.
                assert!(
                    mask_unused_space(&mut disk) && mask_unused_space(&mut restored),
                    "{method} block {blk}: bad page bounds"
                );
                stale_holes += 1;
            }
            if let Some(at) = first_difference(&restored, &disk) {
                panic!("{method} index block {blk}: restored image differs from disk at byte {at}");
            }
            holes += (bimg_info & BKPIMAGE_HAS_HOLE != 0) as usize;
            // PostgreSQL stores an image plain when compressing it saves nothing.
            assert_eq!(
                bimg_info & BKPIMAGE_COMPRESSED & !flag,
                0,
                "{method} block {blk}: compressed with another method"
            );
            flagged += (bimg_info & flag != 0) as usize;
        }
        if *flag != 0 {
            assert!(flagged * 2 > nblocks, "{method}: only {flagged} of {nblocks} images compressed");
        }
        assert!(holes > 0, "{method}: no image with a hole");
        assert!(stale_holes * 2 < nblocks, "{method}: {stale_holes} of {nblocks} pages needed the hole masked");
        eprintln!("{method}: {nblocks} blocks restored equal to disk ({flagged} compressed, {holes} with a hole, {stale_holes} with stale bytes in it on disk)");
    }
    Ok(())
}
