//! The streaming WAL decoder: bytes in, records out.
//!
//! WAL arrives as a byte stream addressed by LSN — whole segment files, or `XLogData` messages
//! of a replication connection cut at arbitrary points. [`WalStreamDecoder`] buffers what it is
//! fed, strips and validates page headers, reassembles records that cross page and segment
//! boundaries, skips the dead rest of a segment after `XLOG_SWITCH`, and hands each complete
//! record to [`DecodedRecord::parse`]. It follows PostgreSQL's `XLogDecodeNextRecord` check for
//! check, so it stops exactly where PostgreSQL's own reader (and `pg_waldump`) would.
//!
//! Records that lie within one fed chunk and one page are returned as slices of that chunk
//! (no copy); only records crossing a page or chunk boundary are assembled into new memory,
//! and only once all of their bytes have been fed, so a garbage length can never make the
//! decoder allocate more than the input it already holds.
//!
//! Decoding starts at a page boundary, like PostgreSQL's `XLogFindNextRecord`: the input
//! begins with the page holding the requested start, whose header is checked, any continuation
//! of an earlier record is skipped, and records before the start are decoded but not returned.
//!
//! An error is sticky: the decoder stays before the offending record and returns the same
//! error again, with [`WalStreamDecoder::position`] the end of the last good record. Whether
//! that error is corruption or just the end of valid WAL (zeroed or recycled pages, a torn
//! record) is the caller's call, as it is PostgreSQL's.

use super::consts::*;
use super::page::{valid_segment_size, PageHeader, PageHeaderError, PageValidator};
use super::record::{is_switch, DecodedRecord, RecordError, RecordMeta, RecordView, XLogRecordHeader};
use bytes::Bytes;
use neon_types::{Lsn, XLOG_BLCKSZ};
use smallvec::SmallVec;
use std::collections::VecDeque;

/// Why decoding cannot go on at `lsn`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Page(#[from] PageHeaderError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("invalid record length at {lsn}: wanted at least {SIZE_OF_XLOG_RECORD}, got {len}")]
    RecordLength { lsn: Lsn, len: u32 },
    #[error("record length {len} at {lsn} exceeds the maximum {MAX_RECORD_LENGTH}")]
    RecordTooLong { lsn: Lsn, len: u32 },
    #[error("invalid resource manager ID {rmid} at {lsn}")]
    Rmgr { lsn: Lsn, rmid: u8 },
    #[error("record with incorrect prev-link {prev} at {lsn} (previous record at {expected})")]
    PrevLink { lsn: Lsn, prev: Lsn, expected: Lsn },
    #[error("invalid record offset at {lsn}")]
    RecordOffset { lsn: Lsn },
    #[error("contrecord is requested by {lsn}: the page starts with the rest of a record")]
    ContrecordRequested { lsn: Lsn },
    #[error("there is no contrecord flag at {page} for the record at {lsn}")]
    NoContrecord { lsn: Lsn, page: Lsn },
    #[error("invalid contrecord length {rem_len} (expected {expected}) at {page} for the record at {lsn}")]
    ContrecordLength { lsn: Lsn, page: Lsn, rem_len: u32, expected: u32 },
    #[error("cannot start decoding at {lsn}: {why}")]
    BadStart { lsn: Lsn, why: &'static str },
    #[error(
        "the record at {lsn} (ending at {end}, CRC {crc:08X}) is not the one expected there (ending at \
         {expected_end}, CRC {expected_crc:08X})"
    )]
    OtherRecord { lsn: Lsn, end: Lsn, crc: u32, expected_end: Lsn, expected_crc: u32 },
    #[error("invalid WAL segment size {size}: PostgreSQL allows powers of two from 1 MB to 1 GB")]
    SegmentSize { size: u32 },
}

impl DecodeError {
    /// The position the error is about.
    pub fn lsn(&self) -> Lsn {
        match self {
            DecodeError::Page(e) => match e {
                PageHeaderError::Magic { page, .. }
                | PageHeaderError::InfoBits { page, .. }
                | PageHeaderError::MissingLongHeader { page }
                | PageHeaderError::UnexpectedLongHeader { page }
                | PageHeaderError::PageAddr { page, .. }
                | PageHeaderError::SystemId { page, .. }
                | PageHeaderError::SegmentSize { page, .. }
                | PageHeaderError::BlockSize { page, .. }
                | PageHeaderError::TimelineBackwards { page, .. } => *page,
            },
            DecodeError::Record(e) => match e {
                RecordError::Crc { lsn, .. }
                | RecordError::ShortHeaders { lsn, .. }
                | RecordError::LengthMismatch { lsn, .. }
                | RecordError::BlockOrder { lsn, .. }
                | RecordError::BlockId { lsn, .. }
                | RecordError::Fork { lsn, .. }
                | RecordError::Block { lsn, .. }
                | RecordError::SameRelWithoutRel { lsn, .. } => *lsn,
            },
            DecodeError::RecordLength { lsn, .. }
            | DecodeError::RecordTooLong { lsn, .. }
            | DecodeError::Rmgr { lsn, .. }
            | DecodeError::PrevLink { lsn, .. }
            | DecodeError::RecordOffset { lsn }
            | DecodeError::ContrecordRequested { lsn }
            | DecodeError::NoContrecord { lsn, .. }
            | DecodeError::ContrecordLength { lsn, .. }
            | DecodeError::BadStart { lsn, .. }
            | DecodeError::OtherRecord { lsn, .. } => *lsn,
            DecodeError::SegmentSize { .. } => Lsn::INVALID,
        }
    }
}

const PAGE: u64 = XLOG_BLCKSZ as u64;

/// The highest LSN the decoder reads up to. PostgreSQL would need centuries to get here; the
/// 4 GB left above it hold any record and segment arithmetic without overflow, so a garbage
/// start LSN or endless input cannot make the decoder's position arithmetic wrap.
pub const MAX_DECODE_LSN: Lsn = Lsn(u64::MAX - (1 << 32));

