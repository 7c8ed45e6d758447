//! One wal-redo process: `postgres --single` on its own scratch data directory, running the
//! extension's redo loop, spoken to over pipes with the protocol of `neon_types::walredo`.
//! Every read and write has a deadline, so a hung process is a timeout, not a hung sidecar;
//! the process is killed (and reaped) when this handle is dropped.

use super::scratch::as_server_user;
use super::RedoConfig;
use neon_types::walredo::READY_MARKER;
use neon_types::BLCKSZ;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// How a redo process failed. Any of these means the process must be replaced.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start wal-redo process in {dir}: {detail}")]
    Start { dir: PathBuf, detail: String },
    #[error("wal-redo process {pid} exited{}", log_excerpt(.log))]
    Died { pid: u32, log: String },
    #[error("wal-redo process {pid} did not answer within {after:?}")]
    Timeout { pid: u32, after: Duration },
    #[error("wal-redo process {pid}: {what}: {source}")]
    Io { pid: u32, what: &'static str, source: std::io::Error },
}

/// The lines of a redo process's log that say why it ended: its last PANIC, FATAL or ERROR
/// (with the CONTEXT after it), else its last line.
fn log_excerpt(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    let why = lines.iter().rposition(|l| ["PANIC:", "FATAL:", "ERROR:"].iter().any(|k| l.contains(k)));
    let picked: Vec<&str> = match why {
        Some(i) => lines[i..].iter().take(2).filter(|l| !l.contains("STATEMENT:")).copied().collect(),
        None => lines.last().into_iter().copied().collect(),
    };
    if picked.is_empty() {
        String::new()
    } else {
        format!(": {}", picked.join(" | "))
    }
}

/// Exchanges whose reply is at most this long (one page and its header) spin for it.
const SPIN_REPLY_MAX: usize = 2 * BLCKSZ;

pub struct RedoProcess {
    child: Child,
    /// Closed (taken) when the process is asked to exit.
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    log: PathBuf,
    pid: u32,
    /// How long to look for a reply before sleeping in poll.
    spin: Duration,
}

