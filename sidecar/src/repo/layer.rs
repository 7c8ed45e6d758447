//! Delta-layer files: an immutable set of values, each filed under (key, LSN), as written when
//! the in-memory layer is frozen. Written once to a temporary name, fsync'd and renamed (so a
//! crash leaves either the whole file or none), then read through `mmap`; every blob and the
//! index carry a CRC32C that is checked on read, so a corrupted file is reported, never served.
//!
//! ```text
//! file:   blobs | index | footer (48 bytes)
//! blob:   u32 len | u32 crc32c(payload) | payload (an encoded Value)
//! index:  entries sorted by (key, lsn), each 38 bytes:
//!           key [18] | lsn u64 | blob offset u64 | blob payload length u32
//! footer: magic u64 "NEONDL01" | version u32 | entries u32 | index offset u64 |
//!         min lsn u64 | max lsn u64 | index crc32c u32 | footer crc32c u32 (of the 44 bytes before)
//! all integers little-endian, except keys (their own big-endian encoding, see `key`).
//! ```
//!
//! With a remote store, a layer file once uploaded gets a *stub* beside it ([`RemoteStub`]:
//! its object and the facts of its footer); the local file may then be evicted
//! ([`DeltaLayer::evict`]) and is fetched back through a [`LayerSource`] when next read, and
//! checked to be the same file. A store attached from the remote holds stubs only at first.

use super::key::{Key, KEY_LEN};
use super::layer_summary::{summary_object, LayerSummary};
use super::value::{Value, ValueError};
use bytes::{Bytes, BytesMut};
use memmap2::Mmap;
use neon_types::Lsn;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

const MAGIC: u64 = u64::from_le_bytes(*b"NEONDL01");
const VERSION: u32 = 1;
pub(crate) const FOOTER_LEN: usize = 48;
pub(crate) const ENTRY_LEN: usize = KEY_LEN + 8 + 8 + 4;
const BLOB_HEADER_LEN: usize = 8;

/// Problems with a layer file, naming it.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("layer file {path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("layer file {path}: {key} at {lsn}: {source}")]
    Value { path: PathBuf, key: Key, lsn: Lsn, source: ValueError },
    #[error("layer file {path} {what}")]
    Remote { path: PathBuf, what: String },
    #[error("layer file {path} is in the remote store only (object {object}); run with the --remote that holds it")]
    NoRemote { path: PathBuf, object: String },
}

/// Writes a delta layer. Nothing is visible under the final name until [`finish`]; dropping
/// the writer unfinished removes the temporary file.
///
/// [`finish`]: DeltaLayerWriter::finish
pub struct DeltaLayerWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    offset: u64,
    entries: Vec<(Key, Lsn, u64, u32)>,
    scratch: BytesMut,
}

impl DeltaLayerWriter {
    pub fn new(path: &Path) -> Result<DeltaLayerWriter, LayerError> {
        let tmp = path.with_extension("tmp");
        // New and private (the values are the database's rows); a leftover of an interrupted
        // write is replaced.
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| LayerError::Io { path: tmp.clone(), source })?;
        Ok(DeltaLayerWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            offset: 0,
            entries: Vec::new(),
            scratch: BytesMut::new(),
        })
    }

    fn io(&self, source: std::io::Error) -> LayerError {
        LayerError::Io { path: self.tmp.clone(), source }
    }

    /// Appends a value; values may come in any order.
    pub fn put(&mut self, key: Key, lsn: Lsn, value: &Value) -> Result<(), LayerError> {
        self.scratch.clear();
        value.encode(&mut self.scratch);
        let len = u32::try_from(self.scratch.len()).map_err(|_| LayerError::Corrupt {
            path: self.tmp.clone(),
            what: format!("value of {key} at {lsn} is larger than 4 GB"),
        })?;
        let crc = crc32c::crc32c(&self.scratch);
        let out = self.out.as_mut().expect("open until finish");
        let r = out
            .write_all(&len.to_le_bytes())
            .and_then(|()| out.write_all(&crc.to_le_bytes()))
            .and_then(|()| out.write_all(&self.scratch));
        r.map_err(|e| self.io(e))?;
        self.entries.push((key, lsn, self.offset, len));
        self.offset += (BLOB_HEADER_LEN + len as usize) as u64;
        Ok(())
    }

    /// Writes the index and footer, makes the file durable and gives it its final name.
    pub fn finish(mut self) -> Result<PathBuf, LayerError> {
        self.entries.sort_by_key(|e| (e.0, e.1));
        let mut index = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for (key, lsn, off, len) in &self.entries {
            index.extend_from_slice(&key.encode());
            index.extend_from_slice(&lsn.0.to_le_bytes());
            index.extend_from_slice(&off.to_le_bytes());
            index.extend_from_slice(&len.to_le_bytes());
        }
        let min = self.entries.iter().map(|e| e.1).min().unwrap_or_default();
        let max = self.entries.iter().map(|e| e.1).max().unwrap_or_default();
        let mut footer = Vec::with_capacity(FOOTER_LEN);
        footer.extend_from_slice(&MAGIC.to_le_bytes());
        footer.extend_from_slice(&VERSION.to_le_bytes());
        footer.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(&min.0.to_le_bytes());
        footer.extend_from_slice(&max.0.to_le_bytes());
        footer.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
        let fcrc = crc32c::crc32c(&footer);
        footer.extend_from_slice(&fcrc.to_le_bytes());
        let mut out = self.out.take().expect("open until finish");
        let r = out.write_all(&index).and_then(|()| out.write_all(&footer)).and_then(|()| out.flush());
        r.map_err(|e| self.io(e))?;
        let file = out.into_inner().map_err(|e| self.io(e.into_error()))?;
        file.sync_all().map_err(|e| self.io(e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.io(e))?;
        // The rename itself must survive a crash: sync the directory.
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| LayerError::Io { path: dir.to_path_buf(), source })?;
        }
        Ok(self.path.clone())
    }
}

