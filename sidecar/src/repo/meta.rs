//! Cluster metadata in the page store: what a data directory needs besides relation pages,
//! each a key with an image value per LSN at which it changed (an empty image: gone).
//!
//! ```text
//! item                 key                              value
//! database             meta(DATABASE, db)               DatabaseEntry (below) | empty: dropped
//! relation map         meta(RELMAP, db, spc)            the pg_filenode.map file (512 bytes)
//! two-phase state      meta(TWOPHASE, xid)              the state file's body (the PREPARE
//!                                                       record's main data) | empty: finished
//! checkpoint counters  meta(CHECKPOINT)                 CheckPoint (wal::checkpoint)
//! control file         meta(CONTROL)                    the compute's pg_control at import
//! config file          meta(CONFIG, which)              pg_hba.conf (0) / pg_ident.conf (1)
//!                                                       at import
//! SLRU page            slru_page(slru, pageno)          page image, native records | empty:
//!                                                       the segment was truncated away
//!
//! DatabaseEntry: spcnode u32 | copied u8 | src spcnode u32 | src db u32 | copy lsn u64
//! ```
//!
//! A database made by `CREATE DATABASE … STRATEGY FILE_COPY` copied the source database's
//! files as they were at the copy record. Rather than copying every page into the store, the
//! entry remembers the source and the LSN: a relation of the copy without values of its own
//! since then reads as the source's relation at that LSN (see `reconstruct`).

use super::key::{Key, KIND_REL_SIZE, KIND_SLRU_PAGE};
use super::timeline::{RepoError, Timeline};
use super::value::Value;
use crate::wal::checkpoint::CheckPoint;
use bytes::Bytes;
use neon_types::{ForkNumber, Lsn, RelFileNode, RelTag, TransactionId};
use std::collections::BTreeMap;

pub const META_DATABASE: u32 = 1;
pub const META_RELMAP: u32 = 2;
pub const META_TWOPHASE: u32 = 3;
pub const META_CHECKPOINT: u32 = 4;
pub const META_CONTROL: u32 = 5;
pub const META_CONFIG: u32 = 6;

/// Configuration files kept from the import, by `META_CONFIG` index.
pub const CONFIG_FILES: [&str; 2] = ["pg_hba.conf", "pg_ident.conf"];

/// SLRUs, as numbered in [`Key::slru_page`].
pub const SLRU_CLOG: u32 = 0;
pub const SLRU_MULTIXACT_OFFSETS: u32 = 1;
pub const SLRU_MULTIXACT_MEMBERS: u32 = 2;

pub const DEFAULTTABLESPACE_OID: u32 = 1663;
pub const GLOBALTABLESPACE_OID: u32 = 1664;

/// A database as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseEntry {
    pub dbnode: u32,
    pub spcnode: u32,
    /// FILE_COPY: (source tablespace, source database, LSN of the copy).
    pub copied_from: Option<(u32, u32, Lsn)>,
}

impl DatabaseEntry {
    pub fn encode(&self) -> Bytes {
        let mut b = Vec::with_capacity(21);
        b.extend_from_slice(&self.spcnode.to_le_bytes());
        let (copied, (spc, db, lsn)) = match self.copied_from {
            Some(c) => (1u8, c),
            None => (0, (0, 0, Lsn(0))),
        };
        b.push(copied);
        b.extend_from_slice(&spc.to_le_bytes());
        b.extend_from_slice(&db.to_le_bytes());
        b.extend_from_slice(&lsn.0.to_le_bytes());
        Bytes::from(b)
    }

