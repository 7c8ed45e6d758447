//! From decoded WAL records to page-store values: for every block a record references, either
//! the restored full-page image or the record itself (marked `will_init` when redo needs no
//! earlier page), keyed by the record's end LSN; the Rust-native visibility-map records
//! derived from heap records; and relation sizes, which grow with the highest block
//! referenced (extending a relation is not WAL-logged).
//!
//! Not yet interpreted here (later work): relation truncation and drops, databases, relmaps,
//! SLRU pages, two-phase state and checkpoint counters.

use super::key::Key;
use super::store::Repository;
use super::value::Value;
use crate::wal::record::DecodedRecord;
use crate::walredo::derive::native_records;
use crate::walredo::native::NativeTarget;
use bytes::Bytes;
use neon_types::{RelTag, BLCKSZ};
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

    fn grow(&mut self, repo: &mut Repository, rel: RelTag, blkno: u32, lsn: neon_types::Lsn) {
        // After a restart the sizes come back from the store itself.
        let size = self
            .sizes
            .entry(rel)
            .or_insert_with(|| super::reconstruct::rel_size(repo, &rel, lsn).ok().flatten().unwrap_or(0));
        if blkno + 1 > *size {
            *size = blkno + 1;
            repo.put(Key::rel_size(&rel), lsn, Value::Image(Bytes::copy_from_slice(&size.to_le_bytes())));
        }
    }
}
