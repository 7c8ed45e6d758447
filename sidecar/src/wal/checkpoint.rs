//! PostgreSQL's `CheckPoint` (catalog/pg_control.h): the main data of checkpoint records and
//! `pg_control`'s copy of the last one. The page store keeps one, versioned by LSN, as the
//! cluster's counters (next xid, OID and multixact, the oldest ones still live), kept current
//! the way redo keeps `ShmemVariableCache` current; base backups write it into their
//! generated `pg_control` and shutdown-checkpoint record.
//!
//! ```text
//! layout (88 bytes, x86-64 alignment, little-endian):
//!   0 redo u64 | 8 ThisTimeLineID u32 | 12 PrevTimeLineID u32 | 16 fullPageWrites bool |
//!  24 nextXid u64 (epoch << 32 | xid) | 32 nextOid | 36 nextMulti | 40 nextMultiOffset |
//!  44 oldestXid | 48 oldestXidDB | 52 oldestMulti | 56 oldestMultiDB | 64 time i64 |
//!  72 oldestCommitTsXid | 76 newestCommitTsXid | 80 oldestActiveXid | 84 padding
//! pg_control (ControlFileData): 0 system_identifier u64 | 8 pg_control_version u32 |
//!  12 catalog_version_no u32 | 16 state u32 | 24 time i64 | 32 checkPoint u64 |
//!  40 checkPointCopy (above)
//! ```

use neon_types::{Lsn, TransactionId};

pub const SIZEOF_CHECKPOINT: usize = 88;
/// Where `checkPointCopy` sits in `pg_control`.
pub const CONTROL_CHECKPOINT_COPY: usize = 40;
/// Where `checkPoint` (the LSN of the last checkpoint record) sits in `pg_control`.
pub const CONTROL_CHECKPOINT_LSN: usize = 32;

const FIRST_NORMAL_TRANSACTION_ID: u32 = 3;
const FIRST_MULTIXACT_ID: u32 = 1;

/// `CheckPoint`, field for field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CheckPoint {
    pub redo: Lsn,
    pub this_timeline: u32,
    pub prev_timeline: u32,
    pub full_page_writes: bool,
    /// `FullTransactionId`: epoch in the high 32 bits.
    pub next_xid: u64,
    pub next_oid: u32,
    pub next_multi: u32,
    pub next_multi_offset: u32,
    pub oldest_xid: TransactionId,
    pub oldest_xid_db: u32,
    pub oldest_multi: u32,
    pub oldest_multi_db: u32,
    pub time: i64,
    pub oldest_commit_ts_xid: TransactionId,
    pub newest_commit_ts_xid: TransactionId,
    pub oldest_active_xid: TransactionId,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a CheckPoint is {SIZEOF_CHECKPOINT} bytes, not {0}")]
pub struct CheckPointSizeError(pub usize);

