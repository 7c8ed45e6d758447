//! Tests of the test harness itself, against real PostgreSQL 15 servers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

use neon_tests::{process_alive, run_as_server_user, run_command, server_user, Cluster};

#[test]
fn version_is_pg15() -> anyhow::Result<()> {
    let pg = Cluster::start()?;
    let v = pg.query_one_string("select version()")?;
    assert!(v.contains("PostgreSQL 15"), "unexpected version: {v}");
    // The superuser is `postgres` whichever OS user ran initdb.
    assert_eq!(pg.query_one_string("select current_user")?, "postgres");
    // Only the unix socket in the cluster's own dir.
    assert_eq!(pg.query_one_string("show listen_addresses")?, "");
    assert!(pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port())).exists());
    assert!(pg.socket_dir().as_os_str().len() < 80);
    assert_eq!(pg.query_one_string("show max_prepared_transactions")?, "10");
    assert_eq!(pg.query_one_string("show fsync")?, "on");
    assert_eq!(pg.query_one_string("show wal_level")?, "replica");
    Ok(())
}

#[test]
fn pgbench_init_and_pg_dump() -> anyhow::Result<()> {
    let pg = Cluster::start()?;
    pg.pgbench(&["-i", "-s", "1", "-q"])?;
    assert_eq!(pg.query_one_string("select count(*) from pgbench_accounts")?, "100000");
    let dump = pg.run_tool("pg_dump", &["postgres"])?;
    assert!(dump.contains("pgbench_accounts"), "pg_dump output lacks pgbench_accounts");
    // A short benchmark run works too.
    let out = pg.pgbench(&["-t", "20", "-c", "2"])?;
    assert!(out.contains("number of transactions actually processed"), "{out}");
    // pg_amcheck (installing amcheck as needed) passes on a healthy cluster, and pg_waldump
    // reads its WAL.
    let out = pg.run_tool("pg_amcheck", &["--install-missing", "--heapallindexed", "--all", "--progress"])?;
    assert!(!out.contains("ERROR"), "{out}");
    let wal = pg.wal_dir();
    let dump = pg.run_tool("pg_waldump", &["--stats", "-p", wal.to_str().unwrap(), "000000010000000000000001"])?;
    assert!(dump.contains("Heap"), "{dump}");
    Ok(())
}

#[test]
fn data_checksums_and_gucs() -> anyhow::Result<()> {
    let pg = Cluster::builder()
        .initdb_arg("--data-checksums")
        .initdb_arg("--wal-segsize=1")
        .guc("work_mem", "7MB")
        .guc("application_name", "it's quoted")
        .start()?;
    assert_eq!(pg.query_one_string("show data_checksums")?, "on");
    assert_eq!(pg.query_one_string("show wal_segment_size")?, "1MB");
    assert_eq!(pg.query_one_string("show work_mem")?, "7MB");
    assert_eq!(pg.query_one_string("select setting from pg_settings where name = 'application_name'")?, "it's quoted");
    let control = pg.run_tool("pg_controldata", &[])?;
    assert!(control.contains("Data page checksum version:           1"), "{control}");
    Ok(())
}

#[test]
fn tcp_mode_connects_via_localhost() -> anyhow::Result<()> {
    let pg = Cluster::builder().tcp().start()?;
    let conn = pg.tcp_conn_str("postgres").expect("tcp mode");
    let mut client = postgres::Client::connect(&conn, postgres::NoTls)?;
    let row = client.query_one("select inet_server_addr()::text, inet_server_port()", &[])?;
    let addr: String = row.get(0);
    let port: i32 = row.get(1);
    assert_eq!(addr, "127.0.0.1/32");
    assert_eq!(port, i32::from(pg.port()));
    // The unix socket keeps working too.
    assert_eq!(pg.query_one_string("select 1")?, "1");
    // And a unix-only cluster has no TCP connection string.
    let unix_only = Cluster::start()?;
    assert!(unix_only.tcp_conn_str("postgres").is_none());
    Ok(())
}

#[test]
fn dropped_during_panic_is_stopped_and_removed() {
    let mut seen: Option<(i32, PathBuf)> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let pg = Cluster::start().expect("start");
        let pid = pg.postmaster_pid().expect("postmaster pid");
        assert!(process_alive(pid));
        seen = Some((pid, pg.root_dir().to_path_buf()));
        panic!("deliberate panic with a running cluster");
    }));
    assert!(result.is_err(), "closure should have panicked");
    let (pid, dir) = seen.expect("cluster was started");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_alive(pid), "postmaster {pid} still alive after drop");
    if std::env::var_os("NEON_TEST_KEEP").is_none() {
        assert!(!dir.exists(), "cluster dir {} not removed", dir.display());
    }
}

