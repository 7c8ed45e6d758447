//! Delta-layer files: an immutable set of values, each filed under (key, LSN), as written when
//! the in-memory layer is frozen. Written once to a temporary name, fsync'd and renamed (so a
//! crash leaves either the whole file or none), then read through `mmap`; every blob and the
//! index carry a CRC32C that is checked on read, so a corrupted file is reported, never served.
//!
//! ```text
//! file:   blobs | index | footer (48 bytes)
//! blob:   u32 len | u32 crc32c(payload) | payload (an encoded Value)
//! index:  entries sorted by (key, lsn), each 38 bytes:
//!           key [18] | lsn u64 | blob offset u64 | blob payload length u32
//! footer: magic u64 "NEONDL01" | version u32 | entries u32 | index offset u64 |
//!         min lsn u64 | max lsn u64 | index crc32c u32 | footer crc32c u32 (of the 44 bytes before)
//! all integers little-endian, except keys (their own big-endian encoding, see `key`).
//! ```

use super::key::{Key, KEY_LEN};
use super::value::{Value, ValueError};
use bytes::{Bytes, BytesMut};
use memmap2::Mmap;
use neon_types::Lsn;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const MAGIC: u64 = u64::from_le_bytes(*b"NEONDL01");
const VERSION: u32 = 1;
const FOOTER_LEN: usize = 48;
const ENTRY_LEN: usize = KEY_LEN + 8 + 8 + 4;
const BLOB_HEADER_LEN: usize = 8;

/// Problems with a layer file, naming it.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("layer file {path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("layer file {path}: {key} at {lsn}: {source}")]
    Value { path: PathBuf, key: Key, lsn: Lsn, source: ValueError },
}

/// Writes a delta layer. Nothing is visible under the final name until [`finish`]; dropping
/// the writer unfinished removes the temporary file.
///
/// [`finish`]: DeltaLayerWriter::finish
pub struct DeltaLayerWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    offset: u64,
    entries: Vec<(Key, Lsn, u64, u32)>,
    scratch: BytesMut,
}

impl DeltaLayerWriter {
    pub fn new(path: &Path) -> Result<DeltaLayerWriter, LayerError> {
        let tmp = path.with_extension("tmp");
        // New and private (the values are the database's rows); a leftover of an interrupted
        // write is replaced.
        let _ = std::fs::remove_file(&tmp);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|source| LayerError::Io { path: tmp.clone(), source })?;
        Ok(DeltaLayerWriter {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            offset: 0,
            entries: Vec::new(),
            scratch: BytesMut::new(),
        })
    }

    fn io(&self, source: std::io::Error) -> LayerError {
        LayerError::Io { path: self.tmp.clone(), source }
    }

    /// Appends a value; values may come in any order.
    pub fn put(&mut self, key: Key, lsn: Lsn, value: &Value) -> Result<(), LayerError> {
        self.scratch.clear();
        value.encode(&mut self.scratch);
        let len = u32::try_from(self.scratch.len()).map_err(|_| LayerError::Corrupt {
            path: self.tmp.clone(),
            what: format!("value of {key} at {lsn} is larger than 4 GB"),
        })?;
        let crc = crc32c::crc32c(&self.scratch);
        let out = self.out.as_mut().expect("open until finish");
        let r = out
            .write_all(&len.to_le_bytes())
            .and_then(|()| out.write_all(&crc.to_le_bytes()))
            .and_then(|()| out.write_all(&self.scratch));
        r.map_err(|e| self.io(e))?;
        self.entries.push((key, lsn, self.offset, len));
        self.offset += (BLOB_HEADER_LEN + len as usize) as u64;
        Ok(())
    }

    /// Writes the index and footer, makes the file durable and gives it its final name.
    pub fn finish(mut self) -> Result<PathBuf, LayerError> {
        self.entries.sort_by_key(|e| (e.0, e.1));
        let mut index = Vec::with_capacity(self.entries.len() * ENTRY_LEN);
        for (key, lsn, off, len) in &self.entries {
            index.extend_from_slice(&key.encode());
            index.extend_from_slice(&lsn.0.to_le_bytes());
            index.extend_from_slice(&off.to_le_bytes());
            index.extend_from_slice(&len.to_le_bytes());
        }
        let min = self.entries.iter().map(|e| e.1).min().unwrap_or_default();
        let max = self.entries.iter().map(|e| e.1).max().unwrap_or_default();
        let mut footer = Vec::with_capacity(FOOTER_LEN);
        footer.extend_from_slice(&MAGIC.to_le_bytes());
        footer.extend_from_slice(&VERSION.to_le_bytes());
        footer.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(&min.0.to_le_bytes());
        footer.extend_from_slice(&max.0.to_le_bytes());
        footer.extend_from_slice(&crc32c::crc32c(&index).to_le_bytes());
        let fcrc = crc32c::crc32c(&footer);
        footer.extend_from_slice(&fcrc.to_le_bytes());
        let mut out = self.out.take().expect("open until finish");
        let r = out.write_all(&index).and_then(|()| out.write_all(&footer)).and_then(|()| out.flush());
        r.map_err(|e| self.io(e))?;
        let file = out.into_inner().map_err(|e| self.io(e.into_error()))?;
        file.sync_all().map_err(|e| self.io(e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.io(e))?;
        // The rename itself must survive a crash: sync the directory.
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|source| LayerError::Io { path: dir.to_path_buf(), source })?;
        }
        Ok(self.path.clone())
    }
}