/// Buffered input: chunks in LSN order, the first starting at `start`, then a tail that
/// collects small pieces. Large chunks (whole segments, big replication messages) are kept as
/// given and only ever dropped whole, so their bytes are never copied; small ones are copied
/// into the tail until it is large enough to become a chunk, so a stream of tiny pieces costs
/// neither a chunk each nor lookups that grow with their number. Spent chunks are kept for the
/// owner to recycle their memory.
#[derive(Default)]
struct Input {
    chunks: VecDeque<Bytes>,
    /// Small pieces, after the chunks.
    tail: Vec<u8>,
    start: Lsn,
    /// Bytes in the chunks and the tail.
    len: u64,
    spent: Vec<Bytes>,
}

/// Pieces smaller than this go to the tail, which becomes a chunk at this size.
const SMALL_PIECE: usize = 64 * 1024;

impl Input {
    fn end(&self) -> Lsn {
        self.start + self.len
    }

    fn push(&mut self, bytes: Bytes) {
        self.len += bytes.len() as u64;
        if bytes.len() < SMALL_PIECE {
            self.tail.extend_from_slice(&bytes);
            if self.tail.len() >= SMALL_PIECE {
                self.seal_tail();
            }
        } else {
            self.seal_tail();
            self.chunks.push_back(bytes);
        }
    }

    fn push_slice(&mut self, bytes: &[u8]) {
        if bytes.len() < SMALL_PIECE {
            self.len += bytes.len() as u64;
            self.tail.extend_from_slice(bytes);
            if self.tail.len() >= SMALL_PIECE {
                self.seal_tail();
            }
        } else {
            self.push(Bytes::copy_from_slice(bytes));
        }
    }

    /// Turns the tail into a chunk.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(Bytes::from(std::mem::take(&mut self.tail)));
        }
    }

    /// Chunk `i`; the tail counts as the chunk after the last.
    #[inline]
    fn chunk(&self, i: usize) -> &[u8] {
        self.chunks.get(i).map_or(&self.tail[..], |c| &c[..])
    }

    fn chunk_count(&self) -> usize {
        self.chunks.len() + 1
    }

    /// Drops chunks wholly before `lsn`; returns false if the input does not reach `lsn` yet.
    fn discard_before(&mut self, lsn: Lsn) -> bool {
        while let Some(front) = self.chunks.front() {
            let n = front.len() as u64;
            if self.start + n > lsn {
                break;
            }
            self.start = self.start + n;
            self.len -= n;
            let chunk = self.chunks.pop_front().expect("front exists");
            // Keep the newest two for recycling; older ones are freed.
            if self.spent.len() == 2 {
                self.spent.remove(0);
            }
            self.spent.push(chunk);
        }
        if self.chunks.is_empty() && self.start + self.tail.len() as u64 <= lsn {
            self.start = self.start + self.tail.len() as u64;
            self.len -= self.tail.len() as u64;
            self.tail.clear();
        }
        self.end() >= lsn
    }

    /// The chunk holding `lsn` and the offset of `lsn` in it.
    #[inline]
    fn locate(&self, lsn: Lsn) -> Option<(usize, usize)> {
        let mut off = lsn.checked_sub(self.start)?;
        // Nearly always the first chunk (a piece of a segment when reading files).
        if off < self.chunk(0).len() as u64 {
            return Some((0, off as usize));
        }
        for i in 0..self.chunk_count() {
            let len = self.chunk(i).len() as u64;
            if off < len {
                return Some((i, off as usize));
            }
            off -= len;
        }
        None
    }

    /// Copies `out.len()` bytes starting at `lsn` into `out`, if they are all buffered.
    #[inline]
    fn peek(&self, lsn: Lsn, out: &mut [u8]) -> bool {
        if lsn < self.start || lsn + out.len() as u64 > self.end() {
            return false;
        }
        let Some((mut i, mut off)) = self.locate(lsn) else {
            return out.is_empty();
        };
        if let Some(bytes) = self.chunk(i).get(off..off + out.len()) {
            out.copy_from_slice(bytes);
            return true;
        }
        let mut done = 0;
        while done < out.len() {
            let c = self.chunk(i);
            let n = (c.len() - off).min(out.len() - done);
            out[done..done + n].copy_from_slice(&c[off..off + n]);
            done += n;
            i += 1;
            off = 0;
        }
        true
    }

    /// Where `n` bytes at `lsn` lie, when they lie in a single chunk.
    #[inline]
    fn contiguous(&self, lsn: Lsn, n: usize) -> Option<RawLoc> {
        let (chunk, off) = self.locate(lsn)?;
        (off + n <= self.chunk(chunk).len()).then_some(RawLoc::Chunk { chunk, off, len: n })
    }

    /// Appends the bytes of `pieces` (ascending, all buffered) to `out`, walking the chunks once.
    fn copy_pieces(&self, pieces: &[Piece], out: &mut Vec<u8>) {
        let mut chunk = 0;
        let mut chunk_start = self.start;
        for p in pieces {
            let mut lsn = p.lsn;
            let mut left = p.len as usize;
            while left > 0 {
                let c = self.chunk(chunk);
                let chunk_end = chunk_start + c.len() as u64;
                if lsn >= chunk_end {
                    chunk += 1;
                    chunk_start = chunk_end;
                    continue;
                }
                let off = (lsn - chunk_start) as usize;
                let take = (c.len() - off).min(left);
                out.extend_from_slice(&c[off..off + take]);
                left -= take;
                lsn = lsn + take as u64;
            }
        }
    }
}

/// Where the bytes of the record just decoded are.
#[derive(Clone, Copy)]
enum RawLoc {
    /// Inside one input chunk.
    Chunk { chunk: usize, off: usize, len: usize },
    /// In the decoder's assembly buffer (the record crossed a page or chunk boundary).
    Assembled,
}

/// The piece of a record on one page.
#[derive(Clone, Copy)]
struct Piece {
    lsn: Lsn,
    len: u32,
}

/// Assembly buffers larger than this are not kept once a smaller record comes along.
const KEEP_ASSEMBLY: usize = 1 << 20;

