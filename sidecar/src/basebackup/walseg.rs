//! The WAL a base backup ships: one segment holding a real `XLOG_CHECKPOINT_SHUTDOWN` record
//! at the backup's LSN (two when the record runs past the segment's end), with valid page
//! headers, so stock PostgreSQL starts from it without replay (DESIGN.md §4). Bytes before the
//! record are zeroes: nothing reads them (startup reads the checkpoint record directly, then
//! WAL after it). The page holding the record has no `XLP_FIRST_IS_CONTRECORD` flag: with it,
//! a record right after the header is refused ("contrecord is requested"). A record crossing
//! into the next page continues there under a header that does carry the flag, with the
//! remaining length.
//!
//! ```text
//! record (114 bytes): XLogRecord (24: tot_len 114, xid 0, prev, info 0x00 SHUTDOWN,
//!   rmid 0 XLOG, crc) | XLR_BLOCK_ID_DATA_SHORT 255 | length 88 | CheckPoint (88 bytes)
//! ```

use crate::wal::checkpoint::{CheckPoint, SIZEOF_CHECKPOINT};
use crate::wal::consts::*;
use crate::wal::segment::SegmentId;
use neon_types::{Lsn, XLOG_BLCKSZ};

/// The bytes of the shutdown-checkpoint record.
pub fn checkpoint_record(checkpoint: &CheckPoint, prev: Lsn) -> Vec<u8> {
    let total = SIZE_OF_XLOG_RECORD + 2 + SIZEOF_CHECKPOINT;
    let mut r = Vec::with_capacity(total);
    r.extend_from_slice(&(total as u32).to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&prev.0.to_le_bytes());
    r.push(XLOG_CHECKPOINT_SHUTDOWN);
    r.push(RM_XLOG_ID);
    r.extend_from_slice(&[0, 0]);
    r.extend_from_slice(&[0; 4]);
    r.push(XLR_BLOCK_ID_DATA_SHORT);
    r.push(SIZEOF_CHECKPOINT as u8);
    r.extend_from_slice(&checkpoint.encode());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&r[SIZE_OF_XLOG_RECORD..]), &r[..XL_CRC_OFFSET]);
    r[XL_CRC_OFFSET..XL_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    r
}

