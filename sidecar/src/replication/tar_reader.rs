//! Unpacking a tar stream as it arrives (the archive `BASE_BACKUP` sends), into a directory:
//! regular files and directories only, with every path checked to stay inside it. Runs of
//! zeros in data files are left as holes (a copy's data files have empty pages): the files read
//! the same, and are written in less time. PostgreSQL counts on a WAL segment being allocated,
//! so that a write into one never meets a full disk: a `pg_wal/` file is allocated whole
//! first (`fallocate`, which reads as zeros without writing them), or, where the file system
//! cannot, written out in full.
//!
//! ```text
//! header (512 bytes, ustar): name [0..100] | mode | uid | gid | size [124..136] (octal, or
//!   base-256 when the high bit is set) | mtime | checksum | typeflag [156] | linkname |
//!   magic [257..263] "ustar" | ... | prefix [345..500]
//! then the file's bytes, padded to a multiple of 512; two zero blocks end the archive
//! ```

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("unpacking into {dir}: {source}")]
    Io { dir: PathBuf, source: std::io::Error },
    #[error("tar stream: {0}")]
    Malformed(String),
}

enum State {
    Header,
    Data { file: Option<File>, sparse: bool, size: u64, left: u64, pad: usize },
    Done,
}

/// Feeds a tar stream in pieces of any size into files under `dir`.
pub struct TarUnpacker {
    dir: PathBuf,
    pending: Vec<u8>,
    state: State,
    pub files: usize,
    pub bytes: u64,
}

fn octal(field: &[u8]) -> Result<u64, TarError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // Base-256: big-endian binary after the marker byte.
        return Ok(field[1..].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)));
    }
    let text: String = field.iter().take_while(|b| **b != 0 && **b != b' ').map(|b| *b as char).collect();
    let text = text.trim_start();
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| TarError::Malformed(format!("bad octal field {text:?}")))
}

fn cstr(field: &[u8]) -> String {
    String::from_utf8_lossy(&field[..field.iter().position(|b| *b == 0).unwrap_or(field.len())]).into_owned()
}

/// Allocates `size` bytes of `f` without writing them (they read as zeros); false where the
/// file system cannot.
fn allocate(f: &File, size: u64) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(true);
    }
    // SAFETY: fallocate(2) on a descriptor `f` owns, for the range [0, size).
    match unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) } {
        0 => Ok(true),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            e => Err(e),
        },
    }
}

/// Writes `data` at `f`'s position, seeking over 4 KB pieces that are all zeros.
fn write_sparse(f: &mut File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    for piece in data.chunks(4096) {
        if piece.iter().all(|b| *b == 0) {
            f.seek(SeekFrom::Current(piece.len() as i64))?;
        } else {
            f.write_all(piece)?;
        }
    }
    Ok(())
}

impl TarUnpacker {
    pub fn new(dir: &Path) -> TarUnpacker {
        TarUnpacker { dir: dir.to_path_buf(), pending: Vec::new(), state: State::Header, files: 0, bytes: 0 }
    }

    fn io(&self, source: std::io::Error) -> TarError {
        TarError::Io { dir: self.dir.clone(), source }
    }

