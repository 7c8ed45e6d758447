//! `neon-sidecar branch create|list|drop`: branches of a running sidecar (see `branch`),
//! over its socket.

use crate::cli::store::ask;
use anyhow::bail;
use neon_types::protocol::{BranchInfo, Request, Response};
use neon_types::Lsn;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct BranchArgs {
    #[command(subcommand)]
    pub command: BranchCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BranchCommand {
    /// A writable data directory as of an LSN, mounted; prints its id, LSN and path.
    Create {
        /// The running sidecar's socket.
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        lsn: Lsn,
        /// Where to mount it (an empty or new directory; default: in the shared directory).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// How long to wait for the LSN to arrive, in milliseconds.
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u32,
    },
    /// Every branch: id, LSN, timeline, blocks written, path.
    List {
        #[arg(long)]
        socket: PathBuf,
    },
    /// Unmount a branch and delete it (its server must be stopped).
    Drop {
        #[arg(long)]
        socket: PathBuf,
        id: u32,
    },
}

fn branches(r: Response) -> anyhow::Result<Vec<BranchInfo>> {
    match r {
        Response::Branches(b) => Ok(b),
        r => bail!("unexpected answer {r:?}"),
    }
}

/// One line a branch: id, LSN, timeline, blocks written, mount path; and, for a branch the
/// sidecar could not mount, why.
fn print(out: &mut dyn Write, b: &BranchInfo) -> std::io::Result<()> {
    write!(out, "{}\t{}\ttimeline {}\t{} blocks written\t{}", b.id, b.lsn, b.timeline, b.written_blocks, b.path)?;
    if !b.problem.is_empty() {
        // (One line a branch, whatever the reason says.)
        write!(out, "\t{}", b.problem.replace(|c: char| c.is_control(), " "))?;
    }
    writeln!(out)
}

pub fn run(args: &BranchArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    match &args.command {
        BranchCommand::Create { socket, lsn, mount, wait_ms } => {
            let mount = match mount {
                Some(m) => Some(
                    std::path::absolute(m)?
                        .to_str()
                        .map(str::to_string)
                        .ok_or_else(|| anyhow::anyhow!("mount point {} is not UTF-8", m.display()))?,
                ),
                None => None,
            };
            let made = branches(ask(socket, &Request::BranchCreate { lsn: *lsn, mount, wait_ms: *wait_ms })?)?;
            for b in &made {
                print(out, b)?;
            }
        }
        BranchCommand::List { socket } => {
            for b in branches(ask(socket, &Request::BranchList)?)? {
                print(out, &b)?;
            }
        }
        BranchCommand::Drop { socket, id } => {
            for b in branches(ask(socket, &Request::BranchDrop { id: *id })?)? {
                writeln!(out, "dropped branch {} (as of {}, was at {})", b.id, b.lsn, b.path)?;
            }
        }
    }
    Ok(())
}
