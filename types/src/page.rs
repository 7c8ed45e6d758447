//! PostgreSQL's page header (`PageHeaderData`, bufpage.h): the few fields both sides read or
//! set on a raw 8 KB page.
//!
//! ```text
//!   0  pd_lsn      two u32 (xlogid, xrecoff), each in native byte order
//!   8  pd_checksum u16    10 pd_flags u16    12 pd_lower u16    14 pd_upper u16
//!  16  pd_special  u16    18 pd_pagesize_version u16    20 pd_prune_xid u32
//! ```

use crate::Lsn;

/// Bytes of the page header up to the line pointers (`SizeOfPageHeaderData`).
pub const SIZE_OF_PAGE_HEADER: usize = 24;

/// The page's LSN (`PageGetLSN`).
pub fn page_lsn(page: &[u8]) -> Lsn {
    let half = |o: usize| u64::from(u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes")));
    Lsn((half(0) << 32) | half(4))
}

/// Sets the page's LSN (`PageSetLSN`).
pub fn set_page_lsn(page: &mut [u8], lsn: Lsn) {
    page[0..4].copy_from_slice(&((lsn.0 >> 32) as u32).to_le_bytes());
    page[4..8].copy_from_slice(&(lsn.0 as u32).to_le_bytes());
}

/// A page that was never initialised (`PageIsNew`: `pd_upper` is 0).
pub fn page_is_new(page: &[u8]) -> bool {
    page[14] == 0 && page[15] == 0
}

/// A field of the header as `u16` (`pd_lower` at 12, `pd_upper` at 14, ...).
pub fn header_u16(page: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([page[offset], page[offset + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_in_postgres_layout() {
        let mut page = [0u8; crate::BLCKSZ];
        assert!(page_is_new(&page));
        set_page_lsn(&mut page, Lsn(0x1_0000_00AB));
        assert_eq!(&page[0..8], &[1, 0, 0, 0, 0xAB, 0, 0, 0]);
        assert_eq!(page_lsn(&page), Lsn(0x1_0000_00AB));
        page[14] = 0x20;
        assert!(!page_is_new(&page));
        assert_eq!(header_u16(&page, 14), 0x20);
    }
}
