//! Keys of the page store. Every value is about one key: a block of a relation fork, the size
//! of a relation fork, a page of an SLRU (CLOG, multixact offsets or members), or a piece of
//! cluster metadata. Keys sort by kind, then tablespace, database, relation, fork and block, so
//! a relation's blocks are contiguous in a layer's index.
//!
//! ```text
//! encoding (18 bytes, big-endian so byte order is key order):
//!   0  u8  kind       KIND_* below
//!   1  u32 spcnode    (SLRU: which SLRU; metadata: which item)
//!   5  u32 dbnode
//!   9  u32 relnode
//!  13  u8  fork
//!  14  u32 block      (SLRU: page number)
//! ```

use neon_types::{BufferTag, ForkNumber, RelFileNode, RelTag};
use std::fmt;

pub const KEY_LEN: usize = 18;

pub const KIND_REL_BLOCK: u8 = 0x00;
pub const KIND_REL_SIZE: u8 = 0x01;
pub const KIND_SLRU_PAGE: u8 = 0x02;
pub const KIND_META: u8 = 0x03;

/// A page-store key. Field order is sort order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub kind: u8,
    pub field1: u32,
    pub field2: u32,
    pub field3: u32,
    pub field4: u8,
    pub field5: u32,
}

/// Why 18 bytes are not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid page-store key {0:02x?}")]
pub struct KeyError(pub [u8; KEY_LEN]);

impl Key {
    /// A block of a relation fork.
    pub fn rel_block(tag: &BufferTag) -> Key {
        let n = tag.rel.node;
        Key {
            kind: KIND_REL_BLOCK,
            field1: n.spcnode,
            field2: n.dbnode,
            field3: n.relnode,
            field4: tag.rel.fork as u8,
            field5: tag.blkno,
        }
    }

    /// The size (in blocks) of a relation fork.
    pub fn rel_size(rel: &RelTag) -> Key {
        let n = rel.node;
        Key {
            kind: KIND_REL_SIZE,
            field1: n.spcnode,
            field2: n.dbnode,
            field3: n.relnode,
            field4: rel.fork as u8,
            field5: 0,
        }
    }

    /// Page `pageno` of SLRU `slru` (0 CLOG, 1 multixact offsets, 2 multixact members).
    pub fn slru_page(slru: u32, pageno: u32) -> Key {
        Key { kind: KIND_SLRU_PAGE, field1: slru, field5: pageno, ..Key::default() }
    }

    /// Cluster metadata item `item`, optionally per database.
    pub fn meta(item: u32, dbnode: u32) -> Key {
        Key { kind: KIND_META, field1: item, field2: dbnode, ..Key::default() }
    }

    /// The block this key names, if it names one.
    pub fn buffer_tag(&self) -> Option<BufferTag> {
        if self.kind != KIND_REL_BLOCK {
            return None;
        }
        let fork = ForkNumber::try_from(self.field4).ok()?;
        let node = RelFileNode { spcnode: self.field1, dbnode: self.field2, relnode: self.field3 };
        Some(BufferTag { rel: RelTag { node, fork }, blkno: self.field5 })
    }

    pub fn encode(&self) -> [u8; KEY_LEN] {
        let mut b = [0u8; KEY_LEN];
        b[0] = self.kind;
        b[1..5].copy_from_slice(&self.field1.to_be_bytes());
        b[5..9].copy_from_slice(&self.field2.to_be_bytes());
        b[9..13].copy_from_slice(&self.field3.to_be_bytes());
        b[13] = self.field4;
        b[14..18].copy_from_slice(&self.field5.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; KEY_LEN]) -> Result<Key, KeyError> {
        if b[0] > KIND_META {
            return Err(KeyError(*b));
        }
        let u = |o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        Ok(Key { kind: b[0], field1: u(1), field2: u(5), field3: u(9), field4: b[13], field5: u(14) })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(tag) = self.buffer_tag() {
            return write!(f, "{tag}");
        }
        match self.kind {
            KIND_REL_SIZE => write!(f, "size of {}/{}/{} fork {}", self.field1, self.field2, self.field3, self.field4),
            KIND_SLRU_PAGE => write!(f, "SLRU {} page {}", self.field1, self.field5),
            KIND_META => write!(f, "metadata item {} of database {}", self.field1, self.field2),
            _ => write!(f, "key {:02x?}", self.encode()),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_sorts_like_keys() {
        let node = RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 };
        let keys = [
            Key::rel_block(&BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno: 0 }),
            Key::rel_block(&BufferTag { rel: RelTag { node, fork: ForkNumber::Main }, blkno: 1 }),
            Key::rel_block(&BufferTag { rel: RelTag { node, fork: ForkNumber::VisibilityMap }, blkno: 0 }),
            Key::rel_size(&RelTag { node, fork: ForkNumber::Main }),
            Key::slru_page(0, 3),
            Key::meta(1, 5),
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].encode() < w[1].encode());
        }
        for k in keys {
            assert_eq!(Key::decode(&k.encode()).unwrap(), k);
        }
        assert_eq!(keys[0].buffer_tag().unwrap().to_string(), "1663/5/16384 blk 0");
        assert!(Key::decode(&[9; KEY_LEN]).is_err());
    }
}
