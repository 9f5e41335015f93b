//! Wall-clock timestamps that follow tokio's clock.
//!
//! Timestamps (`createdAt`, `occurredAt`, ...) are RFC 3339 UTC strings with
//! milliseconds, like `2026-05-01T12:00:00.123Z`. They are computed as "wall
//! time at start + tokio time elapsed since", so they never go backwards and
//! they advance under `tokio::time::pause()` like everything else in the
//! simulator. Ordering never relies on them: equal milliseconds are common, so
//! the simulator orders by sequence numbers and only displays these strings.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// The simulator's clock: a wall-clock anchor plus tokio's monotonic time.
#[derive(Debug, Clone, Copy)]
pub(super) struct SimClock {
    wall_start: Duration,
    mono_start: Instant,
}

// === impl SimClock ===

impl SimClock {
    pub(super) fn new() -> Self {
        Self {
            // A clock before 1970 is a misconfigured host; 1970 is then as good as any.
            wall_start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
            mono_start: Instant::now(),
        }
    }

    /// Time since the Unix epoch, following tokio's clock.
    pub(super) fn since_epoch(&self) -> Duration {
        self.wall_start + self.mono_start.elapsed()
    }

    /// Now, formatted as RFC 3339 UTC with milliseconds.
    pub(super) fn now_rfc3339(&self) -> String {
        rfc3339(self.since_epoch())
    }

    /// Whole seconds (at least 1) until the next UTC calendar month begins:
    /// the honest `Retry-After` of a spent monthly quota.
    pub(super) fn secs_until_next_month(&self) -> u64 {
        let now = self.since_epoch().as_secs();
        let days = i64::try_from(now / 86_400).unwrap_or(i64::MAX / 2);
        let (year, month, _) = civil_from_days(days);
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        let start = days_from_civil(next_year, next_month, 1).max(0) as u64 * 86_400;
        start.saturating_sub(now).max(1)
    }
}

/// Formats a time since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub(super) fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = (if z >= 0 { z } else { z - 146_096 }) / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) to days since 1970-01-01; inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = (if year >= 0 { year } else { year - 399 }) / 400;
    let yoe = year - era * 400;
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(1_767_225_599)),
            "2025-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn civil_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(2026, 1, 1), 20_454);
    }
}
