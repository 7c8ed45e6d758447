//! Values of the page store and their one on-disk encoding.
//!
//! ```text
//!   0  u8  tag    0 image | 1 WAL record | 2 Rust-native record
//!   image:        the bytes (a page, or a metadata value)
//!   WAL record:   1 u8 flags (bit 0: will_init) | the record's xl_tot_len bytes
//!   native:       the record as encoded by the walredo::native module
//! ```

use bytes::{Bytes, BytesMut};

const TAG_IMAGE: u8 = 0;
const TAG_WAL_RECORD: u8 = 1;
const TAG_NATIVE: u8 = 2;
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
            t => Err(ValueError::Tag(t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        for v in [
            Value::Image(Bytes::from(vec![7u8; 8192])),
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
    }
}
