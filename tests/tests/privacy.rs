//! Private by construction: the store, the redo scratch directories and the shared directory
//! hold every row of the database, so they are the server's OS user's alone from the moment
//! they are made (directories 0700, files 0600). Checked as another OS user (`nobody`), who
//! can neither list nor read them nor find a row of a table in them; and a store found open to
//! others is refused, saying how to fix it. A redo scratch directory a killed sidecar left (its
//! rows with it) is removed by the next sidecar, whoever owns it: the sidecar or its `--run-as`.

use anyhow::{Context, Result};
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// Every directory and file under `root` with a mode open to group or others.
fn open_to_others(root: &Path) -> Result<Vec<String>> {
    let mut open = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        if m.file_type().is_symlink() || m.file_type().is_socket() {
            continue;
        }
        if m.mode() & 0o077 != 0 {
            open.push(format!("{} {:o}", p.display(), m.mode() & 0o777));
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(open)
}

#[test]
fn the_store_scratch_and_shared_directories_are_the_server_users_alone() -> Result<()> {
    anyhow::ensure!(
        neon_tests::is_root(),
        "this test reads as another OS user (nobody): it needs root (CI runs as root)"
    );
    let (c, store) = cluster_born_with_store()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    let secret = "a-row-nobody-may-read-4711";
    c.execute(&format!("CREATE TABLE secrets AS SELECT g, '{secret}' AS v FROM generate_series(1, 300) g"))?;
    c.execute("CREATE EXTENSION neon")?;
    let lsn = neon_tests::workload::flush_lsn(&c)?;
    sidecar.wait_durable(lsn)?;
    // A base backup and a cached page in the shared directory too.
    c.query_one_string(&format!("SELECT bytes FROM neon_basebackup('{lsn}')"))?;
    c.query_one_string(&format!("SELECT length(neon_get_page('secrets', 'main', 0, '{lsn}'))"))?;
    let shared = c.root_dir().join("shared");
    // Its redo processes' scratch directory (in the server user's temporary directory).
    let prefix = format!("neon-sidecar-{}-", sidecar.pid().context("running")?);
    let scratch = std::fs::read_dir("/tmp")?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .with_context(|| format!("no redo scratch directory /tmp/{prefix}*"))?;
    anyhow::ensure!(scratch.is_dir(), "redo scratch {} is no directory", scratch.display());

    for root in [store.as_path(), shared.as_path(), scratch.as_path()] {
        let open = open_to_others(root)?;
        assert!(open.is_empty(), "open to others under {}: {open:?}", root.display());
        // As nobody: nothing to list, nothing to read, no row to find.
        let grep = Command::new("runuser")
            .args(["-u", "nobody", "--", "grep", "-r", "-l", secret])
            .arg(root)
            .output()
            .context("runuser")?;
        let said = String::from_utf8_lossy(&grep.stdout).into_owned() + &String::from_utf8_lossy(&grep.stderr);
        assert!(!grep.status.success() && said.contains("Permission denied"), "nobody in {}: {said}", root.display());
    }
    // As root, the row is there to find: the check above would see it were it readable.
    let found = Command::new("grep").args(["-r", "-l", "-a", secret]).arg(&store).output()?;
    eprintln!("as root, the row is in: {}", String::from_utf8_lossy(&found.stdout));
    sidecar.stop()?;

    // A store opened up is refused, with the fix.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755))?;
    let out = Command::new(neon_tests::sidecar_bin()?).args(["status", "--store"]).arg(&store).output()?;
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("readable by other users") && text.contains("chmod 700"), "{text}");
    Ok(())
}

#[test]
fn a_sidecar_run_as_root_removes_the_scratch_a_killed_one_left() -> Result<()> {
    anyhow::ensure!(neon_tests::is_root(), "this test starts the sidecar as root: it needs root (CI runs as root)");
    let (c, store) = cluster_born_with_store()?;
    // What a sidecar run as root and killed with -9 left: its redo scratch, handed to the
    // server user, of a process that is gone.
    let mut dead = Command::new("true").spawn()?;
    dead.wait()?;
    let stale = Path::new("/tmp").join(format!("neon-sidecar-{}-00000000deadbeef", dead.id()));
    std::fs::create_dir(&stale)?;
    std::fs::write(stale.join("postmaster.pid"), "")?;
    neon_tests::chown_to_server_user(&stale)?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    let left = stale.exists();
    sidecar.stop()?;
    let _ = std::fs::remove_dir_all(&stale);
    assert!(!left, "the scratch {} of a sidecar that is gone is left", stale.display());
    Ok(())
}
