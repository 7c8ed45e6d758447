//! Which blocks of a branch's relation files still come from history, and which the branch has
//! written: the copy-on-write state beside the overlay (DESIGN: a branch is an ordinary
//! directory tree plus this).
//!
//! Every relation file of the branch's data directory is a real (sparse) file in the overlay,
//! created at the size it had at the branch's LSN. Block `b` of such a file is read from
//! history (rebuilt at the LSN) while `b` is below the file's *history limit* and the branch has
//! not written it; otherwise from the overlay file. Writing a block for the first time files a
//! `written` record after the data is in the overlay file (so a crash in between reads the old
//! page, as a lost write, which PostgreSQL's own WAL replay repairs); a truncation lowers the
//! limit; an unlink ends the file's history (a file created later at the same path is the
//! branch's own).
//!
//! ```text
//! <branch>/relations   (written once, at creation)
//!   magic "NBRL" | version u8 | count u32 | count × entry | crc32c u32 (of all before)
//!   entry: path_len u16 | path (UTF-8, relative to the data directory) |
//!          spcnode u32 | dbnode u32 | relnode u32 | fork u8 | first_block u32 | blocks u32
//!          (the history blocks first_block.. of that fork, as the file's blocks 0..)
//! <branch>/blocks.log  (appended)
//!   record: kind u8 (1 written, 2 truncated, 3 unlinked) | file u32 (entry index) |
//!           block u32 (written: the block; truncated: the new size in blocks) | crc32c u32
//!   a torn last record (short or failing its CRC) was never acknowledged and is dropped
//! ```
//! All integers little-endian.

use crate::basebackup::RelationSegment;
use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8; 4] = b"NBRL";
const VERSION: u8 = 1;
const RECORD_LEN: usize = 13;
const WRITTEN: u8 = 1;
const TRUNCATED: u8 = 2;
const UNLINKED: u8 = 3;

pub const RELATIONS_FILE: &str = "relations";
pub const JOURNAL_FILE: &str = "blocks.log";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// What one relation file's history state is now.
#[derive(Debug)]
struct FileState {
    file: RelationSegment,
    /// Blocks below this come from history unless written.
    limit: u32,
    written: Vec<u64>,
    unlinked: bool,
}

impl FileState {
    fn is_written(&self, block: u32) -> bool {
        self.written.get(block as usize / 64).is_some_and(|w| w & (1 << (block % 64)) != 0)
    }
    fn set_written(&mut self, block: u32) {
        let i = block as usize / 64;
        if self.written.len() <= i {
            self.written.resize(i + 1, 0);
        }
        self.written[i] |= 1 << (block % 64);
    }
}

/// Where a block of a relation file is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The page as history has it at the branch's LSN.
    History(BufferTag),
    /// The overlay file (the branch's own write, or zeros past what history had).
    Overlay,
}

/// The history state of a branch's relation files, loaded from and kept in `<branch>/`.
pub struct HistoryFiles {
    journal_path: PathBuf,
    journal: Mutex<File>,
    files: Mutex<Vec<FileState>>,
    by_path: HashMap<String, u32>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HistoryError + '_ {
    move |source| HistoryError::Io { path: path.to_path_buf(), source }
}

