//! The compute's own files as the oracle for the page store at an LSN, over every relation
//! fork of every database (mapped catalogs, shared catalogs and template databases included).
//!
//! [`Snapshot::take`] pauses nothing itself: the test takes it while its workload is quiet,
//! right after a `CHECKPOINT`, so the files are the database at the flush LSN it records. It
//! copies `global/` and `base/` and records how to mask each relation's pages (its access
//! method, from `pg_class` of every database). [`compare`] then asks the running sidecar, over
//! its socket, for the databases and relations at that LSN and every page of them, and checks
//! them against the copy: the same databases, the same relation forks with the same sizes,
//! and every page equal as [`compare_page`] compares them.
//!
//! Not compared, because the store cannot know them: free-space maps (not WAL-logged) and the
//! main and visibility-map forks of unlogged relations (only their init fork is WAL-logged).
//!
//! Pages are compared as [`compare_page`] does: exactly but for what a streaming standby
//! legitimately has different, and PostgreSQL's own redo differences counted as
//! [`Exception`](crate::pages::Exception)s in the [`Compared`] returned, for callers to assert.

use crate::pagemask::PageKind;
pub use crate::pages::Compared;
use crate::pages::{compare_page, Exceptions, PageMatch, GLOBALTABLESPACE_OID};
use crate::sidecar::SidecarProcess;
use crate::{workload, Cluster};
use anyhow::{Context, Result};
use neon_types::protocol::{Request, Response};
use neon_types::{BufferTag, ForkNumber, Lsn, RelFileNode, RelTag, BLCKSZ};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

const DEFAULTTABLESPACE_OID: u32 = 1663;
/// `template1`'s OID, fixed by initdb.
const TEMPLATE1_OID: u32 = 1;

/// Page kind by (database, relfilenode); database 0 for shared catalogs.
type PageKinds = HashMap<(u32, u32), PageKind>;

/// The compute's files at one LSN.
pub struct Snapshot {
    pub lsn: Lsn,
    pub dir: PathBuf,
    /// Page kind by (database, relfilenode); database 0 for shared catalogs.
    kinds: PageKinds,
    /// Sequences whose `log_cnt` SQL read as above 0 (their WAL logged values ahead).
    pub sequences_logged_ahead: usize,
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
        let (kinds, sequences_logged_ahead) = page_kinds(c)?;
        Ok(Snapshot { lsn, dir, kinds, sequences_logged_ahead })
    }

    /// The live data directory after a CHECKPOINT, as a snapshot (nothing copied).
    pub fn live(c: &Cluster) -> Result<Snapshot> {
        c.execute("CHECKPOINT")?;
        let lsn = workload::flush_lsn(c)?;
        let (kinds, sequences_logged_ahead) = page_kinds(c)?;
        Ok(Snapshot { lsn, dir: c.data_dir().to_path_buf(), kinds, sequences_logged_ahead })
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

    /// The pages each [`Exception`](crate::pages::Exception) should accept, from the compute's
    /// side alone, when the cluster holds `wal_log_copies` databases made by `CREATE
    /// DATABASE` (strategy `WAL_LOG`) from `template1` and not vacuumed since: GiST pages on
    /// disk with the build's LSN; that many times template1's visibility-map pages with bits
    /// set; the sequences SQL read with a `log_cnt` above 0; and at most one SP-GiST
    /// metapage per SP-GiST index.
    pub fn expected_exceptions(&self, wal_log_copies: usize) -> Result<Exceptions> {
        let (mut gist_build_lsn, mut template_vm, mut spgist_indexes) = (0, 0, 0);
        for (rel, (path, _)) in self.forks()? {
            let kind = self.kind(&rel.node);
            if rel.fork == ForkNumber::Main && kind == Some(PageKind::SpGist) {
                spgist_indexes += 1;
            }
            let gist = rel.fork == ForkNumber::Main && kind == Some(PageKind::Gist);
            let template_vm_fork = rel.fork == ForkNumber::VisibilityMap && rel.node.dbnode == TEMPLATE1_OID;
            if gist || template_vm_fork {
                for page in std::fs::read(&path)?.chunks(BLCKSZ) {
                    if gist {
                        gist_build_lsn += usize::from(neon_types::page::page_lsn(page) == Lsn(1));
                    } else {
                        template_vm += usize::from(page[24..].iter().any(|b| *b != 0));
                    }
                }
            }
        }
        Ok(Exceptions {
            gist_build_lsn,
            spgist_meta_cache: spgist_indexes,
            vm_wal_log_copy: wal_log_copies * template_vm,
            sequence_ahead: self.sequences_logged_ahead,
        })
    }

    fn kind(&self, node: &RelFileNode) -> Option<PageKind> {
        self.kinds
            .get(&(node.dbnode, node.relnode))
            // template0 takes no connections; its catalogs are template1's, file for file.
            .or_else(|| self.kinds.iter().find(|((_, r), _)| *r == node.relnode).map(|(_, k)| k))
            .copied()
    }
}

