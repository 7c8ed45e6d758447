//! One complete WAL record: its `XLogRecord` header, block references (with full-page images and
//! block data) and main data, parsed from the record's contiguous bytes the way PostgreSQL's
//! `DecodeXLogRecord` does, after checking the record's CRC32C.
//!
//! Parsing copies nothing. [`RecordMeta`] is what parsing learns — header, block references,
//! where each payload lies — and pairs with the record's bytes in two ways:
//! * [`RecordView`] borrows both from the decoder (the fastest path: no allocation, no
//!   reference counting; valid until the decoder moves on);
//! * [`DecodedRecord`] owns them (the bytes as a `Bytes`, usually a slice of the segment the
//!   record came from), for callers that keep records.

use super::consts::*;
use super::image::{restore_page, ImageError};
use super::rmgr::RmgrId;
use bytes::Bytes;
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, TransactionId, BLCKSZ};
use smallvec::SmallVec;
use std::ops::Range;

/// The fixed 24-byte header of every record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XLogRecordHeader {
    pub tot_len: u32,
    pub xid: TransactionId,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub crc: u32,
}

impl XLogRecordHeader {
    /// Parses the header from the first 24 bytes of `b`.
    pub fn parse(b: &[u8; SIZE_OF_XLOG_RECORD]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        XLogRecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: Lsn(u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"))),
            info: b[16],
            rmid: b[17],
            crc: u32_at(20),
        }
    }
}

/// Why a record's bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error(
        "incorrect resource manager data checksum in record at {lsn}: stored {stored:08X}, computed {computed:08X}"
    )]
    Crc { lsn: Lsn, stored: u32, computed: u32 },
    #[error("record at {lsn} is truncated: its headers run past its length {tot_len}")]
    ShortHeaders { lsn: Lsn, tot_len: u32 },
    #[error("record at {lsn}: lengths declare {declared} bytes but {actual} are there")]
    LengthMismatch { lsn: Lsn, declared: u64, actual: u64 },
    #[error("record at {lsn}: out-of-order block id {block_id}")]
    BlockOrder { lsn: Lsn, block_id: u8 },
    #[error("record at {lsn}: invalid block id {block_id}")]
    BlockId { lsn: Lsn, block_id: u8 },
    #[error("record at {lsn}: block {block_id} has invalid fork number {fork}")]
    Fork { lsn: Lsn, block_id: u8, fork: u8 },
    #[error("record at {lsn}: block {block_id}: {what}")]
    Block { lsn: Lsn, block_id: u8, what: String },
    #[error("record at {lsn}: BKPBLOCK_SAME_REL set on block {block_id} but no previous relation")]
    SameRelWithoutRel { lsn: Lsn, block_id: u8 },
}

/// A full-page image carried by a block reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockImage {
    /// `BKPIMAGE_*` bits: hole, apply, compression.
    pub bimg_info: u8,
    pub hole_offset: u16,
    pub hole_length: u16,
    /// Where the (possibly compressed) image bytes lie in the record.
    range: Range<u32>,
}

impl BlockImage {
    /// Whether redo restores this image (`BKPIMAGE_APPLY`); otherwise it is only for
    /// `wal_consistency_checking`.
    pub fn apply(&self) -> bool {
        self.bimg_info & BKPIMAGE_APPLY != 0
    }

    pub fn is_compressed(&self) -> bool {
        self.bimg_info & BKPIMAGE_COMPRESSED != 0
    }

    /// Length of the image bytes stored in the record (`bimg_len`).
    pub fn stored_len(&self) -> u32 {
        self.range.end - self.range.start
    }
}

/// One block reference of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRef {
    pub block_id: u8,
    pub tag: BufferTag,
    /// The raw `fork_flags` byte.
    pub flags: u8,
    pub image: Option<BlockImage>,
    /// Where the block data lie in the record (empty when the block has none).
    data: Range<u32>,
}

