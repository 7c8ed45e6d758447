//! One redo request at a time, inside a single-user backend, with stock PostgreSQL's redo
//! routines. What stock PostgreSQL 15 needs for this (DESIGN.md §3, verified in a spike):
//!
//! * **Recovery mode**: `InRecovery` on (so missing pages are remembered, not fatal, and cached
//!   relation sizes are trusted) and every resource manager's `rm_startup` run once.
//! * **A private namespace**: the compute's relfilenodes would collide with the scratch
//!   cluster's own catalog files, so every relation of a request (the target and every block
//!   reference of every record) is remapped into database [`PRIVATE_DB`], which the scratch
//!   cluster never has; its directory is wiped when the loop starts.
//! * **Other blocks**: each block a request touches gets its cached size raised past it, so
//!   no file is ever extended. The target's base page goes into the buffer pool; a record's
//!   other blocks get a placeholder page that redo skips as already done (redo routines may use
//!   such a buffer, e.g. BRIN asks it for its block number, so "not found" is not enough) —
//!   unless the record restores or initialises them, when they are built in the buffer pool and
//!   dropped right after the record, since later records of the request do not carry their
//!   history (DESIGN.md §3 point 13). Dirty buffers are dropped at the end of a request; if the buffer pool had to evict
//!   (write) any during the request, or redo wrote an init fork through, the request's files
//!   are unlinked, so no file ever holds a stale page a later request could trip over — redo
//!   of a non-target block that reads such a page back would apply its record to the wrong
//!   version and fail.
//! * **Only page-level resource managers**: anything else would act on the scratch cluster.
//! * **Cleanup** after every request: drop the private buffers, forget invalid pages, free the
//!   request's memory.

use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

/// The database every remapped relation lives in; the scratch cluster never creates one.
pub const PRIVATE_DB: u32 = 0x7fff_fff0;

const SIZE_OF_XLOG_RECORD: usize = 24;
const FSM_FORKNUM: pg_sys::ForkNumber::Type = 1;
const VISIBILITYMAP_FORKNUM: pg_sys::ForkNumber::Type = 2;
const INIT_FORKNUM: pg_sys::ForkNumber::Type = 3;
/// A fork size no relation reaches (InvalidBlockNumber - 1).
const ALL_BLOCKS: pg_sys::BlockNumber = 0xFFFF_FFFE;
/// Placeholders installed before the buffer pool is cleared of them (it holds 512 pages).
const MAX_PLACEHOLDERS: usize = 128;
const MAX_FORKNUM: u8 = 3;
const BKPBLOCK_WILL_INIT: u8 = 0x40;

#[derive(Clone, Copy)]
struct Target {
    rnode: pg_sys::RelFileNode,
    fork: pg_sys::ForkNumber::Type,
    blkno: pg_sys::BlockNumber,
}

pub struct RedoState {
    reader: *mut pg_sys::XLogReaderState,
    /// Space for the decoded record, 8-byte aligned.
    decoded: Vec<u64>,
    target: Option<Target>,
    /// Relation forks this request touched, to forget their invalid pages afterwards.
    touched: Vec<(pg_sys::RelFileNode, pg_sys::ForkNumber::Type)>,
    request_cxt: pg_sys::MemoryContext,
    page_out: Box<[u8; neon_types::BLCKSZ]>,
    /// Buffers written (evicted) before the request began.
    written_before: i64,
    placeholder: Box<[u8; neon_types::BLCKSZ]>,
    /// Placeholders installed since the pool was last cleared.
    placeholders: usize,
}

fn private_node(relnode: u32) -> pg_sys::RelFileNode {
    pg_sys::RelFileNode {
        spcNode: pg_sys::DEFAULTTABLESPACE_OID,
        dbNode: pg_sys::Oid::from(PRIVATE_DB),
        relNode: pg_sys::Oid::from(relnode),
    }
}

fn same_node(a: &pg_sys::RelFileNode, b: &pg_sys::RelFileNode) -> bool {
    a.spcNode == b.spcNode && a.dbNode == b.dbNode && a.relNode == b.relNode
}

