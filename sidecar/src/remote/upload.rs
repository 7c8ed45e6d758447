//! Uploading the store to the remote: every layer file a timeline's manifest names and the
//! sealed part of its commit-time index, then an index naming them all (`index`) — the index
//! last, so an index never names an object that is not there. Objects are never overwritten:
//! their names carry the generation of the sidecar that uploaded them and a number of its
//! own.
//!
//! **Generations.** A sidecar that writes a prefix first claims the next generation (one
//! above every generation object there), and before each index checks that no newer one was
//! claimed since: an older writer, once a newer one started on the same prefix, stops with an
//! error naming both, and never writes an index again. (Two claiming at the same moment: the
//! object's content is a nonce of each, and the one whose nonce is not read back stops.)
//!
//! **The queue.** A layer file once uploaded gets its stub (`repo::layer::RemoteStub`, beside
//! it, durably): the queue is what the manifests name without a stub of the same file, so a
//! sidecar killed mid-upload resumes where it was after a restart — an object uploaded but not
//! yet stubbed is uploaded again under a new name, and the first is collected as garbage.
//!
//! **Garbage.** Objects named by neither of the two newest indexes (layer files collected or
//! merged away, uploads a crash orphaned, older indexes) are deleted a grace period after
//! they stop being named, so a reader that has just read an index finds what it names.
//!
//! ```text
//! <prefix>/generations/<generation, 8 hex>       "nonce = <hex>" lines: the claim
//! <prefix>/timelines/<tl, 8 hex>/<layer file name>.g<generation, 8 hex>.<n>
//!                                                 a layer file, as on disk
//! <prefix>/timelines/<tl, 8 hex>/<layer file name>.g<generation, 8 hex>.<n>.keys
//!                                                 its summary (`repo::layer_summary`)
//! <prefix>/timelines/<tl, 8 hex>/commit-times.<offset, 16 hex>.g<generation, 8 hex>.<n>
//!                                                 a piece of the commit-time chunk file
//! <prefix>/index/…                                see `index`
//! every object sealed (`object`)
//! ```

use super::index::{generation_of, index_name, Index, IndexedTimeline, Piece, INDEX_DIR};
use super::{Remote, RemoteError};
use crate::repo::commit_times::{sealed_length, CommitTimesError, CHUNK_FILE, LOG_FILE};
use crate::repo::layer::{LayerError, LayerFacts, MergeInputs, RemoteStub};
use crate::repo::layer_summary::{summary_object, LayerSummary};
use crate::repo::store::{decode_current, timeline_dir, Store, CURRENT, HISTORY, IDENTITY, TIMELINES};
use crate::repo::timeline::{manifest_with_names, put_durably, read_durable_manifest, RepoError, MANIFEST};
use neon_types::Lsn;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an object no index names any more is kept, for readers of an older index (the
/// default of [`Uploader::set_grace`]).
const GRACE: Duration = Duration::from_secs(60);
/// Reads of the manifests a round makes when files go away under it (merged, collected).
const PASSES_A_ROUND: usize = 3;
/// Merged layer files at least this large go up in the background while rounds go on (the
/// default of [`Uploader::set_background_from`]): one may take many seconds, and until it is
/// up an index names the files it was merged from in its place.
const BACKGROUND_FROM: u64 = 16 << 20;
/// Background uploads at a time.
const BACKGROUND_AT_ONCE: usize = 2;
/// A round's uploads at a time.
const UPLOADS_AT_ONCE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    CommitTimes(#[from] CommitTimesError),
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "remote store {store}: generation {newer} (another neon-sidecar, started later on the same prefix) writes it \
         now; this one (generation {ours}) stops writing there"
    )]
    Fenced { store: String, ours: u32, newer: u32 },
    #[error(
        "remote store {store}: another neon-sidecar claimed generation {ours} at the same moment as this one; \
         this one stops writing there"
    )]
    ClaimLost { store: String, ours: u32 },
    #[error("remote store {store}: {what} is corrupt: {why}")]
    Corrupt { store: String, what: String, why: String },
    #[error(
        "remote store {store} holds another cluster's history (its newest index {index} is of another system \
         identifier or store): give this store a prefix of its own"
    )]
    Foreign { store: String, index: String },
    #[error("store {path}: {why}")]
    Local { path: PathBuf, why: String },
}

/// What the uploader has done, for status reports.
#[derive(Debug, Default)]
pub struct UploadStatus {
    pub generation: AtomicU32,
    /// The followed timeline's durable LSN as of the newest index in the remote store.
    pub durable: AtomicU64,
    /// Layer files (and their bytes) the manifests name that are not uploaded yet.
    pub queued_files: AtomicU64,
    pub queued_bytes: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Set when a newer generation took the prefix over: uploads have stopped.
    pub fenced: AtomicBool,
}

