//! Rust-native records: the page changes the sidecar makes itself instead of handing a WAL
//! record to a wal-redo process, because PostgreSQL's redo for these would act on the redo
//! process's own cluster (its pg_xact, its pg_multixact, its relcache) rather than on the page
//! being rebuilt (DESIGN §3 point 5, §5). Neon's pageserver does the same with its
//! `NeonWalRecord` and `apply_in_neon`.
//!
//! [`derive`](super::derive) turns decoded WAL into `(NativeTarget, NativeRecord)` pairs; the
//! repository files each under its target's key at the WAL record's end LSN; reconstruction
//! calls [`apply`] on the page, oldest record first. The byte layouts below follow
//! PostgreSQL 15's clog.c, multixact.c and visibilitymap.c exactly, so the pages we build are
//! byte for byte what PostgreSQL writes to pg_xact, pg_multixact and the `_vm` fork. All
//! integers are little-endian (the only byte order we support; see `wal::consts`).
//!
//! ```text
//! CLOG page (pg_xact), CLOG_XACTS_PER_PAGE = 32768 xids per 8192-byte page:
//!   2 bits per xid, 4 xids per byte, low bits first
//!   page  = xid / 32768
//!   byte  = (xid % 32768) / 4
//!   shift = (xid % 4) * 2
//!   status: 0 IN_PROGRESS, 1 COMMITTED, 2 ABORTED, 3 SUB_COMMITTED
//!
//! multixact offsets page (pg_multixact/offsets), MULTIXACT_OFFSETS_PER_PAGE = 2048:
//!   u32 offset per MultiXactId
//!   page  = mid / 2048               (MultiXactIdToOffsetPage)
//!   entry = mid % 2048, at byte 4 * entry (MultiXactIdToOffsetEntry)
//!
//! multixact members page (pg_multixact/members): 409 groups of 20 bytes (12 bytes unused):
//!   group = 4 flag bytes (one MultiXactStatus per member) then 4 member xids (u32)
//!   MULTIXACT_MEMBERS_PER_PAGE = 409 * 4 = 1636
//!   page      = off / 1636                           (MXOffsetToMemberPage)
//!   flags at  ((off / 4) % 409) * 20                 (MXOffsetToFlagsOffset), a u32 whose
//!             bits (off % 4) * 8 .. +8 hold the status (MXOffsetToFlagsBitShift)
//!   xid at    flags offset + 4 + (off % 4) * 4       (MXOffsetToMemberOffset)
//!
//! visibility-map page (the `_vm` fork of a heap relation):
//!   standard 24-byte page header (PageInit'd, no special space), then MAPSIZE = 8168 bytes
//!   2 bits per heap block (VISIBILITYMAP_ALL_VISIBLE 0x01, VISIBILITYMAP_ALL_FROZEN 0x02)
//!   HEAPBLOCKS_PER_PAGE = 8168 * 4 = 32672
//!   block = heapblk / 32672                          (HEAPBLK_TO_MAPBLOCK)
//!   byte  = 24 + (heapblk % 32672) / 4               (header + HEAPBLK_TO_MAPBYTE)
//!   shift = (heapblk % 4) * 2                        (HEAPBLK_TO_OFFSET)
//! ```
//!
//! SLRU pages are addressed by page number within their SLRU; a segment file holds
//! [`SLRU_PAGES_PER_SEGMENT`] consecutive pages and is named by its number in 4 hex digits.
//!
//! A record may list entries on several pages (a transaction's subtransactions can span CLOG
//! pages); `apply` changes only the entries on the target page, so one record can be filed
//! under several targets. `derive` nonetheless splits records per page, and `apply` refuses a
//! record none of whose entries lie on the target page: that is a misfiled record, not a no-op.

use neon_types::{BlockNumber, BufferTag, ForkNumber, TransactionId, BLCKSZ};
use smallvec::SmallVec;
use std::fmt;

/// A multixact's id (`MultiXactId`).
pub type MultiXactId = u32;
/// A position in the multixact members SLRU (`MultiXactOffset`).
pub type MultiXactOffset = u32;

/// Pages per SLRU segment file (`SLRU_PAGES_PER_SEGMENT`).
pub const SLRU_PAGES_PER_SEGMENT: u32 = 32;

/// Bits of CLOG status per transaction (`CLOG_BITS_PER_XACT`).
pub const CLOG_BITS_PER_XACT: u32 = 2;
/// Transactions per CLOG byte (`CLOG_XACTS_PER_BYTE`).
pub const CLOG_XACTS_PER_BYTE: u32 = 4;
/// Transactions per CLOG page (`CLOG_XACTS_PER_PAGE`).
pub const CLOG_XACTS_PER_PAGE: u32 = BLCKSZ as u32 * CLOG_XACTS_PER_BYTE;

/// Offsets per multixact offsets page (`MULTIXACT_OFFSETS_PER_PAGE`).
pub const MULTIXACT_OFFSETS_PER_PAGE: u32 = BLCKSZ as u32 / 4;
/// Flag bytes at the start of a member group (`MULTIXACT_FLAGBYTES_PER_GROUP`).
pub const MULTIXACT_FLAGBYTES_PER_GROUP: u32 = 4;
/// Members per group: one flag byte each (`MULTIXACT_MEMBERS_PER_MEMBERGROUP`).
pub const MULTIXACT_MEMBERS_PER_MEMBERGROUP: u32 = MULTIXACT_FLAGBYTES_PER_GROUP;
/// Bytes per member group: the flag bytes and one xid per member (`MULTIXACT_MEMBERGROUP_SIZE`).
pub const MULTIXACT_MEMBERGROUP_SIZE: u32 = 4 * MULTIXACT_MEMBERS_PER_MEMBERGROUP + MULTIXACT_FLAGBYTES_PER_GROUP;
/// Member groups per page (`MULTIXACT_MEMBERGROUPS_PER_PAGE`); the page's last 12 bytes are unused.
pub const MULTIXACT_MEMBERGROUPS_PER_PAGE: u32 = BLCKSZ as u32 / MULTIXACT_MEMBERGROUP_SIZE;
/// Members per members page (`MULTIXACT_MEMBERS_PER_PAGE`).
pub const MULTIXACT_MEMBERS_PER_PAGE: u32 = MULTIXACT_MEMBERGROUPS_PER_PAGE * MULTIXACT_MEMBERS_PER_MEMBERGROUP;
/// Bits of status per member in a group's flag word (`MXACT_MEMBER_BITS_PER_XACT`).
pub const MXACT_MEMBER_BITS_PER_XACT: u32 = 8;
/// The first valid multixact id; id 0 is invalid and skipped on wraparound (`FirstMultiXactId`).
pub const FIRST_MULTIXACT_ID: MultiXactId = 1;
/// The largest `MultiXactStatus` (`MultiXactStatusUpdate`).
pub const MAX_MULTIXACT_STATUS: u8 = 5;