impl Drop for DeltaLayerWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Where a layer file that is not on local disk — evicted once it was uploaded, or never
/// downloaded on this machine — is fetched from (the remote store; `repo` knows it only by
/// this). Errors name the object and the store.
pub trait LayerSource: Send + Sync {
    /// Puts the file `stub` describes at `path`: written to a temporary name, fsync'd and
    /// renamed.
    fn fetch(&self, stub: &RemoteStub, path: &Path) -> Result<(), LayerError>;
    /// The summary of the file `stub` describes (checked), if the store has one.
    fn summary(&self, stub: &RemoteStub, path: &Path) -> Result<Option<LayerSummary>, LayerError>;
    /// The footer of the file `stub` describes, once its object is found to be of that
    /// file's size (a damaged error if not).
    fn read_footer(&self, stub: &RemoteStub, path: &Path) -> Result<Bytes, LayerError>;
    /// Byte ranges of the file `stub` describes, unchecked: the caller checks what they hold.
    fn read_ranges(&self, stub: &RemoteStub, path: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, LayerError>;
    /// What came back from object `stub.object` is damaged (`why`): the error to return,
    /// counted and logged.
    fn damaged(&self, stub: &RemoteStub, path: &Path, why: &str) -> LayerError;
}

/// Single-key reads of an evicted file, since it was last local, before the whole file is
/// fetched instead (a base backup or a scan reads every key: one fetch beats thousands).
const RANGED_READS_BEFORE_FETCH: u32 = 256;
/// Index blocks, then values, fetched at a time by a single-key read of an evicted file.
const BLOCKS_AT_ONCE: usize = 8;
const VALUES_AT_ONCE: usize = 32;

/// What is known of a layer file without reading its values: from its footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerFacts {
    pub size: u64,
    pub entries: u32,
    pub lsn_range: (Lsn, Lsn),
    /// The footer's own CRC32C: which file this is (names are reused once a file is gone).
    pub footer_crc: u32,
}

impl LayerFacts {
    /// Bytes of [`LayerFacts::encode_into`]: size u64 | entries u32 | min lsn u64 |
    /// max lsn u64 | footer crc32c u32, little-endian (in stubs and in the remote index).
    pub const ENCODED_LEN: usize = 32;

    pub fn encode_into(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.entries.to_le_bytes());
        b.extend_from_slice(&self.lsn_range.0 .0.to_le_bytes());
        b.extend_from_slice(&self.lsn_range.1 .0.to_le_bytes());
        b.extend_from_slice(&self.footer_crc.to_le_bytes());
    }

    pub fn decode(b: &[u8; Self::ENCODED_LEN]) -> LayerFacts {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        LayerFacts {
            size: u64_at(0),
            entries: u32_at(8),
            lsn_range: (Lsn(u64_at(12)), Lsn(u64_at(20))),
            footer_crc: u32_at(28),
        }
    }

    /// The facts of a whole layer file, checking its footer.
    pub fn of(path: &Path, bytes: &[u8]) -> Result<LayerFacts, LayerError> {
        let footer = bytes.len().checked_sub(FOOTER_LEN).map(|at| &bytes[at..]);
        Self::from_footer(path, bytes.len() as u64, footer)
    }

    /// The facts of the layer file at `path`, from its footer alone.
    pub fn read(path: &Path) -> Result<LayerFacts, LayerError> {
        use std::os::unix::fs::FileExt;
        let io = |source| LayerError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut footer = [0u8; FOOTER_LEN];
        let footer = match size.checked_sub(FOOTER_LEN as u64) {
            Some(at) => {
                file.read_exact_at(&mut footer, at).map_err(io)?;
                Some(&footer[..])
            }
            None => None,
        };
        Self::from_footer(path, size, footer)
    }

    pub(crate) fn from_footer(path: &Path, size: u64, footer: Option<&[u8]>) -> Result<LayerFacts, LayerError> {
        let corrupt = |what: String| LayerError::Corrupt { path: path.to_path_buf(), what };
        let Some(f) = footer else { return Err(corrupt(format!("{size} bytes is shorter than its footer"))) };
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().expect("8 bytes"));
        if crc32c::crc32c(&f[..44]) != u32_at(44) {
            return Err(corrupt("footer checksum mismatch".into()));
        }
        if u64_at(0) != MAGIC || u32_at(8) != VERSION {
            return Err(corrupt(format!("not a version {VERSION} delta layer")));
        }
        Ok(LayerFacts {
            size,
            entries: u32_at(12),
            lsn_range: (Lsn(u64_at(24)), Lsn(u64_at(32))),
            footer_crc: u32_at(44),
        })
    }
}

