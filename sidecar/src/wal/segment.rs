//! WAL segment files: their names (`TTTTTTTTXXXXXXXXYYYYYYYY`), finding them in directories, and
//! [`WalFileReader`], which feeds consecutive segments of one timeline through the stream
//! decoder so that files and replication share one decoding path.
//!
//! Reading stops cleanly at the end of valid WAL — a zeroed or recycled page, a torn or
//! corrupt record, a missing next segment, or the requested end — and reports why, with the
//! end of the last good record.

use super::consts::SIZE_OF_LONG_PAGE_HEADER;
use super::decoder::{DecodeError, WalStreamDecoder};
use super::page::{valid_segment_size, PageHeader};
use super::record::{DecodedRecord, RecordView};
use bytes::Bytes;
use neon_types::Lsn;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A segment's identity: timeline and segment number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId {
    pub tli: u32,
    pub segno: u64,
}

impl SegmentId {
    /// Parses a segment file name (24 upper-case hex digits, optionally `.partial`).
    pub fn parse(name: &str, seg_size: u32) -> Option<SegmentId> {
        if !looks_like_segment(name) {
            return None;
        }
        let name = name.strip_suffix(".partial").unwrap_or(name);
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_log = segments_per_xlogid(seg_size);
        (seg < per_log).then_some(SegmentId { tli, segno: log * per_log + seg })
    }

    /// The file name PostgreSQL gives this segment (`XLogFileName`).
    pub fn file_name(&self, seg_size: u32) -> String {
        let per_log = segments_per_xlogid(seg_size);
        format!("{:08X}{:08X}{:08X}", self.tli, self.segno / per_log, self.segno % per_log)
    }

    /// The LSN of the segment's first byte.
    pub fn start_lsn(&self, seg_size: u32) -> Lsn {
        Lsn(self.segno * seg_size as u64)
    }
}

/// 24 upper-case hex digits, optionally `.partial`: a segment file name of any segment size.
fn looks_like_segment(name: &str) -> bool {
    let name = name.strip_suffix(".partial").unwrap_or(name);
    name.len() == 24 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F'))
}

fn segments_per_xlogid(seg_size: u32) -> u64 {
    0x1_0000_0000u64 / seg_size as u64
}

/// Problems finding or opening WAL files (as opposed to decoding them).
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("could not read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a WAL segment file name")]
    NotSegment { path: PathBuf },
    #[error("{path} does not start with a valid long WAL page header ({why})")]
    BadFirstPage { path: PathBuf, why: String },
    #[error("no WAL segment of timeline {tli} holds {lsn} in {searched}")]
    StartNotFound { tli: u32, lsn: Lsn, searched: String },
    #[error("no WAL segment files found in {0}")]
    Empty(String),
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Reads the first page of a segment file: its segment size and system identifier.
pub fn read_segment_header(path: &Path) -> Result<(u32, u64), SegmentError> {
    use std::io::Read;
    let io = |source| SegmentError::Io { path: path.to_path_buf(), source };
    let mut buf = [0u8; SIZE_OF_LONG_PAGE_HEADER];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut buf)).map_err(io)?;
    let hdr = PageHeader::parse(&buf);
    let bad = |why: &str| SegmentError::BadFirstPage { path: path.to_path_buf(), why: why.into() };
    let long = hdr.long.ok_or_else(|| bad("no long header"))?;
    if hdr.magic != super::consts::XLOG_PAGE_MAGIC {
        return Err(bad(&format!("magic {:04X}, expected {:04X}", hdr.magic, super::consts::XLOG_PAGE_MAGIC)));
    }
    if !valid_segment_size(long.seg_size) {
        return Err(bad(&format!("segment size {}", long.seg_size)));
    }
    Ok((long.seg_size, long.sysid))
}