    /// Where `name` goes, refusing anything that would leave the directory.
    fn target(&self, name: &str) -> Result<PathBuf, TarError> {
        let rel = Path::new(name);
        if rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(TarError::Malformed(format!("refusing path {name:?}")));
        }
        Ok(self.dir.join(rel))
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TarError> {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Data { file, sparse, size, left, pad } => {
                    if *left > 0 {
                        let n = (*left).min(data.len() as u64) as usize;
                        if let Some(f) = file {
                            let io = |e| TarError::Io { dir: self.dir.clone(), source: e };
                            if *sparse {
                                write_sparse(f, &data[..n]).map_err(io)?;
                            } else {
                                f.write_all(&data[..n]).map_err(io)?;
                            }
                            if *left == n as u64 {
                                // A hole at the end is the file's length, not a write.
                                f.set_len(*size).map_err(io)?;
                            }
                        }
                        *left -= n as u64;
                        self.bytes += n as u64;
                        data = &data[n..];
                    } else if *pad > 0 {
                        let n = (*pad).min(data.len());
                        *pad -= n;
                        data = &data[n..];
                    } else {
                        self.state = State::Header;
                    }
                }
                State::Header => {
                    let need = BLOCK - self.pending.len();
                    let n = need.min(data.len());
                    self.pending.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.pending.len() == BLOCK {
                        let header = std::mem::take(&mut self.pending);
                        self.header(&header)?;
                    }
                }
            }
        }
        if let State::Data { left: 0, pad: 0, .. } = self.state {
            self.state = State::Header;
        }
        Ok(())
    }

    fn header(&mut self, h: &[u8]) -> Result<(), TarError> {
        if h.iter().all(|b| *b == 0) {
            self.state = State::Done;
            return Ok(());
        }
        let sum: u64 =
            h.iter().enumerate().map(|(i, b)| if (148..156).contains(&i) { 32 } else { u64::from(*b) }).sum();
        if octal(&h[148..156])? != sum {
            return Err(TarError::Malformed("header checksum mismatch".into()));
        }
        let mut name = cstr(&h[..100]);
        if &h[257..262] == b"ustar" {
            let prefix = cstr(&h[345..500]);
            if !prefix.is_empty() {
                name = format!("{prefix}/{name}");
            }
        }
        let size = octal(&h[124..136])?;
        let path = self.target(name.trim_end_matches('/'))?;
        let file = match h[156] {
            b'5' => {
                crate::repo::timeline::private_dir(&path).map_err(|e| self.io(e))?;
                None
            }
            b'0' | 0 => {
                if let Some(parent) = path.parent() {
                    crate::repo::timeline::private_dir(parent).map_err(|e| self.io(e))?;
                }
                self.files += 1;
                let file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path);
                Some(file.map_err(|e| self.io(e))?)
            }
            // Symbolic links (pg_tblspc entries), pax headers and the like carry nothing we
            // unpack; their data, if any, is skipped.
            _ => None,
        };
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        let sparse = match &file {
            Some(f) if name.starts_with("pg_wal/") => allocate(f, size).map_err(|e| self.io(e))?,
            _ => true,
        };
        self.state = State::Data { file, sparse, size, left: size, pad };
        Ok(())
    }
}

/// A tar stream unpacked as it is written (a base backup's writer can be the unpacker).
impl Write for TarUnpacker {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TarUnpacker;
    use crate::basebackup::tar::TarWriter;
    use std::os::unix::fs::MetadataExt;

    /// Zeros become holes — at the start, between data and at the end — and the file reads
    /// the same, whatever pieces the stream arrives in.
    #[test]
    fn zeros_are_holes_and_read_back_the_same() {
        let mut data = vec![0u8; 4 << 20];
        data[5000] = 1;
        data[(2 << 20) + 17] = 2;
        let mut w = TarWriter::new(Vec::new(), 0);
        w.file("seg", &data).unwrap();
        w.file("small", b"abc").unwrap();
        w.file("pg_wal/000000010000000000000001", &data).unwrap();
        let tar = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut u = TarUnpacker::new(dir.path());
        for piece in tar.chunks(3000) {
            u.feed(piece).unwrap();
        }
        assert!(u.is_done());
        assert_eq!(std::fs::read(dir.path().join("seg")).unwrap(), data);
        assert_eq!(std::fs::read(dir.path().join("small")).unwrap(), b"abc");
        let m = std::fs::metadata(dir.path().join("seg")).unwrap();
        assert!(m.blocks() * 512 < 1 << 20, "{} bytes allocated for 4 MB of mostly zeros", m.blocks() * 512);
        // A WAL segment is allocated whole (its zeros not written: fallocate, or written where
        // the file system cannot).
        let wal = dir.path().join("pg_wal/000000010000000000000001");
        assert_eq!(std::fs::read(&wal).unwrap(), data);
        assert!(std::fs::metadata(&wal).unwrap().blocks() * 512 >= 4 << 20);
    }
}
