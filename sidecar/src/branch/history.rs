//! Which blocks of a branch's relation files still come from history, and which the branch has
//! written: the copy-on-write state beside the overlay (DESIGN: a branch is an ordinary
//! directory tree plus this).
//!
//! Every relation file of the branch's data directory at its LSN is listed here, and becomes a
//! real (sparse) file in the overlay, of the size it had at the LSN, only when it is first
//! looked up ([`HistoryFiles::materialize`]): making a branch writes no file per relation, so
//! it takes the same time whatever the number of relations, and a server touches few of them.
//! Until then the file system lists it from here. Block `b` of such a file is read from history
//! (rebuilt at the LSN) while `b` is below the file's *history limit* and the branch has not
//! written it; otherwise from the overlay file. A truncation lowers the limit; an unlink ends
//! the file's history, recorded before the overlay file goes (a file created later at the same
//! path is the branch's own).
//!
//! Branches made before files were made on demand (manifest version 1) had every file made at
//! creation: there a file missing from the overlay when the branch is loaded has no history
//! (it was unlinked and the crash came before the record).
//!
//! Writing a history block for the first time is known at once in memory; its `written` record
//! is filed when the file is fsync'd, after the overlay file's own `fdatasync` (and at a clean
//! unmount, after a `syncfs`), so the journal never names a block whose data may not be on disk.
//! What PostgreSQL wrote but has not fsync'd is, after a crash of the sidecar or the machine,
//! the page history had — a lost unsynced write, which its WAL replay repairs, as after any
//! crash (the branch's server must restart when the sidecar does: its mount went away).
//!
//! ```text
//! <branch>/relations   (written once, at creation)
//!   magic "NBRL" | version u8 (2; 1: files made at creation) | count u32 | count × entry |
//!   crc32c u32 (of all before)
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
const VERSION: u8 = 2;
/// The manifest version of branches whose every relation file was made at creation.
const VERSION_ALL_MADE: u8 = 1;
const RECORD_LEN: usize = 13;
const WRITTEN: u8 = 1;
const TRUNCATED: u8 = 2;
const UNLINKED: u8 = 3;

