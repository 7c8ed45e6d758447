//! The compute's pages as an oracle for reconstruction: which relations a cluster has and how
//! to mask their pages, reading blocks from its files, and turning a WAL range into one redo
//! request per block. Tests, benchmarks and the demo share this so they check the same thing.

use crate::pagemask::{adopt_unlogged_lp_dead, first_difference, mask_for_standby, PageKind};
use crate::{is_root, server_user, Cluster};
use anyhow::Result;
use bytes::Bytes;
use neon_types::page::page_lsn;
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use sidecar::wal::segment::{SegmentSet, WalFileReader};
use sidecar::walredo::{redo_records_of, RedoConfig, RedoRecord, RedoRequest};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// A relation of the compute: where its files are and how to mask its pages.
pub struct Rel {
    pub name: String,
    pub node: RelFileNode,
    /// Relative to the data directory (`pg_relation_filepath`).
    pub path: String,
    pub kind: PageKind,
}

/// The permanent relations with storage that database `postgres` sees — mapped catalogs
/// (whose `pg_class.relfilenode` is 0) and shared catalogs included — by relfilenode.
pub fn relations(c: &Cluster) -> Result<HashMap<u32, Rel>> {
    let rows = c.query_rows(
        "SELECT pg_relation_filenode(c.oid)::text, c.relname::text, pg_relation_filepath(c.oid),
                coalesce(a.amname::text, ''), c.relkind::text, c.relisshared::text,
                (SELECT oid FROM pg_database WHERE datname = current_database())::text,
                CASE WHEN c.reltablespace = 0 THEN
                    (SELECT dattablespace FROM pg_database WHERE datname = current_database())
                ELSE c.reltablespace END::text
         FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam
         WHERE pg_relation_filenode(c.oid) IS NOT NULL AND c.relpersistence = 'p'
           AND c.relkind IN ('r', 'i', 't', 'S', 'm')",
    )?;
    let mut out = HashMap::new();
    for r in rows {
        let col = |i: usize| r[i].clone().unwrap_or_default();
        let kind = PageKind::of_relation(&col(4), &col(3));
        let relnode = col(0).parse()?;
        let node = if col(5) == "true" {
            RelFileNode { spcnode: GLOBALTABLESPACE_OID, dbnode: 0, relnode }
        } else {
            RelFileNode { spcnode: col(7).parse()?, dbnode: col(6).parse()?, relnode }
        };
        if let Some(kind) = kind {
            out.insert(relnode, Rel { name: col(1), node, path: col(2), kind });
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

/// A difference between a rebuilt page and the compute's that is PostgreSQL's own doing, so
/// a standby (or any redo) has it too. Each is narrow and counted ([`Exceptions`]); callers
/// assert the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    /// Only `pd_lsn` differs, on a GiST page the compute's sorted index build wrote to disk
    /// with the build's placeholder LSN (`GistBuildLSN`, 0/1) before `log_newpages` stamped
    /// its in-memory copy with the record's LSN (gistbuild.c,
    /// `gist_indexsortbuild_flush_ready_pages`): a standby replays that record and has the
    /// record's LSN, as the store does.
    GistBuildLsn,
    /// Only the cache of last-used pages differs, on an SP-GiST metapage (block 0): the
    /// primary updates it without WAL (spgutils.c, `SpGistUpdateMetaPage`).
    SpGistMetaCache,
    /// A visibility-map page whose bitmap the store has all zero, header (its LSN too) equal:
    /// `CREATE DATABASE ... STRATEGY WAL_LOG` logs VM pages as standard pages, so the bitmap,
    /// between `pd_lower` and `pd_upper`, is the image's hole and redo zeroes it
    /// (`log_newpage_buffer(buf, true)` in bufmgr.c's `RelationCopyStorageUsingBuffer`).
    /// Never the other way round: the store claims no page all-visible that the compute
    /// does not.
    VmWalLogCopy,
    /// A sequence's `last_value` exactly the compute's `log_cnt` (1 to `SEQ_LOG_VALS`, 32)
    /// steps ahead with `log_cnt` 0, `is_called` and the rest equal: `nextval` logs the value
    /// 32 calls ahead while the primary's buffer keeps the current one and counts down
    /// (sequence.c, `nextval_internal`).
    SequenceAhead,
}

/// How many pages each [`Exception`] accepted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exceptions {
    pub gist_build_lsn: usize,
    pub spgist_meta_cache: usize,
    pub vm_wal_log_copy: usize,
    pub sequence_ahead: usize,
}

impl Exceptions {
    pub fn count(&mut self, e: Exception) {
        *match e {
            Exception::GistBuildLsn => &mut self.gist_build_lsn,
            Exception::SpGistMetaCache => &mut self.spgist_meta_cache,
            Exception::VmWalLogCopy => &mut self.vm_wal_log_copy,
            Exception::SequenceAhead => &mut self.sequence_ahead,
        } += 1;
    }

    pub fn total(&self) -> usize {
        self.gist_build_lsn + self.spgist_meta_cache + self.vm_wal_log_copy + self.sequence_ahead
    }
}

/// What a comparison covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compared {
    pub databases: usize,
    pub forks: usize,
    pub pages: usize,
    pub exceptions: Exceptions,
}