impl HistoryFiles {
    /// Writes the manifest of a new branch (durably) and an empty journal.
    pub fn create(dir: &Path, files: &[RelationSegment]) -> Result<(), HistoryError> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&(files.len() as u32).to_le_bytes());
        for f in files {
            b.extend_from_slice(&(f.path.len() as u16).to_le_bytes());
            b.extend_from_slice(f.path.as_bytes());
            for v in [f.rel.node.spcnode, f.rel.node.dbnode, f.rel.node.relnode] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.push(f.rel.fork as u8);
            b.extend_from_slice(&f.first.to_le_bytes());
            b.extend_from_slice(&f.blocks.to_le_bytes());
        }
        b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
        let path = dir.join(RELATIONS_FILE);
        crate::repo::timeline::write_durably(&dir.join("relations.tmp"), &path, &b).map_err(io(&path))?;
        let journal = dir.join(JOURNAL_FILE);
        crate::repo::timeline::write_durably(&dir.join("blocks.log.tmp"), &journal, &[]).map_err(io(&journal))
    }

    /// Loads a branch's state: its manifest, then its journal.
    pub fn open(dir: &Path) -> Result<HistoryFiles, HistoryError> {
        let path = dir.join(RELATIONS_FILE);
        let files = read_manifest(&path)?;
        let by_path = files.iter().enumerate().map(|(i, f)| (f.path.clone(), i as u32)).collect();
        let mut states: Vec<FileState> = files
            .into_iter()
            .map(|file| FileState { limit: file.blocks, file, written: Vec::new(), unlinked: false })
            .collect();
        let journal_path = dir.join(JOURNAL_FILE);
        let bytes = std::fs::read(&journal_path).map_err(io(&journal_path))?;
        let whole = bytes.len() / RECORD_LEN * RECORD_LEN;
        let mut valid = 0;
        for rec in bytes[..whole].chunks_exact(RECORD_LEN) {
            if crc32c::crc32c(&rec[..9]).to_le_bytes() != rec[9..13] {
                break;
            }
            let (kind, index) = (rec[0], u32::from_le_bytes(rec[1..5].try_into().expect("4 bytes")));
            let block = u32::from_le_bytes(rec[5..9].try_into().expect("4 bytes"));
            let corrupt = |why: String| HistoryError::Corrupt { path: journal_path.clone(), why };
            let s = states
                .get_mut(index as usize)
                .ok_or_else(|| corrupt(format!("record {} names file {index} of {}", valid, by_path_len(&by_path))))?;
            match kind {
                WRITTEN => s.set_written(block),
                TRUNCATED => s.limit = s.limit.min(block),
                UNLINKED => s.unlinked = true,
                k => return Err(corrupt(format!("record {valid} has kind {k}"))),
            }
            valid += 1;
        }
        let journal = OpenOptions::new().append(true).mode(0o600).open(&journal_path).map_err(io(&journal_path))?;
        // A torn tail was never acknowledged: cut it so new records follow the valid ones.
        journal.set_len((valid * RECORD_LEN) as u64).map_err(io(&journal_path))?;
        Ok(HistoryFiles { journal_path, journal: Mutex::new(journal), files: Mutex::new(states), by_path })
    }

    /// The history file at `path`, if it has (still) history.
    pub fn lookup(&self, path: &str) -> Option<u32> {
        let i = *self.by_path.get(path)?;
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        (!files[i as usize].unlinked).then_some(i)
    }

    /// Where block `block` of file `i` is read from.
    pub fn source(&self, i: u32, block: u32) -> Source {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let s = &files[i as usize];
        if s.unlinked || block >= s.limit || s.is_written(block) {
            Source::Overlay
        } else {
            Source::History(BufferTag { rel: s.file.rel, blkno: s.file.first + block })
        }
    }

    /// The file's path (for messages).
    pub fn path(&self, i: u32) -> String {
        self.files.lock().unwrap_or_else(|p| p.into_inner())[i as usize].file.path.clone()
    }

    /// Records that the branch wrote block `block` of file `i` (its data already in the
    /// overlay file). Nothing is recorded for blocks that never came from history.
    pub fn written(&self, i: u32, block: u32) -> Result<(), HistoryError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut files[i as usize];
        if s.unlinked || block >= s.limit || s.is_written(block) {
            return Ok(());
        }
        self.append(WRITTEN, i, block)?;
        s.set_written(block);
        Ok(())
    }

    /// Records a truncation of file `i` to `blocks` blocks (before the overlay file is cut).
    pub fn truncated(&self, i: u32, blocks: u32) -> Result<(), HistoryError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut files[i as usize];
        if s.unlinked || blocks >= s.limit {
            return Ok(());
        }
        self.append(TRUNCATED, i, blocks)?;
        s.limit = blocks;
        Ok(())
    }

    /// Records that file `i` was unlinked: its history ends.
    pub fn unlinked(&self, i: u32) -> Result<(), HistoryError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files[i as usize].unlinked {
            return Ok(());
        }
        self.append(UNLINKED, i, 0)?;
        files[i as usize].unlinked = true;
        Ok(())
    }

    fn append(&self, kind: u8, i: u32, block: u32) -> Result<(), HistoryError> {
        let mut rec = [0u8; RECORD_LEN];
        rec[0] = kind;
        rec[1..5].copy_from_slice(&i.to_le_bytes());
        rec[5..9].copy_from_slice(&block.to_le_bytes());
        let crc = crc32c::crc32c(&rec[..9]);
        rec[9..13].copy_from_slice(&crc.to_le_bytes());
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.write_all(&rec).map_err(io(&self.journal_path))
    }

    /// Makes the journal durable (a file's fsync makes what it depends on durable too).
    pub fn sync(&self) -> Result<(), HistoryError> {
        let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.sync_data().map_err(io(&self.journal_path))
    }

    /// How many relation files the branch had from history, and how many blocks it wrote.
    pub fn counts(&self) -> (usize, u64) {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        (files.len(), files.iter().flat_map(|f| &f.written).map(|w| u64::from(w.count_ones())).sum())
    }
}