pub const RELATIONS_FILE: &str = "relations";
pub const JOURNAL_FILE: &str = "blocks.log";
const MAKING_DIR: &str = "making";

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
    /// Written or resized since the branch was loaded: its overlay file is not what
    /// [`HistoryFiles::materialize`] would make again, so its directory entry must be durable
    /// before a sync of it is acknowledged.
    changed: bool,
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
    /// First writes not yet in the journal, by file: filed when that file is fsync'd.
    pending: Mutex<HashMap<u32, Vec<u32>>>,
    /// Files made in the overlay on demand whose directory entry is not known durable yet:
    /// synced at the first fsync of one of them that the branch changed.
    fresh: Mutex<std::collections::HashSet<u32>>,
    /// Where a file is made (sized) before it is linked into the overlay: a crash never
    /// leaves one half made there.
    making: PathBuf,
    /// Files are made on demand (manifest version 2), not all at creation.
    on_demand: bool,
    overlay: PathBuf,
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

    /// Loads a branch's state: its manifest, then its journal (and for a version-1 branch, a
    /// file missing from `overlay` has no history any more).
    pub fn open(dir: &Path, overlay: &Path) -> Result<HistoryFiles, HistoryError> {
        let path = dir.join(RELATIONS_FILE);
        let (version, files) = read_manifest(&path)?;
        let by_path = files.iter().enumerate().map(|(i, f)| (f.path.clone(), i as u32)).collect();
        let mut states: Vec<FileState> = files
            .into_iter()
            .map(|file| FileState { limit: file.blocks, file, written: Vec::new(), unlinked: false, changed: false })
            .collect();
        let journal_path = dir.join(JOURNAL_FILE);
        let bytes = std::fs::read(&journal_path).map_err(io(&journal_path))?;
        let records = bytes.len() / RECORD_LEN;
        let mut valid = 0;
        for (n, rec) in bytes.chunks_exact(RECORD_LEN).enumerate() {
            let corrupt = |why: String| HistoryError::Corrupt { path: journal_path.clone(), why };
            if crc32c::crc32c(&rec[..9]).to_le_bytes() != rec[9..13] {
                // Only the last record can be torn (never acknowledged); one before it is damage.
                if n + 1 < records {
                    return Err(corrupt(format!("record {n} of {records} fails its CRC")));
                }
                break;
            }
            let (kind, index) = (rec[0], u32::from_le_bytes(rec[1..5].try_into().expect("4 bytes")));
            let block = u32::from_le_bytes(rec[5..9].try_into().expect("4 bytes"));
            let files = states.len();
            let s = states
                .get_mut(index as usize)
                .ok_or_else(|| corrupt(format!("record {n} names file {index} of {files}")))?;
            match kind {
                WRITTEN => s.set_written(block),
                TRUNCATED => s.limit = s.limit.min(block),
                UNLINKED => s.unlinked = true,
                k => return Err(corrupt(format!("record {valid} has kind {k}"))),
            }
            valid += 1;
        }
        let on_demand = version != VERSION_ALL_MADE;
        if !on_demand {
            for s in states.iter_mut().filter(|s| !s.unlinked) {
                if std::fs::symlink_metadata(overlay.join(&s.file.path)).is_err() {
                    s.unlinked = true;
                }
            }
        }
        let making = dir.join(MAKING_DIR);
        let _ = std::fs::remove_dir_all(&making);
        crate::repo::timeline::private_dir(&making).map_err(io(&making))?;
        let journal = OpenOptions::new().append(true).mode(0o600).open(&journal_path).map_err(io(&journal_path))?;
        // A torn tail was never acknowledged: cut it so new records follow the valid ones.
        journal.set_len((valid * RECORD_LEN) as u64).map_err(io(&journal_path))?;
        let (journal, files, pending) = (Mutex::new(journal), Mutex::new(states), Mutex::new(HashMap::new()));
        Ok(HistoryFiles {
            journal_path,
            journal,
            files,
            by_path,
            pending,
            fresh: Mutex::default(),
            making,
            on_demand,
            overlay: overlay.to_path_buf(),
        })
    }

    /// Makes file `i` in the overlay if it is not there yet: sparse, as long as its history
    /// limit, sized under another name and then linked into place (never seen half made).
    /// False if its history ended (unlinked): then it is not made. Under the state lock, so an
    /// unlink recorded meanwhile is never undone by a lookup that raced it.
    pub fn materialize(&self, i: u32) -> Result<bool, HistoryError> {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let s = &files[i as usize];
        if s.unlinked {
            return Ok(false);
        }
        let path = self.overlay.join(&s.file.path);
        if std::fs::symlink_metadata(&path).is_ok() {
            return Ok(true);
        }
        if s.changed || s.written.iter().any(|w| *w != 0) {
            // The branch wrote it, and it is gone: made again it would read as zeros there.
            let why = "the branch wrote this file and it is missing from the overlay".to_string();
            return Err(HistoryError::Corrupt { path, why });
        }
        let tmp = self.making.join(i.to_string());
        let _ = std::fs::remove_file(&tmp);
        let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        f.set_len(u64::from(s.limit) * neon_types::BLCKSZ as u64).map_err(io(&tmp))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                self.fresh.lock().unwrap_or_else(|p| p.into_inner()).insert(i);
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(true),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// History's pages of the system catalogs (relations below the first normal OID) that a
    /// server's first connection reads, at most `max`: the shared ones first, then each
    /// database's but the templates' (PostgreSQL 15 gives `template1` and `template0` OIDs 1
    /// and 4), newest first; not the catalogs that grow with the data and that a connection
    /// does not read (large objects, statistics, dependencies, descriptions, security labels,
    /// and their indexes and TOAST).
    pub fn catalog_pages(&self, max: usize) -> Vec<BufferTag> {
        const FIRST_NORMAL_OID: u32 = 16384;
        const TEMPLATES: [u32; 2] = [1, 4];
        const BULKY: [u32; 24] = [
            2613, 2683, 2995, 2996, // pg_largeobject, its metadata
            2619, 2696, 2840, 2841, // pg_statistic
            3429, 3433, 3430, 3431, // pg_statistic_ext_data
            2608, 2673, 2674, // pg_depend
            1214, 1232, 1233, // pg_shdepend
            2609, 2675, 2834, 2835, // pg_description
            3596, 3597, // pg_seclabel
        ];
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let mut catalogs: Vec<&FileState> = files
            .iter()
            .filter(|f| {
                let node = f.file.rel.node;
                !f.unlinked
                    && node.relnode < FIRST_NORMAL_OID
                    && f.file.rel.fork == ForkNumber::Main
                    && !TEMPLATES.contains(&node.dbnode)
                    && !BULKY.contains(&node.relnode)
            })
            .collect();
        catalogs.sort_by_key(|f| (f.file.rel.node.dbnode != 0, std::cmp::Reverse(f.file.rel.node.dbnode)));
        catalogs
            .iter()
            .flat_map(|f| (0..f.limit).map(|b| BufferTag { rel: f.file.rel, blkno: f.file.first + b }))
            .take(max)
            .collect()
    }

    /// Whether files are made on demand ([`materialize`]), not all at creation.
    ///
    /// [`materialize`]: HistoryFiles::materialize
    pub fn on_demand(&self) -> bool {
        self.on_demand
    }

    /// The names of the files with history directly in directory `dir` (a relative path),
    /// made in the overlay or not.
    pub fn names_in(&self, dir: &Path) -> Vec<String> {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files
            .iter()
            .filter(|f| !f.unlinked)
            .filter_map(|f| {
                let p = Path::new(&f.file.path);
                (p.parent() == Some(dir)).then(|| p.file_name()?.to_str().map(str::to_string)).flatten()
            })
            .collect()
    }

    /// Whether a file below directory `dir` (a relative path) has history.
    pub fn has_under(&self, dir: &str) -> bool {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        files.iter().any(|f| !f.unlinked && Path::new(&f.file.path).starts_with(dir))
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

    /// Notes that the branch wrote block `block` of file `i` (its data already in the overlay
    /// file): read from the overlay from now on, journalled at the file's next [`sync`]. Nothing
    /// is noted for blocks that never came from history.
    ///
    /// [`sync`]: HistoryFiles::sync
    pub fn written(&self, i: u32, block: u32) {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut files[i as usize];
        s.changed = true;
        if s.unlinked || block >= s.limit || s.is_written(block) {
            return;
        }
        s.set_written(block);
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(i).or_default().push(block);
    }

    /// Records a truncation of file `i` to `blocks` blocks (before the overlay file is cut).
    pub fn truncated(&self, i: u32, blocks: u32) -> Result<(), HistoryError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut files[i as usize];
        s.changed = true;
        if s.unlinked || blocks >= s.limit {
            return Ok(());
        }
        self.append(TRUNCATED, i, blocks)?;
        s.limit = blocks;
        Ok(())
    }

    /// Records that file `i` was unlinked, durably (before its overlay file goes: a file
    /// missing from the overlay is history's again): its history ends.
    pub fn unlinked(&self, i: u32) -> Result<(), HistoryError> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files[i as usize].unlinked {
            return Ok(());
        }
        self.append(UNLINKED, i, 0)?;
        self.journal.lock().unwrap_or_else(|p| p.into_inner()).sync_data().map_err(io(&self.journal_path))?;
        files[i as usize].unlinked = true;
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&i);
        Ok(())
    }

    fn append(&self, kind: u8, i: u32, block: u32) -> Result<(), HistoryError> {
        self.append_all(kind, i, &[block])
    }

    fn append_all(&self, kind: u8, i: u32, blocks: &[u32]) -> Result<(), HistoryError> {
        let mut recs = Vec::with_capacity(blocks.len() * RECORD_LEN);
        for block in blocks {
            let at = recs.len();
            recs.push(kind);
            recs.extend_from_slice(&i.to_le_bytes());
            recs.extend_from_slice(&block.to_le_bytes());
            let crc = crc32c::crc32c(&recs[at..]);
            recs.extend_from_slice(&crc.to_le_bytes());
        }
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.write_all(&recs).map_err(io(&self.journal_path))
    }

    /// Makes file `i`'s writes durable: its overlay file's data (`data`), then the journal
    /// records of its first writes, then the journal.
    pub fn sync(&self, i: u32, data: &File) -> Result<(), HistoryError> {
        // A file made on demand that the branch changed: its directory entry first, or the
        // synced data may have no name after a crash. (One it did not change would be made
        // again the same.) Every file made in that directory is durable with it.
        let fresh_dir = {
            // (Locks in materialize's order: the files, then the fresh ones.)
            let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            let dir_of = |f: u32| Path::new(&files[f as usize].file.path).parent().map(Path::to_path_buf);
            (fresh.contains(&i) && files[i as usize].changed).then(|| {
                let dir = dir_of(i);
                (fresh.iter().copied().filter(|f| dir_of(*f) == dir).collect::<Vec<u32>>(), dir)
            })
        };
        if let Some((made, dir)) = fresh_dir {
            let dir = self.overlay.join(dir.unwrap_or_default());
            crate::branch::sync_dir(&dir).map_err(io(&dir))?;
            let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
            for f in made {
                fresh.remove(&f);
            }
        }
        // The blocks first, then the data: a first write landing in between (another FUSE
        // thread, the kernel's writeback) stays pending for the next sync, never journalled
        // ahead of its data.
        let blocks = self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&i).unwrap_or_default();
        if let Err(e) = data.sync_data() {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(i).or_default().extend(blocks);
            return Err(io(&self.journal_path)(e));
        }
        if let Err(e) = self.append_all(WRITTEN, i, &blocks) {
            self.pending.lock().unwrap_or_else(|p| p.into_inner()).entry(i).or_default().extend(blocks);
            return Err(e);
        }
        let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.sync_data().map_err(io(&self.journal_path))
    }

    /// Journals every first write (a clean unmount): `overlay`'s file system synced first.
    pub fn sync_all(&self, overlay: &Path) -> Result<(), HistoryError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let fresh = std::mem::take(&mut *self.fresh.lock().unwrap_or_else(|p| p.into_inner()));
        if let Err(e) = crate::branch::sync_fs(overlay) {
            let mut back = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for (i, blocks) in pending {
                back.entry(i).or_default().extend(blocks);
            }
            self.fresh.lock().unwrap_or_else(|p| p.into_inner()).extend(fresh);
            return Err(io(overlay)(e));
        }
        for (i, blocks) in pending {
            self.append_all(WRITTEN, i, &blocks)?;
        }
        let journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        journal.sync_data().map_err(io(&self.journal_path))
    }

    /// How many relation files the branch had from history, and how many blocks it wrote.
    pub fn counts(&self) -> (usize, u64) {
        let files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        (files.len(), files.iter().flat_map(|f| &f.written).map(|w| u64::from(w.count_ones())).sum())
    }
}

