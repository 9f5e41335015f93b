//! Time for quotas and cool-downs, injectable so tests of minute, hour and
//! month windows run in milliseconds, and the one home of calendar
//! arithmetic (civil dates, UTC months, RFC 3339 and HTTP dates).
//!
//! Quota state is persisted, so times are wall-clock milliseconds since the
//! Unix epoch. [`SystemClock`] reads them as "wall time at start + tokio's
//! monotonic time since", so they never go backwards when the host clock is
//! stepped, and they follow `tokio::time::pause()` in tests.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Millis;
}

/// Wall-clock anchor plus tokio's monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    wall_start: Millis,
    mono_start: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock {
            wall_start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as Millis),
            mono_start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        self.wall_start + self.mono_start.elapsed().as_millis() as Millis
    }
}

/// Parses an RFC 3339 UTC-or-offset timestamp (`2026-11-29T08:56:01.204Z`,
/// `...T08:56:01+01:00`) into milliseconds since the epoch.
pub fn parse_rfc3339_ms(text: &str) -> Option<Millis> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = text.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        let padded = format!("{:0<3}", &digits[..digits.len().min(3)]);
        frac_ms = padded.parse().ok()?;
    }
    let offset_min = match text.get(i..)? {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && matches!(&tz[..1], "+" | "-") && &tz[3..4] == ":" => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (tz[1..3].parse::<i64>().ok()? * 60 + tz[4..6].parse::<i64>().ok()?)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let ms = ((days * 24 + h) * 60 + mi - offset_min) * 60_000 + s * 1000 + frac_ms;
    Millis::try_from(ms).ok()
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 §5.6.7),
/// the form cookies' `Expires` uses, into milliseconds since the epoch.
/// Dates before 1970 come back as 0.
pub fn parse_http_date_ms(text: &str) -> Option<Millis> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = f.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = MONTHS.iter().position(|x| x.eq_ignore_ascii_case(month))? as u32 + 1;
    let d: u32 = day.parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let mut hms = time.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    if !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let secs = ((days_from_civil(y, m, d) * 24 + h) * 60 + mi) * 60 + s;
    Some(Millis::try_from(secs.max(0) * 1000).unwrap_or(0))
}

/// Formats unix milliseconds as RFC 3339 UTC to the second.
pub fn format_rfc3339(ms: Millis) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * if m > 2 { m - 3 } else { m + 9 } + 2) / 5 + i64::from(d) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// One day in milliseconds.
pub const DAY_MS: Millis = 86_400_000;

/// Calendar month of a timestamp, as months since January 1970 (UTC).
pub fn month_index(t: Millis) -> u32 {
    let (y, m, _) = civil_from_days((t / DAY_MS) as i64);
    ((y - 1970) * 12 + (m as i64 - 1)) as u32
}

/// First millisecond of month `index` (months since January 1970).
pub fn month_start(index: u32) -> Millis {
    let y = 1970 + (index / 12) as i64;
    let m = index % 12 + 1;
    days_from_civil(y, m, 1) as Millis * DAY_MS
}

// Howard Hinnant's civil-calendar algorithms (proleptic Gregorian).
/// Date of a day count since 1970-01-01 (proleptic Gregorian).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting_round_trips() {
        let t = 1_795_942_561_000;
        assert_eq!(format_rfc3339(t), "2026-11-29T08:56:01Z");
        assert_eq!(parse_rfc3339_ms(&format_rfc3339(t)), Some(t));
    }

    #[test]
    fn http_dates_as_cookies_write_them() {
        assert_eq!(parse_http_date_ms("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date_ms("Sun, 29 Nov 2026 08:56:01 GMT"),
            Some(1_795_942_561_000)
        );
        assert_eq!(parse_http_date_ms("Sun, 29 Nov 2026 08:56:01 CET"), None);
        assert_eq!(parse_http_date_ms("yesterday"), None);
    }

    #[test]
    fn rfc3339_in_the_forms_knoq_may_use() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1_500));
        assert_eq!(
            parse_rfc3339_ms("2026-11-29T08:56:01.204Z"),
            Some(1_795_942_561_204)
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-29T09:56:01.204123+01:00"),
            parse_rfc3339_ms("2026-11-29T08:56:01.204Z")
        );
        for bad in [
            "",
            "yesterday",
            "2026-11-29 08:56:01Z",
            "2026-13-01T00:00:00Z",
            "2026-11-29T08:56:01",
            "2026-11-29T08:56:01.Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
