//! Times as LSNs on a timeline's lineage, placed as PostgreSQL's recovery places
//! `recovery_target_time` (xlogrecovery.c, `recoveryStopsBefore`): replay stops before the
//! first commit or abort record, in WAL order, whose `xact_time` is after the target (at or
//! after it with `recovery_target_inclusive = off`); the LSN answered is that record's start,
//! where the copy's history ends. And the other way: the transaction end times around an LSN.
//!
//! A lineage is searched root first, each ancestor up to its child's fork, as recovery along
//! a timeline history replays it. Where the answer would be the first transaction end the
//! sidecar holds, the time is before its history (what ended before that is unknown) — an
//! error naming the earliest time held. A time after every transaction end held is the end of
//! the WAL filed if the compute's clock has been seen past it with its WAL all filed (a
//! followed timeline), otherwise it has not happened yet as far as the sidecar knows.

use super::commit_times::{CommitTimesError, Entry};
use super::timeline::{Timeline, Unreadable};
use neon_types::{Lsn, PgTime};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PointInTimeError {
    #[error(transparent)]
    Index(#[from] CommitTimesError),
    #[error(
        "{ts} is before the history the sidecar holds for timeline {timeline}: the earliest transaction end it \
         holds is at {earliest} (the record at {at})"
    )]
    BeforeHistory { ts: PgTime, timeline: u32, earliest: PgTime, at: Lsn },
    #[error("no transaction has ended yet in the history the sidecar holds for timeline {timeline}, so {ts} cannot be placed")]
    NoTransactions { ts: PgTime, timeline: u32 },
    #[error(
        "{ts} has not happened yet as far as the sidecar knows: {clock}, and no transaction in the WAL filed up to {last} \
         on timeline {timeline} ended after {ts}"
    )]
    NotYet { ts: PgTime, timeline: u32, clock: String, last: Lsn },
    #[error(
        "{ts} falls at {lsn} on timeline {timeline}, before the oldest LSN still held ({oldest}): retention removed \
         that history"
    )]
    Removed { ts: PgTime, timeline: u32, lsn: Lsn, oldest: Lsn },
    #[error(
        "{ts} may fall in history the sidecar lost on timeline {timeline} (its WAL from {from} to {to} was gone \
         before the sidecar had it): which transactions ended by then is unknown"
    )]
    Lost { ts: PgTime, timeline: u32, from: Lsn, to: Lsn },
}

/// The timelines of `t`'s lineage, root first, each with the LSN range of its own WAL that
/// the lineage reads: `[from, to)`.
fn lineage(t: &Arc<Timeline>) -> Vec<(Arc<Timeline>, Lsn, Lsn)> {
    let mut out = vec![(t.clone(), Lsn(0), Lsn(u64::MAX))];
    let mut cur = t.clone();
    while let Some((parent, fork)) = cur.linked_parent() {
        out.last_mut().expect("one").1 = fork;
        out.push((parent.clone(), Lsn(0), fork));
        cur = parent;
    }
    out.reverse();
    out
}

/// Where recovery to `ts` stops on `t`'s lineage (see the module). `live`: `t` is the timeline
/// the sidecar follows, whose WAL goes on; another ends with its WAL.
pub fn lsn_at(t: &Arc<Timeline>, ts: PgTime, inclusive: bool, live: bool) -> Result<Lsn, PointInTimeError> {
    // Read before the index: every transaction end up to here has been noted, and only
    // those count (records starting before it are filed whole).
    let last = t.last_lsn();
    let timeline = t.id();
    let segments = lineage(t);
    let mut first: Option<Entry> = None;
    let mut hit = None;
    for (tl, from, to) in &segments {
        let times = tl.commit_times();
        let limit = (*to).min(last);
        if first.is_none() {
            first = times.around(*from, limit)?.1;
        }
        if let Some(e) = times.first_after(ts, inclusive, limit)? {
            hit = Some(e);
            break;
        }
    }
    // Lost WAL (a gap) held transaction ends nobody knows: a time whose answer would be the
    // first one after a gap, or that is after every one known with a gap after them, may fall
    // in it.
    for (tl, _, _) in &segments {
        for g in tl.gaps() {
            let after_gap = around(t, g.from)?.1.filter(|e| e.lsn < last);
            let lost = match hit {
                Some(e) => g.from < e.lsn && after_gap == Some(e),
                None => after_gap.is_none() && g.from < last,
            };
            if lost {
                return Err(PointInTimeError::Lost { ts, timeline, from: g.from, to: g.to });
            }
        }
    }
    if let Some(e) = hit {
        if Some(e) == first {
            return Err(PointInTimeError::BeforeHistory { ts, timeline, earliest: e.time, at: e.lsn });
        }
        if let Err(Unreadable::Before { oldest }) = t.check_readable(e.lsn) {
            return Err(PointInTimeError::Removed { ts, timeline, lsn: e.lsn, oldest });
        }
        return Ok(e.lsn);
    }
    if first.is_none() {
        return Err(PointInTimeError::NoTransactions { ts, timeline });
    }
    if !live {
        return Ok(last);
    }
    match t.clock_filed(last) {
        Some((clock, _)) if ts <= clock => Ok(last),
        Some((clock, at)) => Err(PointInTimeError::NotYet {
            ts,
            timeline,
            clock: format!("the compute's clock read {clock} when its WAL reached {at}"),
            last,
        }),
        None => Err(PointInTimeError::NotYet {
            ts,
            timeline,
            clock: "the compute's clock has not been heard with its WAL filed".into(),
            last,
        }),
    }
}