/// Decodes a WAL byte stream into records. See the module documentation.
pub struct WalStreamDecoder {
    input: Input,
    /// The next position to interpret: a page boundary or a record start.
    pos: Lsn,
    seg_size: u32,
    validator: PageValidator,
    /// Start of the previous record, for the prev-link check; invalid until the first record,
    /// which (like PostgreSQL's random access) need only point backwards.
    prev_record: Lsn,
    /// At a page boundary, skip any continuation of a record that started earlier
    /// (`XLogFindNextRecord`): true until the first record has been found.
    finding_first: bool,
    /// Records starting before this are decoded (to follow the chain) but not returned.
    skip_before: Lsn,
    /// The end of the last good record.
    last_good_end: Lsn,
    /// What parsing learnt about the last record.
    meta: RecordMeta,
    /// Bytes of the last record when it had to be assembled from several pieces.
    assembly: Vec<u8>,
    /// Where the first record begins, when the caller knows ([`WalStreamDecoder::at_record`]).
    first_record: Option<Lsn>,
    /// The first record must be this one (end, CRC), already read elsewhere: checked, not
    /// returned.
    known_first: Option<(Lsn, u32)>,
    /// A record decoded by [`WalStreamDecoder::has_record`] and not yet returned.
    pending: Option<RawLoc>,
    /// (start, end) of the page-crossing record being waited for, computed once.
    span: Option<(Lsn, Lsn)>,
}

impl WalStreamDecoder {
    /// A decoder for the first record at or after `start`, in WAL with segments of `seg_size`
    /// bytes. The input fed must begin at `start.page_start()`.
    pub fn new(start: Lsn, seg_size: u32) -> Result<Self, DecodeError> {
        if !valid_segment_size(seg_size) {
            return Err(DecodeError::SegmentSize { size: seg_size });
        }
        if start > MAX_DECODE_LSN {
            return Err(DecodeError::BadStart { lsn: start, why: "beyond the LSNs the decoder reads" });
        }
        if !start.0.is_multiple_of(8) {
            return Err(DecodeError::BadStart { lsn: start, why: "records start at multiples of 8" });
        }
        let page = start.page_start();
        Ok(WalStreamDecoder {
            input: Input { start: page, ..Default::default() },
            pos: page,
            seg_size,
            validator: PageValidator::new(Some(seg_size), None),
            prev_record: Lsn::INVALID,
            finding_first: true,
            skip_before: start,
            last_good_end: start,
            meta: RecordMeta::default(),
            assembly: Vec::new(),
            first_record: None,
            known_first: None,
            pending: None,
            span: None,
        })
    }

    /// A decoder whose first record begins exactly at `start` (a timeline's switch point, which
    /// is where its first record begins), without walking the records of the page before it:
    /// they may not exist (a base backup's generated segment holds only its checkpoint
    /// record). The input fed must begin at `start.page_start()`, whose header is checked.
    pub fn at_record(start: Lsn, seg_size: u32) -> Result<Self, DecodeError> {
        let mut d = Self::new(start, seg_size)?;
        d.first_record = Some(start);
        Ok(d)
    }

    /// Expect the first record's `xl_prev` to be `prev` (where the record before it began): a
    /// stream that does not continue that history is then refused at once.
    pub fn expect_prev(&mut self, prev: Lsn) {
        self.prev_record = prev;
    }

    /// Expect the first record to be one already read (ending at `end`, with CRC `crc`): it is
    /// checked and skipped, and anything else there is an error. Its CRC covers its
    /// `xl_prev`, so a stream that matches it continues the same history.
    pub fn expect_first(&mut self, end: Lsn, crc: u32) {
        self.known_first = Some((end, crc));
    }

    /// Expect this system identifier in long page headers.
    pub fn expect_system_id(&mut self, sysid: u64) {
        self.validator.sysid = Some(sysid);
    }

    /// The system identifier seen in the last long page header, if any.
    pub fn system_id(&self) -> Option<u64> {
        self.validator.sysid
    }

    /// The timeline of the last page header read.
    pub fn timeline(&self) -> u32 {
        self.validator.timeline()
    }

    /// The end of the last good record (where the next one may start).
    pub fn position(&self) -> Lsn {
        self.last_good_end
    }

    /// The LSN just after the last byte fed.
    pub fn input_end(&self) -> Lsn {
        self.input.end()
    }

    /// Adds the next bytes of the stream (they must follow the previous ones). Bytes beyond
    /// [`MAX_DECODE_LSN`] are ignored.
    pub fn feed(&mut self, mut bytes: Bytes) {
        bytes.truncate(self.room());
        self.input.push(bytes);
    }

