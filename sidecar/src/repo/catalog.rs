//! A relation's file as of an LSN, read from `pg_class` as it was then. A relation keeps its
//! OID for life but gets a new file (relfilenode) at every `TRUNCATE`, `VACUUM FULL`, `CLUSTER`
//! or table rewrite; the compute only knows the current one. To show a page from before such a
//! rewrite, the sidecar rebuilds the database's `pg_class` pages at the LSN and finds the row
//! of that OID that was visible then.
//!
//! Visibility at an LSN is decided the way a snapshot taken then would see it, from the CLOG
//! as of that LSN: a row is visible if its inserting transaction had committed (or it is
//! frozen) and no committed transaction had deleted or replaced it. Hint bits on the rebuilt
//! page are used only where they are certain (frozen; inserter aborted). Row locks
//! (`HEAP_XMAX_LOCK_ONLY`) do not hide a row; a multixact `xmax` that updated the row is not
//! resolved — of several such candidates the newest-inserted is taken.
//!
//! Layouts (PostgreSQL 15): a heap page's line pointers after its 24-byte header (offset u15,
//! flags u2, length u15); a tuple header of 23 bytes — xmin u32, xmax u32 at 0 and 4,
//! `t_infomask` u16 at 20, `t_hoff` u8 at 22 — its data at `t_hoff`; `pg_class` data: oid u32
//! at 0, relname 64 bytes, then six u32 (relnamespace, reltype, reloftype, relowner, relam,
//! relfilenode — at 88), reltablespace u32 at 92. `pg_filenode.map`: magic u32, count u32, then
//! (oid u32, filenode u32) pairs.

use super::meta;
use super::reconstruct::{self, GetPageError};
use super::timeline::Timeline;
use crate::walredo::native::{clog_page, clog_position, XactStatus};
use crate::walredo::WalRedoManager;
use neon_types::{ForkNumber, Lsn, RelFileNode, RelTag, TransactionId, BLCKSZ};
use std::collections::HashMap;

/// `pg_class`'s own OID (`RelationRelationId`), a mapped catalog.
const PG_CLASS_OID: u32 = 1259;
const RELMAP_MAGIC: u32 = 0x0059_2717;

const HEAP_XMIN_COMMITTED: u16 = 0x0100;
const HEAP_XMIN_INVALID: u16 = 0x0200;
const HEAP_XMIN_FROZEN: u16 = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID;
const HEAP_XMAX_INVALID: u16 = 0x0800;
const HEAP_XMAX_IS_MULTI: u16 = 0x1000;
const HEAP_XMAX_LOCK_ONLY: u16 = 0x0080;
const LP_NORMAL: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Page(#[from] GetPageError),
    #[error(transparent)]
    Repo(#[from] super::timeline::RepoError),
    #[error("database {dbnode} does not exist at {lsn}")]
    NoDatabase { dbnode: u32, lsn: Lsn },
    #[error("database {dbnode} has no relation map at {lsn}, so its pg_class cannot be found")]
    NoRelmap { dbnode: u32, lsn: Lsn },
}

/// The file relation `reloid` of database `dbnode` had at `lsn` (main fork's node), or `None`
/// if no row of that OID was visible then (the relation did not exist yet, or was dropped).
pub fn relation_file_at(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    dbnode: u32,
    reloid: u32,
    lsn: Lsn,
) -> Result<Option<RelFileNode>, CatalogError> {
    reconstruct::check_in_history(repo, lsn)?;
    let db = meta::database(repo, dbnode, lsn)?.ok_or(CatalogError::NoDatabase { dbnode, lsn })?;
    let map = meta::relmap(repo, dbnode, db.spcnode, lsn)?.ok_or(CatalogError::NoRelmap { dbnode, lsn })?;
    let pg_class = mapped_filenode(&map, PG_CLASS_OID).ok_or(CatalogError::NoRelmap { dbnode, lsn })?;
    let rel = RelTag { node: RelFileNode { spcnode: db.spcnode, dbnode, relnode: pg_class }, fork: ForkNumber::Main };
    let at = reconstruct::relation_at(repo, rel, lsn)?;
    let blocks = at.nblocks.unwrap_or(0);
    let mut clog = Clog { repo, lsn, pages: HashMap::new() };
    // (xmin, relfilenode, reltablespace) of the visible rows of that OID.
    let mut found: Vec<(TransactionId, u32, u32)> = Vec::new();
    for chunk in (0..blocks).collect::<Vec<_>>().chunks(32) {
        for page in reconstruct::pages_of(repo, redo, chunk.iter().map(|&b| (&at, b))) {
            let page = page?;
            for t in tuples(&page) {
                if t.oid == reloid && clog.visible(&t)? {
                    found.push((t.xmin, t.relfilenode, t.reltablespace));
                }
            }
        }
    }
    // Newest-inserted wins where more than one looks visible (a multixact updater, unresolved).
    let Some(&(_, relfilenode, reltablespace)) = found.iter().max_by_key(|(xmin, ..)| *xmin) else {
        return Ok(None);
    };
    let relnode = if relfilenode == 0 {
        // A mapped relation: its file is in the relation map.
        match mapped_filenode(&map, reloid) {
            Some(n) => n,
            None => return Ok(None),
        }
    } else {
        relfilenode
    };
    let spcnode = if reltablespace == 0 { db.spcnode } else { reltablespace };
    Ok(Some(RelFileNode { spcnode, dbnode, relnode }))
}

/// The file of mapped relation `oid` in a `pg_filenode.map` image.
fn mapped_filenode(map: &[u8], oid: u32) -> Option<u32> {
    let u32_at = |o: usize| map.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
    if u32_at(0)? != RELMAP_MAGIC {
        return None;
    }
    let n = u32_at(4)? as usize;
    (0..n.min(64)).find_map(|i| (u32_at(8 + 8 * i)? == oid).then(|| u32_at(12 + 8 * i)).flatten())
}

/// What of a `pg_class` row matters here.
struct Row {
    xmin: TransactionId,
    xmax: TransactionId,
    infomask: u16,
    oid: u32,
    relfilenode: u32,
    reltablespace: u32,
}

/// The rows on a `pg_class` heap page.
fn tuples(page: &[u8; BLCKSZ]) -> impl Iterator<Item = Row> + '_ {
    let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
    let pd_lower = usize::from(u16_at(12)).clamp(24, BLCKSZ);
    (24..pd_lower).step_by(4).filter_map(move |lp| {
        let item = u32_at(lp);
        let (off, flags, len) = ((item & 0x7FFF) as usize, ((item >> 15) & 3) as u16, (item >> 17) as usize);
        if flags != LP_NORMAL || off < 24 || off + len > BLCKSZ || len < 23 {
            return None;
        }
        let hoff = usize::from(page[off + 22]);
        if hoff < 23 || hoff + 96 > len {
            return None;
        }
        let data = off + hoff;
        Some(Row {
            xmin: u32_at(off),
            xmax: u32_at(off + 4),
            infomask: u16_at(off + 20),
            oid: u32_at(data),
            relfilenode: u32_at(data + 88),
            reltablespace: u32_at(data + 92),
        })
    })
}

