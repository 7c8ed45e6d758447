//! The store's commands besides `run`: `get-page` (a page at an LSN, from the running
//! sidecar's socket or straight from a store's files), `status` (what a store holds),
//! `import-wal` (WAL segment files into a store) and `basebackup` (a data directory as of an
//! LSN).

use crate::cli::args::{BlockArgs, RedoProcessArgs};
use crate::cli::redo::describe_page;
use crate::follower;
use crate::repo::reconstruct::get_page;
use crate::repo::store::Store;
use crate::repo::timeline::Timeline;
use crate::service::Client;
use crate::wal::segment::{SegmentSet, WalFileReader};
use crate::walredo::{PostgresRedoManager, WalRedoManager};
use anyhow::{bail, Context};
use neon_types::protocol::TimelineHistory;
use neon_types::protocol::{Request, Response};
use neon_types::Lsn;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where a command reads from: the running sidecar, or a store's files.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// The store directory (read directly; what is durable).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The running sidecar's socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// Which timeline a command reads.
#[derive(Debug, Clone, clap::Args)]
pub struct TimelineArg {
    /// The PostgreSQL timeline to read (default: the one the sidecar follows now; earlier
    /// LSNs read its ancestors up to its fork).
    #[arg(long)]
    pub timeline: Option<u32>,
}

impl TimelineArg {
    /// `req`, on the chosen timeline.
    pub(crate) fn request(&self, req: Request) -> Request {
        match self.timeline {
            Some(timeline) => Request::OnTimeline { timeline, request: Box::new(req) },
            None => req,
        }
    }

    /// The chosen timeline of a store opened to read, and the newest LSN it holds durably.
    pub(crate) fn of(&self, store: &Store) -> anyhow::Result<(Arc<Timeline>, Lsn)> {
        let t = store.get(self.timeline)?;
        let durable = t.durable_lsn();
        Ok((t, durable))
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct GetPageArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub timeline: TimelineArg,
    #[command(flatten)]
    pub block: BlockArgs,
    /// The LSN (default: the newest the store has).
    #[arg(long)]
    pub lsn: Option<Lsn>,
    /// How long to wait for the LSN to arrive (with --socket), in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub wait_ms: u32,
    /// Write the page here instead of describing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImportWalArgs {
    /// The store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// Where to start when the store holds no history yet (default: the first segment's
    /// first record). A store with history continues from its durable LSN.
    #[arg(long)]
    pub start: Option<Lsn>,
    /// Stop at this LSN (default: the end of valid WAL in the files).
    #[arg(long)]
    pub end: Option<Lsn>,
    /// Directories or files of WAL segments.
    #[arg(required = true)]
    pub wal: Vec<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// With --socket: wait up to this long for the sidecar to answer (one just started), in
    /// milliseconds.
    #[arg(long, default_value_t = 0)]
    pub wait_ms: u64,
}

/// `neon-sidecar import-wal`: WAL segment files into a store, through the same decoder and
/// ingest as streaming, flushing every 64 MB and at the end, with progress on stderr.
pub fn import_wal(args: &ImportWalArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = Store::open(&args.store)?;
    let repo = store.current();
    let set = SegmentSet::collect(&args.wal, None)?;
    let durable = repo.durable_lsn();
    let start = match (durable.is_valid(), args.start) {
        (true, Some(s)) if s != durable => {
            bail!("the store already holds history up to {durable}; it can only continue from there, not {s}")
        }
        (true, _) => durable,
        (false, s) => s.unwrap_or(set.first_lsn()),
    };
    let mut reader = WalFileReader::new(set, Some(start), args.end)
        .with_context(|| format!("the WAL files do not continue the store's history at {start}"))?;
    repo.begin_history(start);
    let started = std::time::Instant::now();
    let filed = follower::file_wal_files(&repo, &mut reader, 64 << 20, |bytes| {
        let mb = bytes as f64 / 1048576.0;
        eprintln!(
            "neon-sidecar: imported {mb:.0} MB of WAL to {} ({:.0} MB/s)",
            repo.last_lsn(),
            mb / started.elapsed().as_secs_f64()
        );
    })?;
    let why = reader.stop_reason().map(|r| r.to_string()).unwrap_or_default();
    writeln!(out, "imported {} records from {start} to {} ({why})", filed.records, repo.durable_lsn())?;
    Ok(())
}

pub(crate) fn ask(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut client =
        Client::connect(socket).with_context(|| format!("connecting to the sidecar at {}", socket.display()))?;
    match client.request(req)? {
        Response::Error { message, .. } => bail!("{message}"),
        r => Ok(r),
    }
}

pub fn get(args: &GetPageArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let tag = args.block.tag()?;
    let (page, lsn) = match (&args.source.socket, &args.source.store) {
        (Some(socket), _) => {
            let lsn = match args.lsn {
                Some(l) => l,
                None => match ask(socket, &Request::History)? {
                    Response::History(timelines) => {
                        let want = |t: &&TimelineHistory| args.timeline.timeline.is_none_or(|id| t.timeline == id);
                        let t = timelines.iter().find(want).context("the sidecar has no such timeline")?;
                        t.last
                    }
                    r => bail!("unexpected answer {r:?}"),
                },
            };
            match ask(socket, &args.timeline.request(Request::GetPage { tag, lsn, wait_ms: args.wait_ms }))? {
                Response::Page(p) => (p, lsn),
                r => bail!("unexpected answer {r:?}"),
            }
        }
        (None, Some(store)) => {
            let store = Store::open_read_only(store)?;
            let (repo, durable) = args.timeline.of(&store)?;
            let lsn = args.lsn.unwrap_or(durable);
            if lsn > durable {
                bail!("{lsn} is beyond what timeline {} of the store holds (durable to {durable})", repo.id());
            }
            let redo = PostgresRedoManager::new(args.redo.config("get-page")?)?;
            (get_page(&repo, &redo, tag, lsn)?, lsn)
        }
        (None, None) => bail!("give --store or --socket"),
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, &page[..])?;
            writeln!(out, "{tag} at {lsn}: written to {}", path.display())?;
        }
        None => writeln!(out, "{tag} at {lsn}: {}", describe_page(&page))?,
    }
    Ok(())
}

