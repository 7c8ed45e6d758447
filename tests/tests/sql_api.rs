//! The SQL API against a real compute (`neon` preloaded, its background worker running) and
//! the real sidecar, run as the server's OS user as the product arranges it:
//!
//! * the pg_regress suites in `sql/` (expected output in `expected/`): pages as they were read
//!   by pageinspect, sizes, history, status, prefetch, base backups, bad input, permissions;
//! * what pg_regress cannot do: the background worker's link (connected, reporting the flush
//!   LSN, and reconnecting by itself to a restarted sidecar), cached pages read from the shared
//!   page file without a request, the sidecar stopped, killed mid-request and restarted, a
//!   query cancelled while it waits — each an ERROR in the same backend, which goes on
//!   working, with no PANIC or backend crash in the server log.

use anyhow::{Context, Result};
use neon_tests::sidecar::{cluster_born_with_store, SidecarProcess};
use neon_tests::{pg_bin, Cluster};
use postgres::error::SqlState;
use std::path::Path;
use std::time::{Duration, Instant};

const SUITES: &[&str] =
    &["neon_setup", "neon_pages", "neon_errors", "neon_permissions", "neon_history", "neon_time_travel"];

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the repository")
}

fn status(c: &mut postgres::Client, name: &str) -> Result<String> {
    Ok(c.query_one("SELECT value FROM neon_sidecar_status() WHERE name = $1", &[&name])?.get(0))
}

/// Server log lines that would mean a backend crashed.
fn crashes(c: &Cluster) -> Vec<String> {
    c.log_contents()
        .lines()
        .filter(|l| {
            l.contains("PANIC")
                || l.contains("terminated by signal")
                || (l.contains("server process") && l.contains("exited with exit code"))
        })
        .map(str::to_string)
        .collect()
}

/// `query` (a page's md5, just read once) read again: the same page, from the shared page file
/// (a shared hit), with no GetPage request to the sidecar.
fn assert_cached_read_is_shared(db: &mut postgres::Client, query: &str, expected: &str) -> Result<()> {
    let hits: u64 = status(db, "shared_page_hits")?.parse()?;
    let requests: u64 = status(db, "get_page_requests")?.parse()?;
    let again: String = db.query_one(query, &[])?.get(0);
    assert_eq!(again, expected, "the shared page file gave another page than the sidecar");
    assert_eq!(status(db, "shared_page_hits")?.parse::<u64>()?, hits + 1, "not read from the shared page file");
    assert_eq!(status(db, "get_page_requests")?.parse::<u64>()?, requests, "the sidecar was asked");
    Ok(())
}

