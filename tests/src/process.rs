//! Running child processes and watching them: [`run_command`] runs a command
//! to completion and turns a failure into an error that shows its output;
//! [`process_alive`], [`wait_process_gone`] and the crate-internal
//! `children_of` read `/proc` so [`crate::Cluster`] can tell when a server and
//! its children are really gone. Processes are only ever addressed by pid.

use std::fmt::Write as _;
use std::fs;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Lines of server log (or of a failed command's stdout) included in error
/// messages.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// Removes all `PG*` variables (PGDATA, PGHOST, PGOPTIONS, PGSERVICE, ...)
/// inherited from the environment, so the developer's settings cannot leak
/// into a test.
pub fn clear_pg_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `cmd` to completion (stdin closed unless configured otherwise) and
/// returns its stdout as (lossy) UTF-8. Fails when it cannot be started or
/// exits non-zero; the error contains the command line, exit status, stderr
/// and stdout.
pub fn run_command(cmd: &mut Command) -> Result<String> {
    let out = output_of(cmd)?;
    if !out.status.success() {
        bail!("{}", describe_failure(cmd, &out));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn output_of(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("could not run {}", command_line(cmd)))
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub(crate) fn describe_failure(cmd: &Command, out: &Output) -> String {
    let mut msg = format!("`{}` failed ({})", command_line(cmd), out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stderr.trim().is_empty() {
        let _ = write!(msg, "\n--- stderr ---\n{}", stderr.trim_end());
    }
    if !stdout.trim().is_empty() {
        let _ = write!(msg, "\n--- stdout (tail) ---\n{}", tail_lines(&stdout, LOG_TAIL_LINES));
    }
    msg
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether process `pid` exists and is not a zombie. (The postmaster is
/// reparented to init once `pg_ctl` exits; if init does not reap promptly a
/// dead postmaster lingers as a zombie, for which `kill(pid, 0)` still
/// succeeds — so this looks at `/proc/<pid>/stat` instead.)
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => match stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) {
            Some("Z") | Some("X") | Some("x") => false,
            Some(_) => true,
            // Unparseable: fall back to kill(pid, 0).
            None => kill(Pid::from_raw(pid), None).is_ok(),
        },
    }
}

/// Waits up to `timeout` for `pid` to be gone (or a zombie); true if it is.
pub fn wait_process_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !process_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pids of the live children of `pid` (from `/proc/*/stat`).
pub(crate) fn children_of(pid: i32) -> Vec<i32> {
    let mut kids = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return kids;
    };
    for entry in dir.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next();
        let ppid = fields.next().and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) && !matches!(state, Some("Z") | Some("X")) {
            kids.push(child);
        }
    }
    kids
}