pub fn status(args: &StatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match (&args.source.socket, &args.source.store) {
        (Some(socket), _) => {
            let until = std::time::Instant::now() + Duration::from_millis(args.wait_ms);
            let answer = loop {
                match ask(socket, &Request::Status) {
                    Err(_) if std::time::Instant::now() < until => std::thread::sleep(Duration::from_millis(100)),
                    r => break r?,
                }
            };
            match answer {
                Response::Status(text) => write!(out, "{text}")?,
                r => bail!("unexpected answer {r:?}"),
            }
        }
        (None, Some(dir)) => {
            let store = Store::open_read_only(dir)?;
            writeln!(out, "store {} (cluster {})", dir.display(), store.identity().system_id)?;
            let current = store.current().id();
            for t in store.timelines() {
                let layers = t.layers();
                let bytes: u64 = layers.iter().map(|l| l.size_bytes()).sum();
                let parent =
                    t.parent().map(|(p, fork)| format!(", forked from timeline {p} at {fork}")).unwrap_or_default();
                let followed = if t.id() == current { " (followed)" } else { "" };
                writeln!(out, "timeline {}{followed}{parent}", t.id())?;
                writeln!(out, "  history {} to {} (durable)", t.lineage_start(), t.durable_lsn())?;
                for g in t.gaps() {
                    writeln!(out, "  gap: {g}")?;
                }
                writeln!(out, "  layer files {} ({bytes} bytes)", layers.len())?;
            }
        }
        (None, None) => bail!("give --store or --socket"),
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct BasebackupArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub timeline: TimelineArg,
    /// The LSN the data directory is to be as of.
    #[arg(long)]
    pub lsn: Lsn,
    /// With --store: the tar file to write (under a temporary name, renamed when complete).
    /// With --socket the running sidecar writes it into its shared directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// With --socket: how long to wait for the LSN to arrive, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub wait_ms: u32,
    /// Leave out relation pages: only what a compute that fetches pages itself needs.
    #[arg(long)]
    pub no_relation_pages: bool,
    /// Start the copy on a new timeline (with its .history file).
    #[arg(long)]
    pub new_timeline: bool,
    /// With --store: write tablespace OID's files into DIR (an absolute path; made if
    /// missing), the tar holding `pg_tblspc/OID` as a link to it, as `pg_basebackup -T` maps
    /// them. Tablespaces not mapped are directories in place under `pg_tblspc/`.
    #[arg(long, value_name = "OID=DIR")]
    pub tablespace_map: Vec<TablespaceMap>,
    #[arg(long, default_value_t = 2)]
    pub redo_processes: usize,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

/// `--tablespace-map OID=DIR`.
#[derive(Debug, Clone)]
pub struct TablespaceMap {
    pub oid: u32,
    pub dir: PathBuf,
}

impl std::str::FromStr for TablespaceMap {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (oid, dir) = s.split_once('=').ok_or_else(|| format!("{s:?} is not OID=DIR"))?;
        let oid = oid.parse().map_err(|_| format!("{oid:?} is not a tablespace OID"))?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(format!("{} is not an absolute path", dir.display()));
        }
        Ok(TablespaceMap { oid, dir })
    }
}

