//! Stamps the library with the build's identity (`build_id.rs`) as `NEON_BUILD_ID`, which
//! `neon_version()` reports. Cargo runs a build script again only when a file it names
//! changes, so it names every file the identity depends on: git's `HEAD` (another branch),
//! the ref `HEAD` points to and `packed-refs` (a commit), the index (a file staged or
//! untracked), and the extension's inputs themselves (an edit). Without a git checkout the
//! identity is `unknown` and the build goes on.

use build_id::git;
use std::path::{Path, PathBuf};

#[path = "build_id.rs"]
mod build_id;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("pg_ext/ is in the workspace");
    println!("cargo:rustc-env=NEON_BUILD_ID={}", build_id::of_checkout(root));
    let mut watched: Vec<PathBuf> = build_id::INPUTS.iter().map(|i| root.join(i)).collect();
    watched.push(root.join(".gitignore"));
    if let Some(git_dir) = git_path(root, "--absolute-git-dir") {
        watched.push(git_dir.join("HEAD"));
        watched.push(git_dir.join("index"));
    }
    // In a linked work tree, refs live in the common directory.
    if let (Some(common), Some(head_ref)) =
        (git_path(root, "--git-common-dir"), git(root, &["symbolic-ref", "-q", "HEAD"]))
    {
        watched.push(common.join(head_ref.trim()));
        watched.push(common.join("packed-refs"));
    }
    // A path that does not exist would make Cargo run the script on every build.
    for p in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
}

/// A directory `git rev-parse <flag>` names, made absolute (it may answer relative to `root`).
fn git_path(root: &Path, flag: &str) -> Option<PathBuf> {
    git(root, &["rev-parse", flag]).map(|p| root.join(p.trim()))
}
