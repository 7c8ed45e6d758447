//! From decoded WAL records to page-store values: for every block a record references, either
//! the restored full-page image or the record itself (marked `will_init` when redo needs no
//! earlier page), keyed by the record's end LSN; the Rust-native visibility-map records
//! derived from heap records; and relation sizes, which grow with the highest block
//! referenced (extending a relation is not WAL-logged).
//!
//! Relation life cycle: SMGR CREATE makes a fork exist (empty), SMGR TRUNCATE shrinks the main
//! fork (and the visibility map to the pages still needed, clearing the bits of the removed
//! blocks on its last page as a Rust-native record), and a transaction's commit (or an
//! aborted transaction's abort) drops the relations it lists: their sizes become "does not
//! exist" from that LSN on, while earlier LSNs still read them.
//!
//! Not yet interpreted here (later work): databases, relmaps, SLRU pages, two-phase state,
//! checkpoint counters.

use super::key::Key;
use super::store::Repository;
use super::value::Value;
use crate::wal::record::DecodedRecord;
use crate::walredo::derive::native_records;
use crate::walredo::native::{NativeRecord, NativeTarget};
use bytes::Bytes;
use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag, BLCKSZ};

const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
const SMGR_TRUNCATE_VM: u32 = 0x0002;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
use crate::walredo::native::VM_HEAPBLOCKS_PER_PAGE as HEAP_BLOCKS_PER_VM_PAGE;
use std::collections::HashMap;

/// Why a record could not be filed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("record at {lsn}: restoring the image of {tag}: {source}")]
    Image { lsn: neon_types::Lsn, tag: neon_types::BufferTag, source: crate::wal::image::ImageError },
    #[error(transparent)]
    Derive(#[from] crate::walredo::derive::DeriveError),
}

/// Files records into a repository, keeping relation sizes.
pub struct Ingest {
    sizes: HashMap<RelTag, u32>,
}

impl Default for Ingest {
    fn default() -> Self {
        Ingest::new()
    }
}

impl Ingest {
    pub fn new() -> Ingest {
        Ingest { sizes: HashMap::new() }
    }

    /// The size of a relation fork as of the last record filed, in blocks.
    pub fn rel_size(&self, rel: &RelTag) -> Option<u32> {
        self.sizes.get(rel).copied()
    }

    pub fn ingest(&mut self, repo: &mut Repository, rec: &DecodedRecord) -> Result<(), IngestError> {
        let lsn = rec.end_lsn;
        self.relation_life_cycle(repo, rec)?;
        for (target, record) in native_records(&rec.view())? {
            if let NativeTarget::VisibilityMap(tag) = target {
                let mut b = Vec::new();
                record.encode(&mut b);
                repo.put(Key::rel_block(&tag), lsn, Value::Native(Bytes::from(b)));
                self.grow(repo, tag.rel, tag.blkno, lsn);
            }
        }
        if neon_types::walredo::is_page_level(rec.header.rmid, rec.header.info) {
            for b in &rec.blocks {
                let value = match b.image.as_ref().filter(|i| i.apply()) {
                    Some(img) => {
                        let mut page = vec![0u8; BLCKSZ];
                        let out: &mut [u8; BLCKSZ] = (&mut page[..]).try_into().expect("BLCKSZ");
                        rec.restore_image(img, out).map_err(|source| IngestError::Image { lsn, tag: b.tag, source })?;
                        Value::Image(Bytes::from(page))
                    }
                    None => Value::WalRecord { will_init: b.will_init(), raw: rec.raw.clone() },
                };
                repo.put(Key::rel_block(&b.tag), lsn, value);
                self.grow(repo, b.tag.rel, b.tag.blkno, lsn);
            }
        }
        repo.advance(lsn);
        Ok(())
    }

