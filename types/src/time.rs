//! `PgTime`: PostgreSQL's `timestamptz` as WAL carries it (a commit record's `xact_time`) —
//! microseconds since 2000-01-01 00:00:00 UTC — with a text form PostgreSQL reads back
//! (`2026-12-03 10:42:00.5+00`, always UTC) and a parser for what people type on a command
//! line (ISO 8601 / PostgreSQL style, with or without a zone offset; none means UTC).

use std::fmt;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
const MICROS_PER_DAY: i64 = 86_400_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTime(pub i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid time {input:?}: {why} (expected e.g. 2026-12-03 10:42:00+01 or 2026-12-03T09:42:00.25Z)")]
pub struct TimeParseError {
    input: String,
    why: &'static str,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl PgTime {
    pub fn from_unix_micros(us: i64) -> PgTime {
        PgTime(us - PG_EPOCH_UNIX_MICROS)
    }

    pub fn unix_micros(self) -> i64 {
        self.0 + PG_EPOCH_UNIX_MICROS
    }

    pub fn now() -> PgTime {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        PgTime::from_unix_micros(since.as_micros() as i64)
    }

    /// Parses `YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]][Z|±HH[:MM]]`; no offset means UTC.
    pub fn parse(input: &str) -> Result<PgTime, TimeParseError> {
        let fail = |why| TimeParseError { input: input.to_string(), why };
        let s = input.trim();
        let num = |t: &str, why| -> Result<i64, TimeParseError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(fail(why));
            }
            t.parse().map_err(|_| fail(why))
        };
        let (date, rest) = s.split_at(s.find([' ', 'T']).ok_or_else(|| fail("no time of day"))?);
        let rest = &rest[1..];
        let mut d = date.split('-');
        let (y, m, day) = match (d.next(), d.next(), d.next(), d.next()) {
            (Some(y), Some(m), Some(day), None) => (num(y, "bad year")?, num(m, "bad month")?, num(day, "bad day")?),
            _ => return Err(fail("the date must be YYYY-MM-DD")),
        };
        if !(1..=12).contains(&m) {
            return Err(fail("month out of range"));
        }
        let month_days = [
            31,
            if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) { 29 } else { 28 },
            31,
            30,
            31,
            30,
            31,
            31,
            30,
            31,
            30,
            31,
        ];
        if day < 1 || day > month_days[(m - 1) as usize] {
            return Err(fail("day out of range"));
        }
        // The zone: Z, or the last + or - (dates have their own minus signs, but they are gone).
        let (clock, offset_us) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
            (c, 0)
        } else if let Some(at) = rest.rfind(['+', '-']) {
            let (c, z) = rest.split_at(at);
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let z = z[1..].trim();
            let (h, mi) = match z.split_once(':') {
                Some((h, mi)) => (num(h, "bad zone offset")?, num(mi, "bad zone offset")?),
                None if z.len() == 4 => (num(&z[..2], "bad zone offset")?, num(&z[2..], "bad zone offset")?),
                None => (num(z, "bad zone offset")?, 0),
            };
            if h > 15 || mi > 59 {
                return Err(fail("zone offset out of range"));
            }
            (c, sign * (h * 3600 + mi * 60) * 1_000_000)
        } else {
            (rest, 0)
        };
        let mut t = clock.trim().split(':');
        let (h, mi, sec) = match (t.next(), t.next(), t.next(), t.next()) {
            (Some(h), Some(mi), sec, None) => (num(h, "bad hour")?, num(mi, "bad minute")?, sec.unwrap_or("0")),
            _ => return Err(fail("the time of day must be HH:MM[:SS[.ffffff]]")),
        };
        let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
        let s_whole = num(whole, "bad second")?;
        if h > 23 || mi > 59 || s_whole > 59 {
            return Err(fail("time of day out of range"));
        }
        if frac.len() > 6 {
            return Err(fail("more than microsecond precision"));
        }
        let micros = if frac.is_empty() { 0 } else { num(frac, "bad fraction")? * 10i64.pow(6 - frac.len() as u32) };
        let day_us = days_from_civil(y, m, day).checked_mul(MICROS_PER_DAY).ok_or_else(|| fail("year out of range"))?;
        let unix = day_us + ((h * 60 + mi) * 60 + s_whole) * 1_000_000 + micros - offset_us;
        Ok(PgTime::from_unix_micros(unix))
    }
}

impl fmt::Display for PgTime {
    /// PostgreSQL's output for `timestamptz` with `TimeZone = UTC`: fraction digits only as
    /// many as needed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unix = self.unix_micros();
        let (days, us) = (unix.div_euclid(MICROS_PER_DAY), unix.rem_euclid(MICROS_PER_DAY));
        let (y, m, d) = civil_from_days(days);
        let secs = us / 1_000_000;
        write!(f, "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)?;
        let frac = us % 1_000_000;
        if frac != 0 {
            let digits = format!("{frac:06}");
            write!(f, ".{}", digits.trim_end_matches('0'))?;
        }
        f.write_str("+00")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_form_is_postgres_utc_output_and_parses_back() {
        assert_eq!(PgTime(0).to_string(), "2000-01-01 00:00:00+00");
        assert_eq!(PgTime(-1).to_string(), "1999-12-31 23:59:59.999999+00");
        // SELECT extract(epoch from '2026-12-03 10:42:00.5+00'::timestamptz) = 1796294520.5
        let t = PgTime::from_unix_micros(1_796_294_520_500_000);
        assert_eq!(t.to_string(), "2026-12-03 10:42:00.5+00");
        for s in [
            "2026-12-03 10:42:00.5+00",
            "2026-12-03T10:42:00.500Z",
            "2026-12-03 11:42:00.5+01",
            "2026-12-03 05:12:00.5-05:30",
            "2026-12-03 10:42:00.5",
        ] {
            assert_eq!(PgTime::parse(s), Ok(t), "{s}");
        }
        assert_eq!(PgTime::parse("2024-02-29 00:00").map(|t| t.to_string()).as_deref(), Ok("2024-02-29 00:00:00+00"));
        for bad in [
            "2026-12-03",
            "2026-13-01 00:00",
            "2023-02-29 00:00",
            "2026-12-03 24:00",
            "2026-12-03 10:42:00.1234567",
            "yesterday 10:00",
            "2026-12-03 10:42+25",
        ] {
            assert!(PgTime::parse(bad).is_err(), "{bad}");
        }
        for us in [-3_000_000_000_000_000i64 / 1000, -1, 0, 1, 86_399_999_999, 1_234_567_890_123_456] {
            assert_eq!(PgTime::parse(&PgTime(us).to_string()), Ok(PgTime(us)));
        }
    }
}
