//! The remote store as the rest of the sidecar sees it: a small, blocking interface of ours
//! ([`RemoteStorage`]: put, get, list, delete whole objects by name) over the maintained
//! `object_store` crate, which speaks S3 (any S3-compatible store: SeaweedFS in our tests) and
//! local files (a mounted share) alike. Tests wrap it in `faults::Faulty`.
//!
//! Where: `s3://BUCKET/PREFIX` (with `--remote-endpoint`, region and path-style settings for
//! stores other than AWS) or `file:///DIR`. Credentials come only from the standard
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`): never from
//! the command line, and no message of ours names them ([`RemoteUrl`]'s `Display` is the URL
//! alone).
//!
//! `object_store` is asynchronous; the sidecar is threads. A small runtime of its own
//! (`remote-io` threads) runs the requests, and each call blocks its caller until done.

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;
use std::time::Duration;

/// Problems with the remote store, naming the store and the object.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("remote store {url}: {why}")]
    Config { url: String, why: String },
    #[error("remote store {store}: object {object} does not exist")]
    NotFound { store: String, object: String },
    #[error("remote store {store}: {op} of object {object} failed: {source}")]
    Request { store: String, op: &'static str, object: String, source: Box<object_store::Error> },
    #[error("remote store {store}: {op} of object {object} failed: {why} (injected fault)")]
    Injected { store: String, op: &'static str, object: String, why: String },
}

/// Whole objects by name (relative to the store's prefix; `/` separates levels).
pub trait RemoteStorage: Send + Sync {
    fn put(&self, name: &str, body: Bytes) -> Result<(), StorageError>;
    fn get(&self, name: &str) -> Result<Bytes, StorageError>;
    /// Byte ranges of object `name`, as stored (the seal's trailer is not checked: each
    /// range is checked by what it holds). Requests for nearby ranges may be merged.
    fn get_ranges(&self, name: &str, ranges: &[std::ops::Range<u64>]) -> Result<Vec<Bytes>, StorageError>;
    /// The last `len` bytes of object `name` (all of it if shorter), and its size.
    fn get_tail(&self, name: &str, len: u64) -> Result<(Bytes, u64), StorageError>;
    /// The names of the objects under `dir` (no trailing `/`), in its sub-directories too,
    /// sorted.
    fn list(&self, dir: &str) -> Result<Vec<String>, StorageError>;
    /// Deleting an object that is not there is not an error.
    fn delete(&self, name: &str) -> Result<(), StorageError>;
    /// The store, for messages: its URL, never a credential.
    fn describe(&self) -> String;
}

/// Where the remote store is, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteUrl {
    S3 { bucket: String, prefix: String },
    File { dir: std::path::PathBuf },
}

impl std::fmt::Display for RemoteUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RemoteUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RemoteUrl::File { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

impl std::str::FromStr for RemoteUrl {
    type Err = StorageError;

    fn from_str(s: &str) -> Result<RemoteUrl, StorageError> {
        // Keys written into the URL (`s3://KEY:SECRET@bucket`) are refused, and not repeated.
        let shown = match s.split_once('@') {
            Some((before, after)) => format!("{}***@{after}", &before[..before.find("://").map_or(0, |i| i + 3)]),
            None => s.to_string(),
        };
        let bad = |why: &str| StorageError::Config { url: shown.clone(), why: why.to_string() };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() || bucket.contains('@') {
                return Err(bad("s3://BUCKET/PREFIX needs a bucket (and credentials come from the environment)"));
            }
            let prefix = prefix.trim_matches('/').to_string();
            if prefix.split('/').any(|p| p == "." || p == "..") {
                return Err(bad("the prefix may not hold . or .. levels"));
            }
            return Ok(RemoteUrl::S3 { bucket: bucket.to_string(), prefix });
        }
        if let Some(dir) = s.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("file:///DIR needs an absolute directory"));
            }
            return Ok(RemoteUrl::File { dir: dir.into() });
        }
        Err(bad("expected s3://BUCKET/PREFIX or file:///DIR"))
    }
}

/// How to reach an S3-compatible store other than AWS's own. (No `Debug`: it may hold keys.)
#[derive(Clone, Default)]
pub struct S3Settings {
    /// `http(s)://host:port` of the store (default: AWS).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Bucket in the path (`endpoint/bucket/key`), as most S3-compatible stores want.
    pub path_style: bool,
    /// Access key and secret given in-process (tests); the sidecar leaves this empty and the
    /// keys come from the environment.
    pub keys: Option<(String, String)>,
}

/// [`RemoteStorage`] through `object_store`.
pub struct ObjectStorage {
    url: RemoteUrl,
    prefix: String,
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
}

impl ObjectStorage {
    pub fn open(url: &RemoteUrl, s3: &S3Settings) -> Result<ObjectStorage, StorageError> {
        let config = |why: String| StorageError::Config { url: url.to_string(), why };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote-io")
            .enable_all()
            .build()
            .map_err(|e| config(format!("starting its I/O threads: {e}")))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match url {
            RemoteUrl::S3 { bucket, prefix } => {
                // A request that gets no answer fails after a while; the uploader retries it
                // with its own backoff (a store that is down for minutes must not block it).
                let retry = object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(20),
                    backoff: object_store::BackoffConfig::default(),
                };
                let options = object_store::ClientOptions::new()
                    // The whole request: a merged layer file may be large (the cap is
                    // MERGE_MAX_BYTES); a store that does not answer fails at connecting.
                    .with_timeout(Duration::from_secs(300))
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_allow_http(true);
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(options)
                    .with_virtual_hosted_style_request(!s3.path_style);
                if let Some(endpoint) = &s3.endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(region) = &s3.region {
                    b = b.with_region(region);
                }
                if let Some((access, secret)) = &s3.keys {
                    b = b.with_access_key_id(access).with_secret_access_key(secret);
                }
                let store = b.build().map_err(|e| config(e.to_string()))?;
                (Arc::new(store), prefix.clone())
            }
            RemoteUrl::File { dir } => {
                // Private when made here (it holds every row); a share made beforehand is left
                // as its owner made it.
                std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
                    .create(dir)
                    .map_err(|e| config(format!("creating {}: {e}", dir.display())))?;
                // Written to a temporary name, fsync'd with its directory, renamed: durable.
                let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| config(e.to_string()))?
                    .with_fsync(true);
                (Arc::new(store), String::new())
            }
        };
        Ok(ObjectStorage { url: url.clone(), prefix, store, runtime })
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn failed(&self, op: &'static str, name: &str, source: object_store::Error) -> StorageError {
        match source {
            object_store::Error::NotFound { .. } => {
                StorageError::NotFound { store: self.url.to_string(), object: name.to_string() }
            }
            source => StorageError::Request {
                store: self.url.to_string(),
                op,
                object: name.to_string(),
                source: Box::new(source),
            },
        }
    }
}

