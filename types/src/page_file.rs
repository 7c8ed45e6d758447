//! The shared page file: pages the sidecar has rebuilt, laid out so that backends read them
//! straight from memory instead of asking over the socket. A prefetched or recently served
//! page then costs a backend a hash, eight slot probes and an 8 KB copy — no round trip.
//!
//! The sidecar (`run --shared-dir D`) creates `D/pages` (mode 0600 in the private shared
//! directory) and is its only writer; its page cache *is* this file. Backends map it
//! read-only. Without a shared directory the sidecar keeps the same layout in anonymous
//! memory, so there is one cache either way.
//!
//! ## Layout (native endianness; the file never leaves the machine)
//!
//! ```text
//! 0      header, HEADER_LEN bytes
//!        0  magic "NEONPGF1"   8  version u32   12  sets u32   16  ways u32
//!        20 retired u32 (atomic): 1 once the sidecar stopped using this file
//!        24 oldest_lsn u64 (atomic): pages at LSNs before it are out of retained history
//! 4096   slot headers, sets × ways × SLOT_HEADER_LEN bytes; slot s of set k is k × ways + s
//!        0  seq u64 (atomic): 0 never written, odd while being written, even when stable
//!        8  spcnode, dbnode, relnode, fork, blkno  u32 each (atomic)
//!        32 lsn u64 (atomic)   40  crc u32 (atomic): CRC32C of the key (KEY_LEN bytes) and page
//! P      pages, 8192 bytes per slot, P = the slot headers' end rounded up to 8192
//! ```
//!
//! A key's set is a fixed hash of (page, LSN) mod `sets`; within a set the writer reuses an
//! empty slot or the slot holding the same key, else the next in round-robin order.
//!
//! **Concurrency.** Each slot is a seqlock: the writer makes `seq` odd, writes, makes it even;
//! a reader copies the key and page between two reads of `seq` and keeps the copy only if
//! both are the same even number — and its CRC matches, so even a torn read is a miss, never a
//! wrong page. Writers are serialised by the sidecar.
//!
//! **Liveness.** The sidecar holds an exclusive open-file-description lock on the file's first
//! byte for as long as it runs; the kernel drops it the moment the process ends, however it
//! ends. Readers serve nothing from a file whose lock nobody holds (a stopped or killed
//! sidecar: calls then fail as the socket says) or that is marked retired (a restarted sidecar
//! made a new file: readers map the new one).

use crate::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// The file's name in the shared directory.
pub const FILE_NAME: &str = "pages";
const MAGIC: u64 = u64::from_le_bytes(*b"NEONPGF1");
const VERSION: u32 = 1;
/// Slots per set: how many places a page may be in, and how many a reader probes.
pub const WAYS: usize = 8;
const HEADER_LEN: usize = 4096;
const SLOT_HEADER_LEN: usize = 64;
/// Bytes of a key as the CRC covers it: five u32 and the LSN.
const KEY_LEN: usize = 28;

/// A page as of an LSN: what the file is keyed by.
pub type PageKey = (BufferTag, Lsn);

#[derive(Debug, thiserror::Error)]
pub enum PageFileError {
    #[error("shared page file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("shared page file {path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error(
        "shared page file {path} is in use by another running sidecar; two sidecars cannot share a shared directory"
    )]
    InUse { path: PathBuf },
}

/// A mapped page file (either side).
struct Mapped {
    /// The mapping (a file's or anonymous), kept only to be unmapped on drop.
    _map: Box<dyn std::any::Any>,
    base: *mut u8,
    len: usize,
    sets: usize,
}

// SAFETY: the mapping is shared memory accessed only through atomics and seqlock-checked
// copies; the pointer stays valid for the life of `_map`.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

fn pages_offset(slots: usize) -> usize {
    (HEADER_LEN + slots * SLOT_HEADER_LEN).div_ceil(BLCKSZ) * BLCKSZ
}

