//! Bad input never panics: real WAL from a PostgreSQL 15 server, mutated (flipped bits,
//! truncation, garbage and absurd `xl_tot_len`, scribbled block headers) and fed in random chunk
//! sizes, decodes to records or a typed error. Records before the first damaged byte are
//! decoded exactly as from the clean WAL, and the decoder never allocates much more than the
//! input it holds (a counting allocator measures it).

use anyhow::Result;
use bytes::Bytes;
use neon_tests::workload;
use neon_tests::Cluster;
use neon_types::Lsn;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sidecar::wal::decoder::WalStreamDecoder;
use sidecar::wal::segment::{load_segment, SegmentSet};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the bytes live on the current thread and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|l| {
            l.set(l.get() + layout.size() as isize);
            let _ = PEAK.try_with(|p| p.set(p.get().max(l.get())));
        });
        // SAFETY: forwarding the caller's layout to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|l| l.set(l.get() - layout.size() as isize));
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated on this thread while running `f`, above what was live before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, (PEAK.with(Cell::get) - base).max(0) as usize)
}

/// (start, end, total length) of every record decoded, and the error that stopped decoding.
fn decode(wal: &[u8], start: Lsn, seg_size: u32, chunk: usize) -> (Vec<(Lsn, Lsn, u32)>, Option<String>) {
    let mut dec = WalStreamDecoder::new(start, seg_size).expect("valid start");
    let mut recs = Vec::new();
    for piece in wal.chunks(chunk.max(1)) {
        dec.feed(Bytes::copy_from_slice(piece));
        loop {
            match dec.poll() {
                Ok(Some(r)) => {
                    // Touch every payload: out-of-range offsets would panic here.
                    let _ = r.main_data().len();
                    for b in &r.blocks {
                        let _ = r.block_data(b).len();
                        if let Some(img) = &b.image {
                            let mut page = [0u8; neon_types::BLCKSZ];
                            let _ = r.restore_image(img, &mut page);
                        }
                    }
                    recs.push((r.lsn, r.end_lsn, r.total_len()));
                }
                Ok(None) => break,
                Err(e) => return (recs, Some(e.to_string())),
            }
        }
    }
    (recs, None)
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBits(Vec<(usize, u8)>),
    Truncate(usize),
    /// Overwrite `xl_tot_len` of the n-th record with a value.
    TotLen(usize, u32),
    /// Overwrite bytes just after the n-th record's header (its block headers).
    Scribble(usize, Vec<u8>),
}

#[test]
fn mutated_real_wal_never_panics() -> Result<()> {
    // 1 MB segments keep each case small while still crossing segment boundaries.
    let c = Cluster::builder().initdb_arg("--wal-segsize=1").guc("wal_keep_size", "1GB").start()?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let start = workload::insert_lsn(&c)?;
    for method in ["lz4", "pglz", "zstd"] {
        workload::set_wal_compression(&c, method)?;
        c.pgbench(&["-n", "-t", "50"])?;
    }
    c.execute("CHECKPOINT")?;
    let set = SegmentSet::collect(&[c.wal_dir()], None)?;
    let seg_size = set.seg_size;
    assert_eq!(seg_size, 1 << 20);
    let segno = start.segment_number(seg_size);
    // Three consecutive segments, holding heap, btree and compressed-image records.
    let mut wal = Vec::new();
    for s in segno..segno + 3 {
        if let Some(path) = set.files.get(&s) {
            wal.extend_from_slice(&load_segment(path)?);
        }
    }
    let base = Lsn(segno * seg_size as u64);
    let (clean, _) = decode(&wal, base, seg_size, wal.len());
    assert!(clean.len() > 1000, "only {} records in the clean WAL", clean.len());
    eprintln!("mutating {} bytes of real WAL holding {} records", wal.len(), clean.len());
    let starts: Vec<usize> = clean.iter().map(|r| (r.0 - base) as usize).collect();

    let len = wal.len();
    let n = starts.len();
    let absurd = prop_oneof![
        Just(0u32),
        Just(23),
        Just(24),
        Just(25),
        Just(u32::MAX),
        Just(0x3fff_ffff),
        Just(0x4000_0000),
        any::<u32>()
    ];
    let mutation = prop_oneof![
        prop::collection::vec((0..len, 0u8..8), 1..20).prop_map(Mutation::FlipBits),
        (0..len).prop_map(Mutation::Truncate),
        (0..n, absurd).prop_map(|(i, v)| Mutation::TotLen(i, v)),
        (0..n, prop::collection::vec(any::<u8>(), 1..24)).prop_map(|(i, b)| Mutation::Scribble(i, b)),
    ];
    let mut runner = TestRunner::new(Config { cases: 200, failure_persistence: None, ..Config::default() });
    runner
        .run(&(mutation, prop_oneof![Just(usize::MAX), 1usize..20_000]), |(m, chunk)| {
            let mut bad = wal.clone();
            let first_damage = match &m {
                Mutation::FlipBits(flips) => {
                    for &(at, bit) in flips {
                        bad[at] ^= 1 << bit;
                    }
                    flips.iter().map(|f| f.0).min().unwrap()
                }
                Mutation::Truncate(at) => {
                    bad.truncate(*at);
                    *at
                }
                Mutation::TotLen(i, v) => {
                    bad[starts[*i]..starts[*i] + 4].copy_from_slice(&v.to_le_bytes());
                    starts[*i]
                }
                Mutation::Scribble(i, bytes) => {
                    let at = (starts[*i] + 24).min(len - bytes.len());
                    bad[at..at + bytes.len()].copy_from_slice(bytes);
                    at
                }
            };
            let chunk = chunk.min(bad.len().max(1));
            let ((recs, _err), peak) = peak_during(|| decode(&bad, base, seg_size, chunk));
            // Records wholly before the damage are exactly the clean ones.
            let intact: Vec<_> = clean.iter().filter(|r| ((r.1 - base) as usize) <= first_damage).copied().collect();
            prop_assert!(recs.len() >= intact.len(), "lost good records before the damage at {first_damage}");
            prop_assert_eq!(&recs[..intact.len()], &intact[..]);
            // The input copy (chunks) plus at most one assembled record and bookkeeping.
            prop_assert!(peak <= 2 * bad.len() + (4 << 20), "peak allocation {peak} for {} bytes of input", bad.len());
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
