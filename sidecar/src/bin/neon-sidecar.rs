//! `neon-sidecar`: the sidecar daemon's command line. Each subcommand is a thin shell over the
//! library: `waldump` (the WAL decoder) and `redo` (page reconstruction).

use clap::{Parser, Subcommand};
use sidecar::redo_cli::{self, RedoArgs};
use sidecar::waldump::{self, WaldumpArgs};

#[derive(Parser)]
#[command(name = "neon-sidecar", version, about = "Time-travel storage sidecar for PostgreSQL 15")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode WAL segment files and print their records (like pg_waldump), or --stats.
    Waldump(WaldumpArgs),
    /// Rebuild one page from a base page and the WAL, through a real wal-redo process.
    Redo(RedoArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Waldump(args) => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            waldump::run(&args, &mut out, &mut std::io::stderr()).and_then(|()| {
                use std::io::Write;
                out.flush().map_err(Into::into)
            })
        }
        Command::Redo(args) => redo_cli::run(&args, &mut std::io::stdout()),
    };
    if let Err(e) = result {
        eprintln!("neon-sidecar: error: {e:#}");
        std::process::exit(1);
    }
}
