//! Any page at any LSN: the values of the page's key back to one that needs no predecessor,
//! turned into a redo request (an image as the base page, WAL records for a redo process,
//! native records in Rust), and the size of a relation fork at an LSN.

use super::key::Key;
use super::store::{RepoError, Repository};
use super::value::Value;
use crate::walredo::native::NativeRecord;
use crate::walredo::{RedoError, RedoRecord, RedoRequest, WalRedoManager};
use neon_types::{BufferTag, Lsn, RelTag, BLCKSZ};

/// Why a page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum GetPageError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Redo(#[from] RedoError),
    #[error("{tag} at {lsn}: {what}")]
    Invalid { tag: BufferTag, lsn: Lsn, what: String },
    #[error("{tag} does not exist at {lsn}")]
    NoSuchPage { tag: BufferTag, lsn: Lsn },
    #[error("{lsn} is outside the history this store holds ({start} to {end})")]
    OutOfHistory { lsn: Lsn, start: Lsn, end: Lsn },
}

/// The size of `rel` in blocks as of `lsn`, if it exists then.
pub fn rel_size(repo: &Repository, rel: &RelTag, lsn: Lsn) -> Result<Option<u32>, RepoError> {
    let values = repo.values_for(Key::rel_size(rel), lsn)?;
    Ok(values.last().and_then(|(_, v)| match v {
        Value::Image(b) if b.len() == 4 => Some(u32::from_le_bytes(b[..].try_into().expect("4 bytes"))),
        _ => None,
    }))
}

/// The page `tag` as of `lsn`.
pub fn get_page(
    repo: &Repository,
    redo: &dyn WalRedoManager,
    tag: BufferTag,
    lsn: Lsn,
) -> Result<Box<[u8; BLCKSZ]>, GetPageError> {
    let (start, end) = (repo.history_start(), repo.last_lsn());
    if !start.is_valid() || lsn < start || lsn > end {
        return Err(GetPageError::OutOfHistory { lsn, start, end });
    }
    // Blocks beyond the fork's size then (truncated, or the fork dropped or not yet created)
    // do not exist, whatever values the store has for them at other LSNs.
    match rel_size(repo, &tag.rel, lsn)? {
        Some(n) if tag.blkno < n => {}
        _ => return Err(GetPageError::NoSuchPage { tag, lsn }),
    }
    let values = repo.values_for(Key::rel_block(&tag), lsn)?;
    if values.is_empty() {
        // A block inside the relation that no record touched: extended, never written.
        return Ok(Box::new([0; BLCKSZ]));
    }
    let mut base = None;
    let mut records = Vec::new();
    for (i, (at, value)) in values.into_iter().enumerate() {
        match value {
            Value::Image(b) if i == 0 => base = Some(b),
            Value::Image(_) => unreachable!("values_for stops at the newest image"),
            Value::WalRecord { raw, .. } => records.push(RedoRecord::Postgres { end_lsn: at, raw }),
            Value::Native(b) => {
                let record = NativeRecord::decode(&b).map_err(|e| GetPageError::Invalid {
                    tag,
                    lsn,
                    what: format!("native record at {at}: {e}"),
                })?;
                records.push(RedoRecord::Native { lsn: at, record });
            }
        }
    }
    if records.is_empty() {
        if let Some(b) = &base {
            let page: [u8; BLCKSZ] =
                b[..].try_into().map_err(|_| GetPageError::Invalid { tag, lsn, what: "image size".into() })?;
            return Ok(Box::new(page));
        }
    }
    Ok(redo.redo(RedoRequest { target: tag, base, records })?)
}