impl UploadStatus {
    pub fn durable(&self) -> Lsn {
        Lsn(self.durable.load(Ordering::Acquire))
    }

    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub fn error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A layer file the manifest no longer names: the round reads the manifests again.
struct Gone;

/// A large layer file going up in the background (`put_layer` on a thread of its own).
struct InFlight {
    tl: u32,
    name: String,
    path: PathBuf,
    object: String,
    done: std::sync::mpsc::Receiver<Result<Option<LayerFacts>, UploadError>>,
}

/// A layer file known to be uploaded: which file (inode and size) has which stub.
struct Known {
    inode: u64,
    size: u64,
    stub: RemoteStub,
}

pub struct Uploader {
    remote: Remote,
    store: PathBuf,
    generation: u32,
    nonce: String,
    sequence: u64,
    /// Objects made by this generation so far (the `<n>` of their names).
    made: u64,
    /// By (timeline, layer file name): saves reading footers and stubs every round.
    known: BTreeMap<(u32, String), Known>,
    /// The commit-time pieces uploaded, by timeline.
    pieces: BTreeMap<u32, Vec<Piece>>,
    /// The newest indexes (at most two) and the objects each names.
    named: VecDeque<(String, BTreeSet<String>)>,
    /// The last index written, as encoded: an index is written when it would differ.
    last_index: Option<Vec<u8>>,
    /// The layer files the newest index names, by (timeline, name): a merged file's inputs
    /// stand in for it from there until it is uploaded.
    indexed: BTreeMap<(u32, String), RemoteStub>,
    in_flight: Vec<InFlight>,
    background_from: u64,
    /// Objects put since the last index: those it does not name (their layer file was
    /// merged or collected meanwhile) are garbage at once.
    unindexed: Vec<String>,
    /// Objects no index names any more, and since when.
    doomed: Vec<(String, Instant)>,
    grace: Duration,
    pub status: Arc<UploadStatus>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UploadError + '_ {
    move |source| UploadError::Io { path: path.to_path_buf(), source }
}

fn random_nonce() -> String {
    let mut b = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}{:x}{:x}", b.iter().map(|x| format!("{x:02x}")).collect::<String>(), t.as_nanos(), std::process::id())
}

/// The generations claimed on the prefix, from their object names.
fn generations(remote: &Remote) -> Result<Vec<u32>, RemoteError> {
    Ok(remote
        .list("generations")?
        .iter()
        .filter_map(|n| u32::from_str_radix(n.strip_prefix("generations/")?, 16).ok())
        .collect())
}

/// The newest index in the remote store, and its object name, if there is one.
pub fn newest_index(remote: &Remote) -> Result<Option<(String, Index)>, UploadError> {
    let Some(name) = remote.list(INDEX_DIR)?.into_iter().filter(|n| generation_of(n).is_some()).max() else {
        return Ok(None);
    };
    let b = remote.get_object(&name)?;
    let index =
        Index::decode(&b).map_err(|why| UploadError::Corrupt { store: remote.describe(), what: name.clone(), why })?;
    Ok(Some((name, index)))
}

