//! Retry policy, as pure pieces with their own tests: the backoff schedule,
//! the decision whether an outcome may be retried, the gateway-wide retry
//! budget, and the circuit breaker. The attempt loop that uses them lives in
//! `forward.rs`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

use super::UpstreamError;
use crate::route::Route;

// === Settings ===

/// `[retry]`: how Knoq's 502/503 and lost connections are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Upstream attempts per request, the first included (1 = no retry).
    pub attempts: u32,
    pub backoff: Backoff,
    /// No retry starts after this long since the request arrived.
    pub deadline: Duration,
    /// Retries may add at most this fraction of recent first attempts...
    pub budget: f64,
    /// ...plus this many per 10 s, gateway-wide.
    pub budget_floor: u32,
    /// Wait before the second look when reconciling an ambiguous POST.
    pub reconcile_settle: Duration,
    /// Resend once when reconciliation finds nothing (may duplicate).
    pub resend_unconfirmed: bool,
}

/// `[circuit]`: fail fast while Knoq is down.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitConfig {
    pub failures: u32,
    pub open_for: Duration,
}

// === Backoff ===

/// Exponential backoff with full jitter: the delay before retry `n` (1 for
/// the first retry) is uniform in `[0, min(max, base * 2^(n-1))]`, so
/// clients that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub fn try_new(base: Duration, max: Duration) -> Result<Backoff, String> {
        if base.is_zero() {
            return Err("base_delay must be greater than zero".into());
        }
        if max < base {
            return Err("max_delay must be at least base_delay".into());
        }
        Ok(Backoff { base, max })
    }

    /// The ceiling of the delay before retry `n`.
    pub fn ceiling(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry `n`, for a uniform sample `u` in `[0, 1)`.
    pub fn delay(&self, n: u32, u: f64) -> Duration {
        self.ceiling(n).mul_f64(u.clamp(0.0, 1.0))
    }

    pub fn max(&self) -> Duration {
        self.max
    }
}

/// A uniform sample in `[0, 1)` from a process-wide splitmix64 sequence
/// seeded from the OS: jitter needs spread, not secrecy.
pub fn jitter_sample() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    if STATE.load(Ordering::Relaxed) == 0 {
        let mut seed = [0u8; 8];
        let _ = getrandom::getrandom(&mut seed);
        let _ = STATE.compare_exchange(
            0,
            u64::from_le_bytes(seed) | 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    let mut z = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

// === Classification ===

/// What to do after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Give the client this answer.
    Done,
    /// Try again; `after` is Knoq's own `Retry-After`, if it gave one.
    Retry {
        reason: &'static str,
        after: Option<Duration>,
    },
    /// The request may have reached Knoq and been applied, with no answer:
    /// find out before answering (never resend blindly).
    Reconcile,
    /// Do not retry; report the failure.
    Fail,
}

/// Routes where repeating a request cannot do harm (Knoq documents cancel
/// as idempotent).
pub fn idempotent(method: &Method, route: Route) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
    ) || route == Route::Cancel
}

/// Routes whose ambiguous failures are reconciled by reading Knoq back.
pub fn reconcilable(route: Route) -> bool {
    matches!(route, Route::MessageSend | Route::SessionCreate)
}

/// Decides from typed facts: Knoq's status (and `Retry-After`), or the
/// transport error and whether the request is safe to repeat.
pub fn classify(
    outcome: Result<(StatusCode, Option<Duration>), &UpstreamError>,
    method: &Method,
    route: Route,
) -> Verdict {
    match outcome {
        // Knoq's documented contract: 502 and 503 mean "not done, retry".
        Ok((StatusCode::BAD_GATEWAY, _)) => Verdict::Retry {
            reason: "status_502",
            after: None,
        },
        Ok((StatusCode::SERVICE_UNAVAILABLE, after)) => Verdict::Retry {
            reason: "status_503",
            after,
        },
        Ok(_) => Verdict::Done,
        // Nothing was sent: always safe.
        Err(UpstreamError::Connect(_)) => Verdict::Retry {
            reason: "connect",
            after: None,
        },
        Err(UpstreamError::Tls(_)) => Verdict::Retry {
            reason: "tls",
            after: None,
        },
        // The request may have been sent and applied.
        Err(UpstreamError::Timeout(_) | UpstreamError::Reset(_) | UpstreamError::Protocol(_)) => {
            if idempotent(method, route) {
                Verdict::Retry {
                    reason: "reset_or_timeout",
                    after: None,
                }
            } else if reconcilable(route) {
                Verdict::Reconcile
            } else {
                Verdict::Fail
            }
        }
    }
}

