//! The compute's link to the sidecar: `neon_types::protocol` frames over the sidecar's unix
//! socket (`neon.sidecar_socket`). A backend keeps one connection for its life and makes a new
//! one when the last broke; the background worker keeps its own.
//!
//! Nothing here blocks without end: the socket is non-blocking and every wait is a `poll` of
//! at most [`TICK`], between which the caller's `interrupted` hook runs — in a backend that is
//! `CHECK_FOR_INTERRUPTS`, so a query cancel or a terminate ends the wait with PostgreSQL's
//! own ERROR; in the background worker it says whether SIGTERM came, which ends the wait with
//! [`ClientError::Interrupted`]. A request that was cut short leaves no connection behind: the connection is
//! taken out of its slot for the call and put back only after a whole reply, so the next call
//! never reads the remains of an earlier one.

use neon_types::protocol::{ErrorCode, ProtocolError, Request, Response, HEADER_LEN, MAX_PAYLOAD};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The longest a wait goes without checking for interrupts.
pub const TICK: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("neon.sidecar_socket is not set (the sidecar's socket; `neon-sidecar init` writes it)")]
    NotConfigured,
    #[error("could not connect to the sidecar at {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the sidecar at {path} closed the connection{}", if *.during_reply { " during its reply" } else { "" })]
    Closed { path: PathBuf, during_reply: bool },
    #[error("talking to the sidecar at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the sidecar at {path} did not answer within {after:?} (neon.request_timeout)")]
    Timeout { path: PathBuf, after: Duration },
    #[error("the sidecar at {path} sent a bad message: {source}")]
    Protocol { path: PathBuf, source: ProtocolError },
    #[error("{message}")]
    Sidecar { code: ErrorCode, message: String },
    #[error("the wait for the sidecar at {path} was interrupted")]
    Interrupted { path: PathBuf },
}

/// One connection to the sidecar.
pub struct Connection {
    stream: UnixStream,
    path: PathBuf,
}

