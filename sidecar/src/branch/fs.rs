//! The file system a branch's PostgreSQL runs on: a FUSE mount that passes every operation
//! through to the branch's overlay directory, except reads of relation-file blocks that still
//! come from history ([`HistoryFiles`]), which are rebuilt at the branch's LSN by the
//! [`PageSource`] — a multi-block read as one batch. Relation files with history are listed
//! from the branch's manifest until they are made in the overlay, which a lookup does. Writes go to the overlay; the first write
//! to a history block is journalled after its data, and a partial write to one first copies
//! the history page up. A page history cannot give (the sidecar's store fails, a value is
//! corrupt) is `EIO` and a log line naming the file and block: never zeros, never another page.
//!
//! Inodes are the overlay's paths, numbered as first seen; a rename renumbers nothing and
//! moves the paths below it. A relation file with history is never renamed by PostgreSQL; a
//! rename of one is refused (`EXDEV`) rather than losing its history.

use super::history::{read_overlay, HistoryFiles, Source};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, TimeOrNow,
};
use neon_types::{BufferTag, BLCKSZ};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Pages as history has them at the branch's LSN (with checksums stamped where the cluster
/// has them). One call per read: the pages of a multi-block read are rebuilt as one batch.
pub trait PageSource: Send + Sync + 'static {
    fn pages(&self, tags: &[BufferTag]) -> Vec<Result<Box<[u8; BLCKSZ]>, String>>;
}

/// Attributes may be cached this long: nothing but this file system changes the overlay.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u64 = BLCKSZ as u64;

struct Inodes {
    paths: HashMap<u64, PathBuf>,
    numbers: HashMap<PathBuf, u64>,
    next: u64,
}

impl Inodes {
    fn number(&mut self, path: &Path) -> u64 {
        if let Some(n) = self.numbers.get(path) {
            return *n;
        }
        let n = self.next;
        self.next += 1;
        self.paths.insert(n, path.to_path_buf());
        self.numbers.insert(path.to_path_buf(), n);
        n
    }

    fn forget_path(&mut self, path: &Path) {
        if let Some(n) = self.numbers.remove(path) {
            self.paths.remove(&n);
        }
    }

    /// Moves `from` and everything below it to `to`.
    fn rename(&mut self, from: &Path, to: &Path) {
        self.forget_path(to);
        let moved: Vec<(PathBuf, u64)> =
            self.numbers.iter().filter(|(p, _)| p.starts_with(from)).map(|(p, n)| (p.clone(), *n)).collect();
        for (old, n) in moved {
            // (Joining an empty rest would add a trailing slash: a file is no directory.)
            let rest = old.strip_prefix(from).expect("below from");
            let new = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
            self.numbers.remove(&old);
            self.numbers.insert(new.clone(), n);
            self.paths.insert(n, new);
        }
    }
}

/// A directory's entries when it was opened.
type Listing = Vec<(std::ffi::OsString, FileType)>;

struct OpenFile {
    file: File,
    /// The relation file's index in [`HistoryFiles`], if its blocks may come from history.
    history: Option<u32>,
    path: PathBuf,
    /// Where the last read ended, and how far read-ahead was asked for (blocks).
    sequence: Mutex<(u32, u32)>,
}

/// A read starting this close to where the last ended continues a sequential read (the kernel
/// sends its read-ahead requests on several threads, not always in order).
const SEQUENTIAL_SLACK: u32 = 32;
/// How far past a sequential read history's pages are read ahead (2 MB).
const READ_AHEAD_BLOCKS: u32 = 256;

pub struct BranchFs {
    /// The branch's name in log lines.
    name: String,
    overlay: PathBuf,
    history: Arc<HistoryFiles>,
    source: Arc<dyn PageSource>,
    ahead: super::read_ahead::ReadAhead,
    inodes: RwLock<Inodes>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    /// Open directories' listings, by handle.
    dirs: RwLock<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    /// Serialises copy-up and first writes of history blocks (rare; reads never wait on it).
    cow: Mutex<()>,
}

fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let time = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let kind = kind_of(m.file_type());
    FileAttr {
        ino: INodeNo(ino),
        size: m.len(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: BLCKSZ as u32,
        flags: 0,
    }
}

/// What the overlay holds: directories, symbolic links and regular files (PostgreSQL makes
/// nothing else).
fn kind_of(ft: std::fs::FileType) -> FileType {
    if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    }
}

fn cstring(p: &Path) -> Result<CString, Errno> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

impl BranchFs {
    pub fn new(name: String, overlay: PathBuf, history: Arc<HistoryFiles>, source: Arc<dyn PageSource>) -> BranchFs {
        let mut inodes = Inodes { paths: HashMap::new(), numbers: HashMap::new(), next: 2 };
        inodes.paths.insert(1, PathBuf::new());
        inodes.numbers.insert(PathBuf::new(), 1);
        let ahead = super::read_ahead::ReadAhead::new(&name, source.clone());
        BranchFs {
            name,
            overlay,
            history,
            source,
            ahead,
            inodes: RwLock::new(inodes),
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            cow: Mutex::new(()),
        }
    }

    /// Has the system catalogs' pages rebuilt in the background: a new branch's server is
    /// about to start, and its first connection reads them.
    pub fn warm_catalogs(&self) {
        // Half the cache at most: a first scan's read-ahead finds room beside them.
        self.ahead.schedule(self.history.catalog_pages(super::read_ahead::CAPACITY / 2));
    }

