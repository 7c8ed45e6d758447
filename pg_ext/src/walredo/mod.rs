//! The wal-redo loop: the extension's side of page reconstruction. The sidecar starts
//! `postgres --single` on a private scratch data directory and sends it
//! `SELECT neon_walredo_loop();`; from then on this code owns the process's stdin and stdout
//! and speaks the protocol of `neon_types::walredo`, rebuilding one block per request with
//! stock PostgreSQL's own redo routines.
//!
//! * [`stdio`] — the binary stream on the same `FILE*`s single-user mode reads and writes.
//! * [`redo`]  — one request's life: relfilenode remapping, base page, records, page out,
//!   cleanup (what DESIGN.md §3 verified stock PostgreSQL 15 needs).
//!
//! Any error ends the process (`ExitOnAnyError`): a half-applied request must not leave state
//! for the next one, and an ERROR must not fall back into single-user mode's SQL loop, which
//! would read the binary stream as SQL. The sidecar sees EOF and starts a fresh process.

mod redo;
mod stdio;

use neon_types::walredo::{self as proto, BEGIN_LEN, HEADER_LEN, MAX_APPLY_LEN};
use neon_types::BLCKSZ;
use pgrx::prelude::*;

/// Runs the redo loop until stdin closes. Only in single-user mode, where the sidecar starts it.
#[pg_extern]
fn neon_walredo_loop() {
    // SAFETY: reading a backend global on the backend's only thread.
    if unsafe { pg_sys::IsUnderPostmaster } {
        error!(
            "neon_walredo_loop() runs only in a single-user backend (postgres --single) started by the neon sidecar"
        );
    }
    // SAFETY: backend globals, set once on the backend's only thread before any redo.
    unsafe {
        pg_sys::ExitOnAnyError = true;
    }
    let mut state = redo::RedoState::start();
    stdio::write_all(proto::READY_MARKER);
    stdio::flush();

    let mut header = [0u8; HEADER_LEN];
    // Records are read into 8-byte aligned memory: PostgreSQL reads XLogRecord fields in place.
    let mut payload: Vec<u64> = Vec::new();
    loop {
        if !stdio::read_exact_or_eof(&mut header) {
            // The sidecar closed the pipe: a normal shutdown.
            // SAFETY: ends the process through PostgreSQL's exit path.
            unsafe { pg_sys::proc_exit(0) }
        }
        let tag = header[0];
        let len = u32::from_le_bytes(header[1..5].try_into().expect("4 bytes")) as usize;
        match tag {
            proto::TAG_BEGIN if len == BEGIN_LEN => {
                let mut p = [0u8; BEGIN_LEN];
                stdio::read_exact(&mut p);
                let (spc, db, rel, fork, blkno) = proto::decode_begin(&p);
                state.begin(spc, db, rel, fork, blkno);
            }
            proto::TAG_PUSH if len == BLCKSZ => {
                let buf = stdio::read_into_aligned(&mut payload, len);
                state.push_page((&*buf).try_into().expect("BLCKSZ bytes"));
            }
            proto::TAG_APPLY if (8 + 24..=MAX_APPLY_LEN).contains(&len) => {
                let buf = stdio::read_into_aligned(&mut payload, len);
                let end_lsn = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                state.apply(end_lsn, &mut buf[8..]);
            }
            proto::TAG_GET if len == 0 => {
                let page = state.get_page();
                stdio::write_all(page);
                stdio::flush();
                state.end_request();
            }
            proto::TAG_PING if len == 0 => {
                stdio::write_all(&[proto::TAG_PING]);
                stdio::flush();
            }
            _ => error!("wal-redo protocol violation: message tag {tag:#04x} with length {len}"),
        }
    }
}

extension_sql!(
    r#"
REVOKE ALL ON FUNCTION neon_walredo_loop() FROM PUBLIC;
COMMENT ON FUNCTION neon_walredo_loop() IS 'internal: the wal-redo loop, run by the neon sidecar in postgres --single';
"#,
    name = "walredo_permissions",
    requires = [neon_walredo_loop]
);