    /// Adds the next bytes of the stream, copying them.
    pub fn feed_slice(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.room());
        self.input.push_slice(&bytes[..n]);
    }

    fn room(&self) -> usize {
        usize::try_from(MAX_DECODE_LSN - self.input.end()).unwrap_or(usize::MAX)
    }

    /// A fully consumed input chunk, for the caller to reuse its memory (when no record
    /// still refers to it, `Bytes::try_into_mut` succeeds).
    pub fn take_spent_chunk(&mut self) -> Option<Bytes> {
        self.input.spent.pop()
    }

    /// The next record, owning its bytes; `Ok(None)` when more input is needed.
    pub fn poll(&mut self) -> Result<Option<DecodedRecord>, DecodeError> {
        let Some(loc) = self.advance()? else { return Ok(None) };
        let raw = match loc {
            RawLoc::Chunk { chunk, off, len } => match self.input.chunks.get(chunk) {
                Some(c) => c.slice(off..off + len),
                None => Bytes::copy_from_slice(&self.input.tail[off..off + len]),
            },
            RawLoc::Assembled => Bytes::from(std::mem::take(&mut self.assembly)),
        };
        Ok(Some(DecodedRecord { raw, meta: self.meta.clone() }))
    }

    /// The next record, borrowed from the decoder until the next call (no allocation, no
    /// copy); `Ok(None)` when more input is needed.
    pub fn poll_view(&mut self) -> Result<Option<RecordView<'_>>, DecodeError> {
        let Some(loc) = self.advance()? else { return Ok(None) };
        Ok(Some(RecordView { raw: self.raw(loc), meta: &self.meta }))
    }

    fn raw(&self, loc: RawLoc) -> &[u8] {
        match loc {
            RawLoc::Chunk { chunk, off, len } => &self.input.chunk(chunk)[off..off + len],
            RawLoc::Assembled => &self.assembly,
        }
    }

    /// Whether a record can be returned now (decoding it, so a following `poll` or
    /// `poll_view` returns it).
    pub fn has_record(&mut self) -> Result<bool, DecodeError> {
        if self.pending.is_none() {
            self.pending = self.advance()?;
        }
        Ok(self.pending.is_some())
    }

    /// Decodes up to the next record to return; `self.meta` describes it.
    fn advance(&mut self) -> Result<Option<RawLoc>, DecodeError> {
        if let Some(loc) = self.pending.take() {
            return Ok(Some(loc));
        }
        loop {
            if !self.input.discard_before(self.pos) {
                return Ok(None);
            }
            if self.pos.page_offset() == 0 {
                let Some(hdr) = self.page_header(self.pos)? else {
                    return Ok(None);
                };
                let hsz = hdr.size() as u64;
                if let Some(first) = self.first_record.take() {
                    // Whatever precedes it on its page (the end of an earlier record, or
                    // nothing) is not ours to read.
                    self.pos = (self.pos + hsz).max(first);
                    self.finding_first = false;
                    continue;
                }
                if self.finding_first && hdr.is_contrecord() {
                    let rem = Lsn(hdr.rem_len as u64).align().0;
                    self.pos = if rem >= PAGE - hsz { self.pos + PAGE } else { self.pos + hsz + rem };
                    if self.pos.page_offset() != 0 {
                        self.finding_first = false;
                    }
                    continue;
                }
                if hdr.is_contrecord() {
                    return Err(DecodeError::ContrecordRequested { lsn: self.pos + hsz });
                }
                self.pos = self.pos + hsz;
                self.finding_first = false;
                continue;
            }
            self.finding_first = false;
            if (self.pos.page_offset() as usize) < SIZE_OF_SHORT_PAGE_HEADER {
                return Err(DecodeError::RecordOffset { lsn: self.pos });
            }
            match self.next_record()? {
                Step::Record(loc) if self.meta.lsn >= self.skip_before => {
                    let Some((expected_end, expected_crc)) = self.known_first.take() else {
                        return Ok(Some(loc));
                    };
                    let (lsn, end, crc) = (self.meta.lsn, self.meta.end_lsn, self.meta.header.crc);
                    if lsn != self.skip_before || end != expected_end || crc != expected_crc {
                        return Err(DecodeError::OtherRecord { lsn, end, crc, expected_end, expected_crc });
                    }
                }
                Step::Record(_) | Step::Restart => {}
                Step::NeedInput => return Ok(None),
            }
        }
    }

    /// Reads and validates the page header at `page`, if buffered.
    fn page_header(&mut self, page: Lsn) -> Result<Option<PageHeader>, DecodeError> {
        let mut buf = [0u8; SIZE_OF_LONG_PAGE_HEADER];
        if !self.input.peek(page, &mut buf[..4]) {
            return Ok(None);
        }
        let size = PageHeader::size_from_prefix(&buf);
        if !self.input.peek(page, &mut buf[..size]) {
            return Ok(None);
        }
        let hdr = PageHeader::parse(&buf[..size]);
        self.validator.validate(page, &hdr)?;
        Ok(Some(hdr))
    }

    /// Decodes the record at `self.pos` (a valid record offset), if all of it is buffered.
    ///
    /// Checks come in PostgreSQL's order, so garbage is rejected as soon as it can be seen
    /// rather than waited on: the length, then the header (as soon as its 24 bytes are
    /// buffered), then each continuation page's header, and the CRC once all bytes are there.
    fn next_record(&mut self) -> Result<Step, DecodeError> {
        let lsn = self.pos;
        let mut head = [0u8; SIZE_OF_XLOG_RECORD];
        if !self.input.peek(lsn, &mut head[..4]) {
            return Ok(Step::NeedInput);
        }
        let tot_len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD {
            return Err(DecodeError::RecordLength { lsn, len: tot_len });
        }
        if tot_len > MAX_RECORD_LENGTH {
            return Err(DecodeError::RecordTooLong { lsn, len: tot_len });
        }

        let room = (PAGE - lsn.page_offset() as u64) as u32;
        let (loc, end) = if let Some(loc) = self.on_one_page(lsn, tot_len, room) {
            // The common case, checked without copying anything.
            let RawLoc::Chunk { chunk, off, .. } = loc else { unreachable!("on_one_page gives chunks") };
            let head = self.input.chunk(chunk)[off..].first_chunk().expect("record is in the chunk");
            self.check_header(lsn, head)?;
            (loc, lsn + tot_len as u64)
        } else if tot_len <= room {
            if !self.input.peek(lsn, &mut head) {
                return Ok(Step::NeedInput);
            }
            self.check_header(lsn, &head)?;
            let end = lsn + tot_len as u64;
            if self.input.end() < end {
                return Ok(Step::NeedInput);
            }
            let loc = match self.input.contiguous(lsn, tot_len as usize) {
                Some(loc) => loc,
                None => {
                    self.assemble(&[Piece { lsn, len: tot_len }], tot_len);
                    RawLoc::Assembled
                }
            };
            (loc, end)
        } else {
            let header_here = room as usize >= SIZE_OF_XLOG_RECORD;
            if header_here {
                if !self.input.peek(lsn, &mut head) {
                    return Ok(Step::NeedInput);
                }
                self.check_header(lsn, &head)?;
            }
            let first = lsn.page_start() + PAGE;
            let hdr = match self.continuation_header(lsn, first, tot_len - room)? {
                Ok(hdr) => hdr,
                Err(step) => return Ok(step),
            };
            if !header_here {
                // The header straddles the page boundary: its tail follows the page header.
                let (a, b) = head.split_at_mut(room as usize);
                if !self.input.peek(lsn, a) || !self.input.peek(first + hdr.size() as u64, b) {
                    return Ok(Step::NeedInput);
                }
                self.check_header(lsn, &head)?;
            }
            let end = match self.span {
                Some((at, end)) if at == lsn => end,
                _ => {
                    let end = self.record_end(lsn, tot_len);
                    self.span = Some((lsn, end));
                    end
                }
            };
            if self.input.end() < end {
                return Ok(Step::NeedInput);
            }
            // Everything is buffered: walk the continuation pages once, checking each header.
            let mut pieces: SmallVec<[Piece; 4]> = SmallVec::new();
            pieces.push(Piece { lsn, len: room });
            let mut got = room;
            let mut page = first;
            while got < tot_len {
                let hdr = match self.continuation_header(lsn, page, tot_len - got)? {
                    Ok(hdr) => hdr,
                    Err(step) => return Ok(step),
                };
                let hsz = hdr.size() as u32;
                let n = (tot_len - got).min(XLOG_BLCKSZ as u32 - hsz);
                pieces.push(Piece { lsn: page + hsz as u64, len: n });
                got += n;
                page = page + PAGE;
            }
            self.span = None;
            self.assemble(&pieces, tot_len);
            (RawLoc::Assembled, end)
        };

        let raw = match loc {
            RawLoc::Chunk { chunk, off, len } => &self.input.chunk(chunk)[off..off + len],
            RawLoc::Assembled => &self.assembly[..],
        };
        let header = XLogRecordHeader::parse(raw[..SIZE_OF_XLOG_RECORD].try_into().expect("24 bytes"));
        let mut end_lsn = end.align();
        if is_switch(&header) {
            let seg = self.seg_size as u64;
            end_lsn = Lsn(end_lsn.0.div_ceil(seg) * seg);
        }
        self.meta.parse(lsn, end_lsn, raw)?;
        self.prev_record = lsn;
        self.pos = end_lsn;
        self.last_good_end = end_lsn;
        Ok(Step::Record(loc))
    }

    /// Where the record lies when all of it is buffered in one chunk and on this page.
    #[inline]
    fn on_one_page(&self, lsn: Lsn, tot_len: u32, room: u32) -> Option<RawLoc> {
        if tot_len > room {
            return None;
        }
        self.input.contiguous(lsn, tot_len as usize)
    }

    /// `ValidXLogRecordHeader`: a known resource manager and the right prev-link.
    fn check_header(&self, lsn: Lsn, head: &[u8; SIZE_OF_XLOG_RECORD]) -> Result<(), DecodeError> {
        let header = XLogRecordHeader::parse(head);
        if !rmgr_id_is_valid(header.rmid) {
            return Err(DecodeError::Rmgr { lsn, rmid: header.rmid });
        }
        let prev_ok = if self.prev_record.is_valid() { header.prev == self.prev_record } else { header.prev < lsn };
        if !prev_ok {
            return Err(DecodeError::PrevLink { lsn, prev: header.prev, expected: self.prev_record });
        }
        Ok(())
    }

    /// Checks the header of a page continuing the record at `lsn`, of which `remaining` bytes
    /// are still expected; `Ok(Err(step))` when decoding must take that step instead.
    fn continuation_header(
        &mut self,
        lsn: Lsn,
        page: Lsn,
        remaining: u32,
    ) -> Result<Result<PageHeader, Step>, DecodeError> {
        let Some(hdr) = self.page_header(page)? else { return Ok(Err(Step::NeedInput)) };
        if hdr.is_overwrite_contrecord() {
            // The record was cut short by a crash; PostgreSQL restarts reading at this page,
            // where an XLOG_OVERWRITE_CONTRECORD record follows.
            self.pos = page;
            return Ok(Err(Step::Restart));
        }
        if !hdr.is_contrecord() {
            return Err(DecodeError::NoContrecord { lsn, page });
        }
        if hdr.rem_len == 0 || hdr.rem_len != remaining {
            return Err(DecodeError::ContrecordLength { lsn, page, rem_len: hdr.rem_len, expected: remaining });
        }
        Ok(Ok(hdr))
    }

    /// Where a record of `tot_len` bytes starting at `lsn` ends, page headers included (long
    /// headers at segment starts, short ones elsewhere, as the page checks enforce). Computed
    /// a segment at a time, so a garbage length costs no more than a real one.
    fn record_end(&self, lsn: Lsn, tot_len: u32) -> Lsn {
        let seg = self.seg_size as u64;
        let (long, short) = (SIZE_OF_LONG_PAGE_HEADER as u64, SIZE_OF_SHORT_PAGE_HEADER as u64);
        let mut left = tot_len as u64 - (PAGE - lsn.page_offset() as u64);
        let mut page = (lsn.page_start() + PAGE).0;
        loop {
            let seg_end = (page / seg + 1) * seg;
            let first_hdr = if page.is_multiple_of(seg) { long } else { short };
            let (first_cap, other_cap) = (PAGE - first_hdr, PAGE - short);
            if left <= first_cap {
                return Lsn(page + first_hdr + left);
            }
            let other_pages = (seg_end - page) / PAGE - 1;
            if left <= first_cap + other_pages * other_cap {
                let rest = left - first_cap;
                let full = (rest - 1) / other_cap;
                return Lsn(page + PAGE * (1 + full) + short + (rest - full * other_cap));
            }
            left -= first_cap + other_pages * other_cap;
            page = seg_end;
        }
    }

    /// Copies a record's pieces (`total` bytes) into the assembly buffer.
    fn assemble(&mut self, pieces: &[Piece], total: u32) {
        let total = total as usize;
        if self.assembly.capacity() > KEEP_ASSEMBLY && total <= KEEP_ASSEMBLY {
            self.assembly = Vec::new();
        }
        self.assembly.clear();
        self.assembly.reserve_exact(total);
        self.input.copy_pieces(pieces, &mut self.assembly);
    }
}

