//! PostgreSQL's data page checksum (`pg_checksum_page`, storage/checksum_impl.h): FNV-1a
//! style mixing over the page as 32 interleaved streams of u32, with `pd_checksum` taken as
//! zero, folded with the block number into 1..=65535. Base backups of a compute that has
//! `data_checksums` on stamp every page they ship with it (pages rebuilt by redo carry
//! whatever the scratch cluster left there).

use neon_types::BLCKSZ;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16777619;
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C, 0xF8D4474F,
    0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC,
    0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6,
    0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// `pd_checksum`'s place in the page header.
const PD_CHECKSUM: std::ops::Range<usize> = 8..10;

fn comp(sum: &mut u32, value: u32) {
    let tmp = *sum ^ value;
    *sum = tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17);
}

/// `pg_checksum_page(page, blkno)`.
pub fn page_checksum(page: &[u8; BLCKSZ], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    for row in 0..BLCKSZ / (4 * N_SUMS) {
        for (j, sum) in sums.iter_mut().enumerate() {
            let at = (row * N_SUMS + j) * 4;
            let mut word = u32::from_le_bytes(page[at..at + 4].try_into().expect("4 bytes"));
            if at == 8 {
                // pd_checksum (bytes 8..10) counts as zero; pd_flags (10..12) as it is.
                word &= 0xFFFF_0000;
            }
            comp(sum, word);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            comp(sum, 0);
        }
    }
    let checksum = sums.iter().fold(0u32, |a, s| a ^ s) ^ blkno;
    ((checksum % 65535) + 1) as u16
}

/// Stamps the page's checksum, unless the page is new (all zero), which PostgreSQL accepts
/// without one.
pub fn stamp(page: &mut [u8; BLCKSZ], blkno: u32) {
    let upper = u16::from_le_bytes([page[14], page[15]]);
    if upper == 0 && page.iter().all(|b| *b == 0) {
        return;
    }
    let sum = page_checksum(page, blkno);
    page[PD_CHECKSUM].copy_from_slice(&sum.to_le_bytes());
}
