//! Scratch data directories for wal-redo processes. A single-user backend locks its data
//! directory, so every redo process gets its own copy of one template, made once per manager:
//! `initdb` with the compute's page checksum setting (it decides whether some redo stamps page
//! LSNs), the `neon` extension created (it holds the redo loop), and the WAL moved far ahead
//! with `pg_resetwal -l` so that evicting a buffer never asks to flush WAL past the scratch
//! cluster's end (DESIGN.md §3).

use super::RedoConfig;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Problems preparing scratch directories.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("could not prepare scratch directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Runs `cmd` as the configured OS user, with PostgreSQL's environment variables cleared.
pub(crate) fn as_server_user<'a>(cmd: &'a mut Command, cfg: &RedoConfig) -> &'a mut Command {
    for var in ["PGDATA", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGOPTIONS"] {
        cmd.env_remove(var);
    }
    if let Some((uid, gid)) = cfg.run_as {
        // As root, std also drops supplementary groups when it switches uid.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn run(cmd: &mut Command, what: &str, stdin: Option<&str>) -> Result<(), ScratchError> {
    use std::io::Write;
    let fail = |detail: String| ScratchError::Command { what: what.to_string(), detail };
    let mut child = cmd
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped");
        pipe.write_all(text.as_bytes()).map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Single-user mode reports SQL errors on stderr but exits 0; look for them too.
    if !out.status.success() || stderr.contains("ERROR:") || stderr.contains("FATAL:") {
        return Err(fail(format!("{}: {}{}", out.status, String::from_utf8_lossy(&out.stdout), stderr)));
    }
    Ok(())
}

fn chown(path: &Path, cfg: &RedoConfig) -> Result<(), ScratchError> {
    if let Some((uid, gid)) = cfg.run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|source| ScratchError::Io { path: path.to_path_buf(), source })?;
    }
    Ok(())
}

/// The template every redo process's data directory is copied from.
#[derive(Debug)]
pub struct ScratchTemplate {
    root: PathBuf,
    template: PathBuf,
}

impl ScratchTemplate {
    /// Creates `cfg.scratch_root` (which must not exist yet, or be empty) and the template in it.
    pub fn create(cfg: &RedoConfig) -> Result<ScratchTemplate, ScratchError> {
        let root = cfg.scratch_root.clone();
        let io = |source| ScratchError::Io { path: root.clone(), source };
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        crate::repo::timeline::private_dir(&root).map_err(io)?;
        // An existing directory must be a directory of ours (not a link, not another user's,
        // who could read what redo writes there); its mode becomes private too.
        let meta = std::fs::symlink_metadata(&root).map_err(io)?;
        // SAFETY: geteuid has no preconditions.
        if !meta.is_dir() || meta.uid() != unsafe { libc::geteuid() } {
            let why = "exists and is not a directory of this OS user's";
            return Err(io(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why)));
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        chown(&root, cfg)?;
        let template = root.join("template");
        let made = Self::make_template(cfg, &template);
        if made.is_err() {
            // A failed start leaves nothing behind.
            let _ = std::fs::remove_dir_all(&root);
        }
        made.map(|()| ScratchTemplate { root, template })
    }

    fn make_template(cfg: &RedoConfig, template: &Path) -> Result<(), ScratchError> {
        // Leftovers of a manager that did not shut down are ours to replace.
        if template.exists() {
            std::fs::remove_dir_all(template)
                .map_err(|source| ScratchError::Io { path: template.to_path_buf(), source })?;
        }
        let bin = |name: &str| cfg.pg_bin_dir.join(name);
        let mut initdb = Command::new(bin("initdb"));
        initdb.arg("-D").arg(template).args([
            "-U",
            "postgres",
            "--no-sync",
            "--no-instructions",
            "-E",
            "UTF8",
            "--locale=C",
            // Every redo process starts from a copy of this directory: a 1 MB WAL segment
            // instead of 16 keeps the copy small (the scratch cluster's WAL is its own).
            "--wal-segsize=1",
        ]);
        if cfg.data_checksums {
            initdb.arg("--data-checksums");
        }
        run(as_server_user(&mut initdb, cfg), "initdb of the wal-redo template", None)?;
        let mut single = Command::new(bin("postgres"));
        single.arg("--single").arg("-D").arg(template).args(["-c", "fsync=off", "postgres"]);
        run(
            as_server_user(&mut single, cfg),
            "CREATE EXTENSION neon in the wal-redo template",
            Some("CREATE EXTENSION neon;\n"),
        )?;
        let mut resetwal = Command::new(bin("pg_resetwal"));
        resetwal.args(["-l", neon_types::walredo::SCRATCH_WAL_FILE, "-D"]).arg(template);
        run(as_server_user(&mut resetwal, cfg), "pg_resetwal of the wal-redo template", None)?;
        // Redo processes connect to `postgres` only; template0 and template1 (fixed OIDs 4 and
        // 1 since PostgreSQL 15) are two thirds of the catalog files every copy would carry.
        for oid in ["1", "4"] {
            let db = template.join("base").join(oid);
            std::fs::remove_dir_all(&db).map_err(|source| ScratchError::Io { path: db.clone(), source })?;
        }
        Ok(())
    }

    /// A fresh copy of the template for redo process `n`, in the same directory each time: a
    /// process killed without exiting (a timeout, a PANIC) leaves its shared memory segment
    /// keyed by the directory's inode, and PostgreSQL removes such a segment at the next start
    /// only if the inode is the same.
    pub fn copy_for(&self, n: usize, cfg: &RedoConfig) -> Result<PathBuf, ScratchError> {
        let dir = self.root.join(format!("redo-{n}"));
        let io = |source| ScratchError::Io { path: dir.clone(), source };
        if dir.exists() {
            for entry in std::fs::read_dir(&dir).map_err(io)? {
                let path = entry.map_err(io)?.path();
                let gone = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                gone.map_err(|source| ScratchError::Io { path: path.clone(), source })?;
            }
        } else {
            std::fs::create_dir(&dir).map_err(io)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
            chown(&dir, cfg)?;
        }
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(self.template.join(".")).arg(&dir);
        // Copy as the server user so the copy is theirs.
        run(as_server_user(&mut cp, cfg), "copying the wal-redo template", None)?;
        Ok(dir)
    }

    /// The directory holding the template and the processes' copies.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Removes the template and every process's copy.
    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