/// `SizeOfPageHeaderData` (already MAXALIGNed), where a visibility map's bitmap starts.
pub const SIZE_OF_PAGE_HEADER: usize = 24;
/// Bytes of bitmap per visibility-map page (`MAPSIZE`).
pub const VM_MAPSIZE: usize = BLCKSZ - SIZE_OF_PAGE_HEADER;
/// Bits per heap block in the visibility map (`BITS_PER_HEAPBLOCK`).
pub const VM_BITS_PER_HEAPBLOCK: u32 = 2;
/// Heap blocks per visibility-map byte (`HEAPBLOCKS_PER_BYTE`).
pub const VM_HEAPBLOCKS_PER_BYTE: u32 = 8 / VM_BITS_PER_HEAPBLOCK;
/// Heap blocks per visibility-map page (`HEAPBLOCKS_PER_PAGE`).
pub const VM_HEAPBLOCKS_PER_PAGE: u32 = VM_MAPSIZE as u32 * VM_HEAPBLOCKS_PER_BYTE;
/// The page is all-visible (`VISIBILITYMAP_ALL_VISIBLE`).
pub const VISIBILITYMAP_ALL_VISIBLE: u8 = 0x01;
/// The page is all-frozen (`VISIBILITYMAP_ALL_FROZEN`).
pub const VISIBILITYMAP_ALL_FROZEN: u8 = 0x02;
/// Both bits (`VISIBILITYMAP_VALID_BITS`).
pub const VISIBILITYMAP_VALID_BITS: u8 = 0x03;

/// `PG_PAGE_LAYOUT_VERSION`, stored with the page size in `pd_pagesize_version`.
const PG_PAGE_LAYOUT_VERSION: u16 = 4;
/// `PD_VALID_FLAG_BITS`: the `pd_flags` bits a valid page may have.
const PD_VALID_FLAG_BITS: u16 = 0x0007;

/// A transaction's status in the CLOG (`XidStatus`), with PostgreSQL's 2-bit values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum XactStatus {
    /// `TRANSACTION_STATUS_IN_PROGRESS` (also: never assigned, or crashed).
    InProgress = 0x00,
    /// `TRANSACTION_STATUS_COMMITTED`.
    Committed = 0x01,
    /// `TRANSACTION_STATUS_ABORTED`.
    Aborted = 0x02,
    /// `TRANSACTION_STATUS_SUB_COMMITTED`: a transient state during commit of a tree.
    SubCommitted = 0x03,
}

impl XactStatus {
    /// The status for two CLOG bits (only the low two bits of `bits` count).
    pub fn from_bits(bits: u8) -> XactStatus {
        match bits & 0x03 {
            0x00 => XactStatus::InProgress,
            0x01 => XactStatus::Committed,
            0x02 => XactStatus::Aborted,
            _ => XactStatus::SubCommitted,
        }
    }
}

/// One member of a multixact (`MultiXactMember`): a transaction and how it holds the tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MultiXactMember {
    pub xid: TransactionId,
    /// A `MultiXactStatus`: 0 ForKeyShare, 1 ForShare, 2 ForNoKeyUpdate, 3 ForUpdate,
    /// 4 NoKeyUpdate, 5 Update. Stored as one flag byte in the members page.
    pub status: u8,
}

/// The page a native record applies to. SLRU pages are numbered within their SLRU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NativeTarget {
    /// A page of pg_xact.
    Clog { pageno: u32 },
    /// A page of pg_multixact/offsets.
    MultiXactOffsets { pageno: u32 },
    /// A page of pg_multixact/members.
    MultiXactMembers { pageno: u32 },
    /// A page of a heap relation's visibility-map fork.
    VisibilityMap(BufferTag),
}

impl NativeTarget {
    /// The directory (relative to the data directory) of an SLRU target; `None` for a
    /// visibility-map page.
    pub fn slru_dir(&self) -> Option<&'static str> {
        match self {
            NativeTarget::Clog { .. } => Some("pg_xact"),
            NativeTarget::MultiXactOffsets { .. } => Some("pg_multixact/offsets"),
            NativeTarget::MultiXactMembers { .. } => Some("pg_multixact/members"),
            NativeTarget::VisibilityMap(_) => None,
        }
    }

    /// The SLRU page number of an SLRU target.
    pub fn slru_pageno(&self) -> Option<u32> {
        match *self {
            NativeTarget::Clog { pageno }
            | NativeTarget::MultiXactOffsets { pageno }
            | NativeTarget::MultiXactMembers { pageno } => Some(pageno),
            NativeTarget::VisibilityMap(_) => None,
        }
    }

    /// Where an SLRU target lives on disk: the segment file's path relative to the data
    /// directory (`SlruFileName`: 4 hex digits) and the page's byte offset in it.
    pub fn slru_file_location(&self) -> Option<(String, u64)> {
        let (dir, pageno) = (self.slru_dir()?, self.slru_pageno()?);
        let segno = pageno / SLRU_PAGES_PER_SEGMENT;
        let offset = (pageno % SLRU_PAGES_PER_SEGMENT) as u64 * BLCKSZ as u64;
        Some((format!("{dir}/{segno:04X}"), offset))
    }
}