impl RedoState {
    /// Puts the backend in recovery mode and prepares the private namespace.
    pub fn start() -> RedoState {
        let dir = format!("base/{PRIVATE_DB}");
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir(&dir) {
            error!("wal-redo: could not create {dir} in the scratch data directory: {e}");
        }
        // SAFETY: backend globals and functions, used on the backend's only thread, before
        // any redo; RmgrTable has RM_MAX_ID + 1 entries.
        unsafe {
            pg_sys::InRecovery = true;
            pg_sys::reachedConsistency = false;
            let table = std::ptr::addr_of!(pg_sys::RmgrTable).cast::<pg_sys::RmgrData>();
            for i in 0..=pg_sys::RM_MAX_ID as usize {
                let rmgr = &*table.add(i);
                if let Some(startup) = rmgr.rm_startup {
                    pg_sys::ffi::pg_guard_ffi_boundary(|| startup());
                }
            }
            let mut routine: pg_sys::XLogReaderRoutine = std::mem::zeroed();
            let reader = pg_sys::XLogReaderAllocate(
                pg_sys::wal_segment_size,
                std::ptr::null(),
                &mut routine,
                std::ptr::null_mut(),
            );
            if reader.is_null() {
                error!("wal-redo: out of memory allocating a WAL reader");
            }
            let request_cxt = pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopMemoryContext,
                c"neon wal-redo request".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            RedoState {
                reader,
                decoded: Vec::new(),
                target: None,
                touched: Vec::new(),
                request_cxt,
                page_out: Box::new([0; neon_types::BLCKSZ]),
                written_before: 0,
                placeholder: placeholder_page(),
                placeholders: 0,
            }
        }
    }

    /// Starts rebuilding one block (dropping what is left of an unfinished request).
    pub fn begin(&mut self, _spc: u32, _db: u32, rel: u32, fork: u8, blkno: u32) {
        if self.target.is_some() {
            self.end_request();
        }
        if fork > MAX_FORKNUM {
            error!("wal-redo: invalid fork number {fork} for relation {_spc}/{_db}/{rel} block {blkno}");
        }
        if blkno >= ALL_BLOCKS {
            error!("wal-redo: invalid block number {blkno} for relation {_spc}/{_db}/{rel}");
        }
        // SAFETY: a backend global read on the backend's only thread.
        self.written_before = unsafe { pg_sys::pgBufferUsage.shared_blks_written };
        let target = Target { rnode: private_node(rel), fork: fork as pg_sys::ForkNumber::Type, blkno };
        self.touch(target.rnode, target.fork, blkno);
        self.target = Some(target);
    }

    fn target(&self) -> Target {
        match self.target {
            Some(t) => t,
            None => error!("wal-redo protocol violation: no BEGIN before this message"),
        }
    }

    /// Makes block `blkno` of a private relation fork count as existing, and remembers the fork.
    fn touch(&mut self, rnode: pg_sys::RelFileNode, fork: pg_sys::ForkNumber::Type, blkno: pg_sys::BlockNumber) {
        // SAFETY: smgr calls on the backend's only thread; the SMgrRelation stays valid until
        // smgrclose, which only `end_request` calls, after its last use here.
        unsafe {
            let reln = pg_sys::smgropen(rnode, pg_sys::InvalidBackendId);
            let cached = (*reln).smgr_cached_nblocks[fork as usize];
            let known = if cached == pg_sys::InvalidBlockNumber {
                pg_sys::smgrcreate(reln, fork, true);
                pg_sys::smgrnblocks(reln, fork)
            } else {
                cached
            };
            if known <= blkno {
                (*reln).smgr_cached_nblocks[fork as usize] = blkno + 1;
            }
            // Heap redo updates the free space map and clears visibility-map bits of the heap
            // blocks it touches, target or not. Extending those forks would write pages to
            // disk outside the buffer pool (the visibility map: up to every page before the
            // one needed) or through its "extend" path (counted as writes, which look like
            // evictions). Make every block of them exist: reads past the end of the file
            // return zero pages, which their code initialises in the buffer pool, dropped at
            // the end of the request. A target's cached size set above is never lowered.
            for f in [FSM_FORKNUM, VISIBILITYMAP_FORKNUM] {
                if (*reln).smgr_cached_nblocks[f as usize] != ALL_BLOCKS {
                    // The file must exist to be read (the visibility map's code, unlike the
                    // redo buffer functions, does not create it).
                    pg_sys::smgrcreate(reln, f, true);
                    (*reln).smgr_cached_nblocks[f as usize] = ALL_BLOCKS;
                }
            }
        }
        if !self.touched.iter().any(|(n, f)| same_node(n, &rnode) && *f == fork) {
            self.touched.push((rnode, fork));
        }
    }

    /// Installs the base page of the target block.
    pub fn push_page(&mut self, page: &[u8; neon_types::BLCKSZ]) {
        let t = self.target();
        install_page(t.rnode, t.fork, t.blkno, page);
    }

