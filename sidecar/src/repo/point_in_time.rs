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
    // Read before the index: every transaction end up to here has been noted.
    let last = t.last_lsn();
    let timeline = t.id();
    let segments = lineage(t);
    let mut first: Option<Entry> = None;
    for (tl, from, to) in &segments {
        let times = tl.commit_times();
        if first.is_none() {
            first = times.around(*from, *to)?.1;
        }
        if let Some(e) = times.first_after(ts, inclusive, *to)? {
            if Some(e) == first {
                return Err(PointInTimeError::BeforeHistory { ts, timeline, earliest: e.time, at: e.lsn });
            }
            if let Err(Unreadable::Before { oldest }) = t.check_readable(e.lsn) {
                return Err(PointInTimeError::Removed { ts, timeline, lsn: e.lsn, oldest });
            }
            return Ok(e.lsn);
        }
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