/// Transaction status as of an LSN, from the CLOG pages then.
struct Clog<'r> {
    repo: &'r Timeline,
    lsn: Lsn,
    pages: HashMap<u32, Box<[u8; BLCKSZ]>>,
}

impl Clog<'_> {
    fn committed(&mut self, xid: TransactionId) -> Result<bool, GetPageError> {
        // Bootstrap (1) and frozen (2) xids are committed; 0 is invalid.
        if xid < 3 {
            return Ok(xid != 0);
        }
        let pageno = clog_page(xid);
        if !self.pages.contains_key(&pageno) {
            let page = match reconstruct::get_slru_page(self.repo, meta::SLRU_CLOG, pageno, self.lsn) {
                Ok(p) => p,
                // Truncated away long before: every xid on it was frozen or aborted long ago.
                Err(GetPageError::NoSuchSlruPage { .. }) => Box::new([0; BLCKSZ]),
                Err(e) => return Err(e),
            };
            self.pages.insert(pageno, page);
        }
        let (byte, shift) = clog_position(xid);
        Ok(XactStatus::from_bits(self.pages[&pageno][byte] >> shift) == XactStatus::Committed)
    }

    /// Whether a snapshot at the LSN sees `row`.
    fn visible(&mut self, row: &Row) -> Result<bool, GetPageError> {
        let m = row.infomask;
        let inserted = if m & HEAP_XMIN_FROZEN == HEAP_XMIN_FROZEN {
            true
        } else if m & HEAP_XMIN_INVALID != 0 {
            false
        } else {
            self.committed(row.xmin)?
        };
        if !inserted {
            return Ok(false);
        }
        if m & HEAP_XMAX_INVALID != 0 || m & HEAP_XMAX_LOCK_ONLY != 0 || m & HEAP_XMAX_IS_MULTI != 0 || row.xmax == 0 {
            return Ok(true);
        }
        Ok(!self.committed(row.xmax)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relmap_lookup() {
        let mut map = vec![0u8; 512];
        map[0..4].copy_from_slice(&RELMAP_MAGIC.to_le_bytes());
        map[4..8].copy_from_slice(&2u32.to_le_bytes());
        for (i, (oid, node)) in [(1259u32, 1259u32), (1249, 16999)].iter().enumerate() {
            map[8 + 8 * i..12 + 8 * i].copy_from_slice(&oid.to_le_bytes());
            map[12 + 8 * i..16 + 8 * i].copy_from_slice(&node.to_le_bytes());
        }
        assert_eq!(mapped_filenode(&map, 1249), Some(16999));
        assert_eq!(mapped_filenode(&map, 1), None);
        map[0] ^= 1;
        assert_eq!(mapped_filenode(&map, 1259), None, "not a relation map");
    }
}
