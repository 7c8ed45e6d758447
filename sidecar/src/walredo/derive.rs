//! From decoded WAL to Rust-native records: which records imply changes the sidecar makes
//! itself (see [`native`](super::native)), and what those changes are, page by page.
//!
//! * XACT COMMIT / COMMIT_PREPARED: the transaction and its committed subtransactions become
//!   COMMITTED in the CLOG. PostgreSQL marks subtransactions on other CLOG pages
//!   SUB_COMMITTED first, then the parent, then everything COMMITTED
//!   (`TransactionIdSetTreeStatus`); only the end state reaches a page anyone reads, so that
//!   is what we record. ABORT / ABORT_PREPARED: all of them ABORTED. The transaction is the
//!   record's `xl_xid`, except for the *_PREPARED records, where it is the prepared
//!   transaction's, carried in `xl_xact_twophase` (`xact_redo` does the same).
//! * XACT PREPARE / ASSIGNMENT / INVALIDATIONS: no CLOG change (ASSIGNMENT only feeds a
//!   standby's in-memory subtransaction cache).
//! * CLOG ZEROPAGE, MULTIXACT ZERO_OFF_PAGE / ZERO_MEM_PAGE: [`NativeRecord::SlruZeroPage`].
//!   The TRUNCATE records of both remove whole segments: SLRU page lifecycle, not a page
//!   change, so they yield nothing here.
//! * MULTIXACT CREATE_ID: `RecordNewMultiXact` split by page — the offsets page(s) of the
//!   multixact and of the next one, and one members record per members page spanned.
//! * Heap INSERT, DELETE, UPDATE, HOT_UPDATE, LOCK and Heap2 MULTI_INSERT, LOCK_UPDATED with
//!   their `XLH_*_CLEARED` flag: `visibilitymap_clear` of the heap block(s) on the `_vm` fork.
//!   The heap record does not reference the VM page, so without this the VM page would never
//!   learn about it. INSERT/DELETE/UPDATE clear both bits (`VISIBILITYMAP_VALID_BITS`); LOCK
//!   clears only `VISIBILITYMAP_ALL_FROZEN` (the page stays all-visible), as
//!   `heap_xlog_lock` / `heap_xlog_lock_updated` do.
//!
//! Each WAL record yields at most one native record per target, so `(target, end LSN)` is a
//! unique key for the repository.
//!
//! Commit and abort records are parsed as `ParseCommitRecord` / `ParseAbortRecord`
//! (src/backend/access/rmgrdesc/xactdesc.c) do; [`parse_xact_commit`] and
//! [`parse_xact_abort`] expose the result, which ingest also needs (relations to drop,
//! two-phase state to forget).

use super::native::{
    clog_page, member_page, mxoff_page, next_multixact, vm_target, MultiXactMember, NativeRecord, NativeTarget,
    XactStatus, MAX_MULTIXACT_STATUS, VISIBILITYMAP_ALL_FROZEN, VISIBILITYMAP_VALID_BITS,
};
use crate::wal::consts::*;
use crate::wal::record::RecordView;
use crate::wal::rmgr::record_type;
use crate::wal::rmgr::RmgrId;
use neon_types::{BufferTag, Lsn, Oid, RelFileNode, TransactionId};
use smallvec::smallvec;
use std::fmt;

/// The first normal transaction id; 0..=2 are invalid, bootstrap and frozen, and never get a
/// CLOG status (`FirstNormalTransactionId`).
pub const FIRST_NORMAL_TRANSACTION_ID: TransactionId = 3;

/// Which record an error is about: where it starts, and its rmgr and type as `pg_waldump`
/// names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordName {
    pub lsn: Lsn,
    pub rmgr: &'static str,
    pub kind: &'static str,
}

impl RecordName {
    /// Names the record with `xl_rmid`, `xl_info` starting at `lsn`.
    pub fn of(rmid: u8, xl_info: u8, lsn: Lsn) -> RecordName {
        RecordName {
            lsn,
            rmgr: RmgrId::from_u8(rmid).map(RmgrId::name).unwrap_or("custom"),
            kind: record_type(rmid, xl_info).unwrap_or("UNKNOWN"),
        }
    }
}

impl fmt::Display for RecordName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} record at {}", self.rmgr, self.kind, self.lsn)
    }
}

/// Why a record's contents cannot be turned into native records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeriveError {
    #[error("{record}: main data ends in {what} (needs {need} bytes, has {have})")]
    Truncated { record: RecordName, what: &'static str, need: usize, have: usize },
    #[error("{record}: negative {what} count {value}")]
    NegativeCount { record: RecordName, what: &'static str, value: i32 },
    #[error("{record}: negative SLRU page number {value}")]
    NegativePage { record: RecordName, value: i32 },
    #[error("{record}: the two-phase GID is not NUL-terminated")]
    UnterminatedGid { record: RecordName },
    #[error("{record}: no XACT_XINFO_HAS_TWOPHASE part naming the prepared transaction")]
    MissingTwoPhaseXid { record: RecordName },
    #[error("{record}: transaction id {xid} cannot have a CLOG status")]
    InvalidXid { record: RecordName, xid: TransactionId },
    #[error("{record}: invalid MultiXactId 0")]
    InvalidMultiXactId { record: RecordName },
    #[error("{record}: member {index} has invalid MultiXactStatus {status}")]
    InvalidMemberStatus { record: RecordName, index: usize, status: u32 },
    #[error("{record}: no block reference {block_id}, which the record's flags require")]
    MissingBlock { record: RecordName, block_id: u8 },
}

/// A commit or abort record's contents (`xl_xact_parsed_commit` / `xl_xact_parsed_abort`).
/// Arrays stay in the record's bytes; the accessors decode them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedXact<'a> {
    pub xact_time: i64,
    /// 0 unless the record has `XLOG_XACT_HAS_INFO`.
    pub xinfo: u32,
    /// `(dbId, tsId)` with `XACT_XINFO_HAS_DBINFO`.
    pub dbinfo: Option<(Oid, Oid)>,
    subxacts: &'a [u8],
    rels: &'a [u8],
    stats: &'a [u8],
    invals: &'a [u8],
    /// The prepared transaction, with `XACT_XINFO_HAS_TWOPHASE`.
    pub twophase_xid: Option<TransactionId>,
    /// Its GID (without the NUL), with `XACT_XINFO_HAS_GID`.
    pub twophase_gid: Option<&'a [u8]>,
    /// `(origin_lsn, origin_timestamp)` with `XACT_XINFO_HAS_ORIGIN`.
    pub origin: Option<(Lsn, i64)>,
}

