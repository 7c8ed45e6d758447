//! The physical-replication client against a real PostgreSQL 15 server: it authenticates
//! (trust over a unix socket, SCRAM-SHA-256 and md5 over TCP, a wrong password refused), owns
//! a slot, streams WAL that our decoder turns into exactly the records `pg_waldump` finds in the WAL files, and
//! the slot keeps every byte past the flush position the client reports.

use anyhow::{Context, Result};
use neon_tests::pg_waldump::parse_records;
use neon_tests::{workload, Cluster};
use neon_types::Lsn;
use sidecar::replication::client::{ReplicationConfig, ReplicationConn, ReplicationError, StreamEvent};
use sidecar::wal::decoder::WalStreamDecoder;
use std::time::{Duration, Instant};

fn config(c: &Cluster, user: &str, password: Option<&str>, tcp: bool) -> ReplicationConfig {
    ReplicationConfig {
        host: if tcp { "127.0.0.1".into() } else { c.socket_dir().display().to_string() },
        port: c.port(),
        user: user.into(),
        password: password.map(str::to_string),
        application_name: "neon-sidecar-test".into(),
    }
}

#[test]
fn streamed_wal_decodes_to_the_files_records_and_the_slot_holds() -> Result<()> {
    let c = Cluster::builder().gucs(workload::MIXED_GUCS).start()?;
    let mut conn = ReplicationConn::connect(&config(&c, "postgres", None, false))?;
    let sys = conn.identify_system()?;
    assert_eq!(sys.system_id.to_string(), c.query_one_string("SELECT system_identifier FROM pg_control_system()")?);
    assert_eq!(sys.timeline, 1);
    let start = conn.create_slot("neon_sidecar")?;
    let err = conn.create_slot("neon_sidecar").expect_err("a second slot of the same name");
    assert_eq!(err.code(), Some("42710"), "{err}");
    assert_eq!(conn.slot_restart_lsn("neon_sidecar")?, Some(start));
    assert_eq!(conn.slot_restart_lsn("no_such_slot")?, None);

    let mut stream = conn.start_replication(Some("neon_sidecar"), start, sys.timeline)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-t", "200"])?;
    c.execute("CHECKPOINT")?;
    let target = workload::flush_lsn(&c)?;

    let seg_size: u32 =
        c.query_one_string("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'")?.parse()?;
    let mut dec = WalStreamDecoder::new(start, seg_size)?;
    let mut received = start.page_start();
    let mut streamed = Vec::new();
    let (mut messages, mut keepalives) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while received < target {
        anyhow::ensure!(Instant::now() < deadline, "streamed only to {received}, waiting for {target}");
        match stream.next_event(Duration::from_secs(10))?.context("stream ended")? {
            StreamEvent::XLogData { start: at, data, .. } => {
                anyhow::ensure!(at == received, "XLogData at {at}, expected {received}");
                received = at + data.len() as u64;
                dec.feed(data);
                messages += 1;
                while let Some(rec) = dec.poll()? {
                    streamed.push((rec.lsn, rec.header.prev, rec.total_len()));
                }
            }
            StreamEvent::Keepalive { reply_requested, .. } => {
                keepalives += 1;
                if reply_requested {
                    stream.send_status(received, start, start, false)?;
                }
            }
        }
    }
    // What PostgreSQL's own pg_waldump says about the same range of the files.
    let dump = c.run_tool(
        "pg_waldump",
        &["-p", c.wal_dir().to_str().unwrap(), "-s", &start.to_string(), "-e", &target.to_string()],
    )?;
    let from_files: Vec<(Lsn, Lsn, u32)> = parse_records(&dump).iter().map(|r| (r.lsn, r.prev, r.tot_len)).collect();
    let n = from_files.len();
    assert!(n > 1000, "only {n} records");
    assert_eq!(&streamed[..n], &from_files[..], "streamed records differ from pg_waldump's");
    eprintln!("{n} records from {messages} XLogData messages ({keepalives} keepalives) equal pg_waldump's");

    // The slot keeps everything past the reported flush position, even though more arrived.
    let flushed = from_files[n / 2 + 1].0;
    stream.send_status(received, flushed, flushed, false)?;
    let slot_lsn = || -> Result<Lsn> {
        Ok(c.query_one_string("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'neon_sidecar'")?
            .parse()?)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while slot_lsn()? != flushed {
        anyhow::ensure!(
            Instant::now() < deadline,
            "slot restart_lsn {} never reached the reported {flushed}",
            slot_lsn()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(slot_lsn()? < received, "the slot moved past what was reported as flushed");
    Ok(())
}

#[test]
fn scram_md5_and_wrong_passwords() -> Result<()> {
    let c = Cluster::builder().tcp().start()?;
    c.execute(
        "CREATE ROLE rs LOGIN REPLICATION PASSWORD 'scram-secret';
         SET password_encryption = 'md5';
         CREATE ROLE rm LOGIN REPLICATION PASSWORD 'md5-secret';",
    )?;
    // Password rules for TCP replication connections, ahead of the harness's trust lines.
    let hba = c.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    let rules = "host replication rs 127.0.0.1/32 scram-sha-256\nhost replication rm 127.0.0.1/32 md5\n";
    std::fs::write(&hba, format!("{rules}{old}"))?;
    c.execute("SELECT pg_reload_conf()")?;
    std::thread::sleep(Duration::from_millis(300));

    for (user, password) in [("rs", "scram-secret"), ("rm", "md5-secret")] {
        let mut conn = ReplicationConn::connect(&config(&c, user, Some(password), true))
            .with_context(|| format!("connecting as {user}"))?;
        conn.identify_system()?;
        let err =
            ReplicationConn::connect(&config(&c, user, Some("wrong"), true)).err().expect("wrong password accepted");
        assert!(matches!(&err, ReplicationError::Server { code, .. } if code == "28P01"), "{user}: {err}");
        let err = ReplicationConn::connect(&config(&c, user, None, true)).err().expect("no password accepted");
        assert!(matches!(err, ReplicationError::Auth(_)), "{user}: {err}");
    }
    // A server that is not there.
    let mut gone = config(&c, "postgres", None, true);
    gone.port = 1;
    assert!(matches!(ReplicationConn::connect(&gone), Err(ReplicationError::Connect { .. })));
    Ok(())
}
