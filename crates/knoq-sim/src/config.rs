//! What a simulated Knoq is started with: its users, the CSRF origin, the SCIM
//! token, the agent's speed, the rate limits and how it speaks TLS.
//!
//! Every field is public so that tests can write
//! `SimConfig { users: vec![..], ..SimConfig::default() }`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Name of the demo user every default simulation has.
pub const DEMO_USER: &str = "demo";

/// Cookie header the demo user's "browser" sends. Not a secret: it only opens
/// the simulator, and the demo and docs need to know it.
pub const DEMO_COOKIE: &str = "knoq_session=demo-cookie-0001";

/// Origin Knoq's CSRF guard requires on POST and DELETE.
pub const KNOQ_ORIGIN: &str = "https://knoq.one";

/// Name of the cookie pair that authenticates. Knoq's docs do not name its
/// cookie; the simulator has to pick one, and only this pair is checked.
pub const SESSION_COOKIE: &str = "knoq_session";

/// Agent delay of a default simulation.
pub const DEFAULT_AGENT_DELAY: Duration = Duration::from_millis(200);

/// How a simulated Knoq is set up. See the field docs; `Default` gives one demo
/// user, Knoq's origin, no SCIM, a 200 ms agent, Knoq's limits and a
/// self-signed certificate. `Debug` leaves the SCIM token out.
#[derive(Clone)]
pub struct SimConfig {
    /// Known users. Names must be unique and each cookie must hold a
    /// `knoq_session=` pair, or [`SimKnoq::start`](super::SimKnoq::start)
    /// fails with `InvalidInput`.
    pub users: Vec<SimUser>,
    /// The `Origin` POST and DELETE must carry.
    pub origin: String,
    /// Also require `Origin` on reads (Knoq does not; the benchmark does,
    /// so a proxy that forgets to set it shows up as errors).
    pub origin_on_reads: bool,
    /// SCIM bearer token; `None` means the plan lacks SCIM (every SCIM call: 403).
    pub scim_token: Option<String>,
    /// How long the simulated agent takes to answer each user message.
    pub agent_delay: Duration,
    /// Rate limits (per user) and the monthly quota (per organisation).
    pub limits: SimLimits,
    /// How the listener speaks.
    pub tls: SimTls,
}

/// One account: its name (for assertions and logs) and the Cookie header its
/// browser would send, e.g. `"knoq_session=abc123; theme=dark"`.
///
/// Only the `knoq_session` pair authenticates; other pairs are ignored.
#[derive(Clone)]
pub struct SimUser {
    pub name: String,
    pub cookie: String,
}

/// Per-user sliding-log windows for each rate-limited bucket, plus the
/// organisation's monthly quota.
///
/// A request passes a bucket only if every window of that bucket still has
/// room: fewer than `limit` accepted requests in the last `period` (a
/// half-open interval `(now - period, now]`). Refused requests do not count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimLimits {
    /// `POST /message`.
    pub message: Vec<Window>,
    /// `POST /session`.
    pub session: Vec<Window>,
    /// `POST /cancel`.
    pub cancel: Vec<Window>,
    /// Messages plus sessions accepted over the whole run, across all users
    /// (Knoq's quota is per organisation and the simulator has one). `None`:
    /// no quota, as Knoq does not publish its size.
    pub monthly_queries: Option<u32>,
}

/// At most `limit` requests in any interval of length `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub limit: u32,
    pub period: Duration,
}

/// How the simulator's listener speaks.
#[derive(Clone, Debug, Default)]
pub enum SimTls {
    /// A fresh self-signed certificate for `localhost` and `127.0.0.1`; its PEM
    /// is available from [`SimHandle::ca_pem`](super::SimHandle::ca_pem).
    #[default]
    SelfSigned,
    /// A self-signed certificate kept in this directory, so clients that
    /// trust it keep working across restarts. The first start creates the
    /// directory (mode 0700) if missing and writes `cert.pem` (0644) and
    /// `key.pem` (0600) there, atomically; later starts reuse them. If only
    /// one is there, or one does not parse, or they do not fit, start fails
    /// with `InvalidData` naming the file: the pair is never made anew over
    /// old files. Its PEM is available like `SelfSigned`'s.
    SelfSignedIn(PathBuf),
    /// Certificate chain and private key from PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP (h1 or h2 with prior knowledge), for quick tests and benchmarks.
    Plain,
}