/// A transactionally dropped statistics entry (`xl_xact_stats_item`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactStatsItem {
    pub kind: i32,
    pub dboid: Oid,
    pub objoid: Oid,
}

/// Size of one `SharedInvalidationMessage` (a 16-byte union).
pub const SIZE_OF_INVAL_MESSAGE: usize = 16;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> ParsedXact<'a> {
    /// The committed (or aborted) subtransactions.
    pub fn subxacts(&self) -> impl ExactSizeIterator<Item = TransactionId> + 'a {
        self.subxacts.chunks_exact(4).map(|c| u32_at(c, 0))
    }

    /// Relations whose files the commit (or abort) drops.
    pub fn relfilenodes(&self) -> impl ExactSizeIterator<Item = RelFileNode> + 'a {
        self.rels.chunks_exact(12).map(|c| RelFileNode {
            spcnode: u32_at(c, 0),
            dbnode: u32_at(c, 4),
            relnode: u32_at(c, 8),
        })
    }

    /// Statistics entries dropped with the transaction.
    pub fn dropped_stats(&self) -> impl ExactSizeIterator<Item = XactStatsItem> + 'a {
        self.stats.chunks_exact(12).map(|c| XactStatsItem {
            kind: u32_at(c, 0) as i32,
            dboid: u32_at(c, 4),
            objoid: u32_at(c, 8),
        })
    }

    /// The shared invalidation messages, raw (16 bytes each); commit records only.
    pub fn inval_messages(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + 'a {
        self.invals.chunks_exact(SIZE_OF_INVAL_MESSAGE)
    }
}

