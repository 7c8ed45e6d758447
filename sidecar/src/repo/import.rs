//! Importing a stopped cluster's data files as page images at one LSN — its last (shutdown)
//! checkpoint — so that history starts there with every relation the cluster already has.
//! Relation files are `base/<db>/<relfilenode>[_fork][.segment]` (tablespace 1663) and
//! `global/<relfilenode>…` (tablespace 1664, database 0). Free-space maps are left out: they
//! are not WAL-logged, so the store could never keep them current.

use super::key::Key;
use super::store::Repository;
use super::value::Value;
use bytes::Bytes;
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DEFAULTTABLESPACE_OID: u32 = 1663;
const GLOBALTABLESPACE_OID: u32 = 1664;
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
pub fn import_datadir(repo: &mut Repository, pgdata: &Path, lsn: Lsn) -> Result<ImportStats, ImportError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError + '_ {
        move |source| ImportError::Io { path: path.to_path_buf(), source }
    }
    let mut dirs: Vec<(PathBuf, u32, u32)> = vec![(pgdata.join("global"), GLOBALTABLESPACE_OID, 0)];
    let base = pgdata.join("base");
    for e in std::fs::read_dir(&base).map_err(io(&base))? {
        let e = e.map_err(io(&base))?;
        if let Ok(db) = e.file_name().to_string_lossy().parse::<u32>() {
            dirs.push((e.path(), DEFAULTTABLESPACE_OID, db));
        }
    }
    // Per fork: its segment files, in order.
    let mut forks: BTreeMap<RelTag, BTreeMap<u64, PathBuf>> = BTreeMap::new();
    for (dir, spcnode, dbnode) in dirs {
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
    repo.begin_history(lsn);
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
    repo.advance(lsn);
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
