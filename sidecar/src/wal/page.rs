//! WAL page headers: every 8 KiB WAL page starts with one, the first page of each segment with
//! the long form that also names the cluster and the segment size. The decoder validates each
//! header it crosses the way PostgreSQL's `XLogReaderValidatePageHeader` does, because a page
//! that fails these checks is how the end of valid WAL (a zeroed or recycled page) shows itself.

use super::consts::*;
use neon_types::{Lsn, XLOG_BLCKSZ};

/// Where a record following `lsn` (the end of a record) begins: MAXALIGNed, and past the
/// page header at a page boundary. A base backup's checkpoint record goes there; a timeline
/// forked there holds nothing of its parent's after `lsn`.
pub fn record_start(lsn: Lsn, seg_size: u32) -> Lsn {
    let lsn = Lsn(lsn.0.div_ceil(8) * 8);
    let page = lsn.0 - lsn.0 % XLOG_BLCKSZ as u64;
    let header =
        if page.is_multiple_of(u64::from(seg_size)) { SIZE_OF_LONG_PAGE_HEADER } else { SIZE_OF_SHORT_PAGE_HEADER };
    // An LSN inside a page header (only a caller's arbitrary LSN can be) also means the
    // first byte after it.
    Lsn(lsn.0.max(page + header as u64))
}

/// A parsed page header, short or long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: u32,
    pub pageaddr: Lsn,
    pub rem_len: u32,
    /// Present when `info` has `XLP_LONG_HEADER`.
    pub long: Option<LongPageHeader>,
}

/// The extra fields of a segment's first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    pub sysid: u64,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

/// Why a page header is not the one expected at its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageHeaderError {
    #[error("invalid magic number {magic:04X} in WAL page at {page} (expected {XLOG_PAGE_MAGIC:04X}, PostgreSQL 15)")]
    Magic { page: Lsn, magic: u16 },
    #[error("invalid info bits {info:04X} in WAL page at {page}")]
    InfoBits { page: Lsn, info: u16 },
    #[error("WAL page at {page} starts a segment but has no long header")]
    MissingLongHeader { page: Lsn },
    #[error("WAL page at {page} has a long header but does not start a segment")]
    UnexpectedLongHeader { page: Lsn },
    #[error("unexpected pageaddr {found} in WAL page at {page} (a recycled segment or the end of WAL)")]
    PageAddr { page: Lsn, found: Lsn },
    #[error("WAL page at {page} is from a different database system: system identifier {found}, expected {expected}")]
    SystemId { page: Lsn, found: u64, expected: u64 },
    #[error("WAL page at {page} has segment size {found}, expected {expected}")]
    SegmentSize { page: Lsn, found: u32, expected: u32 },
    #[error("WAL page at {page} has XLOG_BLCKSZ {found}, expected {XLOG_BLCKSZ}")]
    BlockSize { page: Lsn, found: u32 },
    #[error("out-of-sequence timeline {found} (after {previous}) in WAL page at {page}")]
    TimelineBackwards { page: Lsn, found: u32, previous: u32 },
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl PageHeader {
    /// Header size implied by the first two fields (`XLogPageHeaderSize`); needs 4 bytes.
    pub fn size_from_prefix(prefix: &[u8]) -> usize {
        if u16_at(prefix, 2) & XLP_LONG_HEADER != 0 {
            SIZE_OF_LONG_PAGE_HEADER
        } else {
            SIZE_OF_SHORT_PAGE_HEADER
        }
    }

    /// Parses a header from `b`, which must hold at least [`PageHeader::size_from_prefix`] bytes.
    pub fn parse(b: &[u8]) -> PageHeader {
        let info = u16_at(b, 2);
        let long = (info & XLP_LONG_HEADER != 0).then(|| LongPageHeader {
            sysid: u64_at(b, 24),
            seg_size: u32_at(b, 32),
            xlog_blcksz: u32_at(b, 36),
        });
        PageHeader {
            magic: u16_at(b, 0),
            info,
            tli: u32_at(b, 4),
            pageaddr: Lsn(u64_at(b, 8)),
            rem_len: u32_at(b, 16),
            long,
        }
    }

    /// Size of this header on the page.
    pub fn size(&self) -> usize {
        if self.long.is_some() {
            SIZE_OF_LONG_PAGE_HEADER
        } else {
            SIZE_OF_SHORT_PAGE_HEADER
        }
    }

    pub fn is_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_CONTRECORD != 0
    }

    pub fn is_overwrite_contrecord(&self) -> bool {
        self.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0
    }
}

/// What the decoder knows about the WAL it is reading, used to validate each page header.
#[derive(Debug, Clone)]
pub struct PageValidator {
    /// The segment size; learnt from the first long header when not given.
    pub seg_size: Option<u32>,
    /// The cluster's system identifier; learnt from the first long header when not given.
    pub sysid: Option<u64>,
    last_page: Lsn,
    last_tli: u32,
}

impl PageValidator {
    pub fn new(seg_size: Option<u32>, sysid: Option<u64>) -> Self {
        PageValidator { seg_size, sysid, last_page: Lsn::INVALID, last_tli: 0 }
    }

    /// The timeline of the last page validated.
    pub fn timeline(&self) -> u32 {
        self.last_tli
    }

