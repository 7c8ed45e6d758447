//! Base backups at any LSN: a data directory as of LSN L, as a tar archive that stock
//! PostgreSQL 15 starts from without replay (DESIGN.md §4).
//!
//! * [`tar`]     — the archive, written as a stream.
//! * [`checksum`] — PostgreSQL's page checksum, for computes with `data_checksums`.
//! * [`control`] — the generated `global/pg_control`.
//! * [`output`]  — where files go: the tar, or a mapped tablespace's own directory.
//! * [`pages`]   — rebuilding pages in parallel, in order, with bounded memory.
//! * [`shared`]  — backups in the shared directory: atomic, cached, size-limited.
//! * [`walseg`]  — the generated WAL segment holding a shutdown checkpoint at L.
//!
//! What the archive holds, as of L: the standard directories; `PG_VERSION` (top and per
//! database); relation maps; every relation fork's pages (for unlogged relations, the init fork
//! also as the main fork; no free-space maps), in 1 GB segment files; `pg_xact` and
//! `pg_multixact` segments; `pg_twophase` state files; `pg_hba.conf` and `pg_ident.conf` as
//! imported, an empty `postgresql.conf`; `global/pg_control` (last, as pg_basebackup does) and
//! `pg_wal/<segment>` (and the next one when the checkpoint record crosses into it; with
//! `new_timeline`, on the next timeline, and its `.history` file).
//! Without relation pages (`relation_pages: false`) it is the
//! non-relational part only, for a compute that fetches pages itself (as Neon's pageserver
//! serves its computes): such a directory does not start on its own.

pub mod checksum;
pub mod control;
pub mod output;
pub mod pages;
pub mod shared;
pub mod tar;
pub mod walseg;

use crate::repo::meta::{self, SLRU_CLOG, SLRU_MULTIXACT_MEMBERS, SLRU_MULTIXACT_OFFSETS};
use crate::repo::reconstruct::{check_in_history, get_slru_page, GetPageError};
use crate::repo::store::{Store, StoreError};
use crate::repo::timeline::{RepoError, Timeline};
use crate::wal::page::record_start;
use crate::walredo::native::SLRU_PAGES_PER_SEGMENT;
use crate::walredo::WalRedoManager;
use neon_types::{BufferTag, ForkNumber, Lsn, RelTag, BLCKSZ};
use output::Output;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tar::TarWriter;

/// Blocks per relation segment file (`RELSEG_SIZE`).
const RELSEG_BLOCKS: u32 = 131072;

const DIRS: &[&str] = &[
    "global",
    "base",
    "pg_commit_ts",
    "pg_dynshmem",
    "pg_logical",
    "pg_logical/mappings",
    "pg_logical/snapshots",
    "pg_multixact",
    "pg_multixact/members",
    "pg_multixact/offsets",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat",
    "pg_stat_tmp",
    "pg_subtrans",
    "pg_tblspc",
    "pg_twophase",
    "pg_wal",
    "pg_wal/archive_status",
    "pg_xact",
];

#[derive(Debug, thiserror::Error)]
pub enum BasebackupError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("base backup at {lsn}: {source}")]
    Page { lsn: Lsn, source: GetPageError },
    #[error(transparent)]
    Tar(#[from] tar::TarError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("base backup at {lsn}: {what}")]
    Missing { lsn: Lsn, what: String },
    #[error("base backup: {0}")]
    Io(#[from] std::io::Error),
    #[error("base backup at {lsn}: cancelled (nobody waits for it any more)")]
    Cancelled { lsn: Lsn },
    /// Another caller's build of the same backup failed.
    #[error("base backup at {lsn}: {why}")]
    Failed { lsn: Lsn, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Rebuild and ship every relation page (a full backup); otherwise only the rest.
    pub relation_pages: bool,
    /// Threads rebuilding pages (at least the redo pool's size keeps it busy).
    pub workers: usize,
    /// Start the copy on a new timeline (the source's + 1, with its `.history` file), so its
    /// WAL is never mistaken for the source's.
    pub new_timeline: bool,
    /// How often progress is reported.
    pub progress_every: Duration,
    /// Tablespaces whose files go to a directory of their own (see `output`); the others are
    /// in place under `pg_tblspc/<oid>/`.
    pub tablespace_map: BTreeMap<u32, std::path::PathBuf>,
}

/// The PostgreSQL timeline a backup is on and the history files it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineFiles {
    /// The timeline whose history holds the backup's LSN.
    pub timeline: u32,
    /// Its history file (empty for a timeline without a parent), which lists every ancestor.
    pub history: Vec<u8>,
    /// With `Options::new_timeline`, the copy's timeline: one no timeline in the store uses.
    pub next_free: u32,
}

impl TimelineFiles {
    /// For a backup of timeline `t` at `lsn`, from the store's timelines.
    pub fn of(store: &Store, t: &Arc<Timeline>, lsn: Lsn) -> Result<TimelineFiles, StoreError> {
        let owner = t.owner_at(lsn);
        let next_free = store.timelines().iter().map(|t| t.id()).max().unwrap_or(0).max(owner.id()) + 1;
        Ok(TimelineFiles { timeline: owner.id(), history: store.history_file(owner.id())?, next_free })
    }

    /// For a timeline on its own (no store around it).
    pub fn alone(t: &Timeline) -> TimelineFiles {
        TimelineFiles { timeline: t.id(), history: Vec::new(), next_free: t.id() + 1 }
    }
}

/// Whoever a build is for: told how far it has come (every `Options::progress_every` and at
/// the end), and asked, as it goes, whether it is still wanted. A closure taking progress
/// wants the build to the end.
pub trait Watch {
    fn progress(&mut self, p: &Progress);
    /// True once nobody wants the build any more: it stops (within a page) with
    /// [`BasebackupError::Cancelled`].
    fn cancelled(&mut self) -> bool {
        false
    }
}

impl<F: FnMut(&Progress)> Watch for F {
    fn progress(&mut self, p: &Progress) {
        self(p)
    }
}

/// Progress, reported every `Options::progress_every` and at the end.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub bytes: u64,
    pub pages: u64,
    pub total_pages: u64,
    pub elapsed: Duration,
}

