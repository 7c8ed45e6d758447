//! The repository: values by (key, LSN) in an in-memory layer and in delta-layer files, with a
//! manifest naming the layer files and the durable LSN. `flush` freezes the in-memory layer
//! into a new file and then, atomically, a new manifest: what the manifest says is durable has
//! survived a crash (a file written but not yet in the manifest is ignored and removed).
//!
//! ```text
//! manifest (file "manifest", replaced by rename):
//!   magic u64 "NEONMF02" | history start u64 | durable lsn u64 | n u32 |
//!   n × (u16 len | file name) | crc32c u32
//! layer files: "delta-<first lsn>-<last lsn>", hex
//! ```

use super::key::Key;
use super::layer::{DeltaLayer, DeltaLayerWriter, LayerError};
use super::value::Value;
use neon_types::Lsn;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MANIFEST: &str = "manifest";
const MANIFEST_MAGIC: u64 = u64::from_le_bytes(*b"NEONMF02");

/// Problems of the repository as a whole.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("repository {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("manifest {path} is corrupt: {what}")]
    Manifest { path: PathBuf, what: String },
}

/// Values by key and LSN, in memory and in layer files.
pub struct Repository {
    dir: PathBuf,
    inmem: BTreeMap<(Key, Lsn), Value>,
    /// Layer files, oldest first.
    layers: Vec<Arc<DeltaLayer>>,
    durable: Lsn,
    /// The end of the last record put (what reads may ask up to).
    last: Lsn,
    /// The first LSN the store holds history for.
    start: Lsn,
}

impl Repository {
    /// Opens (or creates) the repository in `dir` for writing: the one writer also removes
    /// layer files an interrupted flush left behind.
    pub fn open(dir: &Path) -> Result<Repository, RepoError> {
        Self::open_inner(dir, true)
    }

    /// Opens the repository in `dir` to read what is durable, beside a running writer.
    pub fn open_read_only(dir: &Path) -> Result<Repository, RepoError> {
        Self::open_inner(dir, false)
    }

