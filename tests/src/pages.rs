//! The compute's pages as an oracle for reconstruction: which relations a cluster has and how
//! to mask their pages, reading blocks from its files, and turning a WAL range into one redo
//! request per block. Tests, benchmarks and the demo share this so they check the same thing.

use crate::pagemask::{first_difference, mask_page, mask_page_lsn_and_checksum, PageKind};
use crate::{is_root, server_user, Cluster};
use anyhow::Result;
use bytes::Bytes;
use neon_types::page::page_lsn;
use neon_types::{BufferTag, ForkNumber, Lsn, BLCKSZ};
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use sidecar::walredo::{redo_records_of, RedoConfig, RedoRecord, RedoRequest};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A relation of the compute: where its files are and how to mask its pages.
pub struct Rel {
    pub name: String,
    /// Relative to the data directory (`pg_relation_filepath`).
    pub path: String,
    pub kind: PageKind,
}

/// The relations with storage of database `postgres`, by relfilenode.
pub fn relations(c: &Cluster) -> Result<HashMap<u32, Rel>> {
    let rows = c.query_rows(
        "SELECT c.relfilenode::text, c.relname::text, pg_relation_filepath(c.oid), coalesce(a.amname::text, ''), c.relkind::text
         FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam
         WHERE c.relfilenode <> 0 AND c.relkind IN ('r', 'i', 't', 'S', 'm')",
    )?;
    let mut out = HashMap::new();
    for r in rows {
        let col = |i: usize| r[i].clone().unwrap_or_default();
        let kind = if col(4) == "S" { Some(PageKind::Sequence) } else { PageKind::from_amname(&col(3)) };
        if let Some(kind) = kind {
            out.insert(col(0).parse()?, Rel { name: col(1), path: col(2), kind });
        }
    }
    Ok(out)
}

/// The file of one fork of a relation under `base` (a data directory or a copy of one).
pub fn fork_path(base: &Path, rel_path: &str, fork: ForkNumber) -> PathBuf {
    match fork {
        ForkNumber::Main => base.join(rel_path),
        f => base.join(format!("{rel_path}_{}", f.name())),
    }
}

/// Block `blkno` of a file, if the file is that long.
pub fn read_block(path: &Path, blkno: u32) -> Option<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::Start(blkno as u64 * BLCKSZ as u64)).ok()?;
    let mut page = vec![0u8; BLCKSZ];
    f.read_exact(&mut page).ok()?;
    Some(page)
}

/// A redo configuration with its scratch directories under `dir`, running PostgreSQL as the
/// server OS user when we are root.
pub fn redo_config(dir: &Path, processes: usize) -> RedoConfig {
    let mut cfg = RedoConfig::new(dir.join("walredo"));
    cfg.processes = processes;
    if is_root() {
        cfg.run_as = Some(server_user());
    }
    cfg
}

/// One request per block of `rels` (FSM forks aside) that WAL in `[from, to)` touches, in block
/// order: the base page from `snapshot` (a copy of the data directory taken at `from`, if the
/// block existed then) and every record for the block.
pub fn block_requests(
    snapshot: &Path,
    rels: &HashMap<u32, Rel>,
    wal: &Path,
    from: Lsn,
    to: Lsn,
) -> Result<Vec<RedoRequest>> {
    let mut by_block: BTreeMap<BufferTag, Vec<RedoRecord>> = BTreeMap::new();
    let mut reader = WalFileReader::new(SegmentSet::collect(&[wal], None)?, Some(from), Some(to))?;
    let wanted = |tag: &BufferTag| tag.rel.fork != ForkNumber::Fsm && rels.contains_key(&tag.rel.node.relnode);
    while let Some(rec) = reader.next_record()? {
        redo_records_of(&rec, |tag, r| {
            if wanted(&tag) {
                by_block.entry(tag).or_default().push(r);
            }
        })?;
    }
    Ok(by_block
        .into_iter()
        .map(|(tag, records)| {
            let rel = &rels[&tag.rel.node.relnode];
            let base = read_block(&fork_path(snapshot, &rel.path, tag.rel.fork), tag.blkno).map(Bytes::from);
            RedoRequest { target: tag, base, records }
        })
        .collect())
}