fn page_header(page: &mut [u8], info: u16, tli: u32, pageaddr: Lsn, rem_len: u32, long: Option<(u64, u32)>) {
    let mut info = info;
    if long.is_some() {
        info |= XLP_LONG_HEADER;
    }
    page[0..2].copy_from_slice(&XLOG_PAGE_MAGIC.to_le_bytes());
    page[2..4].copy_from_slice(&info.to_le_bytes());
    page[4..8].copy_from_slice(&tli.to_le_bytes());
    page[8..16].copy_from_slice(&pageaddr.0.to_le_bytes());
    page[16..20].copy_from_slice(&rem_len.to_le_bytes());
    if let Some((sysid, seg_size)) = long {
        page[24..32].copy_from_slice(&sysid.to_le_bytes());
        page[32..36].copy_from_slice(&seg_size.to_le_bytes());
        page[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
    }
}

/// The segment files (name, bytes) holding `record` at `at` on timeline `tli`: the one `at`
/// is in and, when the record runs past its end, the next one, which continues it under a
/// long page header announcing the continuation (PostgreSQL's records cross segments so).
pub fn segments_with_record(at: Lsn, record: &[u8], tli: u32, sysid: u64, seg_size: u32) -> Vec<(String, Vec<u8>)> {
    let seg_len = seg_size as usize;
    let first_seg = at.0 / u64::from(seg_size);
    let seg_start = first_seg * u64::from(seg_size);
    // The segments side by side: positions count from the first one's start.
    let mut bytes = vec![0u8; seg_len];
    let mut pos = (at.0 - seg_start) as usize;
    let mut rest = record;
    let mut first = true;
    // The first page of a segment always has a (long) header; then every page the record
    // touches has one.
    page_header(&mut bytes[..XLOG_BLCKSZ], 0, tli, Lsn(seg_start), 0, Some((sysid, seg_size)));
    while !rest.is_empty() {
        let page_start = pos / XLOG_BLCKSZ * XLOG_BLCKSZ;
        if page_start >= bytes.len() {
            bytes.resize(bytes.len() + seg_len, 0);
        }
        let long = page_start.is_multiple_of(seg_len).then_some((sysid, seg_size));
        let header = if long.is_some() { SIZE_OF_LONG_PAGE_HEADER } else { SIZE_OF_SHORT_PAGE_HEADER };
        let addr = Lsn(seg_start + page_start as u64);
        let page = &mut bytes[page_start..page_start + XLOG_BLCKSZ];
        if !first {
            page_header(page, XLP_FIRST_IS_CONTRECORD, tli, addr, rest.len() as u32, long);
            pos = page_start + header;
        } else if page_start != 0 {
            page_header(page, 0, tli, addr, 0, long);
        }
        let room = page_start + XLOG_BLCKSZ - pos;
        let n = room.min(rest.len());
        bytes[pos..pos + n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        pos += n;
        first = false;
    }
    bytes
        .chunks(seg_len)
        .enumerate()
        .map(|(i, b)| (SegmentId { tli, segno: first_seg + i as u64 }.file_name(seg_size), b.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::page::record_start;
    use crate::wal::page::PageHeader;
    use crate::wal::record::DecodedRecord;

    /// The record's bytes read back as PostgreSQL's reader does from its LSN: across a page
    /// boundary, past the next page's header, which must announce the continuation.
    fn read_back(seg: &[u8], seg_start: u64, at: Lsn, len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pos = (at.0 - seg_start) as usize;
        while out.len() < len {
            if pos.is_multiple_of(XLOG_BLCKSZ) {
                let hdr = PageHeader::parse(&seg[pos..]);
                assert_ne!(hdr.info & XLP_FIRST_IS_CONTRECORD, 0);
                assert_eq!(hdr.rem_len as usize, len - out.len());
                pos += SIZE_OF_SHORT_PAGE_HEADER;
            }
            let n = (XLOG_BLCKSZ - pos % XLOG_BLCKSZ).min(len - out.len());
            out.extend_from_slice(&seg[pos..pos + n]);
            pos += n;
        }
        out
    }

    #[test]
    fn the_generated_checkpoint_reads_back_with_its_crc() {
        let seg_size = 16 << 20;
        let cp =
            CheckPoint { next_xid: 1000, next_oid: 20000, this_timeline: 1, prev_timeline: 1, ..Default::default() };
        // Mid-page, right after a header, and crossing into the next page.
        for lsn in [Lsn(0x0300_1234), Lsn(0x0300_2000), Lsn(0x0300_3FD8)] {
            let at = record_start(lsn, seg_size);
            let cp = CheckPoint { redo: at, ..cp };
            let record = checkpoint_record(&cp, Lsn(0));
            let segments = segments_with_record(at, &record, 1, 42, seg_size);
            assert_eq!(segments.len(), 1);
            let (name, bytes) = &segments[0];
            assert_eq!(name, "000000010000000000000003");
            let first = PageHeader::parse(bytes);
            assert_ne!(first.info & XLP_LONG_HEADER, 0);
            let page = (at.0 as usize - 0x0300_0000) / XLOG_BLCKSZ * XLOG_BLCKSZ;
            let own = PageHeader::parse(&bytes[page..]);
            assert_eq!((own.info & XLP_FIRST_IS_CONTRECORD, own.pageaddr), (0, Lsn(0x0300_0000 + page as u64)));
            let raw = read_back(bytes, 0x0300_0000, at, record.len());
            let rec = DecodedRecord::parse(at, Lsn(at.0 + 114), bytes::Bytes::from(raw)).expect("CRC and layout");
            assert_eq!(CheckPoint::decode(rec.main_data()).unwrap(), cp);
        }
        // Near a segment's end: the record goes on in the next segment, whose first page's long
        // header announces it.
        let at = record_start(Lsn(0x03FF_FFB0), seg_size);
        let cp = CheckPoint { redo: at, ..cp };
        let record = checkpoint_record(&cp, Lsn(0));
        let segments = segments_with_record(at, &record, 1, 42, seg_size);
        let names: Vec<&str> = segments.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["000000010000000000000003", "000000010000000000000004"]);
        let next = PageHeader::parse(&segments[1].1);
        assert_ne!(next.info & XLP_LONG_HEADER, 0);
        assert_eq!(next.pageaddr, Lsn(0x0400_0000));
        let (tail, spill) = (0x0400_0000 - at.0 as usize, record.len() - (0x0400_0000 - at.0 as usize));
        assert_eq!((next.info & XLP_FIRST_IS_CONTRECORD != 0, next.rem_len as usize), (true, spill));
        let mut raw = segments[0].1[seg_size as usize - tail..].to_vec();
        raw.extend_from_slice(&segments[1].1[SIZE_OF_LONG_PAGE_HEADER..SIZE_OF_LONG_PAGE_HEADER + spill]);
        let rec = DecodedRecord::parse(at, Lsn(at.0 + 114), bytes::Bytes::from(raw)).expect("CRC and layout");
        assert_eq!(CheckPoint::decode(rec.main_data()).unwrap(), cp);
        assert_eq!(record_start(Lsn(0x0300_0000), seg_size), Lsn(0x0300_0000 + 40));
        assert_eq!(record_start(Lsn(0x0300_2000), seg_size), Lsn(0x0300_2000 + 24));
        assert_eq!(record_start(Lsn(0x0300_1234), seg_size), Lsn(0x0300_1238));
    }
}