/// The manifest's version and files.
fn read_manifest(path: &Path) -> Result<(u8, Vec<RelationSegment>), HistoryError> {
    let b = std::fs::read(path).map_err(io(path))?;
    let corrupt = |why: &str| HistoryError::Corrupt { path: path.to_path_buf(), why: why.to_string() };
    if b.len() < 13 || &b[..4] != MAGIC {
        return Err(corrupt("not a branch's relation list"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err(corrupt("CRC mismatch"));
    }
    if body[4] != VERSION && body[4] != VERSION_ALL_MADE {
        return Err(corrupt(&format!("version {} (this sidecar reads {VERSION_ALL_MADE} and {VERSION})", body[4])));
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
    Ok((body[4], files))
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

    /// A manifest rewritten as version 1 (every file made at creation), its CRC fixed.
    fn as_version_1(dir: &Path) {
        let m = dir.join(RELATIONS_FILE);
        let mut b = std::fs::read(&m).unwrap();
        b[4] = VERSION_ALL_MADE;
        let body = b.len() - 4;
        let crc = crc32c::crc32c(&b[..body]);
        b[body..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&m, b).unwrap();
    }

    #[test]
    fn files_are_made_on_demand_once_and_never_after_their_unlink() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("overlay");
        std::fs::create_dir_all(overlay.join("base/5")).unwrap();
        let files = vec![
            RelationSegment { path: "base/5/100".into(), rel: rel(100), first: 0, blocks: 10 },
            RelationSegment { path: "base/5/200".into(), rel: rel(200), first: 0, blocks: 2 },
            RelationSegment { path: "global/300".into(), rel: rel(300), first: 0, blocks: 1 },
        ];
        HistoryFiles::create(dir.path(), &files).unwrap();
        let h = HistoryFiles::open(dir.path(), &overlay).unwrap();
        assert!(h.on_demand());
        let mut names = h.names_in(Path::new("base/5"));
        names.sort();
        assert_eq!(names, ["100", "200"]);
        // Not in the overlay yet, and still history's.
        let f1 = h.lookup("base/5/200").unwrap();
        assert!(!overlay.join("base/5/200").exists());
        assert!(h.materialize(f1).unwrap());
        let made = overlay.join("base/5/200");
        assert_eq!(std::fs::metadata(&made).unwrap().len(), 2 * neon_types::BLCKSZ as u64);
        // Made once: the branch's writes in it are not cut by a second lookup.
        std::fs::write(&made, [7u8; 3]).unwrap();
        assert!(h.materialize(f1).unwrap());
        assert_eq!(std::fs::metadata(&made).unwrap().len(), 3);
        assert!(std::fs::read_dir(dir.path().join(MAKING_DIR)).unwrap().next().is_none(), "a temporary file left");
        // A sync of a made file the branch did not change needs no durable name (it would be
        // made again the same); of a changed one, it syncs the directory of both.
        let f0 = h.lookup("base/5/100").unwrap();
        assert!(h.materialize(f0).unwrap());
        h.sync(f0, &File::open(overlay.join("base/5/100")).unwrap()).unwrap();
        assert_eq!(h.fresh.lock().unwrap().len(), 2);
        h.written(f1, 0);
        h.sync(f1, &File::open(&made).unwrap()).unwrap();
        assert!(h.fresh.lock().unwrap().is_empty());
        // Written, then lost from the overlay (not unlinked): an error, never zeros made anew.
        std::fs::remove_file(&made).unwrap();
        assert!(matches!(h.materialize(f1), Err(HistoryError::Corrupt { .. })));
        std::fs::write(&made, [7u8; 3]).unwrap();
        // Unlinked: never made again, not listed, and so after reopening.
        h.unlinked(f1).unwrap();
        std::fs::remove_file(&made).unwrap();
        assert!(!h.materialize(f1).unwrap() && !made.exists());
        assert_eq!(h.names_in(Path::new("base/5")), ["100"]);
        drop(h);
        let h = HistoryFiles::open(dir.path(), &overlay).unwrap();
        assert_eq!(h.lookup("base/5/200"), None);
        assert!(h.lookup("base/5/100").is_some() && h.lookup("global/300").is_some());
        // A version-1 branch: a file missing from the overlay has no history.
        drop(h);
        as_version_1(dir.path());
        let h = HistoryFiles::open(dir.path(), &overlay).unwrap();
        assert!(!h.on_demand());
        assert_eq!(h.lookup("global/300"), None);
        assert!(h.lookup("base/5/100").is_some());
    }

    #[test]
    fn state_survives_reopening_a_torn_tail_and_a_lost_file() {
        let dir = tempfile::tempdir().unwrap();
        let overlay = dir.path().join("overlay");
        std::fs::create_dir_all(overlay.join("base/5")).unwrap();
        let files = vec![
            RelationSegment { path: "base/5/100".into(), rel: rel(100), first: 0, blocks: 10 },
            RelationSegment { path: "base/5/100.1".into(), rel: rel(100), first: 131072, blocks: 3 },
            RelationSegment { path: "base/5/200".into(), rel: rel(200), first: 0, blocks: 1 },
        ];
        for f in &files[..2] {
            std::fs::write(overlay.join(&f.path), b"").unwrap();
        }
        HistoryFiles::create(dir.path(), &files).unwrap();
        as_version_1(dir.path());
        let h = HistoryFiles::open(dir.path(), &overlay).unwrap();
        // Version 1, missing from the overlay: no history (an unlink the crash came before
        // recording).
        assert_eq!(h.lookup("base/5/200"), None);
        let f1 = h.lookup("base/5/100.1").unwrap();
        assert_eq!(h.source(f1, 2), Source::History(BufferTag { rel: rel(100), blkno: 131074 }));
        assert_eq!(h.source(f1, 3), Source::Overlay);
        h.written(f1, 2);
        h.written(f1, 2); // once only
        assert_eq!(h.source(f1, 2), Source::Overlay);
        let f0 = h.lookup("base/5/100").unwrap();
        h.truncated(f0, 4).unwrap();
        h.written(f0, 1); // never fsync'd: lost with the sidecar
        let data = File::open(overlay.join("base/5/100.1")).unwrap();
        h.sync(f1, &data).unwrap();
        drop(h);
        let journal = dir.path().join(JOURNAL_FILE);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 2 * RECORD_LEN as u64);
        // A torn record after the valid ones.
        OpenOptions::new().append(true).open(&journal).unwrap().write_all(&[1, 0, 0]).unwrap();
        let h = HistoryFiles::open(dir.path(), &overlay).unwrap();
        assert_eq!(h.source(f1, 2), Source::Overlay);
        assert_eq!(h.source(f1, 1), Source::History(BufferTag { rel: rel(100), blkno: 131073 }));
        assert_eq!(h.source(f0, 4), Source::Overlay);
        assert_eq!(h.source(f0, 1), Source::History(BufferTag { rel: rel(100), blkno: 1 }));
        assert_eq!(h.counts(), (3, 1));
        assert!(h.has_under("base/5") && !h.has_under("base/6"));
        h.unlinked(f0).unwrap();
        assert_eq!(h.lookup("base/5/100"), None);
        drop(h);
        let h = HistoryFiles::open(dir.path(), &overlay).unwrap();
        assert_eq!(h.lookup("base/5/100"), None);
        drop(h);
        assert_eq!(std::fs::metadata(&journal).unwrap().len(), 3 * RECORD_LEN as u64);
        // Damage before the last record is an error, not a shorter history.
        let mut b = std::fs::read(&journal).unwrap();
        b[3] ^= 1;
        std::fs::write(&journal, &b).unwrap();
        assert!(matches!(HistoryFiles::open(dir.path(), &overlay), Err(HistoryError::Corrupt { .. })));
        // A flipped bit in the manifest is an error, never another file's pages.
        let m = dir.path().join(RELATIONS_FILE);
        let mut b = std::fs::read(&m).unwrap();
        b[12] ^= 1;
        std::fs::write(&m, b).unwrap();
        assert!(matches!(HistoryFiles::open(dir.path(), &overlay), Err(HistoryError::Corrupt { .. })));
    }
}
