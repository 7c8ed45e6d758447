//! Time in the user's words: `neon_lsn_at(ts)` — the LSN where PostgreSQL's recovery with
//! `recovery_target_time = ts` stops, answered by the sidecar from its index of transaction
//! ends — and `neon_time_at(lsn)`, the transaction end times around an LSN.
//!
//! Every function that takes an LSN also takes a time: `timestamptz` overloads of
//! `neon_get_page`, `neon_rel_size`, `neon_basebackup` and `neon_branch_create` read as of
//! `neon_lsn_at(ts)`. A quoted literal (`'0/16B3748'`, `'2026-12-03 10:42+01'`) has no type,
//! and PostgreSQL cannot choose between `pg_lsn` and `timestamptz` for it: a `text` overload
//! takes it and reads it as an LSN if it has an LSN's shape, as a time otherwise.

use crate::api::{self, ask, fail, on, on_text, required, timeline_arg, unexpected, wait_ms};
use crate::sqltypes::{PgLsn, RegClass};
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
    // The clock first, then all WAL inserted by then flushed (a commit acknowledged without
    // a flush, `synchronous_commit = off`, included): every transaction that ended by `now`
    // is in WAL up to `end`. A server in recovery writes no WAL and says nothing of its clock.
    // SAFETY: reads the clock, the recovery state and the insert position; XLogFlush of a
    // position already inserted only writes and syncs WAL, as any commit does.
    let clock = unsafe {
        let now = PgTime(pg_sys::GetCurrentTimestamp());
        (!pg_sys::RecoveryInProgress()).then(|| {
            let end = pg_sys::GetXLogInsertRecPtr();
            pg_sys::XLogFlush(end);
            (now, Lsn(end))
        })
    };
    let what = format!("neon_lsn_at{}", on_text(timeline));
    match ask(
        &on(timeline, Request::LsnAt { time, inclusive, clock, wait_ms: wait_ms() }),
        &what,
        crate::api::lsn_call_timeout(),
    ) {
        Response::Lsn(lsn) => lsn,
        r => unexpected(&what, r),
    }
}

/// The LSN of a time argument, on `timeline` (what the function it is given to reads).
fn lsn_of_time(at: Option<TimestampWithTimeZone>, timeline: Option<i32>) -> PgLsn {
    PgLsn(lsn_at(time_arg(at, "at"), true, timeline_arg(timeline)))
}

