//! Command-line arguments several commands share: which block, how to run wal-redo processes,
//! how to reach a compute over replication. One definition each, flattened into the commands
//! that need them.

use super::conf::SidecarConf;
use crate::walredo::RedoConfig;
use anyhow::{bail, Context};
use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};
use std::path::PathBuf;

/// A block of a relation fork.
#[derive(Debug, Clone, clap::Args)]
pub struct BlockArgs {
    /// The relation, as `spcnode/dbnode/relfilenode` (pg_waldump's `rel` form).
    #[arg(long)]
    pub rel: String,
    /// The fork: main, vm or init.
    #[arg(long, default_value = "main")]
    pub fork: ForkNumber,
    /// The block number.
    #[arg(long)]
    pub blkno: u32,
}

impl BlockArgs {
    pub fn tag(&self) -> anyhow::Result<BufferTag> {
        let text = &self.rel;
        let parts: Vec<&str> = text.split('/').collect();
        let [spc, db, rel] = parts[..] else { bail!("invalid relation {text:?}: expected spcnode/dbnode/relfilenode") };
        let num = |s: &str| s.parse::<u32>().with_context(|| format!("invalid relation {text:?}: {s:?} is not an OID"));
        let node = RelFileNode { spcnode: num(spc)?, dbnode: num(db)?, relnode: num(rel)? };
        Ok(BufferTag { rel: RelTag { node, fork: self.fork }, blkno: self.blkno })
    }
}

/// Where the remote store is (history in object storage). Credentials are never flags: they
/// come from `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`).
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Keep history in this object store too: `s3://BUCKET/PREFIX` (any S3-compatible store)
    /// or `file:///DIR` (a mounted share).
    #[arg(long)]
    pub remote: Option<String>,
    /// The S3 endpoint, `http(s)://host:port`, for stores other than AWS.
    #[arg(long)]
    pub remote_endpoint: Option<String>,
    /// The S3 region (default: `AWS_DEFAULT_REGION`, or us-east-1).
    #[arg(long)]
    pub remote_region: Option<String>,
    /// Path-style S3 requests (`endpoint/bucket/key`), as most S3-compatible stores want.
    #[arg(long)]
    pub remote_path_style: bool,
}

impl RemoteArgs {
    /// The remote store, if one is given.
    pub fn open(&self) -> anyhow::Result<Option<crate::remote::Remote>> {
        use crate::remote::storage::{ObjectStorage, RemoteUrl, S3Settings};
        let Some(url) = &self.remote else { return Ok(None) };
        let url: RemoteUrl = url.parse()?;
        let settings = S3Settings {
            endpoint: self.remote_endpoint.clone(),
            region: self.remote_region.clone(),
            path_style: self.remote_path_style,
            keys: None,
        };
        let storage = ObjectStorage::open(&url, &settings)?;
        Ok(Some(crate::remote::Remote::new(std::sync::Arc::new(storage))))
    }
}

/// How to run wal-redo processes from a command.
#[derive(Debug, Clone, clap::Args)]
pub struct RedoProcessArgs {
    /// PostgreSQL 15's bin directory.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pub pg_bin: PathBuf,
    /// OS user to run postgres as when started as root.
    #[arg(long, default_value = "postgres")]
    pub run_as: String,
    /// The compute has data checksums.
    #[arg(long)]
    pub data_checksums: bool,
}

impl RedoProcessArgs {
    /// A one-process configuration with its scratch directory named after `purpose`.
    pub fn config(&self, purpose: &str) -> anyhow::Result<RedoConfig> {
        use std::hash::{BuildHasher, Hasher};
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let run_as = match uid {
            0 => {
                let user = nix::unistd::User::from_name(&self.run_as)?
                    .with_context(|| format!("no OS user {:?} to run postgres as", self.run_as))?;
                Some((user.uid.as_raw(), user.gid.as_raw()))
            }
            _ => None,
        };
        remove_stale_scratch(purpose, uid, run_as.map(|(u, _)| u));
        // Unguessable, so that nobody can make it first (the directory must be new: another
        // user's would not be private).
        let random = std::hash::RandomState::new().build_hasher().finish();
        let name = format!("neon-{purpose}-{}-{random:016x}", std::process::id());
        let mut cfg = RedoConfig::new(std::env::temp_dir().join(name));
        cfg.pg_bin_dir = self.pg_bin.clone();
        cfg.processes = 1;
        cfg.data_checksums = self.data_checksums;
        cfg.run_as = run_as;
        Ok(cfg)
    }
}

/// Removes the redo scratch directories (`$TMPDIR/neon-<purpose>-<pid>-<random>`) of the
/// sidecars of `uid` (this one's) that ended without cleaning up (`kill -9`): their process is
/// gone. A sidecar run as root hands its scratch to `run_as` (the uid its redo processes run
/// as): those too.
fn remove_stale_scratch(purpose: &str, uid: u32, run_as: Option<u32>) {
    use std::os::unix::fs::MetadataExt;
    let prefix = format!("neon-{purpose}-");
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in dir.flatten() {
        let name = e.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(&prefix)).and_then(|p| p.split('-').next());
        let Some(pid) = pid.and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let ours = e.metadata().is_ok_and(|m| m.is_dir() && (m.uid() == uid || Some(m.uid()) == run_as));
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let gone =
            unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if ours && gone && pid != std::process::id() as i32 {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// How to reach a compute over the replication protocol. Left out, each comes from what
/// `init` or `attach` recorded in the store (`cli::conf`).
#[derive(Debug, Clone, clap::Args)]
pub struct ComputeArgs {
    /// The compute: a unix socket directory or a host name.
    #[arg(long)]
    pub host: Option<String>,
    /// The compute's port (default 5432).
    #[arg(long)]
    pub port: Option<u16>,
    /// A role with REPLICATION (default postgres).
    #[arg(long)]
    pub user: Option<String>,
    /// A file holding the password, if the compute asks for one.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// The replication slot the sidecar owns (default neon_sidecar).
    #[arg(long)]
    pub slot: Option<String>,
}

/// The slot's name unless another is given.
pub const DEFAULT_SLOT: &str = "neon_sidecar";

impl ComputeArgs {
    /// The slot: given, else recorded in the store, else [`DEFAULT_SLOT`].
    pub fn slot(&self, conf: &SidecarConf) -> String {
        self.slot.clone().or_else(|| conf.slot.clone()).unwrap_or_else(|| DEFAULT_SLOT.to_string())
    }

    /// Where and as whom to connect: given, else as recorded in the store (a local compute's
    /// socket and port read from its `postmaster.pid`).
    pub fn replication(
        &self,
        application_name: &str,
        conf: &SidecarConf,
    ) -> anyhow::Result<crate::replication::client::ReplicationConfig> {
        let password = match &self.password_file {
            Some(p) => {
                Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
            }
            None => None,
        };
        let (host, port) = match (self.host.clone().or_else(|| conf.host.clone()), &conf.pgdata) {
            (Some(host), _) => (host, self.port.or(conf.port).unwrap_or(5432)),
            (None, Some(pgdata)) => {
                let (dir, port) = super::conf::local_compute(pgdata)?;
                (dir, self.port.unwrap_or(port))
            }
            (None, None) => {
                bail!("give --host (the compute's socket directory or host name): the store does not say where it is")
            }
        };
        Ok(crate::replication::client::ReplicationConfig {
            host,
            port,
            user: self.user.clone().or_else(|| conf.user.clone()).unwrap_or_else(|| "postgres".to_string()),
            password,
            application_name: application_name.into(),
        })
    }
}