#[test]
fn pg_regress_suites_and_failures_of_the_sidecar() -> Result<()> {
    let (c, store) = cluster_born_with_store()?;
    // Progress of base backups every millisecond, so even this small cluster's shows.
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &["--progress-ms", "1"])?;

    // ---- pg_regress ----
    // pg_regress is a client (psql): it runs as us, reading the suites from the checkout,
    // which may be private to us.
    let out = tempfile::tempdir()?;
    // pg_regress ships with PGXS (postgresql-server-dev-15): <pgxs dir>/src/test/regress/.
    let pgxs = String::from_utf8(std::process::Command::new(pg_bin("pg_config")).arg("--pgxs").output()?.stdout)?;
    let pgxs_src = Path::new(pgxs.trim()).parent().and_then(|p| p.parent()).context("pg_config --pgxs")?;
    let mut regress = std::process::Command::new(pgxs_src.join("test/regress/pg_regress"));
    regress
        .arg(format!("--bindir={}", pg_bin("psql").parent().expect("bin dir").display()))
        .arg(format!("--inputdir={}", repo_root().display()))
        .arg(format!("--outputdir={}", out.path().display()))
        .arg(format!("--host={}", c.socket_dir().display()))
        .arg(format!("--port={}", c.port()))
        .arg(format!("--user={}", neon_tests::SUPERUSER))
        .arg("--dbname=neon_regression")
        .args(SUITES);
    let result = regress.output()?;
    let diffs = std::fs::read_to_string(out.path().join("regression.diffs")).unwrap_or_default();
    if !result.status.success() {
        // Kept for a look (and, once checked by eye, for `expected/`).
        let kept = repo_root().join("target/regress");
        let _ = std::fs::remove_dir_all(&kept);
        std::fs::create_dir_all(kept.join("results"))?;
        for e in std::fs::read_dir(out.path().join("results"))? {
            let e = e?;
            std::fs::copy(e.path(), kept.join("results").join(e.file_name()))?;
        }
        std::fs::write(kept.join("regression.diffs"), &diffs)?;
        eprintln!("pg_regress output kept in {}", kept.display());
    }
    assert!(
        result.status.success(),
        "pg_regress failed:\n{}{}\n{diffs}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );

    // ---- the background worker keeps the link and reports the flush position ----
    let mut db = c.connect("neon_regression")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&mut db, "prefetch_worker_connected")? != "true" || status(&mut db, "compute_flush_lsn")? == "0/0" {
        assert!(Instant::now() < deadline, "the prefetch worker never connected: {}", sidecar.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let sent: u64 = status(&mut db, "prefetch_sent")?.parse()?;
    assert!(sent > 0, "neon_prefetch in the suites queued pages the worker sent");

    // ---- a page the sidecar has cached comes from the shared page file: no request ----
    let lsn: String = db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])?.get(0);
    let md5 = format!("SELECT md5(neon_get_page('big', 'main', 1, '{lsn}'))");
    let asked: String = db.query_one(&md5, &[])?.get(0);
    assert_cached_read_is_shared(&mut db, &md5, &asked)?;

    // ---- a base backup reports progress as NOTICEs while it is built ----
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut config: postgres::Config = c.conn_str("neon_regression").parse()?;
    let seen = notices.clone();
    config.notice_callback(move |n| seen.lock().expect("notices").push(n.message().to_string()));
    let mut watched = config.connect(postgres::NoTls)?;
    // New WAL, so the backup is a new one (one at the suites' LSN would be reused).
    watched.batch_execute("CREATE TABLE progress AS SELECT g FROM generate_series(1, 100000) g")?;
    let lsn: String = watched.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])?.get(0);
    let bytes: i64 = watched.query_one(&format!("SELECT bytes FROM neon_basebackup('{lsn}')"), &[])?.get(0);
    let notices = notices.lock().expect("notices").clone();
    let progress: Vec<&String> = notices.iter().filter(|n| n.starts_with(&format!("base backup at {lsn}: "))).collect();
    assert!(!progress.is_empty(), "no progress NOTICE: {notices:?}");
    for n in &progress {
        // "base backup at L: D of T pages (P%), M MB written, S s", D < T, M within the tar.
        let words: Vec<&str> = n.split_whitespace().collect();
        let (done, total, mb): (u64, u64, i64) = (words[4].parse()?, words[6].parse()?, words[9].parse()?);
        assert!(done < total && mb <= bytes >> 20, "{n} (the tar has {bytes} bytes)");
    }
    drop(watched);

    // ---- a query cancelled while the sidecar waits for an LSN it does not have ----
    db.batch_execute("SET neon.request_timeout = '60s'")?;
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let canceller = c.connect("postgres")?;
    let t = Instant::now();
    let cancel = std::thread::spawn(move || {
        let mut canceller = canceller;
        std::thread::sleep(Duration::from_millis(500));
        canceller.query_one("SELECT pg_cancel_backend($1)", &[&pid]).map(|_| ())
    });
    let err = db
        .query_one("SELECT neon_get_page('big', 'main', 0, pg_current_wal_insert_lsn() + 1073741824)", &[])
        .expect_err("a wait for WAL that never comes");
    cancel.join().expect("canceller")?;
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "the cancel took {:?}", t.elapsed());
    let lsn: String = db.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])?.get(0);
    let page = format!("SELECT length(neon_get_page('big', 'main', 0, '{lsn}'))");
    assert_eq!(db.query_one(&page, &[])?.get::<_, i32>(0), 8192, "the call after a cancel works");

    // ---- the sidecar killed in the middle of a request ----
    // The worker's link as it is before: how many connections it has made, and which process
    // it is (a worker the postmaster restarted would connect anew without reconnecting).
    let worker_connects: u64 = status(&mut db, "prefetch_worker_connects")?.parse()?;
    let worker_pid = status(&mut db, "prefetch_worker_pid")?;
    assert!(worker_connects > 0, "the worker never counted its connection");
    let pid: i32 = db.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let waiting = std::thread::spawn({
        let conn = c.conn_str("neon_regression");
        move || -> Result<postgres::Error> {
            let mut db = postgres::Client::connect(&conn, postgres::NoTls)?;
            db.batch_execute("SET neon.request_timeout = '60s'")?;
            Ok(db
                .query_one("SELECT neon_get_page('big', 'main', 0, pg_current_wal_insert_lsn() + 1073741824)", &[])
                .expect_err("the sidecar dies under it"))
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    sidecar.kill9()?;
    let err = waiting.join().expect("waiter")?;
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
    let msg = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(msg.contains("closed the connection"), "{msg}");

    // ---- the sidecar stopped: a clear ERROR, the backend lives on ----
    let err = db.query_one(&page, &[]).expect_err("no sidecar");
    assert_eq!(err.code(), Some(&SqlState::CONNECTION_FAILURE), "{err}");
    let msg = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(msg.contains("could not connect to the sidecar") || msg.contains("closed the connection"), "{msg}");
    assert_eq!(db.query_one("SELECT pg_backend_pid()", &[])?.get::<_, i32>(0), pid, "same backend");

    // ---- back again: the same backend and the worker reconnect by themselves ----
    let sidecar = SidecarProcess::restart_for_compute(&c, &store, &["--progress-ms", "1"])?;
    assert_eq!(db.query_one(&page, &[])?.get::<_, i32>(0), 8192, "the call after a restart works");
    // The restarted sidecar made a new page file and retired the old: the backend reads the new.
    let asked: String = db.query_one(&md5, &[])?.get(0);
    assert_cached_read_is_shared(&mut db, &md5, &asked)?;
    // The worker reconnected: it made a new connection, it is the same process, and the new
    // sidecar heard from it — only the worker reports the compute's flush LSN, and a sidecar
    // keeps that in memory, so this one started at 0/0.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connects: u64 = status(&mut db, "prefetch_worker_connects")?.parse()?;
        let told = status(&mut db, "compute_flush_lsn")? != "0/0";
        if connects > worker_connects && told && status(&mut db, "prefetch_worker_connected")? == "true" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not reconnect ({connects} connections, {worker_connects} before the kill; flush LSN reported: {told}): {}",
            sidecar.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&mut db, "prefetch_worker_pid")?, worker_pid, "the worker was restarted, not reconnected");
    assert_eq!(crashes(&c), Vec::<String>::new(), "the server log shows a crash");
    sidecar.stop()?;
    Ok(())
}