/// What one attempt at the record at the current position gave.
enum Step {
    /// A record was decoded into `meta`; its bytes are here.
    Record(RawLoc),
    NeedInput,
    /// The position moved (an abandoned record was skipped); look again.
    Restart,
}

/// Built-in resource managers are 0..=21 in PostgreSQL 15; 128..=255 are for custom ones.
fn rmgr_id_is_valid(rmid: u8) -> bool {
    rmid <= 21 || rmid >= 128
}

#[cfg(test)]
pub(crate) mod testing {
    //! Lays records out in WAL pages exactly as PostgreSQL's insertion code does, for tests.
    use super::super::page::make_page_header;
    use super::super::record::testing::{build_record, TestBlock};
    use super::*;

    pub struct WalWriter {
        pub seg_size: u32,
        pub start: Lsn,
        pub buf: Vec<u8>,
        pub prev: Lsn,
        pub sysid: u64,
    }

    impl WalWriter {
        /// Starts writing at `start`, which must be a segment boundary.
        pub fn new(start: Lsn, seg_size: u32) -> Self {
            WalWriter { seg_size, start, buf: Vec::new(), prev: Lsn::INVALID, sysid: 7 }
        }

        pub fn pos(&self) -> Lsn {
            self.start + self.buf.len() as u64
        }

