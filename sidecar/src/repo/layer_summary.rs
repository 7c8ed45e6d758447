//! What a read needs to find one key's values in a layer file that is not on local disk,
//! without fetching the file: a Bloom filter of the keys it holds (most layers hold nothing
//! of a given page: they are skipped at the cost of a few bits), and a table of the index's
//! blocks — the first (key, LSN) and the CRC32C of every [`BLOCK_ENTRIES`] index entries —
//! so that a read fetches the one or two blocks of the index its key lies in, checks them,
//! and then only the blobs it needs (each checked by its own CRC32C, `layer`).
//!
//! Built from the file when it is uploaded (`remote::upload`) and kept beside its object as
//! `<object>.keys`; a layer file whose object has none is fetched whole, as before.
//!
//! ```text
//! summary: "NEONLS01" | facts (LayerFacts::encode_into, 32 bytes) | block entries u32 |
//!          bloom hashes u32 | bloom words u32 | bloom (words × u64) |
//!          blocks u32 | per block: first key [18] | first lsn u64 | crc32c u32 (of its index bytes) |
//!          crc32c u32 (of all before it)
//! all integers little-endian; keys in their own encoding (`key`).
//! bloom: bit (h1 + i·h2) mod (64·words) for i < hashes, set for every distinct key, where
//!        h1 = FNV-1a 64 of the key's encoding and h2 = splitmix64(h1) | 1.
//! ```

use super::key::{Key, KEY_LEN};
use super::layer::{checked_index, decode_entry, index_span, LayerError, LayerFacts, ENTRY_LEN};
use neon_types::Lsn;
use std::ops::Range;
use std::path::Path;

const MAGIC: &[u8; 8] = b"NEONLS01";
/// Index entries per block: a block is 4.75 KB of the index, a fetch of its own.
pub const BLOCK_ENTRIES: usize = 128;
/// Bloom bits per distinct key and hashes: about 1% false positives.
const BITS_PER_KEY: usize = 10;
const HASHES: u32 = 7;
const BLOCK_LEN: usize = KEY_LEN + 8 + 4;
/// What the summary of a layer object is called: `<object><SUMMARY_SUFFIX>`.
pub const SUMMARY_SUFFIX: &str = ".keys";

/// The summary object of the layer object `object`.
pub fn summary_object(object: &str) -> String {
    format!("{object}{SUMMARY_SUFFIX}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSummary {
    /// The file it summarises.
    pub facts: LayerFacts,
    bloom: Vec<u64>,
    hashes: u32,
    /// Per block of the index: its first (key, LSN) and the CRC32C of its bytes.
    blocks: Vec<(Key, Lsn, u32)>,
}

fn hashes_of(key: Key) -> (u64, u64) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.encode() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (h, (z ^ (z >> 31)) | 1)
}

impl LayerSummary {
    /// The summary of a whole layer file (its footer and index checked).
    pub fn build(path: &Path, bytes: &[u8]) -> Result<LayerSummary, LayerError> {
        let (facts, index) = checked_index(path, bytes)?;
        let index = &bytes[index];
        let mut distinct = 0usize;
        let mut last = None;
        for e in index.chunks_exact(ENTRY_LEN) {
            let key = decode_entry(e).0;
            if last != Some(key) {
                distinct += 1;
                last = Some(key);
            }
        }
        let words = (distinct * BITS_PER_KEY).div_ceil(64).max(1);
        let mut s = LayerSummary { facts, bloom: vec![0; words], hashes: HASHES, blocks: Vec::new() };
        let mut last = None;
        for e in index.chunks_exact(ENTRY_LEN) {
            let key = decode_entry(e).0;
            if last != Some(key) {
                s.bloom_positions(key).for_each(|bit| s.bloom[bit / 64] |= 1 << (bit % 64));
                last = Some(key);
            }
        }
        for block in index.chunks(BLOCK_ENTRIES * ENTRY_LEN) {
            let (key, lsn, ..) = decode_entry(block);
            s.blocks.push((key, lsn, crc32c::crc32c(block)));
        }
        Ok(s)
    }