// === impl SimConfig ===

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            users: vec![SimUser::new(DEMO_USER, DEMO_COOKIE)],
            origin: KNOQ_ORIGIN.to_string(),
            origin_on_reads: false,
            scim_token: None,
            agent_delay: DEFAULT_AGENT_DELAY,
            limits: SimLimits::knoq(),
            tls: SimTls::SelfSigned,
        }
    }
}

impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("users", &self.users)
            .field("origin", &self.origin)
            .field(
                "scim_token",
                &self.scim_token.as_ref().map(|_| "<redacted>"),
            )
            .field("agent_delay", &self.agent_delay)
            .field("limits", &self.limits)
            .field("tls", &self.tls)
            .finish()
    }
}

// === impl SimUser ===

impl SimUser {
    pub fn new(name: impl Into<String>, cookie: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            cookie: cookie.into(),
        }
    }
}

/// The cookie is a credential (in the real service): keep it out of logs.
impl fmt::Debug for SimUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimUser")
            .field("name", &self.name)
            .field("cookie", &"<redacted>")
            .finish()
    }
}

// === impl SimLimits ===

impl SimLimits {
    /// Knoq's published numbers: 60 messages/min; 10 sessions/min and
    /// 20 sessions/hour; 30 cancels/min; no monthly quota.
    pub fn knoq() -> Self {
        Self {
            message: vec![Window::per_minute(60)],
            session: vec![Window::per_minute(10), Window::per_hour(20)],
            cancel: vec![Window::per_minute(30)],
            monthly_queries: None,
        }
    }

    /// No limit at all, e.g. for benchmarks. Also a base for one-off limits:
    /// `SimLimits { message: vec![Window::new(2, secs(1))], ..SimLimits::unlimited() }`.
    pub fn unlimited() -> Self {
        Self {
            message: Vec::new(),
            session: Vec::new(),
            cancel: Vec::new(),
            monthly_queries: None,
        }
    }

    /// Knoq's limits with time running `factor` times faster: every period is
    /// divided by `factor`, so `scaled(60)` allows 60 messages per second,
    /// 10 sessions per second and 20 per minute, 30 cancels per second.
    ///
    /// # Panics
    ///
    /// If `factor` is not a positive finite number: that is a bug in the test.
    pub fn scaled(factor: impl Into<f64>) -> Self {
        Self::knoq().time_scaled(factor)
    }

    /// These limits with every period divided by `factor` (see [`Self::scaled`]).
    ///
    /// # Panics
    ///
    /// If `factor` is not a positive finite number.
    pub fn time_scaled(mut self, factor: impl Into<f64>) -> Self {
        let factor = factor.into();
        assert!(
            factor.is_finite() && factor > 0.0,
            "SimLimits scale factor must be positive and finite, got {factor}"
        );
        for window in self
            .message
            .iter_mut()
            .chain(self.session.iter_mut())
            .chain(self.cancel.iter_mut())
        {
            window.period = Duration::from_secs_f64(window.period.as_secs_f64() / factor);
        }
        self
    }
}

/// Knoq's limits, so that `SimLimits { message: .., ..Default::default() }`
/// changes one bucket and keeps Knoq's numbers for the others.
impl Default for SimLimits {
    fn default() -> Self {
        Self::knoq()
    }
}

// === impl Window ===

impl Window {
    pub const fn new(limit: u32, period: Duration) -> Self {
        Self { limit, period }
    }

    pub const fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    pub const fn per_minute(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    pub const fn per_hour(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(3600))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_divides_every_period() {
        let limits = SimLimits::scaled(60);
        assert_eq!(limits.message, vec![Window::per_second(60)]);
        assert_eq!(
            limits.session,
            vec![Window::per_second(10), Window::per_minute(20)]
        );
        assert_eq!(limits.cancel, vec![Window::per_second(30)]);
        assert_eq!(
            SimLimits::scaled(0.5).cancel[0].period,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn debug_hides_cookies_and_the_scim_token() {
        let config = SimConfig {
            users: vec![SimUser::new("a", "knoq_session=secret-cookie")],
            scim_token: Some("secret-token".into()),
            ..SimConfig::default()
        };
        let text = format!("{config:?}");
        assert!(!text.contains("secret"), "{text}");
    }
}