impl Compared {
    /// Fails unless the pages accepted by each exception are `expected`'s — for the SP-GiST
    /// metapage cache at most that many (the cache differs only when inserts used it).
    pub fn expect(&self, expected: Exceptions) -> Result<&Compared> {
        let got = self.exceptions;
        let spgist_ok = got.spgist_meta_cache <= expected.spgist_meta_cache;
        let others_ok = Exceptions { spgist_meta_cache: 0, ..got } == Exceptions { spgist_meta_cache: 0, ..expected };
        anyhow::ensure!(spgist_ok && others_ok, "pages accepted by exceptions: {got:?}, expected {expected:?}");
        Ok(self)
    }

    /// Fails if any page needed an exception.
    pub fn expect_no_exceptions(&self) -> Result<&Compared> {
        self.expect(Exceptions::default())
    }
}

/// How a rebuilt page compares with the compute's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageMatch {
    Equal,
    Exception(Exception),
    /// The first byte that differs.
    Differs(usize),
}

/// `GistBuildLSN` (gist.h): the LSN of pages a GiST build wrote without WAL of their own.
const GIST_BUILD_LSN: Lsn = Lsn(1);

/// Compares a rebuilt page with the compute's page on disk after a `CHECKPOINT` — the page a
/// streaming standby would have — masking only what such a standby legitimately has
/// different ([`mask_for_standby`]): `pd_lsn`, `PD_ALL_VISIBLE` and GiST's NSN and
/// `F_FOLLOW_RIGHT` are compared exactly. What stays masked, and why:
///
/// | masked | why | PostgreSQL source |
/// |---|---|---|
/// | `pd_checksum` | computed when a buffer is written out, not by redo | bufmgr.c `FlushBuffer` |
/// | `pd_prune_xid`, `PD_PAGE_FULL`, `PD_HAS_FREE_LINES` | hints set without WAL | bufmask.c `mask_page_hint_bits`, pruneheap.c |
/// | the hole `pd_lower..pd_upper` | an image leaves it out; the primary may keep stale bytes there | bufmask.c `mask_unused_space` |
/// | heap `t_infomask` commit/abort hints (`HEAP_XMIN_*`, `HEAP_XMAX_COMMITTED`/`INVALID`) | set by readers without WAL | heapam_visibility.c `SetHintBits` |
/// | heap `HEAP_COMBOCID` | redo clears it with `t_cid` | heapam.c `heap_xlog_delete`, `HeapTupleHeaderSetCmax` |
/// | heap `t_cid` | redo sets `FirstCommandId` | heapam.c `heap_xlog_insert` |
/// | heap speculative `t_ctid` | a token on the primary, the tuple itself after redo | heapam.c `heap_mask` |
/// | heap padding after a tuple | copied from the primary's tuple memory, not logged | heapam.c `heap_mask` |
/// | index leaf `LP_DEAD` (btree, hash, GiST), one way: on disk and not rebuilt | killed items set without WAL | nbtutils.c `_bt_killitems`, hashutil.c `_hash_kill_items`, gistget.c `gistkillitems` |
/// | `BTP_HAS_GARBAGE`, `LH_PAGE_HAS_DEAD_TUPLES`, `F_HAS_GARBAGE` | the same hints' page flags | nbtxlog.c `btree_mask`, hash_xlog.c `hash_mask`, gistxlog.c `gist_mask` |
/// | `BTP_SPLIT_END`, `btpo_cycleid` | vacuum's cycle marks, left 0 by redo | nbtxlog.c `btree_mask` |
/// | unused hash page, deleted GIN page content | left as it was on the primary, rebuilt by redo | hash_xlog.c `hash_mask`, ginxlog.c `gin_mask` |
/// | `BRIN_EVACUATE_PAGE` | not WAL-logged | brin_xlog.c `brin_mask` |
///
/// Visibility-map pages mask nothing but `pd_checksum`: their bits are WAL-logged. The
/// differences PostgreSQL's redo itself leaves are [`Exception`]s, returned so callers count
/// them.
pub fn compare_page(kind: PageKind, tag: &BufferTag, rebuilt: &[u8], disk: &[u8]) -> PageMatch {
    let (mut ours, mut theirs) = (rebuilt.to_vec(), disk.to_vec());
    if tag.rel.fork == ForkNumber::VisibilityMap {
        for page in [&mut ours, &mut theirs] {
            page[8..10].fill(0);
        }
        return match first_difference(&ours, &theirs) {
            None => PageMatch::Equal,
            Some(_) if ours[..24] == theirs[..24] && ours[24..].iter().all(|b| *b == 0) => {
                PageMatch::Exception(Exception::VmWalLogCopy)
            }
            Some(at) => PageMatch::Differs(at),
        };
    }
    adopt_unlogged_lp_dead(kind, &mut ours, &theirs);
    for page in [&mut ours, &mut theirs] {
        let _ = mask_for_standby(kind, page, tag.blkno);
    }
    let Some(at) = first_difference(&ours, &theirs) else { return PageMatch::Equal };
    let main = tag.rel.fork == ForkNumber::Main;
    let equal_but = |mask: fn(&mut [u8])| {
        let (mut a, mut b) = (ours.clone(), theirs.clone());
        mask(&mut a);
        mask(&mut b);
        a == b
    };
    if kind == PageKind::Gist
        && main
        && page_lsn(disk) == GIST_BUILD_LSN
        && page_lsn(rebuilt) > GIST_BUILD_LSN
        && equal_but(|p| p[0..8].fill(0))
    {
        return PageMatch::Exception(Exception::GistBuildLsn);
    }
    if kind == PageKind::SpGist && main && tag.blkno == 0 && equal_but(mask_spgist_meta_cache) {
        return PageMatch::Exception(Exception::SpGistMetaCache);
    }
    if kind == PageKind::Sequence && main && equal_but(mask_sequence_values) {
        if let (Some((ours_last, ours_cnt)), Some((last, cnt))) = (sequence_values(rebuilt), sequence_values(disk)) {
            // The compute has `cnt` values left of those the record logged: the record's value
            // is `cnt` steps (of whatever increment) past the compute's.
            let ahead = ours_last.checked_sub(last).unwrap_or(0);
            let steps = ahead.checked_div(cnt).unwrap_or(0);
            if ours_cnt == 0 && (1..=SEQ_LOG_VALS).contains(&cnt) && steps != 0 && steps.checked_mul(cnt) == Some(ahead)
            {
                return PageMatch::Exception(Exception::SequenceAhead);
            }
        }
    }
    PageMatch::Differs(at)
}