    fn bloom_positions(&self, key: Key) -> impl Iterator<Item = usize> {
        let (h1, h2) = hashes_of(key);
        let bits = self.bloom.len() as u64 * 64;
        (0..self.hashes as u64).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % bits) as usize)
    }

    /// False if the file surely holds no value of `key`.
    pub fn might_contain(&self, key: Key) -> bool {
        self.bloom_positions(key).all(|bit| self.bloom[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// The blocks of the index that may hold entries of `key` before `upto` (the entries
    /// are sorted by key, then LSN).
    pub fn blocks_for(&self, key: Key, upto: Lsn) -> Range<usize> {
        let first = self.blocks.partition_point(|&(k, l, _)| (k, l) < (key, Lsn(0))).saturating_sub(1);
        let end = self.blocks.partition_point(|&(k, l, _)| (k, l) < (key, upto));
        first..end.max(first)
    }

    /// Where the index bytes of `blocks` lie in the file.
    pub fn block_bytes(&self, blocks: Range<usize>) -> Range<u64> {
        let index = index_span(&self.facts);
        let at = |b: usize| (index.start + (b * BLOCK_ENTRIES * ENTRY_LEN) as u64).min(index.end);
        at(blocks.start)..at(blocks.end)
    }

    /// The entries of `key` before `upto` in `bytes` (the index bytes of `blocks`, as
    /// [`LayerSummary::block_bytes`] placed them), newest first: (LSN, blob offset, blob
    /// length). Every block is checked against its CRC32C and its first entry; the error
    /// says which is not.
    pub fn entries_of(
        &self,
        blocks: Range<usize>,
        bytes: &[u8],
        key: Key,
        upto: Lsn,
    ) -> Result<Vec<(Lsn, u64, u32)>, String> {
        let expected = self.block_bytes(blocks.clone());
        if bytes.len() as u64 != expected.end - expected.start {
            return Err(format!(
                "{} bytes of index blocks {blocks:?}, expected {}",
                bytes.len(),
                expected.end - expected.start
            ));
        }
        let values_end = index_span(&self.facts).start;
        let mut out = Vec::new();
        for (b, block) in blocks.clone().zip(bytes.chunks(BLOCK_ENTRIES * ENTRY_LEN)) {
            let (k, l, crc) = self.blocks[b];
            if crc32c::crc32c(block) != crc {
                return Err(format!("index block {b} fails its CRC32C"));
            }
            if (decode_entry(block).0, decode_entry(block).1) != (k, l) {
                return Err(format!("index block {b} does not begin where the summary says"));
            }
            for e in block.chunks_exact(ENTRY_LEN) {
                let (k, lsn, off, len) = decode_entry(e);
                if k == key && lsn < upto {
                    if super::layer::blob_span(off, len).end > values_end {
                        return Err(format!("the blob of {key} at {lsn} runs past the values"));
                    }
                    out.push((lsn, off, len));
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.bloom.len() * 8 + self.blocks.len() * BLOCK_LEN);
        b.extend_from_slice(MAGIC);
        self.facts.encode_into(&mut b);
        b.extend_from_slice(&(BLOCK_ENTRIES as u32).to_le_bytes());
        b.extend_from_slice(&self.hashes.to_le_bytes());
        b.extend_from_slice(&(self.bloom.len() as u32).to_le_bytes());
        for w in &self.bloom {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for (k, l, crc) in &self.blocks {
            b.extend_from_slice(&k.encode());
            b.extend_from_slice(&l.0.to_le_bytes());
            b.extend_from_slice(&crc.to_le_bytes());
        }
        b.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
        b
    }

    /// A summary as [`LayerSummary::encode`] wrote it; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<LayerSummary, String> {
        let Some((body, crc)) = b.split_last_chunk::<4>() else { return Err("shorter than its checksum".into()) };
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("summary checksum mismatch".into());
        }
        let mut at = 0;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let s = body.get(at..at + n).ok_or("cut short")?;
            at += n;
            Ok(s)
        };
        if take(8)? != MAGIC {
            return Err("not a layer summary".into());
        }
        let facts = LayerFacts::decode(take(LayerFacts::ENCODED_LEN)?.try_into().expect("32 bytes"));
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().expect("4 bytes"));
        if u32_of(take(4)?) as usize != BLOCK_ENTRIES {
            return Err("blocks of another size".into());
        }
        let hashes = u32_of(take(4)?);
        let words = u32_of(take(4)?) as usize;
        if words == 0 || hashes == 0 || hashes > 32 {
            return Err(format!("a Bloom filter of {words} words and {hashes} hashes"));
        }
        let bloom = take(words * 8)?.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().expect("8"))).collect();
        let nblocks = u32_of(take(4)?) as usize;
        if nblocks != (facts.entries as usize).div_ceil(BLOCK_ENTRIES) {
            return Err(format!("{nblocks} index blocks for {} entries", facts.entries));
        }
        let mut blocks = Vec::with_capacity(nblocks);
        for block in take(nblocks * BLOCK_LEN)?.chunks_exact(BLOCK_LEN) {
            let key = Key::decode(block[..KEY_LEN].try_into().expect("key")).map_err(|e| e.to_string())?;
            let lsn = Lsn(u64::from_le_bytes(block[KEY_LEN..KEY_LEN + 8].try_into().expect("8")));
            blocks.push((key, lsn, u32_of(&block[KEY_LEN + 8..])));
        }
        if take(1).is_ok() {
            return Err("bytes after the blocks".into());
        }
        Ok(LayerSummary { facts, bloom, hashes, blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::layer::{decode_blob, DeltaLayerWriter};
    use crate::repo::value::Value;
    use bytes::Bytes;
    use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};

    fn tag(blkno: u32) -> Key {
        let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        Key::rel_block(&BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno })
    }

    /// Blocks 0..500 with 1..=3 values each (block b has b % 3 + 1), at LSNs 10, 20, 30.
    fn file(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut w = DeltaLayerWriter::new(&dir.join("layer")).unwrap();
        for b in 0..500u32 {
            for n in 0..=(b % 3) as u64 {
                let v = Value::WalRecord { will_init: n == 0, raw: Bytes::from(format!("{b}@{n}")) };
                w.put(tag(b), Lsn(10 + 10 * n), &v).unwrap();
            }
        }
        let path = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    #[test]
    fn a_key_is_found_from_its_blocks_alone_and_absent_keys_are_mostly_ruled_out() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes) = file(dir.path());
        let s = LayerSummary::build(&path, &bytes).unwrap();
        assert_eq!(LayerSummary::decode(&s.encode()).unwrap(), s);
        let slice = |r: Range<u64>| &bytes[r.start as usize..r.end as usize];
        for b in 0..500u32 {
            assert!(s.might_contain(tag(b)), "block {b} is in the file");
            for upto in [Lsn(15), Lsn(25), Lsn(100)] {
                let blocks = s.blocks_for(tag(b), upto);
                let found = s.entries_of(blocks.clone(), slice(s.block_bytes(blocks)), tag(b), upto).unwrap();
                let expect: Vec<Lsn> =
                    (0..=(b % 3) as u64).rev().map(|n| Lsn(10 + 10 * n)).filter(|l| *l < upto).collect();
                assert_eq!(found.iter().map(|e| e.0).collect::<Vec<_>>(), expect, "block {b} before {upto}");
                for (lsn, off, len) in found {
                    let blob = Bytes::copy_from_slice(slice(crate::repo::layer::blob_span(off, len)));
                    let v = decode_blob(&path, tag(b), lsn, off, len, blob).unwrap();
                    assert!(matches!(v, Value::WalRecord { raw, .. } if raw == format!("{b}@{}", (lsn.0 - 10) / 10)));
                }
            }
        }
        let false_positives = (1000..11000).filter(|&b| s.might_contain(tag(b))).count();
        assert!(false_positives < 300, "{false_positives} of 10000 absent keys pass the filter");
        // A damaged block is named; a damaged summary is refused.
        let blocks = s.blocks_for(tag(250), Lsn(100));
        let mut bad = slice(s.block_bytes(blocks.clone())).to_vec();
        bad[3] ^= 1;
        let e = s.entries_of(blocks.clone(), &bad, tag(250), Lsn(100)).unwrap_err();
        assert!(e.contains(&format!("index block {} fails", blocks.start)), "{e}");
        let good = s.encode();
        for i in (0..good.len()).step_by(7) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(LayerSummary::decode(&bad).is_err(), "a flip at byte {i} went unnoticed");
        }
    }
}
