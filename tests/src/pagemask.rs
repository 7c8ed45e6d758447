//! Page masking for comparisons, after PostgreSQL's own `bufmask.c` (used by
//! `wal_consistency_checking` to compare a replayed page with its full-page image): the parts
//! of a page that legitimately differ between two correct copies are overwritten with the
//! same marker on both sides before comparing.
//!
//! Besides the generic helpers of `src/backend/access/common/bufmask.c` this module has Rust
//! equivalents of PostgreSQL 15's per-access-method `rm_mask` functions (`heap_mask`,
//! `btree_mask`, `hash_mask`, `gin_mask`, `gist_mask`, `spg_mask`, `brin_mask`, `seq_mask`,
//! `generic_mask`); [`mask_page`] picks one by [`PageKind`].
//!
//! Page header layout (`PageHeaderData`): `pd_lsn` 0..8, `pd_checksum` 8..10, `pd_flags`
//! 10..12, `pd_lower` 12..14, `pd_upper` 14..16, `pd_special` 16..18, `pd_pagesize_version`
//! 18..20, `pd_prune_xid` 20..24, then the line pointers (`ItemIdData`, 4 bytes each:
//! `lp_off` bits 0..15, `lp_flags` bits 15..17, `lp_len` bits 17..32 of a little-endian u32).
//! Each access method keeps its own "opaque" data in the special space at `pd_special`.
//!
//! ## Garbage pages
//!
//! None of these functions panics whatever the page's header fields hold (the slice itself
//! must be a whole page, [`BLCKSZ`] bytes; [`mask_page`] and [`try_mask_page`] assert that).
//! Where PostgreSQL raises an error (`mask_unused_space`'s sanity check on
//! `pd_lower`/`pd_upper`/`pd_special`) masking stops there, as PostgreSQL's does, and the rest
//! of the page is left unmasked. Where PostgreSQL
//! would silently read or write outside the page (a special space or a tuple header lying past
//! the end of the page, which only a corrupt page has), the out-of-page part is skipped: for a
//! special space masking stops before touching it, for a heap item the out-of-page part of
//! that item is left alone and the loop goes on. [`try_mask_page`] reports either case as a
//! [`MaskError`]; [`mask_page`] ignores it.
//!
//! ## New pages
//!
//! None of PostgreSQL 15's mask functions checks `PageIsNew`; an all-zero page goes through
//! them like any other. For heap, btree, hash, gist, sequence and generic pages
//! `mask_unused_space`'s sanity check fails (`pd_lower` 0 is below the header size), which is
//! an `ERROR` in PostgreSQL and [`MaskError::InvalidBounds`] here; gin, spgist and brin skip
//! the hole for such a `pd_lower` and finish. Either way only zeros are written, so an all-zero
//! page stays all zeros.

use neon_types::BLCKSZ;
use std::fmt;

/// `MASK_MARKER` in bufmask.h.
pub const MASK_MARKER: u8 = 0;

/// `SizeOfPageHeaderData`.
pub const SIZE_OF_PAGE_HEADER: usize = 24;
/// `sizeof(ItemIdData)`.
const SIZE_OF_ITEM_ID: usize = 4;
/// `MAXIMUM_ALIGNOF` on x86_64.
const MAXIMUM_ALIGNOF: usize = 8;

// `PageHeaderData` field offsets.
const PD_FLAGS: usize = 10;
const PD_LOWER: usize = 12;
const PD_UPPER: usize = 14;
const PD_SPECIAL: usize = 16;
const PD_PRUNE_XID: usize = 20;

/// `pd_flags` bits (bufpage.h).
pub const PD_HAS_FREE_LINES: u16 = 0x0001;
pub const PD_PAGE_FULL: u16 = 0x0002;
pub const PD_ALL_VISIBLE: u16 = 0x0004;

/// `lp_flags` values (itemid.h).
pub const LP_UNUSED: u8 = 0;
pub const LP_NORMAL: u8 = 1;
pub const LP_REDIRECT: u8 = 2;
pub const LP_DEAD: u8 = 3;

/// `t_infomask` bits (htup_details.h) that heap_mask looks at.
pub const HEAP_XMIN_COMMITTED: u16 = 0x0100;
pub const HEAP_XMIN_INVALID: u16 = 0x0200;
pub const HEAP_XMIN_FROZEN: u16 = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID;
pub const HEAP_XMAX_COMMITTED: u16 = 0x0400;
pub const HEAP_XMAX_INVALID: u16 = 0x0800;
pub const HEAP_XACT_MASK: u16 = 0xFFF0;
/// `HEAP_COMBOCID`: `t_cid` is a combo CID; redo clears it with `t_cid` (`HeapTupleHeaderSetCmax`
/// with `FirstCommandId`, heapam.c `heap_xlog_delete`/`heap_xlog_update`).
pub const HEAP_COMBOCID: u16 = 0x0020;
/// What of `t_infomask` a standby may have different from the primary: the commit/abort hints
/// readers set without WAL (`SetHintBits`) and the combo-CID flag redo clears. Lock bits,
/// `XMAX_IS_MULTI`, `HEAP_UPDATED` and a frozen xmin are logged and kept exact.
const HEAP_STANDBY_INFOMASK_HINTS: u16 =
    HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID | HEAP_XMAX_COMMITTED | HEAP_XMAX_INVALID | HEAP_COMBOCID;
/// `SpecTokenOffsetNumber` (itemptr.h): `t_ctid`'s offset number of a speculative insertion.
pub const SPEC_TOKEN_OFFSET_NUMBER: u16 = 0xfffe;

// `HeapTupleHeaderData` field offsets: t_xmin 0, t_xmax 4, t_field3 (t_cid / t_xvac) 8,
// t_ctid 12 (bi_hi, bi_lo, ip_posid), t_infomask2 18, t_infomask 20, t_hoff 22.
const T_CID: usize = 8;
const T_CTID: usize = 12;
const T_INFOMASK: usize = 20;
/// The bytes of a tuple header heap_mask reads or writes (up to the end of `t_infomask`).
const HEAP_HEADER_EXTENT: usize = 22;

/// `btpo_flags` bits (nbtree.h).
pub const BTP_LEAF: u16 = 1 << 0;
pub const BTP_SPLIT_END: u16 = 1 << 5;
pub const BTP_HAS_GARBAGE: u16 = 1 << 6;
// `BTPageOpaqueData`: btpo_prev 0, btpo_next 4, btpo_level 8, btpo_flags 12, btpo_cycleid 14.
const BTPO_FLAGS: usize = 12;
const BTPO_CYCLEID: usize = 14;
const BT_OPAQUE_EXTENT: usize = 16;

/// `hasho_flag` values and bits (hash.h).
pub const LH_UNUSED_PAGE: u16 = 0;
pub const LH_OVERFLOW_PAGE: u16 = 1 << 0;
pub const LH_BUCKET_PAGE: u16 = 1 << 1;
pub const LH_BITMAP_PAGE: u16 = 1 << 2;
pub const LH_META_PAGE: u16 = 1 << 3;
pub const LH_PAGE_HAS_DEAD_TUPLES: u16 = 1 << 7;
pub const LH_PAGE_TYPE: u16 = LH_OVERFLOW_PAGE | LH_BUCKET_PAGE | LH_BITMAP_PAGE | LH_META_PAGE;
// `HashPageOpaqueData`: hasho_prevblkno 0, hasho_nextblkno 4, hasho_bucket 8, hasho_flag 12,
// hasho_page_id 14.
const HASHO_FLAG: usize = 12;
const HASH_OPAQUE_EXTENT: usize = 14;

/// `GinPageOpaqueData.flags` bit (ginblock.h).
pub const GIN_DELETED: u16 = 1 << 2;
// `GinPageOpaqueData`: rightlink 0, maxoff 4, flags 6.
const GIN_FLAGS: usize = 6;
const GIN_OPAQUE_EXTENT: usize = 8;

/// `GISTPageOpaqueData.flags` bits (gist.h).
pub const F_LEAF: u16 = 1 << 0;
pub const F_FOLLOW_RIGHT: u16 = 1 << 3;
pub const F_HAS_GARBAGE: u16 = 1 << 4;
// `GISTPageOpaqueData`: nsn 0..8, rightlink 8, flags 12, gist_page_id 14.
const GIST_NSN: usize = 0;
const GIST_FLAGS: usize = 12;
const GIST_OPAQUE_EXTENT: usize = 14;