fn file_len(sets: usize) -> usize {
    let slots = sets * WAYS;
    pages_offset(slots) + slots * BLCKSZ
}

fn key_words(key: &PageKey) -> [u32; 5] {
    let (tag, _) = key;
    let n = &tag.rel.node;
    [n.spcnode, n.dbnode, n.relnode, tag.rel.fork as u32, tag.blkno]
}

fn key_bytes(key: &PageKey) -> [u8; KEY_LEN] {
    let mut b = [0u8; KEY_LEN];
    for (i, w) in key_words(key).iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    b[20..28].copy_from_slice(&key.1 .0.to_le_bytes());
    b
}

fn crc_of(key: &PageKey, page: &[u8; BLCKSZ]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&key_bytes(key)), page)
}

/// The set `key` lives in: a fixed mix of its words (the same in every process, unlike
/// `std`'s randomly seeded hashers).
fn set_of(key: &PageKey, sets: usize) -> usize {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for w in key_words(key).into_iter().map(u64::from).chain([key.1 .0]) {
        h = (h ^ w).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 31;
    }
    (h % sets as u64) as usize
}

impl Mapped {
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= self.len);
        // SAFETY: in bounds and aligned (the mapping is page-aligned, offsets are multiples of
        // 4); shared memory is only ever accessed atomically at these offsets.
        unsafe { AtomicU32::from_ptr(self.base.add(off).cast()) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.len);
        // SAFETY: as in `u32_at`, 8-aligned.
        unsafe { AtomicU64::from_ptr(self.base.add(off).cast()) }
    }

    fn slot_header(&self, slot: usize) -> usize {
        HEADER_LEN + slot * SLOT_HEADER_LEN
    }

    fn page_ptr(&self, slot: usize) -> *mut u8 {
        let off = pages_offset(self.sets * WAYS) + slot * BLCKSZ;
        debug_assert!(off + BLCKSZ <= self.len);
        // SAFETY: in bounds of the mapping (the length was checked against the header).
        unsafe { self.base.add(off) }
    }

    fn retired(&self) -> bool {
        self.u32_at(20).load(Ordering::Acquire) != 0
    }

    fn oldest_lsn(&self) -> Lsn {
        Lsn(self.u64_at(24).load(Ordering::Acquire))
    }

    /// The key in `slot` now (racy: for choosing a victim, under the writer's lock).
    fn key_in(&self, slot: usize) -> Option<PageKey> {
        let h = self.slot_header(slot);
        // Never written, or emptied by `clear` (LSN 0, which no reader asks for).
        if self.u64_at(h).load(Ordering::Acquire) == 0 || self.u64_at(h + 32).load(Ordering::Relaxed) == 0 {
            return None;
        }
        let w = |i: usize| self.u32_at(h + 8 + 4 * i).load(Ordering::Relaxed);
        let fork = ForkNumber::try_from(w(3) as u8).ok()?;
        let rel = RelTag { node: RelFileNode { spcnode: w(0), dbnode: w(1), relnode: w(2) }, fork };
        Some((BufferTag { rel, blkno: w(4) }, Lsn(self.u64_at(h + 32).load(Ordering::Relaxed))))
    }

    /// Copies the page stored under `key` into `out`; false if it is not there (or was being
    /// rewritten while copied).
    fn get(&self, key: &PageKey, out: &mut [u8; BLCKSZ]) -> bool {
        if !key.1.is_valid() || key.1 < self.oldest_lsn() {
            return false;
        }
        let words = key_words(key);
        let first = set_of(key, self.sets) * WAYS;
        for slot in first..first + WAYS {
            let h = self.slot_header(slot);
            let seq = self.u64_at(h);
            let s1 = seq.load(Ordering::Acquire);
            if s1 == 0 || s1 & 1 == 1 {
                continue;
            }
            let same = (0..5).all(|i| self.u32_at(h + 8 + 4 * i).load(Ordering::Relaxed) == words[i])
                && self.u64_at(h + 32).load(Ordering::Relaxed) == key.1 .0;
            if !same {
                continue;
            }
            // SAFETY: the source is BLCKSZ bytes inside the mapping, the destination is ours.
            // The writer may be rewriting the source meanwhile (another process, so outside
            // Rust's view of this one): the seq re-read and the CRC below reject such a copy.
            unsafe { std::ptr::copy_nonoverlapping(self.page_ptr(slot), out.as_mut_ptr(), BLCKSZ) };
            let crc = self.u32_at(h + 40).load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) != s1 {
                return false;
            }
            return crc == crc_of(key, out);
        }
        false
    }
}

