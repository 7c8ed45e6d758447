//! History in an object store: the store's layer files, once written locally, kept in any
//! S3-compatible store (or a mounted share), so that history outlives the machine and
//! outgrows its disk.
//!
//! * [`storage`] — the store itself: our small blocking interface over `object_store`, and
//!   where the store is (`s3://BUCKET/PREFIX`, `file:///DIR`).
//! * [`object`]  — the format of every object: payload and a CRC32C trailer, checked on read.
//! * [`faults`]  — a store that fails when told to, for tests.
//!
//! [`Remote`] puts and gets whole objects through a [`storage::RemoteStorage`], sealing each
//! on the way up and checking it on the way down: what comes back is what was put, or an
//! error naming the object.

pub mod faults;
pub mod object;
pub mod storage;

use bytes::Bytes;
use std::sync::Arc;
use storage::{RemoteStorage, StorageError};

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
