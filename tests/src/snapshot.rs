//! The compute's own files as the oracle for the page store at an LSN, over every relation
//! fork of every database (mapped catalogs, shared catalogs and template databases included).
//!
//! [`Snapshot::take`] pauses nothing itself: the test takes it while its workload is quiet,
//! right after a `CHECKPOINT`, so the files are the database at the flush LSN it records. It
//! copies `global/` and `base/` and records how to mask each relation's pages (its access
//! method, from `pg_class` of every database). [`compare`] then asks the running sidecar, over
//! its socket, for the databases and relations at that LSN and every page of them, and checks
//! them against the copy: the same databases, the same relation forks with the same sizes,
//! and every page equal once masked as PostgreSQL's `rm_mask` functions do.
//!
//! Not compared, because the store cannot know them: free-space maps (not WAL-logged) and the
//! main and visibility-map forks of unlogged relations (only their init fork is WAL-logged).
//!
//! Two differences are PostgreSQL's own redo at work, and the store rightly gives what redo
//! gives (what a standby or a point-in-time recovery would have):
//! * a sequence's WAL record logs the value 32 calls ahead (`SEQ_LOG_VALS`) while the
//!   primary's buffer keeps the current one: `last_value` and `log_cnt` are masked;
//! * an SP-GiST metapage's cache of last-used pages is updated without WAL
//!   (`SpGistUpdateMetaPage`): like a hint, masked;
//! * CREATE DATABASE (WAL_LOG) logs visibility-map pages as standard pages, so their bitmap
//!   (between pd_lower and pd_upper) is a hole and redo zeroes it: a VM page whose bitmap the
//!   store has as all zeroes, with the header equal, is accepted (and counted) — the store
//!   never claims a page all-visible that the compute does not.

use crate::pagemask::PageKind;
use crate::pages::{compare_masked, PageMatch, Rel};
use crate::sidecar::SidecarProcess;
use crate::{workload, Cluster};
use anyhow::{Context, Result};
use neon_types::protocol::{Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const GLOBALTABLESPACE_OID: u32 = 1664;
const DEFAULTTABLESPACE_OID: u32 = 1663;

/// The compute's files at one LSN.
pub struct Snapshot {
    pub lsn: Lsn,
    pub dir: PathBuf,
    /// Page kind by (database, relfilenode); database 0 for shared catalogs.
    kinds: HashMap<(u32, u32), PageKind>,
}

/// What a comparison covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compared {
    pub databases: usize,
    pub forks: usize,
    pub pages: usize,
    /// Visibility-map pages redo left with a zeroed bitmap (see above).
    pub vm_pages_cleared_by_redo: usize,
    /// GiST pages the compute's sorted build wrote with LSN 0/1 ([`PageMatch::GistBuildLsn`]).
    pub gist_build_lsn_pages: usize,
}

/// Masks a sequence page's `last_value` and `log_cnt` (the first 16 bytes of its one tuple's
/// data).
fn mask_sequence_values(page: &mut [u8]) {
    let lp = u32::from_le_bytes(page[24..28].try_into().expect("4 bytes"));
    let off = (lp & 0x7fff) as usize;
    if off + 23 <= page.len() {
        let data = off + page[off + 22] as usize;
        if data + 16 <= page.len() {
            page[data..data + 16].fill(0);
        }
    }
}

/// Masks the last-used-pages cache of an SP-GiST metapage (block 0): after the page header
/// and the magic number, 8 × (blkno u32, freeSpace i32).
fn mask_spgist_meta_cache(page: &mut [u8]) {
    page[28..28 + 8 * 8].fill(0);
}

/// A VM page whose bitmap redo zeroed: header equal (the LSN too), ours all zero.
fn vm_cleared_by_redo(ours: &[u8], theirs: &[u8]) -> bool {
    let header_equal = ours[..24] == theirs[..24];
    header_equal && ours[24..].iter().all(|b| *b == 0)
}

