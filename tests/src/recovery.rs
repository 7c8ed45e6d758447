//! PostgreSQL's own point-in-time recovery as an oracle: a base backup copied, the WAL archive
//! replayed with `recovery_target_time` (and `recovery_target_inclusive`), and where the
//! server says it stopped — read from its log (xlogrecovery.c's "recovery stopping before
//! commit|abort of transaction X, time T", or "recovery ended before configured recovery
//! target was reached" when the WAL ran out first) — so a test compares our answer with
//! what PostgreSQL did, never with what we think it does.

use crate::Cluster;
use anyhow::{Context, Result};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Where a recovery to a time ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryEnd {
    /// Before the commit (or abort) record of transaction `xid`, whose time the log gives.
    Before { xid: u32, commit: bool, time: String },
    /// The archive's WAL ended first.
    WalEnded,
}

/// Replays `archive` onto a copy of `base` (a `pg_basebackup -X none` of `c`) with
/// `recovery_target_time = target` and `recovery_target_action = shutdown`; `n` makes the
/// copy's directory unique. The copy is removed afterwards.
pub fn recover_to_time(
    c: &Cluster,
    base: &Path,
    archive: &Path,
    target: &str,
    inclusive: bool,
    n: usize,
) -> Result<RecoveryEnd> {
    let dir = c.root_dir().join(format!("pitr-{n}"));
    let ok = std::process::Command::new("cp").arg("-a").arg(base).arg(&dir).status()?;
    anyhow::ensure!(ok.success(), "copying the base backup");
    let conf = format!(
        "restore_command = 'cp {}/%f %p'\nrecovery_target_time = '{target}'\nrecovery_target_inclusive = {}\n\
         recovery_target_action = 'shutdown'\nlisten_addresses = ''\nport = 5499\nunix_socket_directories = '{}'\n\
         hot_standby = off\nlogging_collector = off\narchive_mode = off\n",
        archive.display(),
        if inclusive { "on" } else { "off" },
        dir.display()
    );
    std::fs::write(dir.join("postgresql.auto.conf"), conf)?;
    std::fs::write(dir.join("recovery.signal"), "")?;
    let _ = std::fs::remove_file(dir.join("postmaster.pid"));
    crate::chown_to_server_user(&dir)?;
    let log_path = dir.join("recovery.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = std::process::Command::new(crate::pg_bin("postgres"));
    cmd.arg("-D").arg(&dir).stdout(Stdio::null()).stderr(log);
    crate::run_as_server_user(&mut cmd);
    let mut child = cmd.spawn().context("starting the recovering copy")?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("recovery to {target} did not end within 180 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(&log_path)?;
    let _ = std::fs::remove_dir_all(&dir);
    parse_end(&text)
        .with_context(|| format!("recovery to {target}: no stop in its log:\n{}", crate::tail_lines(&text, 30)))
}

/// The stop a recovering server's log reports.
fn parse_end(log: &str) -> Option<RecoveryEnd> {
    let re =
        regex::Regex::new(r"recovery stopping before (commit|abort) of transaction (\d+), time (.+)$").expect("regex");
    for line in log.lines() {
        if let Some(m) = re.captures(line) {
            return Some(RecoveryEnd::Before {
                xid: m[2].parse().ok()?,
                commit: &m[1] == "commit",
                time: m[3].trim().to_string(),
            });
        }
        if line.contains("recovery ended before configured recovery target was reached") {
            return Some(RecoveryEnd::WalEnded);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_xlogrecovery_logs() {
        let log = "2026-12-03 20:00:01.5 UTC [9] LOG:  starting point-in-time recovery to 2026-12-03 20:00:00+00\n\
                   2026-12-03 20:00:01.6 UTC [9] LOG:  recovery stopping before abort of transaction 741, time 2026-12-03 19:59:59.123456+00\n";
        assert_eq!(
            parse_end(log),
            Some(RecoveryEnd::Before { xid: 741, commit: false, time: "2026-12-03 19:59:59.123456+00".into() })
        );
        assert_eq!(
            parse_end("FATAL:  recovery ended before configured recovery target was reached"),
            Some(RecoveryEnd::WalEnded)
        );
        assert_eq!(parse_end("LOG:  redo done at 0/3000060"), None);
    }
}
