//! From decoded WAL records to page-store values, keyed by the record's end LSN (DESIGN.md §5).
//!
//! * Relation blocks: for every block a page-level record references, the restored full-page
//!   image (stamped with the record's end LSN, and what redo still does after restoring it, as
//!   redo does) or the record itself (marked `will_init` when redo needs no earlier page); the
//!   Rust-native visibility-map records derived from heap records.
//! * Free-space map forks are not kept (see the import).
//! * Relation sizes grow with the highest block referenced (extending a relation is not
//!   WAL-logged). SMGR CREATE makes a fork exist (empty); SMGR TRUNCATE shrinks the main fork
//!   and the visibility map (clearing the bits of removed blocks on its last page, a native
//!   record); a commit (or an aborted transaction's abort) drops the relations it lists: their
//!   sizes become "does not exist" from that LSN on, while earlier LSNs still read them.
//! * Databases: CREATE (WAL_LOG: the entry only, pages follow as records; FILE_COPY: per
//!   tablespace, a copy source that reads through to the source as of the copy, see `meta`) and
//!   DROP of the database's directories in some tablespaces (every relation and relation map
//!   there go with them; the database itself with its default one). Relation maps from RELMAP
//!   UPDATE. Tablespaces from TBLSPC CREATE and DROP.
//! * SLRU pages (CLOG, multixact offsets and members): the native records `derive` makes of
//!   commits, aborts and multixact creation; zero-page records as images of zeroes;
//!   truncations as tombstones for the pages of removed segments.
//! * Two-phase state: a PREPARE record's main data is the state file's body; COMMIT/ABORT
//!   PREPARED end it.
//! * Checkpoint counters, as redo keeps them: every xid seen moves nextXid, NEXTOID sets
//!   nextOid, multixact creation moves nextMulti/offset, checkpoint records set or advance the
//!   rest; stored whenever they change. They are known once a checkpoint record or an import
//!   has provided a starting point.

use super::compaction::ChainTracker;
use super::key::Key;
use super::meta::{self, db_spc_key, CopySource, DatabaseEntry, META_CHECKPOINT, META_DATABASE, META_DB_COPY};
use super::meta::{META_RELMAP, META_TABLESPACE, META_TWOPHASE};
use super::meta::{SLRU_CLOG, SLRU_MULTIXACT_MEMBERS, SLRU_MULTIXACT_OFFSETS};
use super::timeline::{FiledRecord, RepoError, Timeline};
use super::value::Value;
use super::{reconstruct, slru};
use crate::wal::checkpoint::{CheckPoint, SIZEOF_CHECKPOINT};
use crate::wal::consts::*;
use crate::wal::record::DecodedRecord;
use crate::walredo::derive::{native_records, parse_xact_abort, parse_xact_commit, ParsedXact, RecordName};
use crate::walredo::native::{next_multixact, NativeRecord, NativeTarget, VM_HEAPBLOCKS_PER_PAGE};
use bytes::Bytes;
use neon_types::page::{page_is_new, set_page_lsn};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use std::collections::HashMap;

/// What redo still does to a page after restoring its full-page image: the one case in PG15 is
/// GiST's left child of a split (`gistRedoClearFollowRight`, block 1 of PAGE_UPDATE and block 0
/// of PAGE_SPLIT), whose NSN and cleared `F_FOLLOW_RIGHT` are set after `XLogInsert` took the
/// image (gist.c, `gistplacetopage`). Hash's split records also act on `BLK_RESTORED`, but set
/// values that the image already holds (hashpage.c sets them before `XLogInsert`).
fn redo_after_image(rec: &DecodedRecord, block_id: u8, page: &mut [u8; BLCKSZ]) {
    let left_child = match (rec.header.rmid, rec.header.info & 0xF0) {
        (RM_GIST_ID, XLOG_GIST_PAGE_UPDATE) => 1,
        (RM_GIST_ID, XLOG_GIST_PAGE_SPLIT) => 0,
        _ => return,
    };
    if block_id != left_child {
        return;
    }
    // GISTPageOpaqueData at pd_special: nsn (as pd_lsn), rightlink u32, flags u16, page id u16.
    let special = usize::from(neon_types::page::header_u16(page, 16));
    if special + 16 > BLCKSZ {
        return; // not a GiST page: redo would fail on it too; leave the image as logged
    }
    set_page_lsn(&mut page[special..special + 8], rec.end_lsn);
    let flags = u16::from_le_bytes([page[special + 12], page[special + 13]]) & !GIST_F_FOLLOW_RIGHT;
    page[special + 12..special + 14].copy_from_slice(&flags.to_le_bytes());
}

