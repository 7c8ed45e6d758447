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

use crate::cli::args::{ComputeArgs, RedoProcessArgs, DEFAULT_SLOT};
use crate::cli::conf::SidecarConf;
use crate::replication::client::{ReplicationConfig, ReplicationConn, Slot};
use crate::repo::import::import_datadir;
use crate::repo::store::{Identity, Store, StoreError};
use crate::repo::timeline::Gap;
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
    /// The store directory: new, or holding this cluster's history already (init then only
    /// checks the settings and the slot).
    #[arg(long)]
    pub store: PathBuf,
    /// The replication slot the sidecar owns.
    #[arg(long, default_value = DEFAULT_SLOT)]
    pub slot: String,
    /// The database superuser (initdb's `-U`).
    #[arg(long, default_value = "postgres")]
    pub superuser: String,
    /// The port the compute listens on (written to its postgresql.conf; default: as it is).
    #[arg(long)]
    pub port: Option<u16>,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

/// Where the sidecar serves the compute: recorded in the store for `run` and, for `init`,
/// written to the compute's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The sidecar's page-service socket (default: `run/sidecar.sock` beside the store).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The directory base backups are written to, shared with the extension (default:
    /// `shared` beside the store).
    #[arg(long)]
    pub shared_dir: Option<PathBuf>,
}

impl ServeArgs {
    /// The socket and shared directory, absolute, defaults beside `store`; their directories
    /// made private (and, as root, given to the server's OS user, who runs the sidecar).
    fn prepare(&self, store: &Path, cfg: &crate::walredo::RedoConfig) -> anyhow::Result<(PathBuf, PathBuf)> {
        let beside = std::path::absolute(store)?.parent().unwrap_or(Path::new("/")).to_path_buf();
        let socket = std::path::absolute(self.socket.clone().unwrap_or_else(|| beside.join("run/sidecar.sock")))?;
        let shared = std::path::absolute(self.shared_dir.clone().unwrap_or_else(|| beside.join("shared")))?;
        for dir in [socket.parent().unwrap_or(Path::new("/")), &shared] {
            if !dir.exists() {
                crate::repo::timeline::private_dir(dir)?;
                give_to_server_user(dir, cfg)?;
            }
        }
        Ok((socket, shared))
    }
}

/// Settings the product needs, appended to postgresql.conf: WAL the sidecar can rebuild pages
/// from, room for its replication connection and slot, the extension loaded at start, and
/// where it finds the sidecar.
fn settings(socket: &Path, shared_dir: &Path, port: Option<u16>) -> String {
    let quote = |p: &Path| p.display().to_string().replace('\'', "''");
    let port = port.map(|p| format!("port = {p}\n")).unwrap_or_default();
    format!(
        "\n{SETTINGS_BEGIN}\n{port}\
         wal_level = replica\n\
         full_page_writes = on\n\
         max_wal_senders = 10\n\
         max_replication_slots = 10\n\
         shared_preload_libraries = 'neon'\n\
         neon.sidecar_socket = '{}'\n\
         neon.shared_dir = '{}'\n\
         {SETTINGS_END}\n",
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

/// Where the settings block `init` writes begins and ends in `postgresql.conf`.
const SETTINGS_BEGIN: &str = "# ---- added by neon-sidecar init ----";
const SETTINGS_END: &str = "# ---- end of neon-sidecar settings ----";

/// `postgresql.conf` with the settings block written once: an earlier one (from an earlier
/// `init`) is replaced where it is — so settings the user wrote after it still win — and a
/// first one is appended. Returns the new text, or `None` if it is already so.
fn with_settings(conf: &str, block: &str) -> Option<String> {
    let mut out = String::new();
    let (mut inside, mut after_last_setting, mut placed) = (false, false, false);
    for line in conf.split_inclusive('\n') {
        let l = line.trim_end();
        if l == SETTINGS_BEGIN {
            inside = true;
            if !placed {
                out.push_str(block.trim_start_matches('\n'));
                placed = true;
            }
        } else if inside {
            // Blocks from before the end marker existed end at their last setting.
            after_last_setting = l.starts_with("neon.shared_dir");
            inside = l != SETTINGS_END && !after_last_setting;
        } else if !(after_last_setting && l == SETTINGS_END) {
            after_last_setting = false;
            out.push_str(line);
        }
    }
    if !placed {
        out = format!("{}\n{}", out.trim_end_matches('\n'), block);
    }
    (out != conf).then_some(out)
}

/// Replaces `path`'s contents whole (a temporary file renamed over it), keeping its owner
/// and mode: a crash leaves the old file or the new one.
fn replace_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // A linked configuration file is replaced where it lies, the link kept.
    let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let meta = std::fs::metadata(&path)?;
    let tmp = path.with_extension("conf.neon-tmp");
    crate::repo::timeline::write_durably_with(&tmp, &path, |f| -> std::io::Result<()> {
        f.write_all(text.as_bytes())?;
        // Its owner and mode before it takes the old file's place: never a moment unreadable.
        std::os::unix::fs::fchown(&*f, Some(meta.uid()), Some(meta.gid()))?;
        f.set_permissions(std::fs::Permissions::from_mode(meta.mode() & 0o7777))
    })
    .with_context(|| format!("writing {}", path.display()))
}

/// Gives `dir` and everything under it to the server's OS user (when we are root), so that
/// the sidecar, run as that user, can use what we made.
fn give_to_server_user(dir: &Path, cfg: &crate::walredo::RedoConfig) -> anyhow::Result<()> {
    let Some((uid, gid)) = cfg.run_as else { return Ok(()) };
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).with_context(|| format!("chown {}", p.display()))?;
        if p.is_dir() && !p.is_symlink() {
            for e in std::fs::read_dir(&p)? {
                todo.push(e?.path());
            }
        }
    }
    Ok(())
}