impl BlockRef {
    /// Redo initialises the page: no earlier version is needed.
    pub fn will_init(&self) -> bool {
        self.flags & BKPBLOCK_WILL_INIT != 0
    }

    pub fn has_data(&self) -> bool {
        self.flags & BKPBLOCK_HAS_DATA != 0
    }

    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }
}

/// Everything parsing learns about a record, apart from its bytes.
#[derive(Debug, Clone, Default)]
pub struct RecordMeta {
    /// Where the record starts.
    pub lsn: Lsn,
    /// Where it ends, MAXALIGNed, page headers included: the LSN redo stamps on the pages it
    /// touches and the key under which the page store files the record. For `XLOG_SWITCH`, the
    /// end of the segment.
    pub end_lsn: Lsn,
    pub header: XLogRecordHeader,
    pub blocks: SmallVec<[BlockRef; 3]>,
    main_data: Range<u32>,
    /// Replication origin, when the record names one.
    pub origin: Option<u16>,
    /// Top-level transaction of a subtransaction's first record (logical decoding aid).
    pub toplevel_xid: Option<TransactionId>,
}

/// A record borrowed from the decoder: its bytes and what parsing learnt about them.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The record's `xl_tot_len` bytes, header included.
    pub raw: &'a [u8],
    pub meta: &'a RecordMeta,
}

/// A record that owns its bytes.
#[derive(Debug, Clone)]
pub struct DecodedRecord {
    /// The record's `xl_tot_len` bytes, header included.
    pub raw: Bytes,
    pub meta: RecordMeta,
}

impl std::ops::Deref for RecordView<'_> {
    type Target = RecordMeta;
    fn deref(&self) -> &RecordMeta {
        self.meta
    }
}

impl std::ops::Deref for DecodedRecord {
    type Target = RecordMeta;
    fn deref(&self) -> &RecordMeta {
        &self.meta
    }
}

impl DecodedRecord {
    /// Checks the CRC and parses `raw` (exactly `xl_tot_len` bytes) as the record at `lsn`.
    pub fn parse(lsn: Lsn, end_lsn: Lsn, raw: Bytes) -> Result<DecodedRecord, RecordError> {
        let mut meta = RecordMeta::default();
        meta.parse(lsn, end_lsn, &raw)?;
        Ok(DecodedRecord { raw, meta })
    }

    pub fn view(&self) -> RecordView<'_> {
        RecordView { raw: &self.raw, meta: &self.meta }
    }

    pub fn main_data(&self) -> &[u8] {
        self.view().main_data()
    }

    /// The main data as a `Bytes` sharing the record's buffer.
    pub fn main_data_bytes(&self) -> Bytes {
        self.raw.slice(self.meta.main_data.start as usize..self.meta.main_data.end as usize)
    }

    pub fn block_data(&self, blk: &BlockRef) -> &[u8] {
        self.view().block_data(blk)
    }

    pub fn image_bytes(&self, img: &BlockImage) -> &[u8] {
        self.view().image_bytes(img)
    }

    pub fn restore_image(&self, img: &BlockImage, out: &mut [u8; BLCKSZ]) -> Result<(), ImageError> {
        self.view().restore_image(img, out)
    }
}

impl<'a> RecordView<'a> {
    pub fn main_data(&self) -> &'a [u8] {
        &self.raw[self.meta.main_data.start as usize..self.meta.main_data.end as usize]
    }

    pub fn block_data(&self, blk: &BlockRef) -> &'a [u8] {
        &self.raw[blk.data.start as usize..blk.data.end as usize]
    }

    /// The stored (possibly compressed, hole-less) bytes of a block's image.
    pub fn image_bytes(&self, img: &BlockImage) -> &'a [u8] {
        &self.raw[img.range.start as usize..img.range.end as usize]
    }

    /// Rebuilds the 8192-byte page of one of this record's full-page images into `out`.
    pub fn restore_image(&self, img: &BlockImage, out: &mut [u8; BLCKSZ]) -> Result<(), ImageError> {
        restore_page(self.image_bytes(img), img.bimg_info, img.hole_offset, img.hole_length, out)
    }

    /// An owned copy whose bytes are `raw` (which must hold this view's bytes).
    pub fn to_owned_with(&self, raw: Bytes) -> DecodedRecord {
        debug_assert_eq!(&raw[..], self.raw);
        DecodedRecord { raw, meta: self.meta.clone() }
    }
}

