//! `Lsn`: a position in the WAL, with PostgreSQL's `X/Y` text form (`pg_lsn`).

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;

/// A WAL position (`XLogRecPtr`). Ordered, printed and parsed as PostgreSQL prints `pg_lsn`:
/// high and low 32-bit halves in upper-case hex separated by `/`.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal numbers of at most 8 digits separated by '/', like 0/16B3748")]
pub struct LsnParseError {
    pub input: String,
}

impl Lsn {
    /// `InvalidXLogRecPtr`.
    pub const INVALID: Lsn = Lsn(0);

    pub const fn is_valid(self) -> bool {
        self.0 != 0
    }

    /// Offset within a WAL segment of the given size (a power of two).
    pub const fn segment_offset(self, seg_size: u32) -> u32 {
        (self.0 % seg_size as u64) as u32
    }

    /// The segment number (`XLByteToSeg`).
    pub const fn segment_number(self, seg_size: u32) -> u64 {
        self.0 / seg_size as u64
    }

    /// Offset within an 8 KiB WAL page.
    pub const fn page_offset(self) -> u32 {
        (self.0 % crate::XLOG_BLCKSZ as u64) as u32
    }

    /// The start of the WAL page holding this position.
    pub const fn page_start(self) -> Lsn {
        Lsn(self.0 - self.0 % crate::XLOG_BLCKSZ as u64)
    }

    /// Round up to the next multiple of 8 (`MAXALIGN` on 64-bit builds).
    pub const fn align(self) -> Lsn {
        Lsn((self.0 + 7) & !7)
    }

    pub const fn checked_sub(self, other: Lsn) -> Option<u64> {
        self.0.checked_sub(other.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError { input: s.to_string() };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(part, 16).map_err(|_| err())
        };
        Ok(Lsn(((half(hi)? as u64) << 32) | half(lo)? as u64))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, rhs: u64) -> Lsn {
        Lsn(self.0 + rhs)
    }
}

impl Sub<Lsn> for Lsn {
    type Output = u64;
    fn sub(self, rhs: Lsn) -> u64 {
        self.0 - rhs.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips() {
        for (text, v) in [("0/0", 0u64), ("0/16B3748", 0x16B3748), ("1/0", 1 << 32), ("FFFFFFFF/FFFFFFFF", u64::MAX)] {
            let l: Lsn = text.parse().unwrap();
            assert_eq!(l.0, v);
            assert_eq!(l.to_string(), text);
        }
        // PostgreSQL accepts lower case on input and prints upper case.
        assert_eq!("0/16b3748".parse::<Lsn>().unwrap(), Lsn(0x16B3748));
    }

    #[test]
    fn malformed_text_is_rejected() {
        for bad in ["", "/", "0/", "/0", "0", "0/0/0", "G/0", "123456789/0", " 0/1", "0/1 ", "-1/0", "+1/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn positions() {
        let l = Lsn(0x0100_2028);
        assert_eq!(l.segment_number(16 << 20), 1);
        assert_eq!(l.segment_offset(16 << 20), 0x2028);
        assert_eq!(l.page_offset(), 0x28);
        assert_eq!(l.page_start(), Lsn(0x0100_2000));
        assert_eq!(Lsn(0x29).align(), Lsn(0x30));
    }
}