    fn rel_path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        let inodes = self.inodes.read().unwrap_or_else(|p| p.into_inner());
        inodes.paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.rel_path(parent)?.join(name))
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.overlay.join(rel)
    }

    /// `rel`'s metadata in the overlay, a relation file with history made there first if it
    /// is not yet (files are made when first looked up).
    fn stat(&self, rel: &Path) -> Result<std::fs::Metadata, Errno> {
        match std::fs::symlink_metadata(self.real(rel)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(i) = self.history_of(rel) else { return Err(Errno::ENOENT) };
                if !self.history.materialize(i).map_err(|e| self.io_error(rel, &e))? {
                    return Err(Errno::ENOENT);
                }
                std::fs::symlink_metadata(self.real(rel)).map_err(|e| errno(&e))
            }
            r => r.map_err(|e| errno(&e)),
        }
    }

    fn entry(&self, rel: &Path) -> Result<FileAttr, Errno> {
        let m = self.stat(rel)?;
        let n = self.inodes.write().unwrap_or_else(|p| p.into_inner()).number(rel);
        Ok(attr(n, &m))
    }

    fn open_file(&self, f: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        self.files.read().unwrap_or_else(|p| p.into_inner()).get(&f.0).cloned().ok_or(Errno::EBADF)
    }

    fn history_of(&self, rel: &Path) -> Option<u32> {
        self.history.lookup(rel.to_str()?)
    }

    fn log(&self, what: std::fmt::Arguments<'_>) {
        eprintln!("neon-sidecar: branch {}: {what}", self.name);
    }

    /// Opens `rel` in the overlay with the caller's flags (but `O_DIRECT` and `O_APPEND`: we
    /// read and write at offsets the kernel gives) and files a handle for it.
    fn open_handle(&self, rel: &Path, flags: i32, create_mode: Option<u32>) -> Result<u64, Errno> {
        let real = self.real(rel);
        if let (Some(i), Some(_)) = (self.history_of(rel), create_mode) {
            if self.history.on_demand() {
                // Not made yet (rare: the kernel looks a name up before creating it, and a
                // listed name is made then): made now, and opened as the file that exists.
                self.history.materialize(i).map_err(|e| self.io_error(rel, &e))?;
            } else if std::fs::symlink_metadata(&real).is_err() {
                // Created anew where a file with history was (its unlink lost in a crash): the
                // new file is the branch's own.
                self.history.unlinked(i).map_err(|e| self.io_error(rel, &e))?;
            }
        }
        let history = self.history_of(rel);
        if history.is_some() && create_mode.is_none() {
            // Looked up before, so made already; but never open a path history still serves
            // without its overlay file.
            self.stat(rel)?;
        }
        let mut o = OpenOptions::new();
        // Read-write whenever writing: a partial write of a history block reads it first.
        let acc = flags & libc::O_ACCMODE;
        o.read(true).write(acc == libc::O_WRONLY || acc == libc::O_RDWR);
        let passed = flags & !(libc::O_DIRECT | libc::O_APPEND | libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC);
        o.custom_flags(passed);
        if let Some(mode) = create_mode {
            o.create(true).write(true).mode(mode);
            if flags & libc::O_EXCL != 0 {
                o.create_new(true);
            }
        }
        let file = o.open(&real).map_err(|e| errno(&e))?;
        if flags & libc::O_TRUNC != 0 {
            self.truncate(rel, history, 0)?;
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let of = Arc::new(OpenFile { file, history, path: rel.to_path_buf(), sequence: Mutex::new((u32::MAX, 0)) });
        self.files.write().unwrap_or_else(|p| p.into_inner()).insert(fh, of);
        Ok(fh)
    }

    /// An error of the branch's own state: logged, `EIO` to the caller.
    fn io_error(&self, rel: &Path, e: &dyn std::fmt::Display) -> Errno {
        self.log(format_args!("{}: {e}", rel.display()));
        Errno::EIO
    }

    /// Cuts `rel` to `size` bytes (through a handle of its own: the caller's may be
    /// read-only). A history block cut in the middle keeps its first part: copied up first.
    fn truncate(&self, rel: &Path, history: Option<u32>, size: u64) -> Result<(), Errno> {
        let file = OpenOptions::new().read(true).write(true).open(self.real(rel)).map_err(|e| errno(&e))?;
        if let Some(i) = history {
            let _cow = self.cow.lock().unwrap_or_else(|p| p.into_inner());
            if !size.is_multiple_of(BLOCK) {
                let tail = (size / BLOCK) as u32;
                for (block, page) in self.history_pages(rel, i, &[tail])? {
                    file.write_all_at(&page[..], u64::from(block) * BLOCK).map_err(|e| errno(&e))?;
                    self.history.written(i, block);
                }
            }
            self.history.truncated(i, size.div_ceil(BLOCK) as u32).map_err(|e| self.io_error(rel, &e))?;
        }
        file.set_len(size).map_err(|e| errno(&e))
    }

    /// History's pages for the history blocks among `blocks`, by block.
    fn history_pages(&self, rel: &Path, i: u32, blocks: &[u32]) -> Result<HashMap<u32, Box<[u8; BLCKSZ]>>, Errno> {
        let wanted: Vec<(u32, BufferTag)> = blocks
            .iter()
            .filter_map(|b| match self.history.source(i, *b) {
                Source::History(tag) => Some((*b, tag)),
                Source::Overlay => None,
            })
            .collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let tags: Vec<BufferTag> = wanted.iter().map(|(_, t)| *t).collect();
        // Those read ahead first; the rest rebuilt now, in one exchange.
        let mut pages: Vec<Result<Box<[u8; BLCKSZ]>, String>> = Vec::with_capacity(tags.len());
        let mut missing = Vec::new();
        for (n, page) in self.ahead.take(&tags).into_iter().enumerate() {
            match page {
                Some(p) => pages.push(Ok(p)),
                None => {
                    missing.push(n);
                    pages.push(Err(String::new()));
                }
            }
        }
        if !missing.is_empty() {
            let rebuilt = self.source.pages(&missing.iter().map(|n| tags[*n]).collect::<Vec<_>>());
            for (n, page) in missing.into_iter().zip(rebuilt) {
                pages[n] = page;
            }
        }
        let mut out = HashMap::with_capacity(wanted.len());
        for ((block, tag), page) in wanted.into_iter().zip(pages) {
            match page {
                Ok(p) => {
                    out.insert(block, p);
                }
                Err(e) => {
                    self.log(format_args!("block {block} of {} ({tag}): {e}", rel.display()));
                    return Err(Errno::EIO);
                }
            }
        }
        Ok(out)
    }

    /// When `blocks` continue a sequential read of `of` (of `file_blocks`), has history's pages
    /// after them rebuilt ahead, up to [`READ_AHEAD_BLOCKS`] past the read.
    fn read_ahead(&self, of: &OpenFile, i: u32, blocks: &[u32], file_blocks: u32) {
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else { return };
        let range = {
            let mut seq = of.sequence.lock().unwrap_or_else(|p| p.into_inner());
            let (ended, asked) = *seq;
            // Forward from about where the last read ended (a backward scan is not read ahead).
            let sequential = ended != u32::MAX && first.abs_diff(ended) <= SEQUENTIAL_SLACK && last + 1 > ended;
            if !sequential {
                // A new sequence (another scan of a file kept open starts at its beginning).
                *seq = (last + 1, 0);
                return;
            }
            seq.0 = ended.max(last + 1);
            let from = asked.max(ended).max(last + 1);
            let to = (last + 1).saturating_add(READ_AHEAD_BLOCKS).min(file_blocks);
            if from >= to {
                return;
            }
            seq.1 = to;
            from..to
        };
        self.ahead.schedule(range.filter_map(|b| match self.history.source(i, b) {
            Source::History(tag) => Some(tag),
            Source::Overlay => None,
        }));
    }

    /// `size` bytes at `offset` (fewer at the end of the file): history's pages for blocks
    /// that come from history, the overlay file's bytes for the others (read only for those:
    /// the overlay holds nothing where history answers).
    fn read_at(&self, of: &OpenFile, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let len = of.file.metadata().map_err(|e| errno(&e))?.len();
        let end = (offset + u64::from(size)).min(len);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut buf = Vec::with_capacity((end - offset) as usize);
        let Some(i) = of.history else {
            buf.resize((end - offset) as usize, 0);
            read_overlay(&of.file, offset, &mut buf).map_err(|e| errno(&e))?;
            return Ok(buf);
        };
        let blocks: Vec<u32> = ((offset / BLOCK) as u32..=((end - 1) / BLOCK) as u32).collect();
        self.read_ahead(of, i, &blocks, (len.div_ceil(BLOCK)) as u32);
        let mut pages = self.history_pages(&of.path, i, &blocks)?;
        // A first write may have landed while history rebuilt the page: the overlay wins (under
        // the lock writes take, so none lands between this look and the read below).
        let _cow = self.cow.lock().unwrap_or_else(|p| p.into_inner());
        pages.retain(|block, _| matches!(self.history.source(i, *block), Source::History(_)));
        for block in blocks {
            let (start, stop) = (u64::from(block) * BLOCK, u64::from(block + 1) * BLOCK);
            let (from, to) = (start.max(offset), stop.min(end));
            match pages.remove(&block) {
                Some(page) => buf.extend_from_slice(&page[(from - start) as usize..(to - start) as usize]),
                None => {
                    let at = buf.len();
                    buf.resize(at + (to - from) as usize, 0);
                    read_overlay(&of.file, from, &mut buf[at..]).map_err(|e| errno(&e))?;
                }
            }
        }
        Ok(buf)
    }

    fn write_at(&self, of: &OpenFile, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let Some(i) = of.history else {
            return of.file.write_all_at(data, offset).map_err(|e| errno(&e));
        };
        let end = offset + data.len() as u64;
        let _cow = self.cow.lock().unwrap_or_else(|p| p.into_inner());
        let blocks: Vec<u32> =
            if data.is_empty() { Vec::new() } else { ((offset / BLOCK) as u32..=((end - 1) / BLOCK) as u32).collect() };
        // Blocks only partly written keep the rest of history's page: copy those up first.
        let partial: Vec<u32> = blocks
            .iter()
            .copied()
            .filter(|b| {
                let (start, stop) = (u64::from(*b) * BLOCK, u64::from(*b + 1) * BLOCK);
                offset > start || end < stop
            })
            .collect();
        for (block, page) in self.history_pages(&of.path, i, &partial)? {
            of.file.write_all_at(&page[..], u64::from(block) * BLOCK).map_err(|e| errno(&e))?;
        }
        of.file.write_all_at(data, offset).map_err(|e| errno(&e))?;
        for b in blocks {
            self.history.written(i, b);
        }
        Ok(())
    }
}