/// Page kinds of every relation with storage in every database that takes connections, and
/// how many of their sequences SQL reads with a `log_cnt` above 0.
fn page_kinds(c: &Cluster) -> Result<(PageKinds, usize)> {
    let mut kinds = HashMap::new();
    let mut logged_ahead = 0;
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
            let kind = PageKind::of_relation(&relkind, &am);
            let db = if spc == GLOBALTABLESPACE_OID { 0 } else { oid };
            if let Some(kind) = kind {
                kinds.insert((db, relnode), kind);
            }
        }
        let sequences = conn.query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S' AND c.relpersistence = 'p'",
            &[],
        )?;
        for seq in sequences {
            let name: String = seq.get(0);
            let log_cnt: i64 = conn.query_one(&format!("SELECT log_cnt FROM {name}"), &[])?.get(0);
            logged_ahead += usize::from(log_cnt > 0);
        }
    }
    Ok((kinds, logged_ahead))
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
///
/// `wal_log_copies` is how many databases made by `CREATE DATABASE ... STRATEGY WAL_LOG` from
/// `template1` (or copied from one) the snapshot holds: the pages accepted by each exception
/// must be [`Snapshot::expected_exceptions`]`(wal_log_copies)`.
pub fn compare(s: &SidecarProcess, snap: &Snapshot, wal_log_copies: usize) -> Result<Compared> {
    compare_on(s, snap, None, wal_log_copies)
}

/// [`compare`] on timeline `timeline` (`None`: the one the sidecar follows).
pub fn compare_on(
    s: &SidecarProcess,
    snap: &Snapshot,
    timeline: Option<u32>,
    wal_log_copies: usize,
) -> Result<Compared> {
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
        for blkno in 0..*nblocks {
            let tag = BufferTag { rel: *rel, blkno };
            let page = match client.request(&on(timeline, Request::GetPage { tag, lsn, wait_ms }))? {
                Response::Page(p) => p,
                Response::Error { message, .. } => anyhow::bail!("{tag} at {lsn}: {message}"),
                r => anyhow::bail!("{tag}: unexpected answer {r:?}"),
            };
            let disk = &data[blkno as usize * BLCKSZ..][..BLCKSZ];
            match compare_page(kind, &tag, &page[..], disk) {
                PageMatch::Equal => {}
                PageMatch::Exception(e) => done.exceptions.count(e),
                PageMatch::Differs(at) => {
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
            }
            done.pages += 1;
        }
        done.forks += 1;
    }
    anyhow::ensure!(bad.is_empty(), "{} pages differ at {lsn}:\n{}", bad.len(), bad.join("\n"));
    anyhow::ensure!(done.pages > 0, "no page compared at {lsn}");
    done.expect(snap.expected_exceptions(wal_log_copies)?).with_context(|| format!("comparing at {lsn}"))?;
    Ok(done)
}

/// What a metadata comparison covered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MetaCompared {
    pub relmaps: usize,
    pub slru_pages: usize,
    pub prepared: usize,
    /// Checkpoint fields compared with `pg_controldata`'s.
    pub control_fields: usize,
}

/// `pg_controldata`'s output for a data directory: `name: value` lines.
pub struct ControlData {
    fields: BTreeMap<String, String>,
}

impl ControlData {
    pub fn read(data_dir: &Path) -> Result<ControlData> {
        let mut cmd = std::process::Command::new(crate::pg_bin("pg_controldata"));
        crate::clear_pg_env(&mut cmd).arg(data_dir);
        let out = crate::run_command(&mut cmd)?;
        let fields = out
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(ControlData { fields })
    }

    pub fn field(&self, name: &str) -> Result<&str> {
        self.fields.get(name).map(String::as_str).with_context(|| format!("pg_controldata prints no {name:?}"))
    }
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

    // pg_control read by PostgreSQL's own tool, not by the decoder the store uses.
    let theirs = ControlData::read(&snap.dir)?;
    let ours = meta::checkpoint(&repo, lsn)?.context("no checkpoint counters")?;
    let same = |name: &str, a: String, b: &str| -> Result<()> {
        anyhow::ensure!(a == b, "{name} at {lsn}: store {a}, pg_controldata {b}");
        Ok(())
    };
    let field = |name: &str| theirs.field(&format!("Latest checkpoint's {name}"));
    same("NextXID", format!("{}:{}", ours.next_xid >> 32, ours.next_xid as u32), field("NextXID")?)?;
    same("NextMultiXactId", ours.next_multi.to_string(), field("NextMultiXactId")?)?;
    same("NextMultiOffset", ours.next_multi_offset.to_string(), field("NextMultiOffset")?)?;
    same("oldestXID", ours.oldest_xid.to_string(), field("oldestXID")?)?;
    same("oldestMultiXid", ours.oldest_multi.to_string(), field("oldestMultiXid")?)?;
    same("REDO location", ours.redo.to_string(), field("REDO location")?)?;
    let next_oid: u32 = field("NextOID")?.parse()?;
    anyhow::ensure!(
        ours.next_oid >= next_oid && ours.next_oid - next_oid <= 8192,
        "NextOID at {lsn}: store {}, pg_controldata {next_oid}",
        ours.next_oid
    );
    done.control_fields = 7;
    Ok(done)
}

/// Where a relation's main fork is in a snapshot (for tests that look at one table).
pub fn main_fork_path(snap: &Snapshot, node: &RelFileNode) -> PathBuf {
    snap.dir.join(sidecar::repo::meta::database_path(node.spcnode, node.dbnode)).join(node.relnode.to_string())
}
