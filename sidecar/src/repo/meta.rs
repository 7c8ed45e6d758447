//! Cluster metadata in the page store: what a data directory needs besides relation pages,
//! each a key with an image value per LSN at which it changed (an empty image: gone).
//!
//! ```text
//! item                 key                              value
//! database             meta(DATABASE, db)               its default tablespace: spcnode u32 |
//!                                                       empty: dropped
//! database copy        meta(DB_COPY, db, spc)           CopySource (below) | empty: the
//!                                                       database's directory in spc dropped
//! tablespace           meta(TABLESPACE, spc)            1 u8 | its location (UTF-8; empty: in
//!                                                       place) | empty: dropped
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
//! CopySource: src spcnode u32 | src db u32 | copy lsn u64
//! ```
//!
//! `CREATE DATABASE … STRATEGY FILE_COPY` copies the source database's directories as they were
//! at the copy record, one record per tablespace the source has files in; `ALTER DATABASE … SET
//! TABLESPACE` is such a copy of the database onto itself, then the old directory dropped.
//! Rather than copying every page into the store, a copy source per (database, tablespace)
//! remembers where from and when: a relation there without values of its own since then reads
//! as the source's relation at that LSN (see `reconstruct`).

use super::key::{Key, KIND_REL_SIZE, KIND_SLRU_PAGE};
use super::timeline::{RepoError, Timeline};
use super::value::Value;
use crate::wal::checkpoint::CheckPoint;
use bytes::Bytes;
use neon_types::{ForkNumber, Lsn, RelFileNode, RelTag, TransactionId};
use std::collections::{BTreeMap, BTreeSet};

pub const META_DATABASE: u32 = 1;
pub const META_RELMAP: u32 = 2;
pub const META_TWOPHASE: u32 = 3;
pub const META_CHECKPOINT: u32 = 4;
pub const META_CONTROL: u32 = 5;
pub const META_CONFIG: u32 = 6;
pub const META_TABLESPACE: u32 = 7;
pub const META_DB_COPY: u32 = 8;

/// Configuration files kept from the import, by `META_CONFIG` index.
pub const CONFIG_FILES: [&str; 2] = ["pg_hba.conf", "pg_ident.conf"];

/// SLRUs, as numbered in [`Key::slru_page`].
pub const SLRU_CLOG: u32 = 0;
pub const SLRU_MULTIXACT_OFFSETS: u32 = 1;
pub const SLRU_MULTIXACT_MEMBERS: u32 = 2;

pub const DEFAULTTABLESPACE_OID: u32 = 1663;
pub const GLOBALTABLESPACE_OID: u32 = 1664;
/// `TABLESPACE_VERSION_DIRECTORY` of PostgreSQL 15 (catversion 202209061).
pub const TABLESPACE_VERSION_DIRECTORY: &str = "PG_15_202209061";

/// Where the files of database `dbnode` (0: the shared catalogs) in tablespace `spcnode` are,
/// relative to the data directory.
pub fn database_path(spcnode: u32, dbnode: u32) -> String {
    match spcnode {
        GLOBALTABLESPACE_OID => "global".to_string(),
        DEFAULTTABLESPACE_OID => format!("base/{dbnode}"),
        spc => format!("pg_tblspc/{spc}/{TABLESPACE_VERSION_DIRECTORY}/{dbnode}"),
    }
}

/// A database as the store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseEntry {
    pub dbnode: u32,
    /// Its default tablespace (where its relation map and `PG_VERSION` are).
    pub spcnode: u32,
}

impl DatabaseEntry {
    pub fn encode(&self) -> Bytes {
        Bytes::copy_from_slice(&self.spcnode.to_le_bytes())
    }

    fn decode(dbnode: u32, b: &[u8]) -> Option<DatabaseEntry> {
        Some(DatabaseEntry { dbnode, spcnode: u32::from_le_bytes(b.try_into().ok()?) })
    }
}

/// Where a database's directory in one tablespace was copied from (FILE_COPY).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySource {
    pub spcnode: u32,
    pub dbnode: u32,
    /// The copy record's start: the source as it was then.
    pub lsn: Lsn,
}

impl CopySource {
    pub fn encode(&self) -> Bytes {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&self.spcnode.to_le_bytes());
        b.extend_from_slice(&self.dbnode.to_le_bytes());
        b.extend_from_slice(&self.lsn.0.to_le_bytes());
        Bytes::from(b)
    }

    fn decode(b: &[u8]) -> Option<CopySource> {
        if b.len() != 16 {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Some(CopySource {
            spcnode: u32_at(0),
            dbnode: u32_at(4),
            lsn: Lsn(u64::from_le_bytes(b[8..].try_into().ok()?)),
        })
    }
}