/// BRIN page types and flags (brin_page.h).
pub const BRIN_PAGETYPE_META: u16 = 0xF091;
pub const BRIN_PAGETYPE_REVMAP: u16 = 0xF092;
pub const BRIN_PAGETYPE_REGULAR: u16 = 0xF093;
pub const BRIN_EVACUATE_PAGE: u16 = 1 << 0;
// `BrinSpecialSpace` is `uint16 vector[4]`: the flags are vector[2], the page type vector[3].
const BRIN_FLAGS: usize = 4;
const BRIN_TYPE: usize = 6;
const BRIN_SPECIAL_EXTENT: usize = 8;

/// Which mask function applies, by the relation's access method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageKind {
    Heap,
    Btree,
    Hash,
    Gin,
    Gist,
    SpGist,
    Brin,
    Sequence,
    Generic,
}

impl PageKind {
    /// Every kind.
    pub const ALL: [PageKind; 9] = [
        PageKind::Heap,
        PageKind::Btree,
        PageKind::Hash,
        PageKind::Gin,
        PageKind::Gist,
        PageKind::SpGist,
        PageKind::Brin,
        PageKind::Sequence,
        PageKind::Generic,
    ];

    /// The kind for an access method name as `pg_am.amname` spells it. Sequences (relkind
    /// `'S'`) have no access method: use [`PageKind::Sequence`]; pages written through generic
    /// WAL (e.g. by `bloom`) are [`PageKind::Generic`].
    pub fn from_amname(am: &str) -> Option<PageKind> {
        Some(match am {
            "heap" => PageKind::Heap,
            "btree" => PageKind::Btree,
            "hash" => PageKind::Hash,
            "gin" => PageKind::Gin,
            "gist" => PageKind::Gist,
            "spgist" => PageKind::SpGist,
            "brin" => PageKind::Brin,
            _ => return None,
        })
    }

    /// The kind for a `pg_class` row: its `relkind` (`'S'`: a sequence) and its access
    /// method's `amname` ('' for none).
    pub fn of_relation(relkind: &str, amname: &str) -> Option<PageKind> {
        if relkind == "S" {
            Some(PageKind::Sequence)
        } else {
            PageKind::from_amname(amname)
        }
    }

    /// The name of PostgreSQL's mask function for this kind.
    pub fn mask_function(self) -> &'static str {
        match self {
            PageKind::Heap => "heap_mask",
            PageKind::Btree => "btree_mask",
            PageKind::Hash => "hash_mask",
            PageKind::Gin => "gin_mask",
            PageKind::Gist => "gist_mask",
            PageKind::SpGist => "spg_mask",
            PageKind::Brin => "brin_mask",
            PageKind::Sequence => "seq_mask",
            PageKind::Generic => "generic_mask",
        }
    }
}

/// Why masking stopped short of what PostgreSQL's function does on a valid page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskError {
    /// `mask_unused_space`'s sanity check failed; PostgreSQL raises
    /// `ERROR: invalid page pd_lower %u pd_upper %u pd_special %u`.
    InvalidBounds { lower: u16, upper: u16, special: u16 },
    /// The access method's fields in the special space at `pd_special` do not fit in the page
    /// (PostgreSQL would access memory past the page); the special space was left alone.
    SpecialOutOfPage { special: u16 },
    /// A line pointer, or the tuple header or padding it points to, lies (partly) past the end
    /// of the page; the out-of-page part was skipped.
    ItemOutOfPage { offnum: u16 },
}

impl fmt::Display for MaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MaskError::InvalidBounds { lower, upper, special } => {
                write!(f, "invalid page pd_lower {lower} pd_upper {upper} pd_special {special}")
            }
            MaskError::SpecialOutOfPage { special } => write!(f, "special space at {special} does not fit in the page"),
            MaskError::ItemOutOfPage { offnum } => write!(f, "item {offnum} lies past the end of the page"),
        }
    }
}

impl std::error::Error for MaskError {}

fn u16_at(page: &[u8], off: usize) -> usize {
    u16::from_le_bytes([page[off], page[off + 1]]) as usize
}

fn get_u16(page: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([page[off], page[off + 1]])
}

