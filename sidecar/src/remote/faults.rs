//! A [`RemoteStorage`] that fails when told to: the uploader's retries, a store that is down for
//! a while, and a request lost half-way are tested with it in-process (the integration tests
//! stop the real object store instead).

use super::storage::{RemoteStorage, StorageError};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Faulty {
    inner: Arc<dyn RemoteStorage>,
    /// Every request fails while set: the store is down.
    pub down: AtomicBool,
    /// The next this many requests fail.
    pub fail_next: AtomicUsize,
    /// Requests for objects whose names start so fail (a sidecar killed before its index).
    pub fail_under: std::sync::Mutex<Option<String>>,
    /// Uploads that reach the store (though the next one may be told it failed).
    pub puts: AtomicUsize,
}

impl Faulty {
    pub fn new(inner: Arc<dyn RemoteStorage>) -> Faulty {
        Faulty {
            inner,
            down: AtomicBool::new(false),
            fail_next: AtomicUsize::new(0),
            fail_under: Default::default(),
            puts: AtomicUsize::new(0),
        }
    }

    fn fault(&self, op: &'static str, object: &str) -> Result<(), StorageError> {
        let under = self.fail_under.lock().unwrap_or_else(|p| p.into_inner());
        let failing = self.down.load(Ordering::SeqCst)
            || under.as_ref().is_some_and(|p| object.starts_with(p.as_str()))
            || self.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if failing {
            return Err(StorageError::Injected {
                store: self.inner.describe(),
                op,
                object: object.to_string(),
                why: "the store did not answer".into(),
            });
        }
        Ok(())
    }
}

impl RemoteStorage for Faulty {
    fn put(&self, name: &str, body: Bytes) -> Result<(), StorageError> {
        self.fault("upload", name)?;
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(name, body)
    }

    fn get(&self, name: &str) -> Result<Bytes, StorageError> {
        self.fault("download", name)?;
        self.inner.get(name)
    }

    fn get_ranges(&self, name: &str, ranges: &[std::ops::Range<u64>]) -> Result<Vec<Bytes>, StorageError> {
        self.fault("ranged download", name)?;
        self.inner.get_ranges(name, ranges)
    }

    fn get_tail(&self, name: &str, len: u64) -> Result<(Bytes, u64), StorageError> {
        self.fault("ranged download", name)?;
        self.inner.get_tail(name, len)
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, StorageError> {
        self.fault("listing", dir)?;
        self.inner.list(dir)
    }

    fn delete(&self, name: &str) -> Result<(), StorageError> {
        self.fault("delete", name)?;
        self.inner.delete(name)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}
