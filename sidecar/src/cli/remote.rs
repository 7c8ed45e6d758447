//! `neon-sidecar attach-remote --remote URL --store DIR`: a new store on this machine from
//! what a sidecar elsewhere uploaded (`remote::attach`); `run --remote URL` on it then serves
//! that history, fetching layer files as reads need them.

use crate::cli::args::RemoteArgs;
use anyhow::Context;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct AttachRemoteArgs {
    /// The store directory to make (absent or empty).
    #[arg(long)]
    pub store: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

pub fn attach_remote(args: &AttachRemoteArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let remote = args.remote.open()?.context("attach-remote needs --remote (s3://BUCKET/PREFIX or file:///DIR)")?;
    let a = crate::remote::attach::attach(&remote, &args.store)?;
    writeln!(
        out,
        "store {} set up from {} ({}, generation {}): {} timelines, {} layer files ({} bytes) to fetch when read, \
         history up to {}",
        args.store.display(),
        remote.describe(),
        a.index,
        a.generation,
        a.timelines,
        a.layer_files,
        a.layer_bytes,
        a.durable
    )?;
    writeln!(
        out,
        "next: neon-sidecar run --store {} --remote {} (with the compute's flags)",
        args.store.display(),
        remote.describe()
    )?;
    Ok(())
}
