//! Fuzz target: arbitrary bytes as a WAL stream, fed in arbitrary chunk sizes, must decode to
//! records or a typed error — never a panic, never an allocation beyond the input.
//! Seed it with real segments (`cp $PGDATA/pg_wal/0000000100000000000000* corpus/decode_wal/`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use neon_types::Lsn;
use sidecar::wal::decoder::WalStreamDecoder;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk_sel, wal)) = data.split_first() else { return };
    let chunk = 1 + (chunk_sel as usize) * 97;
    // Start where the first page header says it is (so real segments make good seeds), at a
    // page boundary as a segment file would be read.
    let start = wal.get(8..16).map_or(0x0100_0000, |b| u64::from_le_bytes(b.try_into().unwrap()) & !0x1fff);
    // Starts the decoder refuses (beyond its LSN range) are fine: that is an error, not a panic.
    let Ok(mut dec) = WalStreamDecoder::new(Lsn(start), 16 << 20) else { return };
    for piece in wal.chunks(chunk) {
        dec.feed_slice(piece);
        loop {
            match dec.poll() {
                Ok(Some(rec)) => {
                    // Touch every payload so out-of-range offsets would show.
                    let _ = rec.main_data().len();
                    for b in &rec.blocks {
                        let _ = rec.block_data(b).len();
                        if let Some(img) = &b.image {
                            let mut page = [0u8; neon_types::BLCKSZ];
                            let _ = rec.restore_image(img, &mut page);
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
