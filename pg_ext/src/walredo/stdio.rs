//! Binary I/O on the process's standard streams, through the very `FILE*`s single-user mode
//! uses: its SQL reader may already have buffered the first bytes of our stream in `stdin`'s
//! buffer, so reading the file descriptor directly would lose them.

use pgrx::prelude::*;

extern "C" {
    static mut stdin: *mut libc::FILE;
    static mut stdout: *mut libc::FILE;
}

/// Fills `buf`, or returns false if the stream ends before its first byte.
pub fn read_exact_or_eof(buf: &mut [u8]) -> bool {
    // SAFETY: `stdin` is the C runtime's stream, only used on this thread; `buf` is writable
    // for its length.
    let n = unsafe { libc::fread(buf.as_mut_ptr().cast(), 1, buf.len(), stdin) };
    if n == 0 {
        return false;
    }
    if n < buf.len() {
        error!("wal-redo protocol violation: stream ended inside a message ({n} of {} bytes)", buf.len());
    }
    true
}

/// Fills `buf`; the stream ending first is a protocol violation.
pub fn read_exact(buf: &mut [u8]) {
    if !buf.is_empty() && !read_exact_or_eof(buf) {
        error!("wal-redo protocol violation: stream ended inside a message");
    }
}

/// Reads `len` bytes into 8-byte aligned memory kept in `store`, returning them.
pub fn read_into_aligned(store: &mut Vec<u64>, len: usize) -> &mut [u8] {
    let words = len.div_ceil(8);
    if store.len() < words {
        store.resize(words, 0);
    }
    // SAFETY: `store` holds at least `len` initialised bytes; u8 has no alignment needs.
    let bytes = unsafe { std::slice::from_raw_parts_mut(store.as_mut_ptr().cast::<u8>(), len) };
    read_exact(bytes);
    bytes
}

pub fn write_all(buf: &[u8]) {
    // SAFETY: `stdout` is the C runtime's stream, only used on this thread.
    let n = unsafe { libc::fwrite(buf.as_ptr().cast(), 1, buf.len(), stdout) };
    if n != buf.len() {
        error!("wal-redo: could not write to stdout ({n} of {} bytes)", buf.len());
    }
}

pub fn flush() {
    // SAFETY: as above.
    if unsafe { libc::fflush(stdout) } != 0 {
        error!("wal-redo: could not flush stdout");
    }
}
