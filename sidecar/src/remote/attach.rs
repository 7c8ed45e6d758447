//! A store set up from the remote store alone (`neon-sidecar attach-remote`), on a machine
//! that never had it: everything the newest index holds is written to a new store directory
//! — identity, current timeline, each timeline's manifest, history file and commit-time
//! index — and every layer file as its stub only. The store serves at once: `run --remote`
//! fetches each layer file when a read first needs it, and follows the compute from the
//! remote's durable LSN.
//!
//! The identity file is written last, as `Store::create` does: a store attach interrupted is
//! not set up, and attaching again starts afresh.

use super::index::IndexedTimeline;
use super::upload::{newest_index, UploadError};
use super::Remote;
use crate::repo::commit_times::{CHUNK_FILE, LOG_FILE};
use crate::repo::layer::RemoteStub;
use crate::repo::store::{timeline_dir, CURRENT, HISTORY, IDENTITY, TIMELINES};
use crate::repo::timeline::{is_layer_name, private_dir, put_durably, MANIFEST};
use neon_types::Lsn;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Remote(#[from] super::RemoteError),
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("store {dir} is set up already; attach-remote makes a new store (give it an empty directory)")]
    SetUp { dir: PathBuf },
    #[error("remote store {store} holds no index: no neon-sidecar has uploaded history there")]
    Empty { store: String },
    #[error("remote store {store}: {what} is corrupt: {why}")]
    Corrupt { store: String, what: String, why: String },
}

/// What an attach wrote.
#[derive(Debug)]
pub struct Attached {
    pub index: String,
    pub generation: u32,
    pub durable: Lsn,
    pub timelines: usize,
    pub layer_files: usize,
    pub layer_bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AttachError + '_ {
    move |source| AttachError::Io { path: path.to_path_buf(), source }
}

fn put(path: &Path, bytes: &[u8]) -> Result<(), AttachError> {
    put_durably(path, bytes).map_err(io(path))
}

/// Sets up the store in `dir` (absent or empty) from the newest index in `remote`.
pub fn attach(remote: &Remote, dir: &Path) -> Result<Attached, AttachError> {
    if dir.join(IDENTITY).exists() {
        return Err(AttachError::SetUp { dir: dir.to_path_buf() });
    }
    let (name, index) = newest_index(remote)?.ok_or_else(|| AttachError::Empty { store: remote.describe() })?;
    private_dir(dir).map_err(io(dir))?;
    // An empty directory made beforehand (`mkdir` leaves it 0755): the store is private.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(io(dir))?;
    let timelines = dir.join(TIMELINES);
    // What an interrupted attach left: made again.
    match std::fs::remove_dir_all(&timelines) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&timelines)(e)),
        _ => {}
    }
    private_dir(&timelines).map_err(io(&timelines))?;
    let (mut files, mut bytes) = (0, 0);
    for t in &index.timelines {
        let tdir = timeline_dir(dir, t.id);
        private_dir(&tdir).map_err(io(&tdir))?;
        write_timeline(remote, &name, t, &tdir)?;
        files += t.files.len();
        bytes += t.files.iter().map(|(_, s)| s.facts.size).sum::<u64>();
    }
    put(&dir.join(CURRENT), &index.current)?;
    put(&dir.join(IDENTITY), &index.identity)?;
    Ok(Attached {
        index: name,
        generation: index.generation,
        durable: index.durable,
        timelines: index.timelines.len(),
        layer_files: files,
        layer_bytes: bytes,
    })
}

fn write_timeline(remote: &Remote, index: &str, t: &IndexedTimeline, tdir: &Path) -> Result<(), AttachError> {
    for (layer, stub) in &t.files {
        // A name from the store becomes a path: a layer file's name, nothing else.
        if !is_layer_name(layer) || layer.contains('/') {
            return Err(AttachError::Corrupt {
                store: remote.describe(),
                what: index.to_string(),
                why: format!("timeline {:08X} names {layer:?}, which is not a layer file's name", t.id),
            });
        }
        put(&RemoteStub::path_for(&tdir.join(layer)), &stub.encode())?;
    }
    if !t.history.is_empty() {
        put(&tdir.join(HISTORY), &t.history)?;
    }
    if !t.commit_log.is_empty() {
        let mut chunks = Vec::new();
        for p in &t.pieces {
            let b = remote.get_object(&p.object)?;
            let crc = crc32c::crc32c(&b);
            if p.offset != chunks.len() as u64 || b.len() as u64 != p.len || crc != p.crc {
                return Err(AttachError::Corrupt {
                    store: remote.describe(),
                    what: p.object.clone(),
                    why: format!(
                        "not the piece of timeline {:08X}'s commit-time index that {index} names (it names {} bytes \
                         at {} with CRC32C {:08x}; this is {} bytes with {crc:08x}, and {} bytes came before it)",
                        t.id,
                        p.len,
                        p.offset,
                        p.crc,
                        b.len(),
                        chunks.len()
                    ),
                });
            }
            chunks.extend_from_slice(&b);
        }
        put(&tdir.join(CHUNK_FILE), &chunks)?;
        put(&tdir.join(LOG_FILE), &t.commit_log)?;
    }
    // Last: a timeline directory without a manifest is not a timeline (and is made again).
    put(&tdir.join(MANIFEST), &t.manifest)?;
    Ok(())
}
