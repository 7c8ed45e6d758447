//! The store's commands: `neon-sidecar run` (follow a compute into a store and serve pages on
//! a unix socket), `get-page` (a page at an LSN, from the running sidecar's socket or straight
//! from a store's files) and `status` (what a store holds).

use crate::basebackup::shared::SharedBasebackups;
use crate::cli_args::{BlockArgs, ComputeArgs, RedoProcessArgs};
use crate::follower::{self, FollowerConfig};
use crate::page_cache::PageCache;
use crate::redo_cli::describe_page;
use crate::repo::compaction;
use crate::repo::key::Key;
use crate::repo::reconstruct::get_page;
use crate::repo::store::Repository;
use crate::service::{self, Client, PageService};
use crate::wal::segment::{SegmentSet, WalFileReader};
use crate::walredo::{PostgresRedoManager, WalRedoManager};
use anyhow::{bail, Context};
use neon_types::protocol::{Request, Response};
use neon_types::{Lsn, BLCKSZ};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// Flush (make durable and report to the compute) at least this often, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub flush_ms: u64,
    /// Flush after this many MB of WAL.
    #[arg(long, default_value_t = 64)]
    pub flush_mb: u64,
    /// Serve pages on this unix socket (its directory must be private to this user).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The directory shared with the extension: base backups go to `basebackups/` in it.
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
    /// Size limit of the base backups kept there, in MB (oldest removed first).
    #[arg(long, default_value_t = 10240)]
    pub shared_limit_mb: u64,
    /// Wal-redo processes for the page service and for making images.
    #[arg(long, default_value_t = 2)]
    pub redo_processes: usize,
    /// A page whose chain of records since its last image reaches this length gets a new
    /// image (0: never), which bounds the cost of reading it.
    #[arg(long, default_value_t = 64)]
    pub chain_limit: u32,
    /// History to keep, in MB of WAL (0: everything). Older history is dropped once a full
    /// image of the database lies behind this horizon.
    #[arg(long, default_value_t = 0)]
    pub retention_mb: u64,
    /// Memory for rebuilt pages the page service keeps (prefetched or served), in MB: the
    /// shared page file `<shared dir>/pages`, which backends read without a round trip.
    #[arg(long, default_value_t = 64)]
    pub page_cache_mb: u64,
    /// How often a long request (a base backup from SQL) reports progress to its caller, and
    /// after how long it starts to, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub progress_ms: u64,
    /// Where the shared page file keeps its data (a tmpfs; `<shared dir>/pages` links there);
    /// if it is not a directory, the data is in the shared directory itself.
    #[arg(long, default_value = "/dev/shm")]
    pub page_file_memory: Option<PathBuf>,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

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

#[derive(Debug, Clone, clap::Args)]
pub struct GetPageArgs {
    #[command(flatten)]
    pub source: SourceArgs,
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
}

