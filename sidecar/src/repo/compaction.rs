//! Keeping reconstruction cheap and history bounded.
//!
//! * Long chains: ingest counts, per page key (relation block or SLRU page), the values filed
//!   since its last image or `will_init` record ([`ChainTracker`]). Keys that reach the limit
//!   are rebuilt at a durable LSN and written together as an image layer
//!   ([`image_keys`]), so no read replays more than about `limit` records.
//! * Retention: [`full_image`] materialises every key live at an LSN — every page of every
//!   relation fork of every database, the SLRU pages and the metadata — as a full image layer;
//!   [`Timeline::collect_garbage`] can then drop every layer older than it once it falls
//!   behind the retention horizon.

use super::key::{Key, KIND_REL_BLOCK, KIND_SLRU_PAGE};
use super::meta::META_TWOPHASE;
use super::meta::{self, META_CHECKPOINT, META_CONFIG, META_CONTROL, META_DATABASE, META_RELMAP, META_TABLESPACE};
use super::reconstruct::{get_page, get_slru_page, GetPageError};
use super::timeline::{RepoError, Timeline};
use super::value::Value;
use crate::walredo::WalRedoManager;
use bytes::Bytes;
use neon_types::{BufferTag, Lsn};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum CompactionError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("making an image of {key} at {lsn}: {source}")]
    Page { key: Key, lsn: Lsn, source: GetPageError },
}

/// Counts values per page key since its last image, during ingest.
#[derive(Debug)]
pub struct ChainTracker {
    limit: u32,
    lengths: HashMap<Key, u32>,
    long: Vec<Key>,
}

impl ChainTracker {
    pub fn new(limit: u32) -> ChainTracker {
        ChainTracker { limit: limit.max(2), lengths: HashMap::new(), long: Vec::new() }
    }

    /// Notes a value filed for `key`.
    pub fn note(&mut self, key: Key, value: &Value) {
        if key.kind != KIND_REL_BLOCK && key.kind != KIND_SLRU_PAGE {
            return;
        }
        if value.will_init() {
            self.lengths.remove(&key);
            return;
        }
        let n = self.lengths.entry(key).or_insert(0);
        *n += 1;
        if *n >= self.limit {
            self.lengths.remove(&key);
            self.long.push(key);
        }
    }

    /// Keys taken with [`ChainTracker::take_long`] and not handled after all.
    pub fn give_back(&mut self, mut keys: Vec<Key>) {
        keys.append(&mut self.long);
        self.long = keys;
    }

    /// The keys whose chains reached the limit since the last call.
    pub fn take_long(&mut self) -> Vec<Key> {
        std::mem::take(&mut self.long)
    }
}

fn image_of(repo: &Timeline, redo: &dyn WalRedoManager, key: Key, lsn: Lsn) -> Result<Option<Bytes>, CompactionError> {
    let page = match key.kind {
        KIND_REL_BLOCK => {
            let tag: BufferTag = key.buffer_tag().expect("a block key");
            get_page(repo, redo, tag, lsn)
        }
        _ => get_slru_page(repo, key.field1, key.field5, lsn),
    };
    match page {
        Ok(p) => Ok(Some(Bytes::copy_from_slice(&p[..]))),
        // Gone by then (dropped, truncated): nothing to image.
        Err(GetPageError::NoSuchPage { .. } | GetPageError::NoSuchSlruPage { .. }) => Ok(None),
        Err(source) => Err(CompactionError::Page { key, lsn, source }),
    }
}

/// Writes an image layer at `lsn` (durable) for `keys`. Returns the number of images.
pub fn image_keys(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    keys: &[Key],
    lsn: Lsn,
) -> Result<usize, CompactionError> {
    let mut images = BTreeMap::new();
    for key in keys {
        if let Some(b) = image_of(repo, redo, *key, lsn)? {
            images.insert(*key, Value::Image(b));
        }
    }
    if !images.is_empty() {
        repo.add_image_layer(lsn, &images, false)?;
    }
    Ok(images.len())
}

/// Writes a full image layer at `lsn` (durable): everything live then. Returns the number of
/// values written.
pub fn full_image(repo: &Timeline, redo: &dyn WalRedoManager, lsn: Lsn) -> Result<usize, CompactionError> {
    let mut images: BTreeMap<Key, Value> = BTreeMap::new();
    // Metadata: the newest value of every item, unless it says "gone". FILE_COPY sources are
    // not needed after it: everything they read through to is imaged under its own keys.
    let items =
        [META_DATABASE, META_TABLESPACE, META_RELMAP, META_TWOPHASE, META_CHECKPOINT, META_CONTROL, META_CONFIG];
    for item in items {
        for (key, (_, v)) in repo.latest_in_range(Key::meta(item, 0)..Key::meta(item + 1, 0), lsn)? {
            if matches!(&v, Value::Image(b) if !b.is_empty()) {
                images.insert(key, v);
            }
        }
    }
    for slru in [meta::SLRU_CLOG, meta::SLRU_MULTIXACT_OFFSETS, meta::SLRU_MULTIXACT_MEMBERS] {
        for pageno in meta::slru_pages(repo, slru, lsn)? {
            let key = Key::slru_page(slru, pageno);
            if let Some(b) = image_of(repo, redo, key, lsn)? {
                images.insert(key, Value::Image(b));
            }
        }
    }
    let dbs = meta::list_databases(repo, lsn)?;
    // A copied database's relation map, read through to its source: its own now.
    for db in &dbs {
        if let Some(map) = meta::relmap(repo, db.dbnode, db.spcnode, lsn)? {
            images.insert(meta::db_spc_key(META_RELMAP, db.dbnode, db.spcnode), Value::Image(map));
        }
    }
    for db in std::iter::once(0).chain(dbs.iter().map(|d| d.dbnode)) {
        for (rel, nblocks) in meta::list_relations(repo, db, lsn)? {
            images.insert(Key::rel_size(&rel), Value::Image(Bytes::copy_from_slice(&nblocks.to_le_bytes())));
            for blkno in 0..nblocks {
                let key = Key::rel_block(&BufferTag { rel, blkno });
                if let Some(b) = image_of(repo, redo, key, lsn)? {
                    images.insert(key, Value::Image(b));
                }
            }
        }
    }
    repo.add_image_layer(lsn, &images, true)?;
    Ok(images.len())
}
