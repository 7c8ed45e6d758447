//! The store's commands: `neon-sidecar run` (follow a compute into a store), `get-page` (a page
//! at an LSN from a store) and `status` (what a store holds).

use crate::cli_args::{BlockArgs, RedoProcessArgs};
use crate::follower::{self, FollowerConfig};
use crate::ingest::replication::ReplicationConfig;
use crate::redo_cli::describe_page;
use crate::repo::reconstruct::get_page;
use crate::repo::store::Repository;
use crate::walredo::PostgresRedoManager;
use anyhow::{bail, Context};
use neon_types::Lsn;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The compute: a unix socket directory or a host name.
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value_t = 5432)]
    pub port: u16,
    #[arg(long, default_value = "postgres")]
    pub user: String,
    /// A file holding the password, if the compute asks for one.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// The store directory.
    #[arg(long)]
    pub store: PathBuf,
    /// The replication slot the sidecar owns.
    #[arg(long, default_value = "neon_sidecar")]
    pub slot: String,
    /// Flush (make durable and report to the compute) at least this often, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub flush_ms: u64,
    /// Flush after this many MB of WAL.
    #[arg(long, default_value_t = 64)]
    pub flush_mb: u64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct GetPageArgs {
    #[arg(long)]
    pub store: PathBuf,
    #[command(flatten)]
    pub block: BlockArgs,
    /// The LSN (default: the store's durable LSN).
    #[arg(long)]
    pub lsn: Option<Lsn>,
    /// Write the page here instead of describing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub store: PathBuf,
}

pub fn run(args: &RunArgs) -> anyhow::Result<()> {
    let password = match &args.password_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_string())
        }
        None => None,
    };
    let cfg = FollowerConfig {
        replication: ReplicationConfig {
            host: args.host.clone(),
            port: args.port,
            user: args.user.clone(),
            password,
            application_name: "neon-sidecar".into(),
        },
        store: args.store.clone(),
        slot: args.slot.clone(),
        flush_interval: Duration::from_millis(args.flush_ms),
        flush_bytes: args.flush_mb << 20,
    };
    let stop = AtomicBool::new(false);
    follower::run(&cfg, &stop)?;
    Ok(())
}

pub fn get(args: &GetPageArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let repo = Repository::open_read_only(&args.store)?;
    let lsn = args.lsn.unwrap_or(repo.durable_lsn());
    if lsn > repo.durable_lsn() {
        bail!("{lsn} is beyond what the store holds (durable to {})", repo.durable_lsn());
    }
    let tag = args.block.tag()?;
    let cfg = args.redo.config("get-page")?;
    let redo = PostgresRedoManager::new(cfg)?;
    let page = get_page(&repo, &redo, tag, lsn)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, &page[..])?;
            writeln!(out, "{tag} at {lsn}: written to {}", path.display())?;
        }
        None => writeln!(out, "{tag} at {lsn}: {}", describe_page(&page))?,
    }
    Ok(())
}

pub fn status(args: &StatusArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let repo = Repository::open_read_only(&args.store)?;
    let bytes: u64 = repo.layers().iter().filter_map(|l| std::fs::metadata(l.path()).ok()).map(|m| m.len()).sum();
    writeln!(out, "store {}", args.store.display())?;
    writeln!(out, "history {} to {} (durable)", repo.history_start(), repo.durable_lsn())?;
    writeln!(out, "layer files {} ({bytes} bytes)", repo.layers().len())?;
    Ok(())
}
