//! `neon-sidecar waldump`, the command users run: on WAL from a real server it prints one line
//! per record (as many as `pg_waldump`, with the same LSNs), a `--stats` table equal to
//! `pg_waldump --stats`, says where and why it stopped, and turns bad input into a clear error.

use anyhow::Result;
use neon_tests::pg_waldump::{parse_records, parse_stats};
use neon_tests::{sidecar_bin, workload, Cluster};
use std::process::Command;

fn run(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(sidecar_bin()?).args(args).output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

#[test]
fn waldump_lines_and_stats_match_pg_waldump() -> Result<()> {
    let c = Cluster::builder().guc("wal_keep_size", "1GB").start()?;
    let start = workload::insert_lsn(&c)?;
    c.pgbench(&["-i", "-q", "-s", "1"])?;
    c.pgbench(&["-n", "-t", "100"])?;
    c.execute("CHECKPOINT")?;
    let end = workload::flush_lsn(&c)?;
    let wal = c.wal_dir();
    let (start, end, wal) = (start.to_string(), end.to_string(), wal.to_str().unwrap().to_string());

    let (ok, ours, err) = run(&["waldump", "--start", &start, "--end", &end, &wal])?;
    assert!(ok, "waldump failed: {err}");
    assert!(err.contains("reached the requested end"), "stop reason not reported: {err}");
    let theirs = c.run_tool("pg_waldump", &["-p", &wal, "-s", &start, "-e", &end])?;
    let (ours, theirs) = (parse_records(&ours), parse_records(&theirs));
    assert!(theirs.len() > 1000);
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(
            (o.lsn, &o.rmgr, o.tot_len, &o.record_type, &o.blocks),
            (t.lsn, &t.rmgr, t.tot_len, &t.record_type, &t.blocks)
        );
    }

    for mode in ["--stats", "--stats=record"] {
        let (ok, ours, err) = run(&["waldump", mode, "--start", &start, "--end", &end, &wal])?;
        assert!(ok, "waldump {mode} failed: {err}");
        let theirs = c.run_tool("pg_waldump", &[mode, "-p", &wal, "-s", &start, "-e", &end])?;
        assert_eq!(parse_stats(&ours), parse_stats(&theirs), "{mode} tables differ");
        assert!(parse_stats(&ours).len() > 5);
    }

    // Without --end it reads to the end of valid WAL and says so.
    let (ok, _, err) = run(&["waldump", "--stats", "--start", &start, &wal])?;
    assert!(ok, "{err}");
    assert!(err.contains("end of valid WAL"), "{err}");
    Ok(())
}

#[test]
fn waldump_rejects_bad_input_clearly() -> Result<()> {
    let (ok, _, err) = run(&["waldump", "--start", "0/XYZ", "/nonexistent"])?;
    assert!(!ok);
    assert!(err.contains("invalid LSN"), "{err}");

    let (ok, _, err) = run(&["waldump", "/nonexistent/pg_wal"])?;
    assert!(!ok);
    assert!(err.contains("/nonexistent/pg_wal"), "{err}");

    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("000000010000000000000001"), vec![0u8; 8192])?;
    let (ok, _, err) = run(&["waldump", dir.path().to_str().unwrap()])?;
    assert!(!ok);
    assert!(err.contains("long WAL page header"), "{err}");

    // An LSN outside the files given.
    let c = Cluster::start()?;
    let (ok, _, err) = run(&["waldump", "--start", "FF/0", c.wal_dir().to_str().unwrap()])?;
    assert!(!ok);
    assert!(err.contains("FF/0"), "{err}");
    Ok(())
}