impl fmt::Display for NativeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NativeTarget::VisibilityMap(tag) => write!(f, "visibility map {tag}"),
            _ => write!(f, "{} page {}", self.slru_dir().unwrap_or("?"), self.slru_pageno().unwrap_or(0)),
        }
    }
}

/// A change the sidecar applies to a page in Rust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NativeRecord {
    /// Set these transactions' CLOG status (`TransactionIdSetTreeStatus`'s end state). Only
    /// the xids on the target page are touched.
    ClogSetStatus { xids: SmallVec<[TransactionId; 4]>, status: XactStatus },
    /// The offsets half of `RecordNewMultiXact` (the payload of `xl_multixact_create` minus
    /// the members): multixact `mid`'s members start at `moff`, and — since PostgreSQL 15.16 —
    /// the next multixact's start is set to the end of these members, `moff + nmembers`
    /// (skipping offset 0), so a reader never waits for a zero "next offset". `mid + 1` wraps
    /// to [`FIRST_MULTIXACT_ID`]. Only the entries on the target page are written; the next
    /// entry can be the first of the following page.
    ///
    /// WAL written by a primary older than 15.16 never set the next entry; a 15.16+ server
    /// replaying it writes it anyway, and so do we. One corner differs from such a standby:
    /// when the next entry is the first of a page the old primary zeroes later, the standby
    /// zeroes that page early and skips the later `ZERO_OFF_PAGE`, while we apply it, so the
    /// entry reads 0 again until that multixact's own record sets it (to the same value).
    MultixactOffsetCreate { mid: MultiXactId, moff: MultiXactOffset, nmembers: u32 },
    /// The members half of `RecordNewMultiXact`: `members[i]` is stored at member offset
    /// `moff + i` (wrapping at 2^32, as PostgreSQL's unsigned arithmetic does). Only the
    /// members on the target page are written.
    MultixactMembersCreate { moff: MultiXactOffset, members: Vec<MultiXactMember> },
    /// `visibilitymap_clear` for each heap block: the bits in `flags` are cleared on the
    /// visibility-map page holding it. A page never initialised (`PageIsNew`) is first
    /// `PageInit`ed, as `vm_readbuf` does; the page LSN is not touched (clearing bits is not
    /// WAL-logged against the VM page).
    ClearVisibilityMapFlags { heap_blocks: SmallVec<[BlockNumber; 2]>, flags: u8 },
    /// `visibilitymap_prepare_truncate` when the heap is truncated to `heap_blocks` blocks: on
    /// the page holding that boundary, every bit for heap blocks at or past it is cleared (the
    /// pages after it go with the fork's new size). Not WAL-logged as a page change without
    /// checksums; replay does it as part of SMGR TRUNCATE, and so do we.
    TruncateVisibilityMap { heap_blocks: BlockNumber },
    /// An SLRU page is (re)initialised to zeroes (`CLOG_ZEROPAGE`,
    /// `XLOG_MULTIXACT_ZERO_OFF_PAGE`, `XLOG_MULTIXACT_ZERO_MEM_PAGE`): no earlier version of
    /// the page is needed.
    SlruZeroPage,
}

impl NativeRecord {
    /// The record replaces the whole page: reconstruction need not look further back.
    pub fn will_init(&self) -> bool {
        matches!(self, NativeRecord::SlruZeroPage)
    }

    /// A short name for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            NativeRecord::ClogSetStatus { .. } => "ClogSetStatus",
            NativeRecord::MultixactOffsetCreate { .. } => "MultixactOffsetCreate",
            NativeRecord::MultixactMembersCreate { .. } => "MultixactMembersCreate",
            NativeRecord::ClearVisibilityMapFlags { .. } => "ClearVisibilityMapFlags",
            NativeRecord::TruncateVisibilityMap { .. } => "TruncateVisibilityMap",
            NativeRecord::SlruZeroPage => "SlruZeroPage",
        }
    }
}

/// Why a native record cannot be applied to a page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NativeError {
    #[error("{record} record cannot apply to {target}")]
    WrongTarget { record: &'static str, target: NativeTarget },
    #[error("{record} record has nothing on {target}: it was filed under the wrong page")]
    NotOnPage { record: &'static str, target: NativeTarget },
    #[error("ClearVisibilityMapFlags on {target}: invalid flags {flags:#04x} (expected a non-empty subset of 0x03)")]
    InvalidVmFlags { flags: u8, target: NativeTarget },
    #[error(
        "ClearVisibilityMapFlags on {target}: the page has an invalid header \
         (pd_flags {flags:#06x}, pd_lower {lower}, pd_upper {upper}, pd_special {special})"
    )]
    BadVmPageHeader { target: NativeTarget, flags: u16, lower: u16, upper: u16, special: u16 },
    #[error("stored native record is malformed: {0}")]
    Encoding(&'static str),
}

// ---- the stored form of native records (the page store's one encoding of them) ----
//
//   u8 kind | fields, little-endian:
//   0 ClogSetStatus            u8 status | u32 n | n × u32 xid
//   1 MultixactOffsetCreate    u32 mid | u32 moff | u32 nmembers
//   2 MultixactMembersCreate   u32 moff | u32 n | n × (u32 xid | u8 status)
//   3 ClearVisibilityMapFlags  u8 flags | u32 n | n × u32 heap block
//   4 SlruZeroPage
//   5 TruncateVisibilityMap    u32 heap blocks