/// An LSN or a time, as text: an LSN if it looks like one (`X/Y`, hexadecimal), otherwise a
/// time in PostgreSQL's input syntax (the session's `TimeZone` applying), as of which the
/// LSN is `neon_lsn_at` of it. `None` stays `None` (functions where NULL means now).
fn lsn_of_text(at: Option<&str>, timeline: Option<i32>) -> Option<PgLsn> {
    let text = at?.trim();
    let lsn_shaped = text.split_once('/').is_some_and(|(h, l)| {
        [h, l].iter().all(|p| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if lsn_shaped {
        return Some(PgLsn(text.parse().unwrap_or_else(|e| {
            fail(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION, format!("invalid LSN \"{text}\": {e}"), None)
        })));
    }
    let cstr = std::ffi::CString::new(text).unwrap_or_else(|_| {
        fail(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION, "a time must not contain NUL".into(), None)
    });
    let parsed = PgTryBuilder::new(|| {
        // SAFETY: timestamptz_in reads the C string and the two by-value arguments
        // (typioparam, typmod -1), as its SQL declaration says; it allocates nothing we keep.
        unsafe {
            pgrx::fcinfo::direct_function_call::<TimestampWithTimeZone>(
                pg_sys::timestamptz_in,
                &[cstr.as_c_str().into_datum(), pg_sys::InvalidOid.into_datum(), (-1i32).into_datum()],
            )
        }
    })
    .catch_others(|_| None)
    .execute();
    let Some(ts) = parsed else {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
            format!("\"{text}\" is neither an LSN (like 0/16B3748) nor a time (like 2026-12-03 10:42:00+01)"),
            None,
        )
    };
    Some(lsn_of_time(Some(ts), timeline))
}

/// An LSN or a time written as text, as the functions' `text` overloads read it (an LSN if it
/// has an LSN's shape, otherwise the LSN of the time); NULL stays NULL.
#[pg_extern(volatile, parallel_safe)]
fn neon_lsn_of(at: Option<&str>, timeline: default!(Option<i32>, "NULL")) -> Option<PgLsn> {
    lsn_of_text(at, timeline)
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

/// `neon_get_page` as of a time.
#[pg_extern(volatile, parallel_safe, name = "neon_get_page")]
fn neon_get_page_at_time(
    rel: Option<RegClass>,
    fork: Option<&str>,
    blkno: Option<i64>,
    at: Option<TimestampWithTimeZone>,
    timeline: default!(Option<i32>, "NULL"),
) -> Vec<u8> {
    api::neon_get_page(rel, fork, blkno, Some(lsn_of_time(at, timeline)), timeline)
}

/// `neon_get_page` as of an LSN or a time written as a literal.
#[pg_extern(volatile, parallel_safe, name = "neon_get_page")]
fn neon_get_page_at_text(
    rel: Option<RegClass>,
    fork: Option<&str>,
    blkno: Option<i64>,
    at: Option<&str>,
    timeline: default!(Option<i32>, "NULL"),
) -> Vec<u8> {
    api::neon_get_page(rel, fork, blkno, lsn_of_text(at, timeline), timeline)
}

/// `neon_rel_size` as of a time.
#[pg_extern(volatile, parallel_safe, name = "neon_rel_size")]
fn neon_rel_size_at_time(
    rel: Option<RegClass>,
    fork: Option<&str>,
    at: Option<TimestampWithTimeZone>,
    timeline: default!(Option<i32>, "NULL"),
) -> i64 {
    api::neon_rel_size(rel, fork, Some(lsn_of_time(at, timeline)), timeline)
}

/// `neon_rel_size` as of an LSN or a time written as a literal.
#[pg_extern(volatile, parallel_safe, name = "neon_rel_size")]
fn neon_rel_size_at_text(
    rel: Option<RegClass>,
    fork: Option<&str>,
    at: Option<&str>,
    timeline: default!(Option<i32>, "NULL"),
) -> i64 {
    api::neon_rel_size(rel, fork, lsn_of_text(at, timeline), timeline)
}

/// `neon_basebackup` as of a time.
#[pg_extern(volatile, parallel_safe, name = "neon_basebackup")]
fn neon_basebackup_at_time(
    at: Option<TimestampWithTimeZone>,
    full: default!(Option<bool>, "true"),
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<'static, (name!(path, String), name!(lsn, PgLsn), name!(bytes, i64), name!(seconds, f64))> {
    api::neon_basebackup(Some(lsn_of_time(at, timeline)), full, timeline)
}

/// `neon_basebackup` as of an LSN or a time written as a literal (NULL: now).
#[pg_extern(volatile, parallel_safe, name = "neon_basebackup")]
fn neon_basebackup_at_text(
    at: Option<&str>,
    full: default!(Option<bool>, "true"),
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<'static, (name!(path, String), name!(lsn, PgLsn), name!(bytes, i64), name!(seconds, f64))> {
    api::neon_basebackup(lsn_of_text(at, timeline), full, timeline)
}

/// `neon_branch_create` as of a time.
#[pg_extern(volatile, parallel_unsafe, name = "neon_branch_create")]
#[allow(clippy::type_complexity)]
fn neon_branch_create_at_time(
    at: Option<TimestampWithTimeZone>,
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, i32),
        name!(path, String),
        name!(lsn, PgLsn),
        name!(timeline, i32),
        name!(source_timeline, i32),
        name!(written_blocks, i64),
    ),
> {
    api::neon_branch_create(Some(lsn_of_time(at, timeline)), timeline)
}

/// `neon_branch_create` as of an LSN or a time written as a literal (NULL: now).
#[pg_extern(volatile, parallel_unsafe, name = "neon_branch_create")]
#[allow(clippy::type_complexity)]
fn neon_branch_create_at_text(
    at: Option<&str>,
    timeline: default!(Option<i32>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(id, i32),
        name!(path, String),
        name!(lsn, PgLsn),
        name!(timeline, i32),
        name!(source_timeline, i32),
        name!(written_blocks, i64),
    ),
> {
    api::neon_branch_create(lsn_of_text(at, timeline), timeline)
}

extension_sql!(
    r#"
DO $$
DECLARE f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['neon_lsn_at(timestamptz, boolean, int4)', 'neon_time_at(pg_lsn, int4)', 'neon_lsn_of(text, int4)',
                             'neon_get_page(regclass, text, int8, timestamptz, int4)', 'neon_get_page(regclass, text, int8, text, int4)',
                             'neon_rel_size(regclass, text, timestamptz, int4)', 'neon_rel_size(regclass, text, text, int4)',
                             'neon_basebackup(timestamptz, boolean, int4)', 'neon_basebackup(text, boolean, int4)',
                             'neon_branch_create(timestamptz, int4)', 'neon_branch_create(text, int4)'] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_read_server_files', f);
    END LOOP;
END $$;
COMMENT ON FUNCTION neon_lsn_at(timestamptz, boolean, int4) IS 'the LSN where recovery with recovery_target_time = ts stops: the state as of that time';
COMMENT ON FUNCTION neon_lsn_of(text, int4) IS 'an LSN or a time written as text, as an LSN (the LSN of the time)';
COMMENT ON FUNCTION neon_time_at(pg_lsn, int4) IS 'the transaction end times just before and at or after an LSN';
COMMENT ON FUNCTION neon_get_page(regclass, text, int8, timestamptz, int4) IS 'a block of a relation as it was at a time';
COMMENT ON FUNCTION neon_get_page(regclass, text, int8, text, int4) IS 'a block of a relation as it was at an LSN or time written as text';
COMMENT ON FUNCTION neon_rel_size(regclass, text, timestamptz, int4) IS 'the number of blocks of a relation fork at a time';
COMMENT ON FUNCTION neon_rel_size(regclass, text, text, int4) IS 'the number of blocks of a relation fork at an LSN or time written as text';
COMMENT ON FUNCTION neon_basebackup(timestamptz, boolean, int4) IS 'a bootable base backup as of a time';
COMMENT ON FUNCTION neon_basebackup(text, boolean, int4) IS 'a bootable base backup as of an LSN or time written as text';
COMMENT ON FUNCTION neon_branch_create(timestamptz, int4) IS 'a writable branch as of a time';
COMMENT ON FUNCTION neon_branch_create(text, int4) IS 'a writable branch as of an LSN or time written as text';
"#,
    name = "time_permissions",
    requires = [
        neon_lsn_at,
        neon_lsn_of,
        neon_time_at,
        neon_get_page_at_time,
        neon_get_page_at_text,
        neon_rel_size_at_time,
        neon_rel_size_at_text,
        neon_basebackup_at_time,
        neon_basebackup_at_text,
        neon_branch_create_at_time,
        neon_branch_create_at_text
    ]
);
