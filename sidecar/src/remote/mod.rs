//! History in an object store: the store's layer files, once written locally, kept in any
//! S3-compatible store (or a mounted share), so that history outlives the machine and
//! outgrows its disk.
//!
//! * [`storage`] — the store itself: our small blocking interface over `object_store`, and
//!   where the store is (`s3://BUCKET/PREFIX`, `file:///DIR`).
//! * [`object`]  — the format of every object: payload and a CRC32C trailer, checked on read.
//! * [`faults`]  — a store that fails when told to, for tests.
//! * [`index`]   — the object that names everything the remote store holds.
//! * [`upload`]  — layer files uploaded as they are written, then an index naming them;
//!   generations that stop an older writer; garbage deleted.
//! * [`download`] — layer files fetched back when a read needs one not on local disk.
//! * [`attach`]  — a new store from the remote store alone.
//!
//! [`Remote`] puts and gets whole objects through a [`storage::RemoteStorage`], sealing each
//! on the way up and checking it on the way down: what comes back is what was put, or an
//! error naming the object.

pub mod attach;
pub mod download;
pub mod faults;
pub mod index;
pub mod object;
pub mod storage;
pub mod upload;

use bytes::Bytes;
use std::sync::Arc;
use storage::{RemoteStorage, StorageError};

/// The remote store as a running sidecar uses it, for `neon_sidecar_status()`.
pub struct RemoteState {
    pub remote: Remote,
    pub upload: Arc<upload::UploadStatus>,
    pub layers: Arc<download::RemoteLayers>,
    /// `--durability remote`: the compute's slot keeps WAL until the remote holds its history.
    pub durability_remote: bool,
}

impl RemoteState {
    /// `name value` lines, as the page service's status has them.
    pub fn write_status(&self, s: &mut String) {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let u = &self.upload;
        let _ = writeln!(s, "remote_store {}", self.remote.describe());
        let _ = writeln!(s, "remote_generation {}", u.generation.load(Relaxed));
        let _ = writeln!(s, "remote_durable_lsn {}", u.durable());
        let _ = writeln!(s, "remote_durability {}", if self.durability_remote { "remote" } else { "local" });
        let _ = writeln!(s, "remote_queue_files {}", u.queued_files.load(Relaxed));
        let _ = writeln!(s, "remote_queue_bytes {}", u.queued_bytes.load(Relaxed));
        let _ = writeln!(s, "remote_uploaded_bytes {}", u.uploaded_bytes.load(Relaxed));
        let _ = writeln!(s, "remote_fetched_files {}", self.layers.fetched_files.load(Relaxed));
        let _ = writeln!(s, "remote_fetched_bytes {}", self.layers.fetched_bytes.load(Relaxed));
        let _ = writeln!(s, "remote_range_reads {}", self.layers.range_reads.load(Relaxed));
        let _ = writeln!(s, "remote_range_bytes {}", self.layers.range_bytes.load(Relaxed));
        let _ = writeln!(s, "remote_fetch_errors {}", self.layers.fetch_errors.load(Relaxed));
        let _ = writeln!(s, "remote_fenced {}", u.fenced.load(Relaxed));
        // One line: the error's own line breaks would start lines of their own.
        let _ = writeln!(s, "remote_error {}", u.error().unwrap_or_default().replace('\n', " "));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("remote store {store}: object {object} is damaged: {source}")]
    Corrupt { store: String, object: String, source: object::ObjectError },
}

/// Sealed objects in a remote store.
#[derive(Clone)]
pub struct Remote {
    storage: Arc<dyn RemoteStorage>,
}

impl Remote {
    pub fn new(storage: Arc<dyn RemoteStorage>) -> Remote {
        Remote { storage }
    }

    /// The store, for messages (its URL; never a credential).
    pub fn describe(&self) -> String {
        self.storage.describe()
    }

    pub fn storage(&self) -> &Arc<dyn RemoteStorage> {
        &self.storage
    }

    /// Uploads `payload` as object `name`, sealed.
    pub fn put_object(&self, name: &str, payload: &[u8]) -> Result<(), RemoteError> {
        Ok(self.storage.put(name, object::seal(payload))?)
    }

    /// Downloads object `name` and checks it: its payload.
    pub fn get_object(&self, name: &str) -> Result<Bytes, RemoteError> {
        let sealed = self.storage.get(name)?;
        object::open(sealed).map_err(|source| RemoteError::Corrupt {
            store: self.describe(),
            object: name.to_string(),
            source,
        })
    }

    pub fn list(&self, dir: &str) -> Result<Vec<String>, RemoteError> {
        Ok(self.storage.list(dir)?)
    }

    pub fn delete(&self, name: &str) -> Result<(), RemoteError> {
        Ok(self.storage.delete(name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::storage::{ObjectStorage, RemoteUrl, S3Settings};
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn objects_come_back_as_put_or_as_an_error_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let url = RemoteUrl::File { dir: dir.path().to_path_buf() };
        let files: Arc<dyn RemoteStorage> = Arc::new(ObjectStorage::open(&url, &S3Settings::default()).unwrap());
        let faulty = Arc::new(faults::Faulty::new(files));
        let remote = Remote::new(faulty.clone());
        remote.put_object("layers/one", b"values").unwrap();
        assert_eq!(remote.get_object("layers/one").unwrap(), Bytes::from_static(b"values"));
        // Damaged where it is kept: an error naming the object, never its bytes.
        let path = dir.path().join("layers/one");
        let mut b = std::fs::read(&path).unwrap();
        b[2] ^= 0x10;
        std::fs::write(&path, b).unwrap();
        let e = remote.get_object("layers/one").unwrap_err().to_string();
        assert!(e.contains("object layers/one is damaged") && e.contains("CRC32C"), "{e}");
        // A store that does not answer: an error naming the request and the object.
        faulty.fail_next.store(1, Ordering::SeqCst);
        let e = remote.put_object("layers/two", b"x").unwrap_err().to_string();
        assert!(e.contains("upload of object layers/two failed"), "{e}");
        remote.put_object("layers/two", b"x").unwrap();
        assert_eq!(faulty.puts.load(Ordering::SeqCst), 2);
    }
}
