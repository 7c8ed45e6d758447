//! Turning a full-page image from a WAL block reference back into an 8192-byte page, as
//! PostgreSQL 15's `RestoreBlockImage` (src/backend/access/transam/xlogreader.c) does.
//!
//! `record` parses the block header and hands us the image bytes with `bimg_info`,
//! `hole_offset` and `hole_length`. An image is the page with its "hole" (the free space
//! between `pd_lower` and `pd_upper`) cut out, optionally compressed with pglz, LZ4 (raw block
//! format) or zstd (frame format) according to `wal_compression`. For uncompressed images the
//! hole length is not stored; PostgreSQL derives it as `BLCKSZ - bimg_len` and so must the
//! caller.
//!
//! This is on the decoder's hot path, so nothing here allocates per call: compressed images
//! are decompressed straight into the output page and the tail is then shifted up to open the
//! hole, and the zstd decompression context is kept per thread.
//!
//! We are stricter than `RestoreBlockImage` in one respect: PostgreSQL only checks that LZ4
//! and zstd decompression did not fail, not that they produced the full `BLCKSZ - hole_length`
//! bytes (a short result would leave part of its scratch page uninitialised). We require the
//! exact size, since anything else cannot be a page PostgreSQL wrote.

use std::cell::RefCell;

use neon_types::BLCKSZ;
use thiserror::Error;

use super::consts::{
    BKPIMAGE_COMPRESSED, BKPIMAGE_COMPRESS_LZ4, BKPIMAGE_COMPRESS_PGLZ, BKPIMAGE_COMPRESS_ZSTD, BKPIMAGE_HAS_HOLE,
};
use super::pglz::{self, PglzError};

/// How a full-page image is compressed, from the compression bits of `bimg_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageCompression {
    None,
    Pglz,
    Lz4,
    Zstd,
}

impl ImageCompression {
    /// The method named by `bimg_info`. Bits outside the compression bits (hole, apply, and
    /// the unused high bits, which PostgreSQL also ignores) do not matter here.
    pub fn from_bimg_info(bimg_info: u8) -> Result<Self, ImageError> {
        match bimg_info & BKPIMAGE_COMPRESSED {
            0 => Ok(ImageCompression::None),
            BKPIMAGE_COMPRESS_PGLZ => Ok(ImageCompression::Pglz),
            BKPIMAGE_COMPRESS_LZ4 => Ok(ImageCompression::Lz4),
            BKPIMAGE_COMPRESS_ZSTD => Ok(ImageCompression::Zstd),
            // PostgreSQL would silently pick the first of pglz, lz4, zstd; no writer sets two,
            // so two bits means the header is damaged.
            _ => Err(ImageError::SeveralCompressionMethods { bimg_info }),
        }
    }

    /// The method's name as `wal_compression` and `pg_waldump` spell it ("none" when
    /// uncompressed).
    pub fn name(self) -> &'static str {
        match self {
            ImageCompression::None => "none",
            ImageCompression::Pglz => "pglz",
            ImageCompression::Lz4 => "lz4",
            ImageCompression::Zstd => "zstd",
        }
    }
}