    fn decode(dbnode: u32, b: &[u8]) -> Option<DatabaseEntry> {
        if b.len() != 21 {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let copied_from =
            (b[4] != 0).then(|| (u32_at(5), u32_at(9), Lsn(u64::from_le_bytes(b[13..21].try_into().expect("8")))));
        Some(DatabaseEntry { dbnode, spcnode: u32_at(0), copied_from })
    }
}

fn image(values: Vec<(Lsn, Value)>) -> Option<Bytes> {
    match values.into_iter().last() {
        Some((_, Value::Image(b))) if !b.is_empty() => Some(b),
        _ => None,
    }
}

/// The database `dbnode` at `lsn`, if it exists then.
pub fn database(repo: &Timeline, dbnode: u32, lsn: Lsn) -> Result<Option<DatabaseEntry>, RepoError> {
    let b = image(repo.values_for(Key::meta(META_DATABASE, dbnode), lsn)?);
    Ok(b.and_then(|b| DatabaseEntry::decode(dbnode, &b)))
}

/// Every database at `lsn`.
pub fn list_databases(repo: &Timeline, lsn: Lsn) -> Result<Vec<DatabaseEntry>, RepoError> {
    let range = Key::meta(META_DATABASE, 0)..Key::meta(META_DATABASE + 1, 0);
    Ok(repo
        .latest_in_range(range, lsn)?
        .into_iter()
        .filter_map(|(k, (_, v))| match v {
            Value::Image(b) => DatabaseEntry::decode(k.field2, &b),
            _ => None,
        })
        .collect())
}

/// The relation forks of database `dbnode` (0: the shared catalogs) at `lsn`, with their sizes
/// in blocks, including those a FILE_COPY database inherited from its source.
pub fn list_relations(repo: &Timeline, dbnode: u32, lsn: Lsn) -> Result<BTreeMap<RelTag, u32>, RepoError> {
    let mut out = BTreeMap::new();
    let db = match dbnode {
        0 => None,
        _ => match database(repo, dbnode, lsn)? {
            Some(db) => Some(db),
            None => return Ok(out),
        },
    };
    let spc = match &db {
        None => GLOBALTABLESPACE_OID,
        Some(db) => {
            if let Some((src_spc, src_db, at)) = db.copied_from {
                // Inherited relations, unless the copy has its own history for them since.
                for (rel, n) in list_relations(repo, src_db, at)? {
                    if rel.node.spcnode == src_spc {
                        let mine = RelTag {
                            node: RelFileNode { spcnode: db.spcnode, dbnode, relnode: rel.node.relnode },
                            ..rel
                        };
                        out.insert(mine, n);
                    }
                }
            }
            db.spcnode
        }
    };
    let copy_lsn = db.and_then(|d| d.copied_from).map(|c| c.2);
    let node = RelFileNode { spcnode: spc, dbnode, relnode: 0 };
    let lo = Key::rel_size(&RelTag { node, fork: ForkNumber::Main });
    let hi = match dbnode.checked_add(1) {
        Some(next) => Key { field2: next, ..lo },
        None => Key { field1: spc + 1, field2: 0, ..lo },
    };
    for (k, (at, v)) in repo.latest_in_range(lo..hi, lsn)? {
        if k.kind != KIND_REL_SIZE || copy_lsn.is_some_and(|c| at < c) {
            continue;
        }
        let Ok(fork) = ForkNumber::try_from(k.field4) else { continue };
        let rel = RelTag { node: RelFileNode { spcnode: k.field1, dbnode: k.field2, relnode: k.field3 }, fork };
        match v {
            Value::Image(b) if b.len() == 4 => {
                out.insert(rel, u32::from_le_bytes(b[..].try_into().expect("4 bytes")));
            }
            _ => {
                out.remove(&rel);
            }
        }
    }
    Ok(out)
}

/// The relation map file of database `dbnode` in tablespace `spcnode` (0/1664: the shared
/// one) at `lsn`.
pub fn relmap(repo: &Timeline, dbnode: u32, spcnode: u32, lsn: Lsn) -> Result<Option<Bytes>, RepoError> {
    let mut key = Key::meta(META_RELMAP, dbnode);
    key.field3 = spcnode;
    if let Some(b) = image(repo.values_for(key, lsn)?) {
        return Ok(Some(b));
    }
    match database(repo, dbnode, lsn)?.and_then(|d| d.copied_from) {
        Some((src_spc, src_db, at)) => relmap(repo, src_db, src_spc, at),
        None => Ok(None),
    }
}

/// Prepared transactions at `lsn`: xid and the body of their state file.
pub fn twophase_states(repo: &Timeline, lsn: Lsn) -> Result<Vec<(TransactionId, Bytes)>, RepoError> {
    let range = Key::meta(META_TWOPHASE, 0)..Key::meta(META_TWOPHASE + 1, 0);
    Ok(repo
        .latest_in_range(range, lsn)?
        .into_iter()
        .filter_map(|(k, (_, v))| match v {
            Value::Image(b) if !b.is_empty() => Some((k.field2, b)),
            _ => None,
        })
        .collect())
}

/// The checkpoint counters at `lsn`.
pub fn checkpoint(repo: &Timeline, lsn: Lsn) -> Result<Option<CheckPoint>, RepoError> {
    Ok(image(repo.values_for(Key::meta(META_CHECKPOINT, 0), lsn)?).and_then(|b| CheckPoint::decode(&b).ok()))
}

/// The pages of SLRU `slru` that exist at `lsn`.
pub fn slru_pages(repo: &Timeline, slru: u32, lsn: Lsn) -> Result<Vec<u32>, RepoError> {
    let range = Key::slru_page(slru, 0)..Key::slru_page(slru + 1, 0);
    Ok(repo
        .latest_in_range(range, lsn)?
        .into_iter()
        .filter(|(k, (_, v))| k.kind == KIND_SLRU_PAGE && !matches!(v, Value::Image(b) if b.is_empty()))
        .map(|(k, _)| k.field5)
        .collect())
}

/// The compute's control file as imported (its settings and constants), if the store has one.
pub fn control_template(repo: &Timeline, lsn: Lsn) -> Result<Option<Bytes>, RepoError> {
    Ok(image(repo.values_for(Key::meta(META_CONTROL, 0), lsn)?))
}

/// Configuration file `CONFIG_FILES[which]` as imported.
pub fn config_file(repo: &Timeline, which: u32, lsn: Lsn) -> Result<Option<Bytes>, RepoError> {
    Ok(image(repo.values_for(Key::meta(META_CONFIG, which), lsn)?))
}

/// Whether the compute's control file, as imported, says it has data checksums (redo then
/// behaves as it does there).
pub fn compute_has_checksums(repo: &Timeline) -> bool {
    control_template(repo, repo.last_lsn())
        .ok()
        .flatten()
        .and_then(|t| crate::basebackup::control::info(&t).ok())
        .is_some_and(|i| i.data_checksums)
}