impl Snapshot {
    /// CHECKPOINT, then a copy of the files (under `<root>/<name>`) and the page kinds.
    pub fn take(c: &Cluster, name: &str) -> Result<Snapshot> {
        c.execute("CHECKPOINT")?;
        let lsn = workload::flush_lsn(c)?;
        let dir = c.root_dir().join(name);
        std::fs::create_dir_all(&dir)?;
        for sub in ["global", "base", "pg_xact", "pg_multixact", "pg_twophase", "pg_tblspc"] {
            // Tablespaces through their links: the copy holds their files.
            let ok = std::process::Command::new("cp").arg("-aL").arg(c.data_dir().join(sub)).arg(&dir).status()?;
            anyhow::ensure!(ok.success(), "copying {sub} to {}", dir.display());
        }
        Ok(Snapshot { lsn, dir, kinds: page_kinds(c)? })
    }

    /// The live data directory after a CHECKPOINT, as a snapshot (nothing copied).
    pub fn live(c: &Cluster) -> Result<Snapshot> {
        c.execute("CHECKPOINT")?;
        let lsn = workload::flush_lsn(c)?;
        Ok(Snapshot { lsn, dir: c.data_dir().to_path_buf(), kinds: page_kinds(c)? })
    }

    /// Every database directory: (path, tablespace, database), the shared catalogs' first;
    /// those under `pg_tblspc/<oid>/PG_15_*/` included.
    fn database_dirs(&self) -> Result<Vec<(PathBuf, u32, u32)>> {
        let mut dirs = vec![(self.dir.join("global"), GLOBALTABLESPACE_OID, 0)];
        let mut add = |parent: &Path, spc: u32| -> Result<()> {
            for e in std::fs::read_dir(parent)? {
                let e = e?;
                if let Ok(db) = e.file_name().to_string_lossy().parse() {
                    dirs.push((e.path(), spc, db));
                }
            }
            Ok(())
        };
        add(&self.dir.join("base"), DEFAULTTABLESPACE_OID)?;
        let tblspc = self.dir.join("pg_tblspc");
        if tblspc.is_dir() {
            for e in std::fs::read_dir(&tblspc)? {
                let e = e?;
                let Ok(spc) = e.file_name().to_string_lossy().parse() else { continue };
                for v in std::fs::read_dir(e.path())? {
                    let v = v?;
                    if v.file_name().to_string_lossy().starts_with("PG_15_") {
                        add(&v.path(), spc)?;
                    }
                }
            }
        }
        Ok(dirs)
    }

    /// Databases (OID) and the directory of their default tablespace: the one holding
    /// `PG_VERSION` and the relation map.
    pub fn database_homes(&self) -> Result<BTreeMap<u32, (PathBuf, u32)>> {
        Ok(self
            .database_dirs()?
            .into_iter()
            .filter(|(dir, _, db)| *db != 0 && dir.join("PG_VERSION").exists())
            .map(|(dir, spc, db)| (db, (dir, spc)))
            .collect())
    }

    /// Database OIDs.
    pub fn databases(&self) -> Result<BTreeSet<u32>> {
        Ok(self.database_homes()?.into_keys().collect())
    }

    /// The relation forks the store should have, with their files' sizes in blocks.
    pub fn forks(&self) -> Result<BTreeMap<RelTag, (PathBuf, u32)>> {
        let dirs = self.database_dirs()?;
        let mut out = BTreeMap::new();
        for (dir, spcnode, dbnode) in dirs {
            let mut files: BTreeMap<(u32, ForkNumber), PathBuf> = BTreeMap::new();
            for e in std::fs::read_dir(&dir)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                let (base, fork) = match name.split_once('_') {
                    Some((b, f)) => (b.to_string(), f.parse::<ForkNumber>().ok()),
                    None => (name.clone(), Some(ForkNumber::Main)),
                };
                // Segment files past the first do not occur at these sizes; `1234.1` is skipped.
                if let (Ok(relnode), Some(fork)) = (base.parse::<u32>(), fork) {
                    files.insert((relnode, fork), e.path());
                }
            }
            let unlogged: BTreeSet<u32> =
                files.keys().filter(|(_, f)| *f == ForkNumber::Init).map(|(r, _)| *r).collect();
            for ((relnode, fork), path) in files {
                let skip = fork == ForkNumber::Fsm || (unlogged.contains(&relnode) && fork != ForkNumber::Init);
                if !skip {
                    let n = (std::fs::metadata(&path)?.len() / BLCKSZ as u64) as u32;
                    out.insert(RelTag { node: RelFileNode { spcnode, dbnode, relnode }, fork }, (path, n));
                }
            }
        }
        Ok(out)
    }

    fn kind(&self, node: &RelFileNode) -> Option<PageKind> {
        self.kinds
            .get(&(node.dbnode, node.relnode))
            // template0 takes no connections; its catalogs are template1's, file for file.
            .or_else(|| self.kinds.iter().find(|((_, r), _)| *r == node.relnode).map(|(_, k)| k))
            .copied()
    }
}