impl Drop for DeltaLayerWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// An open delta layer.
pub struct DeltaLayer {
    path: PathBuf,
    map: Bytes,
    index: Range<usize>,
    entries: usize,
    lsn_range: (Lsn, Lsn),
}

impl DeltaLayer {
    /// Opens a layer file, checking its footer and index.
    pub fn open(path: &Path) -> Result<DeltaLayer, LayerError> {
        let corrupt = |what: String| LayerError::Corrupt { path: path.to_path_buf(), what };
        let file = File::open(path).map_err(|source| LayerError::Io { path: path.to_path_buf(), source })?;
        // SAFETY: layer files are immutable once renamed into place and only ever removed
        // (never truncated or rewritten) while mapped, so the mapped bytes cannot change.
        let map = unsafe { Mmap::map(&file) }.map_err(|source| LayerError::Io { path: path.to_path_buf(), source })?;
        let map = Bytes::from_owner(map);
        if map.len() < FOOTER_LEN {
            return Err(corrupt(format!("{} bytes is shorter than its footer", map.len())));
        }
        let f = &map[map.len() - FOOTER_LEN..];
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().expect("8 bytes"));
        if crc32c::crc32c(&f[..44]) != u32_at(44) {
            return Err(corrupt("footer checksum mismatch".into()));
        }
        if u64_at(0) != MAGIC || u32_at(8) != VERSION {
            return Err(corrupt(format!("not a version {VERSION} delta layer")));
        }
        let entries = u32_at(12) as usize;
        let index_start = usize::try_from(u64_at(16)).map_err(|_| corrupt("index offset".into()))?;
        let index_end = index_start.checked_add(entries * ENTRY_LEN).filter(|&e| e == map.len() - FOOTER_LEN);
        let Some(index_end) = index_end else {
            return Err(corrupt(format!("index of {entries} entries at {index_start} does not end at the footer")));
        };
        if crc32c::crc32c(&map[index_start..index_end]) != u32_at(40) {
            return Err(corrupt("index checksum mismatch".into()));
        }
        let lsn_range = (Lsn(u64_at(24)), Lsn(u64_at(32)));
        Ok(DeltaLayer { path: path.to_path_buf(), map, index: index_start..index_end, entries, lsn_range })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Smallest and largest LSN of the values in the layer.
    pub fn lsn_range(&self) -> (Lsn, Lsn) {
        self.lsn_range
    }