/// A key of a per-(database, tablespace) item.
pub fn db_spc_key(item: u32, dbnode: u32, spcnode: u32) -> Key {
    let mut key = Key::meta(item, dbnode);
    key.field3 = spcnode;
    key
}

/// The value of a tablespace that exists at `location` (empty: in place).
pub fn tablespace_value(location: &str) -> Bytes {
    let mut b = vec![1u8];
    b.extend_from_slice(location.as_bytes());
    Bytes::from(b)
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

/// Where database `dbnode`'s directory in tablespace `spcnode` was copied from, if it was (and
/// has not been dropped since).
pub fn copy_source(repo: &Timeline, dbnode: u32, spcnode: u32, lsn: Lsn) -> Result<Option<CopySource>, RepoError> {
    if dbnode == 0 {
        return Ok(None);
    }
    let b = image(repo.values_for(db_spc_key(META_DB_COPY, dbnode, spcnode), lsn)?);
    Ok(b.and_then(|b| CopySource::decode(&b)))
}

/// The tablespaces created by users (not `pg_default`, `pg_global`) at `lsn`, with their
/// locations (empty: in place).
pub fn tablespaces(repo: &Timeline, lsn: Lsn) -> Result<BTreeMap<u32, String>, RepoError> {
    let range = Key::meta(META_TABLESPACE, 0)..Key::meta(META_TABLESPACE + 1, 0);
    Ok(repo
        .latest_in_range(range, lsn)?
        .into_iter()
        .filter_map(|(k, (_, v))| match v {
            Value::Image(b) if b.first() == Some(&1) => Some((k.field2, String::from_utf8_lossy(&b[1..]).into_owned())),
            _ => None,
        })
        .collect())
}

/// The relation forks of database `dbnode` (0: the shared catalogs) at `lsn`, with their sizes
/// in blocks, in every tablespace, including those inherited from a FILE_COPY's source.
pub fn list_relations(repo: &Timeline, dbnode: u32, lsn: Lsn) -> Result<BTreeMap<RelTag, u32>, RepoError> {
    if dbnode == 0 {
        return relations_in(repo, GLOBALTABLESPACE_OID, 0, lsn);
    }
    let Some(db) = database(repo, dbnode, lsn)? else { return Ok(BTreeMap::new()) };
    let mut spcs: BTreeSet<u32> = tablespaces(repo, lsn)?.into_keys().collect();
    spcs.extend([DEFAULTTABLESPACE_OID, db.spcnode]);
    let mut out = BTreeMap::new();
    for spc in spcs {
        out.extend(relations_in(repo, spc, dbnode, lsn)?);
    }
    Ok(out)
}

/// The relation forks of database `dbnode` in tablespace `spcnode` at `lsn`.
pub fn relations_in(repo: &Timeline, spcnode: u32, dbnode: u32, lsn: Lsn) -> Result<BTreeMap<RelTag, u32>, RepoError> {
    let mut out = BTreeMap::new();
    let copy = copy_source(repo, dbnode, spcnode, lsn)?;
    if let Some(src) = copy {
        // Inherited relations, unless the copy has its own history for them since.
        for (rel, n) in relations_in(repo, src.spcnode, src.dbnode, src.lsn)? {
            out.insert(RelTag { node: RelFileNode { spcnode, dbnode, relnode: rel.node.relnode }, ..rel }, n);
        }
    }
    let node = RelFileNode { spcnode, dbnode, relnode: 0 };
    let lo = Key::rel_size(&RelTag { node, fork: ForkNumber::Main });
    let hi = match dbnode.checked_add(1) {
        Some(next) => Key { field2: next, ..lo },
        None => Key { field1: spcnode + 1, field2: 0, ..lo },
    };
    for (k, (at, v)) in repo.latest_in_range(lo..hi, lsn)? {
        // Values older than the copy are an earlier database's of the same OID.
        if k.kind != KIND_REL_SIZE || copy.is_some_and(|c| at < c.lsn) {
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
    if let Some(b) = image(repo.values_for(db_spc_key(META_RELMAP, dbnode, spcnode), lsn)?) {
        return Ok(Some(b));
    }
    match copy_source(repo, dbnode, spcnode, lsn)? {
        Some(src) => relmap(repo, src.dbnode, src.spcnode, src.lsn),
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
