//! The wal-redo wire protocol, spoken over the stdin/stdout pipes of a `postgres --single`
//! process running the extension's redo loop (`neon_walredo_loop()`). The sidecar writes
//! requests, the redo loop answers; both sides use only what is defined here.
//!
//! ```text
//! start-up: the loop prints READY_MARKER on stdout once it owns stdin/stdout; everything
//!           before it (single-user mode's banner and prompt) is noise to skip.
//! request:  tag u8 | len u32 (little-endian, payload bytes) | payload
//!   'B' BEGIN  17 bytes: spcnode u32 | dbnode u32 | relnode u32 | fork u8 | blkno u32
//!              starts rebuilding one block; any previous request's state is gone
//!   'P' PUSH   8192 bytes: the base page of the block
//!   'A' APPLY  8 + n bytes: end LSN u64 (the LSN redo stamps on pages) | the record,
//!              exactly xl_tot_len = n bytes, as in the WAL
//!   'G' GET    0 bytes -> reply: the block's page, 8192 bytes; ends the request
//!   'H' PING   0 bytes -> reply: one byte 'H'
//! ```
//! Requests may be pipelined: the client may write many before reading replies, which come
//! in order. There are no error replies: on any error (a record redo rejects, an rmgr that
//! is not page-level, a malformed message) the process exits, the client reads EOF and starts
//! a fresh process — the only way to be sure no half-applied state survives.

use crate::{BufferTag, Lsn, BLCKSZ};

pub const READY_MARKER: &[u8] = b"\nNEON_WALREDO_READY\n";

/// Where a redo process's scratch cluster has its own WAL (set with `pg_resetwal -l`): beyond
/// any LSN a compute reaches, so that writing out one of its buffers — whose page LSN is the
/// compute's — never asks for WAL to be flushed past the scratch cluster's end. Pages that
/// redo must treat as already done carry this LSN.
pub const SCRATCH_WAL_START: Lsn = Lsn(0xFFFF_0000_0000_0000);

/// [`SCRATCH_WAL_START`] as `pg_resetwal -l` takes it: the WAL file name (timeline 1, any
/// segment size up to 4 GB per log id works since the segment part is 0).
pub const SCRATCH_WAL_FILE: &str = "00000001FFFF000000000000";

pub const TAG_BEGIN: u8 = b'B';
pub const TAG_PUSH: u8 = b'P';
pub const TAG_APPLY: u8 = b'A';
pub const TAG_GET: u8 = b'G';
pub const TAG_PING: u8 = b'H';

/// Size of the tag and length prefix.
pub const HEADER_LEN: usize = 5;
/// Payload size of BEGIN.
pub const BEGIN_LEN: usize = 17;
/// The largest APPLY payload: an LSN and PostgreSQL's largest record.
pub const MAX_APPLY_LEN: usize = 8 + 0x3fff_ffff;

/// Whether redo of a record (by `xl_rmid` and the rmgr bits of `xl_info`) touches only pages of
/// the relations it references, so a redo process may apply it. Everything else (transactions,
/// SMGR, databases, CLOG, multixacts, relmaps, checkpoints, Heap2 REWRITE's mapping files)
/// would act on the scratch cluster itself; the sidecar handles those in Rust.
pub fn is_page_level(rmid: u8, info: u8) -> bool {
    const RM_XLOG_ID: u8 = 0;
    const RM_HEAP2_ID: u8 = 9;
    const RM_HEAP_ID: u8 = 10;
    const RM_BTREE_ID: u8 = 11;
    const RM_HASH_ID: u8 = 12;
    const RM_GIN_ID: u8 = 13;
    const RM_GIST_ID: u8 = 14;
    const RM_SEQ_ID: u8 = 15;
    const RM_SPGIST_ID: u8 = 16;
    const RM_BRIN_ID: u8 = 17;
    const RM_GENERIC_ID: u8 = 20;
    const XLOG_HEAP_OPMASK: u8 = 0x70;
    const XLOG_HEAP2_REWRITE: u8 = 0x00;
    const XLOG_FPI_FOR_HINT: u8 = 0xA0;
    const XLOG_FPI: u8 = 0xB0;
    let info = info & 0xF0;
    match rmid {
        RM_HEAP_ID | RM_BTREE_ID | RM_HASH_ID | RM_GIN_ID | RM_GIST_ID | RM_SEQ_ID | RM_SPGIST_ID | RM_BRIN_ID
        | RM_GENERIC_ID => true,
        RM_HEAP2_ID => info & XLOG_HEAP_OPMASK != XLOG_HEAP2_REWRITE,
        RM_XLOG_ID => info == XLOG_FPI || info == XLOG_FPI_FOR_HINT,
        _ => false,
    }
}

fn header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

/// Appends a BEGIN for `tag`.
pub fn encode_begin(out: &mut Vec<u8>, tag: &BufferTag) {
    header(out, TAG_BEGIN, BEGIN_LEN);
    let n = tag.rel.node;
    for v in [n.spcnode, n.dbnode, n.relnode] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(tag.rel.fork as u8);
    out.extend_from_slice(&tag.blkno.to_le_bytes());
}

/// Appends a PUSH of a base page.
pub fn encode_push(out: &mut Vec<u8>, page: &[u8; BLCKSZ]) {
    header(out, TAG_PUSH, BLCKSZ);
    out.extend_from_slice(page);
}

/// Appends an APPLY of one record (its `xl_tot_len` bytes) ending at `end_lsn`.
pub fn encode_apply(out: &mut Vec<u8>, end_lsn: Lsn, record: &[u8]) {
    header(out, TAG_APPLY, 8 + record.len());
    out.extend_from_slice(&end_lsn.0.to_le_bytes());
    out.extend_from_slice(record);
}

/// Appends a GET.
pub fn encode_get(out: &mut Vec<u8>) {
    header(out, TAG_GET, 0);
}

/// Appends a PING.
pub fn encode_ping(out: &mut Vec<u8>) {
    header(out, TAG_PING, 0);
}

/// Parses a BEGIN payload: (spcnode, dbnode, relnode, fork, blkno).
pub fn decode_begin(p: &[u8; BEGIN_LEN]) -> (u32, u32, u32, u8, u32) {
    let u = |o: usize| u32::from_le_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
    (u(0), u(4), u(8), p[12], u(13))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ForkNumber, RelFileNode, RelTag};

    #[test]
    fn begin_round_trips() {
        let tag = BufferTag {
            rel: RelTag {
                node: RelFileNode { spcnode: 1663, dbnode: 5, relnode: 16384 },
                fork: ForkNumber::VisibilityMap,
            },
            blkno: 77,
        };
        let mut out = Vec::new();
        encode_begin(&mut out, &tag);
        assert_eq!(out[0], TAG_BEGIN);
        assert_eq!(u32::from_le_bytes(out[1..5].try_into().unwrap()) as usize, BEGIN_LEN);
        let p: &[u8; BEGIN_LEN] = out[5..].try_into().unwrap();
        assert_eq!(decode_begin(p), (1663, 5, 16384, 2, 77));
    }
}