impl RemoteStorage for ObjectStorage {
    fn put(&self, name: &str, body: Bytes) -> Result<(), StorageError> {
        let path = self.path(name);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from_bytes(body)))
            .map(drop)
            .map_err(|e| self.failed("upload", name, e))
    }

    fn get(&self, name: &str) -> Result<Bytes, StorageError> {
        let path = self.path(name);
        self.runtime
            .block_on(async { self.store.get(&path).await?.bytes().await })
            .map_err(|e| self.failed("download", name, e))
    }

    fn get_ranges(&self, name: &str, ranges: &[std::ops::Range<u64>]) -> Result<Vec<Bytes>, StorageError> {
        let path = self.path(name);
        self.runtime.block_on(self.store.get_ranges(&path, ranges)).map_err(|e| self.failed("ranged download", name, e))
    }

    fn get_tail(&self, name: &str, len: u64) -> Result<(Bytes, u64), StorageError> {
        let path = self.path(name);
        let options =
            object_store::GetOptions { range: Some(object_store::GetRange::Suffix(len)), ..Default::default() };
        self.runtime
            .block_on(async {
                let got = self.store.get_opts(&path, options).await?;
                let size = got.meta.size;
                Ok((got.bytes().await?, size))
            })
            .map_err(|e| self.failed("ranged download", name, e))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, StorageError> {
        // Directory by directory: S3 lists a level at a time with a delimiter, and a local
        // directory tree the same way.
        let mut names = Vec::new();
        let mut dirs = vec![dir.to_string()];
        while let Some(d) = dirs.pop() {
            let listed = self
                .runtime
                .block_on(self.store.list_with_delimiter(Some(&self.path(&d))))
                .map_err(|e| self.failed("listing", &d, e))?;
            names.extend(listed.objects.into_iter().filter_map(|o| o.location.filename().map(|f| format!("{d}/{f}"))));
            dirs.extend(listed.common_prefixes.iter().filter_map(|p| p.filename().map(|f| format!("{d}/{f}"))));
        }
        names.sort();
        Ok(names)
    }

    fn delete(&self, name: &str) -> Result<(), StorageError> {
        let path = self.path(name);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed("delete", name, e)),
        }
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print_without_anything_but_the_place() {
        let s3: RemoteUrl = "s3://history/clusters/one/".parse().unwrap();
        assert_eq!(s3, RemoteUrl::S3 { bucket: "history".into(), prefix: "clusters/one".into() });
        assert_eq!(s3.to_string(), "s3://history/clusters/one");
        assert_eq!("s3://b".parse::<RemoteUrl>().unwrap().to_string(), "s3://b");
        let file: RemoteUrl = "file:///mnt/share".parse().unwrap();
        assert_eq!(file, RemoteUrl::File { dir: "/mnt/share".into() });
        for bad in ["s3://", "file://relative", "http://x", "s3://b/../up"] {
            let e = bad.parse::<RemoteUrl>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("remote store {bad}:")), "{bad}: {e}");
        }
        let e = "s3://key:secret@bucket/p".parse::<RemoteUrl>().unwrap_err().to_string();
        assert!(e.starts_with("remote store s3://***@bucket/p:") && !e.contains("secret@"), "{e}");
    }

    #[test]
    fn a_file_store_puts_gets_lists_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let url = RemoteUrl::File { dir: dir.path().join("remote") };
        let s = ObjectStorage::open(&url, &S3Settings::default()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("remote")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o700, "a remote directory made here is private");
        s.put("layers/b", Bytes::from_static(b"bee")).unwrap();
        s.put("layers/a", Bytes::from_static(b"ay")).unwrap();
        s.put("manifest/1", Bytes::from_static(b"m")).unwrap();
        assert_eq!(s.get("layers/a").unwrap(), Bytes::from_static(b"ay"));
        let parts = s.get_ranges("layers/b", &[1..3, 0..1]).unwrap();
        assert_eq!(parts, [Bytes::from_static(b"ee"), Bytes::from_static(b"b")]);
        assert_eq!(s.get_tail("layers/b", 2).unwrap(), (Bytes::from_static(b"ee"), 3));
        assert_eq!(s.get_tail("layers/b", 9).unwrap(), (Bytes::from_static(b"bee"), 3));
        assert_eq!(s.list("layers").unwrap(), ["layers/a", "layers/b"]);
        s.delete("layers/a").unwrap();
        s.delete("layers/a").unwrap();
        assert!(matches!(s.get("layers/a"), Err(StorageError::NotFound { .. })));
        assert_eq!(s.list("layers").unwrap(), ["layers/b"]);
        assert!(s.list("nothing").unwrap().is_empty());
    }
}