/// A layer file's copy in the remote store, kept beside the file as `<name>.remote` once it
/// is uploaded (and in place of the file once it is evicted): the object, and the facts of
/// the file, so that the layer is known without it.
///
/// ```text
/// "NEONRL01" | facts (LayerFacts::encode_into, 32 bytes) | u16 len | object name |
/// crc32c u32 (of all before it); little-endian
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteStub {
    pub object: String,
    pub facts: LayerFacts,
}

const STUB_MAGIC: &[u8; 8] = b"NEONRL01";
/// What a layer file's stub is called: `<layer file name><STUB_SUFFIX>`.
pub const STUB_SUFFIX: &str = ".remote";

impl RemoteStub {
    pub fn path_for(layer: &Path) -> PathBuf {
        beside(layer, STUB_SUFFIX)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.object.len());
        b.extend_from_slice(STUB_MAGIC);
        self.facts.encode_into(&mut b);
        b.extend_from_slice(&(self.object.len() as u16).to_le_bytes());
        b.extend_from_slice(self.object.as_bytes());
        b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
        b
    }

    pub fn decode(path: &Path, b: &[u8]) -> Result<RemoteStub, LayerError> {
        let corrupt = |what: &str| LayerError::Corrupt { path: path.to_path_buf(), what: what.to_string() };
        if b.len() < 46 || &b[..8] != STUB_MAGIC {
            return Err(corrupt("not a remote stub"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(corrupt("stub checksum mismatch"));
        }
        let len = u16::from_le_bytes(body[40..42].try_into().expect("2 bytes")) as usize;
        let object = body.get(42..).filter(|o| o.len() == len).ok_or_else(|| corrupt("stub length"))?;
        Ok(RemoteStub {
            object: String::from_utf8(object.to_vec()).map_err(|_| corrupt("object name is not UTF-8"))?,
            facts: LayerFacts::decode(body[8..40].try_into().expect("32 bytes")),
        })
    }

    /// The stub beside `layer`, if there is one.
    pub fn read(layer: &Path) -> Result<Option<RemoteStub>, LayerError> {
        read_beside(&Self::path_for(layer), Self::decode)
    }
}

/// `<layer file><suffix>`: a file kept beside a layer file (its stub, its merge inputs).
fn beside(layer: &Path, suffix: &str) -> PathBuf {
    let mut p = layer.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The file at `path` beside a layer file, decoded, if it is there.
fn read_beside<T>(path: &Path, decode: fn(&Path, &[u8]) -> Result<T, LayerError>) -> Result<Option<T>, LayerError> {
    match std::fs::read(path) {
        Ok(b) => decode(path, &b).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LayerError::Io { path: path.to_path_buf(), source }),
    }
}

/// The files a merged layer file holds the values of, kept beside it as `<name>.inputs`
/// (written by the merge when history goes to a remote store, removed once the merged file
/// is uploaded): until then an index may name those files' objects in its place, so a merge
/// never holds back what the remote store holds.
///
/// ```text
/// "NEONMI01" | u32 count | per file: u16 len | name | facts (LayerFacts::encode_into) |
/// crc32c u32 (of all before it); little-endian
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeInputs {
    pub files: Vec<(String, LayerFacts)>,
}

const INPUTS_MAGIC: &[u8; 8] = b"NEONMI01";
/// What a merged layer file's inputs are called: `<layer file name><INPUTS_SUFFIX>`.
pub const INPUTS_SUFFIX: &str = ".inputs";

impl MergeInputs {
    pub fn path_for(layer: &Path) -> PathBuf {
        beside(layer, INPUTS_SUFFIX)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = INPUTS_MAGIC.to_vec();
        b.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for (name, facts) in &self.files {
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
            facts.encode_into(&mut b);
        }
        b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
        b
    }

    pub fn decode(path: &Path, b: &[u8]) -> Result<MergeInputs, LayerError> {
        let corrupt = |what: &str| LayerError::Corrupt { path: path.to_path_buf(), what: what.to_string() };
        let Some((body, crc)) = b.split_last_chunk::<4>() else { return Err(corrupt("not merge inputs")) };
        if body.get(..8) != Some(&INPUTS_MAGIC[..]) || crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err(corrupt("merge inputs checksum mismatch"));
        }
        let mut at = 8;
        let mut take = |n: usize| {
            let s = body.get(at..at + n).ok_or_else(|| corrupt("merge inputs cut short"))?;
            at += n;
            Ok::<_, LayerError>(s)
        };
        let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        let mut files = Vec::new();
        for _ in 0..count {
            let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes")) as usize;
            let name = String::from_utf8(take(len)?.to_vec()).map_err(|_| corrupt("a name is not UTF-8"))?;
            files.push((name, LayerFacts::decode(take(LayerFacts::ENCODED_LEN)?.try_into().expect("32 bytes"))));
        }
        Ok(MergeInputs { files })
    }

    /// The inputs beside `layer`, if there are.
    pub fn read(layer: &Path) -> Result<Option<MergeInputs>, LayerError> {
        read_beside(&Self::path_for(layer), Self::decode)
    }
}

/// The mapped bytes of a layer file on local disk.
struct Mapped {
    map: Bytes,
    index: Range<usize>,
}