fn put_u16(page: &mut [u8], off: usize, v: u16) {
    page[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn maxalign(len: usize) -> usize {
    (len + MAXIMUM_ALIGNOF - 1) & !(MAXIMUM_ALIGNOF - 1)
}

/// `PageIsNew`: `pd_upper` is zero (the page was never initialized).
pub fn page_is_new(page: &[u8]) -> bool {
    u16_at(page, PD_UPPER) == 0
}

/// `PageGetMaxOffsetNumber`: the number of line pointers `pd_lower` says there are (zero when
/// `pd_lower` does not reach past the header).
pub fn max_offset_number(page: &[u8]) -> u16 {
    let lower = u16_at(page, PD_LOWER);
    if lower <= SIZE_OF_PAGE_HEADER {
        0
    } else {
        ((lower - SIZE_OF_PAGE_HEADER) / SIZE_OF_ITEM_ID) as u16
    }
}

/// A line pointer (`ItemIdData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemId {
    /// `lp_off`: offset of the item from the start of the page (15 bits).
    pub off: u16,
    /// `lp_flags`: one of [`LP_UNUSED`], [`LP_NORMAL`], [`LP_REDIRECT`], [`LP_DEAD`] (2 bits).
    pub flags: u8,
    /// `lp_len`: the item's length in bytes (15 bits).
    pub len: u16,
}

impl ItemId {
    /// Decodes the bitfields from the line pointer's 32 bits (read little-endian).
    pub fn from_raw(raw: u32) -> ItemId {
        ItemId { off: (raw & 0x7fff) as u16, flags: ((raw >> 15) & 0x3) as u8, len: (raw >> 17) as u16 }
    }

    /// The line pointer's 32 bits (to be stored little-endian).
    pub fn to_raw(self) -> u32 {
        (self.off as u32 & 0x7fff) | ((self.flags as u32 & 0x3) << 15) | ((self.len as u32 & 0x7fff) << 17)
    }
}

fn item_id_pos(offnum: u16) -> usize {
    SIZE_OF_PAGE_HEADER + (offnum as usize - 1) * SIZE_OF_ITEM_ID
}

/// The line pointer of `offnum` (1-based), or `None` if it would lie past the end of the page.
pub fn item_id(page: &[u8], offnum: u16) -> Option<ItemId> {
    if offnum == 0 {
        return None;
    }
    let pos = item_id_pos(offnum);
    let bytes = page.get(pos..pos + SIZE_OF_ITEM_ID)?;
    Some(ItemId::from_raw(u32::from_le_bytes(bytes.try_into().unwrap())))
}

/// Overwrites the line pointer of `offnum` (1-based); does nothing if it lies past the page.
pub fn set_item_id(page: &mut [u8], offnum: u16, iid: ItemId) {
    if offnum == 0 {
        return;
    }
    let pos = item_id_pos(offnum);
    if let Some(bytes) = page.get_mut(pos..pos + SIZE_OF_ITEM_ID) {
        bytes.copy_from_slice(&iid.to_raw().to_le_bytes());
    }
}

/// `mask_page_lsn_and_checksum`: the LSN and checksum depend on when and where a page was
/// written, not on its contents.
pub fn mask_lsn_and_checksum(page: &mut [u8]) {
    page[0..10].fill(MASK_MARKER);
}

/// `mask_page_lsn_and_checksum`, under PostgreSQL's name (same as [`mask_lsn_and_checksum`]).
pub fn mask_page_lsn_and_checksum(page: &mut [u8]) {
    mask_lsn_and_checksum(page);
}

/// `mask_page_hint_bits`: `pd_prune_xid` and the `PD_PAGE_FULL`, `PD_HAS_FREE_LINES` and
/// `PD_ALL_VISIBLE` flags, which are set without WAL (or, all-visible, not set on replay when
/// the page's LSN has moved on).
pub fn mask_page_hint_bits(page: &mut [u8]) {
    page[PD_PRUNE_XID..PD_PRUNE_XID + 4].fill(MASK_MARKER);
    let flags = get_u16(page, PD_FLAGS) & !(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE);
    put_u16(page, PD_FLAGS, flags);
}

/// `mask_unused_space`'s sanity check: the hole `pd_lower..pd_upper`, if the bounds are a
/// valid page's.
fn unused_space(page: &[u8]) -> Result<(usize, usize), MaskError> {
    let (lower, upper, special) = (u16_at(page, PD_LOWER), u16_at(page, PD_UPPER), u16_at(page, PD_SPECIAL));
    if lower > upper || special < upper || lower < SIZE_OF_PAGE_HEADER || special > page.len() {
        return Err(MaskError::InvalidBounds { lower: lower as u16, upper: upper as u16, special: special as u16 });
    }
    Ok((lower, upper))
}

fn try_mask_unused_space(page: &mut [u8]) -> Result<(), MaskError> {
    let (lower, upper) = unused_space(page)?;
    page[lower..upper].fill(MASK_MARKER);
    Ok(())
}

/// `mask_unused_space`: the free space between `pd_lower` and `pd_upper`. Full-page images
/// leave it out, and some code (btree builds truncating `pd_lower`) leaves stale bytes in it.
/// Returns false, masking nothing, when the header's bounds are not a valid page's (where
/// PostgreSQL raises an error).
pub fn mask_unused_space(page: &mut [u8]) -> bool {
    try_mask_unused_space(page).is_ok()
}

/// `mask_lp_flags`: sets the flags of every used line pointer (up to `pd_lower`) to
/// `LP_UNUSED`, keeping `lp_off` and `lp_len`; index AMs set `LP_DEAD` without WAL. Line
/// pointers past the end of the page (a garbage `pd_lower`) are left alone.
pub fn mask_lp_flags(page: &mut [u8]) {
    for offnum in 1..=max_offset_number(page) {
        let Some(mut iid) = item_id(page, offnum) else { break };
        if iid.flags != LP_UNUSED {
            iid.flags = LP_UNUSED;
            set_item_id(page, offnum, iid);
        }
    }
}

/// `mask_page_content`: everything after the page header, and `pd_lower` and `pd_upper`
/// (for pages such as deleted index pages whose contents do not matter).
pub fn mask_page_content(page: &mut [u8]) {
    page[SIZE_OF_PAGE_HEADER..].fill(MASK_MARKER);
    page[PD_LOWER..PD_UPPER + 2].fill(MASK_MARKER);
}

/// `PageGetSpecialPointer` for an access method whose fields extend `extent` bytes into the
/// special space: the offset of the special space, if those fields lie within the page.
/// (PostgreSQL's release builds do not check `pd_special` at all.)
fn special_space(page: &[u8], extent: usize) -> Result<usize, MaskError> {
    let special = u16_at(page, PD_SPECIAL);
    if special + extent > page.len() {
        return Err(MaskError::SpecialOutOfPage { special: special as u16 });
    }
    Ok(special)
}

/// `heap_mask` (heapam.c).
pub fn heap_mask(page: &mut [u8], blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);
    try_mask_unused_space(page)?;

    let mut result = Ok(());
    // Like the C loop, re-read pd_lower for every item: on a garbage page a tuple header can
    // overlap the page header.
    let mut off: u16 = 1;
    while off <= max_offset_number(page) {
        let Some(iid) = item_id(page, off) else {
            return Err(MaskError::ItemOutOfPage { offnum: off });
        };
        let item = iid.off as usize;
        if iid.flags == LP_NORMAL {
            if item + HEAP_HEADER_EXTENT <= page.len() {
                // Unless xmin is frozen, ignore all visibility hint bits (set without WAL);
                // for a frozen tuple still the xmax ones.
                let mut infomask = get_u16(page, item + T_INFOMASK);
                if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN {
                    infomask &= !HEAP_XACT_MASK;
                } else {
                    infomask &= !(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED);
                }
                put_u16(page, item + T_INFOMASK, infomask);
                // Replay sets t_cid to FirstCommandId.
                page[item + T_CID..item + T_CID + 4].fill(MASK_MARKER);
                // A speculative insertion's t_ctid holds a token on the primary; replay points
                // it at the tuple itself.
                if get_u16(page, item + T_CTID + 4) == SPEC_TOKEN_OFFSET_NUMBER {
                    put_u16(page, item + T_CTID, (blkno >> 16) as u16);
                    put_u16(page, item + T_CTID + 2, (blkno & 0xffff) as u16);
                    put_u16(page, item + T_CTID + 4, off);
                }
            } else {
                result = result.and(Err(MaskError::ItemOutOfPage { offnum: off }));
            }
        }
        // The padding after an item whose length is not MAXALIGNed. (The C code reads lp_len
        // through the line pointer again, after the tuple header was modified.)
        let len = item_id(page, off).map_or(0, |iid| iid.len as usize);
        if len != 0 {
            let (start, end) = (item + len, item + maxalign(len));
            if end > start && end > page.len() {
                result = result.and(Err(MaskError::ItemOutOfPage { offnum: off }));
            }
            let (start, end) = (start.min(page.len()), end.min(page.len()));
            page[start..end].fill(MASK_MARKER);
        }
        off += 1;
    }
    result
}

/// `btree_mask` (nbtxlog.c).
pub fn btree_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);
    try_mask_unused_space(page)?;

    let opaque = special_space(page, BT_OPAQUE_EXTENT)?;
    let flags = get_u16(page, opaque + BTPO_FLAGS);
    if flags & BTP_LEAF != 0 {
        // _bt_killitems() and _bt_check_unique() set LP_DEAD without WAL.
        mask_lp_flags(page);
    }
    // BTP_HAS_GARBAGE is an unlogged hint; replay of a split sets neither BTP_SPLIT_END nor
    // the cycle id of the right sibling.
    let flags = get_u16(page, opaque + BTPO_FLAGS) & !(BTP_HAS_GARBAGE | BTP_SPLIT_END);
    put_u16(page, opaque + BTPO_FLAGS, flags);
    put_u16(page, opaque + BTPO_CYCLEID, 0);
    Ok(())
}

/// `hash_mask` (hash_xlog.c).
pub fn hash_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);
    try_mask_unused_space(page)?;

    let opaque = special_space(page, HASH_OPAQUE_EXTENT)?;
    let pagetype = get_u16(page, opaque + HASHO_FLAG) & LH_PAGE_TYPE;
    if pagetype == LH_UNUSED_PAGE {
        mask_page_content(page);
    } else if pagetype == LH_BUCKET_PAGE || pagetype == LH_OVERFLOW_PAGE {
        // hashgettuple() and _hash_kill_items() set LP_DEAD without WAL.
        mask_lp_flags(page);
    }
    let flag = get_u16(page, opaque + HASHO_FLAG) & !LH_PAGE_HAS_DEAD_TUPLES;
    put_u16(page, opaque + HASHO_FLAG, flag);
    Ok(())
}

/// `gin_mask` (ginxlog.c). GIN checks no page bounds before reading its flags; a deleted
/// page's content is masked whatever its header says.
pub fn gin_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);

    let opaque = special_space(page, GIN_OPAQUE_EXTENT)?;
    if get_u16(page, opaque + GIN_FLAGS) & GIN_DELETED != 0 {
        mask_page_content(page);
    } else if u16_at(page, PD_LOWER) > SIZE_OF_PAGE_HEADER {
        try_mask_unused_space(page)?;
    }
    Ok(())
}

/// `gist_mask` (gistxlog.c).
pub fn gist_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);
    try_mask_unused_space(page)?;

    let opaque = special_space(page, GIST_OPAQUE_EXTENT)?;
    // The NSN is an LSN.
    page[opaque + GIST_NSN..opaque + GIST_NSN + 8].fill(MASK_MARKER);
    // F_FOLLOW_RIGHT is updated on the left child after writing WAL: mask it by setting it.
    let flags = get_u16(page, opaque + GIST_FLAGS) | F_FOLLOW_RIGHT;
    put_u16(page, opaque + GIST_FLAGS, flags);
    if flags & F_LEAF != 0 {
        // gistkillitems() sets LP_DEAD without WAL.
        mask_lp_flags(page);
    }
    // Replay never marks a page as having garbage.
    let flags = get_u16(page, opaque + GIST_FLAGS) & !F_HAS_GARBAGE;
    put_u16(page, opaque + GIST_FLAGS, flags);
    Ok(())
}