impl RecordMeta {
    /// Checks the CRC of `raw` (exactly `xl_tot_len` bytes, of the record at `lsn`) and parses
    /// it into `self`, reusing `self`'s storage.
    pub fn parse(&mut self, lsn: Lsn, end_lsn: Lsn, raw: &[u8]) -> Result<(), RecordError> {
        let Some(head) = raw.first_chunk::<SIZE_OF_XLOG_RECORD>() else {
            return Err(RecordError::ShortHeaders { lsn, tot_len: raw.len() as u32 });
        };
        let header = XLogRecordHeader::parse(head);
        if header.tot_len as usize != raw.len() {
            return Err(RecordError::LengthMismatch { lsn, declared: header.tot_len as u64, actual: raw.len() as u64 });
        }
        let computed = record_crc(raw);
        if computed != header.crc {
            return Err(RecordError::Crc { lsn, stored: header.crc, computed });
        }
        self.lsn = lsn;
        self.end_lsn = end_lsn;
        self.header = header;
        self.blocks.clear();
        self.main_data = 0..0;
        self.origin = None;
        self.toplevel_xid = None;
        self.parse_fragments(raw)
    }

    /// Walks the fragment headers, then lays the payloads out in the order PostgreSQL writes
    /// them: for each block its image then its data, and finally the main data.
    fn parse_fragments(&mut self, raw: &[u8]) -> Result<(), RecordError> {
        let lsn = self.lsn;
        let mut cur = Cursor { b: raw, pos: SIZE_OF_XLOG_RECORD, lsn, tot_len: self.header.tot_len };
        let mut payload: u64 = 0;
        let mut main_len: u32 = 0;
        let mut last_rel: Option<RelFileNode> = None;
        while (raw.len() - cur.pos) as u64 > payload {
            let block_id = cur.u8()?;
            match block_id {
                XLR_BLOCK_ID_DATA_SHORT => {
                    main_len = cur.u8()? as u32;
                    payload += main_len as u64;
                    break;
                }
                XLR_BLOCK_ID_DATA_LONG => {
                    main_len = cur.u32()?;
                    payload += main_len as u64;
                    break;
                }
                XLR_BLOCK_ID_ORIGIN => self.origin = Some(cur.u16()?),
                XLR_BLOCK_ID_TOPLEVEL_XID => self.toplevel_xid = Some(cur.u32()?),
                id if id <= XLR_MAX_BLOCK_ID => {
                    if self.blocks.last().is_some_and(|b| b.block_id >= id) {
                        return Err(RecordError::BlockOrder { lsn, block_id: id });
                    }
                    let bad = |what: String| RecordError::Block { lsn, block_id: id, what };
                    let flags = cur.u8()?;
                    let fork_no = flags & BKPBLOCK_FORK_MASK;
                    let fork = ForkNumber::try_from(fork_no).map_err(|_| RecordError::Fork {
                        lsn,
                        block_id: id,
                        fork: fork_no,
                    })?;
                    let data_len = cur.u16()? as u32;
                    let has_data = flags & BKPBLOCK_HAS_DATA != 0;
                    if has_data && data_len == 0 {
                        return Err(bad("BKPBLOCK_HAS_DATA set, but no data included".into()));
                    }
                    if !has_data && data_len != 0 {
                        return Err(bad(format!("BKPBLOCK_HAS_DATA not set, but data length is {data_len}")));
                    }
                    payload += data_len as u64;
                    let mut image = None;
                    let mut image_len = 0u32;
                    if flags & BKPBLOCK_HAS_IMAGE != 0 {
                        let bimg_len = cur.u16()? as u32;
                        let hole_offset = cur.u16()?;
                        let bimg_info = cur.u8()?;
                        let compressed = bimg_info & BKPIMAGE_COMPRESSED != 0;
                        let has_hole = bimg_info & BKPIMAGE_HAS_HOLE != 0;
                        let hole_length = if compressed {
                            if has_hole {
                                cur.u16()?
                            } else {
                                0
                            }
                        } else {
                            // Uncompressed images leave the hole's length implicit.
                            (BLCKSZ as u32).saturating_sub(bimg_len) as u16
                        };
                        if has_hole && (hole_offset == 0 || hole_length == 0 || bimg_len == BLCKSZ as u32) {
                            return Err(bad(format!(
                                "BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length} block image length {bimg_len}"
                            )));
                        }
                        if !has_hole && (hole_offset != 0 || hole_length != 0) {
                            return Err(bad(format!(
                                "BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset} length {hole_length}"
                            )));
                        }
                        if compressed && bimg_len == BLCKSZ as u32 {
                            return Err(bad(format!("BKPIMAGE_COMPRESSED set, but block image length {bimg_len}")));
                        }
                        if !has_hole && !compressed && bimg_len != BLCKSZ as u32 {
                            return Err(bad(format!(
                                "neither BKPIMAGE_HAS_HOLE nor BKPIMAGE_COMPRESSED set, but block image length is {bimg_len}"
                            )));
                        }
                        if bimg_len > BLCKSZ as u32 {
                            return Err(bad(format!("block image length {bimg_len} exceeds the page size")));
                        }
                        payload += bimg_len as u64;
                        image_len = bimg_len;
                        image = Some(BlockImage { bimg_info, hole_offset, hole_length, range: 0..0 });
                    }
                    let node = if flags & BKPBLOCK_SAME_REL == 0 {
                        let node = RelFileNode { spcnode: cur.u32()?, dbnode: cur.u32()?, relnode: cur.u32()? };
                        last_rel = Some(node);
                        node
                    } else {
                        last_rel.ok_or(RecordError::SameRelWithoutRel { lsn, block_id: id })?
                    };
                    let blkno = cur.u32()?;
                    if let Some(img) = image.as_mut() {
                        // Lengths for now; made offsets once the headers end.
                        img.range = 0..image_len;
                    }
                    self.blocks.push(BlockRef {
                        block_id: id,
                        tag: BufferTag { rel: RelTag { node, fork }, blkno },
                        flags,
                        image,
                        data: 0..data_len,
                    });
                }
                other => return Err(RecordError::BlockId { lsn, block_id: other }),
            }
        }
        let remaining = (raw.len() - cur.pos) as u64;
        if remaining != payload {
            return Err(RecordError::LengthMismatch { lsn, declared: payload, actual: remaining });
        }
        // The lengths were checked to sum to what remains, so the offsets below fit in u32
        // (xl_tot_len is a u32) and stay within the record.
        let mut pos = cur.pos as u32;
        for blk in self.blocks.iter_mut() {
            if let Some(img) = blk.image.as_mut() {
                let image_len = img.range.end;
                img.range = pos..pos + image_len;
                pos += image_len;
            }
            let data_len = blk.data.end;
            blk.data = pos..pos + data_len;
            pos += data_len;
        }
        self.main_data = pos..pos + main_len;
        Ok(())
    }

