//! A past server's postmaster: started with the settings that make a copy of the compute's
//! data directory a private, read-only server (its socket in `server/` of the past server's
//! directory, `trust` there alone), waited for until it accepts connections, and stopped; and
//! one that a killed sidecar left running, found by its recorded pid and stopped, so a
//! restarted sidecar never has two servers on one data directory.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The port of the postmaster's own socket (its directory tells past servers apart).
pub const PORT: u16 = 5432;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// The postmaster's pid while it runs, beside its log.
const PID_FILE: &str = "pid";

/// Where one past server lives: `dir` is private to the sidecar's OS user.
#[derive(Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub datadir: PathBuf,
}

impl Layout {
    /// The postmaster's own socket directory (the sidecar's front door is `dir` itself).
    pub fn server_sockets(&self) -> PathBuf {
        self.dir.join("server")
    }

    /// The socket the compute connects to: the sidecar's (host = `dir`, port [`PORT`]).
    pub fn front_door(&self) -> PathBuf {
        self.dir.join(format!(".s.PGSQL.{PORT}"))
    }

    /// The postmaster's own socket.
    pub fn socket(&self) -> PathBuf {
        self.server_sockets().join(format!(".s.PGSQL.{PORT}"))
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn hba(&self) -> PathBuf {
        self.dir.join("pg_hba.conf")
    }
}

/// The last lines of the server's log, for an error.
pub fn log_tail(layout: &Layout) -> String {
    let text = std::fs::read_to_string(layout.log()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Whether the postmaster of `layout` says it accepts connections (postmaster.pid's status
/// line, as `pg_ctl -w` reads it) and its socket is there.
fn ready(layout: &Layout) -> bool {
    std::fs::read_to_string(layout.datadir.join("postmaster.pid"))
        .is_ok_and(|t| t.lines().nth(7).is_some_and(|s| s.trim() == "ready"))
        && layout.socket().exists()
}

/// Starts a postmaster on `layout` and waits until it accepts connections; on failure, why
/// (it is stopped then).
pub fn start(pg_bin_dir: &Path, layout: &Layout) -> Result<Child, String> {
    let sockets = layout.server_sockets();
    crate::repo::timeline::private_dir(&sockets).map_err(|e| format!("making {}: {e}", sockets.display()))?;
    // Appended to: the log of every start is kept (each start says so itself).
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        // Private like everything here: the log may quote the past's rows.
        .mode(0o600)
        .open(layout.log())
        .map_err(|e| format!("opening {}: {e}", layout.log().display()))?;
    clear_dead_lock_files(layout);
    let mut cmd = Command::new(pg_bin_dir.join("postgres"));
    cmd.arg("-D").arg(&layout.datadir);
    for (k, v) in [
        ("listen_addresses", String::new()),
        ("port", PORT.to_string()),
        ("unix_socket_directories", sockets.display().to_string()),
        ("unix_socket_permissions", "0700".into()),
        ("hba_file", layout.hba().display().to_string()),
        ("default_transaction_read_only", "on".into()),
        ("shared_preload_libraries", String::new()),
        ("logging_collector", "off".into()),
        ("archive_mode", "off".into()),
        ("max_wal_senders", "0".into()),
        ("max_replication_slots", "0".into()),
        // A copy to read from, not the compute: its memory and preloads are not wanted.
        ("shared_buffers", "32MB".into()),
        ("max_connections", "20".into()),
        ("session_preload_libraries", String::new()),
        ("local_preload_libraries", String::new()),
    ] {
        cmd.arg("-c").arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", pg_bin_dir.join("postgres").display()))?;
    let pid_file = layout.dir.join(PID_FILE);
    if let Err(e) = std::fs::write(&pid_file, child.id().to_string()) {
        stop(&mut child, layout);
        return Err(format!("writing {}: {e}", pid_file.display()));
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready(layout) {
            return Ok(child);
        }
        let why = match child.try_wait() {
            Ok(Some(status)) => Some(format!("postgres exited ({status})")),
            _ if Instant::now() > deadline => Some(format!("not ready after {START_TIMEOUT:?}")),
            _ => None,
        };
        if let Some(why) = why {
            stop(&mut child, layout);
            return Err(why);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` has finished exiting: gone, or a zombie (no parent reaps it here).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()).is_some_and(|s| s == "Z" || s == "X")
        }
    }
}

/// Whether process `pid` is a live postgres on `datadir` (a zombie's command line is empty;
/// a pid reused by another process has another one).
fn postmaster_of(pid: i32, datadir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.windows(2).any(|w| w[0] == b"-D" && w[1] == datadir.as_os_str().as_encoded_bytes())
    })
}

/// Removes the lock files (`postmaster.pid`, the socket's `.lock`) of a postmaster on
/// `layout` that is gone — killed, or a zombie nobody reaps (its parent, a killed sidecar, is
/// gone too, and not every init reaps), or whose pid is now another process's: PostgreSQL
/// takes a pid that exists for a postmaster that runs, and refuses to start.
fn clear_dead_lock_files(layout: &Layout) {
    let socket_lock = layout.server_sockets().join(format!(".s.PGSQL.{PORT}.lock"));
    for lock in [layout.datadir.join("postmaster.pid"), socket_lock] {
        let pid = std::fs::read_to_string(&lock).ok().and_then(|t| t.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|p| *p > 0 && !postmaster_of(*p, &layout.datadir)) {
            eprintln!("neon-sidecar: removing {} of postmaster {pid}, which is gone", lock.display());
            let _ = std::fs::remove_file(&lock);
        }
    }
}

/// Asks `child` to stop (fast shutdown: SIGINT) and waits; after `STOP_TIMEOUT`, an
/// immediate shutdown (SIGQUIT, which ends its backends too), and SIGKILL as the last resort.
pub fn stop(child: &mut Child, layout: &Layout) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    'stopping: {
        for (signal, wait) in [(Signal::SIGINT, STOP_TIMEOUT), (Signal::SIGQUIT, Duration::from_secs(5))] {
            let _ = kill(pid, signal);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break 'stopping;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_file(layout.dir.join(PID_FILE));
}

/// Stops the postmaster a killed sidecar left running on `layout` (the pid it recorded, if
/// that process is still a postgres on this data directory), immediately: nothing it holds
/// is wanted, and its data directory may be a branch whose mount went with the old sidecar.
pub fn stop_orphan(layout: &Layout) {
    use nix::sys::signal::{kill, Signal};
    let pid_file = layout.dir.join(PID_FILE);
    let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|t| t.trim().parse::<i32>().ok()) else {
        return;
    };
    let ours = |pid: i32| postmaster_of(pid, &layout.datadir);
    if pid > 0 && ours(pid) {
        eprintln!(
            "neon-sidecar: stopping postmaster {pid} that a stopped sidecar left on {}",
            layout.datadir.display()
        );
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = kill(pid, Signal::SIGQUIT);
        // Until it has exited, not merely stopped being a postgres on the directory: its
        // command line is gone early in its exit, its working directory (inside the branch's
        // mount, which is then not mounted again: ENOTCONN) only later. Longer than the 5 s
        // PostgreSQL gives its children before it kills them: never orphaned inside it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !exited(pid.as_raw()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !exited(pid.as_raw()) && ours(pid.as_raw()) {
            let _ = kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !exited(pid.as_raw()) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = std::fs::remove_file(pid_file);
}
