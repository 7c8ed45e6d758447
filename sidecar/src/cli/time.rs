//! `neon-sidecar lsn-at` and `time-at`: times as LSNs (where PostgreSQL's recovery to that
//! time stops) and the transaction end times around an LSN, from a running sidecar or a
//! store's files (see `repo::point_in_time`).

use crate::cli::store::{ask, SourceArgs, TimelineArg};
use crate::repo::commit_times::Entry;
use crate::repo::point_in_time;
use crate::repo::store::Store;
use anyhow::bail;
use neon_types::protocol::{Request, Response};
use neon_types::{Lsn, PgTime};
use std::io::Write;
use std::sync::Arc;

/// Parses a time as `PgTime::parse` does (no zone offset: UTC).
fn time_arg(s: &str) -> Result<PgTime, String> {
    PgTime::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, clap::Args)]
pub struct LsnAtArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub timeline: TimelineArg,
    /// The time, e.g. "2026-12-03 10:42:00+01" (no offset: UTC).
    #[arg(long, value_parser = time_arg)]
    pub time: PgTime,
    /// Stop before a transaction that ended exactly at the time too
    /// (`recovery_target_inclusive = off`).
    #[arg(long)]
    pub exclusive: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TimeAtArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub timeline: TimelineArg,
    #[arg(long)]
    pub lsn: Lsn,
}

/// Prints the LSN where recovery to the time stops.
pub fn lsn_at(args: &LsnAtArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let lsn = match (&args.source.socket, &args.source.store) {
        (Some(socket), _) => {
            let req = Request::LsnAt { time: args.time, inclusive: !args.exclusive, clock: None, wait_ms: 0 };
            match ask(socket, &args.timeline.request(req))? {
                Response::Lsn(lsn) => lsn,
                r => bail!("unexpected answer {r:?}"),
            }
        }
        (None, Some(dir)) => {
            let store = Store::open_read_only(dir)?;
            let (t, _) = args.timeline.of(&store)?;
            // The files alone say nothing of the compute's clock: a time after the last
            // transaction end on the followed timeline is not known to have happened.
            let live = Arc::ptr_eq(&t, &store.current());
            point_in_time::lsn_at(&t, args.time, !args.exclusive, live)?
        }
        (None, None) => bail!("--socket or --store"),
    };
    writeln!(out, "{lsn}")?;
    Ok(())
}

/// Prints the transaction ends before and at or after the LSN: `before|after LSN TIME`, or
/// `before|after -` where there is none.
pub fn time_at(args: &TimeAtArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let (before, after) = match (&args.source.socket, &args.source.store) {
        (Some(socket), _) => match ask(socket, &args.timeline.request(Request::TimeAt { lsn: args.lsn }))? {
            Response::Commits { before, after } => (before, after),
            r => bail!("unexpected answer {r:?}"),
        },
        (None, Some(dir)) => {
            let store = Store::open_read_only(dir)?;
            let (t, _) = args.timeline.of(&store)?;
            let (b, a) = point_in_time::around(&t, args.lsn)?;
            let pair = |e: Entry| (e.lsn, e.time);
            (b.map(pair), a.map(pair))
        }
        (None, None) => bail!("--socket or --store"),
    };
    for (name, e) in [("before", before), ("after", after)] {
        match e {
            Some((lsn, time)) => writeln!(out, "{name}\t{lsn}\t{time}")?,
            None => writeln!(out, "{name}\t-")?,
        }
    }
    Ok(())
}
