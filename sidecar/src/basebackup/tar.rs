//! Writing a tar archive as a stream (POSIX ustar headers, as GNU tar and PostgreSQL's
//! `pg_basebackup -Ft` produce), so a base backup never holds more than one page in memory.
//!
//! ```text
//! header (512 bytes): name [0..100] | mode [100..108] | uid | gid | size [124..136] (octal) |
//!   mtime [136..148] | checksum [148..156] | typeflag [156] ('0' file, '2' symbolic link,
//!   '5' directory) | linkname [157..257] | magic [257..263] "ustar\0" | version "00" | uname |
//!   gname | prefix [345..500]
//! then the file's bytes, padded to a multiple of 512; two zero blocks end the archive
//! ```

use std::io::Write;

const BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("writing the archive: {0}")]
    Io(#[from] std::io::Error),
    #[error("archive path {0:?} is too long")]
    PathTooLong(String),
    #[error("symbolic link target {0:?} is too long (at most 100 bytes)")]
    LinkTooLong(String),
    #[error("{path}: {written} bytes written, {declared} declared")]
    SizeMismatch { path: String, written: u64, declared: u64 },
}

/// What a header announces.
enum Entry<'a> {
    File,
    Dir,
    Symlink(&'a str),
}

/// A tar stream over `out`. Files are written as `begin_file`, any number of `write`s adding
/// up to the declared size, `end_file`.
pub struct TarWriter<W: Write> {
    out: W,
    mtime: u64,
    open: Option<(String, u64, u64)>,
    /// Bytes written to `out` so far.
    pub bytes: u64,
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W, mtime: u64) -> TarWriter<W> {
        TarWriter { out, mtime, open: None, bytes: 0 }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), TarError> {
        self.out.write_all(b)?;
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn header(&mut self, path: &str, size: u64, kind: Entry<'_>) -> Result<(), TarError> {
        let mut h = [0u8; BLOCK];
        let (prefix, name) = if path.len() <= 100 {
            ("", path)
        } else {
            match path[..path.len().min(156)].rfind('/') {
                Some(at) if path.len() - at - 1 <= 100 => (&path[..at], &path[at + 1..]),
                _ => return Err(TarError::PathTooLong(path.to_string())),
            }
        };
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], if matches!(kind, Entry::File) { 0o600 } else { 0o700 });
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], self.mtime);
        h[156] = match kind {
            Entry::File => b'0',
            Entry::Symlink(target) => {
                if target.len() > 100 {
                    return Err(TarError::LinkTooLong(target.to_string()));
                }
                h[157..157 + target.len()].copy_from_slice(target.as_bytes());
                b'2'
            }
            Entry::Dir => b'5',
        };
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..273].copy_from_slice(b"postgres");
        h[297..305].copy_from_slice(b"postgres");
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        self.put(&h)
    }

    pub fn dir(&mut self, path: &str) -> Result<(), TarError> {
        self.header(&format!("{}/", path.trim_end_matches('/')), 0, Entry::Dir)
    }

    /// A symbolic link at `path` to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TarError> {
        self.header(path.trim_end_matches('/'), 0, Entry::Symlink(target))
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> Result<(), TarError> {
        self.begin_file(path, data.len() as u64)?;
        self.write(data)?;
        self.end_file()
    }

    pub fn begin_file(&mut self, path: &str, size: u64) -> Result<(), TarError> {
        self.header(path, size, Entry::File)?;
        self.open = Some((path.to_string(), size, 0));
        Ok(())
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), TarError> {
        self.put(data)?;
        if let Some(open) = &mut self.open {
            open.2 += data.len() as u64;
        }
        Ok(())
    }

    pub fn end_file(&mut self) -> Result<(), TarError> {
        let (path, declared, written) = self.open.take().unwrap_or_default();
        if declared != written {
            return Err(TarError::SizeMismatch { path, written, declared });
        }
        let pad = (BLOCK - (written % BLOCK as u64) as usize) % BLOCK;
        self.put(&[0u8; BLOCK][..pad])
    }

    /// Ends the archive and hands back the writer.
    pub fn finish(mut self) -> Result<W, TarError> {
        self.put(&[0u8; 2 * BLOCK])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::tar_reader::TarUnpacker;

    #[test]
    fn what_is_written_unpacks() {
        let mut t = TarWriter::new(Vec::new(), 1_700_000_000);
        t.dir("base").unwrap();
        t.file("base/PG_VERSION", b"15\n").unwrap();
        let long = format!("{}/{}", "d".repeat(90), "f".repeat(60));
        t.file(&long, &[7u8; 1000]).unwrap();
        t.begin_file("big", 8192 * 2).unwrap();
        t.write(&[1u8; 8192]).unwrap();
        t.write(&[2u8; 8192]).unwrap();
        t.end_file().unwrap();
        assert!(t.begin_file("short", 10).and_then(|()| t.end_file()).is_err());
        let bytes = TarWriter::new(Vec::new(), 0).finish().unwrap();
        assert_eq!(bytes.len(), 1024);
        let mut t = TarWriter::new(Vec::new(), 0);
        t.file("a/b", b"x").unwrap();
        let archive = t.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut u = TarUnpacker::new(dir.path());
        u.feed(&archive).unwrap();
        assert!(u.is_done());
        assert_eq!(std::fs::read(dir.path().join("a/b")).unwrap(), b"x");
        // And GNU tar agrees.
        let path = dir.path().join("x.tar");
        let mut t = TarWriter::new(std::fs::File::create(&path).unwrap(), 0);
        t.dir("base").unwrap();
        t.file(&long, &[7u8; 1000]).unwrap();
        t.symlink("pg_tblspc/16400", "/srv/ts").unwrap();
        assert!(matches!(t.symlink("l", &"x".repeat(101)), Err(TarError::LinkTooLong(_))));
        t.finish().unwrap();
        let out = std::process::Command::new("tar").arg("-tvf").arg(&path).output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && listing.contains(&long) && listing.contains("1000"), "{listing}");
        assert!(listing.contains("pg_tblspc/16400 -> /srv/ts"), "{listing}");
    }
}