    /// The file's size.
    pub fn size_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Every (key, LSN) in the layer, in index order.
    pub fn entries(&self) -> impl Iterator<Item = (Key, Lsn)> + '_ {
        (0..self.entries).map(|i| {
            let (k, l, ..) = self.entry(i);
            (k, l)
        })
    }

    fn entry(&self, i: usize) -> (Key, Lsn, u64, u32) {
        let e = &self.map[self.index.start + i * ENTRY_LEN..][..ENTRY_LEN];
        let key = Key::decode(e[..KEY_LEN].try_into().expect("key bytes")).unwrap_or_default();
        let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().expect("8 bytes"));
        (key, Lsn(u64_at(KEY_LEN)), u64_at(KEY_LEN + 8), u32::from_le_bytes(e[KEY_LEN + 16..].try_into().expect("4")))
    }

    /// The index position of the first entry not before `(key, lsn)`.
    fn seek(&self, key: Key, lsn: Lsn) -> usize {
        let (mut lo, mut hi) = (0, self.entries);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (k, l, ..) = self.entry(mid);
            if (k, l) < (key, lsn) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Every value of every key in `keys`, in index order, each checked against its CRC.
    pub fn for_each_in_range(&self, keys: Range<Key>, mut f: impl FnMut(Key, Lsn, Value)) -> Result<(), LayerError> {
        for i in self.seek(keys.start, Lsn(0))..self.entries {
            let (k, lsn, off, len) = self.entry(i);
            if k >= keys.end {
                break;
            }
            f(k, lsn, self.blob(k, lsn, off, len)?);
        }
        Ok(())
    }

    /// Every value in (key, LSN) order, each read (and checked against its CRC) when reached.
    pub fn values_in_order(&self) -> impl Iterator<Item = Result<(Key, Lsn, Value), LayerError>> + '_ {
        (0..self.entries).map(|i| {
            let (k, lsn, off, len) = self.entry(i);
            self.blob(k, lsn, off, len).map(|v| (k, lsn, v))
        })
    }

    /// The values of `key` with LSN in `lsns`, oldest first (readers use
    /// [`DeltaLayer::newest_first`], which stops where they stop).
    #[cfg(test)]
    pub fn values(&self, key: Key, lsns: Range<Lsn>) -> Result<Vec<(Lsn, Value)>, LayerError> {
        let mut out: Vec<_> = self
            .newest_first(key, lsns.end)
            .take_while(|v| v.as_ref().map_or(true, |(l, _)| *l >= lsns.start))
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// The values of `key` before `upto`, newest first, each read (and checked against its
    /// CRC) only when the walk gets to it — a reader stops at the first image, however many
    /// older values the key has here (a relation's size key gets one per extension).
    pub fn newest_first(&self, key: Key, upto: Lsn) -> impl Iterator<Item = Result<(Lsn, Value), LayerError>> + '_ {
        let mut i = self.seek(key, upto);
        std::iter::from_fn(move || {
            if i == 0 {
                return None;
            }
            i -= 1;
            let (k, lsn, off, len) = self.entry(i);
            if k != key {
                i = 0;
                return None;
            }
            Some(self.blob(key, lsn, off, len).map(|v| (lsn, v)))
        })
    }

    fn blob(&self, key: Key, lsn: Lsn, off: u64, len: u32) -> Result<Value, LayerError> {
        let corrupt = |what: String| LayerError::Corrupt { path: self.path.clone(), what };
        let start = usize::try_from(off).map_err(|_| corrupt(format!("blob offset {off}")))?;
        let end = start + BLOB_HEADER_LEN + len as usize;
        if end > self.index.start {
            return Err(corrupt(format!("blob of {key} at {lsn} runs past the values")));
        }
        let hdr = &self.map[start..start + BLOB_HEADER_LEN];
        let stored_len = u32::from_le_bytes(hdr[..4].try_into().expect("4 bytes"));
        let stored_crc = u32::from_le_bytes(hdr[4..].try_into().expect("4 bytes"));
        let payload = self.map.slice(start + BLOB_HEADER_LEN..end);
        if stored_len != len || crc32c::crc32c(&payload) != stored_crc {
            return Err(corrupt(format!("checksum mismatch in the value of {key} at {lsn} (offset {off})")));
        }
        Value::decode(payload).map_err(|source| LayerError::Value { path: self.path.clone(), key, lsn, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};

    fn tag(blkno: u32) -> Key {
        let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        Key::rel_block(&BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno })
    }

    fn sample(dir: &Path) -> PathBuf {
        let mut w = DeltaLayerWriter::new(&dir.join("layer")).unwrap();
        // Out of order on purpose.
        for (blk, lsn) in [(2, 300), (1, 200), (1, 100), (2, 100), (1, 300), (3, 50)] {
            let v = if lsn == 100 {
                Value::Image(Bytes::from(vec![blk as u8; 8192]))
            } else {
                Value::WalRecord { will_init: false, raw: Bytes::from(format!("rec {blk}@{lsn}")) }
            };
            w.put(tag(blk), Lsn(lsn), &v).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn values_come_back_by_key_and_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let l = DeltaLayer::open(&sample(dir.path())).unwrap();
        assert_eq!(l.len(), 6);
        assert_eq!(l.lsn_range(), (Lsn(50), Lsn(300)));
        let got = l.values(tag(1), Lsn(0)..Lsn(1000)).unwrap();
        assert_eq!(got.iter().map(|v| v.0 .0).collect::<Vec<_>>(), vec![100, 200, 300]);
        assert!(matches!(&got[0].1, Value::Image(b) if b.len() == 8192 && b[0] == 1));
        let mid = l.values(tag(1), Lsn(150)..Lsn(300)).unwrap();
        assert_eq!(mid.len(), 1);
        assert!(matches!(&mid[0].1, Value::WalRecord { raw, .. } if &raw[..] == b"rec 1@200"));
        assert!(l.values(tag(9), Lsn(0)..Lsn(1000)).unwrap().is_empty());
        assert_eq!(l.values(tag(3), Lsn(0)..Lsn(51)).unwrap().len(), 1);
    }

    #[test]
    fn nothing_is_visible_until_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        {
            let mut w = DeltaLayerWriter::new(&path).unwrap();
            w.put(tag(1), Lsn(1), &Value::Native(Bytes::from_static(b"x"))).unwrap();
            assert!(!path.exists());
        }
        // Dropped unfinished: no file, no temporary left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn every_flipped_byte_is_caught_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            let p = dir.path().join("bad");
            std::fs::write(&p, &bad).unwrap();
            let result = DeltaLayer::open(&p).and_then(|l| {
                let mut all = Vec::new();
                for blk in 1..=3 {
                    all.extend(l.values(tag(blk), Lsn(0)..Lsn(1000))?);
                }
                Ok(all)
            });
            match result {
                Err(e @ (LayerError::Corrupt { .. } | LayerError::Value { .. })) => {
                    assert!(e.to_string().contains("layer file") && e.to_string().contains("bad"), "{e}")
                }
                Err(e) => panic!("byte {at}: unexpected error {e}"),
                Ok(values) => panic!("byte {at} flipped but {} values were served", values.len()),
            }
        }
        // A truncated file too.
        let p = dir.path().join("short");
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(matches!(DeltaLayer::open(&p), Err(LayerError::Corrupt { .. })));
    }
}