/// Reads a `Retry-After` in seconds (the HTTP-date form is not used by Knoq).
pub fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let secs: u64 = value?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

// === Budget ===

/// Gateway-wide retry budget: within any `WINDOW`, retries may add at most
/// `ratio` of the first attempts, plus `floor`, so that when Knoq fails for
/// everyone retries stop growing the load.
#[derive(Debug)]
pub struct Budget {
    ratio: f64,
    floor: u32,
    /// Per-second (first attempts, retries), oldest first.
    slots: Mutex<VecDeque<(u64, u32, u32)>>,
    origin: Instant,
}

const WINDOW_SECS: u64 = 10;

impl Budget {
    pub fn new(ratio: f64, floor: u32) -> Self {
        Budget {
            ratio,
            floor,
            slots: Mutex::new(VecDeque::new()),
            origin: Instant::now(),
        }
    }

    fn with_slot<R>(&self, f: impl FnOnce(&mut VecDeque<(u64, u32, u32)>) -> R) -> R {
        let second = self.origin.elapsed().as_secs();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        while slots
            .front()
            .is_some_and(|(s, _, _)| *s + WINDOW_SECS <= second)
        {
            slots.pop_front();
        }
        if slots.back().is_none_or(|(s, _, _)| *s != second) {
            slots.push_back((second, 0, 0));
        }
        f(&mut slots)
    }

    pub fn first_attempt(&self) {
        self.with_slot(|s| s.back_mut().expect("pushed above").1 += 1);
    }

    /// Takes one retry from the budget, if there is one left.
    pub fn try_retry(&self) -> bool {
        self.with_slot(|slots| {
            let (firsts, retries) = slots
                .iter()
                .fold((0u32, 0u32), |(f, r), (_, sf, sr)| (f + sf, r + sr));
            let allowed = f64::from(self.floor) + self.ratio * f64::from(firsts);
            if f64::from(retries) + 1.0 > allowed {
                return false;
            }
            slots.back_mut().expect("pushed above").2 += 1;
            true
        })
    }
}

// === Circuit ===

/// A circuit breaker for the upstream: after `failures` consecutive failed
/// attempts it opens for `open_for` (requests fail at once); then one probe
/// goes through (half-open); its success closes it, its failure reopens it.
#[derive(Debug)]
pub struct Circuit {
    failures: u32,
    open_for: Duration,
    state: Mutex<CircuitState>,
}

#[derive(Debug, Default)]
struct CircuitState {
    consecutive: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Permission to send one attempt; report its result with `record`.
#[derive(Debug)]
pub struct Pass<'a> {
    circuit: &'a Circuit,
    probe: bool,
    recorded: bool,
}

