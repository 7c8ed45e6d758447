//! Layer files read back from the remote store when a read needs one that is not on local
//! disk (evicted, or never downloaded to a store attached from the remote): the store's
//! [`LayerSource`]. A read of one key takes the file's summary (`<object>.keys`,
//! `repo::layer_summary`) and byte ranges of the object; a scan fetches the whole file. What
//! comes back is checked — a whole object's CRC32C then its footer against the facts the stub
//! recorded at upload; a range by the CRC32C of the index block or value it holds, the object's
//! footer against the stub once — so a damaged or wrong object is an error naming it, never a
//! page.

use super::object::TRAILER_LEN;
use super::storage::StorageError;
use super::Remote;
use super::RemoteError;
use crate::repo::layer::{LayerError, LayerFacts, LayerSource, RemoteStub, FOOTER_LEN};
use crate::repo::layer_summary::{summary_object, LayerSummary};
use crate::repo::timeline::write_durably;
use bytes::Bytes;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct RemoteLayers {
    remote: Remote,
    pub fetched_files: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetch_errors: AtomicU64,
    /// Byte ranges read (index blocks, values, footers) and their bytes, summaries included.
    pub range_reads: AtomicU64,
    pub range_bytes: AtomicU64,
}

impl RemoteLayers {
    pub fn new(remote: Remote) -> RemoteLayers {
        RemoteLayers {
            remote,
            fetched_files: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            range_reads: AtomicU64::new(0),
            range_bytes: AtomicU64::new(0),
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

impl RemoteLayers {
    /// Counts and logs a failed read.
    fn counted<T>(&self, done: Result<T, LayerError>) -> Result<T, LayerError> {
        if let Err(e) = &done {
            self.fetch_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("neon-sidecar: {e}");
        }
        done
    }

    fn summary_checked(&self, stub: &RemoteStub, path: &Path) -> Result<Option<LayerSummary>, LayerError> {
        let object = summary_object(&stub.object);
        let body = match self.remote.get_object(&object) {
            Ok(b) => b,
            // Uploaded before layer files had summaries: the file is fetched whole.
            Err(RemoteError::Storage(StorageError::NotFound { .. })) => return Ok(None),
            Err(e) => {
                return Err(LayerError::Remote {
                    path: path.to_path_buf(),
                    what: format!("is not on local disk and its summary could not be fetched: {e}"),
                })
            }
        };
        self.range_reads.fetch_add(1, Ordering::Relaxed);
        self.range_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        let summary = LayerSummary::decode(&body).map_err(|why| LayerError::Remote {
            path: path.to_path_buf(),
            what: format!("has a damaged summary: object {object} of {}: {why}", self.remote.describe()),
        })?;
        Ok(Some(summary))
    }
}

/// A read of the evicted layer file at `path` the store did not answer.
fn out_of_reach(path: &Path, e: StorageError) -> LayerError {
    LayerError::Remote { path: path.to_path_buf(), what: format!("is not on local disk and could not be read: {e}") }
}

impl LayerSource for RemoteLayers {
    fn fetch(&self, stub: &RemoteStub, path: &Path) -> Result<(), LayerError> {
        self.counted(self.fetch_checked(stub, path))
    }

    fn summary(&self, stub: &RemoteStub, path: &Path) -> Result<Option<LayerSummary>, LayerError> {
        self.counted(self.summary_checked(stub, path))
    }

    fn read_footer(&self, stub: &RemoteStub, path: &Path) -> Result<Bytes, LayerError> {
        let want = (FOOTER_LEN + TRAILER_LEN) as u64;
        let tail = self.remote.storage().get_tail(&stub.object, want).map_err(|e| out_of_reach(path, e));
        let (tail, size) = self.counted(tail)?;
        self.range_reads.fetch_add(1, Ordering::Relaxed);
        self.range_bytes.fetch_add(tail.len() as u64, Ordering::Relaxed);
        if size != stub.facts.size + TRAILER_LEN as u64 || tail.len() as u64 != want {
            let why = format!(
                "it came back as another file ({size} bytes, sealed; its stub says {} and a trailer)",
                stub.facts.size
            );
            return Err(self.damaged(stub, path, &why));
        }
        Ok(tail.slice(..FOOTER_LEN))
    }

    fn read_ranges(&self, stub: &RemoteStub, path: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>, LayerError> {
        let got = self.remote.storage().get_ranges(&stub.object, ranges).map_err(|e| out_of_reach(path, e));
        let got = self.counted(got)?;
        let whole = got.len() == ranges.len() && got.iter().zip(ranges).all(|(b, r)| b.len() as u64 == r.end - r.start);
        if !whole {
            return Err(self.damaged(stub, path, &format!("ranges {ranges:?} came back cut short")));
        }
        self.range_reads.fetch_add(ranges.len() as u64, Ordering::Relaxed);
        self.range_bytes.fetch_add(got.iter().map(|b| b.len() as u64).sum(), Ordering::Relaxed);
        Ok(got)
    }

    fn damaged(&self, stub: &RemoteStub, path: &Path, why: &str) -> LayerError {
        let e = LayerError::Remote {
            path: path.to_path_buf(),
            what: format!("read from object {} of {} is damaged: {why}", stub.object, self.remote.describe()),
        };
        self.counted::<()>(Err(e)).expect_err("an error")
    }
}
