//! `neon-sidecar run`: the daemon. It follows a compute into a store (`follower`), serves
//! pages, sizes and base backups on a unix socket (`service`), and beside them makes images of
//! long page chains, merges old layer files and, with a retention, collects old history
//! (`repo::compaction`).

use crate::basebackup::shared::SharedBasebackups;
use crate::cli::args::{ComputeArgs, RedoProcessArgs, RemoteArgs};
use crate::cli::conf::SidecarConf;
use crate::follower::{self, FollowerConfig, IngestState};
use crate::page_cache::PageCache;
use crate::remote::download::RemoteLayers;
use crate::remote::upload::{UploadError, UploadStatus, Uploader};
use crate::repo::compaction;
use crate::repo::key::Key;
use crate::repo::layer::LayerSource;
use crate::repo::store::Store;
use crate::repo::timeline::Timeline;
use crate::service::{self, PageService};
use crate::walredo::{PostgresRedoManager, WalRedoManager};
use anyhow::Context;
use neon_types::{Lsn, BLCKSZ};
use std::path::PathBuf;
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
    /// Serve pages on this unix socket (its directory must be private to this user; default:
    /// as `init` or `attach` recorded).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The directory shared with the extension: base backups go to `basebackups/` in it
    /// (default: as `init` or `attach` recorded).
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
    /// Size limit of the base backups kept there, in MB (oldest removed first).
    #[arg(long, default_value_t = 10240)]
    pub shared_limit_mb: u64,
    /// Base backups (of different LSNs) built at once; more wait for their turn.
    #[arg(long, default_value_t = 2)]
    pub basebackups_at_once: usize,
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
    /// Mount no branches (where FUSE is not to be used): branch creation is refused, existing
    /// branches stay pinned but unmounted, and `neon_as_of` runs its past servers on copies.
    #[arg(long)]
    pub no_fuse: bool,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
    /// How often layer files written since are uploaded to the remote store, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub remote_upload_ms: u64,
    /// How long an object no index names any more (a merged or collected layer file, an
    /// older index) stays in the remote store before it is deleted, for readers of an older
    /// index (an `attach-remote` under way), in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub remote_grace_ms: u64,
    /// With --remote: keep at most this many MB of layer files on local disk, evicting those
    /// already in the remote store (least recently read first); they are fetched again when
    /// read. Default: keep them all.
    #[arg(long)]
    pub local_cache_mb: Option<u64>,
    /// With --local-cache-mb: a layer file read in the last this many milliseconds stays on
    /// local disk even above the limit (a long scan does not fetch it again and again).
    #[arg(long, default_value_t = 5000)]
    pub local_cache_keep_ms: u64,
    /// What the compute is told is flushed, so what its slot may let go of: WAL whose
    /// history is on local disk (`local`), or in the remote store too (`remote`).
    #[arg(long, value_enum, default_value_t = Durability::Local)]
    pub durability: Durability,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    Local,
    Remote,
}