fn by_path_len(m: &HashMap<String, u32>) -> usize {
    m.len()
}

fn read_manifest(path: &Path) -> Result<Vec<RelationSegment>, HistoryError> {
    let b = std::fs::read(path).map_err(io(path))?;
    let corrupt = |why: &str| HistoryError::Corrupt { path: path.to_path_buf(), why: why.to_string() };
    if b.len() < 13 || &b[..4] != MAGIC {
        return Err(corrupt("not a branch's relation list"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(corrupt("CRC mismatch"));
    }
    if body[4] != VERSION {
        return Err(corrupt(&format!("version {} (this sidecar reads {VERSION})", body[4])));
    }
    let count = u32::from_le_bytes(body[5..9].try_into().expect("4 bytes")) as usize;
    let mut at = 9;
    let mut take = |n: usize| -> Result<&[u8], HistoryError> {
        let s = body.get(at..at + n).ok_or_else(|| corrupt("truncated"))?;
        at += n;
        Ok(s)
    };
    let mut files = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
        let path = String::from_utf8(take(len)?.to_vec()).map_err(|_| corrupt("a path is not UTF-8"))?;
        let mut u32s = [0u32; 3];
        for v in &mut u32s {
            *v = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        }
        let fork = ForkNumber::try_from(take(1)?[0]).map_err(|_| corrupt("bad fork number"))?;
        let first = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let blocks = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let node = RelFileNode { spcnode: u32s[0], dbnode: u32s[1], relnode: u32s[2] };
        files.push(RelationSegment { path, rel: RelTag { node, fork }, first, blocks });
    }
    Ok(files)
}

/// Reads `len` bytes at `offset` of an overlay file, zeros past its end.
pub fn read_overlay(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(relnode: u32) -> RelTag {
        RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode }, fork: ForkNumber::Main }
    }

    #[test]
    fn state_survives_reopening_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            RelationSegment { path: "base/5/100".into(), rel: rel(100), first: 0, blocks: 10 },
            RelationSegment { path: "base/5/100.1".into(), rel: rel(100), first: 131072, blocks: 3 },
        ];
        HistoryFiles::create(dir.path(), &files).unwrap();
        let h = HistoryFiles::open(dir.path()).unwrap();
        let f1 = h.lookup("base/5/100.1").unwrap();
        assert_eq!(h.source(f1, 2), Source::History(BufferTag { rel: rel(100), blkno: 131074 }));
        assert_eq!(h.source(f1, 3), Source::Overlay);
        h.written(f1, 2).unwrap();
        h.written(f1, 2).unwrap(); // once only
        let f0 = h.lookup("base/5/100").unwrap();
        h.truncated(f0, 4).unwrap();
        drop(h);
        // A torn record after the valid ones.
        let journal = dir.path().join(JOURNAL_FILE);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 2 * RECORD_LEN as u64);
        OpenOptions::new().append(true).open(&journal).unwrap().write_all(&[1, 0, 0]).unwrap();
        let h = HistoryFiles::open(dir.path()).unwrap();
        assert_eq!(h.source(f1, 2), Source::Overlay);
        assert_eq!(h.source(f1, 1), Source::History(BufferTag { rel: rel(100), blkno: 131073 }));
        assert_eq!(h.source(f0, 4), Source::Overlay);
        assert_eq!(h.source(f0, 3), Source::History(BufferTag { rel: rel(100), blkno: 3 }));
        assert_eq!(h.counts(), (2, 1));
        h.unlinked(f0).unwrap();
        assert_eq!(h.lookup("base/5/100"), None);
        drop(h);
        let h = HistoryFiles::open(dir.path()).unwrap();
        assert_eq!(h.lookup("base/5/100"), None);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 3 * RECORD_LEN as u64);
        // A flipped bit in the manifest is an error, never another file's pages.
        let m = dir.path().join(RELATIONS_FILE);
        let mut b = std::fs::read(&m).unwrap();
        b[12] ^= 1;
        std::fs::write(&m, b).unwrap();
        assert!(matches!(HistoryFiles::open(dir.path()), Err(HistoryError::Corrupt { .. })));
    }
}