/// What went into a backup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub databases: usize,
    pub relation_files: usize,
    pub pages: u64,
    pub slru_pages: u64,
    pub prepared: usize,
    /// Where the checkpoint record is (L, or just past a page header at L).
    pub checkpoint_lsn: Lsn,
    pub timeline: u32,
}

fn fork_file_name(rel: &RelTag, fork: ForkNumber) -> String {
    match fork {
        ForkNumber::Main => rel.node.relnode.to_string(),
        f => format!("{}_{}", rel.node.relnode, f.name()),
    }
}

/// One relation segment file of a data directory as of an LSN: its path, the fork its pages
/// come from (an unlogged relation's main fork: its init fork) and which of that fork's blocks
/// it holds (`first..first + blocks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationSegment {
    pub path: String,
    pub rel: RelTag,
    pub first: u32,
    pub blocks: u32,
}

/// The segment files (1 GB each, at least one per fork) of `rels` (fork → size in blocks):
/// no free-space maps; an unlogged relation as its init fork, also as its main fork.
pub fn relation_segments(rels: &BTreeMap<RelTag, u32>) -> Vec<RelationSegment> {
    let unlogged: BTreeSet<u32> = rels.keys().filter(|r| r.fork == ForkNumber::Init).map(|r| r.node.relnode).collect();
    let mut out = Vec::new();
    for (rel, n) in rels {
        if rel.fork == ForkNumber::Fsm || (unlogged.contains(&rel.node.relnode) && rel.fork != ForkNumber::Init) {
            continue;
        }
        let dir = meta::database_path(rel.node.spcnode, rel.node.dbnode);
        let forks: &[ForkNumber] =
            if rel.fork == ForkNumber::Init { &[ForkNumber::Init, ForkNumber::Main] } else { &[rel.fork] };
        for as_fork in forks {
            let name = fork_file_name(rel, *as_fork);
            for seg in 0..n.div_ceil(RELSEG_BLOCKS).max(1) {
                let first = seg * RELSEG_BLOCKS;
                let path = if seg == 0 { format!("{dir}/{name}") } else { format!("{dir}/{name}.{seg}") };
                out.push(RelationSegment { path, rel: *rel, first, blocks: (n - first).min(RELSEG_BLOCKS) });
            }
        }
    }
    out
}

struct Builder<'a, W: Write> {
    repo: &'a Timeline,
    redo: &'a dyn WalRedoManager,
    lsn: Lsn,
    checksums: bool,
    out: Output<W>,
    stats: Stats,
    progress: Progress,
    /// Relation files to write: path and the pages, in order.
    plan: Vec<(String, Vec<BufferTag>)>,
    started: Instant,
    last_report: Instant,
    progress_every: Duration,
    watch: &'a mut dyn Watch,
}