/// Set by SIGTERM and SIGINT: `run` stops after a last flush.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let cfg = FollowerConfig {
        replication: args.compute.replication("neon-sidecar")?,
        store: args.store.clone(),
        slot: args.compute.slot.clone(),
        flush_interval: Duration::from_millis(args.flush_ms),
        flush_bytes: args.flush_mb << 20,
        chain_limit: args.chain_limit,
    };
    let repo = Arc::new(Repository::open(&cfg.store)?);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let mut redo_cfg = args.redo.config("sidecar")?;
    redo_cfg.processes = args.redo_processes.max(1);
    redo_cfg.data_checksums |= compute_has_checksums(&repo);
    let redo: Arc<dyn WalRedoManager> = Arc::new(PostgresRedoManager::new(redo_cfg)?);
    let retention = args.retention_mb << 20;
    std::thread::scope(|s| {
        let server = match &args.socket {
            Some(path) => {
                let listener = service::bind(path)?;
                let basebackups = match &args.shared_dir {
                    Some(d) => Some(
                        SharedBasebackups::new(d, args.shared_limit_mb << 20)
                            .with_context(|| format!("shared directory {}", d.display()))?,
                    ),
                    None => None,
                };
                let pages = (args.page_cache_mb << 20) as usize / BLCKSZ;
                let memory = args.page_file_memory.as_deref().filter(|m| m.is_dir());
                let cache = match &args.shared_dir {
                    Some(d) => PageCache::shared(d, pages, memory)?,
                    None => PageCache::private(pages)?,
                };
                let service = Arc::new(PageService {
                    repo: repo.clone(),
                    redo: redo.clone(),
                    metrics: Default::default(),
                    basebackups,
                    basebackup_workers: 2 * args.redo_processes.max(1),
                    progress_every: Duration::from_millis(args.progress_ms.max(1)),
                    cache,
                });
                eprintln!("neon-sidecar: serving pages on {}", path.display());
                let serving = service.clone();
                Some(s.spawn(move || {
                    let served = service::serve(serving, listener, &STOP);
                    service.cache.retire();
                    served
                }))
            }
            None => None,
        };
        // Images are made beside ingest, from what is durable.
        let (to_compactor, flushes) = crossbeam_channel::unbounded::<(Lsn, Vec<Key>)>();
        let compactor = s.spawn(|| compact(&repo, redo.as_ref(), flushes, retention));
        let mut on_flush = move |lsn: Lsn, keys: Vec<Key>| {
            let _ = to_compactor.send((lsn, keys));
        };
        let followed = follower::run_into(&repo, &cfg, &STOP, &mut on_flush);
        drop(on_flush);
        STOP.store(true, Ordering::Relaxed);
        compactor.join().expect("compaction thread")?;
        if let Some(server) = server {
            server.join().expect("page service thread")?;
        }
        followed?;
        anyhow::Ok(())
    })
}

/// Layer files beyond this many are merged, this many at a time, up to this size together.
const MERGE_ABOVE_FILES: usize = 32;
const MERGE_RUN: usize = 16;
const MERGE_MAX_BYTES: u64 = 128 << 20;

/// The compaction loop: images for long chains after each flush, merging of old layer files;
/// with a retention, a full image every `retention` bytes of WAL and garbage collection behind
/// the horizon.
fn compact(
    repo: &Repository,
    redo: &dyn WalRedoManager,
    flushes: crossbeam_channel::Receiver<(Lsn, Vec<Key>)>,
    retention: u64,
) -> anyhow::Result<()> {
    let mut last_full = repo.newest_full_image().unwrap_or(repo.bounds().origin);
    let mut waiting: Vec<Key> = Vec::new();
    let mut last_image = Lsn::INVALID;
    for (_, keys) in flushes {
        // Images go at the newest durable LSN, not the flush's: every layer file ends at or
        // before it and every later one starts after it, so no file (flushed meanwhile, or
        // merged) can span the image's LSN — which would put values older than the image
        // after it in a newest-first walk. One image layer per LSN: keys wait for the next
        // flush if the durable LSN has not moved since the last.
        let lsn = repo.durable_lsn();
        waiting.extend(keys);
        // An attached store replays its base backup's WAL before its history begins (at the
        // backup's end): no page can be read there, so keys wait until history has begun.
        if lsn > last_image && lsn >= repo.history_start() {
            if retention > 0 && lsn.0.saturating_sub(last_full.0) >= retention {
                // A full image covers the waiting keys too.
                let started = std::time::Instant::now();
                let n = compaction::full_image(repo, redo, lsn)?;
                let removed = repo.collect_garbage(Lsn(lsn.0.saturating_sub(retention)))?;
                eprintln!(
                    "neon-sidecar: full image at {lsn} ({n} values, {:?}); {} old layer files removed; history from {}",
                    started.elapsed(),
                    removed.len(),
                    repo.history_start()
                );
                (last_full, last_image) = (lsn, lsn);
                waiting.clear();
            } else if !waiting.is_empty() {
                waiting.sort_unstable();
                waiting.dedup();
                compaction::image_keys(repo, redo, &waiting, lsn)?;
                waiting.clear();
                last_image = lsn;
            }
        }
        // Every flush adds a file or two: merge old ones so reads walk few.
        while repo.merge_layers(MERGE_ABOVE_FILES, MERGE_RUN, MERGE_MAX_BYTES)?.is_some() {}
    }
    Ok(())
}

