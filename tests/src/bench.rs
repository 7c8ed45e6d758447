//! What the `bench/` programs share: their `--name value` flags, each with a default; what a
//! copy of a pgbench database at an LSN must hold; restore + replay, the anchor they compete with.

use crate::Cluster;
use anyhow::{Context, Result};
use neon_types::Lsn;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The program's `--name value` flags: every name in `defaults` (with its default unless
/// given); anything else is an error that shows `usage`.
pub struct Flags(HashMap<String, String>);

impl Flags {
    pub fn parse(usage: &str, defaults: &[(&str, &str)]) -> Result<Flags> {
        let mut values: HashMap<String, String> =
            defaults.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let name = flag.strip_prefix("--").filter(|n| values.contains_key(*n));
            let Some(name) = name else { anyhow::bail!("usage: {usage}") };
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            values.insert(name.to_string(), value);
        }
        Ok(Flags(values))
    }

    /// The value of `--name`, parsed.
    pub fn get<T: std::str::FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = self.0.get(name).with_context(|| format!("no flag --{name}"))?;
        v.parse().with_context(|| format!("--{name} {v}"))
    }
}

/// What a copy of the database at L must hold: pgbench_history's rows (one per transaction)
/// and the sum of the accounts' balances.
pub const AT_L: &str =
    "SELECT (SELECT count(*) FROM pgbench_history) || ' ' || (SELECT sum(abalance) FROM pgbench_accounts)";

/// [`AT_L`] on `db`, as "rows sum".
pub fn state(db: &mut postgres::Client) -> Result<String> {
    Ok(db.query_one(AT_L, &[])?.get(0))
}

pub fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

/// (c): the start backup copied, the archive replayed to `target` and the copy promoted, until
/// it accepts connections. `pg_ctl -w` cannot say when that is: it returns once recovery has
/// started (`hot_standby = off`) or once the copy is consistent (`on`), long before `target`,
/// so the copy is polled until a connection works and it is out of recovery. Returns the time
/// that took and [`AT_L`] read from the copy afterwards.
pub fn restore_and_replay(c: &Cluster, base: &Path, archive: &Path, target: Lsn) -> Result<(Duration, String)> {
    let dir = c.root_dir().join("restored");
    let t = Instant::now();
    let ok = std::process::Command::new("cp").arg("-a").arg(base).arg(&dir).status()?;
    anyhow::ensure!(ok.success(), "copying the base backup");
    // No hot standby: until it is promoted, the copy turns connections away at once.
    let conf = format!(
        "restore_command = 'cp {}/%f %p'\nrecovery_target_lsn = '{target}'\nrecovery_target_action = 'promote'\n\
         listen_addresses = ''\nport = 5433\nunix_socket_directories = '{}'\nhot_standby = off\n",
        archive.display(),
        dir.display()
    );
    std::fs::write(dir.join("postgresql.auto.conf"), conf)?;
    std::fs::write(dir.join("recovery.signal"), "")?;
    crate::chown_to_server_user(&dir)?;
    let mut start = std::process::Command::new(c.server_tool("pg_ctl").get_program());
    start.arg("-D").arg(&dir).args(["-w", "-t", "3600", "-l"]).arg(dir.join("log")).arg("start");
    crate::run_as_server_user(&mut start);
    let out = start.output()?;
    anyhow::ensure!(out.status.success(), "restore: {}", String::from_utf8_lossy(&out.stderr));
    let conn = format!("host={} port=5433 user={} dbname=postgres", dir.display(), crate::SUPERUSER);
    let postmaster: i32 = std::fs::read_to_string(dir.join("postmaster.pid"))?
        .lines()
        .next()
        .context("empty postmaster.pid")?
        .trim()
        .parse()?;
    let promoted = loop {
        let ready = postgres::Client::connect(&conn, postgres::NoTls).ok().and_then(|mut db| {
            let in_recovery: bool = db.query_one("SELECT pg_is_in_recovery()", &[]).ok()?.get(0);
            (!in_recovery).then_some(db)
        });
        if let Some(db) = ready {
            break Ok((t.elapsed(), db));
        }
        if !crate::process_alive(postmaster) || t.elapsed() > Duration::from_secs(3600) {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            break Err(anyhow::anyhow!("the restored copy never came up:\n{}", crate::tail_lines(&log, 20)));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let held = promoted.and_then(|(elapsed, mut db)| Ok((elapsed, state(&mut db)?)));
    let mut stop = std::process::Command::new(c.server_tool("pg_ctl").get_program());
    stop.arg("-D").arg(&dir).args(["-m", "immediate", "stop"]);
    crate::run_as_server_user(&mut stop);
    stop.output()?;
    held.context("the restored copy")
}

/// A copy of `c`'s `pg_wal` files in `<root>/archive` (given to the server's OS user), as an
/// archive that `restore_command` reads from; its path.
pub fn archive_wal(c: &Cluster) -> Result<std::path::PathBuf> {
    let archive = c.root_dir().join("archive");
    std::fs::create_dir_all(&archive)?;
    for e in std::fs::read_dir(c.wal_dir())? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), archive.join(e.file_name()))?;
        }
    }
    crate::chown_to_server_user(&archive)?;
    Ok(archive)
}

/// `bench_calls(q, n)`: runs `q` (`$1` = the call's number) `n` times in one backend, each
/// timed with `clock_timestamp()`: microseconds per call, without the client's round trip.
pub const CALL_TIMER: &str = r#"
CREATE FUNCTION bench_calls(q text, n int) RETURNS float8[] LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; out float8[] := '{}';
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        t0 := clock_timestamp();
        EXECUTE q USING i;
        out := out || extract(epoch FROM clock_timestamp() - t0) * 1e6;
    END LOOP;
    RETURN out;
END $$;
"#;

/// p50 and p99 (µs) of the calls `q` makes (`$1` = the call's number), on `db` (which has
/// [`CALL_TIMER`]).
pub fn call_percentiles(db: &mut postgres::Client, q: &str, n: u32) -> Result<(f64, f64)> {
    let sql = format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d) \
         FROM unnest(bench_calls($q${q}$q$, {n})) d"
    );
    let row = db.query_one(sql.as_str(), &[])?;
    Ok((row.get(0), row.get(1)))
}