/// Bounds-checked reads through a record's main data, naming the part that ran short.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    record: RecordName,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DeriveError> {
        let have = self.b.len() - self.pos;
        if n > have {
            return Err(DeriveError::Truncated { record: self.record, what, need: n, have });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DeriveError> {
        Ok(u32_at(self.bytes(4, what)?, 0))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DeriveError> {
        let b = self.bytes(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    /// An `int` count followed by `count * size` bytes of array.
    fn array(&mut self, size: usize, what: &'static str) -> Result<&'a [u8], DeriveError> {
        let value = self.u32(what)? as i32;
        let n = usize::try_from(value).map_err(|_| DeriveError::NegativeCount { record: self.record, what, value })?;
        let need = n.saturating_mul(size);
        self.bytes(need, what)
    }
}

/// Parses an `xl_xact_commit` (COMMIT or COMMIT_PREPARED) as `ParseCommitRecord` does.
/// `xl_info` is the record's whole info byte (for `XLOG_XACT_HAS_INFO`).
pub fn parse_xact_commit(xl_info: u8, data: &[u8], record: RecordName) -> Result<ParsedXact<'_>, DeriveError> {
    parse_xact(xl_info, data, record, true)
}

/// Parses an `xl_xact_abort` (ABORT or ABORT_PREPARED) as `ParseAbortRecord` does. Abort
/// records carry no invalidation messages, and `ParseAbortRecord` does not look for any.
pub fn parse_xact_abort(xl_info: u8, data: &[u8], record: RecordName) -> Result<ParsedXact<'_>, DeriveError> {
    parse_xact(xl_info, data, record, false)
}

fn parse_xact(xl_info: u8, data: &[u8], record: RecordName, commit: bool) -> Result<ParsedXact<'_>, DeriveError> {
    // The parts follow each other with no padding: each is a multiple of 4 bytes and needs
    // only 4-byte alignment (xact.h); the GID and what follows it are unaligned, which
    // matters to C, not to byte-wise reads.
    let mut r = Reader { b: data, pos: 0, record };
    let xact_time = r.u64("xact_time")? as i64;
    let xinfo = if xl_info & XLOG_XACT_HAS_INFO != 0 { r.u32("xinfo")? } else { 0 };
    let mut p = ParsedXact {
        xact_time,
        xinfo,
        dbinfo: None,
        subxacts: &[],
        rels: &[],
        stats: &[],
        invals: &[],
        twophase_xid: None,
        twophase_gid: None,
        origin: None,
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        p.dbinfo = Some((r.u32("dbinfo")?, r.u32("dbinfo")?));
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        p.subxacts = r.array(4, "subxacts")?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        p.rels = r.array(12, "relfilenodes")?;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        p.stats = r.array(12, "dropped stats")?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        p.invals = r.array(SIZE_OF_INVAL_MESSAGE, "invalidation messages")?;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE != 0 {
        p.twophase_xid = Some(r.u32("twophase xid")?);
        if xinfo & XACT_XINFO_HAS_GID != 0 {
            let rest = &data[r.pos..];
            let len = rest.iter().position(|&b| b == 0).ok_or(DeriveError::UnterminatedGid { record })?;
            p.twophase_gid = Some(&rest[..len]);
            r.pos += len + 1;
        }
    }
    if xinfo & XACT_XINFO_HAS_ORIGIN != 0 {
        p.origin = Some((Lsn(r.u64("origin")?), r.u64("origin")? as i64));
    }
    Ok(p)
}

/// The native records a WAL record implies, each with the page it applies to. Most records
/// imply none (an empty `Vec` does not allocate).
pub fn native_records(rec: &RecordView<'_>) -> Result<Vec<(NativeTarget, NativeRecord)>, DeriveError> {
    let mut out = Vec::new();
    let xl_info = rec.header.info;
    let name = || RecordName::of(rec.header.rmid, xl_info, rec.lsn);
    let data = rec.main_data();
    match rec.header.rmid {
        RM_XACT_ID => {
            let op = xl_info & XLOG_XACT_OPMASK;
            let (parsed, status) = match op {
                XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED => {
                    (parse_xact_commit(xl_info, data, name())?, XactStatus::Committed)
                }
                XLOG_XACT_ABORT | XLOG_XACT_ABORT_PREPARED => {
                    (parse_xact_abort(xl_info, data, name())?, XactStatus::Aborted)
                }
                _ => return Ok(out),
            };
            let xid = if op == XLOG_XACT_COMMIT_PREPARED || op == XLOG_XACT_ABORT_PREPARED {
                parsed.twophase_xid.ok_or(DeriveError::MissingTwoPhaseXid { record: name() })?
            } else {
                rec.header.xid
            };
            for x in std::iter::once(xid).chain(parsed.subxacts()) {
                if x < FIRST_NORMAL_TRANSACTION_ID {
                    return Err(DeriveError::InvalidXid { record: name(), xid: x });
                }
                let target = NativeTarget::Clog { pageno: clog_page(x) };
                match out.iter_mut().find(|(t, _)| *t == target) {
                    Some((_, NativeRecord::ClogSetStatus { xids, .. })) => xids.push(x),
                    _ => out.push((target, NativeRecord::ClogSetStatus { xids: smallvec![x], status })),
                }
            }
        }
        RM_CLOG_ID if xl_info & XLR_RMGR_INFO_MASK == CLOG_ZEROPAGE => {
            let pageno = slru_pageno(data, name())?;
            out.push((NativeTarget::Clog { pageno }, NativeRecord::SlruZeroPage));
        }
        RM_MULTIXACT_ID => match xl_info & XLR_RMGR_INFO_MASK {
            XLOG_MULTIXACT_ZERO_OFF_PAGE => {
                let pageno = slru_pageno(data, name())?;
                out.push((NativeTarget::MultiXactOffsets { pageno }, NativeRecord::SlruZeroPage));
            }
            XLOG_MULTIXACT_ZERO_MEM_PAGE => {
                let pageno = slru_pageno(data, name())?;
                out.push((NativeTarget::MultiXactMembers { pageno }, NativeRecord::SlruZeroPage));
            }
            XLOG_MULTIXACT_CREATE_ID => multixact_create(data, name(), &mut out)?,
            _ => {}
        },
        RM_HEAP_ID => {
            let clear = match xl_info & XLOG_HEAP_OPMASK {
                XLOG_HEAP_INSERT => {
                    let flags = flags_byte(data, 3, 2, name())?;
                    (flags & XLH_INSERT_ALL_VISIBLE_CLEARED != 0).then_some((0, VISIBILITYMAP_VALID_BITS))
                }
                XLOG_HEAP_DELETE => {
                    let flags = flags_byte(data, 8, 7, name())?;
                    (flags & XLH_DELETE_ALL_VISIBLE_CLEARED != 0).then_some((0, VISIBILITYMAP_VALID_BITS))
                }
                XLOG_HEAP_LOCK => {
                    let flags = flags_byte(data, 8, 7, name())?;
                    (flags & XLH_LOCK_ALL_FROZEN_CLEARED != 0).then_some((0, VISIBILITYMAP_ALL_FROZEN))
                }
                XLOG_HEAP_UPDATE | XLOG_HEAP_HOT_UPDATE => {
                    let flags = flags_byte(data, 14, 7, name())?;
                    if flags & (XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED) == 0 {
                        return Ok(out);
                    }
                    let new = block_tag(rec, 0, name())?;
                    // The old tuple's page is block 1 when it differs from the new one
                    // (never for HOT); heap_xlog_update takes the relation from block 0.
                    let mut old = new;
                    if let Some(b) = rec.blocks.iter().find(|b| b.block_id == 1) {
                        old.blkno = b.tag.blkno;
                    }
                    if flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED != 0 {
                        push_vm_clear(&mut out, &old, VISIBILITYMAP_VALID_BITS);
                    }
                    if flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED != 0 {
                        push_vm_clear(&mut out, &new, VISIBILITYMAP_VALID_BITS);
                    }
                    None
                }
                _ => None,
            };
            if let Some((block_id, flags)) = clear {
                push_vm_clear(&mut out, &block_tag(rec, block_id, name())?, flags);
            }
        }
        RM_HEAP2_ID => {
            let clear = match xl_info & XLOG_HEAP_OPMASK {
                XLOG_HEAP2_MULTI_INSERT => {
                    let flags = flags_byte(data, 4, 0, name())?;
                    (flags & XLH_INSERT_ALL_VISIBLE_CLEARED != 0).then_some(VISIBILITYMAP_VALID_BITS)
                }
                XLOG_HEAP2_LOCK_UPDATED => {
                    let flags = flags_byte(data, 8, 7, name())?;
                    (flags & XLH_LOCK_ALL_FROZEN_CLEARED != 0).then_some(VISIBILITYMAP_ALL_FROZEN)
                }
                _ => None,
            };
            if let Some(flags) = clear {
                push_vm_clear(&mut out, &block_tag(rec, 0, name())?, flags);
            }
        }
        _ => {}
    }
    Ok(out)
}

/// The `int pageno` of a CLOG or multixact zero-page record.
fn slru_pageno(data: &[u8], record: RecordName) -> Result<u32, DeriveError> {
    let mut r = Reader { b: data, pos: 0, record };
    let value = r.u32("pageno")? as i32;
    u32::try_from(value).map_err(|_| DeriveError::NegativePage { record, value })
}

/// The `flags` byte at `at` of a heap record's fixed-size main data of `size` bytes
/// (PostgreSQL reads the whole struct, so a shorter one is corrupt).
fn flags_byte(data: &[u8], size: usize, at: usize, record: RecordName) -> Result<u8, DeriveError> {
    if data.len() < size {
        return Err(DeriveError::Truncated { record, what: "heap record header", need: size, have: data.len() });
    }
    Ok(data[at])
}

fn block_tag(rec: &RecordView<'_>, block_id: u8, record: RecordName) -> Result<BufferTag, DeriveError> {
    rec.blocks
        .iter()
        .find(|b| b.block_id == block_id)
        .map(|b| b.tag)
        .ok_or(DeriveError::MissingBlock { record, block_id })
}

/// Adds a VM clear for `heap` (a heap block), merging with this record's clear of the same
/// VM page.
fn push_vm_clear(out: &mut Vec<(NativeTarget, NativeRecord)>, heap: &BufferTag, flags: u8) {
    let target = vm_target(heap);
    for (t, r) in out.iter_mut() {
        if let (true, NativeRecord::ClearVisibilityMapFlags { heap_blocks, flags: f }) = (*t == target, r) {
            if *f == flags {
                if !heap_blocks.contains(&heap.blkno) {
                    heap_blocks.push(heap.blkno);
                }
                return;
            }
        }
    }
    out.push((target, NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![heap.blkno], flags }));
}

/// `xl_multixact_create`: u32 mid, u32 moff, int32 nmembers, then nmembers
/// `MultiXactMember`s of 8 bytes (u32 xid, `MultiXactStatus` as a 4-byte enum).
fn multixact_create(
    data: &[u8],
    record: RecordName,
    out: &mut Vec<(NativeTarget, NativeRecord)>,
) -> Result<(), DeriveError> {
    let mut r = Reader { b: data, pos: 0, record };
    let mid = r.u32("xl_multixact_create")?;
    let moff = r.u32("xl_multixact_create")?;
    let raw = r.array(8, "multixact members")?;
    if mid == 0 {
        return Err(DeriveError::InvalidMultiXactId { record });
    }
    let nmembers = (raw.len() / 8) as u32;
    let offsets = NativeRecord::MultixactOffsetCreate { mid, moff, nmembers };
    let (page, next_page) = (mxoff_page(mid), mxoff_page(next_multixact(mid)));
    out.push((NativeTarget::MultiXactOffsets { pageno: page }, offsets.clone()));
    if next_page != page {
        out.push((NativeTarget::MultiXactOffsets { pageno: next_page }, offsets));
    }
    // One members record per page, each starting at its first member's offset.
    let mut run: Option<(u32, u32, Vec<MultiXactMember>)> = None;
    let mut off = moff;
    for (index, c) in raw.chunks_exact(8).enumerate() {
        let status = u32_at(c, 4);
        if status > MAX_MULTIXACT_STATUS as u32 {
            return Err(DeriveError::InvalidMemberStatus { record, index, status });
        }
        let member = MultiXactMember { xid: u32_at(c, 0), status: status as u8 };
        let page = member_page(off);
        match &mut run {
            Some((p, _, members)) if *p == page => members.push(member),
            _ => {
                flush_members(out, run.take());
                run = Some((page, off, vec![member]));
            }
        }
        off = off.wrapping_add(1);
    }
    flush_members(out, run);
    Ok(())
}

fn flush_members(out: &mut Vec<(NativeTarget, NativeRecord)>, run: Option<(u32, u32, Vec<MultiXactMember>)>) {
    if let Some((pageno, moff, members)) = run {
        out.push((NativeTarget::MultiXactMembers { pageno }, NativeRecord::MultixactMembersCreate { moff, members }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::record::testing::{build_record, TestBlock};
    use crate::wal::record::DecodedRecord;
    use crate::walredo::native::{apply, member_get, mxoff_get, vm_flags, XactStatus};
    use bytes::Bytes;
    use neon_types::{ForkNumber, RelTag, BLCKSZ};

    fn decode(rmid: u8, info: u8, xid: u32, blocks: &[TestBlock], main: &[u8]) -> DecodedRecord {
        let raw = build_record(rmid, info, xid, Lsn(0), blocks, main);
        let len = raw.len() as u64;
        DecodedRecord::parse(Lsn(0x1000), Lsn(0x1000 + len), Bytes::from(raw)).unwrap()
    }

    fn derive(rmid: u8, info: u8, xid: u32, blocks: &[TestBlock], main: &[u8]) -> Vec<(NativeTarget, NativeRecord)> {
        native_records(&decode(rmid, info, xid, blocks, main).view()).unwrap()
    }

    fn derive_err(rmid: u8, info: u8, xid: u32, blocks: &[TestBlock], main: &[u8]) -> DeriveError {
        native_records(&decode(rmid, info, xid, blocks, main).view()).unwrap_err()
    }

    fn node() -> RelFileNode {
        RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 }
    }

    fn heap_block(id: u8, blkno: u32) -> TestBlock {
        TestBlock { id, node: node(), fork: 0, blkno, data: vec![1], image: None, same_rel: id > 0, will_init: false }
    }

    fn vm(blkno: u32) -> NativeTarget {
        NativeTarget::VisibilityMap(BufferTag { rel: RelTag { node: node(), fork: ForkNumber::VisibilityMap }, blkno })
    }

    /// Builds an xl_xact_commit/abort main data the way XactLogCommitRecord writes it.
    #[derive(Default)]
    struct Xact {
        dbinfo: Option<(u32, u32)>,
        subxacts: Vec<u32>,
        rels: Vec<[u32; 3]>,
        stats: Vec<[u32; 3]>,
        invals: usize,
        twophase: Option<u32>,
        gid: Option<&'static str>,
        origin: Option<(u64, i64)>,
        ae_locks: bool,
    }

    impl Xact {
        fn encode(&self, commit: bool) -> (u8, Vec<u8>) {
            let mut xinfo = 0u32;
            let mut body = Vec::new();
            let put = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_le_bytes());
            if let Some((db, ts)) = self.dbinfo {
                xinfo |= XACT_XINFO_HAS_DBINFO;
                put(&mut body, db);
                put(&mut body, ts);
            }
            if !self.subxacts.is_empty() {
                xinfo |= XACT_XINFO_HAS_SUBXACTS;
                put(&mut body, self.subxacts.len() as u32);
                self.subxacts.iter().for_each(|&x| put(&mut body, x));
            }
            if !self.rels.is_empty() {
                xinfo |= XACT_XINFO_HAS_RELFILENODES;
                put(&mut body, self.rels.len() as u32);
                self.rels.iter().flatten().for_each(|&x| put(&mut body, x));
            }
            if !self.stats.is_empty() {
                xinfo |= XACT_XINFO_HAS_DROPPED_STATS;
                put(&mut body, self.stats.len() as u32);
                self.stats.iter().flatten().for_each(|&x| put(&mut body, x));
            }
            if commit && self.invals > 0 {
                xinfo |= XACT_XINFO_HAS_INVALS;
                put(&mut body, self.invals as u32);
                body.extend(std::iter::repeat_n(0xEE, self.invals * SIZE_OF_INVAL_MESSAGE));
            }
            if let Some(x) = self.twophase {
                xinfo |= XACT_XINFO_HAS_TWOPHASE;
                put(&mut body, x);
                if let Some(gid) = self.gid {
                    xinfo |= XACT_XINFO_HAS_GID;
                    body.extend_from_slice(gid.as_bytes());
                    body.push(0);
                }
            }
            if let Some((lsn, ts)) = self.origin {
                xinfo |= XACT_XINFO_HAS_ORIGIN;
                body.extend_from_slice(&lsn.to_le_bytes());
                body.extend_from_slice(&ts.to_le_bytes());
            }
            if self.ae_locks {
                xinfo |= XACT_XINFO_HAS_AE_LOCKS;
            }
            let mut main = 777_000_000i64.to_le_bytes().to_vec();
            if xinfo == 0 {
                return (0, main);
            }
            main.extend_from_slice(&xinfo.to_le_bytes());
            main.extend(body);
            (XLOG_XACT_HAS_INFO, main)
        }
    }

    #[test]
    fn plain_commit_and_abort() {
        let (flag, main) = Xact::default().encode(true);
        assert_eq!((flag, main.len()), (0, 8));
        let out = derive(RM_XACT_ID, XLOG_XACT_COMMIT | flag, 1000, &[], &main);
        assert_eq!(
            out,
            vec![(
                NativeTarget::Clog { pageno: 0 },
                NativeRecord::ClogSetStatus { xids: smallvec![1000], status: XactStatus::Committed }
            )]
        );
        let out = derive(RM_XACT_ID, XLOG_XACT_ABORT | flag, 40000, &[], &main);
        assert_eq!(
            out,
            vec![(
                NativeTarget::Clog { pageno: 1 },
                NativeRecord::ClogSetStatus { xids: smallvec![40000], status: XactStatus::Aborted }
            )]
        );
    }

    #[test]
    fn commit_with_every_part_and_subxacts_across_pages() {
        let x = Xact {
            dbinfo: Some((5, 1663)),
            subxacts: vec![32766, 32767, 32768, 32769],
            rels: vec![[1663, 5, 16400], [1663, 5, 16401]],
            stats: vec![[1, 5, 16400]],
            invals: 3,
            twophase: None,
            gid: None,
            origin: Some((0x1234_5678, -5)),
            ae_locks: true,
        };
        let (flag, main) = x.encode(true);
        let rec = decode(RM_XACT_ID, XLOG_XACT_COMMIT | flag, 32765, &[], &main);
        let p = parse_xact_commit(rec.header.info, rec.main_data(), RecordName::of(RM_XACT_ID, 0, rec.lsn)).unwrap();
        assert_eq!(p.dbinfo, Some((5, 1663)));
        assert_eq!(p.subxacts().collect::<Vec<_>>(), x.subxacts);
        assert_eq!(p.relfilenodes().map(|r| r.relnode).collect::<Vec<_>>(), vec![16400, 16401]);
        assert_eq!(p.dropped_stats().next(), Some(XactStatsItem { kind: 1, dboid: 5, objoid: 16400 }));
        assert_eq!(p.inval_messages().len(), 3);
        assert_eq!(p.origin, Some((Lsn(0x1234_5678), -5)));
        assert_eq!(p.twophase_xid, None);
        assert_eq!(p.xact_time, 777_000_000);
        assert!(p.xinfo & XACT_XINFO_HAS_AE_LOCKS != 0);

        let out = native_records(&rec.view()).unwrap();
        assert_eq!(
            out,
            vec![
                (
                    NativeTarget::Clog { pageno: 0 },
                    NativeRecord::ClogSetStatus { xids: smallvec![32765, 32766, 32767], status: XactStatus::Committed }
                ),
                (
                    NativeTarget::Clog { pageno: 1 },
                    NativeRecord::ClogSetStatus { xids: smallvec![32768, 32769], status: XactStatus::Committed }
                ),
            ]
        );
        // Applied, every one of them reads COMMITTED.
        let mut pages = [[0u8; BLCKSZ]; 2];
        for (t, r) in &out {
            let NativeTarget::Clog { pageno } = t else { unreachable!() };
            apply(t, r, &mut pages[*pageno as usize]).unwrap();
        }
        for xid in 32765..=32769u32 {
            assert_eq!(crate::walredo::native::clog_status(&pages[(xid / 32768) as usize], xid), XactStatus::Committed);
        }
        assert_eq!(crate::walredo::native::clog_status(&pages[0], 32764), XactStatus::InProgress);
    }

    #[test]
    fn prepared_transactions_use_the_twophase_xid() {
        let x = Xact { dbinfo: Some((5, 1663)), twophase: Some(731), gid: Some("w1"), invals: 1, ..Default::default() };
        let (flag, main) = x.encode(true);
        // The record's own xid is the backend's running COMMIT PREPARED, often 0.
        let out = derive(RM_XACT_ID, XLOG_XACT_COMMIT_PREPARED | flag, 0, &[], &main);
        assert_eq!(
            out,
            vec![(
                NativeTarget::Clog { pageno: 0 },
                NativeRecord::ClogSetStatus { xids: smallvec![731], status: XactStatus::Committed }
            )]
        );
        let rec = decode(RM_XACT_ID, XLOG_XACT_COMMIT_PREPARED | flag, 0, &[], &main);
        let p = parse_xact_commit(rec.header.info, rec.main_data(), RecordName::of(RM_XACT_ID, 0, rec.lsn)).unwrap();
        assert_eq!(p.twophase_gid, Some(&b"w1"[..]));

        let x = Xact {
            subxacts: vec![740],
            twophase: Some(739),
            gid: Some("w2"),
            origin: Some((1, 2)),
            ..Default::default()
        };
        let (flag, main) = x.encode(false);
        let out = derive(RM_XACT_ID, XLOG_XACT_ABORT_PREPARED | flag, 0, &[], &main);
        assert_eq!(
            out,
            vec![(
                NativeTarget::Clog { pageno: 0 },
                NativeRecord::ClogSetStatus { xids: smallvec![739, 740], status: XactStatus::Aborted }
            )]
        );
        // A *_PREPARED record without the two-phase part cannot name its transaction.
        let (flag, main) = Xact::default().encode(false);
        assert!(matches!(
            derive_err(RM_XACT_ID, XLOG_XACT_ABORT_PREPARED | flag, 5, &[], &main),
            DeriveError::MissingTwoPhaseXid { .. }
        ));
    }

    #[test]
    fn other_xact_records_imply_nothing() {
        // xl_xact_assignment: xtop, nsubxacts, xsub[].
        let mut main = Vec::new();
        for v in [700u32, 2, 701, 702] {
            main.extend_from_slice(&v.to_le_bytes());
        }
        assert!(derive(RM_XACT_ID, XLOG_XACT_ASSIGNMENT, 700, &[], &main).is_empty());
        assert!(derive(RM_XACT_ID, XLOG_XACT_PREPARE, 700, &[], &[0; 80]).is_empty());
        assert!(derive(RM_XACT_ID, XLOG_XACT_INVALIDATIONS, 700, &[], &[0; 4]).is_empty());
    }

    #[test]
    fn bad_xact_records_are_errors() {
        let x = Xact { subxacts: vec![800, 801], ..Default::default() };
        let (flag, main) = x.encode(true);
        // Cut inside the subxact array.
        let e = derive_err(RM_XACT_ID, XLOG_XACT_COMMIT | flag, 799, &[], &main[..main.len() - 2]);
        assert!(matches!(e, DeriveError::Truncated { what: "subxacts", need: 8, have: 6, .. }), "{e}");
        assert!(e.to_string().starts_with("Transaction COMMIT record at 0/1000: main data ends in subxacts"), "{e}");
        // A negative count.
        let mut bad = main.clone();
        bad[12..16].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(matches!(
            derive_err(RM_XACT_ID, XLOG_XACT_COMMIT | flag, 799, &[], &bad),
            DeriveError::NegativeCount { .. }
        ));
        // xid 0 cannot be committed.
        let (flag, main) = Xact::default().encode(true);
        assert!(matches!(
            derive_err(RM_XACT_ID, XLOG_XACT_COMMIT | flag, 0, &[], &main),
            DeriveError::InvalidXid { .. }
        ));
        // Too short for xact_time.
        assert!(matches!(derive_err(RM_XACT_ID, XLOG_XACT_ABORT, 9, &[], &[1, 2, 3]), DeriveError::Truncated { .. }));
        // A GID with no terminator.
        let x = Xact { twophase: Some(900), gid: Some("g"), ..Default::default() };
        let (flag, main) = x.encode(true);
        assert!(matches!(
            derive_err(RM_XACT_ID, XLOG_XACT_COMMIT_PREPARED | flag, 0, &[], &main[..main.len() - 1]),
            DeriveError::UnterminatedGid { .. }
        ));
    }

    #[test]
    fn abort_records_do_not_parse_invals() {
        // ParseAbortRecord has no invalidation branch: the INVALS bit is ignored and what
        // follows is read as the next part.
        let mut main = 1i64.to_le_bytes().to_vec();
        main.extend_from_slice(&(XACT_XINFO_HAS_INVALS | XACT_XINFO_HAS_TWOPHASE).to_le_bytes());
        main.extend_from_slice(&950u32.to_le_bytes());
        let out = derive(RM_XACT_ID, XLOG_XACT_ABORT_PREPARED | XLOG_XACT_HAS_INFO, 0, &[], &main);
        assert_eq!(
            out,
            vec![(
                NativeTarget::Clog { pageno: 0 },
                NativeRecord::ClogSetStatus { xids: smallvec![950], status: XactStatus::Aborted }
            )]
        );
    }

    #[test]
    fn slru_zero_pages() {
        let page = 7i32.to_le_bytes();
        assert_eq!(
            derive(RM_CLOG_ID, CLOG_ZEROPAGE, 0, &[], &page),
            vec![(NativeTarget::Clog { pageno: 7 }, NativeRecord::SlruZeroPage)]
        );
        assert_eq!(
            derive(RM_MULTIXACT_ID, XLOG_MULTIXACT_ZERO_OFF_PAGE, 0, &[], &page),
            vec![(NativeTarget::MultiXactOffsets { pageno: 7 }, NativeRecord::SlruZeroPage)]
        );
        assert_eq!(
            derive(RM_MULTIXACT_ID, XLOG_MULTIXACT_ZERO_MEM_PAGE, 0, &[], &page),
            vec![(NativeTarget::MultiXactMembers { pageno: 7 }, NativeRecord::SlruZeroPage)]
        );
        // xl_clog_truncate: pageno, oldestXact, oldestXactDb — lifecycle, nothing here.
        assert!(derive(RM_CLOG_ID, CLOG_TRUNCATE, 0, &[], &[0; 12]).is_empty());
        assert!(matches!(
            derive_err(RM_CLOG_ID, CLOG_ZEROPAGE, 0, &[], &(-3i32).to_le_bytes()),
            DeriveError::NegativePage { value: -3, .. }
        ));
        assert!(matches!(
            derive_err(RM_MULTIXACT_ID, XLOG_MULTIXACT_ZERO_MEM_PAGE, 0, &[], &[1]),
            DeriveError::Truncated { .. }
        ));
    }

    fn create_id(mid: u32, moff: u32, members: &[(u32, u32)]) -> Vec<u8> {
        let mut main = Vec::new();
        for v in [mid, moff, members.len() as u32] {
            main.extend_from_slice(&v.to_le_bytes());
        }
        for &(xid, status) in members {
            main.extend_from_slice(&xid.to_le_bytes());
            main.extend_from_slice(&status.to_le_bytes());
        }
        main
    }

    #[test]
    fn multixact_create_splits_by_page() {
        // Simple: one offsets page, one members page.
        let out = derive(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, 800, &[], &create_id(1, 1, &[(800, 1), (801, 0)]));
        assert_eq!(
            out,
            vec![
                (
                    NativeTarget::MultiXactOffsets { pageno: 0 },
                    NativeRecord::MultixactOffsetCreate { mid: 1, moff: 1, nmembers: 2 }
                ),
                (
                    NativeTarget::MultiXactMembers { pageno: 0 },
                    NativeRecord::MultixactMembersCreate {
                        moff: 1,
                        members: vec![MultiXactMember { xid: 800, status: 1 }, MultiXactMember { xid: 801, status: 0 }]
                    }
                ),
            ]
        );
        // The last multixact of offsets page 0, with members across members pages 0 and 1.
        let members: Vec<(u32, u32)> = (0..5).map(|i| (900 + i, i % 6)).collect();
        let out = derive(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, 900, &[], &create_id(2047, 1633, &members));
        let targets: Vec<NativeTarget> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(
            targets,
            vec![
                NativeTarget::MultiXactOffsets { pageno: 0 },
                NativeTarget::MultiXactOffsets { pageno: 1 },
                NativeTarget::MultiXactMembers { pageno: 0 },
                NativeTarget::MultiXactMembers { pageno: 1 },
            ]
        );
        let NativeRecord::MultixactMembersCreate { moff, members: m } = &out[3].1 else { panic!("{out:?}") };
        assert_eq!((*moff, m.len()), (1636, 2));
        // Applying everything gives PostgreSQL's layout.
        let mut pages = std::collections::HashMap::new();
        for (t, r) in &out {
            apply(t, r, pages.entry(*t).or_insert([0u8; BLCKSZ])).unwrap();
        }
        assert_eq!(mxoff_get(&pages[&NativeTarget::MultiXactOffsets { pageno: 0 }], 2047), 1633);
        assert_eq!(mxoff_get(&pages[&NativeTarget::MultiXactOffsets { pageno: 1 }], 2048), 1638);
        for i in 0..5u32 {
            let off = 1633 + i;
            let page = &pages[&NativeTarget::MultiXactMembers { pageno: off / 1636 }];
            assert_eq!(member_get(page, off), MultiXactMember { xid: 900 + i, status: (i % 6) as u8 });
        }
    }

    #[test]
    fn bad_multixact_records_are_errors() {
        let e = derive_err(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, 1, &[], &create_id(0, 1, &[(5, 0)]));
        assert!(matches!(e, DeriveError::InvalidMultiXactId { .. }));
        let e = derive_err(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, 1, &[], &create_id(3, 1, &[(5, 0), (6, 6)]));
        assert!(matches!(e, DeriveError::InvalidMemberStatus { index: 1, status: 6, .. }));
        let main = create_id(3, 1, &[(5, 0), (6, 1)]);
        let e = derive_err(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, 1, &[], &main[..main.len() - 1]);
        assert!(matches!(e, DeriveError::Truncated { what: "multixact members", need: 16, have: 15, .. }));
        let mut main = create_id(3, 1, &[]);
        main[8..12].copy_from_slice(&(-2i32).to_le_bytes());
        assert!(matches!(
            derive_err(RM_MULTIXACT_ID, XLOG_MULTIXACT_CREATE_ID, 1, &[], &main),
            DeriveError::NegativeCount { value: -2, .. }
        ));
    }

    /// Main data of the heap records with `flags` at `at` in a struct of `size` bytes.
    fn heap_main(size: usize, at: usize, flags: u8) -> Vec<u8> {
        let mut v = vec![0u8; size];
        v[at] = flags;
        v
    }

    #[test]
    fn heap_records_clear_vm_bits() {
        let b0 = || heap_block(0, 40000);
        // INSERT (with and without the INIT_PAGE bit): both bits of block 0's VM page.
        for info in [XLOG_HEAP_INSERT, XLOG_HEAP_INSERT | XLOG_HEAP_INIT_PAGE] {
            let out = derive(RM_HEAP_ID, info, 5, &[b0()], &heap_main(3, 2, XLH_INSERT_ALL_VISIBLE_CLEARED));
            assert_eq!(
                out,
                vec![(vm(1), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![40000], flags: 3 })]
            );
        }
        assert!(derive(RM_HEAP_ID, XLOG_HEAP_INSERT, 5, &[b0()], &heap_main(3, 2, 0x02)).is_empty());
        // DELETE.
        let out = derive(RM_HEAP_ID, XLOG_HEAP_DELETE, 5, &[heap_block(0, 7)], &heap_main(8, 7, 1));
        assert_eq!(out, vec![(vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![7], flags: 3 })]);
        // LOCK and LOCK_UPDATED clear only ALL_FROZEN.
        let out = derive(RM_HEAP_ID, XLOG_HEAP_LOCK, 5, &[heap_block(0, 7)], &heap_main(8, 7, 1));
        assert_eq!(out, vec![(vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![7], flags: 2 })]);
        let out = derive(RM_HEAP2_ID, XLOG_HEAP2_LOCK_UPDATED, 5, &[heap_block(0, 8)], &heap_main(8, 7, 1));
        assert_eq!(out, vec![(vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![8], flags: 2 })]);
        assert!(derive(RM_HEAP_ID, XLOG_HEAP_LOCK, 5, &[heap_block(0, 7)], &heap_main(8, 7, 0)).is_empty());
        // MULTI_INSERT: flags first.
        let out = derive(RM_HEAP2_ID, XLOG_HEAP2_MULTI_INSERT | XLOG_HEAP_INIT_PAGE, 5, &[b0()], &heap_main(6, 0, 1));
        assert_eq!(
            out,
            vec![(vm(1), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![40000], flags: 3 })]
        );
        // Records that never clear VM bits.
        assert!(derive(RM_HEAP2_ID, XLOG_HEAP2_PRUNE, 5, &[b0()], &heap_main(8, 0, 0xFF)).is_empty());
        assert!(derive(RM_HEAP_ID, XLOG_HEAP_INPLACE, 5, &[b0()], &heap_main(2, 0, 0xFF)).is_empty());
    }

    #[test]
    fn update_clears_old_and_new_pages() {
        let both = XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED | XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED;
        // New block 0 = 5, old block 1 = 40000: two VM pages.
        let out =
            derive(RM_HEAP_ID, XLOG_HEAP_UPDATE, 5, &[heap_block(0, 5), heap_block(1, 40000)], &heap_main(14, 7, both));
        assert_eq!(
            out,
            vec![
                (vm(1), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![40000], flags: 3 }),
                (vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![5], flags: 3 }),
            ]
        );
        // Same VM page: one record with both heap blocks.
        let out =
            derive(RM_HEAP_ID, XLOG_HEAP_UPDATE, 5, &[heap_block(0, 5), heap_block(1, 9)], &heap_main(14, 7, both));
        assert_eq!(
            out,
            vec![(vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![9, 5], flags: 3 })]
        );
        // Only the old page's flag.
        let out = derive(
            RM_HEAP_ID,
            XLOG_HEAP_UPDATE,
            5,
            &[heap_block(0, 5), heap_block(1, 9)],
            &heap_main(14, 7, XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED),
        );
        assert_eq!(out, vec![(vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![9], flags: 3 })]);
        // HOT: one block, which is both old and new.
        let out = derive(RM_HEAP_ID, XLOG_HEAP_HOT_UPDATE, 5, &[heap_block(0, 5)], &heap_main(14, 7, both));
        assert_eq!(out, vec![(vm(0), NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![5], flags: 3 })]);
        // Applied to an all-set VM page: blocks 9 and 5 lose both bits.
        let mut page = [0u8; BLCKSZ];
        page[12..20].copy_from_slice(&[24, 0, 0, 0x20, 0, 0x20, 4, 0x20]);
        page[24..].fill(0xFF);
        let out =
            derive(RM_HEAP_ID, XLOG_HEAP_UPDATE, 5, &[heap_block(0, 5), heap_block(1, 9)], &heap_main(14, 7, both));
        apply(&out[0].0, &out[0].1, &mut page).unwrap();
        assert_eq!((vm_flags(&page, 5), vm_flags(&page, 9), vm_flags(&page, 6)), (0, 0, 3));
    }

    #[test]
    fn bad_heap_records_are_errors() {
        let e = derive_err(RM_HEAP_ID, XLOG_HEAP_DELETE, 5, &[heap_block(0, 1)], &[0; 7]);
        assert!(matches!(e, DeriveError::Truncated { need: 8, have: 7, .. }), "{e}");
        // The flag says a block was involved, but there is no block 0.
        let e = derive_err(RM_HEAP_ID, XLOG_HEAP_INSERT, 5, &[], &heap_main(3, 2, 1));
        assert!(matches!(e, DeriveError::MissingBlock { block_id: 0, .. }), "{e}");
    }

    proptest::proptest! {
        /// Any main data under any info byte of the rmgrs we interpret: an error or records,
        /// never a panic; and whatever is derived applies cleanly to a fresh page of its own
        /// target, with at most one record per target.
        #[test]
        fn garbage_never_panics_and_derived_records_apply(
            rmid in proptest::sample::select(vec![RM_XACT_ID, RM_CLOG_ID, RM_MULTIXACT_ID, RM_HEAP_ID, RM_HEAP2_ID]),
            info in proptest::prelude::any::<u8>(),
            xid in proptest::prelude::any::<u32>(),
            main in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
            nblocks in 0usize..3,
            blkno in proptest::prelude::any::<u32>(),
        ) {
            let blocks: Vec<TestBlock> = (0..nblocks as u8).map(|i| heap_block(i, blkno.wrapping_add(i as u32))).collect();
            // build_record puts the rmgr bits in the high nibble only.
            let rec = decode(rmid, info & XLR_RMGR_INFO_MASK, xid, &blocks, &main);
            if let Ok(out) = native_records(&rec.view()) {
                let targets: std::collections::HashSet<_> = out.iter().map(|(t, _)| *t).collect();
                proptest::prop_assert_eq!(targets.len(), out.len());
                for (t, r) in &out {
                    let mut page = [0u8; BLCKSZ];
                    proptest::prop_assert!(apply(t, r, &mut page).is_ok(), "{:?} on {}", r, t);
                }
            }
        }
    }
}
