//! Base backups at a past LSN, booted by stock PostgreSQL 15: the sidecar follows a compute
//! born under `neon-sidecar init`; at an LSN the test records `pg_dump` of every database
//! (the workload quiet, so the dump is the database at that LSN) with a prepared transaction
//! open; the compute goes on changing; then `neon-sidecar basebackup --lsn` writes a tar that
//! a fresh server starts from without replay, whose `pg_dump`s equal the recorded ones, which
//! `pg_amcheck --heapallindexed` passes, whose prepared transaction can be committed, where a
//! transaction open at the LSN reads as aborted and an unlogged table is empty, and which
//! takes new writes and survives `kill -9`. With data checksums, `pg_checksums --check` passes
//! on the stopped copy.

use anyhow::Result;
use neon_tests::sidecar::{boot_basebackup, cluster_born_with_store_and, SidecarProcess};
use neon_tests::workload::{self, dump};

#[test]
fn a_past_lsn_boots_and_equals_its_dumps() -> Result<()> {
    past_lsn_boots(false)
}

#[test]
fn with_data_checksums_every_page_verifies() -> Result<()> {
    past_lsn_boots(true)
}

fn past_lsn_boots(checksums: bool) -> Result<()> {
    let (c, store) = cluster_born_with_store_and(if checksums { &["--data-checksums"] } else { &[] })?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    c.execute("CREATE DATABASE other")?;
    c.connect("other")?.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, repeat('x', g % 300) FROM generate_series(1, 5000) g;
         CREATE INDEX ON t USING hash (v);",
    )?;
    c.execute("CREATE UNLOGGED TABLE scratch AS SELECT g FROM generate_series(1, 1000) g")?;
    c.execute("CREATE TABLE prepared_target AS SELECT g FROM generate_series(1, 10) g")?;
    c.execute("BEGIN; INSERT INTO prepared_target VALUES (-1); PREPARE TRANSACTION 'kept';")?;
    // A transaction open across the LSN, committed afterwards: the copy must not have it.
    let mut open = c.connect("postgres")?;
    open.batch_execute("BEGIN; INSERT INTO prepared_target VALUES (-2)")?;
    let at = workload::flush_lsn(&c)?;
    let dumps: Vec<(&str, String)> =
        ["postgres", "other"].into_iter().map(|db| Ok((db, dump(&c, db)?))).collect::<Result<_>>()?;

    // The compute goes on.
    open.batch_execute("COMMIT")?;
    c.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "200"])?;
    c.execute("DROP TABLE pgbench_history")?;
    c.execute("CREATE TABLE later AS SELECT 1 AS x")?;
    c.execute("COMMIT PREPARED 'kept'")?;
    sidecar.wait_durable(workload::flush_lsn(&c)?)?;

    let tar = c.root_dir().join("base.tar");
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["basebackup", "--store", store.to_str().unwrap(), "--lsn", &at.to_string(), "--out"])
        .arg(&tar)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("basebackup: {text}");
    anyhow::ensure!(out.status.success(), "basebackup failed: {text}");

    let mut b = boot_basebackup(&tar)?;
    let log = b.log_contents();
    assert!(log.contains("database system was shut down at") && !log.contains("redo starts"), "{log}");
    for (db, recorded) in &dumps {
        let now = dump(&b, db)?;
        if now != *recorded {
            let (x, y) =
                (c.root_dir().join(format!("{db}.recorded.sql")), c.root_dir().join(format!("{db}.booted.sql")));
            std::fs::write(&x, recorded)?;
            std::fs::write(&y, &now)?;
            let diff = std::process::Command::new("diff").arg(&x).arg(&y).output()?;
            let diff = String::from_utf8_lossy(&diff.stdout);
            panic!("pg_dump of {db} differs from the one recorded at {at}:\n{}", &diff[..diff.len().min(3000)]);
        }
    }
    let checked = b.run_tool(
        "pg_amcheck",
        &["--all", "--heapallindexed", "--install-missing", "--progress", "--maintenance-db", &b.conn_str("postgres")],
    )?;
    eprintln!("pg_amcheck: {checked}");
    b.execute("COMMIT PREPARED 'kept'")?;
    assert_eq!(b.query_one_string("SELECT count(*) FROM prepared_target")?, "11");
    assert_eq!(b.query_one_string("SELECT count(*) FROM scratch")?, "0");
    assert_eq!(b.query_one_string("SELECT count(*) FROM prepared_target WHERE g = -2")?, "0");
    // The copy lives on: new writes, a crash, recovery.
    b.execute("CREATE TABLE after_boot AS SELECT g FROM generate_series(1, 1000) g")?;
    b.pgbench(&["-n", "-t", "50"])?;
    b.kill9()?;
    b.start_again()?;
    assert_eq!(b.query_one_string("SELECT count(*) FROM after_boot")?, "1000");
    // On a new timeline: boots the same, on timeline 2.
    let tar2 = c.root_dir().join("base-tli.tar");
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["basebackup", "--store", store.to_str().unwrap(), "--lsn", &at.to_string(), "--new-timeline", "--out"])
        .arg(&tar2)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = boot_basebackup(&tar2)?;
    assert_eq!(t.query_one_string("SELECT timeline_id FROM pg_control_checkpoint()")?, "2");
    assert_eq!(dump(&t, "other")?, dumps[1].1);
    drop(t);
    if checksums {
        assert_eq!(b.query_one_string("SHOW data_checksums")?, "on");
        b.stop()?;
        let checked = b.run_server_tool("pg_checksums", &["--check", "-D", b.data_dir().to_str().unwrap()])?;
        eprintln!("pg_checksums: {checked}");
        assert!(checked.contains("Bad checksums:  0"), "{checked}");
    }
    sidecar.stop()
}

