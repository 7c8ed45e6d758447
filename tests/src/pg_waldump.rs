//! Reading PostgreSQL's own `pg_waldump` output: the oracle our decoder is compared with.
//! Default record lines and `--stats` tables, PostgreSQL 15 layout
//! (src/bin/pg_waldump/pg_waldump.c, `XLogDumpDisplayRecord` and `XLogDumpStatsRow`).

use neon_types::Lsn;
use regex::Regex;
use std::sync::OnceLock;

/// What `pg_waldump` prints about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaldumpRecord {
    pub lsn: Lsn,
    pub rmgr: String,
    /// Record length without full-page images.
    pub rec_len: u32,
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    /// The rmgr's identify string ("INSERT+INIT", "UNKNOWN (30)", ...).
    pub record_type: String,
    pub blocks: Vec<WaldumpBlock>,
}

/// One `blkref #N: rel S/D/R [fork F] blk B [FPW]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaldumpBlock {
    pub block_id: u8,
    /// `spc/db/rel`.
    pub rel: String,
    /// Fork name; "main" when pg_waldump leaves it out.
    pub fork: String,
    pub blkno: u32,
    pub has_image: bool,
}

fn line_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"^rmgr: (\S+)\s+len \(rec/tot\):\s*(\d+)/\s*(\d+), tx:\s*(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), prev ([0-9A-F]+/[0-9A-F]+), desc: (.*)$",
        )
        .expect("valid regex")
    })
}

fn blk_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"blkref #(\d+): rel (\d+/\d+/\d+)(?: fork (\w+))? blk (\d+)( FPW)?").expect("valid regex")
    })
}

/// Parses every record line of `pg_waldump`'s default output; other lines are skipped.
/// Panics on a record line it cannot read, since that means the oracle changed under us.
pub fn parse_records(out: &str) -> Vec<WaldumpRecord> {
    out.lines()
        .filter(|l| l.starts_with("rmgr: "))
        .map(|line| {
            let c = line_re().captures(line).unwrap_or_else(|| panic!("unreadable pg_waldump line: {line}"));
            let desc = &c[7];
            let record_type = if desc.starts_with("UNKNOWN (") {
                desc[..desc.find(')').map_or(desc.len(), |i| i + 1)].to_string()
            } else {
                desc.split(' ').next().unwrap_or_default().trim_end_matches(',').to_string()
            };
            let blocks = blk_re()
                .captures_iter(desc)
                .map(|b| WaldumpBlock {
                    block_id: b[1].parse().expect("digits"),
                    rel: b[2].to_string(),
                    fork: b.get(3).map_or("main", |m| m.as_str()).to_string(),
                    blkno: b[4].parse().expect("digits"),
                    has_image: b.get(5).is_some(),
                })
                .collect();
            WaldumpRecord {
                lsn: c[5].parse().expect("pg_waldump LSN"),
                rmgr: c[1].to_string(),
                rec_len: c[2].parse().expect("digits"),
                tot_len: c[3].parse().expect("digits"),
                xid: c[4].parse().expect("digits"),
                prev: c[6].parse().expect("pg_waldump LSN"),
                record_type,
                blocks,
            }
        })
        .collect()
}

/// One row of a `--stats` table: name, count, record bytes, FPI bytes, combined bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsRow {
    pub name: String,
    pub count: u64,
    pub rec_len: u64,
    pub fpi_len: u64,
    pub total_len: u64,
}

/// Parses the rows (not the header or total) of a `--stats` or `--stats=record` table.
pub fn parse_stats(out: &str) -> Vec<StatsRow> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(
            r"^(\S.*?)\s+(\d+) \(\s*[\d.]+\)\s+(\d+) \(\s*[\d.]+\)\s+(\d+) \(\s*[\d.]+\)\s+(\d+) \(\s*[\d.]+\)\s*$",
        )
        .expect("valid regex")
    });
    out.lines()
        .filter_map(|l| re.captures(l))
        .map(|c| StatsRow {
            name: c[1].to_string(),
            count: c[2].parse().expect("digits"),
            rec_len: c[3].parse().expect("digits"),
            fpi_len: c[4].parse().expect("digits"),
            total_len: c[5].parse().expect("digits"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_record_lines() {
        let out = "first record is after 0/1000000, at 0/1000028, skipping over 40 bytes\n\
rmgr: Heap        len (rec/tot):     54/   150, tx:        734, lsn: 0/01000028, prev 0/00000000, desc: INSERT+INIT off 1 flags 0x00, blkref #0: rel 1663/5/16384 blk 0 FPW\n\
rmgr: Heap2       len (rec/tot):     59/    59, tx:          0, lsn: 0/010000C0, prev 0/01000028, desc: VISIBLE cutoff xid 734 flags 0x01, blkref #0: rel 1663/5/16384 fork vm blk 0, blkref #1: rel 1663/5/16384 blk 0\n";
        let recs = parse_records(out);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].record_type, "INSERT+INIT");
        assert_eq!(recs[0].lsn, Lsn(0x0100_0028));
        assert!(recs[0].blocks[0].has_image);
        assert_eq!(recs[1].blocks[0].fork, "vm");
        assert_eq!(recs[1].blocks[1].fork, "main");
        assert_eq!(recs[1].prev, Lsn(0x0100_0028));
    }

    #[test]
    fn reads_stats_rows() {
        let out = "Type                                           N      (%)          Record size      (%)             FPI size      (%)        Combined size      (%)\n\
----                                           -      ---          -----------      ---             --------      ---        -------------      ---\n\
XLOG                                           3 ( 11.54)                  336 (  7.51)                    0 (  0.00)                  336 (  7.51)\n\
Heap/UNKNOWN (f0)                              1 (  1.00)                    1 (  1.00)                    0 (  0.00)                    1 (  1.00)\n\
                                        --------                      --------                      --------                      --------\n\
Total                                         26                          4475 [100.00%]                    0 [0.00%]                  4475 [100%]\n";
        let rows = parse_stats(out);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], StatsRow { name: "XLOG".into(), count: 3, rec_len: 336, fpi_len: 0, total_len: 336 });
        assert_eq!(rows[1].name, "Heap/UNKNOWN (f0)");
    }
}