    fn open_inner(dir: &Path, writer: bool) -> Result<Repository, RepoError> {
        let io = |source| RepoError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut repo = Repository {
            dir: dir.to_path_buf(),
            inmem: BTreeMap::new(),
            layers: Vec::new(),
            durable: Lsn::INVALID,
            last: Lsn::INVALID,
            start: Lsn::INVALID,
        };
        let path = dir.join(MANIFEST);
        let names = match std::fs::read(&path) {
            Ok(b) => {
                let (start, durable, names) = parse_manifest(&path, &b)?;
                repo.start = start;
                repo.durable = durable;
                repo.last = durable;
                names
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(RepoError::Io { path, source }),
        };
        for name in &names {
            repo.layers.push(Arc::new(DeltaLayer::open(&dir.join(name))?));
        }
        // Files not in the manifest were written by a flush that never completed.
        for entry in std::fs::read_dir(dir).map_err(io)?.filter(|_| writer) {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("delta-") && !names.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(repo)
    }

    /// Everything up to this LSN has been made durable by [`Repository::flush`].
    pub fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    /// The end of the last record stored.
    pub fn last_lsn(&self) -> Lsn {
        self.last
    }

    /// The first LSN the store holds history for (invalid until history begins).
    pub fn history_start(&self) -> Lsn {
        self.start
    }

    /// Records where history begins, once: the LSN the first record was read from.
    pub fn begin_history(&mut self, lsn: Lsn) {
        if !self.start.is_valid() {
            self.start = lsn;
            self.last = self.last.max(lsn);
        }
    }

    /// The layer files, oldest first.
    pub fn layers(&self) -> &[Arc<DeltaLayer>] {
        &self.layers
    }

    /// Files a value. LSNs of successive records must not go backwards.
    pub fn put(&mut self, key: Key, lsn: Lsn, value: Value) {
        self.inmem.insert((key, lsn), value);
    }

    /// Notes that every record ending at or before `lsn` has been put.
    pub fn advance(&mut self, lsn: Lsn) {
        self.last = self.last.max(lsn);
    }

    /// Writes the in-memory values to a new layer file and records it, with the new durable
    /// LSN, in the manifest. Returns the durable LSN.
    pub fn flush(&mut self) -> Result<Lsn, RepoError> {
        if self.last <= self.durable {
            return Ok(self.durable);
        }
        let mut names: Vec<String> = self
            .layers
            .iter()
            .map(|l| l.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        if !self.inmem.is_empty() {
            let first = self.inmem.keys().map(|k| k.1).min().unwrap_or(self.last);
            let name = format!("delta-{:016X}-{:016X}", first.0, self.last.0);
            let mut w = DeltaLayerWriter::new(&self.dir.join(&name))?;
            for ((key, lsn), value) in &self.inmem {
                w.put(*key, *lsn, value)?;
            }
            let path = w.finish()?;
            self.layers.push(Arc::new(DeltaLayer::open(&path)?));
            names.push(name);
        }
        self.write_manifest(self.last, &names)?;
        self.inmem.clear();
        self.durable = self.last;
        Ok(self.durable)
    }

    fn write_manifest(&self, durable: Lsn, names: &[String]) -> Result<(), RepoError> {
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join("manifest.tmp");
        let io = |source| RepoError::Io { path: tmp.clone(), source };
        let mut b = Vec::new();
        b.extend_from_slice(&MANIFEST_MAGIC.to_le_bytes());
        b.extend_from_slice(&self.start.0.to_le_bytes());
        b.extend_from_slice(&durable.0.to_le_bytes());
        b.extend_from_slice(&(names.len() as u32).to_le_bytes());
        for n in names {
            b.extend_from_slice(&(n.len() as u16).to_le_bytes());
            b.extend_from_slice(n.as_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&b).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// The values of `key` needed to rebuild it as of `lsn`, oldest first: back from the
    /// newest value at or before `lsn` to the first one that needs no earlier value.
    pub fn values_for(&self, key: Key, lsn: Lsn) -> Result<Vec<(Lsn, Value)>, RepoError> {
        let mut newest_first: Vec<(Lsn, Value)> = Vec::new();
        let upto = Lsn(lsn.0.saturating_add(1));
        for ((_, l), v) in self.inmem.range((key, Lsn(0))..(key, upto)).rev() {
            newest_first.push((*l, v.clone()));
            if v.will_init() {
                newest_first.reverse();
                return Ok(newest_first);
            }
        }
        for layer in self.layers.iter().rev() {
            if layer.lsn_range().0 > lsn {
                continue;
            }
            for (l, v) in layer.values(key, Lsn(0)..upto)?.into_iter().rev() {
                let init = v.will_init();
                newest_first.push((l, v));
                if init {
                    newest_first.reverse();
                    return Ok(newest_first);
                }
            }
        }
        newest_first.reverse();
        Ok(newest_first)
    }
}

fn parse_manifest(path: &Path, b: &[u8]) -> Result<(Lsn, Lsn, Vec<String>), RepoError> {
    let bad = |what: &str| RepoError::Manifest { path: path.to_path_buf(), what: what.to_string() };
    if b.len() < 32 {
        return Err(bad("too short"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    if u64::from_le_bytes(body[..8].try_into().expect("8")) != MANIFEST_MAGIC {
        return Err(bad("bad magic"));
    }
    let start = Lsn(u64::from_le_bytes(body[8..16].try_into().expect("8")));
    let durable = Lsn(u64::from_le_bytes(body[16..24].try_into().expect("8")));
    let n = u32::from_le_bytes(body[24..28].try_into().expect("4")) as usize;
    let mut r = &body[28..];
    let mut names = Vec::new();
    for _ in 0..n {
        if r.len() < 2 {
            return Err(bad("truncated"));
        }
        let len = u16::from_le_bytes([r[0], r[1]]) as usize;
        let name = r.get(2..2 + len).ok_or_else(|| bad("truncated"))?;
        let name = std::str::from_utf8(name).map_err(|_| bad("file name is not UTF-8"))?;
        if name.contains('/') {
            return Err(bad("file name with a path"));
        }
        names.push(name.to_string());
        r = &r[2 + len..];
    }
    Ok((start, durable, names))
}