/// Page kinds of every relation with storage in every database that takes connections.
fn page_kinds(c: &Cluster) -> Result<HashMap<(u32, u32), PageKind>> {
    let mut kinds = HashMap::new();
    let dbs = c.query_rows("SELECT oid::text, datname::text FROM pg_database WHERE datallowconn")?;
    for db in dbs {
        let (oid, name) = (db[0].clone().unwrap_or_default(), db[1].clone().unwrap_or_default());
        let oid: u32 = oid.parse()?;
        let mut conn = c.connect(&name)?;
        let rows = conn.query(
            "SELECT pg_relation_filenode(c.oid)::oid, c.reltablespace, coalesce(a.amname::text, ''), c.relkind::text
             FROM pg_class c LEFT JOIN pg_am a ON a.oid = c.relam
             WHERE c.relkind IN ('r', 'i', 't', 'S', 'm') AND pg_relation_filenode(c.oid) IS NOT NULL",
            &[],
        )?;
        for r in rows {
            let (relnode, spc, am, relkind): (u32, u32, String, String) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let kind = if relkind == "S" { Some(PageKind::Sequence) } else { PageKind::from_amname(&am) };
            let db = if spc == GLOBALTABLESPACE_OID { 0 } else { oid };
            if let Some(kind) = kind {
                kinds.insert((db, relnode), kind);
            }
        }
    }
    Ok(kinds)
}

/// `req` on `timeline` (`None`: the one the sidecar follows).
fn on(timeline: Option<u32>, req: Request) -> Request {
    match timeline {
        Some(timeline) => Request::OnTimeline { timeline, request: Box::new(req) },
        None => req,
    }
}

/// Everything the sidecar says about `snap.lsn` against the snapshot's files. Fails on the
/// first difference in databases or relation forks, and after collecting up to 20 differing
/// pages.
pub fn compare(s: &SidecarProcess, snap: &Snapshot) -> Result<Compared> {
    compare_on(s, snap, None)
}