impl Connection {
    pub fn connect(path: &Path) -> Result<Connection, ClientError> {
        let connect = |source| ClientError::Connect { path: path.to_owned(), source };
        let stream = UnixStream::connect(path).map_err(connect)?;
        stream.set_nonblocking(true).map_err(connect)?;
        Ok(Connection { stream, path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `req` and returns the sidecar's answer; an error answer is
    /// [`ClientError::Sidecar`]. `Progress` frames before it go to `progress`. Gives up after
    /// `timeout` (`None`: only `interrupted` ends the wait), calling `interrupted` at least
    /// every [`TICK`] (it ends the wait by returning true, or by not returning: an ERROR).
    pub fn call(
        &mut self,
        req: &Request,
        timeout: Option<Duration>,
        interrupted: &mut dyn FnMut() -> bool,
        progress: &mut dyn FnMut(&Response),
    ) -> Result<Response, ClientError> {
        let started = Instant::now();
        let mut frame = Vec::new();
        req.write_to(&mut frame).map_err(|source| ClientError::Protocol { path: self.path.clone(), source })?;
        let mut sent = 0;
        while sent < frame.len() {
            match self.stream.write(&frame[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLOUT, started, timeout, interrupted)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset) => {
                    return Err(ClientError::Closed { path: self.path.clone(), during_reply: false })
                }
                Err(source) => return Err(ClientError::Io { path: self.path.clone(), source }),
            }
        }
        let mut reply = Vec::with_capacity(HEADER_LEN + neon_types::BLCKSZ + 4);
        let mut replied = false;
        loop {
            reply.clear();
            self.read_frame(&mut reply, replied, started, timeout, interrupted)?;
            replied = true;
            match Response::read_from(&mut &reply[..]) {
                Ok(p @ Response::Progress { .. }) => progress(&p),
                Ok(Response::Error { code, message }) => return Err(ClientError::Sidecar { code, message }),
                Ok(r) => return Ok(r),
                Err(source) => return Err(ClientError::Protocol { path: self.path.clone(), source }),
            }
        }
    }

    /// Reads one whole frame into `reply`; `replied`: earlier frames of this reply came.
    fn read_frame(
        &mut self,
        reply: &mut Vec<u8>,
        replied: bool,
        started: Instant,
        timeout: Option<Duration>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        let mut want = HEADER_LEN;
        let mut buf = [0u8; 16 * 1024];
        while reply.len() < want {
            match self.stream.read(&mut buf[..(want - reply.len()).min(16 * 1024)]) {
                Ok(0) => {
                    let during_reply = replied || !reply.is_empty();
                    return Err(ClientError::Closed { path: self.path.clone(), during_reply });
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    let during_reply = replied || !reply.is_empty();
                    return Err(ClientError::Closed { path: self.path.clone(), during_reply });
                }
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(libc::POLLIN, started, timeout, interrupted)?
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ClientError::Io { path: self.path.clone(), source }),
            }
            if want == HEADER_LEN && reply.len() == HEADER_LEN {
                // The header says how long the rest is: payload and CRC.
                let len = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes")) as usize;
                if len > MAX_PAYLOAD {
                    return Err(ClientError::Protocol {
                        path: self.path.clone(),
                        source: ProtocolError::Malformed(format!("a reply of {len} bytes")),
                    });
                }
                want = HEADER_LEN + len + 4;
            }
        }
        Ok(())
    }

    fn wait(
        &self,
        events: libc::c_short,
        started: Instant,
        timeout: Option<Duration>,
        interrupted: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        loop {
            if interrupted() {
                return Err(ClientError::Interrupted { path: self.path.clone() });
            }
            let tick = match timeout {
                Some(t) => {
                    let left = t.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(ClientError::Timeout { path: self.path.clone(), after: t });
                    }
                    left.min(TICK)
                }
                None => TICK,
            };
            let mut fd = libc::pollfd { fd: self.stream.as_raw_fd(), events, revents: 0 };
            // SAFETY: one valid pollfd for a socket this connection owns.
            let n = unsafe { libc::poll(&mut fd, 1, tick.as_millis().max(1) as libc::c_int) };
            if n > 0 {
                // Ready, or hung up / failed: the next read or write says which.
                return Ok(());
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ClientError::Io { path: self.path.clone(), source: e });
                }
            }
        }
    }
}

/// A connection kept between calls: taken for a call, put back after a whole reply.
#[derive(Default)]
pub struct Slot {
    conn: Option<Connection>,
    /// Connections made (that connected): a count that grows only when the link was made
    /// anew, which is how a reconnect shows (the worker's, in `neon_sidecar_status()`).
    connects: u64,
}

impl Slot {
    pub const fn new() -> Slot {
        Slot { conn: None, connects: 0 }
    }

    /// How many connections this slot has made.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    fn connect(&mut self, path: &Path) -> Result<Connection, ClientError> {
        let conn = Connection::connect(path)?;
        self.connects += 1;
        Ok(conn)
    }

    /// Calls over the kept connection, or a new one (to `path`) if there is none, it was to
    /// another path, or it broke while idle (a restarted sidecar): then the call is made once
    /// more on a fresh connection, which is safe because no reply had begun.
    pub fn call(
        &mut self,
        path: &Path,
        req: &Request,
        timeout: Option<Duration>,
        interrupted: &mut dyn FnMut() -> bool,
        progress: &mut dyn FnMut(&Response),
    ) -> Result<Response, ClientError> {
        let reused = self.conn.as_ref().is_some_and(|c| c.path() == path);
        let mut conn = match self.conn.take() {
            Some(c) if reused => c,
            _ => self.connect(path)?,
        };
        let result = match conn.call(req, timeout, interrupted, progress) {
            // Only when nothing of a reply came: a request is never made twice after the
            // sidecar began answering it (a base backup's progress, say).
            Err(ClientError::Closed { during_reply: false, .. }) if reused => {
                conn = self.connect(path)?;
                conn.call(req, timeout, interrupted, progress)
            }
            r => r,
        };
        if matches!(result, Ok(_) | Err(ClientError::Sidecar { .. })) {
            self.conn = Some(conn);
        }
        result
    }
}
