//! Any page at any LSN: the values of the page's key back to one that needs no predecessor,
//! turned into a redo request (an image as the base page, WAL records for a redo process,
//! native records in Rust); the size of a relation fork at an LSN; SLRU pages, whose records
//! are all native and applied here.
//!
//! A relation of a database made by FILE_COPY reads through to the source database as of the
//! copy (see `meta`) for whatever it has no values of its own for since then: its size, and
//! the base page under its own records.

use super::key::Key;
use super::meta;
use super::timeline::{Gap, RepoError, Timeline, Unreadable};
use super::value::Value;
use crate::walredo::native::{self, NativeRecord, NativeTarget};
use crate::walredo::{RedoError, RedoRecord, RedoRequest, WalRedoManager};
use bytes::Bytes;
use neon_types::{BufferTag, Lsn, RelFileNode, RelTag, BLCKSZ};

/// Why a page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum GetPageError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Redo(#[from] RedoError),
    #[error("{what} at {lsn}: {why}")]
    Invalid { what: String, lsn: Lsn, why: String },
    #[error("{tag} does not exist at {lsn}")]
    NoSuchPage { tag: BufferTag, lsn: Lsn },
    #[error("{what} does not exist at {lsn}")]
    NoSuchSlruPage { what: String, lsn: Lsn },
    #[error("{lsn} is outside the history timeline {timeline} holds ({start} to {end})")]
    OutOfHistory { lsn: Lsn, timeline: u32, start: Lsn, end: Lsn },
    #[error("{lsn} cannot be read on timeline {timeline}: {gap}; LSNs up to {} and from {} on can", gap.from, gap.to)]
    InGap { lsn: Lsn, timeline: u32, gap: Gap },
}

/// Refuses LSNs outside the timeline's history, or in a gap of it.
pub fn check_in_history(repo: &Timeline, lsn: Lsn) -> Result<(), GetPageError> {
    let timeline = repo.id();
    match repo.check_readable(lsn) {
        Ok(()) => Ok(()),
        Err(Unreadable::InGap(gap)) => Err(GetPageError::InGap { lsn, timeline, gap }),
        Err(Unreadable::Before { oldest }) => {
            Err(GetPageError::OutOfHistory { lsn, timeline, start: oldest, end: repo.last_lsn() })
        }
        Err(Unreadable::After { last }) => {
            Err(GetPageError::OutOfHistory { lsn, timeline, start: repo.lineage_start(), end: last })
        }
    }
}

/// Where a FILE_COPY database's relation reads through to: the source relation and the LSN
/// of the copy.
fn copy_source(repo: &Timeline, rel: &RelTag, lsn: Lsn) -> Result<Option<(RelTag, Lsn)>, RepoError> {
    Ok(meta::copy_source(repo, rel.node.dbnode, rel.node.spcnode, lsn)?.map(|src| {
        let node = RelFileNode { spcnode: src.spcnode, dbnode: src.dbnode, relnode: rel.node.relnode };
        (RelTag { node, fork: rel.fork }, src.lsn)
    }))
}

/// The size of `rel` in blocks as of `lsn`, if it exists then.
pub fn rel_size(repo: &Timeline, rel: &RelTag, lsn: Lsn) -> Result<Option<u32>, RepoError> {
    let source = copy_source(repo, rel, lsn)?;
    let values = repo.values_for(Key::rel_size(rel), lsn)?;
    match values.last() {
        // Values older than a FILE_COPY are an earlier database's of the same OID.
        Some((at, v)) if source.is_none_or(|(_, copied)| *at > copied) => Ok(match v {
            Value::Image(b) if b.len() == 4 => Some(u32::from_le_bytes(b[..].try_into().expect("4 bytes"))),
            _ => None,
        }),
        _ => match source {
            Some((src, at)) => rel_size(repo, &src, at),
            None => Ok(None),
        },
    }
}

/// The page `tag` as of `lsn`.
pub fn get_page(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    tag: BufferTag,
    lsn: Lsn,
) -> Result<Box<[u8; BLCKSZ]>, GetPageError> {
    check_in_history(repo, lsn)?;
    page_at(repo, redo, tag, lsn)
}

/// A relation fork as of an LSN: what reading any of its pages needs to know once (its size,
/// and for a FILE_COPY database, where it reads through to), so reading many pages of it
/// does not look them up again.
#[derive(Debug, Clone, Copy)]
pub struct RelationAt {
    pub rel: RelTag,
    pub lsn: Lsn,
    pub nblocks: Option<u32>,
    source: Option<(RelTag, Lsn)>,
}

/// [`RelationAt`] for `rel` at `lsn`.
pub fn relation_at(repo: &Timeline, rel: RelTag, lsn: Lsn) -> Result<RelationAt, RepoError> {
    Ok(RelationAt { rel, lsn, nblocks: rel_size(repo, &rel, lsn)?, source: copy_source(repo, &rel, lsn)? })
}

fn page_at(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    tag: BufferTag,
    lsn: Lsn,
) -> Result<Box<[u8; BLCKSZ]>, GetPageError> {
    page_of(repo, redo, &relation_at(repo, tag.rel, lsn)?, tag.blkno)
}

/// Block `blkno` of `r` (the history bounds already checked).
pub fn page_of(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    r: &RelationAt,
    blkno: u32,
) -> Result<Box<[u8; BLCKSZ]>, GetPageError> {
    match plan(repo, redo, r, blkno)? {
        Plan::Ready(page) => Ok(page),
        Plan::Redo(request) => Ok(redo.redo(request)?),
    }
}