/// Set by SIGTERM and SIGINT: `run` stops after a last flush.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let conf = SidecarConf::read(&args.store)?;
    let socket = args.socket.clone().or(conf.socket.clone());
    let shared_dir = args.shared_dir.clone().or(conf.shared_dir.clone());
    let mut cfg = FollowerConfig {
        replication: args.compute.replication("neon-sidecar", &conf)?,
        store: args.store.clone(),
        slot: args.compute.slot(&conf),
        flush_interval: Duration::from_millis(args.flush_ms),
        flush_bytes: args.flush_mb << 20,
        chain_limit: args.chain_limit,
        remote_durable: None,
    };
    // The remote store first: layer files not on local disk come from it.
    let remote = args.remote.open()?;
    if remote.is_none() && (args.local_cache_mb.is_some() || args.durability == Durability::Remote) {
        anyhow::bail!("--local-cache-mb and --durability remote need --remote (the store they rely on)");
    }
    let layers = remote.as_ref().map(|r| Arc::new(RemoteLayers::new(r.clone())));
    let source = layers.clone().map(|l| l as Arc<dyn LayerSource>);
    let store = Arc::new(Store::open_with_source(&cfg.store, true, source)?);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
    let mut redo_cfg = args.redo.config("sidecar")?;
    redo_cfg.processes = args.redo_processes.max(1);
    redo_cfg.data_checksums |= crate::repo::meta::compute_has_checksums(&store.current());
    let pg_bin_dir = redo_cfg.pg_bin_dir.clone();
    let redo: Arc<dyn WalRedoManager> = Arc::new(PostgresRedoManager::new(redo_cfg)?);
    let retention = args.retention_mb << 20;
    let ingest = Arc::new(IngestState::default());
    // This sidecar's generation claimed before anything else runs; if the remote store is out
    // of reach, ingest starts anyway and the claim is tried again in the background.
    let upload_status = Arc::new(UploadStatus::default());
    let uploader: Option<Option<Uploader>> = match &remote {
        Some(remote) => Some(
            claim(remote, &args.store, &upload_status)
                .with_context(|| format!("remote store {}", remote.describe()))?,
        ),
        None => None,
    };
    if remote.is_some() && args.durability == Durability::Remote {
        cfg.remote_durable = Some(upload_status.clone());
    }
    let remote_state = match (&remote, &layers) {
        (Some(remote), Some(layers)) => Some(crate::remote::RemoteState {
            remote: remote.clone(),
            upload: upload_status.clone(),
            layers: layers.clone(),
            durability_remote: args.durability == Durability::Remote,
        }),
        _ => None,
    };
    std::thread::scope(|s| {
        let uploading = uploader.map(|claimed| {
            let every = Duration::from_millis(args.remote_upload_ms.max(10));
            let store = store.clone();
            let cache = args.local_cache_mb.map(|mb| (mb << 20, Duration::from_millis(args.local_cache_keep_ms)));
            let (remote, status) = (remote.clone().expect("with an uploader"), upload_status.clone());
            s.spawn(move || {
                let done = claim_until_stopped(claimed, &remote, &args.store, &status).and_then(|u| {
                    let Some(mut u) = u else { return Ok(()) };
                    u.set_grace(Duration::from_millis(args.remote_grace_ms));
                    u.run(every, &STOP, &store, cache)
                });
                if let Err(e) = &done {
                    // Another sidecar writes the prefix now (or another cluster's history is
                    // there): this one must not go on.
                    eprintln!("neon-sidecar: {e}\nneon-sidecar: stopping");
                    STOP.store(true, Ordering::Relaxed);
                }
                done
            })
        });
        let server = match &socket {
            Some(path) => {
                let listener = service::bind(path)?;
                let basebackups = match &shared_dir {
                    Some(d) => Some(
                        SharedBasebackups::new(
                            d,
                            args.shared_limit_mb << 20,
                            args.basebackups_at_once,
                            store.identity().system_id,
                        )
                        .with_context(|| format!("shared directory {}", d.display()))?,
                    ),
                    None => None,
                };
                let pages = (args.page_cache_mb << 20) as usize / BLCKSZ;
                let memory = args.page_file_memory.as_deref().filter(|m| m.is_dir());
                let cache = Arc::new(match &shared_dir {
                    Some(d) => PageCache::shared(d, pages, memory)?,
                    None => PageCache::private(pages)?,
                });
                if let Some(d) = &shared_dir {
                    crate::past::stop_orphans(d);
                }
                let branches = match &shared_dir {
                    Some(d) => Some(
                        crate::branch::Branches::open(d, &store, &redo, &cache, !args.no_fuse)
                            .with_context(|| format!("branches in {}", d.display()))?,
                    ),
                    None => None,
                };
                let past = match (&shared_dir, &branches) {
                    (Some(d), Some(b)) => Some(
                        crate::past::PastServers::open(d, pg_bin_dir.clone(), b)
                            .with_context(|| format!("past servers in {}", d.display()))?,
                    ),
                    _ => None,
                };
                let service = Arc::new(PageService {
                    store: store.clone(),
                    redo: redo.clone(),
                    metrics: Default::default(),
                    basebackups,
                    basebackup_workers: 2 * args.redo_processes.max(1),
                    progress_every: Duration::from_millis(args.progress_ms.max(1)),
                    cache,
                    ingest: ingest.clone(),
                    branches,
                    past,
                    remote: remote_state,
                });
                // Pages cached for reads without a timeline are of another history once the
                // followed timeline changes.
                let weak = Arc::downgrade(&service);
                store.on_switch(Box::new(move || {
                    if let Some(service) = weak.upgrade() {
                        service.cache.clear(service.store.current().bounds().oldest);
                    }
                }));
                eprintln!("neon-sidecar: serving pages on {}", path.display());
                let serving = service.clone();
                Some(s.spawn(move || {
                    let served = service::serve(serving, listener, &STOP);
                    service.cache.retire();
                    // The servers first: their branches are unmounted next.
                    if let Some(p) = &service.past {
                        p.stop_all();
                    }
                    if let Some(b) = &service.branches {
                        b.unmount_all();
                    }
                    served
                }))
            }
            None => None,
        };
        // Images are made beside ingest, from what is durable.
        let (to_compactor, flushes) = crossbeam_channel::unbounded::<(Arc<Timeline>, Vec<Key>)>();
        let compactor = s.spawn(|| compact(redo.as_ref(), flushes, retention));
        let mut on_flush = move |t: &Arc<Timeline>, _: Lsn, keys: Vec<Key>| {
            let _ = to_compactor.send((t.clone(), keys));
        };
        let followed = follower::run_into(&store, &cfg, &STOP, &mut on_flush, &ingest);
        drop(on_flush);
        let followed = match (followed, &server) {
            (Err(e), Some(_)) => {
                // Reads of the history on disk go on; only SIGTERM ends them, and that stop
                // is a clean one (what stopped ingest was said when it happened).
                eprintln!("neon-sidecar: ingest stopped: {e}\nneon-sidecar: still serving the history the store holds");
                while !STOP.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(())
            }
            (followed, _) => followed,
        };
        STOP.store(true, Ordering::Relaxed);
        compactor.join().expect("compaction thread");
        if let Some(u) = uploading {
            u.join().expect("upload thread")?;
        }
        if let Some(server) = server {
            server.join().expect("page service thread")?;
        }
        followed?;
        anyhow::Ok(())
    })
}