impl NativeRecord {
    /// Appends the stored form of the record.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let u32s = |out: &mut Vec<u8>, vs: &mut dyn Iterator<Item = u32>| {
            for v in vs {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        match self {
            NativeRecord::ClogSetStatus { xids, status } => {
                out.extend_from_slice(&[0, *status as u8]);
                u32s(out, &mut std::iter::once(xids.len() as u32).chain(xids.iter().copied()));
            }
            NativeRecord::MultixactOffsetCreate { mid, moff, nmembers } => {
                out.push(1);
                u32s(out, &mut [*mid, *moff, *nmembers].into_iter());
            }
            NativeRecord::MultixactMembersCreate { moff, members } => {
                out.push(2);
                u32s(out, &mut [*moff, members.len() as u32].into_iter());
                for m in members {
                    out.extend_from_slice(&m.xid.to_le_bytes());
                    out.push(m.status);
                }
            }
            NativeRecord::ClearVisibilityMapFlags { heap_blocks, flags } => {
                out.extend_from_slice(&[3, *flags]);
                u32s(out, &mut std::iter::once(heap_blocks.len() as u32).chain(heap_blocks.iter().copied()));
            }
            NativeRecord::SlruZeroPage => out.push(4),
            NativeRecord::TruncateVisibilityMap { heap_blocks } => {
                out.push(5);
                out.extend_from_slice(&heap_blocks.to_le_bytes());
            }
        }
    }