    /// Applies one record (its `xl_tot_len` bytes, 8-byte aligned) that ends at `end_lsn`.
    pub fn apply(&mut self, end_lsn: u64, record: &mut [u8]) {
        let t = self.target();
        let n = record.len();
        let tot_len = u32::from_le_bytes(record[..4].try_into().expect("4 bytes")) as usize;
        if tot_len != n || n < SIZE_OF_XLOG_RECORD {
            error!("wal-redo: record ending at {} claims {tot_len} bytes but {n} were sent", lsn_text(end_lsn));
        }
        let stored = u32::from_le_bytes(record[20..24].try_into().expect("4 bytes"));
        let crc = crc32c::crc32c_append(crc32c::crc32c(&record[SIZE_OF_XLOG_RECORD..]), &record[..20]);
        if crc != stored {
            error!("wal-redo: record ending at {} has a bad CRC ({crc:08X}, stored {stored:08X})", lsn_text(end_lsn));
        }
        let (info, rmid) = (record[16] & 0xF0, record[17]);
        if !neon_types::walredo::is_page_level(rmid, info) {
            error!(
                "wal-redo: record ending at {} (rmgr {rmid}, info {info:#04x}) is not a page-level record",
                lsn_text(end_lsn)
            );
        }
        // Whether redo will leave another block's page in the buffer pool (from an image or by
        // initialising it): later records of this request do not bring that page's history,
        // so it must be gone before they run.
        let mut leaves_other_page = false;
        // SAFETY: DecodeXLogRecord writes at most DecodeXLogRecordRequiredSpace(tot_len) bytes
        // into `decoded`, which is 8-byte aligned, and reads the `tot_len` bytes of `record`,
        // checked above; the redo routine runs on the backend's only thread with the reader
        // pointing at that decoded record, in the request's memory context.
        unsafe {
            let space = pg_sys::DecodeXLogRecordRequiredSpace(n);
            if self.decoded.len() * 8 < space {
                self.decoded.resize(space.div_ceil(8), 0);
            }
            let decoded = self.decoded.as_mut_ptr().cast::<pg_sys::DecodedXLogRecord>();
            let mut errmsg: *mut std::ffi::c_char = std::ptr::null_mut();
            let ok = pg_sys::DecodeXLogRecord(
                self.reader,
                decoded,
                record.as_mut_ptr().cast::<pg_sys::XLogRecord>(),
                end_lsn,
                &mut errmsg,
            );
            if !ok {
                let why = if errmsg.is_null() { "unknown".into() } else { CStr::from_ptr(errmsg).to_string_lossy() };
                error!("wal-redo: could not decode the record ending at {}: {why}", lsn_text(end_lsn));
            }
            let blocks = (*decoded).blocks.as_mut_ptr();
            for i in 0..=(*decoded).max_block_id.max(-1) {
                let blk = &mut *blocks.add(i as usize);
                if !blk.in_use {
                    continue;
                }
                if blk.forknum < 0 || blk.forknum > MAX_FORKNUM as i32 || blk.blkno >= ALL_BLOCKS {
                    error!(
                        "wal-redo: record ending at {} has block {i} in fork {} at block {}",
                        lsn_text(end_lsn),
                        blk.forknum,
                        blk.blkno
                    );
                }
                blk.rnode = private_node(blk.rnode.relNode.into());
                let (rnode, fork, blkno) = (blk.rnode, blk.forknum, blk.blkno);
                let is_target = same_node(&rnode, &t.rnode) && fork == t.fork && blkno == t.blkno;
                self.touch(rnode, fork, blkno);
                if !is_target {
                    if (blk.has_image && blk.apply_image) || blk.flags & BKPBLOCK_WILL_INIT != 0 {
                        leaves_other_page = true;
                    } else {
                        install_page(rnode, fork, blkno, &self.placeholder);
                        self.placeholders += 1;
                    }
                }
            }
            (*self.reader).record = decoded;
            (*self.reader).ReadRecPtr = end_lsn;
            (*self.reader).EndRecPtr = end_lsn;
            let rmgr = &*std::ptr::addr_of!(pg_sys::RmgrTable).cast::<pg_sys::RmgrData>().add(rmid as usize);
            let Some(redo) = rmgr.rm_redo else {
                error!("wal-redo: resource manager {rmid} has no redo routine");
            };
            let old = pg_sys::MemoryContextSwitchTo(self.request_cxt);
            let reader = self.reader;
            pg_sys::ffi::pg_guard_ffi_boundary(|| redo(reader));
            pg_sys::MemoryContextSwitchTo(old);
            (*self.reader).record = std::ptr::null_mut();
        }
        // Placeholders are dropped before they fill the pool: evicting one would write it out.
        if leaves_other_page || self.placeholders > MAX_PLACEHOLDERS {
            self.isolate_target();
        }
    }