impl<W: Write> Builder<'_, W> {
    /// Writes every planned relation file, pages rebuilt in parallel.
    fn write_relation_files(&mut self, workers: usize) -> Result<(), BasebackupError> {
        let plan = std::mem::take(&mut self.plan);
        let tags: Vec<BufferTag> = plan.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        // File boundaries in the flat page list: (first page, path, pages).
        let mut starts = Vec::with_capacity(plan.len());
        let mut at = 0;
        for (path, t) in &plan {
            starts.push((at, path.as_str(), t.len()));
            at += t.len();
        }
        // Empty files first: no page will open them.
        for (_, path, _) in starts.iter().filter(|(_, _, n)| *n == 0) {
            self.out.begin_file(path, 0)?;
            self.out.end_file()?;
            self.stats.relation_files += 1;
        }
        let mut files = starts.iter().filter(|(_, _, n)| *n > 0).peekable();
        let (repo, redo, lsn) = (self.repo, self.redo, self.lsn);
        pages::rebuild_in_order(repo, redo, lsn, &tags, workers, |i, mut page| {
            if let Some((first, path, n)) = files.peek() {
                if *first == i {
                    self.out.begin_file(path, (*n * BLCKSZ) as u64)?;
                }
                if self.checksums {
                    checksum::stamp(&mut page, tags[i].blkno);
                }
                self.out.write(&page[..])?;
                self.stats.pages += 1;
                self.progress.pages += 1;
                if i + 1 == first + n {
                    self.out.end_file()?;
                    self.stats.relation_files += 1;
                    files.next();
                }
                self.tick()?;
            }
            Ok(())
        })
    }

    /// The relation forks of one database (0: the shared catalogs), each planned in its
    /// tablespace's directory of the database.
    fn relations(&mut self, rels: &BTreeMap<RelTag, u32>) {
        for s in relation_segments(rels) {
            let tags = (s.first..s.first + s.blocks).map(|blkno| BufferTag { rel: s.rel, blkno }).collect();
            self.plan.push((s.path, tags));
        }
    }

    /// After each page: progress now and then, and a stop when nobody wants the build.
    fn tick(&mut self) -> Result<(), BasebackupError> {
        if self.last_report.elapsed() >= self.progress_every {
            self.progress.bytes = self.out.tar.bytes;
            self.progress.elapsed = self.started.elapsed();
            self.watch.progress(&self.progress);
            self.last_report = Instant::now();
        }
        if self.watch.cancelled() {
            return Err(BasebackupError::Cancelled { lsn: self.lsn });
        }
        Ok(())
    }

    fn slru(&mut self, slru: u32, dir: &str) -> Result<(), BasebackupError> {
        let mut by_segment: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for p in meta::slru_pages(self.repo, slru, self.lsn)? {
            by_segment.entry(p / SLRU_PAGES_PER_SEGMENT).or_default().push(p);
        }
        for (segno, pages) in by_segment {
            let first = segno * SLRU_PAGES_PER_SEGMENT;
            let last = *pages.iter().max().expect("a page");
            self.out.begin_file(&format!("{dir}/{segno:04X}"), u64::from(last - first + 1) * BLCKSZ as u64)?;
            for pageno in first..=last {
                let page = if pages.contains(&pageno) {
                    get_slru_page(self.repo, slru, pageno, self.lsn)
                        .map_err(|source| BasebackupError::Page { lsn: self.lsn, source })?
                } else {
                    Box::new([0u8; BLCKSZ])
                };
                self.out.write(&page[..])?;
                self.stats.slru_pages += 1;
            }
            self.out.end_file()?;
        }
        Ok(())
    }
}