/// `F_FOLLOW_RIGHT` (access/gist.h): the page to the right has no downlink yet.
const GIST_F_FOLLOW_RIGHT: u16 = 1 << 3;

const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
const SMGR_TRUNCATE_VM: u32 = 0x0002;

/// Why a record could not be filed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("record at {lsn}: restoring the image of {tag}: {source}")]
    Image { lsn: Lsn, tag: BufferTag, source: crate::wal::image::ImageError },
    #[error(transparent)]
    Derive(#[from] crate::walredo::derive::DeriveError),
    #[error("record at {lsn} ({what}): main data is {have} bytes, needs {need}")]
    Truncated { lsn: Lsn, what: &'static str, have: usize, need: usize },
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// Little-endian fields of a record's main data, with the record named in errors.
struct Fields<'a> {
    data: &'a [u8],
    lsn: Lsn,
    what: &'static str,
}

impl Fields<'_> {
    fn need(&self, n: usize) -> Result<(), IngestError> {
        if self.data.len() < n {
            return Err(IngestError::Truncated { lsn: self.lsn, what: self.what, have: self.data.len(), need: n });
        }
        Ok(())
    }

    fn u32(&self, at: usize) -> Result<u32, IngestError> {
        self.need(at + 4)?;
        Ok(u32::from_le_bytes(self.data[at..at + 4].try_into().expect("4 bytes")))
    }

    fn node(&self, at: usize) -> Result<RelFileNode, IngestError> {
        Ok(RelFileNode { spcnode: self.u32(at)?, dbnode: self.u32(at + 4)?, relnode: self.u32(at + 8)? })
    }
}

/// A commit or abort record (prepared or not), parsed; `None` for any other record.
fn parse_xact_end(rec: &DecodedRecord) -> Result<Option<ParsedXact<'_>>, IngestError> {
    if rec.header.rmid != RM_XACT_ID {
        return Ok(None);
    }
    let (info, data) = (rec.header.info, rec.main_data());
    let name = RecordName::of(rec.header.rmid, info, rec.lsn);
    Ok(match info & XLOG_XACT_OPMASK {
        XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED => Some(parse_xact_commit(info, data, name)?),
        XLOG_XACT_ABORT | XLOG_XACT_ABORT_PREPARED => Some(parse_xact_abort(info, data, name)?),
        _ => None,
    })
}

/// Files records into a repository, keeping relation sizes and the checkpoint counters.
#[derive(Default)]
pub struct Ingest {
    sizes: HashMap<RelTag, u32>,
    /// `None` until loaded from the store or set by a checkpoint record.
    checkpoint: Option<CheckPoint>,
    checkpoint_loaded: bool,
    chains: Option<ChainTracker>,
}

impl Ingest {
    pub fn new() -> Ingest {
        Ingest::default()
    }

    /// Also counts each page's chain of values, for [`Ingest::take_long_chains`].
    pub fn with_chain_limit(limit: u32) -> Ingest {
        Ingest { chains: Some(ChainTracker::new(limit)), ..Ingest::default() }
    }

    /// Page keys whose chain of values reached the limit since the last call: candidates
    /// for an image layer.
    pub fn take_long_chains(&mut self) -> Vec<Key> {
        self.chains.as_mut().map(|c| c.take_long()).unwrap_or_default()
    }

    /// Gives back keys from [`Ingest::take_long_chains`] that could not be handled yet.
    pub fn return_long_chains(&mut self, keys: Vec<Key>) {
        if let Some(c) = &mut self.chains {
            c.give_back(keys);
        }
    }

    fn put(&mut self, repo: &Timeline, key: Key, lsn: Lsn, value: Value) {
        if let Some(chains) = &mut self.chains {
            chains.note(key, &value);
        }
        repo.put(key, lsn, value);
    }

    /// The size of a relation fork as of the last record filed, in blocks.
    pub fn rel_size(&self, rel: &RelTag) -> Option<u32> {
        self.sizes.get(rel).copied()
    }

