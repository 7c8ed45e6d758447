//! `neon-sidecar redo`: rebuild one page by hand, the way `pg_waldump` lets one read WAL by
//! hand. It collects every record for a block from WAL files (its page-level records and the
//! Rust-native ones derived for it), applies them to a base page (a file) or to nothing, through
//! a real wal-redo process, and writes the page to a file or describes it.

use crate::cli::args::{BlockArgs, RedoProcessArgs};
use crate::wal::segment::{SegmentSet, WalFileReader};
use crate::walredo::{redo_records_of, PostgresRedoManager, RedoRequest, WalRedoManager};
use anyhow::{bail, Context};
use bytes::Bytes;
use neon_types::{Lsn, BLCKSZ};
use std::io::Write;
use std::path::PathBuf;

/// What to rebuild.
#[derive(Debug, Clone, clap::Args)]
pub struct RedoArgs {
    #[command(flatten)]
    pub block: BlockArgs,
    /// Apply records starting at or after this LSN (the base page's LSN, usually).
    #[arg(long)]
    pub start: Lsn,
    /// Apply records ending at or before this LSN: the page as of then.
    #[arg(long)]
    pub end: Option<Lsn>,
    /// The base page (8192 bytes); without it the first record must initialise the page.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Write the page here instead of describing it.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub redo: RedoProcessArgs,
    /// WAL segment files or directories holding them.
    #[arg(required = true)]
    pub wal: Vec<PathBuf>,
}

/// Page header fields and item count, for a quick look.
pub fn describe_page(page: &[u8; BLCKSZ]) -> String {
    use neon_types::page::{header_u16, page_lsn};
    let (lower, upper, special) = (header_u16(page, 12), header_u16(page, 14), header_u16(page, 16));
    if page.iter().all(|&b| b == 0) {
        return "an all-zero (new) page".into();
    }
    format!(
        "lsn {}, checksum {:#06x}, flags {:#06x}, lower {lower}, upper {upper}, special {special}, {} line pointers",
        page_lsn(page),
        header_u16(page, 8),
        header_u16(page, 10),
        lower.saturating_sub(24) / 4
    )
}

pub fn run(args: &RedoArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let tag = args.block.tag()?;
    let base = match &args.base {
        Some(path) => {
            let b = std::fs::read(path).with_context(|| format!("reading base page {}", path.display()))?;
            if b.len() != BLCKSZ {
                bail!("base page {} has {} bytes, expected {BLCKSZ}", path.display(), b.len());
            }
            Some(Bytes::from(b))
        }
        None => None,
    };
    let mut records = Vec::new();
    let mut reader = WalFileReader::new(SegmentSet::collect(&args.wal, None)?, Some(args.start), args.end)?;
    while let Some(rec) = reader.next_record()? {
        redo_records_of(&rec, |t, r| {
            if t == tag {
                records.push(r);
            }
        })?;
    }
    if records.is_empty() && base.is_none() {
        bail!("no record for {tag} between {} and {} and no base page", args.start, reader.end_of_valid_wal());
    }
    let cfg = args.redo.config("redo")?;
    let n = records.len();
    let manager = PostgresRedoManager::new(cfg)?;
    let page = manager.redo(RedoRequest { target: tag, base, records })?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, &page[..]).with_context(|| format!("writing {}", path.display()))?;
            writeln!(out, "{tag}: {n} records applied, page written to {}", path.display())?;
        }
        None => writeln!(out, "{tag}: {n} records applied; {}", describe_page(&page))?,
    }
    Ok(())
}