/// A layer: its facts always, its bytes when the file is on local disk (mapped when first
/// needed after an eviction, fetched from its [`LayerSource`] if the file is not there).
pub struct DeltaLayer {
    path: PathBuf,
    facts: LayerFacts,
    mapped: std::sync::RwLock<Option<Arc<Mapped>>>,
    /// One fetch at a time per layer; readers wanting it meanwhile wait for that one.
    fetching: std::sync::Mutex<()>,
    source: Option<Arc<dyn LayerSource>>,
    /// When it was last read, in [`clock`] ticks: the cache evicts the least recently used.
    last_used: AtomicU64,
    /// Its summary, once fetched for a read of an evicted file (`None` in it: the store has
    /// none, so the file is fetched whole).
    summary: std::sync::OnceLock<Option<Arc<LayerSummary>>>,
    /// Single-key reads of the evicted file since it was last local.
    ranged_reads: AtomicU32,
    /// Whether the footer of its object was read and found to be this file's.
    object_checked: AtomicBool,
}

/// A coarse clock for recency: milliseconds since the process started.
fn clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START.get_or_init(std::time::Instant::now).elapsed().as_millis() as u64
}

fn map_file(path: &Path) -> Result<(LayerFacts, Mapped), LayerError> {
    let file = File::open(path).map_err(|source| LayerError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: layer files are immutable once renamed into place and only ever removed
    // (never truncated or rewritten) while mapped, so the mapped bytes cannot change.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| LayerError::Io { path: path.to_path_buf(), source })?;
    let map = Bytes::from_owner(map);
    let (facts, index) = checked_index(path, &map)?;
    Ok((facts, Mapped { map, index }))
}

/// The facts of a whole layer file and where its index lies, the footer and the index
/// checked.
pub(crate) fn checked_index(path: &Path, bytes: &[u8]) -> Result<(LayerFacts, Range<usize>), LayerError> {
    let corrupt = |what: String| LayerError::Corrupt { path: path.to_path_buf(), what };
    let facts = LayerFacts::of(path, bytes)?;
    let f = &bytes[bytes.len() - FOOTER_LEN..];
    let entries = facts.entries as usize;
    let index_start = usize::try_from(u64::from_le_bytes(f[16..24].try_into().expect("8 bytes")))
        .map_err(|_| corrupt("index offset".into()))?;
    let index_end = index_start.checked_add(entries * ENTRY_LEN).filter(|&e| e == bytes.len() - FOOTER_LEN);
    let Some(index_end) = index_end else {
        return Err(corrupt(format!("index of {entries} entries at {index_start} does not end at the footer")));
    };
    if crc32c::crc32c(&bytes[index_start..index_end]) != u32::from_le_bytes(f[40..44].try_into().expect("4 bytes")) {
        return Err(corrupt("index checksum mismatch".into()));
    }
    Ok((facts, index_start..index_end))
}

/// Where the index of the layer file `facts` describes lies: it ends at the footer (as
/// [`checked_index`] checks of every file read).
pub(crate) fn index_span(facts: &LayerFacts) -> Range<u64> {
    let end = facts.size.saturating_sub(FOOTER_LEN as u64);
    end.saturating_sub(facts.entries as u64 * ENTRY_LEN as u64)..end
}

/// One index entry: key, LSN, blob offset, blob payload length.
pub(crate) fn decode_entry(e: &[u8]) -> (Key, Lsn, u64, u32) {
    let key = Key::decode(e[..KEY_LEN].try_into().expect("key bytes")).unwrap_or_default();
    let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("8 bytes"));
    (
        key,
        Lsn(u64_at(KEY_LEN)),
        u64_at(KEY_LEN + 8),
        u32::from_le_bytes(e[KEY_LEN + 16..ENTRY_LEN].try_into().expect("4")),
    )
}

/// The bytes of the blob an index entry points at (header and payload).
pub(crate) fn blob_span(off: u64, len: u32) -> Range<u64> {
    // Saturating: a damaged offset must fail the bounds checks, not overflow.
    off..off.saturating_add(BLOB_HEADER_LEN as u64 + len as u64)
}

/// The value in `blob` (header and payload, as [`blob_span`] has it), checked against its
/// length and CRC32C.
pub(crate) fn decode_blob(
    path: &Path,
    key: Key,
    lsn: Lsn,
    off: u64,
    len: u32,
    blob: Bytes,
) -> Result<Value, LayerError> {
    let corrupt = |what: String| LayerError::Corrupt { path: path.to_path_buf(), what };
    if blob.len() != BLOB_HEADER_LEN + len as usize {
        return Err(corrupt(format!("blob of {key} at {lsn} (offset {off}) is cut short")));
    }
    let stored_len = u32::from_le_bytes(blob[..4].try_into().expect("4 bytes"));
    let stored_crc = u32::from_le_bytes(blob[4..BLOB_HEADER_LEN].try_into().expect("4 bytes"));
    let payload = blob.slice(BLOB_HEADER_LEN..);
    if stored_len != len || crc32c::crc32c(&payload) != stored_crc {
        return Err(corrupt(format!("checksum mismatch in the value of {key} at {lsn} (offset {off})")));
    }
    Value::decode(payload).map_err(|source| LayerError::Value { path: path.to_path_buf(), key, lsn, source })
}

impl DeltaLayer {
    /// Opens a layer file, checking its footer and index.
    pub fn open(path: &Path) -> Result<DeltaLayer, LayerError> {
        let (facts, mapped) = map_file(path)?;
        Ok(DeltaLayer::new(path, facts, Some(mapped), None))
    }