impl RedoProcess {
    /// Starts a redo process on data directory `dir` and waits until its loop is ready.
    pub fn start(dir: &Path, cfg: &RedoConfig) -> Result<RedoProcess, ProcessError> {
        let fail = |detail: String| ProcessError::Start { dir: dir.to_path_buf(), detail };
        let log = dir.with_extension("log");
        // A fresh log per process, so a death is explained by this process's last words.
        let log_file = {
            use std::os::unix::fs::OpenOptionsExt;
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true).mode(0o600).open(&log).map_err(|e| fail(e.to_string()))?
        };
        if let Some((uid, gid)) = cfg.run_as {
            let _ = std::os::unix::fs::chown(&log, Some(uid), Some(gid));
        }
        let mut cmd = Command::new(cfg.pg_bin_dir.join("postgres"));
        cmd.arg("--single").arg("-D").arg(dir);
        // A small buffer pool: a request touches a few dozen pages, and cleanup scans it all.
        for setting in [
            "shared_buffers=4MB",
            "fsync=off",
            "log_min_messages=warning",
            if cfg.wal_log_hints { "wal_log_hints=on" } else { "wal_log_hints=off" },
        ] {
            cmd.args(["-c", setting]);
        }
        cmd.arg("postgres").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log_file);
        let mut child = as_server_user(&mut cmd, cfg).spawn().map_err(|e| fail(e.to_string()))?;
        let pid = child.id();
        let stdin = Some(child.stdin.take().expect("piped"));
        let stdout = child.stdout.take().expect("piped");
        let mut p = RedoProcess { child, stdin, stdout, log, pid, spin: cfg.reply_spin };
        for f in [p.stdin_ref().as_fd(), p.stdout.as_fd()] {
            set_nonblocking(f).map_err(|e| fail(e.to_string()))?;
            // A batch of pages (tens of records each way) then crosses in a few writes instead
            // of a switch between the two processes every 64 KB. Advice: the default works.
            let _ =
                nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        let deadline = Instant::now() + cfg.start_timeout;
        p.write_all(b"SELECT neon_walredo_loop();\n", deadline)?;
        // Skip single-user mode's banner and prompt up to the loop's marker.
        let mut seen = Vec::new();
        let mut chunk = [0u8; 512];
        while !seen.windows(READY_MARKER.len()).any(|w| w == READY_MARKER) {
            let n = p.read_some(&mut chunk, deadline, false)?;
            seen.extend_from_slice(&chunk[..n]);
            if seen.len() > 64 * 1024 {
                return Err(fail(format!("no ready marker in {} bytes of output", seen.len())));
            }
        }
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is still running (it may have died while idle, e.g. OOM-killed).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `request` (one or many pipelined requests) and reads exactly `reply.len()` bytes of
    /// replies, all before `deadline`. Reading and writing interleave, so a long pipeline never
    /// stalls on a full pipe in either direction.
    pub fn exchange(&mut self, mut request: &[u8], reply: &mut [u8], deadline: Instant) -> Result<(), ProcessError> {
        let mut got = 0;
        while !request.is_empty() {
            let (writable, readable) = self.wait_both(deadline)?;
            if readable && got < reply.len() {
                got += self.read_now(&mut reply[got..])?;
            }
            if writable {
                match self.stdin_mut().write(request) {
                    Ok(n) => request = &request[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(self.died()),
                    Err(source) => return Err(ProcessError::Io { pid: self.pid, what: "writing a request", source }),
                }
            }
        }
        let spin = reply.len() <= SPIN_REPLY_MAX;
        while got < reply.len() {
            got += self.read_some(&mut reply[got..], deadline, spin)?;
        }
        Ok(())
    }

    /// Waits until stdin is writable or stdout readable; returns (writable, readable).
    fn wait_both(&mut self, deadline: Instant) -> Result<(bool, bool), ProcessError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [
            PollFd::new(self.stdin_ref().as_fd(), PollFlags::POLLOUT),
            PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN),
        ];
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => Err(ProcessError::Timeout { pid: self.pid, after: left }),
            Ok(_) => {
                let ready = |f: &PollFd, want: PollFlags| {
                    f.revents().is_some_and(|r| r.intersects(want | PollFlags::POLLHUP | PollFlags::POLLERR))
                };
                Ok((ready(&fds[0], PollFlags::POLLOUT), ready(&fds[1], PollFlags::POLLIN)))
            }
            Err(nix::errno::Errno::EINTR) => Ok((false, false)),
            Err(e) => Err(ProcessError::Io { pid: self.pid, what: "waiting on a pipe", source: e.into() }),
        }
    }

    /// Reads what is available now (stdout was reported readable).
    fn read_now(&mut self, buf: &mut [u8]) -> Result<usize, ProcessError> {
        match self.stdout.read(buf) {
            Ok(0) => Err(self.died()),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(source) => Err(ProcessError::Io { pid: self.pid, what: "reading a reply", source }),
        }
    }

    fn write_all(&mut self, mut buf: &[u8], deadline: Instant) -> Result<(), ProcessError> {
        while !buf.is_empty() {
            self.wait(PollFlags::POLLOUT, deadline)?;
            match self.stdin_mut().write(buf) {
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(self.died()),
                Err(source) => return Err(ProcessError::Io { pid: self.pid, what: "writing a request", source }),
            }
        }
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8], deadline: Instant, spin: bool) -> Result<usize, ProcessError> {
        // A reply usually follows within microseconds: look for it briefly before sleeping in
        // poll, whose wake-up costs more than a short redo.
        let spin_until = Instant::now() + if spin { self.spin } else { Duration::ZERO };
        loop {
            let n = self.read_now(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if Instant::now() >= spin_until {
                break;
            }
            std::hint::spin_loop();
        }
        loop {
            self.wait(PollFlags::POLLIN, deadline)?;
            match self.stdout.read(buf) {
                Ok(0) => return Err(self.died()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(source) => return Err(ProcessError::Io { pid: self.pid, what: "reading a reply", source }),
            }
        }
    }

    /// Waits until the pipe is ready for `what` (or hung up), or the deadline passes.
    fn wait(&mut self, what: PollFlags, deadline: Instant) -> Result<(), ProcessError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let fd = if what == PollFlags::POLLOUT { self.stdin_ref().as_fd() } else { self.stdout.as_fd() };
        let mut fds = [PollFd::new(fd, what)];
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => Err(ProcessError::Timeout { pid: self.pid, after: left }),
            Ok(_) => Ok(()),
            Err(nix::errno::Errno::EINTR) => Ok(()),
            Err(e) => Err(ProcessError::Io { pid: self.pid, what: "waiting on a pipe", source: e.into() }),
        }
    }

    fn stdin_ref(&self) -> &ChildStdin {
        self.stdin.as_ref().expect("stdin is open until drop")
    }

    fn stdin_mut(&mut self) -> &mut ChildStdin {
        self.stdin.as_mut().expect("stdin is open until drop")
    }

    fn died(&mut self) -> ProcessError {
        // Give the process a moment to finish writing its last words and exit.
        self.reap_within(Duration::from_secs(1));
        ProcessError::Died { pid: self.pid, log: std::fs::read_to_string(&self.log).unwrap_or_default() }
    }

    /// Waits up to `limit` for the process to exit; kills it if it has not.
    fn reap_within(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes a pipe to or from a redo process holds (Linux's `pipe-max-size` default).
const PIPE_SIZE: nix::libc::c_int = 1 << 20;

fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

impl Drop for RedoProcess {
    /// Closing stdin ends the redo loop through PostgreSQL's normal exit, which releases its
    /// shared memory; a kill would leave the segments behind (the exit callbacks never run).
    /// A process that does not exit soon is killed all the same.
    fn drop(&mut self) {
        self.stdin.take();
        self.reap_within(Duration::from_secs(2));
    }
}