        fn page_header(&mut self, rem_len: u32) {
            let page = self.pos();
            let info = if rem_len > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 };
            let long = (page.segment_offset(self.seg_size) == 0).then_some((self.sysid, self.seg_size));
            let mut h = make_page_header(page, info, rem_len, long);
            h.resize(PageHeader::size_from_prefix(&h), 0);
            self.buf.extend_from_slice(&h);
        }

        /// Appends raw record bytes; returns (start, aligned end).
        pub fn append_raw(&mut self, rec: &[u8]) -> (Lsn, Lsn) {
            if self.pos().page_offset() == 0 {
                self.page_header(0);
            }
            let start = self.pos();
            let mut left = rec;
            loop {
                let room = XLOG_BLCKSZ - self.pos().page_offset() as usize;
                let n = room.min(left.len());
                self.buf.extend_from_slice(&left[..n]);
                left = &left[n..];
                if left.is_empty() {
                    break;
                }
                self.page_header(left.len() as u32);
            }
            while !self.buf.len().is_multiple_of(8) {
                self.buf.push(0);
            }
            self.prev = start;
            (start, self.pos())
        }

        /// Appends a record of the given rmgr with `main` as main data.
        pub fn append(&mut self, rmid: u8, info: u8, main: &[u8], blocks: &[TestBlock]) -> (Lsn, Lsn) {
            let rec = build_record(rmid, info, 100, self.prev, blocks, main);
            self.append_raw(&rec)
        }

