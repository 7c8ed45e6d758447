//! Which SLRU pages a truncation removes. PostgreSQL removes whole segment files (32 pages)
//! when CLOG or multixact history is truncated (`SimpleLruTruncate`,
//! `PerformMembersTruncation`); the store marks each page of those segments gone, so a base
//! backup at a later LSN does not ship them. Page numbers compare in the SLRU's circular id
//! space, as the SLRUs' `PagePrecedes` callbacks do.

use crate::walredo::native::{
    CLOG_XACTS_PER_PAGE, FIRST_MULTIXACT_ID, MULTIXACT_MEMBERS_PER_PAGE, MULTIXACT_OFFSETS_PER_PAGE,
    SLRU_PAGES_PER_SEGMENT,
};

const FIRST_NORMAL_TRANSACTION_ID: u32 = 3;

fn id_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `CLOGPagePrecedes` / `MultiXactOffsetPagePrecedes`: ids on the pages, circularly.
fn page_precedes(per_page: u32, first: u32, p1: u32, p2: u32) -> bool {
    let id1 = p1.wrapping_mul(per_page).wrapping_add(first + 1);
    let id2 = p2.wrapping_mul(per_page).wrapping_add(first + 1);
    id_precedes(id1, id2) && id_precedes(id1, id2.wrapping_add(per_page - 1))
}

/// `SimpleLruTruncate(ctl, cutoff_page)`: a page goes when its whole segment precedes the
/// cutoff's segment.
fn truncated_by_cutoff(per_page: u32, first: u32, cutoff_page: u32, page: u32) -> bool {
    let cutoff = cutoff_page - cutoff_page % SLRU_PAGES_PER_SEGMENT;
    let seg_first = page - page % SLRU_PAGES_PER_SEGMENT;
    let seg_last = seg_first + SLRU_PAGES_PER_SEGMENT - 1;
    page_precedes(per_page, first, seg_first, cutoff) && page_precedes(per_page, first, seg_last, cutoff)
}

/// CLOG_TRUNCATE with `xl_clog_truncate.pageno` = `cutoff_page`.
pub fn clog_truncates(cutoff_page: u32, page: u32) -> bool {
    truncated_by_cutoff(CLOG_XACTS_PER_PAGE, FIRST_NORMAL_TRANSACTION_ID, cutoff_page, page)
}

/// MULTIXACT_TRUNCATE_ID's offsets half: `SimpleLruTruncate` at the page of the multixact
/// before the new oldest one.
pub fn offsets_truncates(new_oldest_multi: u32, page: u32) -> bool {
    let mut prev = new_oldest_multi.wrapping_sub(1);
    if prev < FIRST_MULTIXACT_ID {
        prev = u32::MAX;
    }
    truncated_by_cutoff(MULTIXACT_OFFSETS_PER_PAGE, FIRST_MULTIXACT_ID, prev / MULTIXACT_OFFSETS_PER_PAGE, page)
}

/// MULTIXACT_TRUNCATE_ID's members half: segments from the one holding `start` up to (not
/// including) the one holding `end`, wrapping after the last segment.
pub fn members_truncates(start: u32, end: u32, page: u32) -> bool {
    let seg = |off: u32| off / MULTIXACT_MEMBERS_PER_PAGE / SLRU_PAGES_PER_SEGMENT;
    let max_seg = seg(u32::MAX);
    let (first, last, this) = (seg(start), seg(end), page / SLRU_PAGES_PER_SEGMENT);
    if first <= last {
        (first..last).contains(&this)
    } else {
        (this >= first && this <= max_seg) || this < last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_segments_before_the_cutoff_go() {
        // Cutoff in segment 2 (pages 64..96): segments 0 and 1 go, 2 stays.
        assert!(clog_truncates(70, 0) && clog_truncates(70, 63));
        assert!(!clog_truncates(70, 64) && !clog_truncates(70, 69) && !clog_truncates(70, 95));
        assert!(!clog_truncates(0, 0));
        // Multixact 1 is the oldest: nothing goes; oldest 2048*40: pages of segment 0 go.
        assert!(!offsets_truncates(1, 0));
        assert!(offsets_truncates(2048 * 40, 5) && !offsets_truncates(2048 * 40, 32));
        let per_seg = MULTIXACT_MEMBERS_PER_PAGE * SLRU_PAGES_PER_SEGMENT;
        assert!(members_truncates(0, per_seg * 2, 0) && members_truncates(0, per_seg * 2, 63));
        assert!(!members_truncates(0, per_seg * 2, 64));
    }
}