/// How a rebuilt page compares with the compute's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageMatch {
    Equal,
    /// Equal but for `pd_lsn`, on a GiST page the compute's sorted index build wrote to disk
    /// with the build's placeholder LSN (`GistBuildLSN`, 0/1) before `log_newpages` stamped
    /// its in-memory copy with the record's LSN (gistbuild.c,
    /// `gist_indexsortbuild_flush_ready_pages`): a standby replays that record and has the
    /// record's LSN, so the store rightly has a real one. Counted by callers.
    GistBuildLsn,
    /// The first byte that differs.
    Differs(usize),
}

/// `GistBuildLSN` (gist.h): the LSN of pages a GiST build wrote without WAL of their own.
const GIST_BUILD_LSN: neon_types::Lsn = neon_types::Lsn(1);

/// Compares a rebuilt page with the compute's, both masked as PostgreSQL's `rm_mask` for the
/// relation's kind does (visibility-map pages: LSN and checksum only, since their bits lie in
/// what the header calls free space) — except `pd_lsn`, compared exactly: on disk after a
/// CHECKPOINT it is the end of the last record that changed the page, which is what a
/// standby's redo leaves there too (`PageSetLSN`, also after restoring a full-page image in
/// `XLogReadBufferForRedoExtended`). `rm_mask` masks it only because `wal_consistency_checking`
/// compares an image taken before the LSN is set; GiST's scans rely on it. The one exception
/// is [`PageMatch::GistBuildLsn`].
pub fn compare_masked(rel: &Rel, tag: &BufferTag, rebuilt: &[u8], disk: &[u8]) -> PageMatch {
    let (mut ours, mut theirs) = (rebuilt.to_vec(), disk.to_vec());
    for page in [&mut ours, &mut theirs] {
        if tag.rel.fork == ForkNumber::VisibilityMap {
            mask_page_lsn_and_checksum(page);
        } else {
            mask_page(rel.kind, page, tag.blkno);
        }
    }
    if let Some(at) = first_difference(&ours, &theirs) {
        return PageMatch::Differs(at);
    }
    match first_difference(&rebuilt[..8], &disk[..8]) {
        None => PageMatch::Equal,
        Some(_)
            if rel.kind == PageKind::Gist
                && tag.rel.fork == ForkNumber::Main
                && page_lsn(disk) == GIST_BUILD_LSN
                && page_lsn(rebuilt) > GIST_BUILD_LSN =>
        {
            PageMatch::GistBuildLsn
        }
        Some(at) => PageMatch::Differs(at),
    }
}

/// Block `blkno` of fork `fork` of relfilenode `relnode` in database `postgres`.
pub fn block(relnode: u32, fork: ForkNumber, blkno: u32) -> BufferTag {
    BufferTag {
        rel: neon_types::RelTag { node: neon_types::RelFileNode { spcnode: 1663, dbnode: 5, relnode }, fork },
        blkno,
    }
}

/// For every relation of database `postgres` whose name starts with `prefix`, main and VM
/// forks: the store's size at `lsn` equals the file's under `data`, and every page equals the
/// file's (masked). Returns the number of pages compared.
pub fn compare_store_at(
    c: &Cluster,
    repo: &sidecar::repo::timeline::Timeline,
    redo: &dyn sidecar::walredo::WalRedoManager,
    data: &Path,
    lsn: Lsn,
    prefix: &str,
) -> Result<usize> {
    use anyhow::Context;
    use sidecar::repo::reconstruct::{get_page, rel_size};
    let rels = relations(c)?;
    let mut compared = 0;
    for (relnode, rel) in rels.iter().filter(|(_, r)| r.name.starts_with(prefix)) {
        for fork in [ForkNumber::Main, ForkNumber::VisibilityMap] {
            let file = std::fs::read(fork_path(data, &rel.path, fork)).unwrap_or_default();
            let ours = rel_size(repo, &block(*relnode, fork, 0).rel, lsn)?.unwrap_or(0) as usize;
            anyhow::ensure!(
                ours == file.len() / BLCKSZ,
                "{} {fork} at {lsn}: size {ours}, the file has {} blocks",
                rel.name,
                file.len() / BLCKSZ
            );
            for blkno in 0..ours {
                let tag = block(*relnode, fork, blkno as u32);
                let page = get_page(repo, redo, tag, lsn).with_context(|| format!("{} {tag} at {lsn}", rel.name))?;
                let disk = &file[blkno * BLCKSZ..(blkno + 1) * BLCKSZ];
                if let PageMatch::Differs(at) = compare_masked(rel, &tag, &page[..], disk) {
                    anyhow::bail!("{} {tag} at {lsn}: differs from the compute's page at byte {at}", rel.name);
                }
                compared += 1;
            }
        }
    }
    Ok(compared)
}