    pub fn rmgr(&self) -> Option<RmgrId> {
        RmgrId::from_u8(self.header.rmid)
    }

    /// The resource-manager bits of `xl_info`.
    pub fn info(&self) -> u8 {
        self.header.info & XLR_RMGR_INFO_MASK
    }

    pub fn xid(&self) -> TransactionId {
        self.header.xid
    }

    pub fn prev(&self) -> Lsn {
        self.header.prev
    }

    pub fn total_len(&self) -> u32 {
        self.header.tot_len
    }

    /// Bytes of full-page images in the record (what `pg_waldump` counts as FPI length).
    pub fn fpi_len(&self) -> u32 {
        self.blocks.iter().filter_map(|b| b.image.as_ref()).map(BlockImage::stored_len).sum()
    }

    /// `XLOG_SWITCH`: nothing follows in this segment.
    pub fn is_switch(&self) -> bool {
        is_switch(&self.header)
    }
}

pub(crate) fn is_switch(h: &XLogRecordHeader) -> bool {
    h.rmid == RM_XLOG_ID && h.info & XLR_RMGR_INFO_MASK == XLOG_SWITCH
}

/// The record's CRC32C as PostgreSQL computes it: the payload after the header, then the header
/// up to (not including) `xl_crc`.
pub fn record_crc(raw: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&raw[SIZE_OF_XLOG_RECORD..]);
    crc32c::crc32c_append(crc, &raw[..XL_CRC_OFFSET])
}

