//! Per-resource-manager and per-record-type totals of decoded WAL, printed in the layout of
//! `pg_waldump --stats` so the two can be read side by side.

use super::record::RecordMeta;
use super::rmgr::{record_type, RmgrId};
use neon_types::Lsn;
use std::fmt::Write;

/// Counts and sizes for one row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsRow {
    pub count: u64,
    /// Bytes of the records without their full-page images.
    pub rec_len: u64,
    /// Bytes of full-page images.
    pub fpi_len: u64,
}

impl StatsRow {
    fn add(&mut self, rec_len: u64, fpi_len: u64) {
        self.count += 1;
        self.rec_len += rec_len;
        self.fpi_len += fpi_len;
    }

    pub fn total_len(&self) -> u64 {
        self.rec_len + self.fpi_len
    }
}

/// Totals over a range of WAL.
#[derive(Debug, Clone)]
pub struct WalStats {
    pub start: Lsn,
    pub end: Lsn,
    /// By resource manager id (custom ids included).
    pub rmgr: Box<[StatsRow; 256]>,
    /// By resource manager id and the high four bits of `xl_info`.
    pub record: Box<[[StatsRow; 16]; 256]>,
}

impl Default for WalStats {
    fn default() -> Self {
        WalStats {
            start: Lsn::INVALID,
            end: Lsn::INVALID,
            rmgr: Box::new([StatsRow::default(); 256]),
            record: Box::new([[StatsRow::default(); 16]; 256]),
        }
    }
}

impl WalStats {
    pub fn add(&mut self, rec: &RecordMeta) {
        if !self.start.is_valid() {
            self.start = rec.lsn;
        }
        self.end = rec.end_lsn;
        let fpi = rec.fpi_len() as u64;
        let rec_len = rec.total_len() as u64 - fpi;
        let rmid = rec.header.rmid as usize;
        self.rmgr[rmid].add(rec_len, fpi);
        let mut recid = rec.header.info >> 4;
        // Transaction records keep a flag in the top bit of their four; pg_waldump files them
        // by the three opcode bits alone (xlogstats.c).
        if rec.header.rmid == super::consts::RM_XACT_ID {
            recid &= 0x07;
        }
        self.record[rmid][recid as usize].add(rec_len, fpi);
    }

    pub fn total(&self) -> StatsRow {
        self.rmgr.iter().fold(StatsRow::default(), |mut t, r| {
            t.count += r.count;
            t.rec_len += r.rec_len;
            t.fpi_len += r.fpi_len;
            t
        })
    }

    /// The rows `pg_waldump --stats` prints: every built-in resource manager (zero or not) and
    /// custom ones that occurred; with `per_record`, each record type that occurred.
    pub fn rows(&self, per_record: bool) -> Vec<(String, StatsRow)> {
        let mut rows = Vec::new();
        for rmid in 0..=255u8 {
            let builtin = RmgrId::from_u8(rmid);
            let name = rmgr_name(rmid);
            if builtin.is_none() && self.rmgr[rmid as usize].count == 0 {
                continue;
            }
            if !per_record {
                rows.push((name, self.rmgr[rmid as usize]));
                continue;
            }
            for (hi, row) in self.record[rmid as usize].iter().enumerate() {
                if row.count > 0 {
                    let info = (hi as u8) << 4;
                    let ty =
                        record_type(rmid, info).map(str::to_string).unwrap_or_else(|| format!("UNKNOWN ({info:x})"));
                    rows.push((format!("{name}/{ty}"), *row));
                }
            }
        }
        rows
    }

    /// The table as `pg_waldump --stats[=record]` prints it.
    pub fn render(&self, per_record: bool) -> String {
        let total = self.total();
        let total_len = total.total_len();
        let pct = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                100.0 * part as f64 / whole as f64
            }
        };
        let mut out = String::new();
        let _ = writeln!(out, "WAL statistics between {} and {}:", self.start, self.end);
        let _ = writeln!(
            out,
            "{:<27} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8}",
            "Type", "N", "(%)", "Record size", "(%)", "FPI size", "(%)", "Combined size", "(%)"
        );
        let _ = writeln!(
            out,
            "{:<27} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8}",
            "----", "-", "---", "-----------", "---", "--------", "---", "-------------", "---"
        );
        for (name, r) in self.rows(per_record) {
            let _ = writeln!(
                out,
                "{:<27} {:>20} ({:>6.02}) {:>20} ({:>6.02}) {:>20} ({:>6.02}) {:>20} ({:>6.02})",
                name,
                r.count,
                pct(r.count, total.count),
                r.rec_len,
                pct(r.rec_len, total.rec_len),
                r.fpi_len,
                pct(r.fpi_len, total.fpi_len),
                r.total_len(),
                pct(r.total_len(), total_len)
            );
        }
        let _ = writeln!(
            out,
            "{:<27} {:>20} {:>8} {:>20} {:>8} {:>20} {:>8} {:>20}",
            "", "--------", "", "--------", "", "--------", "", "--------"
        );
        let _ = writeln!(
            out,
            "{:<27} {:>20} {:<9}{:>20} {:<9}{:>20} {:<9}{:>20} {:<6}",
            "Total",
            total.count,
            "",
            total.rec_len,
            format!("[{:.02}%]", pct(total.rec_len, total_len)),
            total.fpi_len,
            format!("[{:.02}%]", pct(total.fpi_len, total_len)),
            total_len,
            "[100%]",
        );
        out
    }
}

/// The name `pg_waldump` gives a resource manager id (`custom###` for extension ones).
pub fn rmgr_name(rmid: u8) -> String {
    match RmgrId::from_u8(rmid) {
        Some(r) => r.name().to_string(),
        None => format!("custom{rmid:03}"),
    }
}