/// `neon-sidecar basebackup`: a tar of the data directory as of `--lsn`, with progress.
pub fn basebackup(args: &BasebackupArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    use crate::basebackup::{Options, Progress};
    let full = !args.no_relation_pages;
    let store = match (&args.source.socket, &args.source.store) {
        (Some(_), _) if !args.tablespace_map.is_empty() => {
            bail!("--tablespace-map needs --store: the running sidecar writes tablespaces in place")
        }
        (Some(socket), _) => {
            let started = std::time::Instant::now();
            let req =
                Request::Basebackup { lsn: args.lsn, full, new_timeline: args.new_timeline, wait_ms: args.wait_ms };
            match ask(socket, &args.timeline.request(req))? {
                Response::Basebackup { lsn, bytes, micros, path } => {
                    let how =
                        if micros == 0 { "already there".to_string() } else { format!("{:.1} s", micros as f64 / 1e6) };
                    writeln!(
                        out,
                        "base backup as of {lsn}: {path} ({bytes} bytes, {how}; {:.1} s in all)",
                        started.elapsed().as_secs_f64()
                    )?;
                }
                r => bail!("unexpected answer {r:?}"),
            }
            return Ok(());
        }
        (None, Some(store)) => store,
        (None, None) => bail!("give --store or --socket"),
    };
    let Some(out_path) = &args.out else { bail!("--out is needed with --store") };
    // (With --socket the sidecar writes into its shared directory, tablespaces in place.)
    let store = Store::open_read_only(store)?;
    let (repo, durable) = args.timeline.of(&store)?;
    if args.lsn > durable {
        bail!("{} is beyond what timeline {} of the store holds (durable to {durable})", args.lsn, repo.id());
    }
    let timeline = crate::basebackup::TimelineFiles::of(&store, &repo, args.lsn)?;
    let mut redo_cfg = args.redo.config("basebackup")?;
    let redo_processes = args.redo_processes.max(1);
    redo_cfg.processes = redo_processes;
    redo_cfg.data_checksums |= crate::repo::meta::compute_has_checksums(&repo);
    let redo = PostgresRedoManager::new(redo_cfg)?;
    let mut report = |p: &Progress| {
        let rate = p.pages as f64 / p.elapsed.as_secs_f64().max(1e-3);
        let eta = (p.total_pages.saturating_sub(p.pages)) as f64 / rate.max(1.0);
        eprintln!(
            "neon-sidecar: basebackup {} MB, {}/{} pages, {rate:.0} pages/s, ETA {eta:.0} s",
            p.bytes >> 20,
            p.pages,
            p.total_pages
        );
    };
    let opts = Options {
        relation_pages: full,
        workers: 2 * redo_processes,
        new_timeline: args.new_timeline,
        progress_every: Duration::from_secs(1),
        tablespace_map: args.tablespace_map.iter().map(|m| (m.oid, m.dir.clone())).collect(),
    };
    let started = std::time::Instant::now();
    let stats = crate::basebackup::shared::write_file(
        out_path,
        &out_path.with_extension("tar.tmp"),
        &repo,
        &redo,
        args.lsn,
        &timeline,
        opts,
        &mut report,
    )?;
    writeln!(
        out,
        "base backup as of {} (checkpoint at {}, timeline {}): {} databases, {} relation files, {} pages ({} rebuilt by \
         redo), {} SLRU pages, {} prepared transactions, {:.2} s -> {}",
        args.lsn,
        stats.checkpoint_lsn,
        stats.timeline,
        stats.databases,
        stats.relation_files,
        stats.pages,
        redo.stats().requests,
        stats.slru_pages,
        stats.prepared,
        started.elapsed().as_secs_f64(),
        out_path.display()
    )?;
    Ok(())
}
