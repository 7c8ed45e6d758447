//! A past server's front door: the unix socket the compute connects to is the sidecar's, which
//! passes each connection's bytes through to the postmaster's own socket unchanged. Standing
//! in front lets the sidecar start the postmaster when a connection arrives (after an idle
//! stop, or a sidecar restart) and stop it when it is idle, without the compute knowing.
//!
//! Idle means: every connection is between transactions (the last thing the server sent was
//! `ReadyForQuery` with status `I`, and the client has sent nothing since) and nothing has
//! passed for the idle time. Then the door closes the client connections first — the client
//! sees a connection that failed, no error message, which `postgres_fdw` answers by
//! connecting again at the next transaction's start — and only then stops the postmaster
//! (whose goodbye messages go nowhere). A connection inside a transaction is never cut.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the door stands in front of.
pub trait Backend: Send + Sync + 'static {
    /// Starts the server unless it runs; the path of its socket, or why it cannot run.
    fn ensure_running(&self) -> Result<PathBuf, String>;
    fn running(&self) -> bool;
    /// Stops the server (its clients are gone).
    fn stop(&self);
    /// For log lines.
    fn name(&self) -> String;
}

/// `ReadyForQuery`, idle: type, length 5, transaction status.
const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];
/// How often the door looks for idleness (and for being closed).
const TICK: Duration = Duration::from_millis(200);

#[derive(Default)]
struct ConnState {
    /// Between transactions (see the module header).
    quiet: bool,
    /// The door cut it: nothing more is passed.
    closing: bool,
}

struct Conn {
    client: UnixStream,
    state: Mutex<ConnState>,
    done: AtomicBool,
}

struct Shared {
    backend: Arc<dyn Backend>,
    conns: Mutex<Vec<Arc<Conn>>>,
    since: Instant,
    /// When bytes last passed, in ms since `since`.
    last_used: AtomicU64,
    closed: AtomicBool,
}

impl Shared {
    fn touch(&self) {
        self.last_used.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.since.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_used.load(Ordering::Relaxed)))
    }

    fn cut(&self, conns: &[Arc<Conn>]) {
        for c in conns {
            // Shut first: a write blocked on a client that does not read (holding the lock)
            // fails then.
            let _ = c.client.shutdown(std::net::Shutdown::Both);
            c.state.lock().unwrap_or_else(|p| p.into_inner()).closing = true;
        }
    }

    /// If every connection is quiet (one busy passing bytes holds its lock: not quiet) and
    /// nothing passed for `idle`, cuts them and stops the server.
    fn stop_if_idle(&self, idle: Duration) {
        if !self.backend.running() || self.idle_for() < idle {
            return;
        }
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.done.load(Ordering::Relaxed));
        {
            let guards: Option<Vec<_>> = conns.iter().map(|c| c.state.try_lock().ok().filter(|s| s.quiet)).collect();
            let Some(mut guards) = guards else { return };
            for g in &mut guards {
                g.closing = true;
            }
        }
        eprintln!(
            "neon-sidecar: {} idle for {:?} ({} connection(s) between transactions): stopping it until it is used again",
            self.backend.name(),
            self.idle_for(),
            conns.len()
        );
        self.cut(&conns);
        conns.clear();
        drop(conns);
        self.backend.stop();
    }
}

/// An open front door (closed when dropped).
pub struct FrontDoor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl FrontDoor {
    /// Listens on `path` (made private to this user) for `backend`; `idle`: stop the server
    /// after this long unused (`None`: never).
    pub fn open(path: PathBuf, backend: Arc<dyn Backend>, idle: Option<Duration>) -> std::io::Result<FrontDoor> {
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let shared = Arc::new(Shared {
            backend,
            conns: Mutex::new(Vec::new()),
            since: Instant::now(),
            last_used: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("past-door".into()).spawn(move || serve(&s, &listener, idle))?;
        Ok(FrontDoor { shared, thread: Some(thread), path })
    }
}

impl Drop for FrontDoor {
    /// Stops accepting and cuts every connection (the caller stops the server).
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap_or_else(|p| p.into_inner()));
        self.shared.cut(&conns);
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(shared: &Arc<Shared>, listener: &UnixListener, idle: Option<Duration>) {
    while !shared.closed.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(TICK.as_millis() as u16)).unwrap_or(0);
        if ready > 0 {
            match listener.accept() {
                Ok((client, _)) => {
                    shared.touch();
                    admit(shared, client);
                }
                // (Out of descriptors, say: not a busy loop.)
                Err(_) => std::thread::sleep(TICK),
            }
        }
        if let Some(idle) = idle {
            shared.stop_if_idle(idle);
        }
    }
}

