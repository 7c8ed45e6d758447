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
//! <prefix>/timelines/<tl, 8 hex>/commit-times.<offset, 16 hex>.g<generation, 8 hex>.<n>
//!                                                 a piece of the commit-time chunk file
//! <prefix>/index/…                                see `index`
//! every object sealed (`object`)
//! ```

use super::index::{generation_of, index_name, Index, IndexedTimeline, Piece, INDEX_DIR};
use super::{Remote, RemoteError};
use crate::repo::commit_times::{sealed_length, CommitTimesError, CHUNK_FILE, LOG_FILE};
use crate::repo::layer::{LayerError, LayerFacts, RemoteStub};
use crate::repo::store::Store;
use crate::repo::timeline::{read_durable_manifest, write_durably, RepoError};
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
    #[error("remote store {store}: {what} is corrupt: {why}")]
    Corrupt { store: String, what: String, why: String },
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

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub fn error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
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
    let dir = store.join("timelines");
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
        let generation = generations(&remote)?.into_iter().max().unwrap_or(0) + 1;
        let nonce = random_nonce();
        let claim = format!("generations/{generation:08X}");
        let body = format!("nonce = {nonce}\npid = {}\n", std::process::id());
        remote.put_object(&claim, body.as_bytes())?;
        if remote.get_object(&claim)? != body.as_bytes() {
            // Another sidecar claimed the same generation at the same moment, and won.
            return Err(UploadError::Fenced { store: remote.describe(), ours: generation, newer: generation });
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
            unindexed: Vec::new(),
            doomed: Vec::new(),
            grace: GRACE,
            status: Default::default(),
        };
        u.status.generation.store(generation, Ordering::Relaxed);
        let newest = newest_index(&u.remote)?;
        let now = Instant::now();
        let mut live = BTreeSet::new();
        if let Some((name, index)) = &newest {
            live = index.objects().map(str::to_string).collect();
            for t in &index.timelines {
                let dir = store.join(format!("timelines/{:08X}", t.id));
                if pieces_match(&dir, &t.pieces) {
                    u.pieces.insert(t.id, t.pieces.clone());
                }
            }
            u.named.push_back((name.clone(), live.clone()));
            u.status.durable.store(index.durable.0, Ordering::Relaxed);
        }
        for dir in [INDEX_DIR, "timelines"] {
            for object in u.remote.list(dir)? {
                let keep = live.contains(&object) || newest.as_ref().is_some_and(|(n, _)| *n == object);
                if !keep {
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
            return Err(UploadError::Fenced { store, ours: self.generation, newer: self.generation });
        }
        Ok(())
    }

    fn next_object(&mut self, tl: u32, base: &str) -> String {
        self.made += 1;
        format!("timelines/{tl:08X}/{base}.g{:08X}.{}", self.generation, self.made)
    }

    /// Whether the layer file `name` of timeline `tl` is uploaded: its stub if so. `None` if
    /// not (the file is there without a stub of it).
    fn uploaded(&mut self, tl: u32, name: &str, path: &Path) -> Result<Option<RemoteStub>, UploadError> {
        let m = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Evicted: its stub says where it is.
                return match RemoteStub::read(path)? {
                    Some(stub) => Ok(Some(stub)),
                    None => Err(UploadError::Corrupt {
                        store: self.store.display().to_string(),
                        what: format!("layer file {}", path.display()),
                        why: "the manifest names it, yet neither it nor its remote stub is there".into(),
                    }),
                };
            }
            Err(e) => return Err(io(path)(e)),
        };
        if let Some(k) = self.known.get(&(tl, name.to_string())) {
            if k.inode == m.ino() && k.size == m.len() {
                return Ok(Some(k.stub.clone()));
            }
        }
        let stub = match RemoteStub::read(path) {
            Ok(Some(stub)) => stub,
            // A damaged stub of a file that is here: uploaded again, stubbed anew.
            Ok(None) | Err(LayerError::Corrupt { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if stub.facts != LayerFacts::read(path)? {
            return Ok(None);
        }
        self.known.insert((tl, name.to_string()), Known { inode: m.ino(), size: m.len(), stub: stub.clone() });
        Ok(Some(stub))
    }

    /// Uploads a layer file and stubs it. `None` if it is gone meanwhile (collected, merged).
    fn upload_layer(&mut self, tl: u32, name: &str, path: &Path) -> Result<Option<RemoteStub>, UploadError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        };
        let facts = LayerFacts::of(path, &bytes)?;
        let object = self.next_object(tl, name);
        self.remote.put_object(&object, &bytes)?;
        self.unindexed.push(object.clone());
        let stub = RemoteStub { object, facts };
        let stub_path = RemoteStub::path_for(path);
        let mut tmp = stub_path.as_os_str().to_owned();
        tmp.push(".tmp");
        write_durably(Path::new(&tmp), &stub_path, &stub.encode()).map_err(io(&stub_path))?;
        if !path.exists() {
            // Collected while it went up: the stub must not outlive it.
            let _ = std::fs::remove_file(&stub_path);
            return Ok(None);
        }
        let inode = std::fs::metadata(path).map_err(io(path))?.ino();
        self.known.insert((tl, name.to_string()), Known { inode, size: facts.size, stub: stub.clone() });
        self.status.uploaded_bytes.fetch_add(facts.size, Ordering::Relaxed);
        Ok(Some(stub))
    }

    /// Uploads what the chunk file of the timeline in `dir` has sealed beyond its pieces; the
    /// log read (which names that length). Whether a piece went up.
    fn upload_commit_times(&mut self, tl: u32, dir: &Path) -> Result<(Vec<u8>, bool), UploadError> {
        let log_path = dir.join(LOG_FILE);
        let log = match std::fs::read(&log_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
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
            return Ok((log, false));
        }
        let path = dir.join(CHUNK_FILE);
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        let mut b = vec![0u8; (sealed - covered) as usize];
        f.read_exact_at(&mut b, covered).map_err(io(&path))?;
        let object = self.next_object(tl, &format!("commit-times.{covered:016X}"));
        self.remote.put_object(&object, &b)?;
        self.unindexed.push(object.clone());
        let piece = Piece { offset: covered, len: b.len() as u64, crc: crc32c::crc32c(&b), object };
        self.pieces.entry(tl).or_default().push(piece);
        Ok((log, true))
    }

    /// One round: uploads what is not uploaded, then (if anything changed) an index. The
    /// durable LSN the remote now holds.
    pub fn round(&mut self) -> Result<Lsn, UploadError> {
        /// A timeline as read this round; a file's stub is `None` until it is uploaded.
        struct Read {
            durable: Lsn,
            dir: PathBuf,
            id: u32,
            manifest: Vec<u8>,
            files: Vec<(String, Option<RemoteStub>)>,
        }
        let mut timelines = Vec::new();
        // (timeline, file) positions of what is not uploaded yet, with its size.
        let mut queue = Vec::new();
        for (id, dir) in timeline_dirs(&self.store)? {
            if !dir.join("manifest").exists() {
                continue;
            }
            let (manifest, names, durable) = read_durable_manifest(&dir)?;
            let mut files = Vec::new();
            for name in names {
                let path = dir.join(&name);
                let stub = self.uploaded(id, &name, &path)?;
                if stub.is_none() {
                    queue.push((timelines.len(), files.len(), std::fs::metadata(&path).map_or(0, |m| m.len())));
                }
                files.push((name, stub));
            }
            timelines.push(Read { durable, dir, id, manifest, files });
        }
        self.status.queued_files.store(queue.len() as u64, Ordering::Relaxed);
        self.status.queued_bytes.store(queue.iter().map(|q| q.2).sum(), Ordering::Relaxed);
        let mut changed = !queue.is_empty();
        for (t, at, size) in queue {
            let (id, name) = (timelines[t].id, timelines[t].files[at].0.clone());
            let path = timelines[t].dir.join(&name);
            let Some(stub) = self.upload_layer(id, &name, &path)? else {
                // The manifest changed under us: the next round reads it again.
                return Ok(self.status.durable());
            };
            timelines[t].files[at].1 = Some(stub);
            self.status.queued_files.fetch_sub(1, Ordering::Relaxed);
            self.status.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        }
        let mut indexed = Vec::new();
        for t in &timelines {
            let (commit_log, sent) = self.upload_commit_times(t.id, &t.dir)?;
            changed |= sent;
            indexed.push(IndexedTimeline {
                id: t.id,
                manifest: t.manifest.clone(),
                history: std::fs::read(t.dir.join("history")).unwrap_or_default(),
                commit_log,
                pieces: self.pieces.get(&t.id).cloned().unwrap_or_default(),
                files: t.files.iter().map(|(n, s)| (n.clone(), s.clone().expect("uploaded above"))).collect(),
            });
        }
        let current = read_file(&self.store.join("current"))?;
        let current_id = current.get(8..12).map(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")));
        let durable = timelines.iter().find(|t| Some(t.id) == current_id).map_or(Lsn::INVALID, |t| t.durable);
        if changed || durable > self.status.durable() || self.sequence == 0 {
            self.check_fenced()?;
            self.sequence += 1;
            let index = Index {
                generation: self.generation,
                durable,
                identity: read_file(&self.store.join("identity"))?,
                current,
                timelines: indexed,
            };
            let name = index_name(self.generation, self.sequence);
            self.remote.put_object(&name, &index.encode())?;
            self.status.durable.store(durable.0, Ordering::Release);
            let named: BTreeSet<String> = index.objects().map(str::to_string).collect();
            let now = Instant::now();
            for o in std::mem::take(&mut self.unindexed) {
                if !named.contains(&o) {
                    self.doomed.push((o, now));
                }
            }
            self.named.push_back((name, named));
            if self.named.len() > 2 {
                let (old, objects) = self.named.pop_front().expect("three");
                self.doomed.push((old, now));
                for o in objects {
                    if !self.named.iter().any(|(_, n)| n.contains(&o)) {
                        self.doomed.push((o, now));
                    }
                }
            }
        }
        self.collect_garbage();
        Ok(durable)
    }

    /// Deletes what no index has named for the grace period; a failure is tried again next
    /// round.
    fn collect_garbage(&mut self) {
        let now = Instant::now();
        let (remote, grace) = (&self.remote, self.grace);
        self.doomed.retain(|(object, since)| now.duration_since(*since) < grace || remote.delete(object).is_err());
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
            if stopping || Instant::now() >= next {
                let before = self.status.uploaded_bytes.load(Ordering::Relaxed);
                match self.round() {
                    Ok(durable) => {
                        let sent = self.status.uploaded_bytes.load(Ordering::Relaxed) - before;
                        if sent > 0 || failing {
                            eprintln!(
                                "neon-sidecar: remote {describe}: {sent} bytes of layer files uploaded, history there up to {durable}"
                            );
                        }
                        self.status.set_error(None);
                        failing = false;
                        backoff = Duration::from_secs(1);
                        next = Instant::now() + every;
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
                    Err(e @ UploadError::Fenced { .. }) => {
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

fn read_file(path: &Path) -> Result<Vec<u8>, UploadError> {
    std::fs::read(path).map_err(io(path))
}
