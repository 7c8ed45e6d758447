//! Importing a stopped cluster's data files as page images at one LSN — its last (shutdown)
//! checkpoint — so that history starts there with everything the cluster already has:
//!
//! * relation files `base/<db>/<relfilenode>[_fork][.segment]` (tablespace 1663),
//!   `global/<relfilenode>…` (tablespace 1664, database 0) and
//!   `pg_tblspc/<oid>/PG_15_202209061/<db>/…` (the tablespaces users made). Free-space maps
//!   are left out: they are not WAL-logged, so the store could never keep them current;
//! * tablespaces (`pg_tblspc/<oid>`: where they link to), databases (their directory with
//!   `PG_VERSION` says which tablespace is their default) and relation maps
//!   (`pg_filenode.map`, and the shared one in `global/`);
//! * SLRU pages: `pg_xact`, `pg_multixact/offsets`, `pg_multixact/members` (segment files of
//!   32 pages named by 4+ hex digits);
//! * two-phase state files (`pg_twophase/<xid>`: body and CRC32C);
//! * the checkpoint counters from `global/pg_control`, and the file itself with `pg_hba.conf`
//!   and `pg_ident.conf` (base backups start from them).

use super::key::Key;
use super::meta::{self, DatabaseEntry, DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID};
use super::timeline::Timeline;
use super::value::Value;
use crate::wal::checkpoint::{CheckPoint, CONTROL_CHECKPOINT_COPY, SIZEOF_CHECKPOINT};
use crate::walredo::native::SLRU_PAGES_PER_SEGMENT;
use bytes::Bytes;
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
/// Blocks per 1 GB segment file (`RELSEG_SIZE`).
const RELSEG_BLOCKS: u64 = 131072;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("importing {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("importing {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// What an import brought in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportStats {
    pub relation_forks: usize,
    pub pages: usize,
    pub databases: usize,
    pub slru_pages: usize,
    pub prepared_transactions: usize,
    pub tablespaces: usize,
}

/// `relfilenode[_fork][.segment]`, or `None` for files that are not relation data.
fn parse_rel_file(name: &str) -> Option<(u32, ForkNumber, u64)> {
    let (base, seg) = match name.split_once('.') {
        Some((b, s)) => (b, s.parse().ok()?),
        None => (name, 0),
    };
    let (num, fork) = match base.split_once('_') {
        Some((n, f)) => (n, f.parse().ok()?),
        None => (base, ForkNumber::Main),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((num.parse().ok()?, fork, seg))
}

/// Files every page of the cluster in `pgdata` (stopped cleanly at `lsn`) as an image at `lsn`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Io { path: path.to_path_buf(), source }
}

/// Files every page of the cluster in `pgdata` (stopped cleanly at `lsn`) as an image at
/// `lsn`, with its databases, tablespaces, relation maps, SLRU pages, two-phase state and
/// counters. A tablespace's location is where `pg_tblspc/<oid>` links to, or as given in
/// `locations` (a base backup unpacks tablespaces in place).
pub fn import_datadir(
    repo: &Timeline,
    pgdata: &Path,
    lsn: Lsn,
    locations: &BTreeMap<u32, String>,
) -> Result<ImportStats, ImportError> {
    let mut dirs: Vec<(PathBuf, u32, u32)> = vec![(pgdata.join("global"), GLOBALTABLESPACE_OID, 0)];
    let mut databases = |dir: &Path, spcnode: u32| -> Result<(), ImportError> {
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            if let Ok(db) = e.file_name().to_string_lossy().parse::<u32>() {
                dirs.push((e.path(), spcnode, db));
            }
        }
        Ok(())
    };
    databases(&pgdata.join("base"), DEFAULTTABLESPACE_OID)?;
    repo.begin_history(lsn);
    let tblspc = pgdata.join("pg_tblspc");
    let mut tablespaces = 0;
    for e in std::fs::read_dir(&tblspc).map_err(io(&tblspc))? {
        let e = e.map_err(io(&tblspc))?;
        let Ok(oid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let location = match locations.get(&oid) {
            Some(l) => l.clone(),
            // A symbolic link to its location, or a directory in place.
            None => std::fs::read_link(e.path()).map(|l| l.display().to_string()).unwrap_or_default(),
        };
        repo.put(Key::meta(meta::META_TABLESPACE, oid), lsn, Value::Image(meta::tablespace_value(&location)));
        tablespaces += 1;
        let version_dir = e.path().join(meta::TABLESPACE_VERSION_DIRECTORY);
        if version_dir.is_dir() {
            databases(&version_dir, oid)?;
        }
    }
    let mut stats = import_relations(repo, &dirs, lsn)?;
    stats.tablespaces = tablespaces;
    for (dir, spcnode, dbnode) in &dirs {
        // A database's directory in its default tablespace is the one with PG_VERSION.
        if *dbnode != 0 && dir.join("PG_VERSION").exists() {
            let entry = DatabaseEntry { dbnode: *dbnode, spcnode: *spcnode };
            repo.put(Key::meta(meta::META_DATABASE, *dbnode), lsn, Value::Image(entry.encode()));
            stats.databases += 1;
        }
        let map = dir.join("pg_filenode.map");
        if map.exists() {
            let key = meta::db_spc_key(meta::META_RELMAP, *dbnode, *spcnode);
            repo.put(key, lsn, Value::Image(Bytes::from(std::fs::read(&map).map_err(io(&map))?)));
        }
    }
    for (slru, dir) in [
        (meta::SLRU_CLOG, "pg_xact"),
        (meta::SLRU_MULTIXACT_OFFSETS, "pg_multixact/offsets"),
        (meta::SLRU_MULTIXACT_MEMBERS, "pg_multixact/members"),
    ] {
        stats.slru_pages += import_slru(repo, slru, &pgdata.join(dir), lsn)?;
    }
    stats.prepared_transactions = import_twophase(repo, &pgdata.join("pg_twophase"), lsn)?;
    let control = pgdata.join("global/pg_control");
    let b = std::fs::read(&control).map_err(io(&control))?;
    let cp = b
        .get(CONTROL_CHECKPOINT_COPY..CONTROL_CHECKPOINT_COPY + SIZEOF_CHECKPOINT)
        .and_then(|c| CheckPoint::decode(c).ok())
        .ok_or_else(|| ImportError::Invalid { path: control.clone(), what: "too short for pg_control".into() })?;
    repo.put(Key::meta(meta::META_CHECKPOINT, 0), lsn, Value::Image(Bytes::copy_from_slice(&cp.encode())));
    // Base backups start from the compute's own control file and access rules.
    repo.put(Key::meta(meta::META_CONTROL, 0), lsn, Value::Image(Bytes::from(b)));
    for (which, name) in meta::CONFIG_FILES.iter().enumerate() {
        if let Ok(text) = std::fs::read(pgdata.join(name)) {
            repo.put(Key::meta(meta::META_CONFIG, which as u32), lsn, Value::Image(Bytes::from(text)));
        }
    }
    repo.advance(lsn);
    Ok(stats)
}

fn import_slru(repo: &Timeline, slru: u32, dir: &Path, lsn: Lsn) -> Result<usize, ImportError> {
    let mut pages = 0;
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(segno) = u32::from_str_radix(&name, 16) else { continue };
        if name.len() < 4 {
            continue;
        }
        let path = e.path();
        let data = Bytes::from(std::fs::read(&path).map_err(io(&path))?);
        if data.len() % BLCKSZ != 0 || data.len() > BLCKSZ * SLRU_PAGES_PER_SEGMENT as usize {
            return Err(ImportError::Invalid { path, what: format!("{} bytes is not an SLRU segment", data.len()) });
        }
        for (i, at) in (0..data.len()).step_by(BLCKSZ).enumerate() {
            let pageno = segno * SLRU_PAGES_PER_SEGMENT + i as u32;
            repo.put(Key::slru_page(slru, pageno), lsn, Value::Image(data.slice(at..at + BLCKSZ)));
            pages += 1;
        }
    }
    Ok(pages)
}

