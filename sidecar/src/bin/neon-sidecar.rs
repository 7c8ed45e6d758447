//! `neon-sidecar`: the sidecar daemon's command line. Each subcommand is a thin shell over the
//! library: `waldump` (the WAL decoder), `redo` (page reconstruction), and the store's `init`, `attach`, `run`,
//! `import-wal`, `get-page`, `status`, `basebackup`, `branch`, `lsn-at`, `time-at` and
//! `attach-remote`.

use clap::{Parser, Subcommand};
use sidecar::cli::branch::{self, BranchArgs};
use sidecar::cli::init::{self, AttachArgs, InitArgs};
use sidecar::cli::redo::{self, RedoArgs};
use sidecar::cli::remote::{self, AttachRemoteArgs};
use sidecar::cli::run::{self, RunArgs};
use sidecar::cli::store::{self, BasebackupArgs, GetPageArgs, ImportWalArgs, StatusArgs};
use sidecar::cli::time::{self, LsnAtArgs, TimeAtArgs};
use sidecar::cli::waldump::{self, WaldumpArgs};

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
    /// Prepare a compute (initdb if needed, settings, slot) and import it into a new store.
    Init(InitArgs),
    /// Take a running compute into a new store (BASE_BACKUP, import; history from its end).
    Attach(AttachArgs),
    /// Follow a compute's WAL through a replication slot into a store, serving pages.
    Run(Box<RunArgs>),
    /// Ingest WAL segment files (an archive, a pg_wal copy) into a store.
    ImportWal(ImportWalArgs),
    /// A page of a store as of an LSN.
    GetPage(GetPageArgs),
    /// What a store holds.
    Status(StatusArgs),
    /// A data directory as of an LSN, as a tar that stock PostgreSQL 15 starts from.
    Basebackup(BasebackupArgs),
    /// Writable data directories as of an LSN, served on demand (a running sidecar's).
    Branch(BranchArgs),
    /// The LSN where PostgreSQL's recovery to a time (recovery_target_time) stops.
    LsnAt(LsnAtArgs),
    /// The transaction end times before and after an LSN.
    TimeAt(TimeAtArgs),
    /// Set up a new store from a remote store (`run --remote` uploaded it elsewhere).
    AttachRemote(AttachRemoteArgs),
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
        Command::Redo(args) => redo::run(&args, &mut std::io::stdout()),
        Command::Init(args) => init::run(&args, &mut std::io::stdout()),
        Command::Attach(args) => init::attach(&args, &mut std::io::stdout()),
        Command::Run(args) => run::run(&args),
        Command::ImportWal(args) => store::import_wal(&args, &mut std::io::stdout()),
        Command::GetPage(args) => store::get(&args, &mut std::io::stdout()),
        Command::Status(args) => store::status(&args, &mut std::io::stdout()),
        Command::Basebackup(args) => store::basebackup(&args, &mut std::io::stdout()),
        Command::Branch(args) => branch::run(&args, &mut std::io::stdout()),
        Command::LsnAt(args) => time::lsn_at(&args, &mut std::io::stdout()),
        Command::TimeAt(args) => time::time_at(&args, &mut std::io::stdout()),
        Command::AttachRemote(args) => remote::attach_remote(&args, &mut std::io::stdout()),
    };
    if let Err(e) = result {
        eprintln!("neon-sidecar: error: {}", error_text(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: many errors already name their cause in their
/// own message (`writing the archive: No space left on device`), which `{:#}` would repeat.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}
