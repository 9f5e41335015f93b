//! Window arithmetic: exact sliding logs and calendar months. Pure
//! functions of timestamps, no clock and no locks, so every edge is
//! unit-tested with plain numbers.
//!
//! A sliding window `N/period` admits a request at `now` only if fewer than
//! `N` admitted requests lie in `(now - period - margin, now]`. So *any*
//! interval of length `period` holds at most `N` admissions, whatever
//! alignment Knoq uses; a fixed window could admit `2N` across its boundary
//! and a token bucket `N` plus its refill rate. The `margin` widens every
//! window to absorb the delay between the gateway sending and Knoq counting.
//! Memory: at most `N` timestamps per window.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use crate::clock::{month_index, month_start, Millis, DAY_MS};
use crate::units::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    /// A rolling window of this many milliseconds.
    Sliding(Millis),
    /// A calendar month, UTC.
    Month,
}

/// `limit` requests per `period`, as written in the config (`"60/min"`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Window {
    pub limit: u32,
    pub period: Period,
    /// As written, normalised (`"60/min"`); shared so clones are cheap.
    text: Arc<str>,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Window {
    /// Parses `"N/unit"` (unit `sec`, `min`, `hour`, `day`, `month`) or
    /// `"N/<duration>"` such as `"10/2s"`.
    pub fn parse(text: &str) -> Result<Window, String> {
        let (n, unit) = text.split_once('/').ok_or_else(|| {
            format!("\"{text}\" must look like \"60/min\" (N/sec, N/min, N/hour, N/day or N/month)")
        })?;
        let limit: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("\"{text}\": \"{n}\" is not a whole number"))?;
        if limit == 0 {
            return Err(format!(
                "\"{text}\": the limit must be at least 1 (remove the route's token instead)"
            ));
        }
        let unit = unit.trim();
        let period = match unit {
            "s" | "sec" | "second" => Period::Sliding(1_000),
            "m" | "min" | "minute" => Period::Sliding(60_000),
            "h" | "hour" => Period::Sliding(3_600_000),
            "d" | "day" => Period::Sliding(DAY_MS),
            "month" => Period::Month,
            other if !other.is_empty() && other.bytes().all(|b| b.is_ascii_alphabetic()) => {
                return Err(format!(
                    "\"{text}\": unknown unit \"{other}\"; use sec, min, hour, day or month, or a duration such as \"90s\""
                ))
            }
            other => {
                let d = parse_duration(other).map_err(|e| format!("\"{text}\": {e}"))?;
                if d.is_zero() {
                    return Err(format!("\"{text}\": the period must be longer than zero"));
                }
                Period::Sliding(d.as_millis() as Millis)
            }
        };
        Ok(Window {
            limit,
            period,
            text: format!("{limit}/{unit}").into(),
        })
    }

    /// The unit part, for labels: `"min"`, `"hour"`, `"month"`, `"2s"`.
    pub fn unit_label(&self) -> &str {
        self.text.split_once('/').map_or("", |(_, u)| u)
    }

    /// Window length in whole seconds (a month counts as 30 days), for the
    /// `RateLimit-Policy` header.
    pub fn seconds(&self) -> u64 {
        match self.period {
            Period::Sliding(ms) => ms.div_ceil(1000),
            Period::Month => 30 * 86_400,
        }
    }
}

/// What one window has admitted so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ledger {
    /// Admission times, oldest first; never more than the window's limit.
    Sliding(VecDeque<Millis>),
    /// Admissions in calendar month `month` (months since January 1970),
    /// and those of its last `margin` that Knoq may count in the next one.
    Month { month: u32, count: u32, spill: u32 },
}

impl Ledger {
    pub fn new(window: &Window) -> Ledger {
        match window.period {
            Period::Sliding(_) => Ledger::Sliding(VecDeque::new()),
            Period::Month => Ledger::Month {
                month: 0,
                count: 0,
                spill: 0,
            },
        }
    }