    fn new(path: &Path, facts: LayerFacts, mapped: Option<Mapped>, source: Option<Arc<dyn LayerSource>>) -> DeltaLayer {
        DeltaLayer {
            path: path.to_path_buf(),
            facts,
            mapped: std::sync::RwLock::new(mapped.map(Arc::new)),
            fetching: Default::default(),
            source,
            last_used: AtomicU64::new(clock()),
            summary: Default::default(),
            ranged_reads: AtomicU32::new(0),
            object_checked: AtomicBool::new(false),
        }
    }

    /// Opens a layer that may be in the remote store only: the file if it is on local disk,
    /// else its stub (the file fetched from `source` when first read).
    pub fn open_or_stub(path: &Path, source: Option<Arc<dyn LayerSource>>) -> Result<DeltaLayer, LayerError> {
        match map_file(path) {
            Ok((facts, mapped)) => Ok(DeltaLayer::new(path, facts, Some(mapped), source)),
            Err(LayerError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
                match RemoteStub::read(path)? {
                    Some(stub) => Ok(DeltaLayer::new(path, stub.facts, None, source)),
                    None => Err(LayerError::Io { path: path.to_path_buf(), source: e }),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Gives the layer a source to fetch its file from once it is evicted.
    pub fn with_source(mut self, source: Option<Arc<dyn LayerSource>>) -> DeltaLayer {
        self.source = source;
        self
    }

    /// The layer's bytes: mapped, or fetched and mapped now.
    fn mapped(&self) -> Result<Arc<Mapped>, LayerError> {
        self.last_used.store(clock(), Ordering::Relaxed);
        if let Some(m) = &*self.mapped.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(m.clone());
        }
        let _one = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = &*self.mapped.read().unwrap_or_else(|p| p.into_inner()) {
            return Ok(m.clone());
        }
        let (facts, mapped) = match map_file(&self.path) {
            Ok(m) => m,
            Err(LayerError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
                let (stub, source) = self.remote()?;
                source.fetch(&stub, &self.path)?;
                map_file(&self.path)?
            }
            Err(e) => return Err(e),
        };
        if facts != self.facts {
            return Err(LayerError::Corrupt {
                path: self.path.clone(),
                what: format!(
                    "the file is not the layer named so ({facts:?}, expected {:?}; fetched from the remote store if \
                     its stub names an object)",
                    self.facts
                ),
            });
        }
        let mapped = Arc::new(mapped);
        *self.mapped.write().unwrap_or_else(|p| p.into_inner()) = Some(mapped.clone());
        Ok(mapped)
    }

    /// The stub of an evicted file, and where to fetch from.
    fn remote(&self) -> Result<(RemoteStub, &Arc<dyn LayerSource>), LayerError> {
        let stub = RemoteStub::read(&self.path)?.ok_or_else(|| LayerError::Corrupt {
            path: self.path.clone(),
            what: "neither the file nor its remote stub is there".into(),
        })?;
        match &self.source {
            Some(source) => Ok((stub, source)),
            None => Err(LayerError::NoRemote { path: self.path.clone(), object: stub.object }),
        }
    }

    /// False if the file is evicted and its summary, fetched already, says it holds no
    /// value of `key`: a walk passes it by without a request.
    pub fn might_contain(&self, key: Key) -> bool {
        match self.summary.get() {
            Some(Some(s)) if !self.is_local() => s.might_contain(key),
            _ => true,
        }
    }

    /// The values of `key` before `upto`, newest first down to the first that needs no
    /// earlier one — read from the remote store without fetching the evicted file: its
    /// summary, the index blocks the key lies in, the key's values (each checked). `None` if
    /// the file is to be read instead, made local here: it was local already, the store has
    /// no summary of it, or it has been read so often since it was last local that one fetch
    /// is cheaper.
    pub fn newest_first_remote(&self, key: Key, upto: Lsn) -> Result<Option<Vec<(Lsn, Value)>>, LayerError> {
        if self.is_local() {
            return Ok(None);
        }
        self.last_used.store(clock(), Ordering::Relaxed);
        let (stub, source) = self.remote()?;
        let summary = match self.summary.get() {
            Some(s) => s.clone(),
            None => {
                let s = source.summary(&stub, &self.path)?;
                if let Some(s) = &s {
                    if s.facts != self.facts {
                        let why = format!(
                            "its summary {} is of another file ({:?}, expected {:?})",
                            summary_object(&stub.object),
                            s.facts,
                            self.facts
                        );
                        return Err(source.damaged(&stub, &self.path, &why));
                    }
                }
                self.summary.get_or_init(|| s.map(Arc::new)).clone()
            }
        };
        let Some(summary) = summary else { return self.make_local().map(|()| None) };
        if !summary.might_contain(key) {
            return Ok(Some(Vec::new()));
        }
        if self.ranged_reads.fetch_add(1, Ordering::Relaxed) >= RANGED_READS_BEFORE_FETCH {
            return self.make_local().map(|()| None);
        }
        let blocks = summary.blocks_for(key, upto);
        let mut out = Vec::new();
        let mut end = blocks.end;
        while end > blocks.start {
            let from = end.saturating_sub(BLOCKS_AT_ONCE).max(blocks.start);
            if !self.object_checked.load(Ordering::Relaxed) {
                // The object is this file (not another uploaded in its place): its footer.
                let footer = source.read_footer(&stub, &self.path)?;
                let facts = LayerFacts::from_footer(&self.path, self.facts.size, Some(&footer[..]));
                if facts.as_ref().ok() != Some(&self.facts) {
                    let why =
                        format!("it came back as another file (its footer: {facts:?}; its stub: {:?})", self.facts);
                    return Err(source.damaged(&stub, &self.path, &why));
                }
                self.object_checked.store(true, Ordering::Relaxed);
            }
            let got = source.read_ranges(&stub, &self.path, &[summary.block_bytes(from..end)])?;
            let entries = summary
                .entries_of(from..end, &got[0], key, upto)
                .map_err(|why| source.damaged(&stub, &self.path, &why))?;
            for batch in entries.chunks(VALUES_AT_ONCE) {
                let spans: Vec<Range<u64>> = batch.iter().map(|&(_, off, len)| blob_span(off, len)).collect();
                let blobs = source.read_ranges(&stub, &self.path, &spans)?;
                for (&(lsn, off, len), blob) in batch.iter().zip(blobs) {
                    let v = decode_blob(&self.path, key, lsn, off, len, blob)
                        .map_err(|e| source.damaged(&stub, &self.path, &e.to_string()))?;
                    let init = v.will_init();
                    out.push((lsn, v));
                    if init {
                        return Ok(Some(out));
                    }
                }
            }
            end = from;
        }
        Ok(Some(out))
    }

    /// Makes the layer's bytes local, fetching them if it is evicted: a reader that holds a
    /// lock others need fetches first, without it.
    pub fn make_local(&self) -> Result<(), LayerError> {
        self.mapped().map(drop)
    }

    /// Whether its bytes are mapped: reading them needs no fetch.
    pub fn is_local(&self) -> bool {
        self.mapped.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// How long ago it was last read, in milliseconds.
    pub fn idle_ms(&self) -> u64 {
        clock().saturating_sub(self.last_used())
    }

    /// Removes the local file of a layer that has an up-to-date stub (it is in the remote
    /// store); it is fetched again when read. False if it has none (not uploaded yet) or is
    /// not local. Readers holding its bytes keep them: the mapping outlives the file.
    pub fn evict(&self) -> Result<bool, LayerError> {
        let _one = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if !self.is_local() || self.source.is_none() {
            return Ok(false);
        }
        match RemoteStub::read(&self.path)? {
            Some(stub) if stub.facts == self.facts => {}
            _ => return Ok(false),
        }
        *self.mapped.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.ranged_reads.store(0, Ordering::Relaxed);
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            // Collected or merged away meanwhile: nothing to evict.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(LayerError::Io { path: self.path.clone(), source }),
        }
    }

    /// Removes the layer's file, its stub and its merge inputs (the layer is no longer
    /// history).
    pub fn remove_files(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(RemoteStub::path_for(&self.path));
        let _ = std::fs::remove_file(MergeInputs::path_for(&self.path));
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn facts(&self) -> LayerFacts {
        self.facts
    }

    /// Smallest and largest LSN of the values in the layer.
    pub fn lsn_range(&self) -> (Lsn, Lsn) {
        self.facts.lsn_range
    }

    /// The file's size.
    pub fn size_bytes(&self) -> u64 {
        self.facts.size
    }

    pub fn len(&self) -> usize {
        self.facts.entries as usize
    }

    pub fn is_empty(&self) -> bool {
        self.facts.entries == 0
    }

    /// Every (key, LSN) in the layer, in index order.
    pub fn entries(&self) -> Result<Vec<(Key, Lsn)>, LayerError> {
        let m = self.mapped()?;
        Ok((0..self.len()).map(|i| m.entry(i)).map(|(k, l, ..)| (k, l)).collect())
    }

    /// Every value of every key in `keys`, in index order, each checked against its CRC.
    pub fn for_each_in_range(&self, keys: Range<Key>, mut f: impl FnMut(Key, Lsn, Value)) -> Result<(), LayerError> {
        let m = self.mapped()?;
        for i in m.seek(self.len(), keys.start, Lsn(0))..self.len() {
            let (k, lsn, off, len) = m.entry(i);
            if k >= keys.end {
                break;
            }
            f(k, lsn, m.blob(&self.path, k, lsn, off, len)?);
        }
        Ok(())
    }

    /// For each key in `keys`, its newest value at or before `lsn` in this file, if that is not
    /// older than `lowest`: two index searches a key, however many values it has — a relation's
    /// size has one for every block it grew by. Only the blobs returned are read and checked
    /// against their CRCs (a damaged older value is found by whatever reads it).
    pub fn newest_each_in_range(
        &self,
        keys: Range<Key>,
        lsn: Lsn,
        lowest: Lsn,
        mut f: impl FnMut(Key, Lsn, Value),
    ) -> Result<(), LayerError> {
        let m = self.mapped()?;
        let n = self.len();
        let mut i = m.seek(n, keys.start, Lsn(0));
        while i < n {
            let (k, ..) = m.entry(i);
            if k >= keys.end {
                break;
            }
            // Where this key's entries end (an entry at LSN u64::MAX is one of them).
            let mut end = m.seek(n, k, Lsn(u64::MAX)).max(i + 1);
            while end < n && m.entry(end).0 == k {
                end += 1;
            }
            // The first of them after `lsn`: the one before it (if it is this key's) is the newest.
            let after = lsn.0.checked_add(1).map_or(end, |next| m.seek(n, k, Lsn(next)));
            if after > i {
                let (_, at, off, len) = m.entry(after - 1);
                if at >= lowest {
                    f(k, at, m.blob(&self.path, k, at, off, len)?);
                }
            }
            i = end;
        }
        Ok(())
    }

    /// Every value in (key, LSN) order, each read (and checked against its CRC) when reached.
    pub fn values_in_order(&self) -> impl Iterator<Item = Result<(Key, Lsn, Value), LayerError>> + '_ {
        let (m, mut failed) = match self.mapped() {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        };
        let mut i = 0;
        std::iter::from_fn(move || {
            if let Some(e) = failed.take() {
                return Some(Err(e));
            }
            let m = m.as_ref()?;
            if i == self.len() {
                return None;
            }
            let (k, lsn, off, len) = m.entry(i);
            i += 1;
            Some(m.blob(&self.path, k, lsn, off, len).map(|v| (k, lsn, v)))
        })
    }

    /// The values of `key` with LSN in `lsns`, oldest first (readers use
    /// [`DeltaLayer::newest_first`], which stops where they stop).
    #[cfg(test)]
    pub fn values(&self, key: Key, lsns: Range<Lsn>) -> Result<Vec<(Lsn, Value)>, LayerError> {
        let mut out: Vec<_> = self
            .newest_first(key, lsns.end)
            .take_while(|v| v.as_ref().map_or(true, |(l, _)| *l >= lsns.start))
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// The values of `key` before `upto`, newest first, each read (and checked against its
    /// CRC) only when the walk gets to it — a reader stops at the first image, however many
    /// older values the key has here (a relation's size key gets one per extension).
    pub fn newest_first(&self, key: Key, upto: Lsn) -> impl Iterator<Item = Result<(Lsn, Value), LayerError>> + '_ {
        let (m, mut failed, mut i) = match self.mapped() {
            Ok(m) => {
                let i = m.seek(self.len(), key, upto);
                (Some(m), None, i)
            }
            Err(e) => (None, Some(e), 0),
        };
        std::iter::from_fn(move || {
            if let Some(e) = failed.take() {
                return Some(Err(e));
            }
            let m = m.as_ref()?;
            if i == 0 {
                return None;
            }
            i -= 1;
            let (k, lsn, off, len) = m.entry(i);
            if k != key {
                i = 0;
                return None;
            }
            Some(m.blob(&self.path, key, lsn, off, len).map(|v| (lsn, v)))
        })
    }
}

impl Mapped {
    fn entry(&self, i: usize) -> (Key, Lsn, u64, u32) {
        decode_entry(&self.map[self.index.start + i * ENTRY_LEN..][..ENTRY_LEN])
    }

    /// The index position of the first of `entries` not before `(key, lsn)`.
    fn seek(&self, entries: usize, key: Key, lsn: Lsn) -> usize {
        let (mut lo, mut hi) = (0, entries);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (k, l, ..) = self.entry(mid);
            if (k, l) < (key, lsn) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn blob(&self, path: &Path, key: Key, lsn: Lsn, off: u64, len: u32) -> Result<Value, LayerError> {
        let span = blob_span(off, len);
        let in_values = usize::try_from(span.end).is_ok_and(|end| end <= self.index.start);
        if !in_values {
            let what = format!("blob of {key} at {lsn} runs past the values");
            return Err(LayerError::Corrupt { path: path.to_path_buf(), what });
        }
        decode_blob(path, key, lsn, off, len, self.map.slice(span.start as usize..span.end as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};

    fn tag(blkno: u32) -> Key {
        let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        Key::rel_block(&BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno })
    }

    fn sample(dir: &Path) -> PathBuf {
        let mut w = DeltaLayerWriter::new(&dir.join("layer")).unwrap();
        // Out of order on purpose.
        for (blk, lsn) in [(2, 300), (1, 200), (1, 100), (2, 100), (1, 300), (3, 50)] {
            let v = if lsn == 100 {
                Value::Image(Bytes::from(vec![blk as u8; 8192]))
            } else {
                Value::WalRecord { will_init: false, raw: Bytes::from(format!("rec {blk}@{lsn}")) }
            };
            w.put(tag(blk), Lsn(lsn), &v).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn a_stub_comes_back_as_written_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let facts = LayerFacts::read(&path).unwrap();
        assert_eq!(facts, LayerFacts::of(&path, &std::fs::read(&path).unwrap()).unwrap());
        let stub = RemoteStub { object: "timelines/00000001/layer.g00000002.7".into(), facts };
        let b = stub.encode();
        let at = RemoteStub::path_for(&path);
        assert_eq!(RemoteStub::decode(&at, &b).unwrap(), stub);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(RemoteStub::decode(&at, &bad).is_err(), "a flip at byte {i} went unnoticed");
        }
        let e = RemoteStub::decode(&at, &b[..b.len() - 1]).unwrap_err().to_string();
        assert!(e.contains("layer.remote"), "{e}");
    }

    #[test]
    fn merge_inputs_come_back_as_written_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let facts = LayerFacts::read(&sample(dir.path())).unwrap();
        let inputs = MergeInputs { files: vec![("delta-a".into(), facts), ("delta-b".into(), facts)] };
        let b = inputs.encode();
        let at = MergeInputs::path_for(&dir.path().join("layer"));
        assert_eq!(MergeInputs::decode(&at, &b).unwrap(), inputs);
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(MergeInputs::decode(&at, &bad).is_err(), "a flip at byte {i} went unnoticed");
        }
        let e = MergeInputs::decode(&at, &b[..5]).unwrap_err().to_string();
        assert!(e.contains("layer.inputs"), "{e}");
    }

    #[test]
    fn values_come_back_by_key_and_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let l = DeltaLayer::open(&sample(dir.path())).unwrap();
        assert_eq!(l.len(), 6);
        assert_eq!(l.lsn_range(), (Lsn(50), Lsn(300)));
        let got = l.values(tag(1), Lsn(0)..Lsn(1000)).unwrap();
        assert_eq!(got.iter().map(|v| v.0 .0).collect::<Vec<_>>(), vec![100, 200, 300]);
        assert!(matches!(&got[0].1, Value::Image(b) if b.len() == 8192 && b[0] == 1));
        let mid = l.values(tag(1), Lsn(150)..Lsn(300)).unwrap();
        assert_eq!(mid.len(), 1);
        assert!(matches!(&mid[0].1, Value::WalRecord { raw, .. } if &raw[..] == b"rec 1@200"));
        assert!(l.values(tag(9), Lsn(0)..Lsn(1000)).unwrap().is_empty());
        assert_eq!(l.values(tag(3), Lsn(0)..Lsn(51)).unwrap().len(), 1);
    }

    #[test]
    fn the_newest_value_of_each_key_is_what_every_value_in_order_gives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        let mut w = DeltaLayerWriter::new(&path).unwrap();
        // Many values for some keys (a relation's size grows block by block), one for others.
        // Keys begin at different LSNs; one has a value at the last LSN there is.
        for blk in 0..20u32 {
            let first = 10 * (u64::from(blk % 3) + 1);
            for lsn in (first..=first + u64::from(blk % 7) * 10).step_by(10) {
                w.put(tag(blk), Lsn(lsn), &Value::Image(Bytes::from(format!("{blk}@{lsn}")))).unwrap();
            }
        }
        w.put(tag(20), Lsn(10), &Value::Image(Bytes::from_static(b"20@10"))).unwrap();
        w.put(tag(20), Lsn(u64::MAX), &Value::Image(Bytes::from_static(b"20@max"))).unwrap();
        let l = DeltaLayer::open(&w.finish().unwrap()).unwrap();
        for (range, lsn, lowest) in [
            (tag(0)..tag(21), Lsn(1000), Lsn(0)),
            (tag(3)..tag(11), Lsn(35), Lsn(0)),
            // On stored LSNs: the bound is inclusive, some keys have nothing yet.
            (tag(0)..tag(21), Lsn(20), Lsn(0)),
            (tag(0)..tag(21), Lsn(30), Lsn(30)),
            (tag(2)..tag(19), Lsn(40), Lsn(30)),
            (tag(0)..tag(21), Lsn(5), Lsn(0)),
            (tag(0)..tag(21), Lsn(u64::MAX), Lsn(0)),
            (tag(0)..tag(21), Lsn(u64::MAX - 1), Lsn(0)),
        ] {
            let mut want = std::collections::BTreeMap::new();
            l.for_each_in_range(range.clone(), |k, at, v| {
                if at <= lsn {
                    want.insert(k, (at, v));
                }
            })
            .unwrap();
            want.retain(|_, (at, _)| *at >= lowest);
            let mut got = std::collections::BTreeMap::new();
            l.newest_each_in_range(range.clone(), lsn, lowest, |k, at, v| {
                assert!(got.insert(k, (at, v)).is_none(), "{k} twice");
            })
            .unwrap();
            assert_eq!(got, want, "{range:?} at {lsn}, not below {lowest}");
        }
    }

    #[test]
    fn nothing_is_visible_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        {
            let mut w = DeltaLayerWriter::new(&path).unwrap();
            w.put(tag(1), Lsn(1), &Value::Native(Bytes::from_static(b"x"))).unwrap();
            assert!(!path.exists());
        }
        // Dropped unfinished: no file, no temporary left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn every_flipped_byte_is_caught_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            let p = dir.path().join("bad");
            std::fs::write(&p, &bad).unwrap();
            let result = DeltaLayer::open(&p).and_then(|l| {
                let mut all = Vec::new();
                for blk in 1..=3 {
                    all.extend(l.values(tag(blk), Lsn(0)..Lsn(1000))?);
                }
                Ok(all)
            });
            match result {
                Err(e @ (LayerError::Corrupt { .. } | LayerError::Value { .. })) => {
                    assert!(e.to_string().contains("layer file") && e.to_string().contains("bad"), "{e}")
                }
                Err(e) => panic!("byte {at}: unexpected error {e}"),
                Ok(values) => panic!("byte {at} flipped but {} values were served", values.len()),
            }
        }
        // A truncated file too.
        let p = dir.path().join("short");
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(matches!(DeltaLayer::open(&p), Err(LayerError::Corrupt { .. })));
    }
}
