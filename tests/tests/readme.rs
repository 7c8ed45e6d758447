//! The README's "Following a compute" runs as written: its three blocks (set up, start, stop)
//! are taken from README.md and run by bash, with only the base directory and the port made
//! this test's own — once with `init` as root (when the tests run as root) and once with
//! everything as the server's OS user. Each block must succeed; the sidecar must answer, the
//! compute must show the history, and everything `init` made must belong to the server's user.

use anyhow::{Context, Result};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The ```sh block after `<!-- readme-test: NAME -->` in README.md.
fn block(readme: &str, name: &str) -> Result<String> {
    let marker = format!("<!-- readme-test: {name} -->");
    let after = readme.split_once(&marker).with_context(|| format!("README.md has no {marker}"))?.1;
    let body = after.trim_start().strip_prefix("```sh\n").with_context(|| format!("no sh block after {marker}"))?;
    Ok(body.split_once("```").context("an unclosed block")?.0.to_string())
}

/// Runs `script` with bash, stopping at the first failure: as the server's OS user, or (when
/// `as_root` and we are root) as root. Returns what it printed.
fn run(script: &str, as_root: bool, path: &Path) -> Result<String> {
    let mut cmd = Command::new("bash");
    cmd.args(["-e", "-c", script]).env("PATH", format!("{}:{}", path.display(), std::env::var("PATH")?));
    neon_tests::clear_pg_env(&mut cmd);
    if !as_root {
        neon_tests::run_as_server_user(&mut cmd);
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "the README's commands failed:\n{script}\n--- they said ---\n{text}");
    Ok(text)
}

/// A free TCP port (the compute's number; it listens on its socket only).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn readme_as_written(init_as_root: bool) -> Result<()> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let dir = tempfile::Builder::new().prefix("neon-readme-").tempdir_in("/tmp")?;
    let neon = dir.path().join("neon");
    std::fs::create_dir(&neon)?;
    neon_tests::chown_to_server_user(dir.path())?;
    let bin = neon_tests::sidecar::sidecar_bin_in(dir.path())?;
    let bin_dir: PathBuf = bin.parent().context("bin dir")?.to_path_buf();
    let port = free_port()?.to_string();
    let ours = |script: String| {
        script.replace("/var/lib/neon", neon.to_str().unwrap()).replace("PORT=5432", &format!("PORT={port}"))
    };
    let (setup, start, stop) =
        (ours(block(&readme, "setup")?), ours(block(&readme, "start")?), ours(block(&readme, "stop")?));

    let said = run(&setup, init_as_root, &bin_dir)?;
    eprintln!("setup: {said}");
    let result = (|| -> Result<()> {
        let said = run(&start, false, &bin_dir)?;
        eprintln!("start: {said}");
        assert!(said.contains("durable_lsn") && said.contains("CREATE EXTENSION"), "{said}");
        // psql's row: timeline 1 and a durable LSN.
        assert!(said.lines().any(|l| l.trim_start().starts_with("1 |")), "{said}");
        // Everything init made is the server's user's, and private.
        if neon_tests::is_root() {
            let (uid, _) = neon_tests::server_user();
            for sub in ["pgdata", "store", "run", "shared"] {
                let m = std::fs::metadata(neon.join(sub))?;
                assert_eq!(m.uid(), uid, "{sub} does not belong to the server's user");
                assert_eq!(m.mode() & 0o077, 0, "{sub} is open to others: {:o}", m.mode());
            }
        }
        Ok(())
    })();
    let stopped = run(&stop, false, &bin_dir);
    if result.is_err() || stopped.is_err() {
        eprintln!("sidecar log:\n{}", std::fs::read_to_string(neon.join("sidecar.log")).unwrap_or_default());
        eprintln!("server log:\n{}", std::fs::read_to_string(neon.join("server.log")).unwrap_or_default());
        // Whatever is still running goes, by its PID.
        if let Ok(pid) = std::fs::read_to_string(neon.join("sidecar.pid")) {
            let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
        }
        let mut stop = Command::new(neon_tests::pg_bin("pg_ctl"));
        stop.arg("-D").arg(neon.join("pgdata")).args(["-m", "immediate", "stop"]);
        neon_tests::run_as_server_user(&mut stop);
        let _ = stop.status();
    }
    result?;
    stopped.map(drop)
}

#[test]
fn the_readme_runs_as_written_with_init_as_root() -> Result<()> {
    readme_as_written(true)
}

#[test]
fn the_readme_runs_as_written_all_as_the_servers_user() -> Result<()> {
    readme_as_written(false)
}
