//! Page masking for comparisons, after PostgreSQL's own `bufmask.c` (used by
//! `wal_consistency_checking` to compare a replayed page with its full-page image): the parts
//! of a page that legitimately differ between two correct copies are overwritten with the
//! same marker on both sides before comparing.
//!
//! Page header layout (`PageHeaderData`): `pd_lsn` 0..8, `pd_checksum` 8..10, `pd_flags`
//! 10..12, `pd_lower` 12..14, `pd_upper` 14..16, `pd_special` 16..18.

use neon_types::BLCKSZ;

/// `MASK_MARKER` in bufmask.h.
pub const MASK_MARKER: u8 = 0;

const SIZE_OF_PAGE_HEADER: usize = 24;

fn u16_at(page: &[u8], off: usize) -> usize {
    u16::from_le_bytes([page[off], page[off + 1]]) as usize
}

/// `mask_page_lsn_and_checksum`: the LSN and checksum depend on when and where a page was
/// written, not on its contents.
pub fn mask_lsn_and_checksum(page: &mut [u8]) {
    page[0..10].fill(MASK_MARKER);
}

/// `mask_unused_space`: the free space between `pd_lower` and `pd_upper`. Full-page images
/// leave it out, and some code (btree builds truncating `pd_lower`) leaves stale bytes in it.
/// Returns false, masking nothing, when the header's bounds are not a valid page's.
pub fn mask_unused_space(page: &mut [u8]) -> bool {
    let (lower, upper, special) = (u16_at(page, 12), u16_at(page, 14), u16_at(page, 16));
    if lower > upper || special < upper || lower < SIZE_OF_PAGE_HEADER || special > BLCKSZ {
        return false;
    }
    page[lower..upper].fill(MASK_MARKER);
    true
}

/// The first byte at which two pages differ, if any.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_hole_and_header_fields() {
        let mut page = vec![0xAAu8; BLCKSZ];
        page[12..14].copy_from_slice(&100u16.to_le_bytes());
        page[14..16].copy_from_slice(&200u16.to_le_bytes());
        page[16..18].copy_from_slice(&(BLCKSZ as u16).to_le_bytes());
        assert!(mask_unused_space(&mut page));
        mask_lsn_and_checksum(&mut page);
        assert!(page[100..200].iter().all(|&b| b == MASK_MARKER));
        assert!(page[0..10].iter().all(|&b| b == MASK_MARKER));
        assert_eq!(page[99], 0xAA);
        assert_eq!(page[200], 0xAA);
        let mut bad = vec![0u8; BLCKSZ];
        assert!(!mask_unused_space(&mut bad));
        assert_eq!(first_difference(&page, &page), None);
    }
}