/// Many blocks at once, in order, each failing alone: the ones that need redo go to the redo
/// manager as one batch, which it pipelines.
pub fn pages_of<'r>(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    blocks: impl IntoIterator<Item = (&'r RelationAt, u32)>,
) -> Vec<Result<Box<[u8; BLCKSZ]>, GetPageError>> {
    let mut out: Vec<Option<Result<_, GetPageError>>> = Vec::new();
    let (mut requests, mut slots) = (Vec::new(), Vec::new());
    for (r, blkno) in blocks {
        match plan(repo, redo, r, blkno) {
            Ok(Plan::Redo(request)) => {
                slots.push(out.len());
                requests.push(request);
                out.push(None);
            }
            Ok(Plan::Ready(page)) => out.push(Some(Ok(page))),
            Err(e) => out.push(Some(Err(e))),
        }
    }
    for (slot, page) in slots.into_iter().zip(redo.redo_many(requests)) {
        out[slot] = Some(page.map_err(GetPageError::from));
    }
    out.into_iter().map(|p| p.expect("every slot filled")).collect()
}

/// What a block takes to serve: nothing more, or a redo request.
enum Plan {
    Ready(Box<[u8; BLCKSZ]>),
    Redo(RedoRequest),
}

fn plan(repo: &Timeline, redo: &dyn WalRedoManager, r: &RelationAt, blkno: u32) -> Result<Plan, GetPageError> {
    let (tag, lsn, source) = (BufferTag { rel: r.rel, blkno }, r.lsn, r.source);
    // Blocks beyond the fork's size then (truncated, or the fork dropped or not yet created)
    // do not exist, whatever values the store has for them at other LSNs.
    match r.nblocks {
        Some(n) if blkno < n => {}
        _ => return Err(GetPageError::NoSuchPage { tag, lsn }),
    }
    let mut values = repo.values_for(Key::rel_block(&tag), lsn)?;
    if let Some((_, copied)) = source {
        values.retain(|(at, _)| *at > copied);
    }
    // A chain that starts with an image or a will_init record needs nothing older.
    let complete = values.first().is_some_and(|(_, v)| v.will_init());
    let mut base = None;
    let mut records = Vec::new();
    for (i, (at, value)) in values.into_iter().enumerate() {
        match value {
            Value::Image(b) if i == 0 => base = Some(b),
            Value::Image(_) => unreachable!("values_for stops at the newest image"),
            Value::WalRecord { raw, .. } => records.push(RedoRecord::Postgres { end_lsn: at, raw }),
            Value::Native(b) => {
                let record = NativeRecord::decode(&b).map_err(|e| GetPageError::Invalid {
                    what: tag.to_string(),
                    lsn,
                    why: format!("native record at {at}: {e}"),
                })?;
                records.push(RedoRecord::Native { lsn: at, record });
            }
        }
    }
    if !complete {
        // No base of its own: a FILE_COPY database's source page as of the copy, or (for a
        // block inside the relation that no record touched: extended, never written) zeroes.
        if let Some((src, copied)) = source {
            match page_at(repo, redo, BufferTag { rel: src, blkno: tag.blkno }, copied) {
                Ok(page) => base = Some(Bytes::copy_from_slice(&page[..])),
                Err(GetPageError::NoSuchPage { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if records.is_empty() && base.is_none() {
            return Ok(Plan::Ready(Box::new([0; BLCKSZ])));
        }
    }
    if records.is_empty() {
        if let Some(b) = &base {
            let page: [u8; BLCKSZ] = b[..].try_into().map_err(|_| GetPageError::Invalid {
                what: tag.to_string(),
                lsn,
                why: format!("stored image is {} bytes", b.len()),
            })?;
            return Ok(Plan::Ready(Box::new(page)));
        }
    }
    Ok(Plan::Redo(RedoRequest { target: tag, base, records }))
}

/// SLRU page `pageno` of `slru` (see `meta`) as of `lsn`.
pub fn get_slru_page(repo: &Timeline, slru: u32, pageno: u32, lsn: Lsn) -> Result<Box<[u8; BLCKSZ]>, GetPageError> {
    check_in_history(repo, lsn)?;
    let target = match slru {
        meta::SLRU_CLOG => NativeTarget::Clog { pageno },
        meta::SLRU_MULTIXACT_OFFSETS => NativeTarget::MultiXactOffsets { pageno },
        _ => NativeTarget::MultiXactMembers { pageno },
    };
    let values = repo.values_for(Key::slru_page(slru, pageno), lsn)?;
    let invalid = |why: String| GetPageError::Invalid { what: target.to_string(), lsn, why };
    let mut page = Box::new([0u8; BLCKSZ]);
    match values.first() {
        None => return Err(GetPageError::NoSuchSlruPage { what: target.to_string(), lsn }),
        Some((_, Value::Image(b))) if b.is_empty() => {
            return Err(GetPageError::NoSuchSlruPage { what: target.to_string(), lsn })
        }
        Some((at, Value::Image(b))) => {
            page[..].copy_from_slice(b.get(..BLCKSZ).ok_or_else(|| invalid(format!("image at {at} is short")))?)
        }
        // History began after the page's zeroing: the import's image is the base, so this is
        // a page whose base has been lost.
        Some((at, _)) => return Err(invalid(format!("no base image before the record at {at}"))),
    }
    for (at, v) in values.iter().skip(1) {
        let Value::Native(b) = v else { return Err(invalid(format!("a non-native value at {at}"))) };
        let rec = NativeRecord::decode(b).map_err(|e| invalid(format!("native record at {at}: {e}")))?;
        native::apply(&target, &rec, &mut page).map_err(|e| invalid(format!("record at {at}: {e}")))?;
    }
    Ok(page)
}