/// The last transaction end before `lsn` and the first at or after it, on `t`'s lineage
/// (records starting before / at or after `lsn`).
pub fn around(t: &Arc<Timeline>, lsn: Lsn) -> Result<(Option<Entry>, Option<Entry>), PointInTimeError> {
    let segments = lineage(t);
    let mut before = None;
    for (tl, _, to) in segments.iter().rev().filter(|(_, from, _)| *from < lsn) {
        if let (Some(b), _) = tl.commit_times().around(lsn.min(*to), *to)? {
            before = Some(b);
            break;
        }
    }
    let mut after = None;
    for (tl, from, to) in segments.iter().filter(|(_, _, to)| *to > lsn) {
        if let (_, Some(a)) = tl.commit_times().around(lsn.max(*from), *to)? {
            after = Some(a);
            break;
        }
    }
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::timeline::Gap;

    /// A timeline with transaction ends at LSNs 0x1000, 0x2000, ... (times 10, 20, ... s),
    /// parent of a child forked at 0x3800 (its own ends at 0x3900, 35 s, and 0x4000, 100 s); and, on the parent, WAL from 0x4800 to 0x6000 lost.
    fn lineage_with_a_gap() -> (tempfile::TempDir, Arc<Timeline>, Arc<Timeline>) {
        let dir = tempfile::tempdir().unwrap();
        let parent = Arc::new(Timeline::create(&dir.path().join("1"), 1, None).unwrap());
        parent.begin_history(Lsn(0x800));
        for k in 1..=8u64 {
            parent.note_commit(Lsn(k * 0x1000), Lsn(k * 0x1000 + 0x20), PgTime(k as i64 * 10_000_000));
        }
        parent.advance(Lsn(0x8100));
        parent.add_gap(Gap { from: Lsn(0x4800), base: Lsn(0x5000), to: Lsn(0x6000) });
        let child = Arc::new(Timeline::create(&dir.path().join("2"), 2, Some((1, Lsn(0x3800)))).unwrap());
        child.set_ancestor(parent.clone());
        child.note_commit(Lsn(0x3900), Lsn(0x3920), PgTime(35_000_000));
        child.note_commit(Lsn(0x4000), Lsn(0x4020), PgTime(100_000_000));
        child.advance(Lsn(0x4100));
        (dir, parent, child)
    }

    #[test]
    fn a_lineage_is_read_to_each_fork_and_lost_history_is_not_guessed() {
        let (_dir, parent, child) = lineage_with_a_gap();
        let at = |t: &Arc<Timeline>, secs: f64| lsn_at(t, PgTime((secs * 1e6) as i64), true, false);
        // The parent's ends up to the fork, then the child's own (its 35 s at 0x3900, not the
        // parent's 40 s at 0x4000).
        assert_eq!(at(&child, 15.0).unwrap(), Lsn(0x2000));
        assert_eq!(at(&child, 22.0).unwrap(), Lsn(0x3000));
        assert_eq!(at(&child, 31.0).unwrap(), Lsn(0x3900));
        assert_eq!(at(&child, 36.0).unwrap(), Lsn(0x4000));
        // Before the first end held: before history.
        assert!(matches!(at(&child, 5.0), Err(PointInTimeError::BeforeHistory { .. })));
        // On the parent: 45 s would be answered by the end after the gap (60 s at 0x6000), but
        // what ended in the lost WAL is unknown.
        assert_eq!(at(&parent, 35.0).unwrap(), Lsn(0x4000));
        assert!(matches!(at(&parent, 45.0), Err(PointInTimeError::Lost { .. })), "{:?}", at(&parent, 45.0));
        assert_eq!(at(&parent, 65.0).unwrap(), Lsn(0x7000));
        // After the last end of a timeline that no longer goes on: its end.
        assert_eq!(at(&parent, 95.0).unwrap(), Lsn(0x8100));
        // Around an LSN, across the fork.
        let (b, a) = around(&child, Lsn(0x3900)).unwrap();
        assert_eq!((b.unwrap().lsn, a.unwrap().lsn), (Lsn(0x3000), Lsn(0x3900)));
    }
}