/// A set of segment files of one timeline, by segment number.
#[derive(Debug, Clone)]
pub struct SegmentSet {
    pub seg_size: u32,
    pub sysid: u64,
    pub tli: u32,
    pub files: BTreeMap<u64, PathBuf>,
}

impl SegmentSet {
    /// Collects the segments of timeline `tli` (or, if `None`, of the lowest timeline present)
    /// from `paths`, each a segment file or a directory of them (`pg_wal`, an archive).
    pub fn collect<P: AsRef<Path>>(paths: &[P], tli: Option<u32>) -> Result<SegmentSet, SegmentError> {
        // (path, named explicitly): explicit files must be segments; other files in a
        // directory (history files, `.backup` labels, archive_status) are passed over.
        let mut found: Vec<(PathBuf, bool)> = Vec::new();
        for p in paths {
            let p = p.as_ref();
            if p.is_dir() {
                let rd = std::fs::read_dir(p).map_err(|source| SegmentError::Io { path: p.to_path_buf(), source })?;
                for e in rd {
                    let e = e.map_err(|source| SegmentError::Io { path: p.to_path_buf(), source })?;
                    if looks_like_segment(&e.file_name().to_string_lossy()) && e.path().is_file() {
                        found.push((e.path(), false));
                    }
                }
            } else {
                found.push((p.to_path_buf(), true));
            }
        }
        let described = paths.iter().map(|p| p.as_ref().display().to_string()).collect::<Vec<_>>().join(", ");
        let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some((path, _)) = found.iter().find(|(p, explicit)| *explicit && !looks_like_segment(&file_name(p))) {
            return Err(SegmentError::NotSegment { path: path.clone() });
        }
        let first = found
            .iter()
            .map(|(p, _)| p)
            .min_by_key(|p| file_name(p))
            .ok_or_else(|| SegmentError::Empty(described.clone()))?;
        let (seg_size, sysid) = read_segment_header(first)?;
        let mut by_tli: BTreeMap<u32, BTreeMap<u64, PathBuf>> = BTreeMap::new();
        for (path, explicit) in found {
            let Some(id) = SegmentId::parse(&file_name(&path), seg_size) else {
                if explicit {
                    return Err(SegmentError::NotSegment { path });
                }
                continue;
            };
            // A complete segment wins over a `.partial` one of the same number.
            let slot = by_tli.entry(id.tli).or_default().entry(id.segno).or_insert_with(|| path.clone());
            if slot.to_string_lossy().ends_with(".partial") {
                *slot = path;
            }
        }
        let tli = match tli {
            Some(t) => t,
            None => *by_tli.keys().next().expect("at least one file"),
        };
        let files = by_tli.remove(&tli).unwrap_or_default();
        if files.is_empty() {
            return Err(SegmentError::Empty(format!("{described} (timeline {tli})")));
        }
        Ok(SegmentSet { seg_size, sysid, tli, files })
    }

    /// The first LSN covered by the set.
    pub fn first_lsn(&self) -> Lsn {
        let segno = *self.files.keys().next().expect("non-empty");
        Lsn(segno * self.seg_size as u64)
    }
}

/// Why a [`WalFileReader`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The requested end was reached.
    ReachedEnd,
    /// The files ended (the last record may continue in a segment not given).
    EndOfFiles,
    /// The next segment file is missing.
    MissingSegment { segno: u64, lsn: Lsn },
    /// A segment file is shorter than the segment size; its bytes end at `lsn`.
    ShortSegment { path: PathBuf, lsn: Lsn },
    /// The WAL stops being valid here: the normal end of a live segment (zeroes, a recycled
    /// page) or corruption; PostgreSQL makes the same call at the same place.
    Invalid(DecodeError),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::ReachedEnd => write!(f, "reached the requested end"),
            StopReason::EndOfFiles => write!(f, "end of the given WAL files"),
            StopReason::MissingSegment { segno, lsn } => {
                write!(f, "segment {segno} (holding {lsn}) is missing")
            }
            StopReason::ShortSegment { path, lsn } => write!(f, "{} ends early, at {lsn}", path.display()),
            StopReason::Invalid(e) => write!(f, "end of valid WAL: {e}"),
        }
    }
}

