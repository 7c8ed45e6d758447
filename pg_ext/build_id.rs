//! The build's identity, which `neon_version()` reports: the git commit the extension is built
//! from and, when its sources differ from that commit, a digest of what differs. One file
//! shared by path: the build script stamps the identity into the library, and
//! `tests/tests/extension.rs` computes it for the checkout as it is when the tests run, so an
//! installed `neon.so` older than the sources shows.
//!
//! Only the extension's inputs count ([`INPUTS`]): an edit to the tests or the sidecar changes
//! nothing in `neon.so`, so it does not make the installed library stale. A digest of the
//! differing files, not a bare `-dirty`, so that a library built from one uncommitted state is
//! told from one built from the next.

use std::path::Path;
use std::process::Command;

/// What the library is built from, relative to the workspace root: the extension, the one
/// workspace crate it links, and the manifests that pin everything else.
pub const INPUTS: &[&str] = &["pg_ext", "types", "Cargo.toml", "Cargo.lock"];

/// `<HEAD's commit, 12 hex digits>`, with `-dirty-<16 hex digits>` when [`INPUTS`] differ
/// from that commit (staged or not, untracked files included); `unknown` without a git
/// checkout (a source tarball) or without git.
pub fn of_checkout(root: &Path) -> String {
    identity(root).unwrap_or_else(|| "unknown".to_string())
}

fn identity(root: &Path) -> Option<String> {
    let head = git(root, &["rev-parse", "--short=12", "HEAD"])?.trim().to_string();
    // Tracked files that differ from HEAD (in the index or only in the work tree), and files
    // git does not track and does not ignore.
    // `--relative`: names relative to `root`, as `ls-files` gives them, even when the
    // workspace is a directory inside a larger repository.
    let mut args = vec!["diff", "--name-only", "--relative", "-z", "HEAD", "--"];
    args.extend(INPUTS);
    let mut changed: Vec<String> = split_z(&git(root, &args)?);
    let mut args = vec!["ls-files", "-z", "--others", "--exclude-standard", "--"];
    args.extend(INPUTS);
    changed.extend(split_z(&git(root, &args)?));
    if changed.is_empty() {
        return Some(head);
    }
    changed.sort();
    changed.dedup();
    // FNV-1a over each file's name and contents, each length-prefixed so that no two
    // different sets of files feed it the same bytes; a deleted file has no contents.
    let mut digest = Fnv(0xcbf2_9ce4_8422_2325);
    for name in &changed {
        digest.feed(&(name.len() as u64).to_le_bytes());
        digest.feed(name.as_bytes());
        match std::fs::read(root.join(name)) {
            Ok(data) => {
                digest.feed(&(data.len() as u64).to_le_bytes());
                digest.feed(&data);
            }
            Err(_) => digest.feed(&u64::MAX.to_le_bytes()),
        }
    }
    Some(format!("{head}-dirty-{:016x}", digest.0))
}

struct Fnv(u64);

impl Fnv {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

fn split_z(out: &str) -> Vec<String> {
    out.split('\0').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// `git <args>` in `root`: its output, or `None` if git is missing or fails (no checkout).
/// `GIT_OPTIONAL_LOCKS=0`: asking must not rewrite the index under a concurrent git command.
pub fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").current_dir(root).env("GIT_OPTIONAL_LOCKS", "0").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