    fn relation_life_cycle(&mut self, repo: &mut Repository, rec: &DecodedRecord) -> Result<(), IngestError> {
        use crate::wal::consts::{RM_SMGR_ID, RM_XACT_ID};
        use crate::walredo::derive::{parse_xact_abort, parse_xact_commit, RecordName};
        let (lsn, info, data) = (rec.end_lsn, rec.header.info, rec.main_data());
        let node_at = |d: &[u8], at: usize| -> Option<RelFileNode> {
            let u = |o: usize| d.get(at + o..at + o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
            Some(RelFileNode { spcnode: u(0)?, dbnode: u(4)?, relnode: u(8)? })
        };
        match rec.header.rmid {
            RM_SMGR_ID => match info & 0xF0 {
                XLOG_SMGR_CREATE => {
                    // xl_smgr_create: RelFileNode | ForkNumber (i32)
                    let fork = data.get(12..16).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")));
                    if let (Some(node), Some(Ok(fork))) =
                        (node_at(data, 0), fork.map(|f| ForkNumber::try_from(f as u8)))
                    {
                        self.set_size(repo, RelTag { node, fork }, Some(0), lsn);
                    }
                }
                XLOG_SMGR_TRUNCATE => {
                    // xl_smgr_truncate: BlockNumber | RelFileNode | int flags
                    let blkno = data.get(0..4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                    let flags = data.get(16..20).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                    if let (Some(blkno), Some(node), Some(flags)) = (blkno, node_at(data, 4), flags) {
                        if flags & SMGR_TRUNCATE_HEAP != 0 {
                            self.set_size(repo, RelTag { node, fork: ForkNumber::Main }, Some(blkno), lsn);
                        }
                        if flags & SMGR_TRUNCATE_VM != 0 {
                            let partial = blkno % HEAP_BLOCKS_PER_VM_PAGE != 0;
                            let vm = blkno / HEAP_BLOCKS_PER_VM_PAGE + u32::from(partial);
                            let rel = RelTag { node, fork: ForkNumber::VisibilityMap };
                            if let Some(n) = self.current_size(repo, rel, lsn) {
                                if partial && vm <= n {
                                    // The boundary page keeps only the bits of remaining blocks.
                                    let mut b = Vec::new();
                                    NativeRecord::TruncateVisibilityMap { heap_blocks: blkno }.encode(&mut b);
                                    let tag = BufferTag { rel, blkno: vm - 1 };
                                    repo.put(Key::rel_block(&tag), lsn, Value::Native(Bytes::from(b)));
                                }
                                if n > vm {
                                    self.set_size(repo, rel, Some(vm), lsn);
                                }
                            }
                        }
                    }
                }
                _ => {}
            },
            RM_XACT_ID => {
                let name = RecordName::of(rec.header.rmid, info, rec.lsn);
                let parsed = match info & XLOG_XACT_OPMASK {
                    XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED => Some(parse_xact_commit(info, data, name)?),
                    XLOG_XACT_ABORT | XLOG_XACT_ABORT_PREPARED => Some(parse_xact_abort(info, data, name)?),
                    _ => None,
                };
                for node in parsed.iter().flat_map(|p| p.relfilenodes()) {
                    for fork in ForkNumber::ALL {
                        let rel = RelTag { node, fork };
                        if self.current_size(repo, rel, lsn).is_some() {
                            self.set_size(repo, rel, None, lsn);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The size of a fork as of the records filed so far (consulting the store after a restart).
    fn current_size(&mut self, repo: &Repository, rel: RelTag, lsn: neon_types::Lsn) -> Option<u32> {
        if let Some(n) = self.sizes.get(&rel) {
            return Some(*n);
        }
        let stored = super::reconstruct::rel_size(repo, &rel, lsn).ok().flatten();
        if let Some(n) = stored {
            self.sizes.insert(rel, n);
        }
        stored
    }

    /// Files a new size (`None`: the fork no longer exists).
    fn set_size(&mut self, repo: &mut Repository, rel: RelTag, size: Option<u32>, lsn: neon_types::Lsn) {
        let value = match size {
            Some(n) => {
                self.sizes.insert(rel, n);
                Bytes::copy_from_slice(&n.to_le_bytes())
            }
            None => {
                self.sizes.remove(&rel);
                Bytes::new()
            }
        };
        repo.put(Key::rel_size(&rel), lsn, Value::Image(value));
    }

    fn grow(&mut self, repo: &mut Repository, rel: RelTag, blkno: u32, lsn: neon_types::Lsn) {
        let size = self.current_size(repo, rel, lsn).unwrap_or(0);
        if blkno + 1 > size {
            self.set_size(repo, rel, Some(blkno + 1), lsn);
        }
    }
}
