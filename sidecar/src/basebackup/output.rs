//! Where a base backup's files go: into the tar, except those of tablespaces mapped to a
//! directory of their own (`--tablespace-map OID=DIR`, as `pg_basebackup -T` maps them), which
//! are written there as plain files while the tar holds `pg_tblspc/<oid>` as a symbolic link
//! to DIR. Unmapped tablespaces are in place: `pg_tblspc/<oid>/` is a directory in the tar,
//! which stock PostgreSQL 15 starts from (as from `allow_in_place_tablespaces`).

use super::tar::{TarError, TarWriter};
use crate::repo::meta::TABLESPACE_VERSION_DIRECTORY;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

pub struct Output<W: Write> {
    pub tar: TarWriter<W>,
    /// Tablespace OID → the directory its files go to.
    map: BTreeMap<u32, PathBuf>,
    /// A file being written into a mapped directory: the file, its path, bytes declared and
    /// written.
    open: Option<(BufWriter<File>, PathBuf, u64, u64)>,
}

impl<W: Write> Output<W> {
    pub fn new(tar: TarWriter<W>, map: BTreeMap<u32, PathBuf>) -> Output<W> {
        Output { tar, map, open: None }
    }

    /// The directory `path` (an archive path) is written to, if its tablespace is mapped, and
    /// the rest of the path below `pg_tblspc/<oid>/`.
    fn mapped<'p>(&self, path: &'p str) -> Option<(&PathBuf, &'p str)> {
        let rest = path.strip_prefix("pg_tblspc/")?;
        let (oid, below) = rest.split_once('/')?;
        Some((self.map.get(&oid.parse().ok()?)?, below))
    }

    /// The entry of tablespace `oid` itself, and its version directory.
    pub fn tablespace(&mut self, oid: u32) -> Result<(), TarError> {
        let path = format!("pg_tblspc/{oid}");
        match self.map.get(&oid) {
            Some(dir) => {
                crate::repo::timeline::private_dir(dir)?;
                let target = dir.to_str().ok_or_else(|| TarError::LinkTooLong(dir.display().to_string()))?;
                self.tar.symlink(&path, target)?;
            }
            None => self.tar.dir(&path)?,
        }
        self.dir(&format!("{path}/{TABLESPACE_VERSION_DIRECTORY}"))
    }

    pub fn dir(&mut self, path: &str) -> Result<(), TarError> {
        match self.mapped(path) {
            Some((dir, below)) => Ok(crate::repo::timeline::private_dir(&dir.join(below))?),
            None => self.tar.dir(path),
        }
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> Result<(), TarError> {
        self.begin_file(path, data.len() as u64)?;
        self.write(data)?;
        self.end_file()
    }

    pub fn begin_file(&mut self, path: &str, size: u64) -> Result<(), TarError> {
        match self.mapped(path) {
            Some((dir, below)) => {
                let to = dir.join(below);
                if let Some(parent) = to.parent() {
                    crate::repo::timeline::private_dir(parent)?;
                }
                let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&to)?;
                self.open = Some((BufWriter::with_capacity(1 << 20, f), to, size, 0));
                Ok(())
            }
            None => self.tar.begin_file(path, size),
        }
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), TarError> {
        match &mut self.open {
            Some((f, _, _, written)) => {
                f.write_all(data)?;
                *written += data.len() as u64;
                Ok(())
            }
            None => self.tar.write(data),
        }
    }

    pub fn end_file(&mut self) -> Result<(), TarError> {
        match self.open.take() {
            Some((f, path, declared, written)) => {
                if declared != written {
                    return Err(TarError::SizeMismatch { path: path.display().to_string(), written, declared });
                }
                f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
                Ok(())
            }
            None => self.tar.end_file(),
        }
    }
}
