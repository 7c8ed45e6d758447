//! `neon-sidecar`: the sidecar daemon's command line. Each subcommand is a thin shell over the
//! library; for now it offers the WAL decoder's `waldump`.

use clap::{Parser, Subcommand};
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
    };
    if let Err(e) = result {
        eprintln!("neon-sidecar: error: {e:#}");
        std::process::exit(1);
    }
}
