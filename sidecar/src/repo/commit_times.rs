//! When transactions ended: the start LSN and `xact_time` of every commit and abort record
//! (prepared or not) a timeline's WAL holds — exactly the records PostgreSQL's recovery
//! looks at for `recovery_target_time` — so a time can be answered with the LSN where
//! PostgreSQL's own recovery would stop ([`first_after`](CommitTimes::first_after)), and an
//! LSN with the times around it.
//!
//! Ingest notes each record ([`CommitTimes::note`]); a timeline's flush makes the notes up to
//! its new durable LSN durable before its manifest says so ([`CommitTimes::persist`]), so the
//! index never lacks a transaction end that the store reports flushed. Re-ingesting WAL after
//! a crash notes nothing twice (entries must come in LSN order; older ones are skipped).
//!
//! Two files in the timeline's directory. The log holds the entries not yet sealed (fewer
//! than [`CHUNK`], 16 bytes each) and is written anew, durably (temp name, fsync, rename), at
//! each persist; every [`CHUNK`] entries are sealed into one delta-encoded chunk (about 5
//! bytes an entry) appended to the chunk file before the log is written without them. The
//! log names how much of the chunk file is sealed, so a chunk whose append a crash
//! interrupted is cut off at open, its entries still in the log. The log, every chunk header
//! and every chunk payload carry a CRC32C: damage is an error naming the file and byte.
//!
//! ```text
//! "commit-times.log":  magic u32 "NCTL" | sealed length of the chunk file u64 | n u32 |
//!                      n × (start lsn u64 | xact_time i64) | crc32c u32 (of all before it)
//! "commit-times":      chunks, each
//!                      header: magic u32 "NCTC" | count u32 | first lsn u64 | last lsn u64 |
//!                              first time i64 | max time i64 (of every entry up to this chunk's
//!                              last, earlier chunks included: a running maximum) |
//!                              payload length u32 | crc32c u32 (of the header before it)
//!                      payload: count × (lsn − previous lsn: varint | time − previous time:
//!                              zigzag varint), the first entry's previous being the header's
//!                              first lsn and first time | crc32c u32 (of the payload)
//! integers little-endian; times are PostgreSQL's (µs since 2000-01-01 UTC)
//! ```
//!
//! Looking a time up is a binary search over the chunks' running maxima (held in memory, 48
//! bytes per chunk) and one chunk read: the first entry whose time is after `ts` is the first
//! whose running maximum is, whatever order the clock ran in.

use crc32c::crc32c;
use neon_types::{Lsn, PgTime};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Entries per sealed chunk.
pub const CHUNK: usize = 4096;
const LOG: &str = "commit-times.log";
const CHUNKS: &str = "commit-times";
/// The two files, for those who copy a timeline elsewhere (the remote store): the log is
/// rewritten whole; the chunk file only grows, up to the length the log says is sealed.
pub const LOG_FILE: &str = LOG;
pub const CHUNK_FILE: &str = CHUNKS;
const LOG_MAGIC: u32 = u32::from_le_bytes(*b"NCTL");
const CHUNK_MAGIC: u32 = u32::from_le_bytes(*b"NCTC");
const LOG_HEADER: usize = 16;
const LOG_RECORD: usize = 16;
const CHUNK_HEADER: usize = 48;

/// A commit or abort record: where it starts, and the time it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub lsn: Lsn,
    pub time: PgTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitTimesError {
    #[error("commit time index {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("commit time index {path} is corrupt at byte {at}: {what}")]
    Corrupt { path: PathBuf, at: u64, what: String },
}

/// A sealed chunk, as its header says.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    count: u32,
    first: Lsn,
    last: Lsn,
    first_time: PgTime,
    /// The running maximum up to this chunk's last entry.
    max: PgTime,
    /// Where the payload starts in the chunk file.
    offset: u64,
    len: u32,
}

struct Inner {
    /// Shared with lookups, which take it without copying (copied on a seal).
    chunks: Arc<Vec<Chunk>>,
    sealed_len: u64,
    /// In the log file, after the sealed chunks.
    logged: Vec<Entry>,
    /// Noted, not yet in the log: with the end LSN of their record.
    pending: Vec<(Entry, Lsn)>,
    /// The newest entry noted (what a re-ingest must go past).
    newest: Option<Lsn>,
}