/// Why a full-page image could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ImageError {
    #[error("full-page image has several compression methods set in bimg_info {bimg_info:#04x}")]
    SeveralCompressionMethods { bimg_info: u8 },
    #[error(
        "BKPIMAGE_HAS_HOLE set, but hole offset {hole_offset} length {hole_length} \
         (both must be non-zero)"
    )]
    EmptyHole { hole_offset: u16, hole_length: u16 },
    #[error("BKPIMAGE_HAS_HOLE not set, but hole offset {hole_offset} length {hole_length}")]
    UnexpectedHole { hole_offset: u16, hole_length: u16 },
    #[error(
        "hole at offset {hole_offset} with length {hole_length} does not fit in a \
         {BLCKSZ}-byte page"
    )]
    HoleOutsidePage { hole_offset: u16, hole_length: u16 },
    #[error(
        "uncompressed full-page image is {actual} bytes, expected {expected} \
         ({BLCKSZ} minus a hole of {hole_length})"
    )]
    WrongImageLength { actual: usize, expected: usize, hole_length: u16 },
    #[error("{method} full-page image decompressed to {actual} bytes, expected {expected}")]
    WrongDecompressedSize { method: &'static str, actual: usize, expected: usize },
    #[error("could not decompress pglz full-page image: {0}")]
    Pglz(#[from] PglzError),
    #[error("could not decompress lz4 full-page image: {0}")]
    Lz4(String),
    #[error("could not decompress zstd full-page image: {0}")]
    Zstd(String),
}

/// Restore the page that `image` (the block reference's `bkp_image` bytes) encodes into `out`.
///
/// `hole_length` is the stored one for compressed images and `BLCKSZ - image.len()` for
/// uncompressed images with a hole (as in `DecodeXLogRecord`); without `BKPIMAGE_HAS_HOLE`
/// both hole fields must be 0. On error, the contents of `out` are unspecified.
pub fn restore_page(
    image: &[u8],
    bimg_info: u8,
    hole_offset: u16,
    hole_length: u16,
    out: &mut [u8; BLCKSZ],
) -> Result<(), ImageError> {
    let compression = ImageCompression::from_bimg_info(bimg_info)?;
    let has_hole = bimg_info & BKPIMAGE_HAS_HOLE != 0;
    // The same cross-checks DecodeXLogRecord makes, so a caller that skipped them cannot make
    // us produce a page PostgreSQL would have refused.
    if has_hole && (hole_offset == 0 || hole_length == 0) {
        return Err(ImageError::EmptyHole { hole_offset, hole_length });
    }
    if !has_hole && (hole_offset != 0 || hole_length != 0) {
        return Err(ImageError::UnexpectedHole { hole_offset, hole_length });
    }
    let hole_start = usize::from(hole_offset);
    let hole_len = usize::from(hole_length);
    if hole_start + hole_len > BLCKSZ {
        return Err(ImageError::HoleOutsidePage { hole_offset, hole_length });
    }
    // Bytes of page the image carries; >= 1 because a hole needs a non-zero offset.
    let data_len = BLCKSZ - hole_len;

    // Compressed images are decompressed into the front of the page, then the hole is opened
    // by moving the part after it up (an overlapping move, hence copy_within) and zeroing the
    // gap. This avoids a scratch page and a second full copy.
    let produced = match compression {
        ImageCompression::None => {
            return restore_uncompressed(image, hole_start, hole_length, out);
        }
        ImageCompression::Pglz => {
            pglz::decompress(image, &mut out[..data_len])?;
            data_len
        }
        ImageCompression::Lz4 => {
            lz4_flex::block::decompress_into(image, &mut out[..data_len]).map_err(|e| ImageError::Lz4(e.to_string()))?
        }
        ImageCompression::Zstd => zstd_decompress(image, &mut out[..data_len])?,
    };
    if produced != data_len {
        return Err(ImageError::WrongDecompressedSize {
            method: compression.name(),
            actual: produced,
            expected: data_len,
        });
    }
    if hole_len > 0 {
        out.copy_within(hole_start..data_len, hole_start + hole_len);
        out[hole_start..hole_start + hole_len].fill(0);
    }
    Ok(())
}

/// The uncompressed case: the image is the page minus the hole, byte for byte. The caller has
/// checked that the hole lies within the page.
fn restore_uncompressed(
    image: &[u8],
    hole_start: usize,
    hole_length: u16,
    out: &mut [u8; BLCKSZ],
) -> Result<(), ImageError> {
    let hole_len = usize::from(hole_length);
    let expected = BLCKSZ - hole_len;
    if image.len() != expected {
        return Err(ImageError::WrongImageLength { actual: image.len(), expected, hole_length });
    }
    let (before, after) = image.split_at(hole_start);
    out[..hole_start].copy_from_slice(before);
    out[hole_start..hole_start + hole_len].fill(0);
    out[hole_start + hole_len..].copy_from_slice(after);
    Ok(())
}

thread_local! {
    /// A zstd decompression context costs a sizeable allocation to create; the decoder
    /// restores images by the million, so each thread keeps one.
    static ZSTD_DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Decompress a zstd frame (or concatenated frames, as `ZSTD_decompress` accepts) into `dst`,
/// returning the number of bytes produced. A frame that would produce more than `dst.len()`
/// is an error from zstd itself.
fn zstd_decompress(src: &[u8], dst: &mut [u8]) -> Result<usize, ImageError> {
    let zstd_err = |e: std::io::Error| ImageError::Zstd(e.to_string());
    ZSTD_DCTX.with(|cell| {
        // A nested call on the same thread cannot happen today, but if it ever did, a fresh
        // context is correct, just slower, where a RefCell borrow panic would not be.
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(src, dst))
                .map_err(zstd_err);
        };
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(zstd_err)?);
        }
        match slot.as_mut() {
            Some(dctx) => dctx.decompress_to_buffer(src, dst).map_err(zstd_err),
            None => Err(ImageError::Zstd("no decompression context".to_string())),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::consts::BKPIMAGE_APPLY;
    use proptest::prelude::*;

    /// A plausible heap page: header, line pointers, a hole of zeros, tuples at the end.
    fn sample_page(hole_offset: usize, hole_length: usize) -> [u8; BLCKSZ] {
        let mut page = [0u8; BLCKSZ];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8 | 1;
        }
        for b in &mut page[hole_offset..hole_offset + hole_length] {
            *b = 0;
        }
        page
    }

    fn without_hole(page: &[u8; BLCKSZ], hole_offset: usize, hole_length: usize) -> Vec<u8> {
        let mut v = page[..hole_offset].to_vec();
        v.extend_from_slice(&page[hole_offset + hole_length..]);
        v
    }

    fn compress(method: ImageCompression, data: &[u8]) -> Vec<u8> {
        match method {
            ImageCompression::None => data.to_vec(),
            ImageCompression::Pglz => crate::wal::pglz::tests::compress(data),
            ImageCompression::Lz4 => lz4_flex::block::compress(data),
            ImageCompression::Zstd => zstd::bulk::compress(data, 3).unwrap(),
        }
    }

    fn method_bit(method: ImageCompression) -> u8 {
        match method {
            ImageCompression::None => 0,
            ImageCompression::Pglz => BKPIMAGE_COMPRESS_PGLZ,
            ImageCompression::Lz4 => BKPIMAGE_COMPRESS_LZ4,
            ImageCompression::Zstd => BKPIMAGE_COMPRESS_ZSTD,
        }
    }

    const METHODS: [ImageCompression; 4] =
        [ImageCompression::None, ImageCompression::Pglz, ImageCompression::Lz4, ImageCompression::Zstd];

    #[test]
    fn compression_from_bimg_info() {
        assert_eq!(ImageCompression::from_bimg_info(0), Ok(ImageCompression::None));
        assert_eq!(ImageCompression::from_bimg_info(BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY), Ok(ImageCompression::None));
        assert_eq!(ImageCompression::from_bimg_info(0x04), Ok(ImageCompression::Pglz));
        assert_eq!(ImageCompression::from_bimg_info(0x08 | 0x03), Ok(ImageCompression::Lz4));
        assert_eq!(ImageCompression::from_bimg_info(0x10), Ok(ImageCompression::Zstd));
        assert_eq!(ImageCompression::from_bimg_info(0xE0), Ok(ImageCompression::None));
        for bad in [0x0C, 0x14, 0x18, 0x1C, 0x1F] {
            assert_eq!(
                ImageCompression::from_bimg_info(bad),
                Err(ImageError::SeveralCompressionMethods { bimg_info: bad })
            );
        }
        let names: Vec<_> = METHODS.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["none", "pglz", "lz4", "zstd"]);
    }

    #[test]
    fn round_trip_every_method_with_and_without_hole() {
        for method in METHODS {
            for (off, len) in [(0usize, 0usize), (100, 7000), (24, 8168), (8191, 1), (1, 8191)] {
                let page = sample_page(off, len);
                let data = without_hole(&page, off, len);
                let image = compress(method, &data);
                let mut info = method_bit(method) | BKPIMAGE_APPLY;
                if len > 0 {
                    info |= BKPIMAGE_HAS_HOLE;
                }
                let mut out = [0xAAu8; BLCKSZ];
                restore_page(&image, info, off as u16, len as u16, &mut out)
                    .unwrap_or_else(|e| panic!("{} hole {off}+{len}: {e}", method.name()));
                assert!(out == page, "{} hole {off}+{len}", method.name());
            }
        }
    }

    #[test]
    fn zero_page_compresses_and_restores() {
        for method in METHODS {
            let page = [0u8; BLCKSZ];
            let image = compress(method, &page);
            let mut out = [0x55u8; BLCKSZ];
            restore_page(&image, method_bit(method), 0, 0, &mut out).unwrap();
            assert!(out == page);
        }
    }

    #[test]
    fn hole_field_checks() {
        let mut out = [0u8; BLCKSZ];
        let full = vec![0u8; BLCKSZ];
        assert_eq!(
            restore_page(&full, BKPIMAGE_HAS_HOLE, 0, 10, &mut out),
            Err(ImageError::EmptyHole { hole_offset: 0, hole_length: 10 })
        );
        assert_eq!(
            restore_page(&full, BKPIMAGE_HAS_HOLE, 10, 0, &mut out),
            Err(ImageError::EmptyHole { hole_offset: 10, hole_length: 0 })
        );
        assert_eq!(
            restore_page(&full, 0, 10, 0, &mut out),
            Err(ImageError::UnexpectedHole { hole_offset: 10, hole_length: 0 })
        );
        assert_eq!(
            restore_page(&full, BKPIMAGE_COMPRESS_LZ4, 0, 5, &mut out),
            Err(ImageError::UnexpectedHole { hole_offset: 0, hole_length: 5 })
        );
        assert_eq!(
            restore_page(&[0u8; 10], BKPIMAGE_HAS_HOLE, 8000, 200, &mut out),
            Err(ImageError::HoleOutsidePage { hole_offset: 8000, hole_length: 200 })
        );
        assert_eq!(
            restore_page(&[], BKPIMAGE_HAS_HOLE, u16::MAX, u16::MAX, &mut out),
            Err(ImageError::HoleOutsidePage { hole_offset: u16::MAX, hole_length: u16::MAX })
        );
        assert_eq!(
            restore_page(&full, BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD, 0, 0, &mut out),
            Err(ImageError::SeveralCompressionMethods { bimg_info: 0x18 })
        );
    }

    #[test]
    fn uncompressed_length_must_match() {
        let mut out = [0u8; BLCKSZ];
        assert_eq!(
            restore_page(&vec![0u8; BLCKSZ - 1], 0, 0, 0, &mut out),
            Err(ImageError::WrongImageLength { actual: BLCKSZ - 1, expected: BLCKSZ, hole_length: 0 })
        );
        assert_eq!(
            restore_page(&[0u8; 100], BKPIMAGE_HAS_HOLE, 50, 8000, &mut out),
            Err(ImageError::WrongImageLength { actual: 100, expected: 192, hole_length: 8000 })
        );
        let msg = restore_page(&[1, 2, 3], 0, 0, 0, &mut out).unwrap_err().to_string();
        assert_eq!(msg, "uncompressed full-page image is 3 bytes, expected 8192 (8192 minus a hole of 0)");
    }

    #[test]
    fn decompressed_size_must_match() {
        // Images of one byte too few or too many for the hole they claim.
        for method in [ImageCompression::Pglz, ImageCompression::Lz4, ImageCompression::Zstd] {
            for data_len in [BLCKSZ - 101, BLCKSZ - 99] {
                let page = sample_page(0, 0);
                let image = compress(method, &page[..data_len]);
                let mut out = [0u8; BLCKSZ];
                let r = restore_page(&image, method_bit(method) | BKPIMAGE_HAS_HOLE, 200, 100, &mut out);
                if method == ImageCompression::Pglz && data_len > BLCKSZ - 100 && r.is_ok() {
                    // pglz_decompress clamps a final match to the expected size, so a stream
                    // one byte too long that ends in a match is accepted, as by PostgreSQL.
                    let mut expected = [0u8; BLCKSZ];
                    expected[..200].copy_from_slice(&page[..200]);
                    expected[300..].copy_from_slice(&page[200..BLCKSZ - 100]);
                    assert!(out == expected);
                    continue;
                }
                assert!(r.is_err(), "{} with {data_len} bytes", method.name());
            }
        }
        // A pglz stream whose extra byte is a literal in a further group cannot be clamped:
        // the output fills before that group, which is then left over.
        let mut image = crate::wal::pglz::tests::compress(&[9u8; 100]);
        image.extend_from_slice(&[0x00, 0x42]);
        let mut out = [0u8; BLCKSZ];
        assert_eq!(
            restore_page(&image, BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_HAS_HOLE, 50, BLCKSZ as u16 - 100, &mut out),
            Err(ImageError::Pglz(PglzError::TrailingInput { trailing: 2, expected: 100 }))
        );
        // The short case reports the size mismatch for lz4 and zstd.
        let image = zstd::bulk::compress(&[7u8; 1000], 1).unwrap();
        let mut out = [0u8; BLCKSZ];
        assert_eq!(
            restore_page(&image, BKPIMAGE_COMPRESS_ZSTD, 0, 0, &mut out),
            Err(ImageError::WrongDecompressedSize { method: "zstd", actual: 1000, expected: BLCKSZ })
        );
        let image = lz4_flex::block::compress(&[7u8; 1000]);
        assert_eq!(
            restore_page(&image, BKPIMAGE_COMPRESS_LZ4, 0, 0, &mut out),
            Err(ImageError::WrongDecompressedSize { method: "lz4", actual: 1000, expected: BLCKSZ })
        );
    }

    #[test]
    fn corrupt_compressed_images_are_errors() {
        let page = sample_page(300, 5000);
        let data = without_hole(&page, 300, 5000);
        for method in [ImageCompression::Pglz, ImageCompression::Lz4, ImageCompression::Zstd] {
            let image = compress(method, &data);
            let info = method_bit(method) | BKPIMAGE_HAS_HOLE;
            let mut out = [0u8; BLCKSZ];
            // Truncated.
            let cut = &image[..image.len() / 2];
            assert!(restore_page(cut, info, 300, 5000, &mut out).is_err(), "{}", method.name());
            // Empty.
            assert!(restore_page(&[], info, 300, 5000, &mut out).is_err(), "{}", method.name());
        }
        // Not a zstd frame at all.
        let mut out = [0u8; BLCKSZ];
        let err = restore_page(b"definitely not zstd", BKPIMAGE_COMPRESS_ZSTD, 0, 0, &mut out).unwrap_err();
        assert!(matches!(err, ImageError::Zstd(_)), "{err}");
        assert!(err.to_string().starts_with("could not decompress zstd full-page image: "));
        let err = restore_page(&[0x01, 0x00], BKPIMAGE_COMPRESS_PGLZ, 0, 0, &mut out).unwrap_err();
        assert_eq!(err, ImageError::Pglz(PglzError::TruncatedTag { at: 1 }));
    }

    #[test]
    fn zstd_context_is_reused_across_calls_and_errors() {
        let page = sample_page(0, 0);
        let good = zstd::bulk::compress(&page, 1).unwrap();
        let mut out = [0u8; BLCKSZ];
        for _ in 0..3 {
            restore_page(&good, BKPIMAGE_COMPRESS_ZSTD, 0, 0, &mut out).unwrap();
            assert!(out == page);
            assert!(restore_page(&good[..good.len() - 3], BKPIMAGE_COMPRESS_ZSTD, 0, 0, &mut out).is_err());
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(
            image in proptest::collection::vec(any::<u8>(), 0..2000),
            bimg_info in any::<u8>(),
            hole_offset in prop_oneof![Just(0u16), 0u16..8200, any::<u16>()],
            hole_length in prop_oneof![Just(0u16), 0u16..8200, any::<u16>()],
        ) {
            let mut out = [0u8; BLCKSZ];
            let _ = restore_page(&image, bimg_info, hole_offset, hole_length, &mut out);
        }

        #[test]
        fn random_holes_round_trip(off in 1usize..8191, len_frac in 0.0f64..1.0, m in 0usize..4) {
            let len = 1 + ((BLCKSZ - off - 1) as f64 * len_frac) as usize;
            let page = sample_page(off, len);
            let method = METHODS[m];
            let image = compress(method, &without_hole(&page, off, len));
            let mut out = [0xFFu8; BLCKSZ];
            let info = method_bit(method) | BKPIMAGE_HAS_HOLE;
            restore_page(&image, info, off as u16, len as u16, &mut out).unwrap();
            prop_assert!(out == page);
        }
    }
}