/// `spg_mask` (spgxlog.c).
pub fn spg_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);
    if u16_at(page, PD_LOWER) >= SIZE_OF_PAGE_HEADER {
        try_mask_unused_space(page)?;
    }
    Ok(())
}

/// `brin_mask` (brin_xlog.c).
pub fn brin_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    mask_page_hint_bits(page);

    let special = special_space(page, BRIN_SPECIAL_EXTENT)?;
    let pagetype = get_u16(page, special + BRIN_TYPE);
    if pagetype == BRIN_PAGETYPE_REGULAR
        || (pagetype == BRIN_PAGETYPE_META && u16_at(page, PD_LOWER) > SIZE_OF_PAGE_HEADER)
    {
        try_mask_unused_space(page)?;
    }
    // BRIN_EVACUATE_PAGE is not WAL-logged.
    let flags = get_u16(page, special + BRIN_FLAGS) & !BRIN_EVACUATE_PAGE;
    put_u16(page, special + BRIN_FLAGS, flags);
    Ok(())
}

/// `seq_mask` (sequence.c): no hint bits.
pub fn seq_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    try_mask_unused_space(page)
}

/// `generic_mask` (generic_xlog.c): no hint bits.
pub fn generic_mask(page: &mut [u8], _blkno: u32) -> Result<(), MaskError> {
    mask_lsn_and_checksum(page);
    try_mask_unused_space(page)
}

/// Masks `page` in place as PostgreSQL's `rm_mask` for `kind` does, telling whether it got
/// through (see the module documentation for what happens on invalid pages).
///
/// # Panics
///
/// If `page` is not [`BLCKSZ`] bytes long. The page's contents never cause a panic.
pub fn try_mask_page(kind: PageKind, page: &mut [u8], blkno: u32) -> Result<(), MaskError> {
    assert_eq!(page.len(), BLCKSZ, "a page is {BLCKSZ} bytes");
    match kind {
        PageKind::Heap => heap_mask(page, blkno),
        PageKind::Btree => btree_mask(page, blkno),
        PageKind::Hash => hash_mask(page, blkno),
        PageKind::Gin => gin_mask(page, blkno),
        PageKind::Gist => gist_mask(page, blkno),
        PageKind::SpGist => spg_mask(page, blkno),
        PageKind::Brin => brin_mask(page, blkno),
        PageKind::Sequence => seq_mask(page, blkno),
        PageKind::Generic => generic_mask(page, blkno),
    }
}

/// Masks `page` (8192 bytes) in place exactly as PostgreSQL's `rm_mask` for that kind does
/// (`blkno` as the C functions take it: heap uses it for speculative tuples' `t_ctid`). On an
/// invalid page masking stops where PostgreSQL's would fail; see [`try_mask_page`].
pub fn mask_page(kind: PageKind, page: &mut [u8], blkno: u32) {
    let _ = try_mask_page(kind, page, blkno);
}

/// Masks `page` as PostgreSQL's `rm_mask` does ([`try_mask_page`]) but for what a streaming
/// standby's page after redo has exactly as the primary's page on disk after a `CHECKPOINT`:
/// `rm_mask` masks these only because `wal_consistency_checking` compares a full-page image
/// taken *before* the record set them (`bufmask.c`, `mask_page_lsn_and_checksum`):
///
/// | kept exact | why a standby has the primary's value |
/// |---|---|
/// | `pd_lsn` | every redo routine and an image restore set the record's LSN (`PageSetLSN`; `xlogutils.c`, `XLogReadBufferForRedoExtended`) |
/// | `PD_ALL_VISIBLE` | set only by `HEAP2_VISIBLE`'s redo, cleared by the heap records that log `ALL_VISIBLE_CLEARED` (`heapam.c`) |
/// | GiST NSN | an LSN set by the split's redo (`gistxlog.c`, `gistRedoPageSplitRecord`) |
/// | GiST `F_FOLLOW_RIGHT` | set by the split's redo, cleared by the redo of the parent's downlink insert (`gistRedoClearFollowRight`) |
///
/// Everything else `rm_mask` masks is what the primary changes without WAL (hint bits,
/// `LP_DEAD`, garbage flags, vacuum cycle IDs), what redo sets to a constant (`t_cid`,
/// speculative `t_ctid`) or what a full-page image leaves out (the hole between `pd_lower` and
/// `pd_upper`, padding after tuples): [`pages::compare_page`](crate::pages::compare_page)
/// lists each with its source.
pub fn mask_for_standby(kind: PageKind, page: &mut [u8], blkno: u32) -> Result<(), MaskError> {
    let original = page.to_vec();
    let result = try_mask_page(kind, page, blkno);
    keep_logged_item_state(kind, page, &original);
    page[0..8].copy_from_slice(&original[0..8]);
    let flags = (get_u16(page, PD_FLAGS) & !PD_ALL_VISIBLE) | (get_u16(&original, PD_FLAGS) & PD_ALL_VISIBLE);
    put_u16(page, PD_FLAGS, flags);
    if kind == PageKind::Gist {
        if let Ok(opaque) = special_space(&original, GIST_OPAQUE_EXTENT) {
            page[opaque + GIST_NSN..opaque + GIST_NSN + 8]
                .copy_from_slice(&original[opaque + GIST_NSN..opaque + GIST_NSN + 8]);
            let follow = get_u16(&original, opaque + GIST_FLAGS) & F_FOLLOW_RIGHT;
            put_u16(page, opaque + GIST_FLAGS, (get_u16(page, opaque + GIST_FLAGS) & !F_FOLLOW_RIGHT) | follow);
        }
    }
    result
}

/// Puts back what `rm_mask` masks of items but a standby has exactly: line-pointer flags of
/// index leaves (only `LP_DEAD` is set without WAL, and [`adopt_unlogged_lp_dead`] allows that
/// one way) and heap `t_infomask` but for [`HEAP_STANDBY_INFOMASK_HINTS`]. A line pointer is
/// put back only where masking changed nothing but its flags (not on pages whose whole content
/// is masked).
fn keep_logged_item_state(kind: PageKind, page: &mut [u8], original: &[u8]) {
    let index = matches!(kind, PageKind::Btree | PageKind::Hash | PageKind::Gist);
    if !index && kind != PageKind::Heap {
        return;
    }
    for offnum in 1..=max_offset_number(original).min(max_offset_number(page)) {
        let (Some(was), Some(mut now)) = (item_id(original, offnum), item_id(page, offnum)) else { break };
        if (was.off, was.len) != (now.off, now.len) {
            continue;
        }
        if index && now.flags != was.flags {
            now.flags = was.flags;
            set_item_id(page, offnum, now);
        }
        let at = was.off as usize + T_INFOMASK;
        if kind == PageKind::Heap && was.flags == LP_NORMAL && at + 2 <= page.len() {
            let masked = get_u16(page, at) & HEAP_STANDBY_INFOMASK_HINTS;
            put_u16(page, at, (get_u16(original, at) & !HEAP_STANDBY_INFOMASK_HINTS) | masked);
        }
    }
}

/// Marks `LP_DEAD` in `standby` the index-leaf items that are `LP_DEAD` in `primary` and
/// `LP_NORMAL` in `standby`: the primary kills items without WAL (`_bt_killitems`,
/// `_hash_kill_items`, `gistkillitems`), so a standby may lack the flag; it never has one the
/// primary lacks (redo sets `LP_DEAD` only by restoring the primary's own image).
pub fn adopt_unlogged_lp_dead(kind: PageKind, standby: &mut [u8], primary: &[u8]) {
    if !matches!(kind, PageKind::Btree | PageKind::Hash | PageKind::Gist) {
        return;
    }
    for offnum in 1..=max_offset_number(standby).min(max_offset_number(primary)) {
        let (Some(mut ours), Some(theirs)) = (item_id(standby, offnum), item_id(primary, offnum)) else { break };
        if ours.flags == LP_NORMAL && theirs.flags == LP_DEAD && (ours.off, ours.len) == (theirs.off, theirs.len) {
            ours.flags = LP_DEAD;
            set_item_id(standby, offnum, ours);
        }
    }
}