/// Reads records from consecutive segment files, loading one segment at a time.
pub struct WalFileReader {
    set: SegmentSet,
    decoder: WalStreamDecoder,
    next_segno: u64,
    /// Where in the first segment reading begins (the page holding the start LSN).
    first_offset: u64,
    /// The segment being read: the file and how many of its bytes are still to be fed.
    current: Option<(std::fs::File, PathBuf, u64)>,
    /// Set when a file turned out shorter than its segment: stop once its bytes are decoded.
    stop_after_feed: Option<StopReason>,
    end: Option<Lsn>,
    stop: Option<StopReason>,
    bytes_read: u64,
}

/// Segments are fed to the decoder in pieces of this size, whose memory is recycled: a few
/// small buffers stay warm in cache, where whole-segment buffers would be faulted in afresh.
const READ_PIECE: usize = 1 << 20;

impl WalFileReader {
    /// Reads from the first record at or after `start` (default: the start of the first
    /// segment) until `end` (records must end at or before it), or the end of valid WAL.
    pub fn new(set: SegmentSet, start: Option<Lsn>, end: Option<Lsn>) -> Result<Self, SegmentError> {
        let start = start.unwrap_or_else(|| set.first_lsn());
        let seg_size = set.seg_size;
        let segno = start.segment_number(seg_size);
        if !set.files.contains_key(&segno) {
            return Err(SegmentError::StartNotFound {
                tli: set.tli,
                lsn: start,
                searched: set
                    .files
                    .values()
                    .next()
                    .and_then(|p| p.parent())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            });
        }
        let mut decoder = WalStreamDecoder::new(start, seg_size)?;
        decoder.expect_system_id(set.sysid);
        // Begin at the page holding `start` (as pg_waldump does), not at the segment's start.
        let first_offset = start.page_start().segment_offset(seg_size) as u64;
        Ok(WalFileReader {
            set,
            decoder,
            next_segno: segno,
            first_offset,
            current: None,
            stop_after_feed: None,
            end,
            stop: None,
            bytes_read: 0,
        })
    }