#[test]
fn stop_and_start_again_keeps_data() -> anyhow::Result<()> {
    let mut pg = Cluster::start()?;
    pg.execute("create table t(x int); insert into t select generate_series(1, 1000)")?;
    let pid = pg.postmaster_pid().unwrap();
    pg.stop()?;
    pg.stop()?; // idempotent
    assert!(!pg.is_running());
    assert!(!process_alive(pid));
    assert!(pg.postmaster_pid().is_none());
    let err = pg.execute("select 1").unwrap_err();
    assert!(format!("{err:#}").contains("connecting"), "{err:#}");
    pg.start_again()?;
    assert_eq!(pg.query_one_string("select sum(x) from t")?, "500500");
    pg.restart()?;
    assert_eq!(pg.query_one_string("select count(*) from t")?, "1000");
    assert!(pg.log_contents().contains("database system is ready to accept connections"));
    Ok(())
}

#[test]
fn crash_then_recover() -> anyhow::Result<()> {
    let mut pg = Cluster::start()?;
    pg.execute("create table t(x int); insert into t select generate_series(1, 5000)")?;
    pg.crash()?;
    assert!(!pg.is_running());
    pg.start_again()?;
    assert_eq!(pg.query_one_string("select count(*) from t")?, "5000");
    let log = pg.log_contents();
    assert!(
        log.contains("database system was interrupted") || log.contains("redo starts at"),
        "no crash recovery in the log:\n{log}"
    );
    // kill -9 of the whole process tree, too.
    pg.execute("insert into t select generate_series(1, 5000)")?;
    pg.kill9()?;
    pg.start_again()?;
    assert_eq!(pg.query_one_string("select count(*) from t")?, "10000");
    Ok(())
}

#[test]
fn sql_errors_include_the_sql() -> anyhow::Result<()> {
    let pg = Cluster::start()?;
    let err = pg.execute("select * from no_such_table").unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no_such_table") && msg.contains("does not exist"), "{msg}");
    let err = pg.query_one_string("select generate_series(1, 2)").unwrap_err();
    assert!(format!("{err:#}").contains("2 rows"), "{err:#}");
    let err = pg.run_tool("psql", &["-X", "-v", "ON_ERROR_STOP=1", "-c", "select nope"]).unwrap_err();
    assert!(format!("{err:#}").contains("column \"nope\" does not exist"), "{err:#}");
    assert_eq!(pg.psql("select 40 + 2")?.trim(), "42");
    Ok(())
}

#[test]
fn start_failure_reports_server_log() {
    let err = Cluster::builder().guc("shared_buffers", "not-a-size").start().unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("server log"), "{msg}");
    assert!(msg.contains("shared_buffers"), "{msg}");
}

#[test]
fn server_user_helpers() -> anyhow::Result<()> {
    let (uid, gid) = server_user();
    let mut cmd = std::process::Command::new("id");
    run_as_server_user(&mut cmd).current_dir("/");
    let out = run_command(&mut cmd)?;
    assert!(out.contains(&format!("uid={uid}(")), "{out}");
    assert!(out.contains(&format!("gid={gid}(")), "{out}");
    if neon_tests::is_root() {
        assert_ne!(uid, 0);
        // Supplementary groups are dropped: only the primary group remains.
        let groups = run_command(run_as_server_user(&mut std::process::Command::new("id")).arg("-G"))?;
        assert_eq!(groups.trim(), gid.to_string());
    }
    // postgres --single as the server user on a stopped cluster.
    let mut pg = Cluster::start()?;
    pg.execute("create table single_t(x int)")?;
    pg.stop()?;
    let mut single = pg.server_tool("postgres");
    single.arg("--single").arg("-D").arg(pg.data_dir()).arg("postgres");
    single.stdin(std::process::Stdio::piped());
    single.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = single.spawn()?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"insert into single_t values (7);\n")?;
    }
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    pg.start_again()?;
    assert_eq!(pg.query_one_string("select x from single_t")?, "7");
    // pg_checksums / pg_resetwal style tools on a stopped cluster.
    pg.stop()?;
    let out = pg.run_server_tool("pg_resetwal", &["-n", pg.data_dir().to_str().unwrap()])?;
    assert!(out.contains("Database system identifier"), "{out}");
    Ok(())
}

#[test]
fn many_clusters_in_parallel() -> anyhow::Result<()> {
    let handles: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || -> anyhow::Result<String> {
                let pg = Cluster::builder().tcp().start()?;
                pg.execute(&format!("create table t{i}(x int)"))?;
                Ok(format!("{}:{}", pg.socket_dir().display(), pg.port()))
            })
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for h in handles {
        let id = h.join().expect("thread panicked")?;
        assert!(seen.insert(id));
    }
    Ok(())
}