/// Connects `client` to the server, starting it if need be; a client that cannot be served
/// gets a FATAL error message, as a postmaster would send.
fn admit(shared: &Arc<Shared>, mut client: UnixStream) {
    let server = shared.backend.ensure_running().and_then(|socket| {
        UnixStream::connect(&socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))
    });
    let server = match server {
        Ok(s) => s,
        Err(why) => {
            let message = format!("{} is not available: {why}", shared.backend.name());
            eprintln!("neon-sidecar: {message}");
            let _ = client.write_all(&fatal("08006", &message));
            return;
        }
    };
    let (Ok(client_r), Ok(server_r)) = (client.try_clone(), server.try_clone()) else { return };
    let conn = Arc::new(Conn { client, state: Mutex::new(ConnState::default()), done: AtomicBool::new(false) });
    {
        let mut conns = shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.done.load(Ordering::Relaxed));
        conns.push(conn.clone());
    }
    let server_w = server.try_clone();
    let (s1, c1) = (shared.clone(), conn.clone());
    let upstream =
        std::thread::Builder::new().name("past-up".into()).spawn(move || to_server(&s1, &c1, client_r, server));
    let (s2, c2) = (shared.clone(), conn.clone());
    let downstream = std::thread::Builder::new().name("past-down".into()).spawn(move || to_client(&s2, &c2, server_r));
    if upstream.is_err() || downstream.is_err() {
        shared.cut(&[conn]);
        if let Ok(s) = server_w {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The client's bytes to the server: the connection is busy from the first.
fn to_server(shared: &Shared, conn: &Conn, mut client: UnixStream, mut server: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut st = conn.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.closing {
                break;
            }
            st.quiet = false;
            shared.touch();
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(std::net::Shutdown::Both);
    let _ = conn.client.shutdown(std::net::Shutdown::Both);
    conn.done.store(true, Ordering::Relaxed);
}

/// The server's bytes to the client, written under the connection's lock (a connection
/// being written to is not idle); quiet once they end with `ReadyForQuery`, idle.
fn to_client(shared: &Shared, conn: &Conn, mut server: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    let mut tail = [0u8; 6];
    loop {
        let n = match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let got = &buf[..n];
        // The last six bytes passed so far, across reads.
        if n >= 6 {
            tail.copy_from_slice(&got[n - 6..]);
        } else {
            tail.rotate_left(n);
            tail[6 - n..].copy_from_slice(got);
        }
        let mut st = conn.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closing {
            break;
        }
        st.quiet = tail == READY_IDLE;
        shared.touch();
        if (&conn.client).write_all(got).is_err() {
            break;
        }
    }
    let _ = conn.client.shutdown(std::net::Shutdown::Both);
    conn.done.store(true, Ordering::Relaxed);
}

/// A protocol-3 `ErrorResponse`, severity FATAL.
fn fatal(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = vec![b'E'];
    msg.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    msg.extend_from_slice(&body);
    msg
}

#[cfg(test)]
mod tests {
    #[test]
    fn fatal_is_framed() {
        let m = super::fatal("08006", "gone");
        assert_eq!(m[0], b'E');
        assert_eq!(u32::from_be_bytes(m[1..5].try_into().unwrap()) as usize, m.len() - 1);
        assert!(m.ends_with(b"Mgone\0\0"));
    }
}
