//! `neon-sidecar waldump`: our decoder's view of WAL files, one line per record in the spirit of
//! `pg_waldump` (same fields, same order, same spelling of LSNs, relations and record types), or
//! the `--stats` table. It is both a debugging tool and the decoder's outward face: its lines
//! and tables are what users compare with PostgreSQL's own.

use crate::wal::record::RecordView;
use crate::wal::rmgr::record_type;
use crate::wal::segment::{SegmentSet, WalFileReader};
use crate::wal::stats::{rmgr_name, WalStats};
use neon_types::{ForkNumber, Lsn};
use std::fmt::Write as _;
use std::io::Write;
use std::path::PathBuf;

/// What to dump.
#[derive(Debug, Clone, clap::Args)]
pub struct WaldumpArgs {
    /// First record at or after this LSN (default: start of the first segment).
    #[arg(short, long)]
    pub start: Option<Lsn>,
    /// Stop before records ending after this LSN.
    #[arg(short, long)]
    pub end: Option<Lsn>,
    /// Timeline to read (default: the lowest one found).
    #[arg(short, long)]
    pub timeline: Option<u32>,
    /// Print per-resource-manager totals instead of records; `--stats=record` per record type.
    #[arg(long, num_args = 0..=1, default_missing_value = "rmgr", value_parser = ["rmgr", "record"])]
    pub stats: Option<String>,
    /// Segment files or directories holding them (pg_wal, an archive).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// One record as a line: `rmgr: … len (rec/tot): …, tx: …, lsn: …, prev …, desc: TYPE, blkref …`.
pub fn format_record(rec: &RecordView<'_>) -> String {
    let fpi = rec.fpi_len();
    let mut s = format!(
        "rmgr: {:<11} len (rec/tot): {:>6}/{:>6}, tx: {:>10}, lsn: {}, prev {}, desc: ",
        rmgr_name(rec.header.rmid),
        rec.total_len() - fpi,
        rec.total_len(),
        rec.xid(),
        lsn_padded(rec.lsn),
        lsn_padded(rec.prev()),
    );
    match record_type(rec.header.rmid, rec.header.info) {
        Some(t) => s.push_str(t),
        None => {
            let _ = write!(s, "UNKNOWN ({:x})", rec.info());
        }
    }
    let main = rec.main_data().len();
    if main > 0 {
        let _ = write!(s, " main_data {main}");
    }
    for b in &rec.blocks {
        let _ = write!(s, ", blkref #{}: rel {}", b.block_id, b.tag.rel.node);
        if b.tag.rel.fork != ForkNumber::Main {
            let _ = write!(s, " fork {}", b.tag.rel.fork);
        }
        let _ = write!(s, " blk {}", b.tag.blkno);
        if let Some(img) = &b.image {
            s.push_str(if img.apply() { " FPW" } else { " FPW for WAL verification" });
        }
    }
    s
}

/// `pg_waldump` prints the low half zero-padded to 8 digits.
fn lsn_padded(l: Lsn) -> String {
    format!("{:X}/{:08X}", l.0 >> 32, l.0 & 0xffff_ffff)
}

/// Runs the command, writing to `out`; the reason decoding stopped goes to `err`.
pub fn run(args: &WaldumpArgs, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<()> {
    let set = SegmentSet::collect(&args.paths, args.timeline)?;
    let mut reader = WalFileReader::new(set, args.start, args.end)?;
    let mut stats = args.stats.as_ref().map(|_| WalStats::default());
    while let Some(rec) = reader.next_view()? {
        match stats.as_mut() {
            Some(st) => st.add(&rec),
            None => writeln!(out, "{}", format_record(&rec))?,
        }
    }
    if let Some(st) = &stats {
        write!(out, "{}", st.render(args.stats.as_deref() == Some("record")))?;
    }
    if let Some(reason) = reader.stop_reason() {
        writeln!(err, "waldump: stopped at {}: {}", reader.end_of_valid_wal(), reason)?;
    }
    Ok(())
}