        /// Writes the part of a record that fits on the current page, then starts the next page
        /// as PostgreSQL does after a crash cut that record short: with
        /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD` and no continuation. `prev` is left pointing at
        /// the last complete record, as the record written after recovery will.
        pub fn abandon_record(&mut self, len: usize) {
            let prev = self.prev;
            let rec = build_record(10, 0, 100, prev, &[], &vec![0x5A; len]);
            let room = XLOG_BLCKSZ - self.pos().page_offset() as usize;
            assert!(rec.len() > room, "the record must cross the page");
            self.buf.extend_from_slice(&rec[..room]);
            let page = self.pos();
            let long = (page.segment_offset(self.seg_size) == 0).then_some((self.sysid, self.seg_size));
            let mut h = make_page_header(page, XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0, long);
            h.resize(PageHeader::size_from_prefix(&h), 0);
            self.buf.extend_from_slice(&h);
            self.prev = prev;
        }

        /// Appends an XLOG_SWITCH and pads the segment with zeros.
        pub fn switch(&mut self) -> (Lsn, Lsn) {
            let (s, _) = self.append(RM_XLOG_ID, XLOG_SWITCH, b"", &[]);
            while self.pos().segment_offset(self.seg_size) != 0 {
                self.buf.push(0);
            }
            (s, self.pos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::WalWriter;
    use super::*;

    const SEG: u32 = 1 << 20;

    fn decode_all(dec: &mut WalStreamDecoder) -> (Vec<DecodedRecord>, Option<DecodeError>) {
        let mut out = Vec::new();
        loop {
            match dec.poll() {
                Ok(Some(r)) => out.push(r),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    /// A stream with small records, records crossing pages (header split too), a record longer
    /// than a page, a record crossing into the next segment, and a switch.
    fn sample() -> (WalWriter, Vec<(Lsn, Lsn, usize)>) {
        let mut w = WalWriter::new(Lsn(SEG as u64), SEG);
        let mut expect = Vec::new();
        let mut add = |w: &mut WalWriter, len: usize| {
            let main: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let (s, e) = w.append(10, 0, &main, &[]);
            expect.push((s, e, len));
        };
        for len in [10, 100, 3000, 5000, 20000, 1] {
            add(&mut w, len);
        }
        // Leave exactly 16 bytes on a page so the next record's header straddles the boundary.
        let room = |w: &WalWriter| XLOG_BLCKSZ as u32 - w.pos().page_offset();
        add(&mut w, 1);
        if room(&w) < 16 + 40 {
            add(&mut w, 100);
        }
        let d = (room(&w) - 16) as usize;
        add(&mut w, if d - 26 < 256 { d - 26 } else { d - 29 });
        assert_eq!(room(&w), 16);
        add(&mut w, 50);
        // Cross into the next segment.
        while w.pos().segment_offset(SEG) < SEG - 3 * XLOG_BLCKSZ as u32 {
            add(&mut w, 4000);
        }
        add(&mut w, 30000);
        add(&mut w, 5);
        (w, expect)
    }

    #[test]
    fn decodes_whole_stream_in_one_chunk() {
        let (w, expect) = sample();
        let mut dec = WalStreamDecoder::new(w.start, SEG).unwrap();
        dec.feed(Bytes::from(w.buf.clone()));
        let (recs, err) = decode_all(&mut dec);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(recs.len(), expect.len());
        for (r, (s, e, len)) in recs.iter().zip(&expect) {
            assert_eq!((r.lsn, r.end_lsn, r.main_data().len()), (*s, *e, *len));
        }
        assert!(recs.iter().any(|r| r.lsn.segment_number(SEG) != r.end_lsn.segment_number(SEG)));
        assert_eq!(dec.position(), expect.last().unwrap().1);
    }

    #[test]
    fn at_record_starts_at_the_record_whatever_precedes_it_on_its_page() {
        let (w, expect) = sample();
        // Every record's start, and the page holding it blanked before it: the record there is
        // the first decoded, and the rest follow.
        for (i, (start, _, _)) in expect.iter().enumerate().step_by(7) {
            let page = start.page_start();
            let off = (page.0 - w.start.0) as usize;
            let mut bytes = w.buf[off..].to_vec();
            let hsz = PageHeader::size_from_prefix(&bytes);
            let skip = (start.0 - page.0) as usize;
            if skip > hsz {
                bytes[hsz..skip].fill(0);
            }
            let mut dec = WalStreamDecoder::at_record(*start, SEG).unwrap();
            dec.feed(Bytes::from(bytes));
            let (recs, err) = decode_all(&mut dec);
            assert!(err.is_none(), "from {start}: {err:?}");
            assert_eq!(recs.len(), expect.len() - i, "from {start}");
            assert_eq!(recs[0].lsn, *start);
        }
    }

    #[test]
    fn a_known_first_record_is_checked_and_skipped() {
        let (w, expect) = sample();
        let mut all = WalStreamDecoder::new(w.start, SEG).unwrap();
        all.feed(Bytes::from(w.buf.clone()));
        let (recs, _) = decode_all(&mut all);
        let from = |i: usize, end: Lsn, crc: u32| {
            let page = recs[i].lsn.page_start();
            let mut dec = WalStreamDecoder::at_record(recs[i].lsn, SEG).unwrap();
            dec.expect_first(end, crc);
            dec.feed(Bytes::from(w.buf[(page.0 - w.start.0) as usize..].to_vec()));
            decode_all(&mut dec)
        };
        for i in [0, 3, 7] {
            // The same record: skipped, the rest follow.
            let (got, err) = from(i, recs[i].end_lsn, recs[i].header.crc);
            assert!(err.is_none(), "{err:?}");
            assert_eq!(got.len(), expect.len() - i - 1);
            assert_eq!(got[0].lsn, recs[i + 1].lsn);
            // Another CRC (another history's record) or another end: refused, nothing returned.
            for (end, crc) in [(recs[i].end_lsn, recs[i].header.crc ^ 1), (recs[i].end_lsn + 8, recs[i].header.crc)] {
                let (got, err) = from(i, end, crc);
                assert!(got.is_empty());
                assert!(matches!(err, Some(DecodeError::OtherRecord { lsn, .. }) if lsn == recs[i].lsn), "{err:?}");
            }
        }
    }

    #[test]
    fn any_chunking_gives_the_same_records() {
        let (w, expect) = sample();
        for chunk in [1usize, 7, 24, 8192, 8193, 100_000] {
            let mut dec = WalStreamDecoder::new(w.start, SEG).unwrap();
            let mut got = Vec::new();
            for c in w.buf.chunks(chunk) {
                dec.feed_slice(c);
                let (recs, err) = decode_all(&mut dec);
                assert!(err.is_none(), "chunk {chunk}: {err:?}");
                got.extend(recs.into_iter().map(|r| (r.lsn, r.end_lsn, r.main_data().len())));
            }
            assert_eq!(got, expect, "chunk size {chunk}");
        }
    }

    #[test]
    fn starts_mid_stream_at_page_boundaries_and_skips_before() {
        let (w, expect) = sample();
        // Start at each page boundary: the first record returned is the first that starts at
        // or after that page, even when the page begins with a continuation.
        for page in (0..w.buf.len() / XLOG_BLCKSZ).map(|p| w.start + (p * XLOG_BLCKSZ) as u64) {
            let mut dec = WalStreamDecoder::new(page, SEG).unwrap();
            dec.feed_slice(&w.buf[(page - w.start) as usize..]);
            let (recs, err) = decode_all(&mut dec);
            assert!(err.is_none(), "from {page}: {err:?}");
            let want: Vec<_> = expect.iter().filter(|e| e.0 >= page).map(|e| e.0).collect();
            assert_eq!(recs.iter().map(|r| r.lsn).collect::<Vec<_>>(), want, "from {page}");
        }
        // Start at a record mid-page by decoding its page and skipping earlier records.
        let target = expect[3].0;
        let mut dec = WalStreamDecoder::new(target, SEG).unwrap();
        dec.feed_slice(&w.buf[(target.page_start() - w.start) as usize..]);
        let (recs, _) = decode_all(&mut dec);
        assert_eq!(recs[0].lsn, target);
    }

    #[test]
    fn record_abandoned_at_a_crash_is_skipped() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        let (a, _) = w.append(10, 0, b"before", &[]);
        w.abandon_record(9000);
        // XLOG_OVERWRITE_CONTRECORD is the first record after recovery.
        let (c, _) = w.append(RM_XLOG_ID, 0xD0, &[0u8; 16], &[]);
        let (d, _) = w.append(10, 0, b"after", &[]);
        for start in [Lsn(0), Lsn(PAGE)] {
            let mut dec = WalStreamDecoder::new(start, SEG).unwrap();
            dec.feed_slice(&w.buf[start.0 as usize..]);
            let (recs, err) = decode_all(&mut dec);
            assert!(err.is_none(), "{err:?}");
            let want: Vec<Lsn> = [a, c, d].into_iter().filter(|l| *l >= start).collect();
            assert_eq!(recs.iter().map(|r| r.lsn).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn bad_starts_and_segment_sizes_are_refused() {
        assert!(matches!(WalStreamDecoder::new(Lsn(0), 0), Err(DecodeError::SegmentSize { size: 0 })));
        assert!(matches!(WalStreamDecoder::new(Lsn(0), 3 << 20), Err(DecodeError::SegmentSize { .. })));
        assert!(matches!(WalStreamDecoder::new(Lsn(8191), SEG), Err(DecodeError::BadStart { .. })));
        assert!(matches!(WalStreamDecoder::new(Lsn(u64::MAX - 7), SEG), Err(DecodeError::BadStart { .. })));
        // At the very top of the usable range, garbage input ends in errors, not overflow.
        let top = MAX_DECODE_LSN.page_start();
        let mut dec = WalStreamDecoder::new(top, SEG).unwrap();
        let mut page = super::super::page::make_page_header(top, 0, 0, None);
        page.resize(XLOG_BLCKSZ * 3, 0xFF);
        dec.feed(Bytes::from(page));
        let _ = dec.poll();
    }

    #[test]
    fn record_end_matches_a_page_by_page_walk() {
        let dec = WalStreamDecoder::new(Lsn(0), SEG).unwrap();
        let walk = |lsn: Lsn, tot_len: u32| {
            let mut left = tot_len as u64 - (PAGE - lsn.page_offset() as u64);
            let mut page = lsn.page_start() + PAGE;
            loop {
                let hsz = if page.0.is_multiple_of(SEG as u64) { 40 } else { 24 };
                let n = left.min(PAGE - hsz);
                left -= n;
                if left == 0 {
                    return page + hsz + n;
                }
                page = page + PAGE;
            }
        };
        for lsn in [8192 - 8, 8192 - 16, 8192 - 4000, SEG as u64 - 8, SEG as u64 - 8192 - 24, 3 * SEG as u64 - 100 * 8]
        {
            for tot_len in
                [4001u32, 8200, 8168 + 8, 8168 * 3, 8168 * 3 + 1, SEG, SEG + 77, 5 * SEG + 3, MAX_RECORD_LENGTH]
            {
                let lsn = Lsn(lsn);
                if (tot_len as u64) <= PAGE - lsn.page_offset() as u64 {
                    continue;
                }
                assert_eq!(dec.record_end(lsn, tot_len), walk(lsn, tot_len), "lsn {lsn} len {tot_len}");
            }
        }
    }

    #[test]
    fn header_is_checked_before_waiting_for_the_rest() {
        // A record crossing pages whose prev-link is wrong is rejected once its header is
        // buffered, even though the rest of it never arrives.
        let mut w = WalWriter::new(Lsn(0), SEG);
        w.append(10, 0, b"first", &[]);
        w.prev = Lsn(8);
        let (s, _) = w.append(10, 0, &[1u8; 20000], &[]);
        let mut dec = WalStreamDecoder::new(Lsn(0), SEG).unwrap();
        dec.feed_slice(&w.buf[..(s - w.start) as usize + 24]);
        assert!(dec.poll().unwrap().is_some());
        assert!(matches!(dec.poll(), Err(DecodeError::PrevLink { .. })));
    }

    #[test]
    fn switch_skips_to_next_segment() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        w.append(10, 0, b"a", &[]);
        let (sw, seg_end) = w.switch();
        let (after, _) = w.append(10, 0, b"b", &[]);
        let mut dec = WalStreamDecoder::new(Lsn(0), SEG).unwrap();
        dec.feed(Bytes::from(w.buf));
        let (recs, err) = decode_all(&mut dec);
        assert!(err.is_none());
        assert_eq!(recs.len(), 3);
        assert!(recs[1].is_switch());
        assert_eq!((recs[1].lsn, recs[1].end_lsn), (sw, seg_end));
        assert_eq!(seg_end, Lsn(SEG as u64));
        assert_eq!(recs[2].lsn, after);
    }

    #[test]
    fn zeroed_tail_ends_cleanly_with_last_good_position() {
        let (mut w, expect) = sample();
        w.buf.extend(vec![0u8; 3 * XLOG_BLCKSZ]);
        let mut dec = WalStreamDecoder::new(w.start, SEG).unwrap();
        dec.feed(Bytes::from(w.buf));
        let (recs, err) = decode_all(&mut dec);
        assert_eq!(recs.len(), expect.len());
        let err = err.expect("zeros end the WAL");
        assert!(matches!(err, DecodeError::RecordLength { len: 0, .. } | DecodeError::Page(_)), "{err}");
        assert_eq!(dec.position(), expect.last().unwrap().1);
        // Sticky: asking again gives the same answer.
        assert_eq!(dec.poll().unwrap_err(), err);
    }

    #[test]
    fn broken_prev_link_and_crc_are_caught() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        w.append(10, 0, b"first", &[]);
        w.prev = Lsn(8); // wrong prev-link for the next record
        w.append(10, 0, b"second", &[]);
        let mut dec = WalStreamDecoder::new(Lsn(0), SEG).unwrap();
        dec.feed(Bytes::from(w.buf.clone()));
        let (recs, err) = decode_all(&mut dec);
        assert_eq!(recs.len(), 1);
        assert!(matches!(err, Some(DecodeError::PrevLink { .. })));

        let mut w = WalWriter::new(Lsn(0), SEG);
        let (s, _) = w.append(10, 0, b"payload", &[]);
        let at = (s - w.start) as usize + 30;
        w.buf[at] ^= 0x40;
        let mut dec = WalStreamDecoder::new(Lsn(0), SEG).unwrap();
        dec.feed(Bytes::from(w.buf));
        assert!(matches!(dec.poll(), Err(DecodeError::Record(RecordError::Crc { .. }))));
    }

    #[test]
    fn garbage_length_does_not_wait_for_a_gigabyte() {
        let mut w = WalWriter::new(Lsn(0), SEG);
        let (s, _) = w.append(10, 0, b"x", &[]);
        w.buf.extend(vec![0u8; 2 * XLOG_BLCKSZ]);
        let off = (s - w.start) as usize;
        w.buf[off..off + 4].copy_from_slice(&(MAX_RECORD_LENGTH - 1).to_le_bytes());
        let mut dec = WalStreamDecoder::new(Lsn(0), SEG).unwrap();
        dec.feed(Bytes::from(w.buf));
        // The next page has no continuation header: an error now, not a wait for more input.
        assert!(dec.poll().is_err());
    }
}