    /// `None` if a request at `now` is admitted; otherwise the first moment
    /// (ms) at which it would be, if nothing else is admitted meanwhile.
    pub fn blocked_until(&self, w: &Window, margin: Millis, now: Millis) -> Option<Millis> {
        let limit = w.limit as usize;
        match (self, w.period) {
            (Ledger::Sliding(hits), Period::Sliding(period)) => {
                let span = period + margin;
                let live = live(hits, span, now);
                (live >= limit).then(|| hits[hits.len() - limit] + span)
            }
            (Ledger::Month { .. }, Period::Month) => {
                let current = month_index(now);
                let next = month_start(current + 1);
                if self.month_used(now) >= w.limit {
                    return Some(next);
                }
                // In the last `margin` of a month Knoq may already count the
                // request in the next one, so it must fit there too.
                let (spilled, _) = self.month_counts(current + 1);
                (now + margin >= next && spilled >= w.limit).then_some(next + margin)
            }
            _ => unreachable!("a ledger is always built for its own window"),
        }
    }

    /// Records an admission at `now`.
    pub fn record(&mut self, w: &Window, margin: Millis, now: Millis) {
        match self {
            Ledger::Sliding(hits) => {
                hits.push_back(now);
                // Keep only what can still count: at most `limit` entries,
                // none older than the window (so a generous limit costs
                // memory in proportion to the actual rate, not the limit).
                let span = match w.period {
                    Period::Sliding(p) => p + margin,
                    Period::Month => u64::MAX,
                };
                while hits.len() > w.limit as usize || hits.front().is_some_and(|t| t + span <= now)
                {
                    hits.pop_front();
                }
            }
            Ledger::Month {
                month,
                count,
                spill,
            } => {
                let current = month_index(now);
                if *month != current {
                    *count = if current == *month + 1 { *spill } else { 0 };
                    *spill = 0;
                    *month = current;
                }
                *count += 1;
                if now + margin >= month_start(current + 1) {
                    *spill += 1;
                }
            }
        }
    }

    /// Admissions still available at `now`.
    pub fn remaining(&self, w: &Window, margin: Millis, now: Millis) -> u32 {
        let used = match (self, w.period) {
            (Ledger::Sliding(hits), Period::Sliding(period)) => {
                live(hits, period + margin, now) as u32
            }
            (Ledger::Month { .. }, Period::Month) => self.month_used(now),
            _ => unreachable!("a ledger is always built for its own window"),
        };
        w.limit.saturating_sub(used)
    }

    /// Milliseconds until `remaining` next grows (0 when nothing is used).
    pub fn reset_in(&self, w: &Window, margin: Millis, now: Millis) -> Millis {
        match (self, w.period) {
            (Ledger::Sliding(hits), Period::Sliding(period)) => {
                let span = period + margin;
                let skip = hits.len() - live(hits, span, now);
                hits.get(skip)
                    .map_or(0, |oldest| (oldest + span).saturating_sub(now))
            }
            (Ledger::Month { .. }, Period::Month) => {
                if self.remaining(w, margin, now) == w.limit {
                    0
                } else {
                    month_start(month_index(now) + 1).saturating_sub(now)
                }
            }
            _ => unreachable!("a ledger is always built for its own window"),
        }
    }
}

impl Ledger {
    /// (admissions counted in month `index`, whether known): the count of
    /// the recorded month, the spill of the one before it, else zero.
    fn month_counts(&self, index: u32) -> (u32, bool) {
        match self {
            Ledger::Month { month, count, .. } if *month == index => (*count, true),
            Ledger::Month { month, spill, .. } if *month + 1 == index => (*spill, true),
            _ => (0, false),
        }
    }

    fn month_used(&self, now: Millis) -> u32 {
        self.month_counts(month_index(now)).0
    }
}