/// Bounds-checked little-endian reads over the fragment headers.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    lsn: Lsn,
    tot_len: u32,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let end = self.pos + N;
        let bytes =
            self.b.get(self.pos..end).ok_or(RecordError::ShortHeaders { lsn: self.lsn, tot_len: self.tot_len })?;
        self.pos = end;
        Ok(bytes.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Builds records byte by byte, for tests of the record parser and the stream decoder.
    use super::*;

    /// A block reference to encode.
    pub struct TestBlock {
        pub id: u8,
        pub node: RelFileNode,
        pub fork: u8,
        pub blkno: u32,
        pub data: Vec<u8>,
        /// (bimg_info, hole_offset, hole_length, stored bytes)
        pub image: Option<(u8, u16, u16, Vec<u8>)>,
        pub same_rel: bool,
        pub will_init: bool,
    }

    /// Encodes a record with a valid CRC, as XLogRecordAssemble would.
    pub fn build_record(rmid: u8, info: u8, xid: u32, prev: Lsn, blocks: &[TestBlock], main: &[u8]) -> Vec<u8> {
        let mut hdrs = Vec::new();
        let mut payload = Vec::new();
        for b in blocks {
            hdrs.push(b.id);
            let mut flags = b.fork;
            if !b.data.is_empty() {
                flags |= BKPBLOCK_HAS_DATA;
            }
            if b.image.is_some() {
                flags |= BKPBLOCK_HAS_IMAGE;
            }
            if b.same_rel {
                flags |= BKPBLOCK_SAME_REL;
            }
            if b.will_init {
                flags |= BKPBLOCK_WILL_INIT;
            }
            hdrs.push(flags);
            hdrs.extend_from_slice(&(b.data.len() as u16).to_le_bytes());
            if let Some((bimg_info, hole_offset, hole_length, bytes)) = &b.image {
                hdrs.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
                hdrs.extend_from_slice(&hole_offset.to_le_bytes());
                hdrs.push(*bimg_info);
                if bimg_info & BKPIMAGE_COMPRESSED != 0 && bimg_info & BKPIMAGE_HAS_HOLE != 0 {
                    hdrs.extend_from_slice(&hole_length.to_le_bytes());
                }
                payload.extend_from_slice(bytes);
            }
            if !b.same_rel {
                for v in [b.node.spcnode, b.node.dbnode, b.node.relnode] {
                    hdrs.extend_from_slice(&v.to_le_bytes());
                }
            }
            hdrs.extend_from_slice(&b.blkno.to_le_bytes());
            payload.extend_from_slice(&b.data);
        }
        if !main.is_empty() {
            if main.len() < 256 {
                hdrs.push(XLR_BLOCK_ID_DATA_SHORT);
                hdrs.push(main.len() as u8);
            } else {
                hdrs.push(XLR_BLOCK_ID_DATA_LONG);
                hdrs.extend_from_slice(&(main.len() as u32).to_le_bytes());
            }
            payload.extend_from_slice(main);
        }
        let tot_len = (SIZE_OF_XLOG_RECORD + hdrs.len() + payload.len()) as u32;
        let mut rec = Vec::with_capacity(tot_len as usize);
        rec.extend_from_slice(&tot_len.to_le_bytes());
        rec.extend_from_slice(&xid.to_le_bytes());
        rec.extend_from_slice(&prev.0.to_le_bytes());
        rec.push(info);
        rec.push(rmid);
        rec.extend_from_slice(&[0, 0]);
        rec.extend_from_slice(&[0; 4]);
        rec.extend_from_slice(&hdrs);
        rec.extend_from_slice(&payload);
        let crc = record_crc(&rec);
        rec[XL_CRC_OFFSET..XL_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn node(rel: u32) -> RelFileNode {
        RelFileNode { spcnode: 1663, dbnode: 5, relnode: rel }
    }

    #[test]
    fn blocks_images_and_main_data_are_located() {
        let mut img = vec![7u8; 100];
        img.extend(vec![9u8; BLCKSZ - 200]);
        let blocks = [
            TestBlock {
                id: 0,
                node: node(16384),
                fork: 0,
                blkno: 3,
                data: vec![1, 2, 3],
                image: Some((BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY, 100, 100, img.clone())),
                same_rel: false,
                will_init: false,
            },
            TestBlock {
                id: 2,
                node: node(16384),
                fork: 2,
                blkno: 0,
                data: vec![],
                image: None,
                same_rel: true,
                will_init: true,
            },
        ];
        let main = vec![0xAB; 300];
        let raw = build_record(10, 0x00, 734, Lsn(0x100), &blocks, &main);
        let rec = DecodedRecord::parse(Lsn(0x200), Lsn(0x200 + raw.len() as u64), Bytes::from(raw)).unwrap();
        assert_eq!(rec.xid(), 734);
        assert_eq!(rec.blocks.len(), 2);
        let b0 = &rec.blocks[0];
        assert_eq!(b0.tag.to_string(), "1663/5/16384 blk 3");
        assert_eq!(rec.block_data(b0), &[1, 2, 3]);
        assert_eq!(rec.image_bytes(b0.image.as_ref().unwrap()), &img[..]);
        assert_eq!(rec.fpi_len() as usize, img.len());
        let b1 = &rec.blocks[1];
        assert_eq!(b1.tag.rel.fork, ForkNumber::VisibilityMap);
        assert!(b1.will_init() && !b1.has_data());
        assert_eq!(rec.main_data(), &main[..]);
        let mut page = [0u8; BLCKSZ];
        rec.restore_image(b0.image.as_ref().unwrap(), &mut page).unwrap();
        assert_eq!(&page[..100], &img[..100]);
        assert!(page[100..200].iter().all(|&b| b == 0));
        assert_eq!(&page[200..], &img[100..]);
    }

    #[test]
    fn corrupt_records_give_typed_errors() {
        let raw = build_record(10, 0, 1, Lsn(0), &[], b"hello");
        let mut bad = raw.clone();
        bad[30] ^= 1;
        assert!(matches!(DecodedRecord::parse(Lsn(8), Lsn(64), Bytes::from(bad)), Err(RecordError::Crc { .. })));
        // A block claiming the previous block's relation when there is none.
        let b = TestBlock {
            id: 0,
            node: node(1),
            fork: 0,
            blkno: 0,
            data: vec![1],
            image: None,
            same_rel: true,
            will_init: false,
        };
        let raw = build_record(10, 0, 1, Lsn(0), &[b], b"");
        assert!(matches!(
            DecodedRecord::parse(Lsn(8), Lsn(64), Bytes::from(raw)),
            Err(RecordError::SameRelWithoutRel { .. })
        ));
    }
}
