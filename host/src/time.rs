//! Event time: parsing and printing RFC 3339 timestamps as milliseconds
//! since the Unix epoch, without allocation on the parse side.
//!
//! Ingest accepts ISO 8601 / RFC 3339 date-times that carry a zone (`Z` or
//! `±hh:mm`), with or without fractional seconds, and the rest of segs only
//! ever sees the canonical form `YYYY-MM-DDTHH:MM:SS.mmmZ` (see
//! [`format_rfc3339_ms`]). Sub-millisecond digits are truncated.

use std::fmt::Write as _;

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±hh:mm)` into epoch milliseconds.
/// Returns `None` for anything else, including out-of-range fields
/// (month 13, February 30th, hour 24, …). `t` and `z` are accepted in place
/// of `T` and `Z`, as RFC 3339 allows.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let year = digits(b, 0, 4)? as i64;
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    // A leap second (60) is not representable in epoch time; refuse it rather
    // than silently shifting the reading into the next minute.
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..3 {
            millis *= 10;
        }
    }
    let offset_min: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let oh = digits(b, i + 1, 2)?;
            let om = digits(b, i + 4, 2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let m = i64::from(oh * 60 + om);
            if *sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second) - offset_min * 60;
    Some(secs * 1000 + millis)
}

/// The length of [`write_rfc3339_ms`]'s form for years 0 to 9999.
pub const RFC3339_MS_LEN: usize = "2025-11-12T06:30:00.000Z".len();

/// Appends the canonical form of `ms` (`2025-11-12T06:30:00.000Z`) to `out`.
pub fn write_rfc3339_ms(out: &mut String, ms: i64) {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if (0..=9999).contains(&y) {
        // Digits by hand: `write!` costs several times this on the hot path
        // (every reading's receivedAt and archive row).
        let mut b = *b"0000-00-00T00:00:00.000Z";
        let put = |b: &mut [u8; 24], at: usize, n: usize, mut v: u32| {
            for i in (at..at + n).rev() {
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(&mut b, 0, 4, y as u32);
        put(&mut b, 5, 2, m);
        put(&mut b, 8, 2, d);
        put(&mut b, 11, 2, (sod / 3600) as u32);
        put(&mut b, 14, 2, ((sod / 60) % 60) as u32);
        put(&mut b, 17, 2, (sod % 60) as u32);
        put(&mut b, 20, 3, millis as u32);
        // Only ASCII digits and separators were written.
        out.push_str(std::str::from_utf8(&b).unwrap_or_default());
        return;
    }
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod / 60) % 60,
        sod % 60
    );
}

/// The canonical form of `ms` as a new string.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let mut s = String::with_capacity(24);
    write_rfc3339_ms(&mut s, ms);
    s
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Start of the tumbling window of `width_ms` that holds `ms` (floor).
pub fn window_start(ms: i64, width_ms: i64) -> i64 {
    ms - ms.rem_euclid(width_ms)
}

fn digits(b: &[u8], at: usize, n: usize) -> Option<u32> {
    let mut v = 0u32;
    for &c in b.get(at..at + n)? {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u32::from(c - b'0');
    }
    Some(v)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

// Howard Hinnant's civil-date algorithms (public domain).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str, expect: Option<&str>) {
        let got = parse_rfc3339_ms(s).map(format_rfc3339_ms);
        assert_eq!(got.as_deref(), expect, "parsing {s:?}");
    }

    #[test]
    fn parses_and_canonicalises() {
        check("2025-11-12T06:30:00.000Z", Some("2025-11-12T06:30:00.000Z"));
        check("2025-11-12T06:30:00Z", Some("2025-11-12T06:30:00.000Z"));
        check("2025-11-12T06:30:00.5Z", Some("2025-11-12T06:30:00.500Z"));
        check(
            "2025-11-12T06:30:00.123456Z",
            Some("2025-11-12T06:30:00.123Z"),
        );
        check(
            "2025-11-12T12:00:00+05:30",
            Some("2025-11-12T06:30:00.000Z"),
        );
        check(
            "2025-11-12T01:00:00-05:30",
            Some("2025-11-12T06:30:00.000Z"),
        );
        check("2024-02-29T00:00:00Z", Some("2024-02-29T00:00:00.000Z"));
        check("1969-12-31T23:59:59.999Z", Some("1969-12-31T23:59:59.999Z"));
    }

    #[test]
    fn refuses_bad_timestamps() {
        for s in [
            "",
            "2025-11-12",
            "2025-11-12T06:30:00",
            "2025-11-12 06:30:00Z",
            "2025-13-12T06:30:00Z",
            "2025-02-29T06:30:00Z",
            "2025-11-31T06:30:00Z",
            "2025-11-12T24:00:00Z",
            "2025-11-12T06:60:00Z",
            "2025-11-12T06:30:60Z",
            "2025-11-12T06:30:00.Z",
            "2025-11-12T06:30:00ZZ",
            "2025-11-12T06:30:00+0530",
            "2025-11-12T06:30:00+24:00",
            "not a timestamp at all",
        ] {
            check(s, None);
        }
    }

    #[test]
    fn matches_chrono_over_a_range() {
        let mut ms = -86_400_000i64 * 800;
        while ms < 86_400_000i64 * 365 * 80 {
            let s = format_rfc3339_ms(ms);
            let c = chrono::DateTime::parse_from_rfc3339(&s)
                .unwrap()
                .timestamp_millis();
            assert_eq!(c, ms, "{s}");
            assert_eq!(parse_rfc3339_ms(&s), Some(ms));
            ms += 86_400_000 * 3 + 3_600_123;
        }
    }

    #[test]
    fn formats_as_chrono_does() {
        use chrono::{SecondsFormat, TimeZone, Utc};
        // From year 0 to 9999 (the digits written by hand), in steps that
        // visit every field's carries.
        let first = Utc
            .with_ymd_and_hms(0, 1, 1, 0, 0, 0)
            .unwrap()
            .timestamp_millis();
        let last = Utc
            .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
            .unwrap()
            .timestamp_millis()
            + 999;
        let mut ms = first;
        while ms <= last {
            let want = Utc
                .timestamp_millis_opt(ms)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            assert_eq!(format_rfc3339_ms(ms), want);
            ms += 86_400_000 * 97 + 3_599_999 + 61_001;
        }
        assert_eq!(format_rfc3339_ms(last), "9999-12-31T23:59:59.999Z");
        // Past year 9999 the year takes five digits.
        assert_eq!(format_rfc3339_ms(last + 1), "10000-01-01T00:00:00.000Z");
    }

    #[test]
    fn window_start_floors() {
        let t = parse_rfc3339_ms("2025-11-12T06:44:59.999Z").unwrap();
        assert_eq!(
            format_rfc3339_ms(window_start(t, 60_000)),
            "2025-11-12T06:44:00.000Z"
        );
        assert_eq!(
            format_rfc3339_ms(window_start(t, 900_000)),
            "2025-11-12T06:30:00.000Z"
        );
    }
}
