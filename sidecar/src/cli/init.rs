//! `neon-sidecar init --pgdata DIR --store STORE`: prepares a compute for the sidecar and starts
//! its history at the cluster's birth. It runs `initdb` when DIR is not a cluster yet (as the
//! unprivileged OS user, local connections by peer), adds the settings the product needs,
//! starts the server privately (no TCP, a private socket directory) just long enough to create
//! the sidecar's replication slot, stops it cleanly, and imports its data files as images at
//! the shutdown checkpoint — so every WAL record after it is kept by the slot and every page
//! before it is in the store.
//!
//! `neon-sidecar attach` does the same for a server that is already running and has history
//! of its own: a base backup over the replication connection instead of the stopped files.

use crate::cli::args::{ComputeArgs, RedoProcessArgs};
use crate::replication::client::{ReplicationConfig, ReplicationConn};
use crate::repo::import::import_datadir;
use crate::repo::timeline::Timeline;
use crate::walredo::scratch::as_server_user;
use anyhow::{bail, Context};
use neon_types::Lsn;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The compute's data directory (created with initdb if it is not a cluster yet).
    #[arg(long)]
    pub pgdata: PathBuf,
    /// The store directory (must not hold history yet).
    #[arg(long)]
    pub store: PathBuf,
    /// The replication slot the sidecar owns.
    #[arg(long, default_value = "neon_sidecar")]
    pub slot: String,
    /// The database superuser (initdb's `-U`).
    #[arg(long, default_value = "postgres")]
    pub superuser: String,
    /// The sidecar's page-service socket, for the extension (default: `sidecar.sock` beside
    /// the store).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The directory base backups are written to, shared with the extension (default:
    /// `shared` beside the store).
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

/// Settings the product needs, appended to postgresql.conf: WAL the sidecar can rebuild pages
/// from, room for its replication connection and slot, the extension loaded at start, and
/// where it finds the sidecar.
fn settings(socket: &Path, shared_dir: &Path) -> String {
    let quote = |p: &Path| p.display().to_string().replace('\'', "''");
    format!(
        "\n# ---- added by neon-sidecar init ----\n\
         wal_level = replica\n\
         full_page_writes = on\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         shared_preload_libraries = 'neon'\n\
         neon.sidecar_socket = '{}'\n\
         neon.shared_dir = '{}'\n",
        quote(socket),
        quote(shared_dir)
    )
}