/// The sidecar's side: creates the file, stores pages, keeps the liveness lock.
pub struct PageFileWriter {
    map: Mapped,
    /// The file (holding the lock) and its path; `None` for an anonymous cache.
    file: Option<(File, PathBuf)>,
    /// Where the data is when the file in the shared directory links to memory.
    memory: Option<PathBuf>,
    /// Stores one at a time (a slot's seqlock has one writer).
    state: std::sync::Mutex<WriterState>,
}

struct WriterState {
    /// Per set, the way to replace next when the set is full.
    next: Vec<u8>,
    filled: usize,
}

impl PageFileWriter {
    /// A cache of about `pages` pages in `<dir>/pages`, replacing (and marking retired) the
    /// file of an earlier sidecar. Fails if a running sidecar still holds that file.
    ///
    /// With `memory_dir` (a tmpfs such as `/dev/shm`), `<dir>/pages` is a symbolic link to the
    /// data there: a file on disk would be written back, and every write to a page of it
    /// after that costs a fault in the filesystem (~10 µs a slot here). A sidecar that does
    /// not stop cleanly leaves its data there until the next one starts.
    pub fn create(dir: &Path, pages: usize, memory_dir: Option<&Path>) -> Result<PageFileWriter, PageFileError> {
        let path = dir.join(FILE_NAME);
        let io = |source| PageFileError::Io { path: path.clone(), source };
        if let Ok(old) = PageFileReader::open_path(&path) {
            if old.owner_alive() {
                return Err(PageFileError::InUse { path });
            }
            // Backends still mapping it move to the new file at their next call.
            let rw = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
            // SAFETY: maps a file this user owns; accessed through atomics only.
            let raw = memmap2::MmapRaw::map_raw(&rw).map_err(io)?;
            // SAFETY: offset 20 of a mapping at least HEADER_LEN long (the reader checked).
            unsafe { AtomicU32::from_ptr(raw.as_mut_ptr().add(20).cast()) }.store(1, Ordering::Release);
        }
        if let Ok(old_data) = std::fs::read_link(&path) {
            // The memory of an earlier sidecar's file: freed once the last reader unmaps it.
            let _ = std::fs::remove_file(old_data);
        }
        let sets = pages.div_ceil(WAYS).max(1);
        let len = file_len(sets);
        let tmp = dir.join(format!("{FILE_NAME}.tmp"));
        let tmp_io = |source| PageFileError::Io { path: tmp.clone(), source };
        let _ = std::fs::remove_file(&tmp);
        // In memory if there is room for all of it (a tmpfs that fills up would make a store
        // fault with SIGBUS), else beside the link.
        let in_memory = memory_dir.and_then(|m| match create_in_memory(m, len, &tmp) {
            Ok(made) => Some(made),
            Err(e) => {
                eprintln!("neon-sidecar: shared page file on disk, not in {}: {e}", m.display());
                None
            }
        });
        let (file, data) = match in_memory {
            Some(made) => made,
            None => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .and_then(|f| f.set_len(len as u64).map(|()| f))
                    .map_err(tmp_io)?;
                (file, tmp.clone())
            }
        };
        let data_io = |source| PageFileError::Io { path: data.clone(), source };
        // SAFETY: maps the file just created; only this writer and read-only readers map it.
        let raw = memmap2::MmapRaw::map_raw(&file).map_err(data_io)?;
        let base = raw.as_mut_ptr();
        // Fault every page in now, once, rather than at each slot's first store while a
        // reader waits. Advice only; kernels before 5.14 do without.
        // SAFETY: the range is exactly the mapping.
        unsafe { libc::madvise(base.cast(), len, libc::MADV_POPULATE_WRITE) };
        let map = Mapped { _map: Box::new(raw), base, len, sets };
        map.init_header(sets);
        lock_owner(&file).map_err(data_io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        let memory = (data != tmp).then_some(data);
        Ok(PageFileWriter {
            map,
            file: Some((file, path)),
            memory,
            state: std::sync::Mutex::new(WriterState::new(sets)),
        })
    }