    pub fn ingest(&mut self, repo: &Timeline, rec: &DecodedRecord) -> Result<(), IngestError> {
        let lsn = rec.end_lsn;
        // A transaction's end matters to relations, two-phase state and the counters alike:
        // parsed once here.
        let xact = parse_xact_end(rec)?;
        if let Some(x) = &xact {
            repo.note_commit(rec.lsn, lsn, neon_types::PgTime(x.xact_time));
        }
        self.relation_life_cycle(repo, rec, xact.as_ref())?;
        self.cluster_metadata(repo, rec, xact.as_ref())?;
        for (target, record) in native_records(&rec.view())? {
            let key = match target {
                NativeTarget::VisibilityMap(tag) => {
                    self.grow(repo, tag.rel, tag.blkno, lsn)?;
                    Key::rel_block(&tag)
                }
                NativeTarget::Clog { pageno } => Key::slru_page(SLRU_CLOG, pageno),
                NativeTarget::MultiXactOffsets { pageno } => Key::slru_page(SLRU_MULTIXACT_OFFSETS, pageno),
                NativeTarget::MultiXactMembers { pageno } => Key::slru_page(SLRU_MULTIXACT_MEMBERS, pageno),
            };
            let value = if record.will_init() {
                Value::Image(Bytes::from(vec![0u8; BLCKSZ]))
            } else {
                let mut b = Vec::new();
                record.encode(&mut b);
                Value::Native(Bytes::from(b))
            };
            self.put(repo, key, lsn, value);
        }
        if neon_types::walredo::is_page_level(rec.header.rmid, rec.header.info) {
            // Free-space maps are not WAL-logged (a WAL_LOG database copy logs their pages once,
            // but nothing keeps them current afterwards): the store has none, and PostgreSQL
            // rebuilds them as it goes.
            for b in rec.blocks.iter().filter(|b| b.tag.rel.fork != ForkNumber::Fsm) {
                let value = match b.image.as_ref().filter(|i| i.apply()) {
                    Some(img) => {
                        let mut page = vec![0u8; BLCKSZ];
                        let out: &mut [u8; BLCKSZ] = (&mut page[..]).try_into().expect("BLCKSZ");
                        rec.restore_image(img, out).map_err(|source| IngestError::Image { lsn, tag: b.tag, source })?;
                        // Redo stamps a restored image with the record's end LSN (unless the
                        // page is new), as XLogReadBufferForRedoExtended does: a page whose
                        // last change was this image must carry it, or a GiST scan compares a
                        // child's NSN with a stale parent LSN and follows a split twice.
                        if !page_is_new(out) {
                            set_page_lsn(out, lsn);
                            redo_after_image(rec, b.block_id, out);
                        }
                        Value::Image(Bytes::from(page))
                    }
                    None => Value::WalRecord { will_init: b.will_init(), raw: rec.raw.clone() },
                };
                self.put(repo, Key::rel_block(&b.tag), lsn, value);
                self.grow(repo, b.tag.rel, b.tag.blkno, lsn)?;
            }
        }
        self.counters(repo, rec, xact.as_ref())?;
        repo.advance_record(FiledRecord { start: rec.lsn, end: lsn, crc: rec.header.crc });
        Ok(())
    }