/// `SEQ_LOG_VALS` (sequence.c): how many values `nextval` logs ahead.
const SEQ_LOG_VALS: i64 = 32;

/// Where a sequence page's one tuple's data begins (`last_value` int8, `log_cnt` int8,
/// `is_called` bool), if it lies within the page.
fn sequence_data(page: &[u8]) -> Option<usize> {
    let lp = u32::from_le_bytes(page.get(24..28)?.try_into().ok()?);
    let off = (lp & 0x7fff) as usize;
    let data = off + *page.get(off + 22)? as usize;
    (data + 17 <= page.len()).then_some(data)
}

/// A sequence page's `last_value` and `log_cnt`.
fn sequence_values(page: &[u8]) -> Option<(i64, i64)> {
    let data = sequence_data(page)?;
    let at = |o: usize| page[data + o..data + o + 8].try_into().ok().map(i64::from_le_bytes);
    Some((at(0)?, at(8)?))
}

/// Masks a sequence page's `last_value` and `log_cnt` (`is_called` stays).
fn mask_sequence_values(page: &mut [u8]) {
    if let Some(data) = sequence_data(page) {
        page[data..data + 16].fill(0);
    }
}

/// Masks the last-used-pages cache of an SP-GiST metapage (block 0): after the page header
/// and the magic number, 8 × (blkno u32, freeSpace i32).
fn mask_spgist_meta_cache(page: &mut [u8]) {
    page[28..28 + 8 * 8].fill(0);
}