fn run_cmd(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The latest checkpoint of a stopped cluster, from `pg_controldata`.
pub fn checkpoint_lsn(pg_bin: &Path, pgdata: &Path) -> anyhow::Result<Lsn> {
    let out = run_cmd(Command::new(pg_bin.join("pg_controldata")).arg(pgdata).env("LC_ALL", "C"), "pg_controldata")?;
    if !out.contains("shut down") {
        bail!("{} was not shut down cleanly; start and stop it once before importing", pgdata.display());
    }
    let line = out.lines().find(|l| l.starts_with("Latest checkpoint location:")).context("no checkpoint location")?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

pub fn run(args: &InitArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let cfg = args.redo.config("init")?;
    let as_user = |cmd: &mut Command| {
        as_server_user(cmd, &cfg);
    };
    let bin = |name: &str| args.redo.pg_bin.join(name);
    let pgdata = &args.pgdata;
    // Refuse before touching anything if the store already has a history.
    let repo = Timeline::open(&args.store)?;
    if repo.history_start().is_valid() {
        bail!("store {} already holds history from {}", args.store.display(), repo.history_start());
    }
    if !pgdata.join("PG_VERSION").exists() {
        let mut initdb = Command::new(bin("initdb"));
        initdb.arg("-D").arg(pgdata).args(["-U", &args.superuser, "--auth-local=peer", "--auth-host=scram-sha-256"]);
        if args.redo.data_checksums {
            initdb.arg("--data-checksums");
        }
        as_user(&mut initdb);
        run_cmd(&mut initdb, "initdb")?;
        writeln!(out, "initdb: created {}", pgdata.display())?;
    }
    let conf = pgdata.join("postgresql.conf");
    let mut f =
        std::fs::OpenOptions::new().append(true).open(&conf).with_context(|| format!("opening {}", conf.display()))?;
    let beside_store = |name: &str| -> anyhow::Result<PathBuf> {
        let store = std::path::absolute(&args.store)?;
        Ok(store.parent().unwrap_or(Path::new("/")).join(name))
    };
    let socket = match &args.socket {
        Some(p) => std::path::absolute(p)?,
        None => beside_store("sidecar.sock")?,
    };
    let shared_dir = match &args.shared_dir {
        Some(p) => std::path::absolute(p)?,
        None => beside_store("shared")?,
    };
    f.write_all(settings(&socket, &shared_dir).as_bytes())?;

    // Start privately, create the slot, stop cleanly.
    let sockdir = std::env::temp_dir().join(format!("neon-init-{}", std::process::id()));
    std::fs::create_dir_all(&sockdir)?;
    if let Some((uid, gid)) = cfg.run_as {
        std::os::unix::fs::chown(&sockdir, Some(uid), Some(gid))?;
    }
    let opts = format!("-c listen_addresses='' -c port=5432 -c unix_socket_directories='{}'", sockdir.display());
    let log = sockdir.join("server.log");
    let mut start = Command::new(bin("pg_ctl"));
    start.arg("-D").arg(pgdata).args(["-w", "-o", &opts, "-l"]).arg(&log).arg("start");
    as_user(&mut start);
    run_cmd(&mut start, "starting the compute to create the slot")?;
    let slot = (|| -> anyhow::Result<Lsn> {
        let rc = ReplicationConfig {
            host: sockdir.display().to_string(),
            port: 5432,
            user: args.superuser.clone(),
            password: None,
            application_name: "neon-sidecar init".into(),
        };
        let mut conn = ReplicationConn::connect(&rc)?;
        Ok(match conn.slot_restart_lsn(&args.slot)? {
            Some(l) => l,
            None => conn.create_slot(&args.slot)?,
        })
    })();
    let mut stop = Command::new(bin("pg_ctl"));
    stop.arg("-D").arg(pgdata).args(["-w", "-m", "fast", "stop"]);
    as_user(&mut stop);
    let stopped = run_cmd(&mut stop, "stopping the compute");
    let _ = std::fs::remove_dir_all(&sockdir);
    let slot_lsn = slot?;
    stopped?;

    let at = checkpoint_lsn(&args.redo.pg_bin, pgdata)?;
    let stats = import_datadir(&repo, pgdata, at)?;
    repo.flush()?;
    writeln!(
        out,
        "slot {} at {slot_lsn}; imported {} pages of {} relation forks as of the shutdown checkpoint {at}",
        args.slot, stats.pages, stats.relation_forks
    )?;
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// The running compute.
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The store directory (must hold no history yet).
    #[arg(long)]
    pub store: PathBuf,
}

/// `neon-sidecar attach`: a running compute into a new store. The slot comes first, so it
/// keeps the WAL from before the backup; then BASE_BACKUP, unpacked beside the store and
/// imported as images at the backup's start. Its files are fuzzy until the WAL up to the
/// backup's end is replayed over them, so history is valid from that end LSN; `run` streams
/// that WAL (and everything after) from the slot.
pub fn attach(args: &AttachArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let repo = Timeline::open(&args.store)?;
    if repo.history_start().is_valid() {
        bail!("store {} already holds history from {}", args.store.display(), repo.history_start());
    }
    let rc = args.compute.replication("neon-sidecar attach")?;
    let slot = &args.compute.slot;
    let mut conn = ReplicationConn::connect(&rc)?;
    let slot_lsn = match conn.slot_restart_lsn(slot)? {
        Some(l) => l,
        None => conn.create_slot(slot)?,
    };
    let unpacked = args.store.join(format!("attach-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&unpacked);
    let started = std::time::Instant::now();
    let mut next_report = 256u64 << 20;
    let backup = conn.base_backup("neon-sidecar attach", &unpacked, |bytes| {
        if bytes >= next_report {
            eprintln!("neon-sidecar: base backup: {} MB", bytes >> 20);
            next_report += 256 << 20;
        }
    });
    let imported = backup.map_err(anyhow::Error::from).and_then(|b| {
        anyhow::ensure!(slot_lsn <= b.start, "slot {slot} starts at {slot_lsn}, after the backup's {}", b.start);
        let stats = import_datadir(&repo, &unpacked, b.start)?;
        repo.restrict_history(b.end);
        repo.flush()?;
        Ok((b, stats))
    });
    let _ = std::fs::remove_dir_all(&unpacked);
    let (b, stats) = imported?;
    writeln!(
        out,
        "slot {slot} at {slot_lsn}; base backup {} to {} ({} files, {} MB, {:.1} s); imported {} pages of {} relation \
         forks; history from {}",
        b.start,
        b.end,
        b.files,
        b.bytes >> 20,
        started.elapsed().as_secs_f64(),
        stats.pages,
        stats.relation_forks,
        b.end
    )?;
    Ok(())
}