    /// Drops every private page but the target's (DESIGN.md §3 point 13).
    fn isolate_target(&mut self) {
        self.placeholders = 0;
        let mut keep = Box::new([0u8; neon_types::BLCKSZ]);
        keep.copy_from_slice(self.get_page());
        // SAFETY: no private buffer is pinned between records.
        unsafe { pg_sys::DropDatabaseBuffers(pg_sys::Oid::from(PRIVATE_DB)) };
        self.push_page(&keep);
    }

    /// The target block's page as redo left it.
    pub fn get_page(&mut self) -> &[u8] {
        let t = self.target();
        // SAFETY: the buffer is pinned while its BLCKSZ-byte page is copied out.
        unsafe {
            let buf = pg_sys::ReadBufferWithoutRelcache(
                t.rnode,
                t.fork,
                t.blkno,
                pg_sys::ReadBufferMode::RBM_NORMAL,
                std::ptr::null_mut(),
                true,
            );
            let src = pg_sys::BufferGetPage(buf).cast::<u8>();
            std::ptr::copy_nonoverlapping(src, self.page_out.as_mut_ptr(), neon_types::BLCKSZ);
            pg_sys::ReleaseBuffer(buf);
        }
        &self.page_out[..]
    }

    /// Forgets everything the request left behind.
    pub fn end_request(&mut self) {
        // SAFETY: no private buffer is pinned between messages; the SMgrRelations unlinked or
        // closed here are not used again before `touch` reopens them.
        unsafe {
            pg_sys::DropDatabaseBuffers(pg_sys::Oid::from(PRIVATE_DB));
            let evicted = pg_sys::pgBufferUsage.shared_blks_written != self.written_before;
            let mut unlink: Vec<pg_sys::SMgrRelation> = Vec::new();
            for (rnode, fork) in self.touched.drain(..) {
                pg_sys::XLogDropRelation(rnode, fork);
                // Redo writes init-fork pages straight to disk, and an eviction may have
                // written any page: such files must not outlive the request.
                if evicted || fork == INIT_FORKNUM {
                    let reln = pg_sys::smgropen(rnode, pg_sys::InvalidBackendId);
                    if !unlink.contains(&reln) {
                        unlink.push(reln);
                    }
                }
            }
            if !unlink.is_empty() {
                pg_sys::smgrdounlinkall(unlink.as_mut_ptr(), unlink.len() as i32, true);
                for reln in unlink {
                    pg_sys::smgrclose(reln);
                }
            }
            pg_sys::MemoryContextReset(self.request_cxt);
        }
        self.placeholders = 0;
        self.target = None;
    }
}

/// Puts `page` into the buffer pool as block `blkno` of a private relation fork.
fn install_page(
    rnode: pg_sys::RelFileNode,
    fork: pg_sys::ForkNumber::Type,
    blkno: pg_sys::BlockNumber,
    page: &[u8; neon_types::BLCKSZ],
) {
    // SAFETY: the buffer is pinned and exclusively locked by RBM_ZERO_AND_LOCK while we copy
    // into its page, which is BLCKSZ bytes.
    unsafe {
        let buf = pg_sys::ReadBufferWithoutRelcache(
            rnode,
            fork,
            blkno,
            pg_sys::ReadBufferMode::RBM_ZERO_AND_LOCK,
            std::ptr::null_mut(),
            true,
        );
        let dst = pg_sys::BufferGetPage(buf).cast::<u8>();
        std::ptr::copy_nonoverlapping(page.as_ptr(), dst, neon_types::BLCKSZ);
        pg_sys::MarkBufferDirty(buf);
        pg_sys::UnlockReleaseBuffer(buf);
    }
}

/// The page that stands in for a block a record references but the request is not about: an
/// empty page whose LSN is beyond any record's, so redo finds the block (some redo routines use
/// its buffer, e.g. BRIN's revmap update asks it for its block number) and skips it as done.
/// That LSN is the scratch cluster's own WAL position, so evicting the page needs no WAL flush
/// beyond what the scratch cluster has.
fn placeholder_page() -> Box<[u8; neon_types::BLCKSZ]> {
    let mut p = Box::new([0u8; neon_types::BLCKSZ]);
    let size = neon_types::BLCKSZ as u16;
    let lsn = neon_types::walredo::SCRATCH_WAL_START.0;
    // pd_lsn is two 32-bit halves, high first.
    p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_le_bytes());
    p[4..8].copy_from_slice(&(lsn as u32).to_le_bytes());
    p[12..14].copy_from_slice(&24u16.to_le_bytes()); // pd_lower
    p[14..16].copy_from_slice(&size.to_le_bytes()); // pd_upper
    p[16..18].copy_from_slice(&size.to_le_bytes()); // pd_special
    p[18..20].copy_from_slice(&(size | 4).to_le_bytes()); // pd_pagesize_version
    p
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}
