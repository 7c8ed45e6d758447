//! The index: the one object that says what the remote store holds — everything a store
//! directory needs besides its layer files, and for every layer file the object holding it.
//! An uploader writes one after the objects it names (so an index never names a missing
//! object); the newest index (by generation, then sequence) is the store. Layer files and
//! commit-time pieces are named by objects that are never overwritten.
//!
//! ```text
//! <prefix>/index/<generation, 8 hex>-<sequence, 16 hex>, sealed (`object`):
//!   magic "NEONIX02" | generation u32 | durable lsn u64 (the followed timeline's) |
//!   identity blob | current blob | timelines u32 | timelines ×
//!     (id u32 | manifest blob | history blob | commit-times.log blob |
//!      pieces u32 | pieces × (offset u64 | length u64 | crc32c u32 | short object) |
//!      files u32 | files × (short layer name | short object | facts: 32 bytes, as
//!                           `LayerFacts::encode_into` writes them))
//! blob: u32 length | bytes; short: u16 length | UTF-8; integers little-endian
//! ```
//!
//! The commit-time chunk file only grows: it is kept as *pieces*, each a range of it uploaded
//! once, which together cover what the log (kept whole) says is sealed.

use crate::repo::layer::{LayerFacts, RemoteStub};
use crate::repo::layer_summary::summary_object;
use neon_types::Lsn;

const MAGIC: &[u8; 8] = b"NEONIX02";
pub const INDEX_DIR: &str = "index";

/// A range of a timeline's commit-time chunk file, as uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
    pub object: String,
}

/// A timeline as the index has it.
#[derive(Debug, Clone, Default)]
pub struct IndexedTimeline {
    pub id: u32,
    pub manifest: Vec<u8>,
    pub history: Vec<u8>,
    pub commit_log: Vec<u8>,
    pub pieces: Vec<Piece>,
    /// Every layer file the manifest names, with its object.
    pub files: Vec<(String, RemoteStub)>,
}

#[derive(Debug, Clone)]
pub struct Index {
    pub generation: u32,
    pub durable: Lsn,
    pub identity: Vec<u8>,
    pub current: Vec<u8>,
    pub timelines: Vec<IndexedTimeline>,
}

/// The object name of index `sequence` of `generation`: names sort as the indexes were made.
pub fn index_name(generation: u32, sequence: u64) -> String {
    format!("{INDEX_DIR}/{generation:08X}-{sequence:016X}")
}

/// The generation an index's name says it is of.
pub fn generation_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(INDEX_DIR)?.strip_prefix('/')?;
    u32::from_str_radix(rest.split('-').next()?, 16).ok()
}

impl Index {
    /// Every object the index names.
    /// Every object the index names: layer files with their summaries, commit-time pieces.
    pub fn objects(&self) -> impl Iterator<Item = String> + '_ {
        self.timelines.iter().flat_map(|t| {
            let layers = t.files.iter().flat_map(|(_, s)| [s.object.clone(), summary_object(&s.object)]);
            layers.chain(t.pieces.iter().map(|p| p.object.clone()))
        })
    }

    pub fn timeline(&self, id: u32) -> Option<&IndexedTimeline> {
        self.timelines.iter().find(|t| t.id == id)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let blob = |b: &mut Vec<u8>, bytes: &[u8]| {
            b.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            b.extend_from_slice(bytes);
        };
        let short = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u16).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.durable.0.to_le_bytes());
        blob(&mut b, &self.identity);
        blob(&mut b, &self.current);
        b.extend_from_slice(&(self.timelines.len() as u32).to_le_bytes());
        for t in &self.timelines {
            b.extend_from_slice(&t.id.to_le_bytes());
            blob(&mut b, &t.manifest);
            blob(&mut b, &t.history);
            blob(&mut b, &t.commit_log);
            b.extend_from_slice(&(t.pieces.len() as u32).to_le_bytes());
            for p in &t.pieces {
                b.extend_from_slice(&p.offset.to_le_bytes());
                b.extend_from_slice(&p.len.to_le_bytes());
                b.extend_from_slice(&p.crc.to_le_bytes());
                short(&mut b, &p.object);
            }
            b.extend_from_slice(&(t.files.len() as u32).to_le_bytes());
            for (name, stub) in &t.files {
                short(&mut b, name);
                short(&mut b, &stub.object);
                stub.facts.encode_into(&mut b);
            }
        }
        b
    }

    /// Decodes an index; the error says what is wrong with it.
    pub fn decode(b: &[u8]) -> Result<Index, String> {
        let mut r = Reader(b);
        if r.take(8)? != MAGIC {
            return Err("not an index of this version".into());
        }
        let generation = r.u32()?;
        let durable = Lsn(r.u64()?);
        let identity = r.blob()?;
        let current = r.blob()?;
        let mut timelines = Vec::new();
        for _ in 0..r.u32()? {
            let mut t = IndexedTimeline {
                id: r.u32()?,
                manifest: r.blob()?,
                history: r.blob()?,
                commit_log: r.blob()?,
                ..Default::default()
            };
            for _ in 0..r.u32()? {
                t.pieces.push(Piece { offset: r.u64()?, len: r.u64()?, crc: r.u32()?, object: r.short()? });
            }
            for _ in 0..r.u32()? {
                let name = r.short()?;
                let object = r.short()?;
                let facts = LayerFacts::decode(r.take(LayerFacts::ENCODED_LEN)?.try_into().expect("32 bytes"));
                t.files.push((name, RemoteStub { object, facts }));
            }
            timelines.push(t);
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after its end", r.0.len()));
        }
        Ok(Index { generation, durable, identity, current, timelines })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".into());
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn blob(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn short(&mut self) -> Result<String, String> {
        let n = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a name is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_reads_back_as_written_and_a_cut_one_is_refused() {
        let stub = RemoteStub {
            object: "timelines/00000001/delta-1-2.g00000001.1".into(),
            facts: LayerFacts { size: 100, entries: 3, lsn_range: (Lsn(1), Lsn(2)), footer_crc: 7 },
        };
        let index = Index {
            generation: 3,
            durable: Lsn(0x1_0000_0028),
            identity: b"id".to_vec(),
            current: b"cur".to_vec(),
            timelines: vec![IndexedTimeline {
                id: 1,
                manifest: b"m".to_vec(),
                history: vec![],
                commit_log: b"log".to_vec(),
                pieces: vec![Piece { offset: 0, len: 10, crc: 9, object: "p".into() }],
                files: vec![("delta-1-2".into(), stub.clone())],
            }],
        };
        let b = index.encode();
        let back = Index::decode(&b).unwrap();
        assert_eq!(back.encode(), b);
        assert_eq!(back.timeline(1).unwrap().files[0].1, stub);
        assert_eq!(back.objects().count(), 3, "the layer file, its summary, the piece");
        assert!(Index::decode(&b[..b.len() - 1]).is_err());
        assert_eq!(generation_of(&index_name(0x1A, 5)), Some(0x1A));
    }
}