/// `neon-sidecar import-wal`: WAL segment files into a store, through the same decoder and
/// ingest as streaming, flushing every 64 MB and at the end, with progress on stderr.
pub fn import_wal(args: &ImportWalArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let repo = Repository::open(&args.store)?;
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

fn ask(socket: &Path, req: &Request) -> anyhow::Result<Response> {
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
                    Response::History { last, .. } => last,
                    r => bail!("unexpected answer {r:?}"),
                },
            };
            match ask(socket, &Request::GetPage { tag, lsn, wait_ms: args.wait_ms })? {
                Response::Page(p) => (p, lsn),
                r => bail!("unexpected answer {r:?}"),
            }
        }
        (None, Some(store)) => {
            let repo = Repository::open_read_only(store)?;
            let lsn = args.lsn.unwrap_or(repo.durable_lsn());
            if lsn > repo.durable_lsn() {
                bail!("{lsn} is beyond what the store holds (durable to {})", repo.durable_lsn());
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
        (Some(socket), _) => match ask(socket, &Request::Status)? {
            Response::Status(text) => write!(out, "{text}")?,
            r => bail!("unexpected answer {r:?}"),
        },
        (None, Some(store)) => {
            let repo = Repository::open_read_only(store)?;
            let layers = repo.layers();
            let bytes: u64 = layers.iter().map(|l| l.size_bytes()).sum();
            writeln!(out, "store {}", store.display())?;
            writeln!(out, "history {} to {} (durable)", repo.history_start(), repo.durable_lsn())?;
            writeln!(out, "layer files {} ({bytes} bytes)", layers.len())?;
        }
        (None, None) => bail!("give --store or --socket"),
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct BasebackupArgs {
    #[command(flatten)]
    pub source: SourceArgs,
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
    #[arg(long, default_value_t = 2)]
    pub redo_processes: usize,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

/// Whether the compute's control file, as imported, says it has data checksums (redo then
/// behaves as it does there).
fn compute_has_checksums(repo: &Repository) -> bool {
    crate::repo::meta::control_template(repo, repo.last_lsn())
        .ok()
        .flatten()
        .and_then(|t| crate::basebackup::control::info(&t).ok())
        .is_some_and(|i| i.data_checksums)
}

/// `neon-sidecar basebackup`: a tar of the data directory as of `--lsn`, with progress.
pub fn basebackup(args: &BasebackupArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    use crate::basebackup::{Options, Progress};
    let full = !args.no_relation_pages;
    let store = match (&args.source.socket, &args.source.store) {
        (Some(socket), _) => {
            let started = std::time::Instant::now();
            let req =
                Request::Basebackup { lsn: args.lsn, full, new_timeline: args.new_timeline, wait_ms: args.wait_ms };
            match ask(socket, &req)? {
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
    let repo = Repository::open_read_only(store)?;
    if args.lsn > repo.durable_lsn() {
        bail!("{} is beyond what the store holds (durable to {})", args.lsn, repo.durable_lsn());
    }
    let mut redo_cfg = args.redo.config("basebackup")?;
    let redo_processes = args.redo_processes.max(1);
    redo_cfg.processes = redo_processes;
    redo_cfg.data_checksums |= compute_has_checksums(&repo);
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
    };
    let started = std::time::Instant::now();
    let stats = crate::basebackup::shared::write_file(out_path, &repo, &redo, args.lsn, opts, &mut report)?;
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