/// [`compare`] on timeline `timeline` (`None`: the one the sidecar follows).
pub fn compare_on(s: &SidecarProcess, snap: &Snapshot, timeline: Option<u32>) -> Result<Compared> {
    let ask = |req: Request| s.ask(&on(timeline, req));
    let lsn = snap.lsn;
    let wait_ms = 30_000;
    let Response::Databases(dbs) = ask(Request::ListDatabases { lsn, wait_ms })? else {
        anyhow::bail!("ListDatabases: unexpected answer")
    };
    let theirs: BTreeSet<u32> = dbs.iter().map(|(db, _)| *db).collect();
    anyhow::ensure!(theirs == snap.databases()?, "databases at {lsn}: store {theirs:?}, files {:?}", snap.databases()?);

    let mut ours: BTreeMap<RelTag, u32> = BTreeMap::new();
    for db in std::iter::once(0).chain(theirs.iter().copied()) {
        let Response::Relations(rels) = ask(Request::ListRelations { dbnode: db, lsn, wait_ms })? else {
            anyhow::bail!("ListRelations: unexpected answer")
        };
        ours.extend(rels);
    }
    let files = snap.forks()?;
    let only_store: Vec<_> = ours.keys().filter(|r| !files.contains_key(r)).collect();
    let only_files: Vec<_> = files.keys().filter(|r| !ours.contains_key(r)).collect();
    anyhow::ensure!(
        only_store.is_empty() && only_files.is_empty(),
        "relation forks at {lsn}: only in the store {only_store:?}; only in the files {only_files:?}"
    );

    let mut client = s.client()?;
    let mut done = Compared { databases: theirs.len(), ..Default::default() };
    let mut bad = Vec::new();
    for (rel, (path, nblocks)) in &files {
        anyhow::ensure!(ours[rel] == *nblocks, "{rel} at {lsn}: store size {} blocks, file {nblocks}", ours[rel]);
        let kind = snap.kind(&rel.node).with_context(|| format!("no page kind known for {rel}"))?;
        let data = std::fs::read(path)?;
        let masking = Rel { name: rel.to_string(), path: String::new(), kind };
        for blkno in 0..*nblocks {
            let tag = BufferTag { rel: *rel, blkno };
            let page = match client.request(&on(timeline, Request::GetPage { tag, lsn, wait_ms }))? {
                Response::Page(p) => p,
                Response::Error { message, .. } => anyhow::bail!("{tag} at {lsn}: {message}"),
                r => anyhow::bail!("{tag}: unexpected answer {r:?}"),
            };
            let disk = &data[blkno as usize * BLCKSZ..][..BLCKSZ];
            let (mut ours, mut theirs) = (page.to_vec(), disk.to_vec());
            if kind == PageKind::Sequence && rel.fork != ForkNumber::VisibilityMap {
                mask_sequence_values(&mut ours);
                mask_sequence_values(&mut theirs);
            }
            if kind == PageKind::SpGist && rel.fork != ForkNumber::VisibilityMap && blkno == 0 {
                mask_spgist_meta_cache(&mut ours);
                mask_spgist_meta_cache(&mut theirs);
            }
            let matched = compare_masked(&masking, &tag, &ours, &theirs);
            if matched == PageMatch::GistBuildLsn {
                done.gist_build_lsn_pages += 1;
            } else if matched != PageMatch::Equal
                && rel.fork == ForkNumber::VisibilityMap
                && vm_cleared_by_redo(&ours, &theirs)
            {
                done.vm_pages_cleared_by_redo += 1;
            } else if let PageMatch::Differs(at) = matched {
                let around = |p: &[u8]| format!("{:02x?}", &p[at & !15..(at & !15) + 16]);
                bad.push(format!(
                    "{tag} ({kind:?}) differs at byte {at}: store {} compute {}",
                    around(&page[..]),
                    around(disk)
                ));
                if bad.len() >= 20 {
                    break;
                }
            }
            done.pages += 1;
        }
        done.forks += 1;
    }
    anyhow::ensure!(bad.is_empty(), "{} pages differ at {lsn}:\n{}", bad.len(), bad.join("\n"));
    Ok(done)
}

/// What a metadata comparison covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MetaCompared {
    pub relmaps: usize,
    pub slru_pages: usize,
    pub prepared: usize,
}