pub fn run(args: &InitArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let cfg = args.redo.config("init")?;
    let as_user = |cmd: &mut Command| {
        as_server_user(cmd, &cfg);
    };
    let bin = |name: &str| args.redo.pg_bin.join(name);
    let pgdata = &args.pgdata;
    // A store that follows a cluster already: init was done (it is safe to run again, and
    // then checks the settings and the slot); one of another cluster is refused below.
    let existing = match Store::open_read_only(&args.store) {
        Ok(s) => Some(s),
        Err(StoreError::NotSetUp { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    // init works on a stopped cluster (it starts it privately to make the slot): a running one
    // is left alone, settings and all.
    if let Some(pid) = postmaster_alive(pgdata) {
        bail!(
            "the compute at {} is running (postmaster PID {pid}): stop it first (init starts it privately to \
             make the slot), or use `neon-sidecar attach` for a running server",
            pgdata.display()
        );
    }
    if existing.is_some() && !pgdata.join("PG_VERSION").exists() {
        bail!("store {} is set up already, but {} is not a cluster", args.store.display(), pgdata.display());
    }
    if !pgdata.join("PG_VERSION").exists() {
        // Made here, so that initdb (as the server's OS user) need not make its parents.
        if !pgdata.exists() {
            crate::repo::timeline::private_dir(pgdata)?;
            give_to_server_user(pgdata, &cfg)?;
        }
        let mut initdb = Command::new(bin("initdb"));
        initdb.arg("-D").arg(pgdata).args(["-U", &args.superuser, "--auth-local=peer", "--auth-host=scram-sha-256"]);
        if args.redo.data_checksums {
            initdb.arg("--data-checksums");
        }
        as_user(&mut initdb);
        run_cmd(&mut initdb, "initdb")?;
        writeln!(out, "initdb: created {}", pgdata.display())?;
    }
    let identity = {
        let control = pgdata.join("global/pg_control");
        let b = std::fs::read(&control).with_context(|| format!("reading {}", control.display()))?;
        let info = crate::basebackup::control::info(&b).with_context(|| control.display().to_string())?;
        Identity { system_id: info.system_identifier, wal_segment_size: info.wal_segment_size }
    };
    if let Some(store) = &existing {
        store.identity().check(store.dir(), identity.system_id)?;
    }
    let (socket, shared_dir) = args.serve.prepare(&args.store, &cfg)?;
    let conf = pgdata.join("postgresql.conf");
    let text = std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    match with_settings(&text, &settings(&socket, &shared_dir, args.port)) {
        Some(new) => {
            replace_file(&conf, &new)?;
            writeln!(out, "settings: written to {}", conf.display())?;
        }
        None => writeln!(out, "settings: {} has them already", conf.display())?,
    }

    // Start privately, create the slot, stop cleanly. The private socket directory is the
    // server user's alone, and only there does a connection need no password (whatever the
    // cluster's own pg_hba.conf says: init may run as another OS user than the server).
    // A new directory of our own (mkdtemp, 0700): never one someone else made first.
    let tmp = tempfile::Builder::new().prefix("neon-initsock-").tempdir()?;
    let sockdir = tmp.path().to_path_buf();
    let hba = sockdir.join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\nlocal replication all trust\n")?;
    give_to_server_user(&sockdir, &cfg)?;
    let opts = format!(
        "-c listen_addresses='' -c port=5432 -c unix_socket_directories='{}' -c hba_file='{}'",
        sockdir.display(),
        hba.display()
    );
    let log = sockdir.join("server.log");
    let mut start = Command::new(bin("pg_ctl"));
    start.arg("-D").arg(pgdata).args(["-w", "-o", &opts, "-l"]).arg(&log).arg("start");
    as_user(&mut start);
    let started = run_cmd(&mut start, "starting the compute to create the slot")
        .map_err(|e| e.context(std::fs::read_to_string(&log).unwrap_or_default()));
    let started_ok = started.is_ok();
    let slot = started.and_then(|_| {
        let rc = ReplicationConfig {
            host: sockdir.display().to_string(),
            port: 5432,
            user: args.superuser.clone(),
            password: None,
            application_name: "neon-sidecar init".into(),
        };
        let mut conn = ReplicationConn::connect(&rc)?;
        Ok(match conn.read_slot(&args.slot)? {
            Slot::Reserving(l) => l,
            Slot::Missing => conn.create_slot(&args.slot)?,
            Slot::Invalidated => bail!("replication slot {} was invalidated by the server: drop it first", args.slot),
        })
    });
    let mut stop = Command::new(bin("pg_ctl"));
    stop.arg("-D").arg(pgdata).args(["-w", "-m", "fast", "stop"]);
    as_user(&mut stop);
    // Only the server this started (none ran before; one that came up after `pg_ctl` gave
    // up waiting is ours too): never one that was running already.
    let ours = started_ok || postmaster_alive(pgdata).is_some();
    let stopped = if ours { run_cmd(&mut stop, "stopping the compute").map(drop) } else { Ok(()) };
    drop(tmp);
    let slot_lsn = slot?;
    stopped?;
    // What `run` needs to know, whatever happens next.
    let sidecar_conf = SidecarConf {
        pgdata: Some(std::path::absolute(pgdata)?),
        slot: Some(args.slot.clone()),
        socket: Some(socket.clone()),
        shared_dir: Some(shared_dir.clone()),
        ..SidecarConf::default()
    };
    let next = |out: &mut dyn Write| -> std::io::Result<()> {
        let user = if cfg.run_as.is_some() { format!(" (as {})", args.redo.run_as) } else { String::new() };
        writeln!(
            out,
            "next{user}: start the compute (pg_ctl -D {}), then `neon-sidecar run --store {}`",
            pgdata.display(),
            args.store.display()
        )
    };
    if let Some(store) = existing {
        sidecar_conf.write(&args.store)?;
        give_to_server_user(&args.store, &cfg)?;
        let t = store.current();
        writeln!(
            out,
            "slot {} at {slot_lsn}; store {} already holds this cluster's history (timeline {}, {} to {})",
            args.slot,
            args.store.display(),
            t.id(),
            t.lineage_start(),
            t.durable_lsn()
        )?;
        next(out)?;
        return Ok(());
    }

    let at = checkpoint_lsn(&args.redo.pg_bin, pgdata)?;
    let timeline = checkpoint_timeline(pgdata)?;
    let store = Store::create(&args.store, identity, timeline)?;
    let repo = store.current();
    let imported = import_datadir(&repo, pgdata, at, &Default::default())
        .map_err(anyhow::Error::from)
        .and_then(|stats| Ok(repo.flush().map(|_| stats)?));
    drop(repo);
    let stats = match imported {
        Ok(stats) => stats,
        Err(e) => {
            // Not set up, then: the next init starts afresh.
            let _ = store.abandon();
            return Err(e);
        }
    };
    drop(store);
    sidecar_conf.write(&args.store)?;
    give_to_server_user(&args.store, &cfg)?;
    writeln!(
        out,
        "slot {} at {slot_lsn}; imported {} pages of {} relation forks as of the shutdown checkpoint {at} (timeline \
         {timeline}) into {}",
        args.slot,
        stats.pages,
        stats.relation_forks,
        args.store.display()
    )?;
    next(out)?;
    Ok(())
}

/// The postmaster named in `<pgdata>/postmaster.pid`, if it is alive.
fn postmaster_alive(pgdata: &Path) -> Option<i32> {
    let pid = std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
    let pid = pid.filter(|p| *p > 0)?;
    // SAFETY: kill with signal 0 only asks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    (r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)).then_some(pid)
}

/// The timeline of a stopped cluster's last checkpoint (`pg_control`).
fn checkpoint_timeline(pgdata: &Path) -> anyhow::Result<u32> {
    use crate::wal::checkpoint::{CheckPoint, CONTROL_CHECKPOINT_COPY, SIZEOF_CHECKPOINT};
    let control = std::fs::read(pgdata.join("global/pg_control"))?;
    let cp = control
        .get(CONTROL_CHECKPOINT_COPY..CONTROL_CHECKPOINT_COPY + SIZEOF_CHECKPOINT)
        .context("pg_control is too short")
        .and_then(|b| CheckPoint::decode(b).map_err(|e| anyhow::anyhow!("{e}")))?;
    Ok(cp.this_timeline)
}

#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// The running compute.
    #[command(flatten)]
    pub compute: ComputeArgs,
    /// The store directory: new, or holding this cluster's history already (which then goes
    /// on after a recorded gap).
    #[arg(long)]
    pub store: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

/// `neon-sidecar attach`: a running compute into a store. The slot comes first, so it keeps
/// the WAL from before the backup; then BASE_BACKUP, unpacked beside the store and imported as
/// images at the backup's start. Its files are fuzzy until the WAL up to the backup's end is
/// replayed over them, so history is valid from that end LSN; `run` streams that WAL (and
/// everything after) from the slot.
///
/// Into a store that already holds this cluster's history (one whose WAL was lost: an
/// invalidated slot), it continues that history after a recorded gap: reads before the gap
/// work as before, reads inside it are refused, reads after it come from this backup.
pub fn attach(args: &AttachArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let recorded = SidecarConf::read(&args.store)?;
    let rc = args.compute.replication("neon-sidecar attach", &recorded)?;
    let slot = &args.compute.slot(&recorded);
    let mut conn = ReplicationConn::connect(&rc)?;
    let sys = conn.identify_system()?;
    let existing = match Store::open(&args.store) {
        Ok(s) => Some(s),
        Err(StoreError::NotSetUp { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if let Some(store) = &existing {
        store.identity().check(store.dir(), sys.system_id)?;
    }
    let slot_lsn = match conn.read_slot(slot)? {
        Slot::Reserving(l) => l,
        Slot::Missing => conn.create_slot(slot)?,
        Slot::Invalidated => {
            // The operator asked for history to go on: a slot that keeps WAL again.
            conn.drop_slot(slot)?;
            writeln!(out, "slot {slot} was invalidated by the server: dropped and made again")?;
            conn.create_slot(slot)?
        }
    };
    let created = existing.is_none();
    let store = match existing {
        Some(s) => s,
        None => {
            let rows = conn.command("SHOW wal_segment_size")?;
            let text = rows.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_default();
            let mb: u32 = text.strip_suffix("MB").and_then(|n| n.parse().ok()).context("wal_segment_size")?;
            Store::create(&args.store, Identity { system_id: sys.system_id, wal_segment_size: mb << 20 }, sys.timeline)?
        }
    };
    let t = match store.timeline(sys.timeline) {
        Some(t) => t,
        // A timeline the store has not seen, reached only through lost WAL: its own history
        // starts with this backup.
        None => store.fork_unrelated(sys.timeline)?,
    };
    let (timeline, gap_from) = (t.id(), t.history_start().is_valid().then(|| t.last_lsn()));
    // Backups unpacked by attaches that died (the store's lock is ours: none runs now).
    for e in std::fs::read_dir(&args.store)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("attach-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let unpacked = args.store.join(format!("attach-{}", std::process::id()));
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
        match gap_from {
            // Recorded before anything of the backup is, and written with it by one flush.
            Some(from) => {
                anyhow::ensure!(
                    from < b.start,
                    "the store's timeline {} ends at {from}, after the backup's start {}",
                    t.id(),
                    b.start
                );
                t.add_gap(Gap { from, base: b.start, to: b.end })
            }
            None => t.restrict_history(b.end),
        }
        let stats = import_datadir(&t, &unpacked, b.start, &b.tablespaces)?;
        t.flush()?;
        store.set_current(t.id())?;
        Ok((b, stats))
    });
    let _ = std::fs::remove_dir_all(&unpacked);
    if imported.is_err() && created {
        // Not set up, then: the next attach starts afresh.
        let _ = store.abandon();
    } else {
        drop(store);
    }
    let cfg = args.redo.config("attach")?;
    // Even when it failed: a store made here must be the server user's to try again as.
    let (b, stats) = imported.inspect_err(|_| {
        let _ = give_to_server_user(&args.store, &cfg);
    })?;
    let (socket, shared_dir) = args.serve.prepare(&args.store, &cfg)?;
    SidecarConf {
        host: Some(rc.host.clone()),
        port: Some(rc.port),
        user: Some(rc.user.clone()),
        slot: Some(slot.clone()),
        socket: Some(socket.clone()),
        shared_dir: Some(shared_dir.clone()),
        ..recorded
    }
    .write(&args.store)?;
    give_to_server_user(&args.store, &cfg)?;
    if let Some(from) = gap_from {
        writeln!(out, "timeline {timeline}: history after {from} was lost; it goes on from {} (a gap between)", b.end)?;
    }
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
    // A server of its own: its settings are its operator's to change.
    let block = settings(&socket, &shared_dir, None);
    writeln!(out, "add to the compute's postgresql.conf (then restart it) unless it has them:{block}")?;
    writeln!(out, "then: neon-sidecar run --store {}", args.store.display())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_block_is_written_once() {
        let block = settings(Path::new("/run/s.sock"), Path::new("/srv/shared"), Some(5433));
        let conf = "max_connections = 20\n";
        let once = with_settings(conf, &block).unwrap();
        assert!(once.starts_with(conf) && once.ends_with(&block));
        assert_eq!(with_settings(&once, &block), None, "already there");
        let other = settings(Path::new("/run/t.sock"), Path::new("/srv/shared"), None);
        let moved = with_settings(&once, &other).unwrap();
        assert_eq!(moved.matches(SETTINGS_BEGIN).count(), 1);
        assert!(moved.contains("/run/t.sock") && !moved.contains("/run/s.sock"));
        // Settings the user wrote after the block still come after it (and win).
        let later = format!("{once}shared_preload_libraries = 'neon,pg_stat_statements'\n");
        let again = with_settings(&later, &other).unwrap();
        assert!(again.ends_with("shared_preload_libraries = 'neon,pg_stat_statements'\n"), "{again}");
        assert_eq!(with_settings(&later, &block), None);
        // A block from before the end marker: replaced whole, what follows kept.
        let legacy = format!("{conf}\n{SETTINGS_BEGIN}\nwal_level = replica\nneon.shared_dir = '/x'\nwork_mem = 8MB\n");
        let fixed = with_settings(&legacy, &block).unwrap();
        assert_eq!(fixed.matches(SETTINGS_BEGIN).count(), 1);
        assert!(fixed.contains("work_mem = 8MB") && !fixed.contains("'/x'"));
    }
}