impl Filesystem for BranchFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        // PostgreSQL writes 8 KB at a time (a scan's hint bits, evicted buffers): the kernel's
        // writeback cache turns those into page-cache copies, sent here in large runs later and
        // always before an fsync is — the durability PostgreSQL asks for is the fsync's. Nothing
        // but this file system changes the overlay, so the kernel may keep sizes and times.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_WRITEBACK_CACHE) {
            self.log(format_args!("the kernel offers no writeback cache ({missing:?}): writes go through one by one"));
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|p| self.entry(&p)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // An open file answers for itself (it may be unlinked or renamed over since).
        let open = fh.and_then(|f| self.open_file(f).ok()).and_then(|of| of.file.metadata().ok());
        if let Some(m) = open {
            return reply.attr(&TTL, &attr(ino.0, &m));
        }
        match self.rel_path(ino).and_then(|p| self.entry(&p)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = (|| {
            let rel = self.rel_path(ino)?;
            let real = self.real(&rel);
            self.stat(&rel)?;
            if let Some(mode) = mode {
                std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| errno(&e))?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&real, uid, gid).map_err(|e| errno(&e))?;
            }
            if let Some(size) = size {
                let history = match fh.map(|f| self.open_file(f)).transpose()? {
                    Some(of) => of.history,
                    None => self.history_of(&rel),
                };
                self.truncate(&rel, history, size)?;
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                    Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as _ }
                    }
                };
                let times = [ts(atime), ts(mtime)];
                let c = cstring(&real)?;
                // SAFETY: `c` is a valid NUL-terminated path and `times` two timespecs, as
                // utimensat requires; nothing is retained after the call.
                if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }
                    != 0
                {
                    return Err(errno(&std::io::Error::last_os_error()));
                }
            }
            self.entry(&rel)
        })();
        match result {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.rel_path(ino).and_then(|p| std::fs::read_link(self.real(&p)).map_err(|e| errno(&e))) {
            Ok(target) => reply.data(target.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let result = self.child(parent, name).and_then(|rel| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & !umask & 0o7777)
                .open(self.real(&rel))
                .map_err(|e| errno(&e))?;
            self.entry(&rel)
        });
        match result {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        use std::os::unix::fs::DirBuilderExt;
        let result = self.child(parent, name).and_then(|rel| {
            std::fs::DirBuilder::new().mode(mode & !umask & 0o7777).create(self.real(&rel)).map_err(|e| errno(&e))?;
            self.entry(&rel)
        });
        match result {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|rel| {
            // History's end is recorded first: a crash before the overlay file goes leaves a
            // file that is the branch's own, never one that comes back from history.
            let history = self.history_of(&rel);
            if let Some(i) = history {
                self.history.unlinked(i).map_err(|e| {
                    self.log(format_args!("unlinking {}: {e}", rel.display()));
                    Errno::EIO
                })?;
            }
            match std::fs::remove_file(self.real(&rel)) {
                // Never made in the overlay: its history's end was all there was to it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && history.is_some() => {}
                r => r.map_err(|e| errno(&e))?,
            }
            self.inodes.write().unwrap_or_else(|p| p.into_inner()).forget_path(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let result = self.child(parent, name).and_then(|rel| {
            // Files not made in the overlay yet are in it all the same.
            if rel.to_str().is_some_and(|d| self.history.has_under(d)) {
                return Err(Errno::ENOTEMPTY);
            }
            std::fs::remove_dir(self.real(&rel)).map_err(|e| errno(&e))?;
            self.inodes.write().unwrap_or_else(|p| p.into_inner()).forget_path(&rel);
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.child(parent, link_name).and_then(|rel| {
            std::os::unix::fs::symlink(target, self.real(&rel)).map_err(|e| errno(&e))?;
            self.entry(&rel)
        });
        match result {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = (|| {
            if flags.bits() != 0 {
                return Err(Errno::EINVAL);
            }
            let (from, to) = (self.child(parent, name)?, self.child(newparent, newname)?);
            if self.history_of(&from).is_some() || from.to_str().is_some_and(|f| self.history.has_under(f)) {
                self.log(format_args!("refusing to rename {} (its blocks come from history)", from.display()));
                return Err(Errno::EXDEV);
            }
            // The replaced file's history ends first, durably (as for an unlink).
            if let Some(i) = self.history_of(&to) {
                self.history.unlinked(i).map_err(|e| self.io_error(&to, &e))?;
            }
            std::fs::rename(self.real(&from), self.real(&to)).map_err(|e| errno(&e))?;
            self.inodes.write().unwrap_or_else(|p| p.into_inner()).rename(&from, &to);
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.rel_path(ino).and_then(|rel| self.open_handle(&rel, flags.0, None)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.child(parent, name).and_then(|rel| {
            let fh = self.open_handle(&rel, flags, Some(mode & !umask & 0o7777))?;
            Ok((self.entry(&rel)?, fh))
        });
        match result {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.open_file(fh).and_then(|of| self.read_at(&of, offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.open_file(fh).and_then(|of| self.write_at(&of, offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.write().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let result = self.open_file(fh).and_then(|of| {
            let synced = if datasync { of.file.sync_data() } else { of.file.sync_all() };
            synced.map_err(|e| errno(&e))?;
            if let Some(i) = of.history {
                self.history.sync(i, &of.file).map_err(|e| self.io_error(&of.path, &e))?;
            }
            Ok(())
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// The listing is taken when the directory is opened: offsets into it stay valid while
    /// entries are unlinked between `readdir` calls (PostgreSQL unlinks as it iterates).
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| {
            let rel = self.rel_path(ino)?;
            let mut entries: Vec<(std::ffi::OsString, FileType)> =
                vec![(".".into(), FileType::Directory), ("..".into(), FileType::Directory)];
            let mut seen = std::collections::HashSet::new();
            for e in std::fs::read_dir(self.real(&rel)).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                let kind = kind_of(e.file_type().map_err(|e| errno(&e))?);
                seen.insert(e.file_name());
                entries.push((e.file_name(), kind));
            }
            // Relation files not made in the overlay yet.
            for name in self.history.names_in(&rel) {
                if !seen.contains(OsStr::new(&name)) {
                    entries.push((name.into(), FileType::RegularFile));
                }
            }
            let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
            self.dirs.write().unwrap_or_else(|p| p.into_inner()).insert(fh, Arc::new(entries));
            Ok(fh)
        })();
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.write().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let result = (|| {
            let rel = self.rel_path(ino)?;
            let entries =
                self.dirs.read().unwrap_or_else(|p| p.into_inner()).get(&fh.0).cloned().ok_or(Errno::EBADF)?;
            let mut inodes = self.inodes.write().unwrap_or_else(|p| p.into_inner());
            for (i, (name, kind)) in entries.iter().enumerate().skip(offset as usize) {
                let n = match name.to_str() {
                    Some(".") => ino.0,
                    Some("..") => rel.parent().map_or(ino.0, |p| inodes.number(p)),
                    _ => inodes.number(&rel.join(name)),
                };
                if reply.add(INodeNo(n), (i + 1) as u64, *kind, name) {
                    break;
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let result = self
            .rel_path(ino)
            .and_then(|rel| File::open(self.real(&rel)).and_then(|d| d.sync_all()).map_err(|e| errno(&e)));
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(&self.overlay) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`); this only says the
        // file exists.
        match self.rel_path(ino).and_then(|p| self.stat(&p)) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}