/// The first byte at which two pages differ, if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn masks_hole_and_header_fields() {
        let mut page = vec![0xAAu8; BLCKSZ];
        page[12..14].copy_from_slice(&100u16.to_le_bytes());
        page[14..16].copy_from_slice(&200u16.to_le_bytes());
        page[16..18].copy_from_slice(&(BLCKSZ as u16).to_le_bytes());
        assert!(mask_unused_space(&mut page));
        mask_lsn_and_checksum(&mut page);
        assert!(page[100..200].iter().all(|&b| b == MASK_MARKER));
        assert!(page[0..10].iter().all(|&b| b == MASK_MARKER));
        assert_eq!(page[99], 0xAA);
        assert_eq!(page[200], 0xAA);
        let mut bad = vec![0u8; BLCKSZ];
        assert!(!mask_unused_space(&mut bad));
        assert_eq!(first_difference(&page, &page), None);
    }

    // ---- page construction ----

    fn put32(p: &mut [u8], off: usize, v: u32) {
        p[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A page with the given bounds whose every byte is non-zero (so that masking any byte to
    /// zero shows), with an LSN, checksum, `pd_flags` 0 and a `pd_prune_xid`.
    fn page(lower: u16, upper: u16, special: u16) -> Vec<u8> {
        let mut p: Vec<u8> = (0..BLCKSZ).map(|i| ((i * 7 + 3) % 255 + 1) as u8).collect();
        p[0..8].copy_from_slice(&0x0000_0001_2345_6789u64.to_le_bytes()[..]);
        put_u16(&mut p, 8, 0xBEEF);
        put_u16(&mut p, PD_FLAGS, 0);
        put_u16(&mut p, PD_LOWER, lower);
        put_u16(&mut p, PD_UPPER, upper);
        put_u16(&mut p, PD_SPECIAL, special);
        put_u16(&mut p, 18, 0x2004);
        put32(&mut p, PD_PRUNE_XID, 777);
        p
    }

    fn lp(p: &mut [u8], offnum: u16, off: u16, flags: u8, len: u16) {
        set_item_id(p, offnum, ItemId { off, flags, len });
    }

    /// What every kind except sequence/generic does to the header.
    fn expect_header(e: &mut [u8], hint_bits: bool) {
        e[0..10].fill(0);
        if hint_bits {
            e[PD_PRUNE_XID..PD_PRUNE_XID + 4].fill(0);
            let f = get_u16(e, PD_FLAGS) & !0x7;
            put_u16(e, PD_FLAGS, f);
        }
    }

    fn expect_hole(e: &mut [u8]) {
        let (lower, upper) = (u16_at(e, PD_LOWER), u16_at(e, PD_UPPER));
        e[lower..upper].fill(0);
    }

    /// Masks a copy of `p` and checks it equals `expected` byte for byte.
    #[track_caller]
    fn check(kind: PageKind, p: &[u8], blkno: u32, expected: &[u8], result: Result<(), MaskError>) {
        let mut got = p.to_vec();
        assert_eq!(try_mask_page(kind, &mut got, blkno), result, "{kind:?}");
        let diffs: Vec<usize> = (0..BLCKSZ).filter(|&i| got[i] != expected[i]).collect();
        assert!(
            diffs.is_empty(),
            "{kind:?}: {} bytes differ from the expected masking, first at {:?} (got {:#04x}, expected {:#04x})",
            diffs.len(),
            diffs.first(),
            got[diffs[0]],
            expected[diffs[0]]
        );
        // Masking a masked page changes nothing more (for these well-formed pages).
        let mut again = got.clone();
        mask_page(kind, &mut again, blkno);
        assert_eq!(first_difference(&again, &got), None, "{kind:?}: masking is not idempotent");
    }

    // ---- line pointers ----

    #[test]
    fn item_id_bitfields_match_gcc_layout() {
        // lp_off = 8100 (0x1FA4), lp_flags = LP_NORMAL, lp_len = 27:
        // 0x1FA4 | 1 << 15 | 27 << 17 = 0x0036_9FA4, stored little-endian.
        let mut p = vec![0u8; BLCKSZ];
        p[24..28].copy_from_slice(&[0xA4, 0x9F, 0x36, 0x00]);
        assert_eq!(item_id(&p, 1), Some(ItemId { off: 8100, flags: LP_NORMAL, len: 27 }));
        lp(&mut p, 2, 0x7fff, LP_DEAD, 0x7fff);
        assert_eq!(&p[28..32], &[0xff; 4]);
        lp(&mut p, 3, 0, LP_REDIRECT, 0);
        assert_eq!(&p[32..36], &[0x00, 0x00, 0x01, 0x00]);
        assert_eq!(item_id(&p, 0), None);
        assert_eq!(item_id(&p, 2048), None); // 24 + 2047 * 4 + 4 > 8192
        assert!(item_id(&p, 2042).is_some());
    }

    #[test]
    fn bufmask_helpers() {
        let mut p = page(24 + 3 * 4, 8000, 8192);
        put_u16(&mut p, PD_FLAGS, 0xFF);
        lp(&mut p, 1, 8000, LP_NORMAL, 10);
        lp(&mut p, 2, 8100, LP_DEAD, 20);
        lp(&mut p, 3, 0, LP_UNUSED, 0);
        let orig = p.clone();

        mask_page_hint_bits(&mut p);
        let mut e = orig.clone();
        e[20..24].fill(0);
        put_u16(&mut e, PD_FLAGS, 0xF8);
        assert_eq!(p, e);

        mask_lp_flags(&mut p);
        lp(&mut e, 1, 8000, LP_UNUSED, 10);
        lp(&mut e, 2, 8100, LP_UNUSED, 20);
        assert_eq!(p, e);

        mask_page_content(&mut p);
        e[24..].fill(0);
        e[12..16].fill(0);
        assert_eq!(p, e);
        assert_eq!(u16_at(&p, PD_SPECIAL), 8192);

        // mask_lp_flags with pd_lower past the page stops at the page's end.
        let mut p = vec![0xffu8; BLCKSZ];
        mask_lp_flags(&mut p);
        assert!((1..=2042).all(|off| item_id(&p, off) == Some(ItemId { off: 0x7fff, flags: LP_UNUSED, len: 0x7fff })));
        assert_eq!(item_id(&p, 2043), None);
        assert!(p[..SIZE_OF_PAGE_HEADER].iter().all(|&b| b == 0xff));
        assert_eq!(max_offset_number(&[0u8; 24]), 0);
    }

    // ---- heap ----

    const T_INFOMASK2: usize = 18;

    fn tuple(p: &mut [u8], at: usize, infomask: u16, ctid_posid: u16) {
        put_u16(p, at + T_INFOMASK, infomask);
        put_u16(p, at + T_CTID + 4, ctid_posid);
        put_u16(p, at + T_INFOMASK2, 0x0803);
    }

    #[test]
    fn heap_hint_bits_cid_ctid_and_padding() {
        let blkno = 0x0001_0203;
        let mut p = page(24 + 6 * 4, 7992, 8192);
        put_u16(&mut p, PD_FLAGS, PD_HAS_FREE_LINES | PD_PAGE_FULL | PD_ALL_VISIBLE | 0x0100);
        // 1: not frozen (xmin committed, every other bit but xmin-invalid), 27 bytes (5 padding).
        lp(&mut p, 1, 8100, LP_NORMAL, 27);
        tuple(&mut p, 8100, !HEAP_XMIN_INVALID, 1);
        // 2: frozen, 40 bytes (no padding).
        lp(&mut p, 2, 8000, LP_NORMAL, 40);
        tuple(&mut p, 8000, 0xFFFF, 2);
        // 3: speculative insertion, not frozen, 50 bytes (6 padding).
        lp(&mut p, 3, 8040, LP_NORMAL, 50);
        tuple(&mut p, 8040, HEAP_XMAX_INVALID | 0x0003, SPEC_TOKEN_OFFSET_NUMBER);
        // 4: dead with storage, 30 bytes (2 padding): the header is not looked at.
        lp(&mut p, 4, 8136, LP_DEAD, 30);
        tuple(&mut p, 8136, 0xFFFF, SPEC_TOKEN_OFFSET_NUMBER);
        // 5: redirect, 6: unused.
        lp(&mut p, 5, 1, LP_REDIRECT, 0);
        lp(&mut p, 6, 0, LP_UNUSED, 0);

        let mut e = p.clone();
        expect_header(&mut e, true);
        assert_eq!(get_u16(&e, PD_FLAGS), 0x0100);
        expect_hole(&mut e);
        // 1
        put_u16(&mut e, 8100 + T_INFOMASK, 0x000F);
        e[8108..8112].fill(0);
        e[8127..8132].fill(0);
        // 2: only the xmax hint bits go.
        put_u16(&mut e, 8000 + T_INFOMASK, 0xF3FF);
        e[8008..8012].fill(0);
        // 3
        put_u16(&mut e, 8040 + T_INFOMASK, 0x0003);
        e[8048..8052].fill(0);
        e[8052..8058].copy_from_slice(&[0x01, 0x00, 0x03, 0x02, 0x03, 0x00]);
        e[8090..8096].fill(0);
        // 4
        e[8166..8168].fill(0);
        check(PageKind::Heap, &p, blkno, &e, Ok(()));
        // t_infomask2 is never touched.
        let mut got = p.clone();
        mask_page(PageKind::Heap, &mut got, blkno);
        for at in [8100, 8000, 8040, 8136] {
            assert_eq!(get_u16(&got, at + T_INFOMASK2), 0x0803);
        }
    }

    #[test]
    fn heap_items_past_the_page_end() {
        let mut p = page(24 + 3 * 4, 8000, 8192);
        // Header would run past the page: skipped; padding past the page: skipped.
        lp(&mut p, 1, 8180, LP_NORMAL, 20);
        // Header fits exactly (t_infomask ends at 8192), padding 8192..8200 does not.
        lp(&mut p, 2, 8170, LP_NORMAL, 22);
        tuple(&mut p, 8170, 0x0D0F, SPEC_TOKEN_OFFSET_NUMBER);
        // lp_off beyond the page altogether.
        lp(&mut p, 3, 0x7fff, LP_NORMAL, 0x7fff);
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        put_u16(&mut e, 8170 + T_INFOMASK, 0x000F);
        e[8178..8182].fill(0);
        e[8182..8188].copy_from_slice(&[0, 0, 9, 0, 2, 0]);
        check(PageKind::Heap, &p, 9, &e, Err(MaskError::ItemOutOfPage { offnum: 1 }));
    }

    #[test]
    fn heap_invalid_bounds_stop_after_the_header() {
        for (lower, upper, special) in [(100, 50, 8192), (20, 100, 8192), (24, 8000, 7000), (24, 8000, 9000)] {
            let p = page(lower, upper, special);
            let mut e = p.clone();
            expect_header(&mut e, true);
            check(PageKind::Heap, &p, 0, &e, Err(MaskError::InvalidBounds { lower, upper, special }));
        }
    }

    #[test]
    fn heap_tuple_overlapping_the_header_rereads_pd_lower() {
        // A garbage line pointer pointing at offset 4: t_cid (4+8..4+12) overwrites pd_lower
        // and pd_upper with zeros, so the loop ends after item 1 as PostgreSQL's does.
        let mut p = page(24 + 2 * 4, 100, 8192);
        lp(&mut p, 1, 4, LP_NORMAL, 8);
        lp(&mut p, 2, 200, LP_NORMAL, 9);
        let mut got = p.clone();
        assert_eq!(try_mask_page(PageKind::Heap, &mut got, 0), Ok(()));
        assert_eq!(u16_at(&got, PD_LOWER), 0);
        assert_eq!(got[200 + T_CID], p[200 + T_CID], "item 2 must not have been masked");
        assert_eq!(&got[209..216], &p[209..216]);
    }

    // ---- btree ----

    fn bt_page(flags: u16) -> Vec<u8> {
        let mut p = page(24 + 3 * 4, 8000, 8176);
        lp(&mut p, 1, 8000, LP_NORMAL, 16);
        lp(&mut p, 2, 8016, LP_DEAD, 16);
        lp(&mut p, 3, 0, LP_UNUSED, 0);
        put32(&mut p, 8176, 11); // btpo_prev
        put32(&mut p, 8180, 12); // btpo_next
        put32(&mut p, 8184, 0); // btpo_level
        put_u16(&mut p, 8176 + BTPO_FLAGS, flags);
        put_u16(&mut p, 8176 + BTPO_CYCLEID, 0x1234);
        p
    }

    #[test]
    fn btree_leaf_and_internal() {
        const BTP_ROOT: u16 = 1 << 1;
        const BTP_INCOMPLETE_SPLIT: u16 = 1 << 7;
        let flags = BTP_LEAF | BTP_ROOT | BTP_SPLIT_END | BTP_HAS_GARBAGE | BTP_INCOMPLETE_SPLIT;
        let p = bt_page(flags);
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        lp(&mut e, 1, 8000, LP_UNUSED, 16);
        lp(&mut e, 2, 8016, LP_UNUSED, 16);
        put_u16(&mut e, 8176 + BTPO_FLAGS, BTP_LEAF | BTP_ROOT | BTP_INCOMPLETE_SPLIT);
        put_u16(&mut e, 8176 + BTPO_CYCLEID, 0);
        check(PageKind::Btree, &p, 5, &e, Ok(()));

        // Internal page: line pointer flags stay.
        let p = bt_page(BTP_SPLIT_END | BTP_HAS_GARBAGE | BTP_ROOT);
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        put_u16(&mut e, 8176 + BTPO_FLAGS, BTP_ROOT);
        put_u16(&mut e, 8176 + BTPO_CYCLEID, 0);
        check(PageKind::Btree, &p, 5, &e, Ok(()));
    }

    /// What a standby's page may differ in after [`mask_for_standby`] and
    /// [`adopt_unlogged_lp_dead`]: hints and the combo-CID flag, and `LP_DEAD` only where the
    /// primary has it; never logged lock bits or an `LP_DEAD` the primary lacks.
    #[test]
    fn standby_comparison_keeps_logged_item_state() {
        let standby_equal = |kind: PageKind, standby: &[u8], primary: &[u8]| {
            let (mut a, mut b) = (standby.to_vec(), primary.to_vec());
            adopt_unlogged_lp_dead(kind, &mut a, &b);
            mask_for_standby(kind, &mut a, 3).unwrap();
            mask_for_standby(kind, &mut b, 3).unwrap();
            first_difference(&a, &b)
        };
        let mut heap = page(24 + 4, 8000, 8192);
        lp(&mut heap, 1, 8000, LP_NORMAL, 40);
        let locked = 0x0010 | 0x0040 | 0x0080 | 0x1000 | 0x2000; // KEYSHR, EXCL, LOCK_ONLY, MULTI, UPDATED
        tuple(&mut heap, 8000, locked, 1);
        let mut hinted = heap.clone();
        for hints in [HEAP_XMIN_COMMITTED, HEAP_XMIN_INVALID, HEAP_XMAX_COMMITTED | HEAP_XMAX_INVALID | HEAP_COMBOCID] {
            put_u16(&mut hinted, 8000 + T_INFOMASK, locked | hints);
            assert_eq!(standby_equal(PageKind::Heap, &heap, &hinted), None, "hints {hints:#x}");
        }
        // A frozen xmin (both xmin bits) is logged (FREEZE_PAGE): not a hint.
        put_u16(&mut hinted, 8000 + T_INFOMASK, locked | HEAP_XMIN_FROZEN);
        assert!(standby_equal(PageKind::Heap, &heap, &hinted).is_some());
        for bit in [0x0010, 0x0040, 0x0080, 0x1000, 0x2000] {
            let mut other = heap.clone();
            put_u16(&mut other, 8000 + T_INFOMASK, locked & !bit);
            let at = standby_equal(PageKind::Heap, &heap, &other);
            assert!(matches!(at, Some(a) if a == 8000 + T_INFOMASK || a == 8001 + T_INFOMASK), "bit {bit:#x}: {at:?}");
        }

        let primary = bt_page(BTP_LEAF); // item 2 LP_DEAD
        let mut standby = primary.clone();
        lp(&mut standby, 2, 8016, LP_NORMAL, 16);
        assert_eq!(standby_equal(PageKind::Btree, &standby, &primary), None);
        assert!(standby_equal(PageKind::Btree, &primary, &standby).is_some(), "LP_DEAD the primary lacks");
        let mut redirect = primary.clone();
        lp(&mut redirect, 1, 8000, LP_REDIRECT, 16);
        assert!(standby_equal(PageKind::Btree, &redirect, &primary).is_some(), "other line-pointer states");
    }

    #[test]
    fn btree_special_space_past_the_page() {
        let mut p = bt_page(BTP_LEAF);
        put_u16(&mut p, PD_SPECIAL, 8180); // opaque would end at 8196
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        check(PageKind::Btree, &p, 0, &e, Err(MaskError::SpecialOutOfPage { special: 8180 }));
    }

    // ---- hash ----

    fn hash_page(flag: u16) -> Vec<u8> {
        let mut p = page(24 + 2 * 4, 8000, 8176);
        lp(&mut p, 1, 8000, LP_NORMAL, 16);
        lp(&mut p, 2, 8016, LP_DEAD, 16);
        put_u16(&mut p, 8176 + HASHO_FLAG, flag);
        put_u16(&mut p, 8176 + 14, 0xFF80); // HASHO_PAGE_ID
        p
    }

    #[test]
    fn hash_page_types() {
        const LH_BUCKET_BEING_SPLIT: u16 = 1 << 5;
        for pagetype in [LH_BUCKET_PAGE, LH_OVERFLOW_PAGE, LH_BITMAP_PAGE, LH_META_PAGE] {
            let p = hash_page(pagetype | LH_PAGE_HAS_DEAD_TUPLES | LH_BUCKET_BEING_SPLIT);
            let mut e = p.clone();
            expect_header(&mut e, true);
            expect_hole(&mut e);
            if pagetype == LH_BUCKET_PAGE || pagetype == LH_OVERFLOW_PAGE {
                lp(&mut e, 1, 8000, LP_UNUSED, 16);
                lp(&mut e, 2, 8016, LP_UNUSED, 16);
            }
            put_u16(&mut e, 8176 + HASHO_FLAG, pagetype | LH_BUCKET_BEING_SPLIT);
            check(PageKind::Hash, &p, 1, &e, Ok(()));
        }

        // An unused page: everything but the header's other fields and pd_special.
        let p = hash_page(LH_UNUSED_PAGE | LH_PAGE_HAS_DEAD_TUPLES);
        let mut e = p.clone();
        expect_header(&mut e, true);
        e[24..].fill(0);
        e[12..16].fill(0);
        check(PageKind::Hash, &p, 1, &e, Ok(()));
        assert_eq!(u16_at(&e, PD_SPECIAL), 8176);
    }

    // ---- gin ----

    fn gin_page(lower: u16, upper: u16, flags: u16) -> Vec<u8> {
        let mut p = page(lower, upper, 8184);
        put_u16(&mut p, 8184 + GIN_FLAGS, flags);
        p
    }

    #[test]
    fn gin_deleted_and_live_pages() {
        const GIN_DATA: u16 = 1 << 0;
        const GIN_LEAF: u16 = 1 << 1;
        // Deleted: the whole content, even with bounds mask_unused_space would refuse.
        for (lower, upper) in [(40, 8000), (9000, 10)] {
            let p = gin_page(lower, upper, GIN_DELETED | GIN_LEAF);
            let mut e = p.clone();
            expect_header(&mut e, true);
            e[24..].fill(0);
            e[12..16].fill(0);
            check(PageKind::Gin, &p, 0, &e, Ok(()));
        }
        // Live page with pd_lower set: the hole.
        let p = gin_page(40, 8000, GIN_DATA | GIN_LEAF);
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        check(PageKind::Gin, &p, 0, &e, Ok(()));
        // pd_lower not set (at the header's end): no hole masking.
        let p = gin_page(24, 8000, GIN_DATA | GIN_LEAF);
        let mut e = p.clone();
        expect_header(&mut e, true);
        check(PageKind::Gin, &p, 0, &e, Ok(()));
        // Live page with invalid bounds.
        let p = gin_page(40, 30, GIN_LEAF);
        let mut e = p.clone();
        expect_header(&mut e, true);
        check(PageKind::Gin, &p, 0, &e, Err(MaskError::InvalidBounds { lower: 40, upper: 30, special: 8184 }));
        // Special space past the page: stop after the header.
        let mut p = gin_page(40, 8000, GIN_DELETED);
        put_u16(&mut p, PD_SPECIAL, 8190);
        let mut e = p.clone();
        expect_header(&mut e, true);
        check(PageKind::Gin, &p, 0, &e, Err(MaskError::SpecialOutOfPage { special: 8190 }));
    }

    // ---- gist ----

    #[test]
    fn gist_nsn_follow_right_garbage_and_lp_flags() {
        const F_TUPLES_DELETED: u16 = 1 << 2;
        for leaf in [true, false] {
            let mut p = page(24 + 2 * 4, 8000, 8176);
            lp(&mut p, 1, 8000, LP_NORMAL, 16);
            lp(&mut p, 2, 8016, LP_DEAD, 16);
            p[8176..8184].copy_from_slice(&0x0000_0002_0000_1000u64.to_le_bytes()[..]);
            put32(&mut p, 8184, 42); // rightlink
            let flags = F_HAS_GARBAGE | F_TUPLES_DELETED | if leaf { F_LEAF } else { 0 };
            put_u16(&mut p, 8176 + GIST_FLAGS, flags);
            put_u16(&mut p, 8176 + 14, 0xFF81); // GIST_PAGE_ID

            let mut e = p.clone();
            expect_header(&mut e, true);
            expect_hole(&mut e);
            e[8176..8184].fill(0);
            put_u16(&mut e, 8176 + GIST_FLAGS, (flags | F_FOLLOW_RIGHT) & !F_HAS_GARBAGE);
            if leaf {
                lp(&mut e, 1, 8000, LP_UNUSED, 16);
                lp(&mut e, 2, 8016, LP_UNUSED, 16);
            }
            check(PageKind::Gist, &p, 0, &e, Ok(()));
        }
    }

    // ---- spgist ----

    #[test]
    fn spgist_hole_only_with_pd_lower_set() {
        let p = page(40, 8000, 8184);
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        check(PageKind::SpGist, &p, 0, &e, Ok(()));

        // pd_lower == SizeOfPageHeaderData still masks (an empty hole start).
        let p = page(24, 8000, 8184);
        let mut e = p.clone();
        expect_header(&mut e, true);
        expect_hole(&mut e);
        check(PageKind::SpGist, &p, 0, &e, Ok(()));

        let p = page(20, 8000, 8184);
        let mut e = p.clone();
        expect_header(&mut e, true);
        check(PageKind::SpGist, &p, 0, &e, Ok(()));

        let p = page(40, 8000, 8200);
        let mut e = p.clone();
        expect_header(&mut e, true);
        check(PageKind::SpGist, &p, 0, &e, Err(MaskError::InvalidBounds { lower: 40, upper: 8000, special: 8200 }));
    }

    // ---- brin ----

    fn brin_page(lower: u16, pagetype: u16, flags: u16) -> Vec<u8> {
        let mut p = page(lower, 8000, 8184);
        put_u16(&mut p, 8184 + BRIN_FLAGS, flags);
        put_u16(&mut p, 8184 + BRIN_TYPE, pagetype);
        p
    }

    #[test]
    fn brin_page_types() {
        for (lower, pagetype, hole) in [
            (40, BRIN_PAGETYPE_REGULAR, true),
            (24, BRIN_PAGETYPE_REGULAR, true),
            (40, BRIN_PAGETYPE_META, true),
            (24, BRIN_PAGETYPE_META, false),
            (40, BRIN_PAGETYPE_REVMAP, false),
        ] {
            let p = brin_page(lower, pagetype, BRIN_EVACUATE_PAGE | 0x8000);
            let mut e = p.clone();
            expect_header(&mut e, true);
            if hole {
                expect_hole(&mut e);
            }
            put_u16(&mut e, 8184 + BRIN_FLAGS, 0x8000);
            check(PageKind::Brin, &p, 0, &e, Ok(()));
        }
        // A regular page with bad bounds: the evacuate flag is left too.
        let p = brin_page(20, BRIN_PAGETYPE_REGULAR, BRIN_EVACUATE_PAGE);
        let mut e = p.clone();
        expect_header(&mut e, true);
        check(PageKind::Brin, &p, 0, &e, Err(MaskError::InvalidBounds { lower: 20, upper: 8000, special: 8184 }));
    }

    // ---- sequence and generic ----

    #[test]
    fn sequence_and_generic_leave_hint_bits() {
        for kind in [PageKind::Sequence, PageKind::Generic] {
            let mut p = page(28, 8000, 8188);
            put_u16(&mut p, PD_FLAGS, PD_ALL_VISIBLE | PD_PAGE_FULL | PD_HAS_FREE_LINES);
            lp(&mut p, 1, 8000, LP_DEAD, 20);
            let mut e = p.clone();
            expect_header(&mut e, false);
            expect_hole(&mut e);
            check(kind, &p, 0, &e, Ok(()));
        }
    }

    // ---- new pages, kinds ----

    #[test]
    fn new_pages_stay_zero() {
        for kind in PageKind::ALL {
            let mut p = vec![0u8; BLCKSZ];
            assert!(page_is_new(&p));
            let r = try_mask_page(kind, &mut p, 7);
            assert!(p.iter().all(|&b| b == 0), "{kind:?}");
            let expected = match kind {
                PageKind::Gin | PageKind::SpGist | PageKind::Brin => Ok(()),
                _ => Err(MaskError::InvalidBounds { lower: 0, upper: 0, special: 0 }),
            };
            assert_eq!(r, expected, "{kind:?}");
        }
    }

    #[test]
    fn kinds_from_amname() {
        for (am, kind) in [
            ("heap", PageKind::Heap),
            ("btree", PageKind::Btree),
            ("hash", PageKind::Hash),
            ("gin", PageKind::Gin),
            ("gist", PageKind::Gist),
            ("spgist", PageKind::SpGist),
            ("brin", PageKind::Brin),
        ] {
            assert_eq!(PageKind::from_amname(am), Some(kind));
        }
        assert_eq!(PageKind::from_amname("bloom"), None);
        assert_eq!(PageKind::from_amname("sequence"), None);
        assert_eq!(PageKind::from_amname(""), None);
        assert_eq!(PageKind::Sequence.mask_function(), "seq_mask");
    }

    // ---- properties ----

    /// Pages with random contents whose header bounds are mostly plausible (so that the
    /// masking gets past the sanity check and walks random line pointers and special spaces).
    fn garbage_page() -> impl Strategy<Value = Vec<u8>> {
        let bound = prop_oneof![0u16..=BLCKSZ as u16 + 16, any::<u16>(), Just(BLCKSZ as u16), Just(0u16)];
        (
            prop::collection::vec(any::<u8>(), BLCKSZ),
            [bound.clone(), bound.clone(), bound],
            any::<bool>(),
            prop::collection::vec((0u16..2047, any::<u32>()), 0..64),
        )
            .prop_map(|(mut p, mut bounds, sorted, items)| {
                if sorted {
                    bounds.sort();
                }
                put_u16(&mut p, PD_LOWER, bounds[0]);
                put_u16(&mut p, PD_UPPER, bounds[1]);
                put_u16(&mut p, PD_SPECIAL, bounds[2]);
                // Some line pointers pointing near the end of the page.
                for (offnum, raw) in items {
                    let raw = (raw & !0x7fff) | (BLCKSZ as u32 - 64 + (raw & 0x7f));
                    if let Some(b) = p.get_mut(item_id_pos(offnum + 1)..item_id_pos(offnum + 1) + 4) {
                        b.copy_from_slice(&raw.to_le_bytes());
                    }
                }
                p
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn garbage_pages_never_panic(p in garbage_page(), blkno in any::<u32>()) {
            for kind in PageKind::ALL {
                let mut a = p.clone();
                let ra = try_mask_page(kind, &mut a, blkno);
                // Deterministic.
                let mut b = p.clone();
                let rb = try_mask_page(kind, &mut b, blkno);
                prop_assert_eq!(ra, rb);
                prop_assert_eq!(first_difference(&a, &b), None);
                // Masking only ever writes zeros, except heap's t_ctid of speculative tuples and
                // gist's F_FOLLOW_RIGHT.
                if !matches!(kind, PageKind::Heap | PageKind::Gist) {
                    for i in 0..BLCKSZ {
                        prop_assert!(a[i] == p[i] || a[i] & !p[i] == 0, "{:?} set bits at {}", kind, i);
                    }
                }
                // Sequence and generic masks touch nothing but the LSN, checksum and hole.
                if matches!(kind, PageKind::Sequence | PageKind::Generic) {
                    let hole = unused_space(&p).unwrap_or((0, 0));
                    for i in 10..BLCKSZ {
                        prop_assert!(a[i] == p[i] || (hole.0..hole.1).contains(&i));
                    }
                }
            }
        }

        /// Two copies of a valid heap page that differ only in what heap_mask ignores mask equal.
        #[test]
        fn heap_hint_bit_differences_mask_away(
            ntuples in 1usize..40,
            infomasks in prop::collection::vec(any::<u16>(), 40),
            noise in prop::collection::vec(any::<u32>(), 40),
            header_noise in any::<(u64, u16, u32, u16)>(),
            blkno in any::<u32>(),
        ) {
            let mut p = page((24 + 4 * ntuples) as u16, 0, 8192);
            // Tuples of 24..=87 bytes packed from the end of the page.
            let mut upper = BLCKSZ;
            for i in 0..ntuples {
                let len = 24 + (noise[i] as usize % 64);
                upper -= maxalign(len);
                lp(&mut p, i as u16 + 1, upper as u16, LP_NORMAL, len as u16);
                put_u16(&mut p, upper + T_INFOMASK, infomasks[i]);
            }
            put_u16(&mut p, PD_UPPER, upper as u16);

            let mut q = p.clone();
            q[0..8].copy_from_slice(&header_noise.0.to_le_bytes());
            put_u16(&mut q, 8, header_noise.1);
            put32(&mut q, PD_PRUNE_XID, header_noise.2);
            let flags = get_u16(&q, PD_FLAGS) | (header_noise.3 & 0x7);
            put_u16(&mut q, PD_FLAGS, flags);
            q[24 + 4 * ntuples..upper].fill(0x5A);
            for (i, noise) in noise.iter().enumerate().take(ntuples) {
                let iid = item_id(&q, i as u16 + 1).unwrap();
                let at = iid.off as usize;
                let infomask = get_u16(&q, at + T_INFOMASK);
                let hint = (noise >> 8) as u16;
                let infomask = if infomask & HEAP_XMIN_FROZEN == HEAP_XMIN_FROZEN {
                    infomask ^ (hint & (HEAP_XMAX_COMMITTED | HEAP_XMAX_INVALID))
                } else {
                    // Any visibility bit, as long as xmin does not become frozen.
                    let m = (infomask & !HEAP_XACT_MASK) | (hint & HEAP_XACT_MASK);
                    if m & HEAP_XMIN_FROZEN == HEAP_XMIN_FROZEN { m & !HEAP_XMIN_INVALID } else { m }
                };
                put_u16(&mut q, at + T_INFOMASK, infomask);
                put32(&mut q, at + T_CID, noise.rotate_left(7));
                let len = iid.len as usize;
                q[at + len..at + maxalign(len)].fill(0xEE);
            }
            prop_assert!(first_difference(&p, &q).is_some());
            prop_assert_eq!(try_mask_page(PageKind::Heap, &mut p, blkno), Ok(()));
            prop_assert_eq!(try_mask_page(PageKind::Heap, &mut q, blkno), Ok(()));
            prop_assert_eq!(first_difference(&p, &q), None);
        }
    }
}