impl Circuit {
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Circuit {
            failures,
            open_for,
            state: Mutex::new(CircuitState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CircuitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(remaining)` while open (or while another request is the probe).
    pub fn pass(&self) -> Result<Pass<'_>, Duration> {
        let now = Instant::now();
        let mut s = self.lock();
        match s.open_until {
            None => Ok(Pass {
                circuit: self,
                probe: false,
                recorded: false,
            }),
            Some(until) if now < until => Err(until - now),
            Some(_) if s.probing => Err(Duration::from_secs(1)),
            Some(_) => {
                s.probing = true;
                Ok(Pass {
                    circuit: self,
                    probe: true,
                    recorded: false,
                })
            }
        }
    }

    /// `Some(remaining)` if a pass would be refused now; takes nothing.
    pub fn refuses(&self) -> Option<Duration> {
        let now = Instant::now();
        let s = self.lock();
        match s.open_until {
            None => None,
            Some(until) if now < until => Some(until - now),
            Some(_) if s.probing => Some(Duration::from_secs(1)),
            Some(_) => None,
        }
    }

    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }
}

impl Pass<'_> {
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        let c = self.circuit;
        let mut s = c.lock();
        if self.probe {
            s.probing = false;
        }
        // One line per change of state: opened, closed (a failed probe
        // that keeps it open is not a change).
        if success {
            if s.open_until.is_some() {
                tracing::info!("upstream circuit closed: Knoq answered again");
            }
            *s = CircuitState::default();
            return;
        }
        s.consecutive += 1;
        if self.probe || s.consecutive >= c.failures {
            if s.open_until.is_none() {
                tracing::warn!(consecutive = s.consecutive, open_for = ?c.open_for, "upstream circuit opened");
            } else {
                tracing::debug!(open_for = ?c.open_for, "the probe failed; the upstream circuit stays open");
            }
            s.open_until = Some(Instant::now() + c.open_for);
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        // A probe abandoned (client gone) lets the next request probe.
        if self.probe && !self.recorded {
            self.circuit.lock().probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_ceilings_double_up_to_the_max_and_delays_stay_within() {
        let b = Backoff::try_new(ms(200), ms(5000)).unwrap();
        let ceilings: Vec<_> = (1..=7).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000)
            ]
        );
        assert_eq!(b.ceiling(100), ms(5000), "no overflow");
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
        assert_eq!(b.delay(3, 0.5), ms(400));
        assert!(b.delay(3, 0.999_999) < ms(800));
        for _ in 0..1000 {
            let u = jitter_sample();
            assert!((0.0..1.0).contains(&u));
            assert!(b.delay(2, u) <= ms(400));
        }
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let samples: Vec<f64> = (0..2000).map(|_| jitter_sample()).collect();
        let low = samples.iter().filter(|u| **u < 0.25).count();
        let high = samples.iter().filter(|u| **u >= 0.75).count();
        assert!(low > 350 && high > 350, "{low} low, {high} high");
    }

    #[test]
    fn backoff_refuses_nonsense() {
        assert!(Backoff::try_new(Duration::ZERO, ms(1)).is_err());
        assert!(Backoff::try_new(ms(10), ms(5)).is_err());
    }

    #[test]
    fn classification_follows_knoqs_contract() {
        let err = |e: UpstreamError| classify(Err(&e), &Method::POST, Route::MessageSend);
        let ok = |s: u16| {
            classify(
                Ok((StatusCode::from_u16(s).unwrap(), None)),
                &Method::POST,
                Route::MessageSend,
            )
        };
        assert!(matches!(ok(502), Verdict::Retry { .. }));
        assert!(matches!(ok(503), Verdict::Retry { .. }));
        for s in [200, 400, 401, 404, 429, 500, 504] {
            assert_eq!(ok(s), Verdict::Done, "{s}");
        }
        assert!(matches!(
            err(UpstreamError::Connect("x".into())),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            err(UpstreamError::Tls("x".into())),
            Verdict::Retry { .. }
        ));
        assert_eq!(err(UpstreamError::Reset("x".into())), Verdict::Reconcile);
        assert_eq!(err(UpstreamError::Timeout(ms(1))), Verdict::Reconcile);
        let get = classify(
            Err(&UpstreamError::Reset("x".into())),
            &Method::GET,
            Route::Transcript,
        );
        assert!(matches!(get, Verdict::Retry { .. }));
        let cancel = classify(
            Err(&UpstreamError::Timeout(ms(1))),
            &Method::POST,
            Route::Cancel,
        );
        assert!(matches!(cancel, Verdict::Retry { .. }));
        let scim = classify(
            Err(&UpstreamError::Reset("x".into())),
            &Method::POST,
            Route::Scim,
        );
        assert_eq!(scim, Verdict::Fail);
    }

    #[tokio::test(start_paused = true)]
    async fn budget_caps_retries_at_ratio_of_first_attempts_plus_floor() {
        let b = Budget::new(0.2, 3);
        for _ in 0..50 {
            b.first_attempt();
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 3 + 10);
        // The window slides: ten seconds later the budget is fresh.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.try_retry());
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_opens_after_consecutive_failures_and_one_probe_closes_it() {
        let c = Circuit::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            c.pass().unwrap().record(false);
        }
        c.pass().unwrap().record(true);
        for _ in 0..3 {
            c.pass().unwrap().record(false);
        }
        assert_eq!(c.pass().unwrap_err(), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(c.pass().unwrap_err(), Duration::from_secs(6));
        tokio::time::advance(Duration::from_secs(6)).await;
        let probe = c.pass().unwrap();
        assert!(c.pass().is_err(), "only one probe at a time");
        probe.record(false);
        assert_eq!(
            c.pass().unwrap_err(),
            Duration::from_secs(10),
            "a failed probe reopens"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = c.pass().unwrap();
        drop(probe);
        let probe = c
            .pass()
            .expect("an abandoned probe lets another one through");
        probe.record(true);
        assert!(!c.is_open());
        assert!(c.pass().is_ok());
    }
}