    /// Why reading stopped, once it has.
    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop.as_ref()
    }

    /// The end of the last good record.
    pub fn end_of_valid_wal(&self) -> Lsn {
        self.decoder.position()
    }

    /// Bytes of segment files loaded so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The segment set being read.
    pub fn segments(&self) -> &SegmentSet {
        &self.set
    }

    /// Feeds the decoder the next piece of WAL; false when there is none.
    fn load_next(&mut self) -> Result<bool, SegmentError> {
        use std::io::Read;
        if let Some(reason) = self.stop_after_feed.take() {
            self.stop = Some(reason);
            return Ok(false);
        }
        if self.current.is_none() && !self.open_next()? {
            return Ok(false);
        }
        let (file, path, left) = self.current.as_mut().expect("a segment is open");
        let n = (*left).min(READ_PIECE as u64) as usize;
        let mut buf =
            self.decoder.take_spent_chunk().and_then(|b| b.try_into_mut().ok()).map(Vec::from).unwrap_or_default();
        buf.clear();
        buf.reserve_exact(n);
        let got = file
            .by_ref()
            .take(n as u64)
            .read_to_end(&mut buf)
            .map_err(|source| SegmentError::Io { path: path.clone(), source })?;
        *left -= n as u64;
        if got < n {
            // The file ends before the segment does: what follows is not the next segment's
            // bytes, so decoding must stop after what was read.
            self.stop_after_feed =
                Some(StopReason::ShortSegment { path: path.clone(), lsn: self.decoder.input_end() + got as u64 });
        }
        if *left == 0 || got < n {
            self.current = None;
        }
        self.bytes_read += got as u64;
        self.decoder.feed(Bytes::from(buf));
        Ok(got > 0 || self.load_next()?)
    }

    /// Opens the next segment; false (with the reason recorded) when there is none to read.
    fn open_next(&mut self) -> Result<bool, SegmentError> {
        let seg_start = Lsn(self.next_segno * self.set.seg_size as u64);
        if self.end.is_some_and(|end| seg_start >= end) {
            self.stop = Some(StopReason::ReachedEnd);
            return Ok(false);
        }
        let Some(path) = self.set.files.get(&self.next_segno) else {
            self.stop = Some(if self.set.files.range(self.next_segno..).next().is_some() {
                StopReason::MissingSegment { segno: self.next_segno, lsn: seg_start }
            } else {
                StopReason::EndOfFiles
            });
            return Ok(false);
        };
        use std::io::{Seek, SeekFrom};
        let skip = std::mem::take(&mut self.first_offset);
        let io = |source| SegmentError::Io { path: path.clone(), source };
        let mut file = std::fs::File::open(path).map_err(io)?;
        file.seek(SeekFrom::Start(skip)).map_err(io)?;
        let mut len = self.set.seg_size as u64;
        if let Some(end) = self.end {
            len = len.min(end.checked_sub(seg_start).unwrap_or(0));
        }
        self.current = Some((file, path.clone(), len.saturating_sub(skip)));
        self.next_segno += 1;
        Ok(true)
    }

    /// The next record, `None` once stopped (see [`WalFileReader::stop_reason`]).
    pub fn next_record(&mut self) -> Result<Option<DecodedRecord>, SegmentError> {
        if !self.ready()? {
            return Ok(None);
        }
        Ok(self.decoder.poll().expect("ready() saw a record"))
    }

    /// The next record, borrowed until the next call: the fastest way through WAL.
    pub fn next_view(&mut self) -> Result<Option<RecordView<'_>>, SegmentError> {
        if !self.ready()? {
            return Ok(None);
        }
        Ok(self.decoder.poll_view().expect("ready() saw a record"))
    }

    /// Loads segments until the decoder has a record (true) or reading stops (false).
    fn ready(&mut self) -> Result<bool, SegmentError> {
        if self.stop.is_some() {
            return Ok(false);
        }
        loop {
            match self.decoder.has_record() {
                Ok(true) => return Ok(true),
                Ok(false) => {
                    if !self.load_next()? {
                        return Ok(false);
                    }
                }
                Err(e) => {
                    self.stop = Some(StopReason::Invalid(e));
                    return Ok(false);
                }
            }
        }
    }
}

impl Iterator for WalFileReader {
    type Item = Result<DecodedRecord, SegmentError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_record().transpose()
    }
}

/// A whole segment file in memory. Read rather than mapped: PostgreSQL rewrites the segment
/// it is filling, and a mapping would let those writes change bytes the decoder already holds.
pub fn load_segment(path: &Path) -> Result<Bytes, SegmentError> {
    std::fs::read(path).map(Bytes::from).map_err(|source| SegmentError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let seg = 16 << 20;
        let id = SegmentId::parse("000000010000000200000003", seg).unwrap();
        assert_eq!(id, SegmentId { tli: 1, segno: 2 * 256 + 3 });
        assert_eq!(id.file_name(seg), "000000010000000200000003");
        assert_eq!(id.start_lsn(seg).to_string(), "2/3000000");
        assert!(SegmentId::parse("000000010000000200000100", seg).is_none());
        assert!(SegmentId::parse("00000001000000020000000g", seg).is_none());
        assert_eq!(SegmentId::parse("000000010000000000000001.partial", seg).unwrap().segno, 1);
        // 1 MB segments: 4096 per xlogid.
        let small = SegmentId::parse("000000010000000000000FFF", 1 << 20).unwrap();
        assert_eq!(small.segno, 4095);
    }
}