/// `pg_ctl stop -m fast` is prompt while the background worker waits on a sidecar that does not
/// answer (stopped with SIGSTOP, so the worker's prefetch request of pages it has not got
/// hangs): pgrx's `sigterm_received()` clears the flag it reads, and a worker that checked it in
/// its queue loop never saw SIGTERM again.
#[test]
fn fast_shutdown_is_prompt_while_the_worker_waits_on_the_sidecar() -> Result<()> {
    // With RUST_BACKTRACE in the server's environment, as a developer might have it. The
    // stopped sidecar's walsender holds a shutdown up for wal_sender_timeout: 1 s, so that
    // only the prefetch worker can make it slow.
    let mut c = Cluster::builder()
        .gucs(neon_tests::workload::MIXED_GUCS)
        .guc("wal_sender_timeout", "1s")
        .server_env("RUST_BACKTRACE", "1")
        .init()?;
    let store = c.root_dir().join("store");
    neon_tests::sidecar::init_store(&c, &store)?;
    c.start_again()?;
    let sidecar = SidecarProcess::start_for_compute(&c, &store, &[])?;
    c.execute("CREATE EXTENSION neon; CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g")?;
    let mut db = c.connect("postgres")?;
    // An ERROR says what is wrong, without a Rust backtrace in its DETAIL — also one that
    // PostgreSQL raises inside a call the extension makes (opening a relation that is not).
    let err = db
        .query_one("SELECT neon_get_page(999999::oid::regclass, 'main', 0, pg_current_wal_flush_lsn())", &[])
        .expect_err("no such relation");
    let message = err.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(message.contains("999999"), "{err:?}");
    let detail = err.as_db_error().and_then(|e| e.detail()).unwrap_or_default().to_string();
    assert!(detail.is_empty(), "a DETAIL with RUST_BACKTRACE set: {detail}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&mut db, "prefetch_worker_connected")? != "true" {
        assert!(Instant::now() < deadline, "the prefetch worker never connected: {}", sidecar.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    sidecar.signal(libc::SIGSTOP)?;
    let queued: i64 = db.query_one("SELECT neon_prefetch('t', pg_current_wal_flush_lsn(), 0, 64)", &[])?.get(0);
    assert_eq!(queued, 64);
    drop(db);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let stopped = c.stop();
    let took = t.elapsed();
    sidecar.signal(libc::SIGCONT)?;
    stopped?;
    assert!(took < Duration::from_secs(5), "pg_ctl stop -m fast took {took:?}");
    eprintln!("pg_ctl stop -m fast took {took:?} with the worker waiting on a stopped sidecar");
    sidecar.stop()
}