    /// Reads a record's stored form.
    pub fn decode(b: &[u8]) -> Result<NativeRecord, NativeError> {
        let mut r = b;
        fn take<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], NativeError> {
            if r.len() < n {
                return Err(NativeError::Encoding("truncated"));
            }
            let (a, rest) = r.split_at(n);
            *r = rest;
            Ok(a)
        }
        let u8_ = |r: &mut &[u8]| take(r, 1).map(|b| b[0]);
        let u32_ = |r: &mut &[u8]| take(r, 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        // Counts are bounded by what the bytes can hold, so garbage cannot allocate much.
        let count = |r: &mut &[u8], each: usize| -> Result<usize, NativeError> {
            let n = u32_(r)? as usize;
            if n.saturating_mul(each) > r.len() {
                return Err(NativeError::Encoding("count exceeds the record"));
            }
            Ok(n)
        };
        let rec = match u8_(&mut r)? {
            0 => {
                let status = XactStatus::from_bits(u8_(&mut r)?);
                let n = count(&mut r, 4)?;
                let xids = (0..n).map(|_| u32_(&mut r)).collect::<Result<_, _>>()?;
                NativeRecord::ClogSetStatus { xids, status }
            }
            1 => {
                NativeRecord::MultixactOffsetCreate { mid: u32_(&mut r)?, moff: u32_(&mut r)?, nmembers: u32_(&mut r)? }
            }
            2 => {
                let moff = u32_(&mut r)?;
                let n = count(&mut r, 5)?;
                let members = (0..n)
                    .map(|_| Ok(MultiXactMember { xid: u32_(&mut r)?, status: u8_(&mut r)? }))
                    .collect::<Result<_, NativeError>>()?;
                NativeRecord::MultixactMembersCreate { moff, members }
            }
            3 => {
                let flags = u8_(&mut r)?;
                let n = count(&mut r, 4)?;
                let heap_blocks = (0..n).map(|_| u32_(&mut r)).collect::<Result<_, _>>()?;
                NativeRecord::ClearVisibilityMapFlags { heap_blocks, flags }
            }
            4 => NativeRecord::SlruZeroPage,
            5 => NativeRecord::TruncateVisibilityMap { heap_blocks: u32_(&mut r)? },
            _ => return Err(NativeError::Encoding("unknown kind")),
        };
        if !r.is_empty() {
            return Err(NativeError::Encoding("trailing bytes"));
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;
    use smallvec::smallvec;

    #[test]
    fn stored_form_round_trips_and_rejects_garbage() {
        let recs = [
            NativeRecord::ClogSetStatus { xids: smallvec![3, 4, 70000], status: XactStatus::Aborted },
            NativeRecord::MultixactOffsetCreate { mid: 9, moff: 100, nmembers: 3 },
            NativeRecord::MultixactMembersCreate {
                moff: 100,
                members: vec![MultiXactMember { xid: 800, status: 1 }, MultiXactMember { xid: 801, status: 5 }],
            },
            NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![7, 99999], flags: 0x03 },
            NativeRecord::SlruZeroPage,
            NativeRecord::TruncateVisibilityMap { heap_blocks: 40000 },
        ];
        for rec in recs {
            let mut b = Vec::new();
            rec.encode(&mut b);
            assert_eq!(NativeRecord::decode(&b).unwrap(), rec);
            for cut in 0..b.len() {
                assert!(NativeRecord::decode(&b[..cut]).is_err(), "{rec:?} cut at {cut}");
            }
        }
        assert!(NativeRecord::decode(&[0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(NativeRecord::decode(&[9]).is_err());
    }
}

// ---- position arithmetic (the C macros, one function each) ----

/// The CLOG page holding `xid` (`TransactionIdToPage`).
pub fn clog_page(xid: TransactionId) -> u32 {
    xid / CLOG_XACTS_PER_PAGE
}

/// The byte within its CLOG page holding `xid`'s status and the bit shift of the status
/// (`TransactionIdToByte`, `TransactionIdToBIndex * CLOG_BITS_PER_XACT`).
pub fn clog_position(xid: TransactionId) -> (usize, u32) {
    let index = xid % CLOG_XACTS_PER_PAGE;
    ((index / CLOG_XACTS_PER_BYTE) as usize, (xid % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT)
}

/// The offsets page holding `mid`'s entry (`MultiXactIdToOffsetPage`).
pub fn mxoff_page(mid: MultiXactId) -> u32 {
    mid / MULTIXACT_OFFSETS_PER_PAGE
}

/// The byte offset of `mid`'s entry within its offsets page (`MultiXactIdToOffsetEntry * 4`).
pub fn mxoff_position(mid: MultiXactId) -> usize {
    (mid % MULTIXACT_OFFSETS_PER_PAGE) as usize * 4
}

/// The multixact after `mid`, skipping the invalid id 0 on wraparound.
pub fn next_multixact(mid: MultiXactId) -> MultiXactId {
    match mid.wrapping_add(1) {
        0 => FIRST_MULTIXACT_ID,
        next => next,
    }
}

/// The members offset after `n` members from `moff`, skipping offset 0 on wraparound as
/// `GetNewMultiXactId` and `RecordNewMultiXact` do.
pub fn next_member_offset(moff: MultiXactOffset, n: u32) -> MultiXactOffset {
    match moff.wrapping_add(n) {
        0 => 1,
        next => next,
    }
}

/// The members page holding member offset `off` (`MXOffsetToMemberPage`).
pub fn member_page(off: MultiXactOffset) -> u32 {
    off / MULTIXACT_MEMBERS_PER_PAGE
}

/// Where member `off` lives within its page: the byte offset of its group's flag word, the
/// bit shift of its status in that (little-endian) word, and the byte offset of its xid
/// (`MXOffsetToFlagsOffset`, `MXOffsetToFlagsBitShift`, `MXOffsetToMemberOffset`).
pub fn member_position(off: MultiXactOffset) -> (usize, u32, usize) {
    let flags_off =
        ((off / MULTIXACT_MEMBERS_PER_MEMBERGROUP) % MULTIXACT_MEMBERGROUPS_PER_PAGE) * MULTIXACT_MEMBERGROUP_SIZE;
    let in_group = off % MULTIXACT_MEMBERS_PER_MEMBERGROUP;
    let member_off = flags_off + MULTIXACT_FLAGBYTES_PER_GROUP + in_group * 4;
    (flags_off as usize, in_group * MXACT_MEMBER_BITS_PER_XACT, member_off as usize)
}

/// The visibility-map block covering heap block `heap_blk` (`HEAPBLK_TO_MAPBLOCK`).
pub fn vm_block(heap_blk: BlockNumber) -> BlockNumber {
    heap_blk / VM_HEAPBLOCKS_PER_PAGE
}

/// Where heap block `heap_blk`'s bits live in its visibility-map page: the byte offset from
/// the start of the page (page header included) and the bit shift (`HEAPBLK_TO_MAPBYTE`,
/// `HEAPBLK_TO_OFFSET`).
pub fn vm_position(heap_blk: BlockNumber) -> (usize, u32) {
    let byte = (heap_blk % VM_HEAPBLOCKS_PER_PAGE) / VM_HEAPBLOCKS_PER_BYTE;
    (SIZE_OF_PAGE_HEADER + byte as usize, (heap_blk % VM_HEAPBLOCKS_PER_BYTE) * VM_BITS_PER_HEAPBLOCK)
}

/// The visibility-map page a heap relation's block is covered by, as a target.
pub fn vm_target(heap: &BufferTag) -> NativeTarget {
    let mut tag = *heap;
    tag.rel.fork = ForkNumber::VisibilityMap;
    tag.blkno = vm_block(heap.blkno);
    NativeTarget::VisibilityMap(tag)
}

// ---- readers (what PostgreSQL would read back; used by tests and inspection) ----

/// `xid`'s status on its CLOG page (the caller picks the page: [`clog_page`]).
pub fn clog_status(page: &[u8; BLCKSZ], xid: TransactionId) -> XactStatus {
    let (byte, shift) = clog_position(xid);
    XactStatus::from_bits(page[byte] >> shift)
}

/// `mid`'s starting member offset on its offsets page.
pub fn mxoff_get(page: &[u8; BLCKSZ], mid: MultiXactId) -> MultiXactOffset {
    read_u32(page, mxoff_position(mid))
}

/// The member at offset `off` on its members page.
pub fn member_get(page: &[u8; BLCKSZ], off: MultiXactOffset) -> MultiXactMember {
    let (flags_off, shift, member_off) = member_position(off);
    MultiXactMember { xid: read_u32(page, member_off), status: (read_u32(page, flags_off) >> shift) as u8 }
}

/// Heap block `heap_blk`'s visibility-map bits on its VM page.
pub fn vm_flags(page: &[u8; BLCKSZ], heap_blk: BlockNumber) -> u8 {
    let (byte, shift) = vm_position(heap_blk);
    (page[byte] >> shift) & VISIBILITYMAP_VALID_BITS
}

fn read_u32(page: &[u8; BLCKSZ], at: usize) -> u32 {
    // Every position above is computed modulo the page's capacity, so `at + 4 <= BLCKSZ`.
    u32::from_le_bytes([page[at], page[at + 1], page[at + 2], page[at + 3]])
}

fn write_u32(page: &mut [u8; BLCKSZ], at: usize, v: u32) {
    page[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn read_u16(page: &[u8; BLCKSZ], at: usize) -> u16 {
    u16::from_le_bytes([page[at], page[at + 1]])
}

// ---- applying ----

/// Applies `rec` to `page`, the current version of `target`.
pub fn apply(target: &NativeTarget, rec: &NativeRecord, page: &mut [u8; BLCKSZ]) -> Result<(), NativeError> {
    let wrong = || NativeError::WrongTarget { record: rec.kind(), target: *target };
    let not_on_page = || NativeError::NotOnPage { record: rec.kind(), target: *target };
    match (rec, target) {
        (NativeRecord::SlruZeroPage, NativeTarget::VisibilityMap(_)) => Err(wrong()),
        (NativeRecord::SlruZeroPage, _) => {
            page.fill(0);
            Ok(())
        }
        (NativeRecord::ClogSetStatus { xids, status }, NativeTarget::Clog { pageno }) => {
            let mut touched = false;
            for &xid in xids.iter().filter(|&&x| clog_page(x) == *pageno) {
                let (byte, shift) = clog_position(xid);
                let mask = ((1u8 << CLOG_BITS_PER_XACT) - 1) << shift;
                page[byte] = (page[byte] & !mask) | ((*status as u8) << shift);
                touched = true;
            }
            touched.then_some(()).ok_or_else(not_on_page)
        }
        (NativeRecord::MultixactOffsetCreate { mid, moff, nmembers }, NativeTarget::MultiXactOffsets { pageno }) => {
            let mut touched = false;
            // Its own entry (normally already set by the previous multixact's record, unless
            // backends raced), then the next multixact's start.
            let next = next_multixact(*mid);
            for (m, off) in [(*mid, *moff), (next, next_member_offset(*moff, *nmembers))] {
                if mxoff_page(m) == *pageno {
                    write_u32(page, mxoff_position(m), off);
                    touched = true;
                }
            }
            touched.then_some(()).ok_or_else(not_on_page)
        }
        (NativeRecord::MultixactMembersCreate { moff, members }, NativeTarget::MultiXactMembers { pageno }) => {
            let mut touched = false;
            let mut off = *moff;
            for m in members {
                if member_page(off) == *pageno {
                    let (flags_off, shift, member_off) = member_position(off);
                    write_u32(page, member_off, m.xid);
                    let flags = read_u32(page, flags_off);
                    let mask = ((1u32 << MXACT_MEMBER_BITS_PER_XACT) - 1) << shift;
                    write_u32(page, flags_off, (flags & !mask) | ((m.status as u32) << shift));
                    touched = true;
                }
                off = off.wrapping_add(1);
            }
            touched.then_some(()).ok_or_else(not_on_page)
        }
        (NativeRecord::ClearVisibilityMapFlags { heap_blocks, flags }, NativeTarget::VisibilityMap(tag)) => {
            if tag.rel.fork != ForkNumber::VisibilityMap {
                return Err(wrong());
            }
            if *flags == 0 || *flags & !VISIBILITYMAP_VALID_BITS != 0 {
                return Err(NativeError::InvalidVmFlags { flags: *flags, target: *target });
            }
            let mine = || heap_blocks.iter().filter(|&&b| vm_block(b) == tag.blkno);
            if mine().next().is_none() {
                return Err(not_on_page());
            }
            prepare_vm_page(target, page)?;
            for &blk in mine() {
                let (byte, shift) = vm_position(blk);
                page[byte] &= !(*flags << shift);
            }
            Ok(())
        }
        (NativeRecord::TruncateVisibilityMap { heap_blocks }, NativeTarget::VisibilityMap(tag)) => {
            if tag.rel.fork != ForkNumber::VisibilityMap {
                return Err(wrong());
            }
            if vm_block(*heap_blocks) != tag.blkno {
                return Err(not_on_page());
            }
            let (byte, shift) = vm_position(*heap_blocks);
            if byte == SIZE_OF_PAGE_HEADER && shift == 0 {
                // The boundary is this page's first block: PostgreSQL drops the whole page.
                return Err(not_on_page());
            }
            prepare_vm_page(target, page)?;
            page[byte + 1..].fill(0);
            page[byte] &= ((1u16 << shift) - 1) as u8;
            Ok(())
        }
        _ => Err(wrong()),
    }
}

/// What `vm_readbuf` guarantees before `visibilitymap_clear` looks at a page: a page that was
/// never initialised (`PageIsNew`: `pd_upper == 0`) is `PageInit`ed (zeroes, `pd_lower` just
/// past the header, `pd_upper = pd_special = BLCKSZ`, size and layout version set, LSN 0).
///
/// PostgreSQL reads VM pages with `RBM_ZERO_ON_ERROR`, so it would also silently zero a page
/// whose header fails verification. We report it instead: a bad base page in our own store is
/// a bug to surface, not something to paper over.
fn prepare_vm_page(target: &NativeTarget, page: &mut [u8; BLCKSZ]) -> Result<(), NativeError> {
    let (flags, lower, upper, special) =
        (read_u16(page, 10), read_u16(page, 12), read_u16(page, 14), read_u16(page, 16));
    if upper == 0 {
        page.fill(0);
        page[12..14].copy_from_slice(&(SIZE_OF_PAGE_HEADER as u16).to_le_bytes());
        page[14..16].copy_from_slice(&(BLCKSZ as u16).to_le_bytes());
        page[16..18].copy_from_slice(&(BLCKSZ as u16).to_le_bytes());
        page[18..20].copy_from_slice(&(BLCKSZ as u16 | PG_PAGE_LAYOUT_VERSION).to_le_bytes());
        return Ok(());
    }
    // PageIsVerifiedExtended's header checks.
    let valid = flags & !PD_VALID_FLAG_BITS == 0
        && lower <= upper
        && upper <= special
        && special as usize <= BLCKSZ
        && special % 8 == 0
        && lower as usize >= SIZE_OF_PAGE_HEADER;
    if valid {
        Ok(())
    } else {
        Err(NativeError::BadVmPageHeader { target: *target, flags, lower, upper, special })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neon_types::{RelFileNode, RelTag};
    use smallvec::smallvec;

    fn zero() -> Box<[u8; BLCKSZ]> {
        Box::new([0u8; BLCKSZ])
    }

    fn vm_tag(blkno: u32) -> BufferTag {
        BufferTag {
            rel: RelTag {
                node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 },
                fork: ForkNumber::VisibilityMap,
            },
            blkno,
        }
    }

    #[test]
    fn constants_match_postgres() {
        assert_eq!(CLOG_XACTS_PER_PAGE, 32768);
        assert_eq!(MULTIXACT_OFFSETS_PER_PAGE, 2048);
        assert_eq!(MULTIXACT_MEMBERGROUP_SIZE, 20);
        assert_eq!(MULTIXACT_MEMBERGROUPS_PER_PAGE, 409);
        assert_eq!(MULTIXACT_MEMBERS_PER_PAGE, 1636);
        assert_eq!(VM_MAPSIZE, 8168);
        assert_eq!(VM_HEAPBLOCKS_PER_PAGE, 32672);
    }

    #[test]
    fn clog_positions_and_statuses() {
        // xids 0..4 share byte 0, low bits first.
        for xid in 0..4 {
            assert_eq!(clog_position(xid), (0, xid * 2));
        }
        assert_eq!(clog_position(4), (1, 0));
        assert_eq!(clog_position(32767), (8191, 6));
        assert_eq!((clog_page(32767), clog_page(32768)), (0, 1));
        assert_eq!(clog_position(32768), (0, 0));

        let mut page = zero();
        let t = NativeTarget::Clog { pageno: 0 };
        let rec = NativeRecord::ClogSetStatus { xids: smallvec![3, 5, 32767, 40000], status: XactStatus::Committed };
        apply(&t, &rec, &mut page).unwrap();
        assert_eq!(page[0], 0b01_00_00_00);
        assert_eq!(page[1], 0b00_00_01_00);
        assert_eq!(page[8191], 0b01_00_00_00);
        // Another status overwrites only its own two bits.
        let rec = NativeRecord::ClogSetStatus { xids: smallvec![5, 6], status: XactStatus::Aborted };
        apply(&t, &rec, &mut page).unwrap();
        assert_eq!(page[1], 0b00_10_10_00);
        assert_eq!(clog_status(&page, 3), XactStatus::Committed);
        assert_eq!(clog_status(&page, 6), XactStatus::Aborted);
        assert_eq!(clog_status(&page, 7), XactStatus::InProgress);
        // The xid on page 1 was left alone; a record with nothing on the page is misfiled.
        let rec = NativeRecord::ClogSetStatus { xids: smallvec![40000], status: XactStatus::SubCommitted };
        assert!(matches!(apply(&t, &rec, &mut page), Err(NativeError::NotOnPage { .. })));
        let t1 = NativeTarget::Clog { pageno: 1 };
        let mut p1 = zero();
        apply(&t1, &rec, &mut p1).unwrap();
        assert_eq!(clog_status(&p1, 40000), XactStatus::SubCommitted);
        assert_eq!(p1[(40000 - 32768) / 4], 0b11);
    }

    #[test]
    fn multixact_offsets_set_own_and_next_entry() {
        let mut page = zero();
        let t0 = NativeTarget::MultiXactOffsets { pageno: 0 };
        apply(&t0, &NativeRecord::MultixactOffsetCreate { mid: 1, moff: 1, nmembers: 2 }, &mut page).unwrap();
        assert_eq!(mxoff_get(&page, 1), 1);
        assert_eq!(mxoff_get(&page, 2), 3);
        assert_eq!(&page[4..12], &[1, 0, 0, 0, 3, 0, 0, 0]);
        // The last multixact of page 0: its next entry is the first of page 1.
        let rec = NativeRecord::MultixactOffsetCreate { mid: 2047, moff: 5000, nmembers: 3 };
        apply(&t0, &rec, &mut page).unwrap();
        assert_eq!(read_u32(&page, 8188), 5000);
        let mut p1 = zero();
        let t1 = NativeTarget::MultiXactOffsets { pageno: 1 };
        apply(&t1, &rec, &mut p1).unwrap();
        assert_eq!(mxoff_get(&p1, 2048), 5003);
        assert!(p1[4..].iter().all(|&b| b == 0));
        // Wraparound: after 0xFFFFFFFF comes multixact 1, and member offset 0 is skipped.
        assert_eq!(next_multixact(u32::MAX), 1);
        assert_eq!(next_member_offset(u32::MAX - 1, 2), 1);
        let rec = NativeRecord::MultixactOffsetCreate { mid: u32::MAX, moff: u32::MAX - 1, nmembers: 2 };
        let mut p0 = zero();
        apply(&t0, &rec, &mut p0).unwrap();
        assert_eq!(mxoff_get(&p0, 1), 1);
        let last = NativeTarget::MultiXactOffsets { pageno: mxoff_page(u32::MAX) };
        let mut pl = zero();
        apply(&last, &rec, &mut pl).unwrap();
        assert_eq!(mxoff_get(&pl, u32::MAX), u32::MAX - 1);
        // Nothing of it on page 5.
        let t5 = NativeTarget::MultiXactOffsets { pageno: 5 };
        assert!(matches!(apply(&t5, &rec, &mut pl), Err(NativeError::NotOnPage { .. })));
    }

    #[test]
    fn multixact_member_layout() {
        assert_eq!(member_position(0), (0, 0, 4));
        assert_eq!(member_position(3), (0, 24, 16));
        assert_eq!(member_position(4), (20, 0, 24));
        assert_eq!(member_position(1635), (8160, 24, 8176));
        assert_eq!((member_page(1635), member_page(1636)), (0, 1));
        assert_eq!(member_position(1636), (0, 0, 4));

        // Members 1634..1638 straddle pages 0 and 1.
        let members: Vec<_> = (0..4).map(|i| MultiXactMember { xid: 700 + i, status: i as u8 + 1 }).collect();
        let rec = NativeRecord::MultixactMembersCreate { moff: 1634, members };
        let (mut p0, mut p1) = (zero(), zero());
        apply(&NativeTarget::MultiXactMembers { pageno: 0 }, &rec, &mut p0).unwrap();
        apply(&NativeTarget::MultiXactMembers { pageno: 1 }, &rec, &mut p1).unwrap();
        // Page 0: the last group's flag bytes 2 and 3, and its xids 2 and 3.
        assert_eq!(&p0[8160..8164], &[0, 0, 1, 2]);
        assert_eq!(read_u32(&p0, 8172), 700);
        assert_eq!(read_u32(&p0, 8176), 701);
        assert!(p0[8180..].iter().all(|&b| b == 0), "the last 12 bytes stay unused");
        // Page 1: the first group's flag bytes 0 and 1, and its xids 0 and 1.
        assert_eq!(&p1[0..4], &[3, 4, 0, 0]);
        assert_eq!(read_u32(&p1, 4), 702);
        assert_eq!(read_u32(&p1, 8), 703);
        assert_eq!(member_get(&p1, 1637), MultiXactMember { xid: 703, status: 4 });
        // Rewriting a member replaces only its flag byte.
        let rec =
            NativeRecord::MultixactMembersCreate { moff: 1636, members: vec![MultiXactMember { xid: 9, status: 0 }] };
        apply(&NativeTarget::MultiXactMembers { pageno: 1 }, &rec, &mut p1).unwrap();
        assert_eq!(&p1[0..4], &[0, 4, 0, 0]);
        assert!(matches!(
            apply(&NativeTarget::MultiXactMembers { pageno: 0 }, &rec, &mut p0),
            Err(NativeError::NotOnPage { .. })
        ));
    }

    #[test]
    fn vm_clear_positions_and_page_init() {
        assert_eq!(vm_position(0), (24, 0));
        assert_eq!(vm_position(3), (24, 6));
        assert_eq!(vm_position(4), (25, 0));
        assert_eq!(vm_position(32671), (8191, 6));
        assert_eq!((vm_block(32671), vm_block(32672)), (0, 1));
        assert_eq!(vm_position(32672), (24, 0));

        // A new page is PageInit'ed; clearing on it leaves the bitmap zero.
        let t = NativeTarget::VisibilityMap(vm_tag(0));
        let mut page = zero();
        let rec = NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![5], flags: VISIBILITYMAP_VALID_BITS };
        apply(&t, &rec, &mut page).unwrap();
        assert_eq!(&page[..24], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 24, 0, 0, 0x20, 0, 0x20, 4, 0x20, 0, 0, 0, 0]);
        assert!(page[24..].iter().all(|&b| b == 0));

        // All bits set; clear both bits of block 5 and only ALL_FROZEN of block 6.
        page[24..].fill(0xFF);
        page[0] = 0x42; // an LSN byte: clearing must not touch it
        apply(&t, &rec, &mut page).unwrap();
        let rec = NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![6], flags: VISIBILITYMAP_ALL_FROZEN };
        apply(&t, &rec, &mut page).unwrap();
        assert_eq!(page[25], 0b11_01_00_11);
        assert_eq!(vm_flags(&page, 5), 0);
        assert_eq!(vm_flags(&page, 6), VISIBILITYMAP_ALL_VISIBLE);
        assert_eq!(vm_flags(&page, 7), 3);
        assert_eq!(page[0], 0x42);
        // The header (none of it 0xFF) and byte 25 are the only bytes not 0xFF.
        assert_eq!(page.iter().filter(|&&b| b != 0xFF).count(), 24 + 1);

        // Blocks of another VM page are not touched; only them: misfiled.
        let rec = NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![32672 + 4], flags: 1 };
        assert!(matches!(apply(&t, &rec, &mut page), Err(NativeError::NotOnPage { .. })));
        let t1 = NativeTarget::VisibilityMap(vm_tag(1));
        let mut p1 = zero();
        p1.copy_from_slice(&page[..]);
        apply(&t1, &rec, &mut p1).unwrap();
        assert_eq!(p1[25], 0b11_01_00_10);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut page = zero();
        let vm = NativeTarget::VisibilityMap(vm_tag(0));
        let clog = NativeTarget::Clog { pageno: 0 };
        assert!(matches!(apply(&vm, &NativeRecord::SlruZeroPage, &mut page), Err(NativeError::WrongTarget { .. })));
        let rec = NativeRecord::ClogSetStatus { xids: smallvec![3], status: XactStatus::Committed };
        assert!(matches!(apply(&vm, &rec, &mut page), Err(NativeError::WrongTarget { .. })));
        for flags in [0u8, 4, 0xFF] {
            let rec = NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![1], flags };
            assert!(matches!(apply(&vm, &rec, &mut page), Err(NativeError::InvalidVmFlags { .. })));
        }
        let rec = NativeRecord::ClearVisibilityMapFlags { heap_blocks: smallvec![1], flags: 1 };
        assert!(matches!(apply(&clog, &rec, &mut page), Err(NativeError::WrongTarget { .. })));
        let mut main = vm_tag(0);
        main.rel.fork = ForkNumber::Main;
        assert!(matches!(
            apply(&NativeTarget::VisibilityMap(main), &rec, &mut page),
            Err(NativeError::WrongTarget { .. })
        ));
        // A VM page whose header is garbage.
        page.fill(0xFF);
        let e = apply(&vm, &rec, &mut page).unwrap_err();
        assert!(matches!(e, NativeError::BadVmPageHeader { .. }));
        assert!(e.to_string().contains("visibility map 1663/5/16384_vm blk 0"), "{e}");
        // SLRU zero page.
        apply(&clog, &NativeRecord::SlruZeroPage, &mut page).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        assert!(NativeRecord::SlruZeroPage.will_init());
    }

    #[test]
    fn slru_file_locations() {
        assert_eq!(NativeTarget::Clog { pageno: 33 }.slru_file_location(), Some(("pg_xact/0001".into(), 8192)));
        assert_eq!(
            NativeTarget::MultiXactMembers { pageno: 32 * 0x1234 }.slru_file_location(),
            Some(("pg_multixact/members/1234".into(), 0))
        );
        assert_eq!(NativeTarget::VisibilityMap(vm_tag(0)).slru_file_location(), None);
    }

    proptest::proptest! {
        /// Any record on any target and any page: an error or a changed page, never a panic.
        #[test]
        fn garbage_never_panics(
            which in 0u8..5,
            target_kind in 0u8..4,
            pageno in proptest::prelude::any::<u32>(),
            values in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..20),
            small in proptest::prelude::any::<u8>(),
            fill in proptest::prelude::any::<u8>(),
        ) {
            let target = match target_kind {
                0 => NativeTarget::Clog { pageno },
                1 => NativeTarget::MultiXactOffsets { pageno },
                2 => NativeTarget::MultiXactMembers { pageno },
                _ => NativeTarget::VisibilityMap(vm_tag(pageno)),
            };
            let first = values.first().copied().unwrap_or(0);
            let rec = match which {
                0 => NativeRecord::ClogSetStatus {
                    xids: values.iter().copied().collect(),
                    status: XactStatus::from_bits(small),
                },
                1 => NativeRecord::MultixactOffsetCreate { mid: first, moff: pageno, nmembers: small as u32 },
                2 => NativeRecord::MultixactMembersCreate {
                    moff: first,
                    members: values.iter().map(|&x| MultiXactMember { xid: x, status: small }).collect(),
                },
                3 => NativeRecord::ClearVisibilityMapFlags { heap_blocks: values.iter().copied().collect(), flags: small },
                _ => NativeRecord::SlruZeroPage,
            };
            let mut page = [fill; BLCKSZ];
            let _ = apply(&target, &rec, &mut page);
        }
    }
}