#[test]
fn the_shared_directory_caches_evicts_and_refuses_bad_input() -> Result<()> {
    use neon_types::protocol::{ErrorCode, Request, Response};
    use neon_types::Lsn;
    let (c, store) = neon_tests::sidecar::cluster_born_with_store()?;
    let shared = c.root_dir().join("shared");
    let sidecar =
        SidecarProcess::start_with(&c, &store, &["--shared-dir", shared.to_str().unwrap(), "--shared-limit-mb", "1"])?;
    let (origin, _) = sidecar.history()?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    let first = workload::flush_lsn(&c)?;
    c.execute("CREATE TABLE t AS SELECT 1 AS x")?;
    let second = workload::flush_lsn(&c)?;
    let ask = |lsn: Lsn, wait_ms: u32| {
        sidecar.client().and_then(|mut cl| {
            Ok(cl.request(&Request::Basebackup { lsn, full: true, new_timeline: false, wait_ms })?)
        })
    };
    let made = |r: Response| match r {
        Response::Basebackup { path, micros, bytes, .. } => (std::path::PathBuf::from(path), micros, bytes),
        r => panic!("expected a base backup, got {r:?}"),
    };
    let (path1, micros, bytes) = made(ask(first, 30_000)?);
    assert!(micros > 0 && bytes > 10 << 20 && path1.starts_with(shared.join("basebackups")));
    assert_eq!(std::fs::metadata(&path1)?.len(), bytes);
    // Asked again: the same file, not rebuilt.
    let (again, micros, _) = made(ask(first, 0)?);
    assert_eq!((again.as_path(), micros), (path1.as_path(), 0));
    // A second LSN: the limit (1 MB) evicts the older one, never the new one.
    let (path2, _, _) = made(ask(second, 30_000)?);
    assert!(path2.exists() && !path1.exists());
    // Without relation pages: everything but the relation files, for a compute that fetches
    // pages itself.
    let nonrel = c.root_dir().join("nonrel.tar");
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["basebackup", "--store", store.to_str().unwrap(), "--lsn", &first.to_string(), "--no-relation-pages"])
        .arg("--out")
        .arg(&nonrel)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listing = std::process::Command::new("tar").arg("-tf").arg(&nonrel).output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    let names: Vec<&str> = listing.lines().collect();
    for needed in
        ["global/pg_control", "global/pg_filenode.map", "base/5/PG_VERSION", "base/5/pg_filenode.map", "pg_xact/0000"]
    {
        assert!(names.contains(&needed), "{needed} missing from {names:?}");
    }
    let relation_file =
        |n: &&str| n.rsplit('/').next().is_some_and(|f| f.chars().next().is_some_and(|c| c.is_ascii_digit()));
    assert!(
        !names.iter().any(|n| (n.starts_with("base/") || n.starts_with("global/")) && relation_file(n)),
        "{names:?}"
    );

    // Bad input: clear errors, nothing partial left behind, the sidecar goes on.
    match ask(Lsn(origin.0 - 8), 0)? {
        Response::Error { code: ErrorCode::OutOfHistory, message } => {
            assert!(message.contains(&origin.to_string()), "{message}")
        }
        r => panic!("before history: {r:?}"),
    }
    match ask(Lsn(second.0 + (1 << 30)), 300)? {
        Response::Error { code: ErrorCode::NotYet, .. } => {}
        r => panic!("in the future: {r:?}"),
    }
    let leftovers: Vec<_> = std::fs::read_dir(shared.join("basebackups"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec![path2.file_name().unwrap().to_string_lossy().into_owned()]);

    // A full disk: the output on a 2 MB tmpfs. A clear error, no partial tar.
    let small = neon_tests::mount::Tmpfs::mount(&c.root_dir().join("small-disk"), 2)?;
    let out = std::process::Command::new(neon_tests::sidecar_bin()?)
        .args(["basebackup", "--store", store.to_str().unwrap(), "--lsn", &first.to_string(), "--out"])
        .arg(small.path().join("full.tar"))
        .output()?;
    let left: Vec<_> = std::fs::read_dir(small.path())?.flatten().map(|e| e.file_name()).collect();
    drop(small);
    let text = String::from_utf8_lossy(&out.stderr);
    eprintln!("full disk: {text}");
    assert!(!out.status.success() && text.contains("No space left on device"), "{text}");
    assert_eq!(text.matches("os error 28").count(), 1, "the cause said once: {text}");
    assert!(left.is_empty(), "left behind on the full disk: {left:?}");
    assert!(matches!(ask(second, 0)?, Response::Basebackup { .. }));
    sidecar.stop()
}