/// Layer files beyond this many are merged, this many at a time, up to this size together
/// (so files of up to 1/16 of it, 64 MB — a flush's — are merged, and merged files are not).
const MERGE_ABOVE_FILES: usize = 32;
const MERGE_RUN: usize = 16;
const MERGE_MAX_BYTES: u64 = 1 << 30;

/// What compaction keeps about the timeline it works on.
struct Compacting {
    timeline: Arc<Timeline>,
    last_full: Lsn,
    last_image: Lsn,
    waiting: Vec<Key>,
}

/// The compaction loop: images for long chains after each flush, merging of old layer files;
/// with a retention, a full image every `retention` bytes of WAL and garbage collection behind
/// the horizon. It works on the timeline being followed. A failure (a full disk) is reported
/// and tried again after the next flush: it never stops ingest or reads.
fn compact(redo: &dyn WalRedoManager, flushes: crossbeam_channel::Receiver<(Arc<Timeline>, Vec<Key>)>, retention: u64) {
    let mut state: Option<Compacting> = None;
    for (t, keys) in flushes {
        let c = match &mut state {
            Some(c) if Arc::ptr_eq(&c.timeline, &t) => c,
            _ => state.insert(Compacting {
                last_full: t.newest_full_image().unwrap_or(t.bounds().origin),
                timeline: t,
                last_image: Lsn::INVALID,
                waiting: Vec::new(),
            }),
        };
        c.waiting.extend(keys);
        if let Err(e) = compact_once(c, redo, retention) {
            eprintln!(
                "neon-sidecar: compaction of timeline {}: {e:#} (trying again after the next flush)",
                c.timeline.id()
            );
        }
    }
}

fn compact_once(c: &mut Compacting, redo: &dyn WalRedoManager, retention: u64) -> anyhow::Result<()> {
    let repo = c.timeline.as_ref();
    // Images go at the newest durable LSN, not the flush's: every layer file ends at or
    // before it and every later one starts after it, so no file (flushed meanwhile, or
    // merged) can span the image's LSN — which would put values older than the image
    // after it in a newest-first walk. One image layer per LSN: keys wait for the next
    // flush if the durable LSN has not moved since the last.
    let lsn = repo.durable_lsn();
    // An attached store replays its base backup's WAL before its history begins (at the
    // backup's end), as after a gap: no page can be read there, so keys wait.
    if lsn > c.last_image && repo.check_readable(lsn).is_ok() {
        // Once a full image lies after a child's fork, later ones let nothing more go: the
        // fork keeps all after it. Waiting keys get their images instead.
        let pinned_before_last_full = repo.oldest_pin().is_some_and(|p| p <= c.last_full);
        if retention > 0 && lsn.0.saturating_sub(c.last_full.0) >= retention && !pinned_before_last_full {
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
            (c.last_full, c.last_image) = (lsn, lsn);
            c.waiting.clear();
        } else if !c.waiting.is_empty() {
            c.waiting.sort_unstable();
            c.waiting.dedup();
            compaction::image_keys(repo, redo, &c.waiting, lsn)?;
            c.waiting.clear();
            c.last_image = lsn;
        }
    }
    // Every flush adds a file or two: merge old ones so reads walk few.
    while repo.merge_layers(MERGE_ABOVE_FILES, MERGE_RUN, MERGE_MAX_BYTES)?.is_some() {}
    Ok(())
}

/// One try at claiming this sidecar's generation on `remote`: the uploader, or `None` (said,
/// and in `status`) if the store is out of reach; any other failure is final.
fn claim(
    remote: &crate::remote::Remote,
    store: &std::path::Path,
    status: &Arc<UploadStatus>,
) -> Result<Option<Uploader>, UploadError> {
    match Uploader::start_with_status(remote.clone(), store, status.clone()) {
        Ok(u) => {
            eprintln!("neon-sidecar: keeping history in {} too (generation {})", remote.describe(), u.generation());
            status.set_error(None);
            Ok(Some(u))
        }
        Err(UploadError::Remote(e)) => {
            eprintln!("neon-sidecar: {e}; claiming a generation there again later");
            status.set_error(Some(e.to_string()));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The uploader: `claimed` if the generation was claimed at start, else [`claim`]ed again
/// with backoff (1 s doubling to 30 s) while the remote store is out of reach. `None` if the
/// sidecar stops first.
fn claim_until_stopped(
    claimed: Option<Uploader>,
    remote: &crate::remote::Remote,
    store: &std::path::Path,
    status: &Arc<UploadStatus>,
) -> Result<Option<Uploader>, UploadError> {
    if claimed.is_some() {
        return Ok(claimed);
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let until = std::time::Instant::now() + backoff;
        while std::time::Instant::now() < until {
            if STOP.load(Ordering::Relaxed) {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(u) = claim(remote, store, status)? {
            return Ok(Some(u));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
