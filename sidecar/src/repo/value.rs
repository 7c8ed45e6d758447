//! Values of the page store and their one on-disk encoding.
//!
//! ```text
//!   0  u8  tag    0 image | 1 WAL record | 2 Rust-native record | 3 LZ4-compressed image
//!   image:        the bytes (a page, or a metadata value)
//!   WAL record:   1 u8 flags (bit 0: will_init) | the record's xl_tot_len bytes
//!   native:       the record as encoded by the walredo::native module
//!   LZ4 image:    1 u32 uncompressed length | LZ4 block
//! ```
//!
//! Page images are written LZ4-compressed when that saves space: pages are mostly
//! compressible, and layer files are what ingest has to write to disk.

use bytes::{Bytes, BytesMut};

const TAG_IMAGE: u8 = 0;
const TAG_WAL_RECORD: u8 = 1;
const TAG_NATIVE: u8 = 2;
const TAG_IMAGE_LZ4: u8 = 3;
/// Images at least this large are worth compressing.
const COMPRESS_FROM: usize = 1024;
const FLAG_WILL_INIT: u8 = 1;

/// A value filed under a key at an LSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// The key's full value at this LSN (a page image, a size, a metadata item).
    Image(Bytes),
    /// A WAL record to replay; `will_init` records need no earlier value.
    WalRecord { will_init: bool, raw: Bytes },
    /// A record the sidecar applies in Rust, in its encoded form.
    Native(Bytes),
}

/// Why bytes are not a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("empty value")]
    Empty,
    #[error("unknown value tag {0}")]
    Tag(u8),
    #[error("WAL record value without its flags byte")]
    NoFlags,
    #[error("compressed image: {0}")]
    Lz4(String),
}

impl Value {
    /// Whether this value alone gives the key's value (no earlier values needed).
    pub fn will_init(&self) -> bool {
        match self {
            Value::Image(_) => true,
            Value::WalRecord { will_init, .. } => *will_init,
            Value::Native(_) => false,
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Value::Image(b) if b.len() >= COMPRESS_FROM => {
                let start = out.len();
                out.extend_from_slice(&[TAG_IMAGE_LZ4]);
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                let at = out.len();
                out.resize(at + lz4_flex::block::get_maximum_output_size(b.len()), 0);
                match lz4_flex::block::compress_into(b, &mut out[at..]) {
                    Ok(n) if n < b.len() => out.truncate(at + n),
                    _ => {
                        out.truncate(start);
                        out.extend_from_slice(&[TAG_IMAGE]);
                        out.extend_from_slice(b);
                    }
                }
            }
            Value::Image(b) => {
                out.extend_from_slice(&[TAG_IMAGE]);
                out.extend_from_slice(b);
            }
            Value::WalRecord { will_init, raw } => {
                out.extend_from_slice(&[TAG_WAL_RECORD, if *will_init { FLAG_WILL_INIT } else { 0 }]);
                out.extend_from_slice(raw);
            }
            Value::Native(b) => {
                out.extend_from_slice(&[TAG_NATIVE]);
                out.extend_from_slice(b);
            }
        }
    }

    /// Decodes a value, sharing `b`'s memory.
    pub fn decode(b: Bytes) -> Result<Value, ValueError> {
        let tag = *b.first().ok_or(ValueError::Empty)?;
        match tag {
            TAG_IMAGE => Ok(Value::Image(b.slice(1..))),
            TAG_WAL_RECORD => {
                let flags = *b.get(1).ok_or(ValueError::NoFlags)?;
                Ok(Value::WalRecord { will_init: flags & FLAG_WILL_INIT != 0, raw: b.slice(2..) })
            }
            TAG_NATIVE => Ok(Value::Native(b.slice(1..))),
            TAG_IMAGE_LZ4 => {
                let len = b.get(1..5).ok_or(ValueError::Lz4("no length".into()))?;
                let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                if len > 1 << 20 {
                    return Err(ValueError::Lz4(format!("uncompressed length {len}")));
                }
                let mut page = vec![0u8; len];
                let n =
                    lz4_flex::block::decompress_into(&b[5..], &mut page).map_err(|e| ValueError::Lz4(e.to_string()))?;
                if n != len {
                    return Err(ValueError::Lz4(format!("{n} bytes, expected {len}")));
                }
                Ok(Value::Image(Bytes::from(page)))
            }
            t => Err(ValueError::Tag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let mut noise = vec![0u8; 8192];
        for (i, b) in noise.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2654435761).to_be_bytes()[0];
        }
        for v in [
            Value::Image(Bytes::from(vec![7u8; 8192])),
            Value::Image(Bytes::from(noise)),
            Value::Image(Bytes::from(vec![1u8; 20])),
            Value::WalRecord { will_init: true, raw: Bytes::from_static(b"record") },
            Value::WalRecord { will_init: false, raw: Bytes::new() },
            Value::Native(Bytes::from_static(b"native")),
        ] {
            let mut buf = BytesMut::new();
            v.encode(&mut buf);
            assert_eq!(Value::decode(buf.freeze()).unwrap(), v);
        }
        assert_eq!(Value::decode(Bytes::new()), Err(ValueError::Empty));
        assert_eq!(Value::decode(Bytes::from_static(&[9])), Err(ValueError::Tag(9)));
        assert_eq!(Value::decode(Bytes::from_static(&[1])), Err(ValueError::NoFlags));
        assert!(Value::decode(Bytes::from_static(&[3, 0, 32, 0, 0, 1, 2])).is_err());
        // A compressible page is stored in a fraction of its size.
        let mut buf = BytesMut::new();
        Value::Image(Bytes::from(vec![7u8; 8192])).encode(&mut buf);
        assert!(buf.len() < 200);
    }
}
