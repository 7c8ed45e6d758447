//! Which OS user the PostgreSQL server runs as. PostgreSQL refuses to run as
//! root, so when the tests run as root (CI, dev containers) server-side
//! programs are switched to the `postgres` OS user ([`run_as_server_user`])
//! and the files they must own are given to it ([`chown_to_server_user`]);
//! otherwise everything runs as the current user. [`crate::Cluster`] uses this
//! for `initdb`, `pg_ctl`, `postgres` and [`crate::Cluster::server_tool`].

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// OS user that runs the server when the tests run as root.
pub const SERVER_OS_USER: &str = "postgres";

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `(uid, gid)` the server runs as: the `postgres` OS user when we are root,
/// otherwise the current user and group.
///
/// # Panics
/// When running as root and no `postgres` OS user exists (install the
/// `postgresql-15` package, which creates it).
pub fn server_user() -> (u32, u32) {
    static USER: OnceLock<(u32, u32)> = OnceLock::new();
    *USER.get_or_init(|| {
        if is_root() {
            match nix::unistd::User::from_name(SERVER_OS_USER) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                Ok(None) => panic!(
                    "running as root, but there is no `{SERVER_OS_USER}` OS user to run \
                     PostgreSQL as (PostgreSQL refuses to run as root)"
                ),
                Err(e) => panic!("looking up OS user `{SERVER_OS_USER}`: {e}"),
            }
        } else {
            (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
        }
    })
}

/// Makes `cmd` run as the server OS user when we are root (no-op otherwise).
///
/// Uses [`CommandExt::uid`]/[`CommandExt::gid`]; when switching away from root
/// std also drops all supplementary groups (`setgroups(0, NULL)`), so the child
/// has exactly the `postgres` user's uid and primary gid. The child keeps the
/// parent's environment (including `HOME`) and working directory, so make sure
/// the working directory is accessible to that user (e.g. set
/// `current_dir` to a directory owned by it) and that all paths passed are
/// reachable by it.
pub fn run_as_server_user(cmd: &mut Command) -> &mut Command {
    if is_root() {
        let (uid, gid) = server_user();
        cmd.gid(gid).uid(uid);
    }
    cmd
}

/// Recursively gives `path` (file or directory tree, symlinks not followed) to
/// the server OS user when we are root; no-op otherwise.
pub fn chown_to_server_user(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = server_user();
    use std::os::unix::fs::MetadataExt;
    let dev = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?.dev();
    chown_recursive(path, uid, gid, dev)
}

/// Stays on the file system `dev`: what is mounted below (a branch, made by the server's
/// user, or one whose sidecar died) is not ours to change.
fn chown_recursive(path: &Path, uid: u32, gid: u32, dev: u64) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(path) {
        Ok(m) if m.dev() != dev => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Ok(()),
        _ => {}
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {} to {uid}:{gid}", path.display()))?;
    let meta = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            chown_recursive(&entry?.path(), uid, gid, dev)?;
        }
    }
    Ok(())
}
