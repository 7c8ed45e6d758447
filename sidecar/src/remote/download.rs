//! Layer files fetched back from the remote store when a read needs one that is not on local
//! disk (evicted, or never downloaded to a store attached from the remote): the store's
//! [`LayerSource`]. What comes back is checked twice — the object's CRC32C on download, then
//! its footer against the facts the stub recorded at upload — so a damaged or wrong object
//! is an error naming it, never a page.

use super::Remote;
use crate::repo::layer::{LayerError, LayerFacts, LayerSource, RemoteStub};
use crate::repo::timeline::write_durably;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct RemoteLayers {
    remote: Remote,
    pub fetched_files: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetch_errors: AtomicU64,
}

impl RemoteLayers {
    pub fn new(remote: Remote) -> RemoteLayers {
        RemoteLayers {
            remote,
            fetched_files: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
        }
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    fn fetch_checked(&self, stub: &RemoteStub, path: &Path) -> Result<(), LayerError> {
        let body = self.remote.get_object(&stub.object).map_err(|e| LayerError::Remote {
            path: path.to_path_buf(),
            what: format!("is not on local disk and could not be fetched: {e}"),
        })?;
        let facts = LayerFacts::of(path, &body).map_err(|e| LayerError::Remote {
            path: path.to_path_buf(),
            what: format!("came back from object {} of {} unreadable: {e}", stub.object, self.remote.describe()),
        })?;
        if facts != stub.facts {
            return Err(LayerError::Remote {
                path: path.to_path_buf(),
                what: format!(
                    "came back from object {} of {} as another file ({facts:?}, its stub says {:?})",
                    stub.object,
                    self.remote.describe(),
                    stub.facts
                ),
            });
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".download");
        write_durably(Path::new(&tmp), path, &body)
            .map_err(|source| LayerError::Io { path: path.to_path_buf(), source })?;
        self.fetched_files.fetch_add(1, Ordering::Relaxed);
        self.fetched_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl LayerSource for RemoteLayers {
    fn fetch(&self, stub: &RemoteStub, path: &Path) -> Result<(), LayerError> {
        let done = self.fetch_checked(stub, path);
        if let Err(e) = &done {
            self.fetch_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("neon-sidecar: {e}");
        }
        done
    }
}