/// `TransactionIdPrecedes` for normal xids: modulo-2^32 comparison.
fn xid_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `MultiXactIdPrecedes`.
fn multi_precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl CheckPoint {
    pub fn decode(b: &[u8]) -> Result<CheckPoint, CheckPointSizeError> {
        if b.len() != SIZEOF_CHECKPOINT {
            return Err(CheckPointSizeError(b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        Ok(CheckPoint {
            redo: Lsn(u64_at(0)),
            this_timeline: u32_at(8),
            prev_timeline: u32_at(12),
            full_page_writes: b[16] != 0,
            next_xid: u64_at(24),
            next_oid: u32_at(32),
            next_multi: u32_at(36),
            next_multi_offset: u32_at(40),
            oldest_xid: u32_at(44),
            oldest_xid_db: u32_at(48),
            oldest_multi: u32_at(52),
            oldest_multi_db: u32_at(56),
            time: u64_at(64) as i64,
            oldest_commit_ts_xid: u32_at(72),
            newest_commit_ts_xid: u32_at(76),
            oldest_active_xid: u32_at(80),
        })
    }

    pub fn encode(&self) -> [u8; SIZEOF_CHECKPOINT] {
        let mut b = [0u8; SIZEOF_CHECKPOINT];
        let mut put = |o: usize, v: &[u8]| b[o..o + v.len()].copy_from_slice(v);
        put(0, &self.redo.0.to_le_bytes());
        put(8, &self.this_timeline.to_le_bytes());
        put(12, &self.prev_timeline.to_le_bytes());
        put(16, &[u8::from(self.full_page_writes)]);
        put(24, &self.next_xid.to_le_bytes());
        put(32, &self.next_oid.to_le_bytes());
        put(36, &self.next_multi.to_le_bytes());
        put(40, &self.next_multi_offset.to_le_bytes());
        put(44, &self.oldest_xid.to_le_bytes());
        put(48, &self.oldest_xid_db.to_le_bytes());
        put(52, &self.oldest_multi.to_le_bytes());
        put(56, &self.oldest_multi_db.to_le_bytes());
        put(64, &self.time.to_le_bytes());
        put(72, &self.oldest_commit_ts_xid.to_le_bytes());
        put(76, &self.newest_commit_ts_xid.to_le_bytes());
        put(80, &self.oldest_active_xid.to_le_bytes());
        b
    }

    /// The 32-bit next xid.
    pub fn next_xid32(&self) -> TransactionId {
        self.next_xid as u32
    }

    /// Makes `nextXid` follow `xid`, a transaction id seen in WAL, as redo's
    /// `AdvanceNextFullTransactionIdPastXid` does: the epoch goes up when the 32-bit value wraps.
    /// Returns whether it moved.
    pub fn advance_next_xid_past(&mut self, xid: TransactionId) -> bool {
        if xid < FIRST_NORMAL_TRANSACTION_ID || xid_precedes(xid, self.next_xid32()) {
            return false;
        }
        let mut epoch = self.next_xid >> 32;
        if xid < self.next_xid32() {
            epoch += 1;
        }
        // FullTransactionIdAdvance: a 64-bit increment that skips the special xids.
        let mut next = (epoch << 32 | u64::from(xid)) + 1;
        while (next as u32) < FIRST_NORMAL_TRANSACTION_ID {
            next += 1;
        }
        self.next_xid = next;
        true
    }

    /// `MultiXactAdvanceNextMXact`: both move forward only.
    pub fn advance_next_multi(&mut self, next_multi: u32, next_offset: u32) -> bool {
        let mut moved = false;
        let next_multi = next_multi.max(FIRST_MULTIXACT_ID);
        if multi_precedes(self.next_multi, next_multi) {
            self.next_multi = next_multi;
            moved = true;
        }
        if (self.next_multi_offset.wrapping_sub(next_offset) as i32) < 0 {
            self.next_multi_offset = next_offset;
            moved = true;
        }
        moved
    }

    /// What replaying checkpoint record `rec` (shutdown or online) does to the counters, as
    /// `xlog_redo` does: a shutdown checkpoint sets them; an online one only moves nextXid,
    /// the multixact counters and the oldest ones forward, and leaves nextOid to NEXTOID
    /// records (it may be older than one of those).
    pub fn apply_checkpoint_record(&mut self, rec: &CheckPoint, shutdown: bool) {
        let mut next = *rec;
        if !shutdown {
            if xid_precedes(rec.next_xid32(), self.next_xid32()) || rec.next_xid < self.next_xid {
                next.next_xid = self.next_xid;
            }
            next.next_oid = self.next_oid;
            if multi_precedes(rec.next_multi, self.next_multi) {
                next.next_multi = self.next_multi;
            }
            if (rec.next_multi_offset.wrapping_sub(self.next_multi_offset) as i32) < 0 {
                next.next_multi_offset = self.next_multi_offset;
            }
            if xid_precedes(rec.oldest_xid, self.oldest_xid) {
                next.oldest_xid = self.oldest_xid;
                next.oldest_xid_db = self.oldest_xid_db;
            }
            if multi_precedes(rec.oldest_multi, self.oldest_multi) {
                next.oldest_multi = self.oldest_multi;
                next.oldest_multi_db = self.oldest_multi_db;
            }
        }
        *self = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_advances() {
        let mut c = CheckPoint { next_xid: 1000, next_multi: 1, next_oid: 20000, ..Default::default() };
        let b = c.encode();
        assert_eq!(CheckPoint::decode(&b).unwrap(), c);
        assert!(CheckPoint::decode(&b[..87]).is_err());
        assert!(!c.advance_next_xid_past(999));
        assert!(!c.advance_next_xid_past(2));
        assert!(c.advance_next_xid_past(1000));
        assert_eq!(c.next_xid, 1001);
        // Wrap-around: the epoch goes up and the special xids are skipped.
        c.next_xid = u64::from(u32::MAX - 1);
        assert!(c.advance_next_xid_past(u32::MAX));
        assert_eq!(c.next_xid, (1u64 << 32) | 3);
        assert!(c.advance_next_multi(5, 40));
        assert!(!c.advance_next_multi(4, 30));
        assert_eq!((c.next_multi, c.next_multi_offset), (5, 40));
        // An online checkpoint does not move counters backwards or touch nextOid.
        let old = CheckPoint { next_xid: 10, next_oid: 1, next_multi: 2, redo: Lsn(77), ..Default::default() };
        c.apply_checkpoint_record(&old, false);
        assert_eq!((c.next_oid, c.next_multi, c.redo), (20000, 5, Lsn(77)));
        assert_eq!(c.next_xid, (1u64 << 32) | 3);
        c.apply_checkpoint_record(&old, true);
        assert_eq!(c, old);
    }
}