    /// Checks the header of the page starting at `page` (a multiple of XLOG_BLCKSZ).
    pub fn validate(&mut self, page: Lsn, hdr: &PageHeader) -> Result<(), PageHeaderError> {
        if hdr.magic != XLOG_PAGE_MAGIC {
            return Err(PageHeaderError::Magic { page, magic: hdr.magic });
        }
        if hdr.info & !XLP_ALL_FLAGS != 0 {
            return Err(PageHeaderError::InfoBits { page, info: hdr.info });
        }
        if let Some(long) = &hdr.long {
            if long.xlog_blcksz != XLOG_BLCKSZ as u32 {
                return Err(PageHeaderError::BlockSize { page, found: long.xlog_blcksz });
            }
            match self.seg_size {
                Some(expected) if expected != long.seg_size => {
                    return Err(PageHeaderError::SegmentSize { page, found: long.seg_size, expected })
                }
                None if !valid_segment_size(long.seg_size) => {
                    return Err(PageHeaderError::SegmentSize { page, found: long.seg_size, expected: 0 })
                }
                _ => {}
            }
            match self.sysid {
                Some(expected) if expected != long.sysid => {
                    return Err(PageHeaderError::SystemId { page, found: long.sysid, expected })
                }
                _ => {}
            }
            if page.segment_offset(long.seg_size) != 0 {
                return Err(PageHeaderError::UnexpectedLongHeader { page });
            }
            self.seg_size = Some(long.seg_size);
            self.sysid = Some(long.sysid);
        } else if let Some(seg) = self.seg_size {
            if page.segment_offset(seg) == 0 {
                return Err(PageHeaderError::MissingLongHeader { page });
            }
        }
        if hdr.pageaddr != page {
            return Err(PageHeaderError::PageAddr { page, found: hdr.pageaddr });
        }
        if page > self.last_page && hdr.tli < self.last_tli {
            return Err(PageHeaderError::TimelineBackwards { page, found: hdr.tli, previous: self.last_tli });
        }
        self.last_page = page;
        self.last_tli = hdr.tli;
        Ok(())
    }
}

/// PostgreSQL allows 1 MB to 1 GB, powers of two (`IsValidWalSegSize`).
pub fn valid_segment_size(size: u32) -> bool {
    size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size)
}

#[cfg(test)]
pub(crate) fn make_page_header(page: Lsn, info: u16, rem_len: u32, long: Option<(u64, u32)>) -> Vec<u8> {
    let mut h = Vec::with_capacity(SIZE_OF_LONG_PAGE_HEADER);
    h.extend_from_slice(&XLOG_PAGE_MAGIC.to_le_bytes());
    let info = if long.is_some() { info | XLP_LONG_HEADER } else { info };
    h.extend_from_slice(&info.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&page.0.to_le_bytes());
    h.extend_from_slice(&rem_len.to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    if let Some((sysid, seg)) = long {
        h.extend_from_slice(&sysid.to_le_bytes());
        h.extend_from_slice(&seg.to_le_bytes());
        h.extend_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 16 << 20;

    #[test]
    fn long_header_teaches_segment_size_and_sysid() {
        let mut v = PageValidator::new(None, None);
        let h = PageHeader::parse(&make_page_header(Lsn(SEG as u64), 0, 0, Some((42, SEG))));
        assert_eq!(h.size(), SIZE_OF_LONG_PAGE_HEADER);
        v.validate(Lsn(SEG as u64), &h).unwrap();
        assert_eq!((v.seg_size, v.sysid), (Some(SEG), Some(42)));
        let other = PageHeader::parse(&make_page_header(Lsn(2 * SEG as u64), 0, 0, Some((43, SEG))));
        assert!(matches!(v.validate(Lsn(2 * SEG as u64), &other), Err(PageHeaderError::SystemId { .. })));
    }

    #[test]
    fn recycled_and_zeroed_pages_are_rejected() {
        let mut v = PageValidator::new(Some(SEG), None);
        let page = Lsn(SEG as u64 + 8192);
        let stale = PageHeader::parse(&make_page_header(Lsn(8192), 0, 0, None));
        assert!(matches!(v.validate(page, &stale), Err(PageHeaderError::PageAddr { .. })));
        let zero = PageHeader::parse(&[0u8; 40]);
        assert!(matches!(v.validate(page, &zero), Err(PageHeaderError::Magic { .. })));
        let short_at_seg_start = PageHeader::parse(&make_page_header(Lsn(SEG as u64), 0, 0, None));
        assert!(matches!(
            v.validate(Lsn(SEG as u64), &short_at_seg_start),
            Err(PageHeaderError::MissingLongHeader { .. })
        ));
    }

    #[test]
    fn a_record_starts_aligned_and_past_any_page_header() {
        let seg = SEG;
        let page = XLOG_BLCKSZ as u64;
        // Inside a page: MAXALIGNed.
        assert_eq!(record_start(Lsn(page + 100), seg), Lsn(page + 104));
        assert_eq!(record_start(Lsn(page + 104), seg), Lsn(page + 104));
        // At or inside a short header: just past it.
        assert_eq!(record_start(Lsn(page), seg), Lsn(page + 24));
        assert_eq!(record_start(Lsn(page + 8), seg), Lsn(page + 24));
        // At or inside a segment's long header.
        assert_eq!(record_start(Lsn(SEG as u64), seg), Lsn(SEG as u64 + 40));
        assert_eq!(record_start(Lsn(SEG as u64 + 24), seg), Lsn(SEG as u64 + 40));
    }
}