/// `GLOBALTABLESPACE_OID`: the shared catalogs' tablespace.
pub const GLOBALTABLESPACE_OID: u32 = 1664;

/// Block `blkno` of fork `fork` of relfilenode `relnode` in database `postgres`.
pub fn block(relnode: u32, fork: ForkNumber, blkno: u32) -> BufferTag {
    BufferTag {
        rel: neon_types::RelTag { node: neon_types::RelFileNode { spcnode: 1663, dbnode: 5, relnode }, fork },
        blkno,
    }
}

/// For every relation [`relations`] lists whose name starts with `prefix`, main and VM
/// forks: the store's size at `lsn` equals the file's under `data` (a main fork's file and
/// the store's fork must both exist, or — in a past snapshot, for a relation whose current
/// file came later — both be missing), and every page equals the file's ([`compare_page`]).
pub fn compare_store_at(
    c: &Cluster,
    repo: &sidecar::repo::timeline::Timeline,
    redo: &dyn sidecar::walredo::WalRedoManager,
    data: &Path,
    lsn: Lsn,
    prefix: &str,
) -> Result<Compared> {
    use anyhow::Context;
    use sidecar::repo::reconstruct::{get_page, rel_size};
    let rels = relations(c)?;
    let mut done = Compared::default();
    for rel in rels.values().filter(|r| r.name.starts_with(prefix)) {
        for fork in [ForkNumber::Main, ForkNumber::VisibilityMap] {
            let tag = |blkno| BufferTag { rel: RelTag { node: rel.node, fork }, blkno };
            let path = fork_path(data, &rel.path, fork);
            let (file, ours) = match (std::fs::read(&path), rel_size(repo, &tag(0).rel, lsn)?) {
                (Ok(file), Some(ours)) => (file, ours as usize),
                // A visibility map is made when first needed; a past snapshot lacks the files
                // of relations (re)written since: neither side has the fork then.
                (Err(e), None)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && (fork == ForkNumber::VisibilityMap || data != c.data_dir()) =>
                {
                    continue
                }
                (file, ours) => anyhow::bail!(
                    "{} {fork} at {lsn}: the store's fork {}, the compute's file {}: {}",
                    rel.name,
                    ours.map_or("is missing".to_string(), |n| format!("has {n} blocks")),
                    path.display(),
                    file.map_or_else(|e| e.to_string(), |f| format!("{} blocks", f.len() / BLCKSZ))
                ),
            };
            anyhow::ensure!(
                ours == file.len() / BLCKSZ,
                "{} {fork} at {lsn}: size {ours}, the file has {} blocks",
                rel.name,
                file.len() / BLCKSZ
            );
            for blkno in 0..ours {
                let tag = tag(blkno as u32);
                let page = get_page(repo, redo, tag, lsn).with_context(|| format!("{} {tag} at {lsn}", rel.name))?;
                let disk = &file[blkno * BLCKSZ..(blkno + 1) * BLCKSZ];
                match compare_page(rel.kind, &tag, &page[..], disk) {
                    PageMatch::Equal => {}
                    PageMatch::Exception(e) => done.exceptions.count(e),
                    PageMatch::Differs(at) => {
                        anyhow::bail!("{} {tag} at {lsn}: differs from the compute's page at byte {at}", rel.name)
                    }
                }
                done.pages += 1;
            }
            done.forks += 1;
        }
    }
    anyhow::ensure!(done.pages > 0, "no page of a relation named {prefix}* compared at {lsn}");
    Ok(done)
}