fn timeline_dirs(store: &Path) -> Result<Vec<(u32, PathBuf)>, UploadError> {
    let dir = store.join(TIMELINES);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let e = e.map_err(io(&dir))?;
        if let Some(id) = e.file_name().to_str().and_then(|n| u32::from_str_radix(n, 16).ok()) {
            out.push((id, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The objects the stubs in the store's timelines name.
fn local_stub_objects(store: &Path) -> Result<BTreeSet<String>, UploadError> {
    let mut out = BTreeSet::new();
    for (_, dir) in timeline_dirs(store)? {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = e.map_err(io(&dir))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(layer) = name.strip_suffix(crate::repo::layer::STUB_SUFFIX) {
                if let Ok(Some(stub)) = RemoteStub::read(&dir.join(layer)) {
                    out.insert(summary_object(&stub.object));
                    out.insert(stub.object);
                }
            }
        }
    }
    Ok(out)
}

/// Whether `pieces` are the start of the chunk file in `dir`, byte for byte.
fn pieces_match(dir: &Path, pieces: &[Piece]) -> bool {
    let Ok(f) = std::fs::File::open(dir.join(CHUNK_FILE)) else { return pieces.is_empty() };
    let mut at = 0;
    pieces.iter().all(|p| {
        let mut b = vec![0u8; p.len as usize];
        let same = p.offset == at && f.read_exact_at(&mut b, p.offset).is_ok() && crc32c::crc32c(&b) == p.crc;
        at += p.len;
        same
    })
}

impl Uploader {
    /// Claims the next generation on `remote` for the store in `store`; what the newest
    /// index names is adopted (its commit-time pieces, where they are the local file's), and
    /// what no index names is queued for deletion.
    pub fn start(remote: Remote, store: &Path) -> Result<Uploader, UploadError> {
        Self::start_with_status(remote, store, Arc::default())
    }

    /// [`Uploader::start`], reporting into `status` (made before the claim could be made).
    pub fn start_with_status(remote: Remote, store: &Path, status: Arc<UploadStatus>) -> Result<Uploader, UploadError> {
        // Whose prefix it is first: another cluster's history is never touched.
        let newest = newest_index(&remote)?;
        let identity = read_file(&store.join(IDENTITY))?;
        if let Some((name, index)) = &newest {
            if index.identity != identity {
                return Err(UploadError::Foreign { store: remote.describe(), index: name.clone() });
            }
        }
        // Above every generation claimed or named by an index (claims may have been removed).
        let indexed = remote.list(INDEX_DIR)?.iter().filter_map(|n| generation_of(n)).max().unwrap_or(0);
        let generation = generations(&remote)?.into_iter().max().unwrap_or(0).max(indexed) + 1;
        let nonce = random_nonce();
        let claim = format!("generations/{generation:08X}");
        let body = format!("nonce = {nonce}\npid = {}\n", std::process::id());
        remote.put_object(&claim, body.as_bytes())?;
        if remote.get_object(&claim)? != body.as_bytes() {
            // Another sidecar claimed the same generation at the same moment, and won.
            return Err(UploadError::ClaimLost { store: remote.describe(), ours: generation });
        }
        let mut u = Uploader {
            remote,
            store: store.to_path_buf(),
            generation,
            nonce,
            sequence: 0,
            made: 0,
            known: BTreeMap::new(),
            pieces: BTreeMap::new(),
            named: VecDeque::new(),
            last_index: None,
            indexed: BTreeMap::new(),
            in_flight: Vec::new(),
            background_from: BACKGROUND_FROM,
            unindexed: Vec::new(),
            doomed: Vec::new(),
            grace: GRACE,
            status,
        };
        u.status.generation.store(generation, Ordering::Relaxed);
        // What the newest index or a local stub names is live (a stub written before a crash
        // may name an object no index has named yet: the first index of this generation
        // will); the rest is garbage, deleted after the grace period.
        let mut live: BTreeSet<String> = local_stub_objects(store)?;
        if let Some((name, index)) = &newest {
            live.extend(index.objects());
            live.insert(name.clone());
            for t in &index.timelines {
                let dir = timeline_dir(store, t.id);
                if pieces_match(&dir, &t.pieces) {
                    u.pieces.insert(t.id, t.pieces.clone());
                }
            }
            u.named.push_back((name.clone(), index.objects().collect()));
            u.indexed = indexed_files(index);
            u.status.durable.store(index.durable.0, Ordering::Relaxed);
        }
        let now = Instant::now();
        for dir in [INDEX_DIR, TIMELINES] {
            for object in u.remote.list(dir)? {
                if !live.contains(&object) {
                    u.doomed.push((object, now));
                }
            }
        }
        Ok(u)
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// How long an object no index names stays before it is deleted.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Layer files of at least `bytes` go up in the background.
    pub fn set_background_from(&mut self, bytes: u64) {
        self.background_from = bytes;
    }

    /// Stops with [`UploadError::Fenced`] if a newer generation (or another claim of ours)
    /// writes the prefix now.
    fn check_fenced(&self) -> Result<(), UploadError> {
        let store = self.remote.describe();
        let newest = generations(&self.remote)?.into_iter().max().unwrap_or(0);
        if newest > self.generation {
            return Err(UploadError::Fenced { store, ours: self.generation, newer: newest });
        }
        let claim = self.remote.get_object(&format!("generations/{:08X}", self.generation))?;
        if !String::from_utf8_lossy(&claim).contains(&self.nonce) {
            return Err(UploadError::ClaimLost { store, ours: self.generation });
        }
        Ok(())
    }

    fn next_object(&mut self, tl: u32, base: &str) -> String {
        self.made += 1;
        format!("{TIMELINES}/{tl:08X}/{base}.g{:08X}.{}", self.generation, self.made)
    }

    /// Whether the layer file `name` of timeline `tl` (in `dir`) is uploaded: its stub if so,
    /// `None` if not (the file is there without a stub of it), [`Gone`] if the manifest no
    /// longer names it (merged or collected since it was read).
    fn uploaded(&mut self, tl: u32, dir: &Path, name: &str) -> Result<Result<Option<RemoteStub>, Gone>, UploadError> {
        let path = dir.join(name);
        let path = path.as_path();
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Evicted: its stub says where it is.
                if let Some(stub) = RemoteStub::read(path)? {
                    return Ok(Ok(Some(stub)));
                }
                if !read_durable_manifest(dir)?.1.iter().any(|n| n == name) {
                    return Ok(Err(Gone));
                }
                return Err(UploadError::Local {
                    path: path.to_path_buf(),
                    why: "the manifest names this layer file, yet neither it nor its remote stub is there".into(),
                });
            }
            Err(e) => return Err(io(path)(e)),
        };
        if let Some(k) = self.known.get(&(tl, name.to_string())) {
            if k.inode == m.ino() && k.size == m.len() {
                return Ok(Ok(Some(k.stub.clone())));
            }
        }
        let stub = match RemoteStub::read(path) {
            Ok(Some(stub)) => stub,
            // A damaged stub of a file that is here: uploaded again, stubbed anew.
            Ok(None) | Err(LayerError::Corrupt { .. }) => return Ok(Ok(None)),
            Err(e) => return Err(e.into()),
        };
        if stub.facts != LayerFacts::read(path)? {
            return Ok(Ok(None));
        }
        self.known.insert((tl, name.to_string()), Known { inode: m.ino(), size: m.len(), stub: stub.clone() });
        Ok(Ok(Some(stub)))
    }

    /// Starts uploading a layer file in the background.
    fn start_background(&mut self, tl: u32, name: &str, path: &Path) -> Result<(), UploadError> {
        let object = self.next_object(tl, name);
        let (tx, done) = std::sync::mpsc::channel();
        let (remote, file, o) = (self.remote.clone(), path.to_path_buf(), object.clone());
        std::thread::Builder::new()
            .name("remote-upload".into())
            .spawn(move || {
                let _ = tx.send(put_layer(&remote, &file, &o));
            })
            .map_err(io(path))?;
        self.in_flight.push(InFlight { tl, name: name.to_string(), path: path.to_path_buf(), object, done });
        Ok(())
    }

    /// Waits for the background uploads to end (each ends, whether it fails or not).
    fn wait_for_background(&mut self) {
        while !self.in_flight.is_empty() {
            if let Err(e) = self.reap() {
                eprintln!("neon-sidecar: remote {}: {e}", self.remote.describe());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stubs the background uploads that ended; the first failure is the error (the file is
    /// queued again).
    fn reap(&mut self) -> Result<(), UploadError> {
        use std::sync::mpsc::TryRecvError;
        let mut failed = None;
        let mut i = 0;
        while i < self.in_flight.len() {
            let got = match self.in_flight[i].done.try_recv() {
                Err(TryRecvError::Empty) => {
                    i += 1;
                    continue;
                }
                Ok(got) => got,
                Err(TryRecvError::Disconnected) => Err(UploadError::Local {
                    path: self.in_flight[i].path.clone(),
                    why: "its upload ended without an answer".into(),
                }),
            };
            let f = self.in_flight.swap_remove(i);
            // Known from now on: what the next index does not name is garbage.
            self.unindexed.push(f.object.clone());
            self.unindexed.push(summary_object(&f.object));
            match got {
                // Only if the file that went up is the one there now.
                Ok(Some(facts)) if LayerFacts::read(&f.path).ok() == Some(facts) => {
                    self.stub_uploaded(f.tl, &f.name, &f.path, f.object, facts)?;
                }
                Ok(_) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Stubs a layer file once `object` holds it. `None` if it is gone meanwhile.
    fn stub_uploaded(
        &mut self,
        tl: u32,
        name: &str,
        path: &Path,
        object: String,
        facts: LayerFacts,
    ) -> Result<Option<RemoteStub>, UploadError> {
        let stub = RemoteStub { object, facts };
        let stub_path = RemoteStub::path_for(path);
        put_durably(&stub_path, &stub.encode()).map_err(io(&stub_path))?;
        if !path.exists() {
            // Collected while it went up: the stub must not outlive it.
            let _ = std::fs::remove_file(&stub_path);
            return Ok(None);
        }
        // Up: the files it was merged from need not stand in for it any more.
        let _ = std::fs::remove_file(MergeInputs::path_for(path));
        let inode = std::fs::metadata(path).map_err(io(path))?.ino();
        self.known.insert((tl, name.to_string()), Known { inode, size: facts.size, stub: stub.clone() });
        self.status.uploaded_bytes.fetch_add(facts.size, Ordering::Relaxed);
        Ok(Some(stub))
    }

    /// The layer files (and their stubs) an index may name for the files `read` of the
    /// timeline in `dir`: each uploaded file, and in place of one still going up, the files
    /// it was merged from (when each is uploaded: the same files the newest index names, or
    /// uploaded since; not deleted, as only an index naming the merged file itself can doom
    /// them). `Ok(None)` if a file is neither: no index can name this manifest yet; [`Gone`]
    /// if one was merged or collected away since the manifest was read.
    fn indexable(
        &self,
        tl: u32,
        dir: &Path,
        read: &[(String, Option<RemoteStub>)],
    ) -> Result<Option<Vec<(String, RemoteStub)>>, Gone> {
        let mut out = Vec::with_capacity(read.len());
        for (name, stub) in read {
            if let Some(stub) = stub {
                out.push((name.clone(), stub.clone()));
                continue;
            }
            let path = dir.join(name);
            let inputs = match MergeInputs::read(&path) {
                Ok(Some(inputs)) => inputs,
                Ok(None) if !path.exists() => return Err(Gone),
                Ok(None) => return Ok(None),
                Err(e) => {
                    // Then the index waits for the file itself.
                    eprintln!("neon-sidecar: {e}");
                    return Ok(None);
                }
            };
            for (input, facts) in inputs.files {
                let key = (tl, input.clone());
                let uploaded = self.indexed.get(&key).or_else(|| self.known.get(&key).map(|k| &k.stub));
                match uploaded {
                    Some(stub) if stub.facts == facts => out.push((input, stub.clone())),
                    _ => return Ok(None),
                }
            }
        }
        Ok(Some(out))
    }

    /// Uploads what the chunk file of the timeline in `dir` has sealed beyond its pieces; the
    /// log read (which names that length).
    fn upload_commit_times(&mut self, tl: u32, dir: &Path) -> Result<Vec<u8>, UploadError> {
        let log_path = dir.join(LOG_FILE);
        let log = match std::fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&log_path)(e)),
        };
        let sealed = sealed_length(&log_path, &log)?;
        let pieces = self.pieces.entry(tl).or_default();
        let mut covered: u64 = pieces.iter().map(|p| p.len).sum();
        if covered > sealed {
            // Not the file the pieces were of (the store was set up again): all anew.
            pieces.clear();
            covered = 0;
        }
        if covered == sealed {
            return Ok(log);
        }
        let path = dir.join(CHUNK_FILE);
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut b = vec![0u8; (sealed - covered) as usize];
        f.read_exact_at(&mut b, covered).map_err(io(&path))?;
        let object = self.next_object(tl, &format!("commit-times.{covered:016X}"));
        self.unindexed.push(object.clone());
        self.remote.put_object(&object, &b)?;
        let piece = Piece { offset: covered, len: b.len() as u64, crc: crc32c::crc32c(&b), object };
        self.pieces.entry(tl).or_default().push(piece);
        Ok(log)
    }

    /// One round: uploads what is not uploaded, then (if anything changed) an index. The
    /// durable LSN the remote now holds.
    pub fn round(&mut self) -> Result<Lsn, UploadError> {
        // Another writer first: a fenced one neither uploads nor deletes.
        self.check_fenced()?;
        // A file merged or collected away while a pass read or uploaded the manifests: they
        // are read again at once (what went up meanwhile stays up), a few times at most.
        for _ in 0..PASSES_A_ROUND {
            if let Some(durable) = self.pass()? {
                return Ok(durable);
            }
        }
        Ok(self.status.durable())
    }

    /// Uploads what the manifests name and is not uploaded, then (if anything changed) an
    /// index: the durable LSN the remote now holds; `None` if a file the manifests named
    /// went away meanwhile.
    fn pass(&mut self) -> Result<Option<Lsn>, UploadError> {
        /// A timeline as read this round; a file's stub is `None` until it is uploaded.
        struct Read {
            durable: Lsn,
            dir: PathBuf,
            id: u32,
            manifest: Vec<u8>,
            files: Vec<(String, Option<RemoteStub>)>,
        }
        self.reap()?;
        // Before the timelines: a fork made meanwhile is then in them, if `current` names it.
        let current = read_file(&self.store.join(CURRENT))?;
        let identity = read_file(&self.store.join(IDENTITY))?;
        let mut timelines = Vec::new();
        // (timeline, file) positions of what is not uploaded yet, with its size: to upload
        // now, and going up in the background.
        let mut queue = Vec::new();
        let mut background = 0u64;
        for (id, dir) in timeline_dirs(&self.store)? {
            if !dir.join(MANIFEST).exists() {
                continue;
            }
            let (manifest, names, durable) = read_durable_manifest(&dir)?;
            let mut files = Vec::new();
            for name in names {
                let Ok(stub) = self.uploaded(id, &dir, &name)? else {
                    // The manifest changed under us: read again.
                    return Ok(None);
                };
                if stub.is_none() {
                    let path = dir.join(&name);
                    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                    let in_flight = self.in_flight.iter().any(|f| f.tl == id && f.name == name);
                    if in_flight {
                        background += size;
                    } else if size >= self.background_from
                        && self.in_flight.len() < BACKGROUND_AT_ONCE
                        && MergeInputs::path_for(&path).exists()
                    {
                        self.start_background(id, &name, &path)?;
                        background += size;
                    } else {
                        queue.push((timelines.len(), files.len(), size));
                    }
                }
                files.push((name, stub));
            }
            timelines.push(Read { durable, dir, id, manifest, files });
        }
        self.status.queued_files.store((queue.len() + self.in_flight.len()) as u64, Ordering::Relaxed);
        self.status.queued_bytes.store(queue.iter().map(|q| q.2).sum::<u64>() + background, Ordering::Relaxed);
        // Named in order (an index written later must not know a name before it is used), put
        // several at a time: a put's latency, not the store's bandwidth, bounds a round of
        // many small files.
        let mut puts = Vec::with_capacity(queue.len());
        for &(t, at, size) in &queue {
            let path = timelines[t].dir.join(&timelines[t].files[at].0);
            let object = self.next_object(timelines[t].id, &timelines[t].files[at].0);
            // Known before they are put: a put that failed may still have landed.
            self.unindexed.push(object.clone());
            self.unindexed.push(summary_object(&object));
            puts.push(Put { path, object, size });
        }
        let mut vanished = false;
        let mut failed = None;
        let done = put_layers(&self.remote, puts, self.background_from, &self.status);
        for ((t, at, _), (put, got)) in queue.into_iter().zip(done) {
            let (id, name) = (timelines[t].id, timelines[t].files[at].0.clone());
            // What went up is stubbed even when another put failed: the next round skips it.
            let stubbed = match got {
                Some(Ok(Some(facts))) => self.stub_uploaded(id, &name, &put.path, put.object, facts),
                Some(Ok(None)) => Ok(None),
                Some(Err(e)) => Err(e),
                // Not tried after another failed: the round ends with that error.
                None => continue,
            };
            match stubbed {
                Ok(Some(stub)) => timelines[t].files[at].1 = Some(stub),
                // Merged or collected meanwhile: the rest still goes up, then the manifests
                // are read again.
                Ok(None) => vanished = true,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        if vanished {
            return Ok(None);
        }
        let mut indexed = Vec::new();
        for t in &timelines {
            let files = match self.indexable(t.id, &t.dir, &t.files) {
                Ok(Some(files)) => files,
                // A file still going up that nothing uploaded can stand in for. (No garbage
                // collected either: that follows an index that landed.)
                Ok(None) => return Ok(Some(self.status.durable())),
                Err(Gone) => return Ok(None),
            };
            let manifest = match files.len() == t.files.len() && files.iter().zip(&t.files).all(|(a, b)| a.0 == b.0) {
                true => t.manifest.clone(),
                false => {
                    let names: Vec<String> = files.iter().map(|f| f.0.clone()).collect();
                    manifest_with_names(&t.dir.join(MANIFEST), &t.manifest, &names)?
                }
            };
            let commit_log = self.upload_commit_times(t.id, &t.dir)?;
            let history = match std::fs::read(t.dir.join(HISTORY)) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(io(&t.dir.join(HISTORY))(e)),
            };
            indexed.push(IndexedTimeline {
                id: t.id,
                manifest,
                history,
                commit_log,
                pieces: self.pieces.get(&t.id).cloned().unwrap_or_default(),
                files,
            });
        }
        let current_id = decode_current(&current);
        let durable = timelines.iter().find(|t| Some(t.id) == current_id).map_or(Lsn::INVALID, |t| t.durable);
        let index = Index { generation: self.generation, durable, identity, current, timelines: indexed };
        let encoded = index.encode();
        // Anything that changed (a file, a piece, a manifest, the durable LSN, a timeline):
        // a new index.
        if self.last_index.as_ref() != Some(&encoded) {
            self.sequence += 1;
            let name = index_name(self.generation, self.sequence);
            let named: BTreeSet<String> = index.objects().collect();
            // Known before it is put: a put that failed may still have landed.
            self.named.push_back((name.clone(), named.clone()));
            let now = Instant::now();
            if self.named.len() > 2 {
                let (old, objects) = self.named.pop_front().expect("three");
                self.doomed.push((old, now));
                for o in objects {
                    if !self.named.iter().any(|(_, n)| n.contains(&o)) {
                        self.doomed.push((o, now));
                    }
                }
            }
            self.remote.put_object(&name, &encoded)?;
            self.last_index = Some(encoded);
            self.indexed = indexed_files(&index);
            self.status.durable.fetch_max(durable.0, Ordering::AcqRel);
            for o in std::mem::take(&mut self.unindexed) {
                if !named.contains(&o) {
                    self.doomed.push((o, now));
                }
            }
        }
        self.collect_garbage();
        Ok(Some(durable))
    }

    /// Deletes what no index has named for the grace period, never what one of the two
    /// newest names (named again since it was doomed); a failure is tried again next round.
    fn collect_garbage(&mut self) {
        let now = Instant::now();
        let (remote, grace, named) = (&self.remote, self.grace, &self.named);
        self.doomed.retain(|(object, since)| {
            let live = named.iter().any(|(index, objects)| index == object || objects.contains(object));
            !live && (now.duration_since(*since) < grace || remote.delete(object).is_err())
        });
    }

    /// Rounds until `stop` (a last one then), every `every` and sooner after a failure is
    /// over: a failure is logged and retried with backoff (1 s, doubling to 30 s); being
    /// fenced ends it with that error. After each round, with `local_cache` (bytes, and how
    /// long a file read stays), layer files in the remote store are evicted from local disk
    /// down to that many bytes (`Store::evict_layers`).
    pub fn run(
        &mut self,
        every: Duration,
        stop: &AtomicBool,
        store: &Store,
        local_cache: Option<(u64, Duration)>,
    ) -> Result<(), UploadError> {
        let describe = self.remote.describe();
        let mut backoff = Duration::from_secs(1);
        let mut next = Instant::now();
        let mut failing = false;
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping {
                // What went up in the background is named by the last index too.
                self.wait_for_background();
            }
            if stopping || Instant::now() >= next {
                let before = self.status.uploaded_bytes.load(Ordering::Relaxed);
                let started = Instant::now();
                match self.round() {
                    Ok(durable) => {
                        let sent = self.status.uploaded_bytes.load(Ordering::Relaxed) - before;
                        if sent > 0 || failing {
                            eprintln!(
                                "neon-sidecar: remote {describe}: {sent} bytes of layer files uploaded in {} ms, history there up to {durable}",
                                started.elapsed().as_millis()
                            );
                        }
                        self.status.set_error(None);
                        failing = false;
                        backoff = Duration::from_secs(1);
                        // From the round's start: a long round is followed at once by the
                        // next, which takes what was flushed meanwhile.
                        next = started + every;
                        if let Some((limit, keep)) = local_cache {
                            match store.evict_layers(limit, keep) {
                                Ok((0, _)) => {}
                                Ok((n, bytes)) => eprintln!(
                                    "neon-sidecar: {n} layer files ({bytes} bytes) evicted from local disk (in {describe})"
                                ),
                                Err(e) => eprintln!("neon-sidecar: evicting layer files: {e}"),
                            }
                        }
                    }
                    Err(e @ (UploadError::Fenced { .. } | UploadError::ClaimLost { .. })) => {
                        self.status.fenced.store(true, Ordering::Relaxed);
                        self.status.set_error(Some(e.to_string()));
                        return Err(e);
                    }
                    Err(e) => {
                        eprintln!("neon-sidecar: remote {describe}: {e} (trying again in {backoff:?})");
                        self.status.set_error(Some(e.to_string()));
                        failing = true;
                        next = Instant::now() + backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                if stopping {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A layer file to upload in a round, as the object named for it.
struct Put {
    path: PathBuf,
    object: String,
    size: u64,
}

/// Uploads `puts` ([`put_layer`] each), [`UPLOADS_AT_ONCE`] at a time but one of
/// `large` bytes or more at a time (each holds its file twice in memory while it goes up),
/// taking each off the status's queue as it starts: each with what its upload came to, in the
/// order given. After a failure no other is started (the store is likely out of reach: the
/// round ends, backoff follows): those are `None`.
fn put_layers(remote: &Remote, puts: Vec<Put>, large: u64, status: &UploadStatus) -> Vec<(Put, Option<PutResult>)> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let one_large = Mutex::new(());
    let results: Vec<Mutex<Option<PutResult>>> = puts.iter().map(|_| Mutex::new(None)).collect();
    let work = || loop {
        if failed.load(Ordering::Relaxed) {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(put) = puts.get(i) else { break };
        let _large = (put.size >= large).then(|| one_large.lock().unwrap_or_else(|p| p.into_inner()));
        status.queued_files.fetch_sub(1, Ordering::Relaxed);
        status.queued_bytes.fetch_sub(put.size, Ordering::Relaxed);
        let got = put_layer(remote, &put.path, &put.object);
        if got.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(got);
    };
    std::thread::scope(|s| {
        for _ in 1..UPLOADS_AT_ONCE.min(puts.len()) {
            // A thread that cannot be made is one worker fewer: this one works too.
            let _ = std::thread::Builder::new().name("remote-upload".into()).spawn_scoped(s, work);
        }
        work();
    });
    let results = results.into_iter().map(|r| r.into_inner().unwrap_or_else(|p| p.into_inner()));
    puts.into_iter().zip(results).collect()
}

type PutResult = Result<Option<LayerFacts>, UploadError>;

/// Uploads the layer file at `path` as `object`, then its summary: the file's facts, or
/// `None` if it is gone (merged or collected meanwhile).
fn put_layer(remote: &Remote, path: &Path, object: &str) -> Result<Option<LayerFacts>, UploadError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let summary = LayerSummary::build(path, &bytes)?;
    remote.put_object(object, &bytes)?;
    remote.put_object(&summary_object(object), &summary.encode())?;
    Ok(Some(summary.facts))
}

/// The layer files an index names, by (timeline, name).
fn indexed_files(index: &Index) -> BTreeMap<(u32, String), RemoteStub> {
    let files = index.timelines.iter().flat_map(|t| t.files.iter().map(|(n, s)| ((t.id, n.clone()), s.clone())));
    files.collect()
}

fn read_file(path: &Path) -> Result<Vec<u8>, UploadError> {
    std::fs::read(path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::download::RemoteLayers;
    use crate::remote::faults::Faulty;
    use crate::remote::storage::{ObjectStorage, RemoteStorage, RemoteUrl, S3Settings};
    use crate::repo::key::Key;
    use crate::repo::layer::LayerSource;
    use crate::repo::store::Identity;
    use crate::repo::timeline::manifest_layers;
    use crate::repo::value::Value;

    /// A store of three layer files (a key written at 100, 200, 300; one flush each).
    fn store_of_three_layers(dir: &Path) -> Store {
        let s = Store::create(dir, Identity { system_id: 7, wal_segment_size: 16 << 20 }, 1).unwrap();
        let t = s.current();
        t.begin_history(Lsn(100));
        for n in 1..=3u8 {
            let lsn = Lsn(100 * n as u64);
            t.put(Key::meta(1, 1), lsn, Value::Image(bytes::Bytes::from(vec![n; 64])));
            t.advance(lsn);
            t.flush().unwrap();
        }
        s
    }

    /// A remote store in files under `dir`, failing when told to.
    fn faulty_files(dir: &Path) -> (Arc<Faulty>, Remote) {
        let url = RemoteUrl::File { dir: dir.join("remote") };
        let files: Arc<dyn RemoteStorage> = Arc::new(ObjectStorage::open(&url, &S3Settings::default()).unwrap());
        let faulty = Arc::new(Faulty::new(files));
        (faulty.clone(), Remote::new(faulty))
    }

    fn named_objects_exist(remote: &Remote) -> BTreeSet<String> {
        let (name, index) = newest_index(remote).unwrap().expect("an index");
        let named: BTreeSet<String> = index.objects().collect();
        for o in &named {
            remote.get_object(o).unwrap_or_else(|e| panic!("{name} names {o}: {e}"));
        }
        named
    }

    #[test]
    fn killed_between_its_stubs_and_its_index_the_next_generation_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (faulty, remote) = faulty_files(tmp.path());
        let dir = tmp.path().join("store");
        let store = store_of_three_layers(&dir);
        let layers = store.current().layers().len();
        assert_eq!(layers, 3);

        // Every layer file goes up and is stubbed; the index does not: killed there.
        let mut first = Uploader::start(remote.clone(), &dir).unwrap();
        *faulty.fail_under.lock().unwrap() = Some(INDEX_DIR.to_string());
        let e = first.round().unwrap_err().to_string();
        assert!(e.contains("upload of object index/"), "{e}");
        drop(first);
        *faulty.fail_under.lock().unwrap() = None;
        assert!(newest_index(&remote).unwrap().is_none());

        // The next generation names what the stubs name, and its garbage collection (no grace
        // at all here) never takes an object its index names.
        let mut second = Uploader::start(remote.clone(), &dir).unwrap();
        assert_eq!(second.generation(), 2);
        second.set_grace(Duration::ZERO);
        for _ in 0..3 {
            second.round().unwrap();
        }
        let named = named_objects_exist(&remote);
        let layer_objects: Vec<String> = remote.list("timelines").unwrap();
        assert_eq!(layer_objects.len(), layers * 2, "every layer file and its summary: {layer_objects:?}");
        assert!(layer_objects.iter().all(|o| named.contains(o) && o.contains(".g00000001.")), "{layer_objects:?}");
        assert_eq!(second.status.queued_files.load(Ordering::Relaxed), 0);
        assert_eq!(second.status.durable(), Lsn(300));

        // Evicted, every layer file is fetched back when read, and reads as before.
        let before = store.current().values_for(Key::meta(1, 1), Lsn(300)).unwrap();
        drop(store);
        let layers_source = Arc::new(RemoteLayers::new(remote.clone()));
        let source: Arc<dyn LayerSource> = layers_source.clone();
        let store = Store::open_with_source(&dir, true, Some(source)).unwrap();
        assert_eq!(store.evict_layers(0, Duration::ZERO).unwrap().0, layers);
        assert_eq!(store.local_layers(), (0, 0));
        assert_eq!(store.current().values_for(Key::meta(1, 1), Lsn(300)).unwrap(), before);
        // Read from byte ranges of the newest object alone (its value needs no older one).
        assert_eq!(layers_source.fetched_files.load(Ordering::Relaxed), 0, "a file was fetched whole");
        assert!(layers_source.range_reads.load(Ordering::Relaxed) > 0);
        assert_eq!(store.local_layers(), (0, 0));
        // A key no file holds: ruled out by the summaries, no more ranges read.
        let ranges = layers_source.range_reads.load(Ordering::Relaxed);
        assert!(store.current().values_for(Key::meta(1, 2), Lsn(300)).unwrap().is_empty());
        assert!(layers_source.range_reads.load(Ordering::Relaxed) <= ranges + 2, "summaries of the two older files");

        // An older writer, once a newer generation claimed the prefix, stops at its next
        // round: neither an index nor a deletion.
        let _third = Uploader::start(remote.clone(), &dir).unwrap();
        let e = second.round().unwrap_err();
        assert!(matches!(e, UploadError::Fenced { ours: 2, newer: 3, .. }), "{e}");
        assert!(e.to_string().contains("generation 3 (another neon-sidecar, started later"), "{e}");
        named_objects_exist(&remote);
    }

    #[test]
    fn while_a_merged_file_goes_up_an_index_names_the_files_it_was_merged_from() {
        let tmp = tempfile::tempdir().unwrap();
        let (faulty, remote) = faulty_files(tmp.path());
        let dir = tmp.path().join("store");
        drop(store_of_three_layers(&dir));
        let source: Arc<dyn LayerSource> = Arc::new(RemoteLayers::new(remote.clone()));
        let store = Store::open_with_source(&dir, true, Some(source)).unwrap();
        let t = store.current();
        let mut u = Uploader::start(remote.clone(), &dir).unwrap();
        u.set_grace(Duration::ZERO);
        let largest = t.layers().iter().map(|l| l.size_bytes()).max().unwrap();
        u.set_background_from(largest * 2);
        assert_eq!(u.round().unwrap(), Lsn(300));
        let inputs: Vec<String> =
            newest_index(&remote).unwrap().unwrap().1.timelines[0].files.iter().map(|f| f.0.clone()).collect();
        assert_eq!(inputs.len(), 3);

        // The three merged into one, which cannot go up for now; then a new file, which can.
        let merged = t.merge_layers(0, 3, 1 << 30).unwrap().expect("a merge");
        let merged_name = merged.file_name().unwrap().to_str().unwrap().to_string();
        assert!(MergeInputs::read(&merged).unwrap().is_some(), "the merge did not say what it merged");
        *faulty.fail_under.lock().unwrap() = Some(format!("timelines/00000001/{merged_name}"));
        t.put(Key::meta(1, 1), Lsn(400), Value::Image(bytes::Bytes::from(vec![4; 64])));
        t.advance(Lsn(400));
        t.flush().unwrap();
        assert_eq!(u.round().unwrap(), Lsn(400), "the merged file held the remote back");
        let (name, index) = newest_index(&remote).unwrap().unwrap();
        let tl = &index.timelines[0];
        let named: Vec<&str> = tl.files.iter().map(|f| f.0.as_str()).collect();
        assert!(inputs.iter().all(|i| named.contains(&i.as_str())) && named.len() == 4, "{name} names {named:?}");
        let (in_manifest, durable) = manifest_layers(Path::new(&name), &tl.manifest).unwrap();
        assert_eq!((in_manifest.len(), durable), (4, Lsn(400)));
        assert!(!in_manifest.contains(&merged_name));
        named_objects_exist(&remote);

        // Once it is up, the index names it instead, and its inputs file is gone.
        *faulty.fail_under.lock().unwrap() = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let _ = u.round();
            let (_, index) = newest_index(&remote).unwrap().unwrap();
            if index.timelines[0].files.iter().any(|f| f.0 == merged_name) {
                assert_eq!(index.timelines[0].files.len(), 2);
                break;
            }
            assert!(Instant::now() < deadline, "the merged file never went up");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(MergeInputs::read(&merged).unwrap().is_none());
        named_objects_exist(&remote);
        assert_eq!(t.values_for(Key::meta(1, 1), Lsn(350)).unwrap().last().unwrap().0, Lsn(300));
    }

    #[test]
    fn a_put_that_fails_in_a_round_leaves_those_started_uploaded_and_only_it_goes_up_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (faulty, remote) = faulty_files(tmp.path());
        let dir = tmp.path().join("store");
        let store = store_of_three_layers(&dir);
        let paths: Vec<PathBuf> = store.current().layers().iter().map(|l| l.path().to_path_buf()).collect();
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        // The last: every other was started before it (none is started after a failure).
        let last = name(&paths[2]);
        let mut u = Uploader::start(remote.clone(), &dir).unwrap();
        *faulty.fail_under.lock().unwrap() = Some(format!("{TIMELINES}/00000001/{last}."));
        let e = u.round().unwrap_err().to_string();
        assert!(e.contains(&last), "the error names the object: {e}");
        let stubbed: Vec<bool> = paths.iter().map(|p| RemoteStub::path_for(p).exists()).collect();
        assert_eq!(stubbed, [true, true, false], "the files whose puts went through are stubbed");
        for p in [&paths[0], &paths[1]] {
            let stub = RemoteStub::read(p).unwrap().expect("a stub");
            assert!(stub.object.contains(&name(p)), "{} stubbed as {}", p.display(), stub.object);
        }
        assert!(newest_index(&remote).unwrap().is_none(), "no index names a manifest with a file missing");

        *faulty.fail_under.lock().unwrap() = None;
        let puts = faulty.puts.load(Ordering::SeqCst);
        assert_eq!(u.round().unwrap(), Lsn(300));
        // The last file and its summary again, then the commit times and the index.
        assert!(faulty.puts.load(Ordering::SeqCst) - puts <= 4, "only the file that failed went up again");
        let named = named_objects_exist(&remote);
        assert!(paths.iter().all(|p| named.iter().any(|o| o.contains(&name(p)))), "{named:?}");
        assert_eq!(u.status.queued_files.load(Ordering::Relaxed), 0);
        assert_eq!(u.status.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn another_clusters_prefix_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let url = RemoteUrl::File { dir: tmp.path().join("remote") };
        let remote = Remote::new(Arc::new(ObjectStorage::open(&url, &S3Settings::default()).unwrap()));
        let ours = tmp.path().join("ours");
        drop(store_of_three_layers(&ours));
        Uploader::start(remote.clone(), &ours).unwrap().round().unwrap();
        let theirs = tmp.path().join("theirs");
        drop(Store::create(&theirs, Identity { system_id: 8, wal_segment_size: 16 << 20 }, 1).unwrap());
        let before = remote.list("").unwrap();
        let e = Uploader::start(remote.clone(), &theirs).err().expect("refused").to_string();
        assert!(e.contains("holds another cluster's history") && e.contains("index/"), "{e}");
        assert_eq!(remote.list("").unwrap(), before, "a refused sidecar claimed or wrote something");
    }
}