/// Writes the base backup as of `lsn` to `out`; returns it with what went in.
pub fn write_basebackup<W: Write>(
    repo: &Timeline,
    redo: &dyn WalRedoManager,
    lsn: Lsn,
    timeline: &TimelineFiles,
    opts: Options,
    out: W,
    watch: &mut dyn Watch,
) -> Result<(W, Stats), BasebackupError> {
    check_in_history(repo, lsn).map_err(|source| BasebackupError::Page { lsn, source })?;
    let missing = |what: &str| BasebackupError::Missing { lsn, what: what.to_string() };
    let template = meta::control_template(repo, lsn)?
        .ok_or_else(|| missing("the store has no control file (history must start with init or attach)"))?;
    let info = control::info(&template)?;
    let mut checkpoint = meta::checkpoint(repo, lsn)?.ok_or_else(|| missing("no checkpoint counters"))?;
    // Records end at multiples of 8, so the backup holds the same records as of `lsn` rounded
    // down; its checkpoint goes there, not past it, or a record ending between `lsn` and the
    // next multiple would be outside the copy yet inside a new timeline's lineage (its fork).
    let at = record_start(Lsn(lsn.0 & !7), info.wal_segment_size);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    checkpoint.redo = at;
    checkpoint.this_timeline = timeline.timeline;
    checkpoint.prev_timeline = timeline.timeline;
    if opts.new_timeline {
        checkpoint.this_timeline = timeline.next_free;
    }
    checkpoint.full_page_writes = true;
    checkpoint.time = now as i64;
    checkpoint.oldest_active_xid = 0;

    let dbs = meta::list_databases(repo, lsn)?;
    let mut rels_by_db = Vec::new();
    for db in std::iter::once(0).chain(dbs.iter().map(|d| d.dbnode)) {
        rels_by_db.push((db, meta::list_relations(repo, db, lsn)?));
    }
    let total_pages = rels_by_db.iter().flat_map(|(_, r)| r.values()).map(|n| u64::from(*n)).sum();
    let mut b = Builder {
        repo,
        redo,
        lsn,
        checksums: info.data_checksums,
        out: Output::new(TarWriter::new(out, now), opts.tablespace_map.clone()),
        stats: Stats { databases: dbs.len(), checkpoint_lsn: at, ..Default::default() },
        plan: Vec::new(),
        progress: Progress { total_pages, ..Default::default() },
        started: Instant::now(),
        last_report: Instant::now(),
        progress_every: opts.progress_every,
        watch,
    };
    b.out.file("PG_VERSION", b"15\n")?;
    for dir in DIRS {
        b.out.dir(dir)?;
    }
    b.out.file("postgresql.conf", format!("# written by neon-sidecar: a base backup as of {lsn}\n").as_bytes())?;
    b.out.file("postgresql.auto.conf", b"# Do not edit this file manually!\n")?;
    for (which, name) in meta::CONFIG_FILES.iter().enumerate() {
        let text = meta::config_file(repo, which as u32, lsn)?.unwrap_or_default();
        b.out.file(name, &text)?;
    }
    let global_map = meta::relmap(repo, 0, meta::GLOBALTABLESPACE_OID, lsn)?
        .ok_or_else(|| missing("no relation map of the shared catalogs"))?;
    b.out.file("global/pg_filenode.map", &global_map)?;
    for oid in meta::tablespaces(repo, lsn)?.keys() {
        b.out.tablespace(*oid)?;
    }
    for (db, rels) in &rels_by_db {
        if let Some(entry) = dbs.iter().find(|d| d.dbnode == *db) {
            // Its default tablespace's directory holds PG_VERSION and the relation map; the
            // others, only its relations there.
            let dir = meta::database_path(entry.spcnode, *db);
            b.out.dir(&dir)?;
            b.out.file(&format!("{dir}/PG_VERSION"), b"15\n")?;
            let map = meta::relmap(repo, *db, entry.spcnode, lsn)?
                .ok_or_else(|| missing(&format!("no relation map of database {db}")))?;
            b.out.file(&format!("{dir}/pg_filenode.map"), &map)?;
            let others: BTreeSet<u32> =
                rels.keys().map(|r| r.node.spcnode).filter(|spc| *spc != entry.spcnode).collect();
            for spc in others {
                b.out.dir(&meta::database_path(spc, *db))?;
            }
        }
        if opts.relation_pages {
            b.relations(rels);
        }
    }
    b.write_relation_files(opts.workers)?;
    b.slru(SLRU_CLOG, "pg_xact")?;
    b.slru(SLRU_MULTIXACT_OFFSETS, "pg_multixact/offsets")?;
    b.slru(SLRU_MULTIXACT_MEMBERS, "pg_multixact/members")?;
    for (xid, body) in meta::twophase_states(repo, lsn)? {
        let mut file = body.to_vec();
        file.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        b.out.file(&format!("pg_twophase/{xid:08X}"), &file)?;
        b.stats.prepared += 1;
    }
    // Timeline history: "parent TLI <tab> switch point <tab> reason", one line per ancestor.
    if !timeline.history.is_empty() {
        b.out.file(&format!("pg_wal/{:08X}.history", timeline.timeline), &timeline.history)?;
    }
    if opts.new_timeline {
        let mut history = timeline.history.clone();
        history.extend_from_slice(
            format!("{}\t{at}\tneon-sidecar base backup as of {lsn}\n", checkpoint.prev_timeline).as_bytes(),
        );
        b.out.file(&format!("pg_wal/{:08X}.history", checkpoint.this_timeline), &history)?;
    }
    b.stats.timeline = checkpoint.this_timeline;
    let record = walseg::checkpoint_record(&checkpoint, Lsn(0));
    let segments = walseg::segments_with_record(
        at,
        &record,
        checkpoint.this_timeline,
        info.system_identifier,
        info.wal_segment_size,
    );
    for (name, segment) in &segments {
        b.out.file(&format!("pg_wal/{name}"), segment)?;
    }
    b.out.file("global/pg_control", &control::generate(&template, at, &checkpoint)?)?;
    b.progress.bytes = b.out.tar.bytes;
    b.progress.elapsed = b.started.elapsed();
    b.watch.progress(&b.progress);
    let stats = b.stats;
    Ok((b.out.tar.finish()?, stats))
}