/// The store's metadata at `snap.lsn` against the snapshot's files, read in process from the
/// store's durable files: relation maps byte for byte; every page of `pg_xact`,
/// `pg_multixact/offsets` and `members` (and the same set of pages); the prepared
/// transactions' state files (body; the file adds a CRC32C); and the checkpoint counters of
/// `pg_control`'s last checkpoint (nextOid may be ahead in the store: redo takes the value
/// NEXTOID records log, 8192 ahead of the counter a checkpoint writes).
pub fn compare_metadata(store: &Path, snap: &Snapshot) -> Result<MetaCompared> {
    use sidecar::repo::meta;
    use sidecar::repo::reconstruct::get_slru_page;
    use sidecar::wal::checkpoint::{CheckPoint, CONTROL_CHECKPOINT_COPY, SIZEOF_CHECKPOINT};
    let repo = crate::store::current_timeline(store)?;
    let lsn = snap.lsn;
    anyhow::ensure!(repo.durable_lsn() >= lsn, "the store is durable only to {}", repo.durable_lsn());
    let mut done = MetaCompared::default();

    let mut maps = vec![(snap.dir.join("global/pg_filenode.map"), 0, GLOBALTABLESPACE_OID)];
    for (db, (dir, spc)) in snap.database_homes()? {
        maps.push((dir.join("pg_filenode.map"), db, spc));
    }
    for (path, db, spc) in maps {
        let file = std::fs::read(&path)?;
        let ours = meta::relmap(&repo, db, spc, lsn)?.with_context(|| format!("no relation map of {db} at {lsn}"))?;
        anyhow::ensure!(ours[..] == file[..], "relation map of database {db} at {lsn} differs from {}", path.display());
        done.relmaps += 1;
    }

    for (slru, dir) in [
        (meta::SLRU_CLOG, "pg_xact"),
        (meta::SLRU_MULTIXACT_OFFSETS, "pg_multixact/offsets"),
        (meta::SLRU_MULTIXACT_MEMBERS, "pg_multixact/members"),
    ] {
        let mut pages = BTreeSet::new();
        for e in std::fs::read_dir(snap.dir.join(dir))? {
            let e = e?;
            let Ok(segno) = u32::from_str_radix(&e.file_name().to_string_lossy(), 16) else { continue };
            let data = std::fs::read(e.path())?;
            for (i, page) in data.chunks(BLCKSZ).enumerate() {
                let pageno = segno * 32 + i as u32;
                let ours = get_slru_page(&repo, slru, pageno, lsn).with_context(|| format!("{dir} page {pageno}"))?;
                if let Some(at) = crate::pagemask::first_difference(&ours[..], page) {
                    anyhow::bail!("{dir} page {pageno} at {lsn} differs at byte {at}");
                }
                pages.insert(pageno);
                done.slru_pages += 1;
            }
        }
        let ours: BTreeSet<u32> = meta::slru_pages(&repo, slru, lsn)?.into_iter().collect();
        anyhow::ensure!(ours == pages, "{dir} at {lsn}: the store has pages {ours:?}, the files {pages:?}");
    }

    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(snap.dir.join("pg_twophase"))? {
        let e = e?;
        if let Ok(xid) = u32::from_str_radix(&e.file_name().to_string_lossy(), 16) {
            let b = std::fs::read(e.path())?;
            files.insert(xid, b[..b.len() - 4].to_vec());
        }
    }
    let ours: BTreeMap<u32, Vec<u8>> =
        meta::twophase_states(&repo, lsn)?.into_iter().map(|(x, b)| (x, b.to_vec())).collect();
    anyhow::ensure!(
        ours.keys().eq(files.keys()),
        "prepared transactions at {lsn}: store {:?}, files {:?}",
        ours.keys(),
        files.keys()
    );
    for (xid, body) in &files {
        anyhow::ensure!(&ours[xid] == body, "two-phase state of {xid} at {lsn} differs");
        done.prepared += 1;
    }

    let control = std::fs::read(snap.dir.join("global/pg_control"))?;
    let theirs = CheckPoint::decode(&control[CONTROL_CHECKPOINT_COPY..CONTROL_CHECKPOINT_COPY + SIZEOF_CHECKPOINT])?;
    let ours = meta::checkpoint(&repo, lsn)?.context("no checkpoint counters")?;
    let same = |name: &str, a: u64, b: u64| -> Result<()> {
        anyhow::ensure!(a == b, "{name} at {lsn}: store {a}, pg_control {b}");
        Ok(())
    };
    same("nextXid", ours.next_xid, theirs.next_xid)?;
    same("nextMulti", ours.next_multi.into(), theirs.next_multi.into())?;
    same("nextMultiOffset", ours.next_multi_offset.into(), theirs.next_multi_offset.into())?;
    same("oldestXid", ours.oldest_xid.into(), theirs.oldest_xid.into())?;
    same("oldestMulti", ours.oldest_multi.into(), theirs.oldest_multi.into())?;
    same("redo", ours.redo.0, theirs.redo.0)?;
    anyhow::ensure!(
        ours.next_oid >= theirs.next_oid && ours.next_oid - theirs.next_oid <= 8192,
        "nextOid at {lsn}: store {}, pg_control {}",
        ours.next_oid,
        theirs.next_oid
    );
    Ok(done)
}

/// Where a relation's main fork is in a snapshot (for tests that look at one table).
pub fn main_fork_path(snap: &Snapshot, node: &RelFileNode) -> PathBuf {
    snap.dir.join(sidecar::repo::meta::database_path(node.spcnode, node.dbnode)).join(node.relnode.to_string())
}
