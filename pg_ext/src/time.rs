//! Time in the user's words: `neon_lsn_at(ts)` — the LSN where PostgreSQL's recovery with
//! `recovery_target_time = ts` stops, answered by the sidecar from its index of transaction
//! ends — and `neon_time_at(lsn)`, the transaction end times around an LSN. The other
//! functions take a time wherever they take an LSN through [`point_arg`].

use crate::api::{ask, fail, on, on_text, required, timeline_arg, unexpected, wait_ms};
use crate::sqltypes::PgLsn;
use neon_types::protocol::{Request, Response};
use neon_types::{Lsn, PgTime};
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::prelude::*;

/// A `timestamptz` argument as WAL writes times; infinities are refused.
pub(crate) fn time_arg(ts: Option<TimestampWithTimeZone>, what: &str) -> PgTime {
    let ts = required(ts, what);
    if !ts.is_finite() {
        fail(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("{what} must be a finite time"), None);
    }
    PgTime(ts.into_inner())
}

fn timestamptz(t: PgTime) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(t.0).unwrap_or_else(|_| {
        fail(PgSqlErrorCode::ERRCODE_DATETIME_FIELD_OVERFLOW, format!("time {t} is out of range"), None)
    })
}

/// Where recovery to `time` stops, on `timeline` (`None`: the followed one), as the sidecar
/// answers; the compute's clock now and its WAL flush position go with the question, so a
/// time that has passed since the last transaction ended is known to have.
pub(crate) fn lsn_at(time: PgTime, inclusive: bool, timeline: Option<u32>) -> Lsn {
    // SAFETY: reads the clock; no state is touched.
    let now = PgTime(unsafe { pg_sys::GetCurrentTimestamp() });
    let clock = Some((now, crate::flush_lsn()));
    let what = format!("the LSN of {time}{}", on_text(timeline));
    match ask(
        &on(timeline, Request::LsnAt { time, inclusive, clock, wait_ms: wait_ms() }),
        &what,
        crate::api::lsn_call_timeout(),
    ) {
        Response::Lsn(lsn) => lsn,
        r => unexpected(&what, r),
    }
}

/// The LSN where PostgreSQL's recovery with `recovery_target_time = ts` would stop (before
/// the first commit or abort whose time is after `ts`; at or after it when not `inclusive`,
/// as `recovery_target_inclusive = off`): the state as of `ts`. A time after the last
/// transaction but already past is the end of the WAL the sidecar has; a time before its
/// history or still to come is an error.
#[pg_extern(volatile, parallel_safe)]
fn neon_lsn_at(
    ts: Option<TimestampWithTimeZone>,
    inclusive: default!(Option<bool>, "true"),
    timeline: default!(Option<i32>, "NULL"),
) -> PgLsn {
    let time = time_arg(ts, "ts");
    let inclusive = required(inclusive, "inclusive");
    PgLsn(lsn_at(time, inclusive, timeline_arg(timeline)))
}

/// The transaction ends around `lsn`: the last commit or abort record starting before it and
/// the first starting at or after it, each with its time (NULLs where there is none).
#[pg_extern(volatile, parallel_safe)]
#[allow(clippy::type_complexity)]
fn neon_time_at(
    lsn: Option<PgLsn>,
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(before_lsn, Option<PgLsn>),
        name!(before_time, Option<TimestampWithTimeZone>),
        name!(after_lsn, Option<PgLsn>),
        name!(after_time, Option<TimestampWithTimeZone>),
    ),
> {
    let lsn = crate::api::lsn_arg(lsn);
    let timeline = timeline_arg(timeline);
    let what = format!("transaction times around {lsn}{}", on_text(timeline));
    match ask(&on(timeline, Request::TimeAt { lsn }), &what, crate::api::lsn_call_timeout()) {
        Response::Commits { before, after } => {
            let split = |c: Option<(Lsn, PgTime)>| (c.map(|c| PgLsn(c.0)), c.map(|c| timestamptz(c.1)));
            let ((bl, bt), (al, at)) = (split(before), split(after));
            TableIterator::once((bl, bt, al, at))
        }
        r => unexpected(&what, r),
    }
}

extension_sql!(
    r#"
DO $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['neon_lsn_at(timestamptz, boolean, int4)', 'neon_time_at(pg_lsn, int4)'] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_read_server_files', f);
    END LOOP;
END $$;
COMMENT ON FUNCTION neon_lsn_at(timestamptz, boolean, int4) IS 'the LSN where recovery with recovery_target_time = ts stops: the state as of that time';
COMMENT ON FUNCTION neon_time_at(pg_lsn, int4) IS 'the transaction end times just before and at or after an LSN';
"#,
    name = "time_permissions",
    requires = [neon_lsn_at, neon_time_at]
);