/// Cancel means stop: a build whose caller went away (a cancelled query closes its connection)
/// stops within a second and leaves nothing behind — unless another caller waits for the same
/// backup, who then gets it; backups of different LSNs build at once.
#[test]
fn a_build_nobody_waits_for_stops_and_builds_run_at_once() -> Result<()> {
    use neon_types::protocol::{Request, Response};
    use neon_types::Lsn;
    use std::time::{Duration, Instant};
    let (c, store) = neon_tests::sidecar::cluster_born_with_store()?;
    let shared = c.root_dir().join("shared");
    let args = ["--shared-dir", shared.to_str().unwrap(), "--progress-ms", "20", "--basebackups-at-once", "2"];
    let sidecar = SidecarProcess::start_with(&c, &store, &args)?;
    c.pgbench(&["-i", "-q", "-s", "10"])?;
    let lsns: Vec<Lsn> = (0..3)
        .map(|i| {
            c.execute(&format!("CREATE TABLE t{i} AS SELECT 1 AS x"))?;
            workload::flush_lsn(&c)
        })
        .collect::<Result<_>>()?;
    sidecar.wait_durable(lsns[2])?;
    let files = || -> Result<Vec<String>> {
        Ok(std::fs::read_dir(shared.join("basebackups"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    };
    // Asks for a backup; returns the connection once the build reports progress.
    let start = |lsn: Lsn| -> Result<std::os::unix::net::UnixStream> {
        let mut conn = std::os::unix::net::UnixStream::connect(sidecar.socket())?;
        Request::Basebackup { lsn, full: true, new_timeline: false, wait_ms: 10_000 }.write_to(&mut conn)?;
        match Response::read_from(&mut conn)? {
            Response::Progress { .. } => Ok(conn),
            r => anyhow::bail!("expected progress first, got {r:?}"),
        }
    };
    let wait_idle = |within: Duration| -> Result<Duration> {
        let t = Instant::now();
        while sidecar.status("basebackups_building")? != "0" {
            anyhow::ensure!(t.elapsed() < within, "the build still runs after {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(t.elapsed())
    };

    // Alone, and gone: the build stops, nothing is left.
    drop(start(lsns[0])?);
    let took = wait_idle(Duration::from_secs(1))?;
    eprintln!("a build nobody waits for stopped {took:?} after its caller left");
    assert_eq!(files()?, Vec::<String>::new(), "left behind by a cancelled build");

    // Two callers of one backup: the first gone, the second gets it.
    let first = start(lsns[1])?;
    let second = std::thread::spawn({
        let (socket, lsn) = (sidecar.socket().to_path_buf(), lsns[1]);
        move || -> Result<Response> {
            let mut cl = sidecar::service::Client::connect(&socket)?;
            Ok(cl.request(&Request::Basebackup { lsn, full: true, new_timeline: false, wait_ms: 10_000 })?)
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    drop(first);
    match second.join().expect("second caller")? {
        Response::Basebackup { path, bytes, .. } => {
            assert_eq!(std::fs::metadata(&path)?.len(), bytes, "{path}");
        }
        r => panic!("the caller still waiting got {r:?}"),
    }

    // Two LSNs at once: both run together.
    let a = start(lsns[0])?;
    let b = start(lsns[2])?;
    assert_eq!(sidecar.status("basebackups_running")?, "2");
    drop((a, b));
    wait_idle(Duration::from_secs(1))?;
    sidecar.stop()
}

/// A base backup at an LSN in the last bytes of a WAL segment: its checkpoint record runs past
/// the segment's end, so the backup carries the next segment too (the record goes on there
/// under a long page header), and PostgreSQL starts from it without replay.
#[test]
fn a_checkpoint_record_crossing_into_the_next_segment_boots() -> Result<()> {
    let (c, store) = cluster_born_with_store_and(&[])?;
    let sidecar = SidecarProcess::start(&c, &store)?;
    c.execute("CREATE TABLE kept AS SELECT g FROM generate_series(1, 1000) g")?;
    c.execute("SELECT pg_switch_wal()")?;
    c.execute("CREATE TABLE later AS SELECT 1 AS x")?;
    let end = workload::flush_lsn(&c)?;
    sidecar.wait_durable(end)?;
    let seg = 16u64 << 20;
    // 48 bytes before the segment the switch began: the 114-byte record does not fit.
    let at = neon_types::Lsn(end.0 / seg * seg - 48);
    let tar = c.root_dir().join("base.tar");
    neon_tests::sidecar::basebackup_from_store(&store, at, &tar, &[])?;
    let b = boot_basebackup(&tar)?;
    let log = b.log_contents();
    anyhow::ensure!(log.contains("database system was shut down at") && !log.contains("redo starts"), "{log}");
    anyhow::ensure!(b.query_one_string("SELECT count(*) FROM kept")? == "1000", "kept, as of {at}");
    anyhow::ensure!(b.query_one_string("SELECT to_regclass('later') IS NULL")? == "t", "later is after {at}");
    drop(b);
    sidecar.stop()?;
    Ok(())
}
