//! A small tmpfs mounted for a test (a disk that fills up), unmounted when dropped — also when
//! the test fails. Mounting needs root, as CI runs; without it the test fails saying so rather
//! than passing without having tested anything.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mb` MB at `dir` (made if missing), open to the server's OS user.
    pub fn mount(dir: &Path, mb: u64) -> Result<Tmpfs> {
        anyhow::ensure!(
            crate::is_root(),
            "this test needs a small disk of its own: mounting a tmpfs needs root (CI runs as root)"
        );
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m,mode=0755"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        anyhow::ensure!(
            out.status.success(),
            "mount -t tmpfs at {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs { dir: dir.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Fills what is left of it with a file, `filler`; returns its path.
    pub fn fill(&self) -> Result<PathBuf> {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0x5Au8; 1 << 16];
        loop {
            match f.write_all(&chunk).and_then(|()| f.flush()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(path),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily if still busy (a process of a failed test holding a file).
        let ok = Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