/// One timeline's transaction end times.
pub struct CommitTimes {
    dir: PathBuf,
    inner: Mutex<Inner>,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The log file's bytes.
fn encode_log(sealed_len: u64, logged: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LOG_HEADER + logged.len() * LOG_RECORD + 4);
    out.extend_from_slice(&LOG_MAGIC.to_le_bytes());
    out.extend_from_slice(&sealed_len.to_le_bytes());
    out.extend_from_slice(&(logged.len() as u32).to_le_bytes());
    for e in logged {
        out.extend_from_slice(&e.lsn.0.to_le_bytes());
        out.extend_from_slice(&e.time.0.to_le_bytes());
    }
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The chunk file bytes of `entries` (non-empty), whose running maximum before them is `max`.
fn encode_chunk(entries: &[Entry], mut max: Option<PgTime>) -> (Vec<u8>, PgTime) {
    let (first, last) = (entries[0], entries[entries.len() - 1]);
    let mut payload = Vec::with_capacity(entries.len() * 6);
    let mut prev = first;
    for e in entries {
        put_varint(&mut payload, e.lsn.0 - prev.lsn.0);
        let d = e.time.0.wrapping_sub(prev.time.0);
        put_varint(&mut payload, ((d << 1) ^ (d >> 63)) as u64);
        prev = *e;
        max = Some(max.map_or(e.time, |m| m.max(e.time)));
    }
    let max = max.expect("entries");
    let mut out = Vec::with_capacity(CHUNK_HEADER + payload.len() + 4);
    out.extend_from_slice(&CHUNK_MAGIC.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&first.lsn.0.to_le_bytes());
    out.extend_from_slice(&last.lsn.0.to_le_bytes());
    out.extend_from_slice(&first.time.0.to_le_bytes());
    out.extend_from_slice(&max.0.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let pcrc = crc32c(&payload);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&pcrc.to_le_bytes());
    (out, max)
}

/// How much of the chunk file the log `bytes` (read from `path`) says is sealed: that prefix
/// never changes.
pub fn sealed_length(path: &Path, bytes: &[u8]) -> Result<u64, CommitTimesError> {
    if bytes.len() < LOG_HEADER + 4 || le_u32(bytes, 0) != LOG_MAGIC {
        return Err(CommitTimesError::Corrupt { path: path.to_path_buf(), at: 0, what: "not a log".into() });
    }
    let body = bytes.len() - 4;
    if le_u32(bytes, body) != crc32c(&bytes[..body]) {
        return Err(CommitTimesError::Corrupt {
            path: path.to_path_buf(),
            at: body as u64,
            what: "the log fails its CRC".into(),
        });
    }
    Ok(le_u64(bytes, 4))
}

impl CommitTimes {
    /// Opens the index in a timeline's directory (empty if it has none yet). `writer`: this
    /// process appends to it, and may cut off a chunk a crash left unsealed.
    pub fn open(dir: &Path, writer: bool) -> Result<CommitTimes, CommitTimesError> {
        let log_path = dir.join(LOG);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CommitTimesError::Io { path, source }
        };
        let corrupt =
            |path: &Path, at: u64, what: String| CommitTimesError::Corrupt { path: path.to_path_buf(), at, what };
        let log = match std::fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&log_path)(e)),
        };
        let (mut sealed_len, mut logged) = (0u64, Vec::new());
        if !log.is_empty() {
            let n = if log.len() >= LOG_HEADER + 4 { le_u32(&log, 12) as usize } else { 0 };
            if log.len() != LOG_HEADER + n * LOG_RECORD + 4 || le_u32(&log, 0) != LOG_MAGIC {
                return Err(corrupt(&log_path, 0, format!("{} bytes, not a log of its header's length", log.len())));
            }
            let body = log.len() - 4;
            if le_u32(&log, body) != crc32c(&log[..body]) {
                return Err(corrupt(&log_path, body as u64, "the log fails its CRC".into()));
            }
            sealed_len = le_u64(&log, 4);
            for r in log[LOG_HEADER..body].chunks(LOG_RECORD) {
                logged.push(Entry { lsn: Lsn(le_u64(r, 0)), time: PgTime(le_u64(r, 8) as i64) });
            }
        }
        // The sealed chunks: their headers, each checked.
        let chunk_path = dir.join(CHUNKS);
        let mut chunks = Vec::new();
        if sealed_len > 0 {
            let f = File::open(&chunk_path).map_err(io(&chunk_path))?;
            let have = f.metadata().map_err(io(&chunk_path))?.len();
            if have < sealed_len {
                return Err(corrupt(&chunk_path, have, format!("shorter than the {sealed_len} bytes sealed")));
            }
            let mut at = 0u64;
            while at < sealed_len {
                let mut h = [0u8; CHUNK_HEADER];
                f.read_exact_at(&mut h, at).map_err(io(&chunk_path))?;
                if le_u32(&h, 0) != CHUNK_MAGIC || le_u32(&h, 44) != crc32c(&h[..44]) {
                    return Err(corrupt(&chunk_path, at, "chunk header fails its CRC".into()));
                }
                let c = Chunk {
                    count: le_u32(&h, 4),
                    first: Lsn(le_u64(&h, 8)),
                    last: Lsn(le_u64(&h, 16)),
                    first_time: PgTime(le_u64(&h, 24) as i64),
                    max: PgTime(le_u64(&h, 32) as i64),
                    offset: at + CHUNK_HEADER as u64,
                    len: le_u32(&h, 40),
                };
                at = c.offset + u64::from(c.len) + 4;
                if at > sealed_len {
                    return Err(corrupt(&chunk_path, c.offset, "chunk runs past the sealed length".into()));
                }
                chunks.push(c);
            }
            // A chunk appended but never sealed (the log not rewritten): cut off; its entries
            // are still in the log.
            if writer && have > sealed_len {
                let f = OpenOptions::new().write(true).open(&chunk_path).map_err(io(&chunk_path))?;
                f.set_len(sealed_len).map_err(io(&chunk_path))?;
                f.sync_all().map_err(io(&chunk_path))?;
            }
        }
        // (A log is written only after the chunks it names are sealed: it holds none of theirs.)
        let newest = logged.last().map(|e| e.lsn).or(chunks.last().map(|c| c.last));
        Ok(CommitTimes {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner { chunks: Arc::new(chunks), sealed_len, logged, pending: Vec::new(), newest }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    fn chunk_path(&self) -> PathBuf {
        self.dir.join(CHUNKS)
    }

    /// Notes a commit or abort record starting at `lsn` and ending at `end`. Entries must
    /// come in WAL order; one at or before the newest noted is skipped (WAL filed again after
    /// a restart).
    pub fn note(&self, lsn: Lsn, end: Lsn, time: PgTime) {
        let mut inner = self.lock();
        if inner.newest.is_some_and(|n| lsn <= n) {
            return;
        }
        inner.newest = Some(lsn);
        inner.pending.push((Entry { lsn, time }, end));
    }

    /// Makes every entry whose record ends at or before `upto` durable (before the timeline's
    /// manifest says `upto` is), sealing a chunk when the log has enough.
    ///
    /// One caller at a time (the timeline's flush, under its flush lock): the files are
    /// written without the lock, so ingest's notes and lookups go on meanwhile.
    pub fn persist(&self, upto: Lsn) -> Result<(), CommitTimesError> {
        let (n, mut logged, mut sealed_len, last_max) = {
            let inner = self.lock();
            let n = inner.pending.iter().take_while(|(_, end)| *end <= upto).count();
            if n == 0 {
                return Ok(());
            }
            let mut logged = inner.logged.clone();
            logged.extend(inner.pending[..n].iter().map(|(e, _)| *e));
            (n, logged, inner.sealed_len, inner.chunks.last().map(|c| c.max))
        };
        let mut chunks = Vec::new();
        while logged.len() >= CHUNK {
            let before = chunks.last().map(|c: &Chunk| c.max).or(last_max);
            let chunk = self.seal(&logged[..CHUNK], before, sealed_len)?;
            sealed_len = chunk.offset + u64::from(chunk.len) + 4;
            chunks.push(chunk);
            logged.drain(..CHUNK);
        }
        let path = self.log_path();
        crate::repo::timeline::write_durably(
            &self.dir.join("commit-times.log.tmp"),
            &path,
            &encode_log(sealed_len, &logged),
        )
        .map_err(|source| CommitTimesError::Io { path, source })?;
        // Durable: only now does memory move on (a failure above leaves it as it was; notes
        // made meanwhile were appended after these `n`).
        let mut inner = self.lock();
        inner.pending.drain(..n);
        inner.logged = logged;
        if !chunks.is_empty() {
            Arc::make_mut(&mut inner.chunks).extend(chunks);
        }
        inner.sealed_len = sealed_len;
        Ok(())
    }

    /// Appends `entries` as a chunk at `at` of the chunk file, durably; the log still names
    /// the old length until it is written.
    fn seal(&self, entries: &[Entry], before: Option<PgTime>, at: u64) -> Result<Chunk, CommitTimesError> {
        let path = self.chunk_path();
        let io = |source| CommitTimesError::Io { path: path.clone(), source };
        let (bytes, max) = encode_chunk(entries, before);
        let f = OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io)?;
        f.set_len(at).map_err(io)?;
        f.write_all_at(&bytes, at).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(Chunk {
            count: entries.len() as u32,
            first: entries[0].lsn,
            last: entries[entries.len() - 1].lsn,
            first_time: entries[0].time,
            max,
            offset: at + CHUNK_HEADER as u64,
            len: (bytes.len() - CHUNK_HEADER - 4) as u32,
        })
    }

    /// A sealed chunk's entries, its CRC checked.
    fn read_chunk(&self, c: &Chunk) -> Result<Vec<Entry>, CommitTimesError> {
        let path = self.chunk_path();
        let corrupt = |what: &str| CommitTimesError::Corrupt { path: path.clone(), at: c.offset, what: what.into() };
        let f = File::open(&path).map_err(|source| CommitTimesError::Io { path: path.clone(), source })?;
        let mut buf = vec![0u8; c.len as usize + 4];
        f.read_exact_at(&mut buf, c.offset).map_err(|source| CommitTimesError::Io { path: path.clone(), source })?;
        let (payload, crc) = buf.split_at(c.len as usize);
        if crc32c(payload) != le_u32(crc, 0) {
            return Err(corrupt("chunk payload fails its CRC"));
        }
        let mut out = Vec::with_capacity(c.count as usize);
        let (mut lsn, mut time, mut at) = (c.first.0, c.first_time.0, 0usize);
        for _ in 0..c.count {
            let dl = get_varint(payload, &mut at).ok_or_else(|| corrupt("chunk payload ends early"))?;
            let z = get_varint(payload, &mut at).ok_or_else(|| corrupt("chunk payload ends early"))?;
            lsn += dl;
            time = time.wrapping_add(((z >> 1) as i64) ^ -((z & 1) as i64));
            out.push(Entry { lsn: Lsn(lsn), time: PgTime(time) });
        }
        if at != payload.len() || out.last().map(|e| e.lsn) != Some(c.last) {
            return Err(corrupt("chunk payload does not match its header"));
        }
        Ok(out)
    }

    /// The sealed chunks, and the entries not in them.
    fn unsealed(&self) -> (Arc<Vec<Chunk>>, Vec<Entry>) {
        let inner = self.lock();
        let mut tail = inner.logged.clone();
        tail.extend(inner.pending.iter().map(|(e, _)| *e));
        (inner.chunks.clone(), tail)
    }

    /// The first entry, in WAL order and before `limit`, whose time is after `ts` (at or
    /// after, when not `inclusive`): where recovery with `recovery_target_time = ts` (and
    /// `recovery_target_inclusive`) stops, before that record.
    pub fn first_after(&self, ts: PgTime, inclusive: bool, limit: Lsn) -> Result<Option<Entry>, CommitTimesError> {
        let hit = |t: PgTime| if inclusive { t > ts } else { t >= ts };
        let (chunks, tail) = self.unsealed();
        let found = match chunks.partition_point(|c| !hit(c.max)) {
            i if i < chunks.len() => self.read_chunk(&chunks[i])?.into_iter().find(|e| hit(e.time)),
            _ => tail.into_iter().find(|e| hit(e.time)),
        };
        Ok(found.filter(|e| e.lsn < limit))
    }

    /// The last entry starting before `lsn` and the first starting at or after it (before
    /// `limit`).
    pub fn around(&self, lsn: Lsn, limit: Lsn) -> Result<(Option<Entry>, Option<Entry>), CommitTimesError> {
        let (chunks, tail) = self.unsealed();
        // Every entry of chunk i is at or before chunks[i].last.
        let i = chunks.partition_point(|c| c.last < lsn);
        let mut entries = if i < chunks.len() { self.read_chunk(&chunks[i])? } else { tail.clone() };
        let mut before = entries.iter().rev().find(|e| e.lsn < lsn).copied();
        if before.is_none() && i > 0 {
            before = self.read_chunk(&chunks[i - 1])?.last().copied();
        }
        let mut after = entries.iter().find(|e| e.lsn >= lsn).copied();
        if after.is_none() && i < chunks.len() {
            entries = if i + 1 < chunks.len() { self.read_chunk(&chunks[i + 1])? } else { tail };
            after = entries.first().copied();
        }
        Ok((before.filter(|e| e.lsn < limit), after.filter(|e| e.lsn < limit)))
    }

    /// The oldest entry.
    pub fn first(&self) -> Result<Option<Entry>, CommitTimesError> {
        let (chunks, tail) = self.unsealed();
        match chunks.first() {
            Some(c) => Ok(Some(Entry { lsn: c.first, time: c.first_time })),
            None => Ok(tail.first().copied()),
        }
    }

    /// Entries held (sealed, logged and pending).
    pub fn len(&self) -> u64 {
        let inner = self.lock();
        inner.chunks.iter().map(|c| u64::from(c.count)).sum::<u64>() + (inner.logged.len() + inner.pending.len()) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn e(lsn: u64, time: i64) -> Entry {
        Entry { lsn: Lsn(lsn), time: PgTime(time) }
    }

    /// What recovery does: the first record in WAL order whose time is after `ts`.
    fn oracle(all: &[Entry], ts: i64, inclusive: bool) -> Option<Entry> {
        all.iter().find(|x| if inclusive { x.time.0 > ts } else { x.time.0 >= ts }).copied()
    }

    fn fill(t: &CommitTimes, all: &[Entry], flush_every: usize) {
        for (i, x) in all.iter().enumerate() {
            t.note(x.lsn, Lsn(x.lsn.0 + 8), x.time);
            if i % flush_every == flush_every - 1 {
                t.persist(Lsn(x.lsn.0 + 8)).unwrap();
            }
        }
        t.persist(Lsn(u64::MAX)).unwrap();
    }

    #[test]
    fn answers_as_recovery_stops_with_clocks_that_step_back_across_chunks_and_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        // 2.5 chunks; time mostly rises by 1000 µs, equal times in runs, a step back of
        // 5000 µs every 1001 entries.
        let mut all = Vec::new();
        let mut time = 1_000_000i64;
        for i in 0..(CHUNK * 5 / 2) as u64 {
            time += if i % 3 == 0 { 0 } else { 1000 };
            if i % 1001 == 1000 {
                time -= 5000;
            }
            all.push(e(0x100_0000 + i * 96 + (i % 5) * 8, time));
        }
        let t = CommitTimes::open(dir.path(), true).unwrap();
        fill(&t, &all, 1000);
        assert_eq!(t.lock().chunks.len(), 5 * CHUNK / 2 / CHUNK);
        let check = |t: &CommitTimes| {
            for k in (0..all.len()).step_by(97).chain([0, all.len() - 1]) {
                for ts in [all[k].time.0 - 1, all[k].time.0, all[k].time.0 + 1] {
                    for inclusive in [true, false] {
                        assert_eq!(
                            t.first_after(PgTime(ts), inclusive, Lsn(u64::MAX)).unwrap(),
                            oracle(&all, ts, inclusive),
                            "ts {ts} incl {inclusive}"
                        );
                    }
                }
                let (before, after) = t.around(all[k].lsn, Lsn(u64::MAX)).unwrap();
                assert_eq!(before, k.checked_sub(1).map(|j| all[j]));
                assert_eq!(after, Some(all[k]));
                let (before, after) = t.around(Lsn(all[k].lsn.0 + 1), Lsn(u64::MAX)).unwrap();
                assert_eq!((before, after), (Some(all[k]), all.get(k + 1).copied()));
            }
            assert_eq!(t.first().unwrap(), Some(all[0]));
            assert_eq!(t.len(), all.len() as u64);
        };
        check(&t);
        // A limit (a child timeline's fork) hides what is at or after it.
        let mid = all[CHUNK + 10];
        assert_eq!(t.first_after(PgTime(mid.time.0 - 1), true, mid.lsn).unwrap(), None);
        drop(t);
        let t = CommitTimes::open(dir.path(), true).unwrap();
        check(&t);
        // Filed again after a restart: nothing twice.
        fill(&t, &all[all.len() - 50..], 7);
        check(&t);
        // About 6 bytes an entry once sealed.
        let sealed = std::fs::metadata(dir.path().join(CHUNKS)).unwrap().len();
        let n = t.lock().chunks.len() * CHUNK;
        assert!(sealed < (n * 6) as u64, "{sealed} bytes for {n} entries");
    }

    #[test]
    fn a_crash_leaves_what_was_persisted_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<Entry> = (0..(CHUNK + 100) as u64).map(|i| e(1000 + i * 50, i as i64 * 10)).collect();
        let t = CommitTimes::open(dir.path(), true).unwrap();
        fill(&t, &all[..CHUNK - 1], 500);
        // Not persisted: gone after a crash, and filed again.
        t.note(all[CHUNK - 1].lsn, Lsn(all[CHUNK - 1].lsn.0 + 8), all[CHUNK - 1].time);
        drop(t);
        let t = CommitTimes::open(dir.path(), true).unwrap();
        assert_eq!(t.len(), (CHUNK - 1) as u64);
        fill(&t, &all[CHUNK - 1..], 30);
        assert_eq!(t.lock().chunks.len(), 1);
        assert_eq!(t.lock().logged.len(), 100);
        drop(t);
        // A chunk appended but not sealed (the log not yet written) is cut off.
        let log = dir.path().join(LOG);
        let chunks = dir.path().join(CHUNKS);
        let sealed = std::fs::metadata(&chunks).unwrap().len();
        OpenOptions::new().append(true).open(&chunks).unwrap().write_all(&[7u8; 100]).unwrap();
        let t = CommitTimes::open(dir.path(), true).unwrap();
        assert_eq!(t.len(), all.len() as u64);
        assert_eq!(std::fs::metadata(&chunks).unwrap().len(), sealed);
        drop(t);
        // A flipped bit inside a sealed chunk: the lookup that reads it names the file.
        let mut b = std::fs::read(&chunks).unwrap();
        b[CHUNK_HEADER + 100] ^= 1;
        std::fs::write(&chunks, &b).unwrap();
        let t = CommitTimes::open(dir.path(), true).unwrap();
        let err = t.first_after(PgTime(5), true, Lsn(u64::MAX)).unwrap_err().to_string();
        assert!(err.contains("commit-times") && err.contains("CRC"), "{err}");
        // ... and in the log: an error at open.
        let mut l = std::fs::read(&log).unwrap();
        l[LOG_HEADER + 2] ^= 1;
        std::fs::write(&log, &l).unwrap();
        let err = CommitTimes::open(dir.path(), true).err().expect("corrupt").to_string();
        assert!(err.contains("commit-times.log") && err.contains("CRC"), "{err}");
    }
}
