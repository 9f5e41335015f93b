//! Exact sliding-log rate limiting, as Knoq's per-user limits are modelled.
//!
//! A [`RateLog`] keeps the arrival time of every accepted request that is
//! still inside the longest window. A new request at `now` passes a window if
//! fewer than `limit` accepted requests lie in `(now - period, now]`; so no
//! half-open interval of length `period` ever holds more than `limit`. Refused
//! requests are not recorded: retrying too early does not push the wait out.
//!
//! Callers check and record under one lock, with `now` read under that lock,
//! so the log is always in arrival order.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::config::Window;

/// Arrival times of the accepted requests of one (user, bucket).
#[derive(Debug, Default)]
pub(super) struct RateLog {
    hits: VecDeque<Instant>,
}

// === impl RateLog ===

impl RateLog {
    /// How long until a request would pass every window, or `None` if one
    /// arriving at `now` passes now.
    pub(super) fn wait(&self, windows: &[Window], now: Instant) -> Option<Duration> {
        windows
            .iter()
            .filter_map(|window| self.wait_for(window, now))
            .max()
    }

    /// Records an accepted request and forgets hits older than every window.
    pub(super) fn record(&mut self, windows: &[Window], now: Instant) {
        self.hits.push_back(now);
        let longest = windows.iter().map(|w| w.period).max().unwrap_or_default();
        // `None`: earlier than the clock can express, so nothing is that old.
        if let Some(horizon) = now.checked_sub(longest) {
            while self.hits.front().is_some_and(|t| *t <= horizon) {
                self.hits.pop_front();
            }
        }
    }

    fn wait_for(&self, window: &Window, now: Instant) -> Option<Duration> {
        let limit = window.limit as usize;
        if limit == 0 {
            // A closed bucket: never passes; one period is the honest hint.
            return Some(window.period);
        }
        let in_window = match now.checked_sub(window.period) {
            Some(start) => self.hits.len() - self.hits.partition_point(|t| *t <= start),
            None => self.hits.len(),
        };
        if in_window < limit {
            return None;
        }
        // The request may pass once the hit `limit` places from the end leaves.
        let blocking = self.hits[self.hits.len() - limit];
        Some((blocking + window.period).saturating_duration_since(now))
    }
}

/// A `Retry-After` value: whole seconds, rounded up, at least 1.
pub(super) fn retry_after_secs(wait: Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn allows_exactly_limit_per_period() {
        let windows = [Window::new(2, ms(1000))];
        let t0 = Instant::now();
        let mut log = RateLog::default();
        assert_eq!(log.wait(&windows, t0), None);
        log.record(&windows, t0);
        assert_eq!(log.wait(&windows, t0 + ms(100)), None);
        log.record(&windows, t0 + ms(100));
        assert_eq!(log.wait(&windows, t0 + ms(200)), Some(ms(800)));
        // The first hit leaves the window exactly one period later.
        assert_eq!(log.wait(&windows, t0 + ms(1000)), None);
    }

    #[test]
    fn the_strictest_window_decides() {
        let windows = [Window::new(2, ms(100)), Window::new(3, ms(10_000))];
        let t0 = Instant::now();
        let mut log = RateLog::default();
        for i in 0..3 {
            let now = t0 + ms(i * 200);
            assert_eq!(log.wait(&windows, now), None);
            log.record(&windows, now);
        }
        assert_eq!(log.wait(&windows, t0 + ms(600)), Some(ms(9_400)));
    }

    #[test]
    fn zero_limit_never_passes() {
        let log = RateLog::default();
        let windows = [Window::new(0, ms(5_000))];
        assert_eq!(log.wait(&windows, Instant::now()), Some(ms(5_000)));
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(ms(1)), 1);
        assert_eq!(retry_after_secs(ms(1000)), 1);
        assert_eq!(retry_after_secs(ms(1001)), 2);
    }
}
