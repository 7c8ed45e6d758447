//! The one format of every object we put in a remote store: the payload (a layer file, a
//! manifest) followed by a trailer that says it is ours and carries the payload's CRC32C, so
//! that a download is checked before anything in it is used. A damaged or truncated object is
//! an error naming the object, never a page.
//!
//! ```text
//! object:  payload | trailer (16 bytes)
//! trailer: magic u64 "NEONOBJ1" | payload length u32 | crc32c(payload) u32
//! all integers little-endian
//! ```

use bytes::{Bytes, BytesMut};

const MAGIC: &[u8; 8] = b"NEONOBJ1";
pub const TRAILER_LEN: usize = 16;

/// Why an object's bytes are not a sealed payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("{len} bytes: shorter than its trailer")]
    Short { len: usize },
    #[error("not one of ours (no NEONOBJ1 trailer)")]
    NoTrailer,
    #[error("{len} bytes of payload, the trailer says {said}")]
    Length { len: usize, said: u32 },
    #[error("CRC32C of the payload is {actual:08x}, the trailer says {said:08x}")]
    Crc { actual: u32, said: u32 },
}

/// `payload` with its trailer: what is uploaded.
pub fn seal(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + TRAILER_LEN);
    out.extend_from_slice(payload);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.freeze()
}

/// The payload of a downloaded object, once its trailer is checked.
pub fn open(object: Bytes) -> Result<Bytes, ObjectError> {
    let len = object.len();
    let Some(body) = len.checked_sub(TRAILER_LEN) else { return Err(ObjectError::Short { len }) };
    let trailer = &object[body..];
    if &trailer[..8] != MAGIC {
        return Err(ObjectError::NoTrailer);
    }
    let said_len = u32::from_le_bytes(trailer[8..12].try_into().expect("4 bytes"));
    if said_len as usize != body {
        return Err(ObjectError::Length { len: body, said: said_len });
    }
    let said = u32::from_le_bytes(trailer[12..16].try_into().expect("4 bytes"));
    let actual = crc32c::crc32c(&object[..body]);
    if actual != said {
        return Err(ObjectError::Crc { actual, said });
    }
    Ok(object.slice(..body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_payloads_open_and_every_flipped_bit_is_caught() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let sealed = seal(&payload);
        assert_eq!(open(sealed.clone()).unwrap(), payload);
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(open(Bytes::from(bad)).is_err(), "bit {bit} flipped went unnoticed");
        }
        assert_eq!(open(sealed.slice(..sealed.len() - 1)), Err(ObjectError::NoTrailer));
        assert_eq!(open(Bytes::from_static(b"short")), Err(ObjectError::Short { len: 5 }));
        assert_eq!(open(seal(b"")).unwrap(), Bytes::new());
    }
}