    fn relation_life_cycle(
        &mut self,
        repo: &Timeline,
        rec: &DecodedRecord,
        xact: Option<&ParsedXact<'_>>,
    ) -> Result<(), IngestError> {
        let (lsn, info) = (rec.end_lsn, rec.header.info);
        let f = |what| Fields { data: rec.main_data(), lsn: rec.lsn, what };
        match rec.header.rmid {
            RM_SMGR_ID => match info & 0xF0 {
                XLOG_SMGR_CREATE => {
                    // xl_smgr_create: RelFileNode | ForkNumber (i32)
                    let d = f("SMGR CREATE");
                    let fork = ForkNumber::try_from(d.u32(12)? as u8).ok().filter(|f| *f != ForkNumber::Fsm);
                    if let Some(fork) = fork {
                        self.set_size(repo, RelTag { node: d.node(0)?, fork }, Some(0), lsn);
                    }
                }
                XLOG_SMGR_TRUNCATE => {
                    // xl_smgr_truncate: BlockNumber | RelFileNode | int flags
                    let d = f("SMGR TRUNCATE");
                    let (blkno, node, flags) = (d.u32(0)?, d.node(4)?, d.u32(16)?);
                    if flags & SMGR_TRUNCATE_HEAP != 0 {
                        self.set_size(repo, RelTag { node, fork: ForkNumber::Main }, Some(blkno), lsn);
                    }
                    if flags & SMGR_TRUNCATE_VM != 0 {
                        self.truncate_vm(repo, node, blkno, lsn)?;
                    }
                }
                _ => {}
            },
            RM_XACT_ID => {
                for node in xact.iter().flat_map(|p| p.relfilenodes()) {
                    self.drop_relation(repo, node, lsn)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn truncate_vm(
        &mut self,
        repo: &Timeline,
        node: RelFileNode,
        heap_blocks: u32,
        lsn: Lsn,
    ) -> Result<(), IngestError> {
        let partial = !heap_blocks.is_multiple_of(VM_HEAPBLOCKS_PER_PAGE);
        let vm = heap_blocks / VM_HEAPBLOCKS_PER_PAGE + u32::from(partial);
        let rel = RelTag { node, fork: ForkNumber::VisibilityMap };
        if let Some(n) = self.current_size(repo, rel, lsn)? {
            if partial && vm <= n {
                // The boundary page keeps only the bits of remaining blocks.
                let mut b = Vec::new();
                NativeRecord::TruncateVisibilityMap { heap_blocks }.encode(&mut b);
                let tag = BufferTag { rel, blkno: vm - 1 };
                self.put(repo, Key::rel_block(&tag), lsn, Value::Native(Bytes::from(b)));
            }
            if n > vm {
                self.set_size(repo, rel, Some(vm), lsn);
            }
        }
        Ok(())
    }

    fn drop_relation(&mut self, repo: &Timeline, node: RelFileNode, lsn: Lsn) -> Result<(), IngestError> {
        for fork in ForkNumber::ALL {
            let rel = RelTag { node, fork };
            if self.current_size(repo, rel, lsn)?.is_some() {
                self.set_size(repo, rel, None, lsn);
            }
        }
        Ok(())
    }

    fn cluster_metadata(
        &mut self,
        repo: &Timeline,
        rec: &DecodedRecord,
        xact: Option<&ParsedXact<'_>>,
    ) -> Result<(), IngestError> {
        let (lsn, info) = (rec.end_lsn, rec.header.info);
        let f = |what| Fields { data: rec.main_data(), lsn: rec.lsn, what };
        match (rec.header.rmid, info & 0xF0) {
            (RM_DBASE_ID, XLOG_DBASE_CREATE_WAL_LOG) => {
                // xl_dbase_create_wal_log_rec: db_id | tablespace_id (its default)
                let d = f("DBASE CREATE_WAL_LOG");
                let entry = DatabaseEntry { dbnode: d.u32(0)?, spcnode: d.u32(4)? };
                self.put(repo, Key::meta(META_DATABASE, entry.dbnode), lsn, Value::Image(entry.encode()));
            }
            (RM_DBASE_ID, XLOG_DBASE_CREATE_FILE_COPY) => {
                // xl_dbase_create_file_copy_rec: db_id | tablespace_id | src_db_id | src_tablespace_id,
                // one per tablespace the source has files in. The files were copied before the
                // record was written, with the source database closed to connections: its
                // state at the record's start.
                let d = f("DBASE CREATE_FILE_COPY");
                let (dbnode, spcnode, src_db, src_spc) = (d.u32(0)?, d.u32(4)?, d.u32(8)?, d.u32(12)?);
                let source = CopySource { spcnode: src_spc, dbnode: src_db, lsn: rec.lsn };
                self.put(repo, db_spc_key(META_DB_COPY, dbnode, spcnode), lsn, Value::Image(source.encode()));
                // The copy of the source's default tablespace is the new default (for ALTER
                // DATABASE SET TABLESPACE too: its source is the database itself).
                let src_default = meta::database(repo, src_db, rec.lsn)?.map(|db| db.spcnode);
                if src_default.is_none_or(|s| s == src_spc) {
                    let entry = DatabaseEntry { dbnode, spcnode };
                    self.put(repo, Key::meta(META_DATABASE, dbnode), lsn, Value::Image(entry.encode()));
                }
                // Sizes cached for an earlier database of that OID there no longer hold.
                self.sizes.retain(|rel, _| (rel.node.dbnode, rel.node.spcnode) != (dbnode, spcnode));
            }
            (RM_DBASE_ID, XLOG_DBASE_DROP) => {
                // xl_dbase_drop_rec: db_id | ntablespaces | tablespace_ids[]: the database's
                // directories in those tablespaces are removed (all of them for DROP DATABASE;
                // the old one after ALTER DATABASE SET TABLESPACE).
                let d = f("DBASE DROP");
                let (dbnode, n) = (d.u32(0)?, d.u32(4)? as usize);
                let db = meta::database(repo, dbnode, lsn)?;
                for i in 0..n {
                    let spcnode = d.u32(8 + 4 * i)?;
                    for rel in meta::relations_in(repo, spcnode, dbnode, lsn)?.keys() {
                        self.set_size(repo, *rel, None, lsn);
                    }
                    self.sizes.retain(|rel, _| (rel.node.dbnode, rel.node.spcnode) != (dbnode, spcnode));
                    for item in [META_RELMAP, META_DB_COPY] {
                        self.put(repo, db_spc_key(item, dbnode, spcnode), lsn, Value::Image(Bytes::new()));
                    }
                    if db.is_some_and(|db| db.spcnode == spcnode) {
                        self.put(repo, Key::meta(META_DATABASE, dbnode), lsn, Value::Image(Bytes::new()));
                    }
                }
            }
            (RM_TBLSPC_ID, XLOG_TBLSPC_CREATE) => {
                // xl_tblspc_create_rec: ts_id | ts_path (NUL-terminated; empty: in place)
                let d = f("TBLSPC CREATE");
                let ts = d.u32(0)?;
                let path = &d.data[4..];
                let path = path.split(|b| *b == 0).next().unwrap_or_default();
                let value = meta::tablespace_value(&String::from_utf8_lossy(path));
                self.put(repo, Key::meta(META_TABLESPACE, ts), lsn, Value::Image(value));
            }
            (RM_TBLSPC_ID, XLOG_TBLSPC_DROP) => {
                // xl_tblspc_drop_rec: ts_id
                let ts = f("TBLSPC DROP").u32(0)?;
                self.put(repo, Key::meta(META_TABLESPACE, ts), lsn, Value::Image(Bytes::new()));
            }
            (RM_RELMAP_ID, XLOG_RELMAP_UPDATE) => {
                // xl_relmap_update: dbid | tsid | int32 nbytes | data
                let d = f("RELMAP UPDATE");
                let (dbid, tsid, n) = (d.u32(0)?, d.u32(4)?, d.u32(8)? as usize);
                d.need(12 + n)?;
                let key = db_spc_key(META_RELMAP, dbid, tsid);
                self.put(repo, key, lsn, Value::Image(Bytes::copy_from_slice(&d.data[12..12 + n])));
            }
            (RM_XACT_ID, _) => match info & XLOG_XACT_OPMASK {
                XLOG_XACT_PREPARE => {
                    // The main data is the two-phase state file without its CRC.
                    let body = rec.main_data_bytes();
                    self.put(repo, Key::meta(META_TWOPHASE, rec.header.xid), lsn, Value::Image(body));
                }
                XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED => {
                    if let Some(xid) = xact.and_then(|p| p.twophase_xid) {
                        self.put(repo, Key::meta(META_TWOPHASE, xid), lsn, Value::Image(Bytes::new()));
                    }
                }
                _ => {}
            },
            (RM_CLOG_ID, CLOG_TRUNCATE) => {
                // xl_clog_truncate: int pageno | oldestXact | oldestXactDb
                let cutoff = f("CLOG TRUNCATE").u32(0)?;
                self.truncate_slru(repo, SLRU_CLOG, lsn, |p| slru::clog_truncates(cutoff, p))?;
            }
            (RM_MULTIXACT_ID, XLOG_MULTIXACT_TRUNCATE_ID) => {
                // xl_multixact_truncate: oldestMultiDB | startTruncOff | endTruncOff |
                // startTruncMemb | endTruncMemb
                let d = f("MULTIXACT TRUNCATE_ID");
                let (end_off, start_memb, end_memb) = (d.u32(8)?, d.u32(12)?, d.u32(16)?);
                self.truncate_slru(repo, SLRU_MULTIXACT_OFFSETS, lsn, |p| slru::offsets_truncates(end_off, p))?;
                self.truncate_slru(repo, SLRU_MULTIXACT_MEMBERS, lsn, |p| {
                    slru::members_truncates(start_memb, end_memb, p)
                })?;
            }
            _ => {}
        }
        Ok(())
    }

    fn truncate_slru(
        &mut self,
        repo: &Timeline,
        which: u32,
        lsn: Lsn,
        gone: impl Fn(u32) -> bool,
    ) -> Result<(), IngestError> {
        for page in meta::slru_pages(repo, which, lsn)?.into_iter().filter(|p| gone(*p)) {
            self.put(repo, Key::slru_page(which, page), lsn, Value::Image(Bytes::new()));
        }
        Ok(())
    }

    /// Keeps the checkpoint counters as redo keeps `ShmemVariableCache`, storing them when
    /// they change.
    fn counters(
        &mut self,
        repo: &Timeline,
        rec: &DecodedRecord,
        xact: Option<&ParsedXact<'_>>,
    ) -> Result<(), IngestError> {
        let (lsn, info) = (rec.end_lsn, rec.header.info);
        if !self.checkpoint_loaded {
            self.checkpoint = meta::checkpoint(repo, rec.lsn)?;
            self.checkpoint_loaded = true;
        }
        let f = |what| Fields { data: rec.main_data(), lsn: rec.lsn, what };
        let mut changed = false;
        match (rec.header.rmid, info & 0xF0) {
            (RM_XLOG_ID, op @ (XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE)) => {
                f("CHECKPOINT").need(SIZEOF_CHECKPOINT)?;
                let record = CheckPoint::decode(&rec.main_data()[..SIZEOF_CHECKPOINT]).expect("checked size");
                let shutdown = op == XLOG_CHECKPOINT_SHUTDOWN;
                match &mut self.checkpoint {
                    Some(cp) => cp.apply_checkpoint_record(&record, shutdown),
                    None => self.checkpoint = Some(record),
                }
                changed = true;
            }
            (RM_XLOG_ID, XLOG_NEXTOID) => {
                let oid = f("NEXTOID").u32(0)?;
                if let Some(cp) = &mut self.checkpoint {
                    cp.next_oid = oid;
                    changed = true;
                }
            }
            (RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID) => {
                // xl_multixact_create: mid | moff | int32 nmembers | members
                let d = f("MULTIXACT CREATE_ID");
                let (mid, moff, n) = (d.u32(0)?, d.u32(4)?, d.u32(8)?);
                if let Some(cp) = &mut self.checkpoint {
                    changed |= cp.advance_next_multi(next_multixact(mid), moff.wrapping_add(n));
                }
            }
            (RM_MULTIXACT_ID, XLOG_MULTIXACT_TRUNCATE_ID) => {
                let d = f("MULTIXACT TRUNCATE_ID");
                let (db, end_off) = (d.u32(0)?, d.u32(8)?);
                if let Some(cp) = &mut self.checkpoint {
                    cp.oldest_multi = end_off;
                    cp.oldest_multi_db = db;
                    changed = true;
                }
            }
            _ => {}
        }
        if let Some(cp) = &mut self.checkpoint {
            changed |= cp.advance_next_xid_past(rec.header.xid);
            for xid in xact.iter().flat_map(|p| p.subxacts().chain(p.twophase_xid)) {
                changed |= cp.advance_next_xid_past(xid);
            }
        }
        if changed {
            let cp = self.checkpoint.as_ref().expect("changed only when known");
            self.put(repo, Key::meta(META_CHECKPOINT, 0), lsn, Value::Image(Bytes::copy_from_slice(&cp.encode())));
        }
        Ok(())
    }

    /// The size of a fork as of the records filed so far (consulting the store after a restart).
    fn current_size(&mut self, repo: &Timeline, rel: RelTag, lsn: Lsn) -> Result<Option<u32>, IngestError> {
        if let Some(n) = self.sizes.get(&rel) {
            return Ok(Some(*n));
        }
        let stored = reconstruct::rel_size(repo, &rel, lsn)?;
        if let Some(n) = stored {
            self.sizes.insert(rel, n);
        }
        Ok(stored)
    }

    /// Files a new size (`None`: the fork no longer exists).
    fn set_size(&mut self, repo: &Timeline, rel: RelTag, size: Option<u32>, lsn: Lsn) {
        let value = match size {
            Some(n) => {
                self.sizes.insert(rel, n);
                Bytes::copy_from_slice(&n.to_le_bytes())
            }
            None => {
                self.sizes.remove(&rel);
                Bytes::new()
            }
        };
        self.put(repo, Key::rel_size(&rel), lsn, Value::Image(value));
    }

    fn grow(&mut self, repo: &Timeline, rel: RelTag, blkno: u32, lsn: Lsn) -> Result<(), IngestError> {
        let size = self.current_size(repo, rel, lsn)?.unwrap_or(0);
        if blkno + 1 > size {
            self.set_size(repo, rel, Some(blkno + 1), lsn);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::testing::{build_record, TestBlock};

    /// A GiST page as `gistplacetopage` leaves the left half of a split before the parent's
    /// downlink exists: `F_FOLLOW_RIGHT` set, an old NSN, a page id, one dummy item.
    fn gist_left_half() -> Vec<u8> {
        let mut page = vec![0u8; BLCKSZ];
        let special = BLCKSZ - 16;
        page[12..14].copy_from_slice(&28u16.to_le_bytes()); // pd_lower: one line pointer
        page[14..16].copy_from_slice(&((special - 16) as u16).to_le_bytes()); // pd_upper
        page[16..18].copy_from_slice(&(special as u16).to_le_bytes()); // pd_special
        page[18..20].copy_from_slice(&(8192u16 | 4).to_le_bytes()); // size | layout version
        page[special..special + 8].copy_from_slice(&[0, 0, 0, 0, 0x40, 0, 0, 0]); // nsn 0/40
        page[special + 8..special + 12].copy_from_slice(&7u32.to_le_bytes()); // rightlink
        page[special + 12..special + 14].copy_from_slice(&(GIST_F_FOLLOW_RIGHT | 1).to_le_bytes()); // + F_LEAF
        page[special + 14..special + 16].copy_from_slice(&0xFF81u16.to_le_bytes()); // GIST_PAGE_ID
        page[special - 16..special].fill(0xAB);
        page
    }

    /// The page filed for `blkno` after ingesting one GiST record of kind `info` whose block
    /// `image_block` carries [`gist_left_half`] as its full-page image.
    fn filed_after(info: u8, image_block: u8) -> (Lsn, Vec<u8>, Vec<u8>) {
        let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        let image = gist_left_half();
        let blocks: Vec<TestBlock> = (0..2u8)
            .map(|id| TestBlock {
                id,
                node,
                fork: 0,
                blkno: 10 + u32::from(id),
                data: if id == image_block { vec![] } else { vec![1, 2, 3, 4] },
                image: (id == image_block).then(|| (BKPIMAGE_APPLY, 0, 0, image.clone())),
                same_rel: id > 0,
                will_init: false,
            })
            .collect();
        let raw = build_record(RM_GIST_ID, info, 0, Lsn(0), &blocks, &[0u8; 4]);
        let (start, end) = (Lsn(0x0100_0028), Lsn(0x0100_0028 + raw.len() as u64));
        let rec = DecodedRecord::parse(start, end, Bytes::from(raw)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let t = Timeline::open(dir.path()).unwrap();
        t.begin_history(Lsn(0x0100_0000));
        Ingest::new().ingest(&t, &rec).unwrap();
        let tag = BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno: 10 + u32::from(image_block) };
        let values = t.values_for(Key::rel_block(&tag), end).unwrap();
        let [(at, Value::Image(page))] = &values[..] else { panic!("{values:?}") };
        assert_eq!(*at, end);
        (end, image, page.to_vec())
    }

    /// `gistRedoClearFollowRight` (gistxlog.c) runs on a restored image too: NSN and LSN become
    /// the record's end, `F_FOLLOW_RIGHT` goes; nothing else changes.
    #[test]
    fn a_gist_left_child_image_gets_what_redo_does_after_restoring_it() {
        for (info, left_child) in [(XLOG_GIST_PAGE_UPDATE, 1), (XLOG_GIST_PAGE_SPLIT, 0)] {
            let (end, mut expected, page) = filed_after(info, left_child);
            let special = BLCKSZ - 16;
            set_page_lsn(&mut expected, end);
            set_page_lsn(&mut expected[special..], end);
            expected[special + 12] &= !(GIST_F_FOLLOW_RIGHT as u8);
            assert_eq!(page, expected, "info {info:#x}");
        }
    }

    /// Any other block's image is the logged page but for its LSN.
    #[test]
    fn other_gist_images_are_restored_as_logged() {
        for (info, other) in [(XLOG_GIST_PAGE_UPDATE, 0), (XLOG_GIST_PAGE_SPLIT, 1)] {
            let (end, mut expected, page) = filed_after(info, other);
            set_page_lsn(&mut expected, end);
            assert_eq!(page, expected, "info {info:#x}");
        }
    }
}