fn import_twophase(repo: &Timeline, dir: &Path, lsn: Lsn) -> Result<usize, ImportError> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(xid) = u32::from_str_radix(&name, 16) else { continue };
        let path = e.path();
        let b = std::fs::read(&path).map_err(io(&path))?;
        let crc_ok = b.len() >= 4 && {
            let (body, crc) = b.split_at(b.len() - 4);
            crc32c::crc32c(body) == u32::from_le_bytes(crc.try_into().expect("4 bytes"))
        };
        if !crc_ok {
            return Err(ImportError::Invalid { path, what: "two-phase state file fails its CRC".into() });
        }
        repo.put(Key::meta(meta::META_TWOPHASE, xid), lsn, Value::Image(Bytes::copy_from_slice(&b[..b.len() - 4])));
        n += 1;
    }
    Ok(n)
}

fn import_relations(repo: &Timeline, dirs: &[(PathBuf, u32, u32)], lsn: Lsn) -> Result<ImportStats, ImportError> {
    // Per fork: its segment files, in order.
    let mut forks: BTreeMap<RelTag, BTreeMap<u64, PathBuf>> = BTreeMap::new();
    for (dir, spcnode, dbnode) in dirs.iter().cloned() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let Some((relnode, fork, seg)) = parse_rel_file(&e.file_name().to_string_lossy()) else { continue };
            if fork == ForkNumber::Fsm {
                continue;
            }
            let rel = RelTag { node: RelFileNode { spcnode, dbnode, relnode }, fork };
            forks.entry(rel).or_default().insert(seg, e.path());
        }
    }
    let mut stats = ImportStats::default();
    for (rel, segments) in forks {
        let mut nblocks = 0u64;
        for (seg, path) in segments {
            if seg * RELSEG_BLOCKS != nblocks {
                return Err(ImportError::Invalid { path, what: format!("segment {seg} follows {nblocks} blocks") });
            }
            let data = std::fs::read(&path).map_err(io(&path))?;
            if data.len() % BLCKSZ != 0 {
                return Err(ImportError::Invalid {
                    path,
                    what: format!("{} bytes is not a whole number of pages", data.len()),
                });
            }
            let data = Bytes::from(data);
            for (i, page) in (0..data.len()).step_by(BLCKSZ).enumerate() {
                let tag = BufferTag { rel, blkno: (nblocks + i as u64) as u32 };
                repo.put(Key::rel_block(&tag), lsn, Value::Image(data.slice(page..page + BLCKSZ)));
                stats.pages += 1;
            }
            nblocks += (data.len() / BLCKSZ) as u64;
        }
        repo.put(Key::rel_size(&rel), lsn, Value::Image(Bytes::copy_from_slice(&(nblocks as u32).to_le_bytes())));
        stats.relation_forks += 1;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        assert_eq!(parse_rel_file("16384"), Some((16384, ForkNumber::Main, 0)));
        assert_eq!(parse_rel_file("16384_vm"), Some((16384, ForkNumber::VisibilityMap, 0)));
        assert_eq!(parse_rel_file("16384_init"), Some((16384, ForkNumber::Init, 0)));
        assert_eq!(parse_rel_file("16384.2"), Some((16384, ForkNumber::Main, 2)));
        assert_eq!(parse_rel_file("16384_fsm.1"), Some((16384, ForkNumber::Fsm, 1)));
        for not in ["PG_VERSION", "pg_filenode.map", "pg_internal.init", "t3_16384", "16384_xyz", "16384.x", ""] {
            assert_eq!(parse_rel_file(not), None, "{not}");
        }
    }
}