    /// The same cache in private memory (a sidecar without a shared directory).
    pub fn anonymous(pages: usize) -> io::Result<PageFileWriter> {
        let sets = pages.div_ceil(WAYS).max(1);
        let len = file_len(sets);
        let mut anon = memmap2::MmapMut::map_anon(len)?;
        let base = anon.as_mut_ptr();
        let map = Mapped { _map: Box::new(anon), base, len, sets };
        map.init_header(sets);
        Ok(PageFileWriter { map, file: None, memory: None, state: std::sync::Mutex::new(WriterState::new(sets)) })
    }

    /// Where the file is (`None`: anonymous).
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(_, p)| p.as_path())
    }

    pub fn capacity(&self) -> usize {
        self.map.sets * WAYS
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Slots holding a page.
    pub fn len(&self) -> usize {
        self.lock().filled
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the page stored under `key` into `out`, if it is there.
    pub fn get(&self, key: &PageKey, out: &mut [u8; BLCKSZ]) -> bool {
        self.map.get(key, out)
    }

    /// Whether a page is stored under `key` (without copying it).
    pub fn contains(&self, key: &PageKey) -> bool {
        let first = set_of(key, self.map.sets) * WAYS;
        key.1 >= self.map.oldest_lsn() && (first..first + WAYS).any(|s| self.map.key_in(s).as_ref() == Some(key))
    }

    /// Stores `page` under `key`; returns the key it replaced, if any.
    pub fn store(&self, key: &PageKey, page: &[u8; BLCKSZ]) -> Option<PageKey> {
        let mut state = self.lock();
        let set = set_of(key, self.map.sets);
        let first = set * WAYS;
        let keys: Vec<Option<PageKey>> = (first..first + WAYS).map(|s| self.map.key_in(s)).collect();
        let way = keys
            .iter()
            .position(|k| k.as_ref() == Some(key))
            .or_else(|| keys.iter().position(Option::is_none))
            .unwrap_or_else(|| {
                let w = state.next[set] as usize % WAYS;
                state.next[set] = ((w + 1) % WAYS) as u8;
                w
            });
        let slot = first + way;
        let replaced = keys[way].filter(|k| k != key);
        if keys[way].is_none() {
            state.filled += 1;
        }
        let h = self.map.slot_header(slot);
        let seq = self.map.u64_at(h);
        let s = seq.load(Ordering::Relaxed);
        seq.store(s + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        for (i, w) in key_words(key).into_iter().enumerate() {
            self.map.u32_at(h + 8 + 4 * i).store(w, Ordering::Relaxed);
        }
        self.map.u64_at(h + 32).store(key.1 .0, Ordering::Relaxed);
        // SAFETY: BLCKSZ bytes inside the mapping; readers copying concurrently see an odd or
        // changed seq, or a CRC mismatch, and ignore what they copied.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), self.map.page_ptr(slot), BLCKSZ) };
        self.map.u32_at(h + 40).store(crc_of(key, page), Ordering::Relaxed);
        seq.store(s + 2, Ordering::Release);
        replaced
    }

    /// Forgets every page: the history they were read from is no longer the one readers ask
    /// about (the sidecar follows another timeline now). Each slot is emptied under its seqlock
    /// (its LSN set to 0, which no reader asks for), so a reader copying it meanwhile rejects
    /// the copy. History then begins at `oldest`, which may be earlier than before (another
    /// lineage's start).
    pub fn clear(&self, oldest: Lsn) {
        let mut state = self.lock();
        for slot in 0..self.map.sets * WAYS {
            let h = self.map.slot_header(slot);
            let seq = self.map.u64_at(h);
            let s = seq.load(Ordering::Relaxed);
            if s == 0 {
                continue;
            }
            seq.store(s + 1, Ordering::Relaxed);
            fence(Ordering::Release);
            self.map.u64_at(h + 32).store(0, Ordering::Relaxed);
            self.map.u32_at(h + 40).store(0, Ordering::Relaxed);
            seq.store(s + 2, Ordering::Release);
        }
        state.filled = 0;
        self.map.u64_at(24).store(oldest.0, Ordering::Release);
    }

    /// Stops serving: readers use the file no longer, and memory-backed data is unlinked (its
    /// memory freed once they have unmapped it). The lock goes with the file descriptor.
    pub fn retire(&self) {
        self.map.u32_at(20).store(1, Ordering::Release);
        if let (Some(data), Some((_, link))) = (&self.memory, &self.file) {
            // The link too, while it is still ours: a dangling link names a file anyone
            // could create in the shared memory directory.
            if std::fs::read_link(link).is_ok_and(|to| to == *data) {
                let _ = std::fs::remove_file(link);
            }
            let _ = std::fs::remove_file(data);
        }
    }

    /// Pages at LSNs before `lsn` are no longer served from the file (history was trimmed).
    pub fn set_oldest_lsn(&self, lsn: Lsn) {
        self.map.u64_at(24).fetch_max(lsn.0, Ordering::AcqRel);
    }
}

impl WriterState {
    fn new(sets: usize) -> WriterState {
        WriterState { next: vec![0; sets], filled: 0 }
    }
}

impl Drop for PageFileWriter {
    fn drop(&mut self) {
        self.retire();
    }
}

impl Mapped {
    fn init_header(&self, sets: usize) {
        let base = self.base;
        // SAFETY: the first 20 bytes of a fresh mapping nobody else reads yet (the file is
        // still under its temporary name, or anonymous).
        unsafe {
            base.cast::<u64>().write(MAGIC);
            base.add(8).cast::<u32>().write(VERSION);
            base.add(12).cast::<u32>().write(sets as u32);
            base.add(16).cast::<u32>().write(WAYS as u32);
        }
    }
}

/// The data file in `memory_dir` (created new, all of `len` allocated) and a link to it at
/// `link`.
fn create_in_memory(memory_dir: &Path, len: usize, link: &Path) -> io::Result<(File, PathBuf)> {
    // Absolute, or the link (resolved from its own directory) would point elsewhere.
    let dir = std::fs::canonicalize(memory_dir)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let data = dir.join(format!("neon-pages-{}-{}", std::process::id(), nanos.as_nanos()));
    // create_new: never through a link someone else put there.
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&data)?;
    // SAFETY: a valid descriptor; allocates the whole length or fails (ENOSPC).
    let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    let linked = if r != 0 { Err(io::Error::from_raw_os_error(r)) } else { std::os::unix::fs::symlink(&data, link) };
    if let Err(e) = linked {
        let _ = std::fs::remove_file(&data);
        return Err(e);
    }
    Ok((file, data))
}

/// A backend's side: the file mapped read-only.
pub struct PageFileReader {
    map: Mapped,
    file: File,
}

impl PageFileReader {
    /// Maps `<dir>/pages`; `Ok(None)` if there is none (no sidecar has run with this directory).
    pub fn open(dir: &Path) -> Result<Option<PageFileReader>, PageFileError> {
        match Self::open_path(&dir.join(FILE_NAME)) {
            Ok(r) => Ok(Some(r)),
            Err(PageFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn open_path(path: &Path) -> Result<PageFileReader, PageFileError> {
        let io = |source| PageFileError::Io { path: path.to_path_buf(), source };
        let invalid = |why: String| PageFileError::Invalid { path: path.to_path_buf(), why };
        // Non-blocking: a FIFO planted where the data should be must not hang the open.
        let file = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        // Memory-backed data is in a directory anyone can write to: only our own user's.
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if std::os::unix::fs::MetadataExt::uid(&meta) != me {
            return Err(invalid(format!(
                "owned by uid {}, not this user ({me})",
                std::os::unix::fs::MetadataExt::uid(&meta)
            )));
        }
        let len = meta.len() as usize;
        if len < HEADER_LEN {
            return Err(invalid(format!("{len} bytes, shorter than its header")));
        }
        // SAFETY: a read-only shared mapping; accessed through atomics and checked copies.
        let raw = memmap2::MmapOptions::new().map_raw_read_only(&file).map_err(io)?;
        let base = raw.as_mut_ptr();
        // SAFETY: the header is in bounds (checked above) and written before the file was
        // renamed into place.
        let (magic, version, sets, ways) = unsafe {
            (
                base.cast::<u64>().read(),
                base.add(8).cast::<u32>().read(),
                base.add(12).cast::<u32>().read() as usize,
                base.add(16).cast::<u32>().read() as usize,
            )
        };
        if magic != MAGIC || version != VERSION || ways != WAYS || sets == 0 {
            return Err(invalid(format!("not a version {VERSION} page file (magic {magic:#x}, version {version})")));
        }
        if file_len(sets) != len {
            return Err(invalid(format!("{len} bytes, but its header says {}", file_len(sets))));
        }
        Ok(PageFileReader { map: Mapped { _map: Box::new(raw), base, len, sets }, file })
    }

    /// Whether the sidecar has replaced or stopped using this file.
    pub fn retired(&self) -> bool {
        self.map.retired()
    }

    /// Whether the sidecar that made the file still runs (holds its lock).
    pub fn owner_alive(&self) -> bool {
        lock_held(&self.file)
    }

    /// Whether pages may be served from it: not retired, and its sidecar running.
    pub fn usable(&self) -> bool {
        !self.retired() && self.owner_alive()
    }

    /// Copies the page stored under `key` into `out`; false if it is not there, the file is
    /// retired or its sidecar is gone.
    pub fn get(&self, key: &PageKey, out: &mut [u8; BLCKSZ]) -> bool {
        self.usable() && self.map.get(key, out)
    }

    /// The oldest LSN the sidecar holds history for, as it last published it (invalid until
    /// it has).
    pub fn oldest_lsn(&self) -> Lsn {
        self.map.oldest_lsn()
    }
}

fn lock_range(l_type: libc::c_int) -> libc::flock {
    // SAFETY: flock is plain old data; zero is a valid value of every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    fl
}

/// Takes the owner's lock (an open-file-description lock, so no other descriptor of the
/// file in this process can drop it by closing).
fn lock_owner(file: &File) -> io::Result<()> {
    let fl = lock_range(libc::F_WRLCK);
    // SAFETY: a valid descriptor and a valid flock for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lock_held(file: &File) -> bool {
    let mut fl = lock_range(libc::F_RDLCK);
    // SAFETY: as in `lock_owner`; F_OFD_GETLK writes the conflicting lock, if any, into `fl`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(blkno: u32, lsn: u64) -> PageKey {
        let rel = RelTag { node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 }, fork: ForkNumber::Main };
        (BufferTag { rel, blkno }, Lsn(lsn))
    }

    fn page(b: u8) -> [u8; BLCKSZ] {
        let mut p = [b; BLCKSZ];
        p[100] = b.wrapping_add(1);
        p
    }

    #[test]
    fn stores_finds_evicts_and_retires() {
        let dir = std::env::temp_dir().join(format!("neon-page-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = PageFileWriter::create(&dir, 16, None).unwrap();
        assert_eq!(w.capacity(), 16);
        let r = PageFileReader::open(&dir).unwrap().expect("file exists");
        // OFD locks conflict between descriptions even within one process.
        assert!(r.owner_alive(), "the writer holds the lock");
        let mut out = [0u8; BLCKSZ];
        assert!(!r.get(&key(1, 10), &mut out));
        assert_eq!(w.store(&key(1, 10), &page(1)), None);
        assert!(r.get(&key(1, 10), &mut out) && out == page(1));
        assert!(w.contains(&key(1, 10)) && !w.contains(&key(1, 11)));
        assert!(!r.get(&key(1, 11), &mut out), "another LSN is another page");
        // Overwriting the same key keeps one copy.
        w.store(&key(1, 10), &page(2));
        assert!(r.get(&key(1, 10), &mut out) && out == page(2));
        assert_eq!(w.len(), 1);
        // Filling far past capacity evicts, reporting what went; what is left is intact.
        let mut evicted = 0;
        for b in 0..200 {
            evicted += usize::from(w.store(&key(1000 + b, 10), &page(b as u8)).is_some());
        }
        let mut held = usize::from(r.get(&key(1, 10), &mut out) && out == page(2));
        held += (0..200).filter(|&b| r.get(&key(1000 + b, 10), &mut out) && out == page(b as u8)).count();
        assert_eq!(held, w.len(), "every page the writer counts is readable and intact");
        assert_eq!(held + evicted, 201, "every page is held or was reported evicted");
        assert!(held <= 16);
        // Cleared (another timeline followed): nothing is served, and the slots fill again.
        w.clear(Lsn(0));
        assert_eq!(w.len(), 0);
        assert!(!r.get(&key(1, 10), &mut out) && !w.contains(&key(1, 10)));
        assert!((0..200).all(|b| !r.get(&key(1000 + b, 10), &mut out)));
        w.store(&key(1, 10), &page(3));
        assert!(r.get(&key(1, 10), &mut out) && out == page(3));
        assert_eq!(w.len(), 1);
        for b in 0..200 {
            w.store(&key(1000 + b, 10), &page(b as u8));
        }
        // History trimmed: older LSNs are not served.
        w.set_oldest_lsn(Lsn(11));
        assert!((0..200).all(|b| !r.get(&key(1000 + b, 10), &mut out)));
        assert_eq!(r.oldest_lsn(), Lsn(11));
        // Another lineage may begin earlier: a clear sets where history begins, down too.
        w.clear(Lsn(5));
        assert_eq!(r.oldest_lsn(), Lsn(5));
        w.store(&key(1, 10), &page(4));
        assert!(r.get(&key(1, 10), &mut out) && out == page(4));
        // A second sidecar on the same directory is refused while the first runs.
        assert!(matches!(PageFileWriter::create(&dir, 16, None), Err(PageFileError::InUse { .. })));
        drop(w);
        assert!(r.retired(), "a stopped sidecar retires its file");
        assert!(!r.owner_alive(), "and its lock is gone");
        let w2 = PageFileWriter::create(&dir, 16, None).unwrap();
        assert!(PageFileReader::open(&dir).unwrap().unwrap().owner_alive());
        drop(w2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_backed_data_is_linked_and_cleaned_up() {
        let root = std::env::temp_dir().join(format!("neon-page-file-mem-{}", std::process::id()));
        let (dir, mem) = (root.join("shared"), root.join("shm"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&mem).unwrap();
        // What a killed sidecar leaves: a link to its data.
        let stale = mem.join("neon-pages-1-1");
        std::fs::write(&stale, b"old").unwrap();
        std::os::unix::fs::symlink(&stale, dir.join(FILE_NAME)).unwrap();
        let w = PageFileWriter::create(&dir, 16, Some(&mem)).unwrap();
        assert!(!stale.exists(), "the earlier sidecar's data is removed");
        assert!(std::fs::symlink_metadata(dir.join(FILE_NAME)).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_dir(&mem).unwrap().count(), 1);
        w.store(&key(1, 10), &page(1));
        let r = PageFileReader::open(&dir).unwrap().expect("through the link");
        let mut out = [0u8; BLCKSZ];
        assert!(r.get(&key(1, 10), &mut out) && out == page(1));
        drop(w);
        assert!(r.retired() && !r.get(&key(1, 10), &mut out));
        assert_eq!(std::fs::read_dir(&mem).unwrap().count(), 0, "a retired writer unlinks its data");
        assert!(std::fs::symlink_metadata(dir.join(FILE_NAME)).is_err(), "and its link");
        // No room (here: no such directory): the data is in the shared directory itself.
        let w = PageFileWriter::create(&dir, 16, Some(&root.join("missing"))).unwrap();
        assert!(std::fs::symlink_metadata(dir.join(FILE_NAME)).unwrap().file_type().is_file());
        drop(w);
        // A FIFO someone planted where the data should be is refused, not waited on.
        let fifo = mem.join("planted");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::remove_file(dir.join(FILE_NAME)).unwrap();
        std::os::unix::fs::symlink(&fifo, dir.join(FILE_NAME)).unwrap();
        assert!(matches!(PageFileReader::open(&dir), Err(PageFileError::Invalid { .. })));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A page whose every byte says which key it belongs to.
    fn page_of(k: &PageKey) -> [u8; BLCKSZ] {
        let mut p = [0u8; BLCKSZ];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (k.0.blkno as u8).wrapping_mul(31).wrapping_add(k.1 .0 as u8).wrapping_add(i as u8);
        }
        p
    }

    #[test]
    fn readers_racing_a_writer_never_get_another_keys_page() {
        // One set: every store evicts, so readers keep meeting slots being rewritten.
        let w = PageFileWriter::anonymous(8).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (hits, misses) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for r in 0..3u64 {
                let (w, stop, hits, misses) = (&w, &stop, &hits, &misses);
                s.spawn(move || {
                    let mut out = [0u8; BLCKSZ];
                    let mut i = r;
                    while !stop.load(Ordering::Relaxed) {
                        let k = key((i % 24) as u32, 10 + i % 3);
                        if w.get(&k, &mut out) {
                            assert!(out == page_of(&k), "a page that is not {k:?}'s");
                            hits.fetch_add(1, Ordering::Relaxed);
                        } else {
                            misses.fetch_add(1, Ordering::Relaxed);
                        }
                        i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) >> 1;
                    }
                });
            }
            for i in 0..200_000u64 {
                let k = key((i % 24) as u32, 10 + i % 3);
                w.store(&k, &page_of(&k));
            }
            stop.store(true, Ordering::Relaxed);
        });
        let (h, m) = (hits.load(Ordering::Relaxed), misses.load(Ordering::Relaxed));
        assert!(h > 0 && m > 0, "{h} hits, {m} misses: the race was not exercised");
    }

    #[test]
    fn a_torn_copy_is_a_miss() {
        let w = PageFileWriter::anonymous(8).unwrap();
        w.store(&key(1, 10), &page(1));
        let mut out = [0u8; BLCKSZ];
        assert!(w.get(&key(1, 10), &mut out));
        // Scribble on the stored page behind the seqlock's back: the CRC catches it.
        let slot = (0..WAYS).find(|&s| w.map.key_in(s) == Some(key(1, 10))).unwrap();
        // SAFETY: a byte inside the anonymous mapping, no reader running.
        unsafe { *w.map.page_ptr(slot).add(5) ^= 0xFF };
        assert!(!w.get(&key(1, 10), &mut out));
    }
}