/// How many of `hits` lie in `(now - span, now]`.
fn live(hits: &VecDeque<Millis>, span: Millis, now: Millis) -> usize {
    let start = now.saturating_sub(span);
    let expired = if now < span {
        0
    } else {
        hits.partition_point(|t| *t <= start)
    };
    hits.len() - expired
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{civil_from_days, days_from_civil};

    fn w(text: &str) -> Window {
        Window::parse(text).unwrap()
    }

    /// Admits at `now` if the ledger allows, like the store does.
    fn try_admit(l: &mut Ledger, win: &Window, margin: Millis, now: Millis) -> bool {
        if l.blocked_until(win, margin, now).is_none() {
            l.record(win, margin, now);
            true
        } else {
            false
        }
    }

    #[test]
    fn parse_units_and_durations() {
        assert_eq!(w("60/min").period, Period::Sliding(60_000));
        assert_eq!(w("10/sec").period, Period::Sliding(1_000));
        assert_eq!(w("20/hour").period, Period::Sliding(3_600_000));
        assert_eq!(w("5/day").period, Period::Sliding(86_400_000));
        assert_eq!(w("5000/month").period, Period::Month);
        assert_eq!(w("3/250ms").period, Period::Sliding(250));
        assert_eq!(w(" 60 / min ").to_string(), "60/min");
        assert_eq!(w("60/min").unit_label(), "min");
        for bad in ["60", "x/min", "0/min", "5/fortnight", "5/0s", "-1/min"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_n_then_refused_until_the_oldest_leaves() {
        let win = w("3/sec");
        let mut l = Ledger::new(&win);
        for t in [0, 100, 200] {
            assert!(try_admit(&mut l, &win, 0, 10_000 + t));
        }
        // N+1 is refused and told exactly when the oldest admission leaves.
        assert_eq!(l.blocked_until(&win, 0, 10_300), Some(11_000));
        assert!(!try_admit(&mut l, &win, 0, 10_999));
        // At 11_000 the admission at 10_000 is outside (11_000 - 1000, 11_000].
        assert!(try_admit(&mut l, &win, 0, 11_000));
        assert!(!try_admit(&mut l, &win, 0, 11_050));
        assert_eq!(l.blocked_until(&win, 0, 11_050), Some(11_100));
    }

    #[test]
    fn margin_lengthens_the_window() {
        let win = w("2/sec");
        let mut l = Ledger::new(&win);
        assert!(try_admit(&mut l, &win, 250, 1_000));
        assert!(try_admit(&mut l, &win, 250, 1_500));
        assert_eq!(l.blocked_until(&win, 250, 2_100), Some(2_250));
        assert!(!try_admit(&mut l, &win, 250, 2_249));
        assert!(try_admit(&mut l, &win, 250, 2_250));
    }

    /// The property a fixed window or token bucket breaks: however requests
    /// are timed, no interval of one period holds more than N admissions.
    #[test]
    fn no_interval_of_one_period_ever_holds_more_than_n() {
        let win = w("5/sec");
        let mut l = Ledger::new(&win);
        let mut admitted = Vec::new();
        let mut refused = Vec::new();
        // A hostile pattern: bursts around every second boundary, plus noise.
        let mut seed = 7u64;
        let mut t = 0;
        while t < 20_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t += match seed >> 60 {
                0..=7 => 1,
                8..=13 => 37,
                _ => 400,
            };
            if try_admit(&mut l, &win, 0, t) {
                admitted.push(t);
            } else {
                refused.push(t);
            }
        }
        for (i, start) in admitted.iter().enumerate() {
            let in_window = admitted[i..]
                .iter()
                .take_while(|x| **x < start + 1000)
                .count();
            assert!(
                in_window <= 5,
                "{in_window} admissions in [{start}, {start}+1s)"
            );
        }
        // And it wastes nothing: every refusal had exactly N admissions in
        // the second before it.
        assert!(!refused.is_empty());
        for t in refused {
            let recent = admitted
                .iter()
                .filter(|a| **a + 1000 > t && **a <= t)
                .count();
            assert_eq!(recent, 5, "refused at {t} with only {recent} in the window");
        }
    }

    #[test]
    fn fixed_window_would_admit_2n_across_a_boundary() {
        // Documented contrast: 5 at 999 ms and 5 at 1000 ms fit a fixed
        // one-second window scheme; the sliding log refuses the second five.
        let win = w("5/sec");
        let mut l = Ledger::new(&win);
        let first: usize = (0..5).filter(|_| try_admit(&mut l, &win, 0, 999)).count();
        let second: usize = (0..5).filter(|_| try_admit(&mut l, &win, 0, 1_000)).count();
        assert_eq!((first, second), (5, 0));
    }

    #[test]
    fn remaining_and_reset_follow_the_log() {
        let win = w("3/sec");
        let mut l = Ledger::new(&win);
        assert_eq!((l.remaining(&win, 0, 0), l.reset_in(&win, 0, 0)), (3, 0));
        l.record(&win, 0, 5_000);
        l.record(&win, 0, 5_400);
        assert_eq!(l.remaining(&win, 0, 5_500), 1);
        assert_eq!(l.reset_in(&win, 0, 5_500), 500);
        assert_eq!(l.remaining(&win, 0, 6_000), 2);
        assert_eq!(l.reset_in(&win, 0, 6_000), 400);
    }

    #[test]
    fn calendar_months_at_their_edges() {
        // 2026-01-31T23:59:59.999Z and 2026-02-01T00:00:00.000Z
        let jan_end = days_from_civil(2026, 2, 1) as Millis * DAY_MS - 1;
        let feb = jan_end + 1;
        assert_eq!(month_index(feb), month_index(jan_end) + 1);
        assert_eq!(month_start(month_index(feb)), feb);
        // Leap year: 2028-02-29 is still February.
        let leap = days_from_civil(2028, 2, 29) as Millis * DAY_MS;
        assert_eq!(
            month_index(leap),
            month_index(days_from_civil(2028, 2, 1) as Millis * DAY_MS)
        );
        assert_eq!(
            month_start(month_index(leap) + 1),
            days_from_civil(2028, 3, 1) as Millis * DAY_MS
        );
        // December rolls into January of the next year.
        let dec = days_from_civil(2026, 12, 15) as Millis * DAY_MS;
        assert_eq!(
            month_start(month_index(dec) + 1),
            days_from_civil(2027, 1, 1) as Millis * DAY_MS
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));

        let win = w("2/month");
        let mut l = Ledger::new(&win);
        assert!(try_admit(&mut l, &win, 0, jan_end - 10));
        assert!(try_admit(&mut l, &win, 0, jan_end - 5));
        assert_eq!(l.blocked_until(&win, 0, jan_end), Some(feb));
        assert!(!try_admit(&mut l, &win, 0, jan_end));
        assert!(try_admit(&mut l, &win, 0, feb), "a new month starts afresh");
        assert_eq!(l.remaining(&win, 0, feb), 1);
    }

    #[test]
    fn the_last_margin_of_a_month_counts_towards_the_next_one_too() {
        let feb = days_from_civil(2026, 2, 1) as Millis * DAY_MS;
        let win = w("2/month");
        let mut l = Ledger::new(&win);
        // Sent 100 ms before midnight with a 250 ms margin: Knoq may count
        // it in February, so February has one slot left, not two.
        assert!(try_admit(&mut l, &win, 250, feb - 100));
        assert!(try_admit(&mut l, &win, 250, feb + 10));
        assert!(!try_admit(&mut l, &win, 250, feb + 20));
        assert_eq!(
            l.blocked_until(&win, 250, feb + 20),
            Some(month_start(month_index(feb) + 1))
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn window_parsing_never_panics(text in "\\PC{0,16}|[0-9]{0,12}/[0-9a-z]{0,6}") {
                let _ = Window::parse(&text);
            }

            #[test]
            fn a_window_reads_back_from_its_own_text(
                n in 1u32..10_000_000,
                unit in prop_oneof![
                    Just("sec".to_string()), Just("min".to_string()), Just("hour".to_string()),
                    Just("day".to_string()), Just("month".to_string()),
                    (1u32..100_000).prop_map(|s| format!("{s}s")),
                    (1u32..100_000).prop_map(|s| format!("{s}ms")),
                ],
            ) {
                let w = Window::parse(&format!("{n}/{unit}")).unwrap();
                let again = Window::parse(&w.to_string()).unwrap();
                prop_assert_eq!((again.limit, again.period), (w.limit, w.period));
            }
        }
    }
}
