//! Users, their session cookies, and the rate limits that count per user.
//!
//! One std `Mutex` guards all accounts: the critical sections are a handful of
//! comparisons and a `VecDeque` push, and none is held across an `.await`.
//! Keeping cookies and rate logs under one lock makes "authenticate, check,
//! record" atomic without lock ordering rules.

use std::collections::HashSet;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use http::header::COOKIE;
use http::HeaderMap;
use tokio::time::Instant;

use super::clock::SimClock;
use super::config::{SimLimits, SimUser, Window, SESSION_COOKIE};
use super::limits::{retry_after_secs, RateLog};

/// Attributes of the `Set-Cookie` line a rotation sends.
const ROTATED_COOKIE_ATTRIBUTES: &str = "Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=2592000";

/// Pretend price of one query, only to fill the optional cost-cap fields of a
/// monthly-quota 429 (`monthToDateUsd`, `capUsd`).
pub(super) const USD_PER_QUERY: f64 = 0.01;

/// The rate-limited buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bucket {
    Message,
    Session,
    Cancel,
}

/// Why a request was refused with 429.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Refusal {
    /// A per-user window is full.
    Window { bucket: Bucket, retry_after: u32 },
    /// The organisation's monthly quota is spent.
    Monthly {
        retry_after: u32,
        used: u32,
        cap: u32,
    },
}

/// All accounts, behind one lock.
#[derive(Debug)]
pub(super) struct Accounts {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    users: Vec<Account>,
    limits: SimLimits,
    /// Messages and sessions accepted so far (the one organisation's quota use).
    monthly_used: u32,
}

/// One user's cookie state and rate logs. `Debug` leaves the cookie values out.
struct Account {
    name: String,
    /// The accepted `knoq_session` value; `None` after `expire_cookie`.
    session: Option<String>,
    /// A rotation waiting for the next successful response to this user.
    rotation: Option<String>,
    /// Raw `Set-Cookie` lines waiting for the next response to this user.
    raw_set_cookies: Vec<String>,
    messages: RateLog,
    sessions: RateLog,
    cancels: RateLog,
}

// === impl Accounts ===

impl Accounts {
    /// Checks the configured users: unique names, each with a `knoq_session` pair.
    pub(super) fn new(users: &[SimUser], limits: SimLimits) -> io::Result<Self> {
        let mut names = HashSet::new();
        let mut accounts = Vec::with_capacity(users.len());
        for user in users {
            if !names.insert(user.name.as_str()) {
                return Err(invalid(format!("duplicate sim user name {:?}", user.name)));
            }
            let Some(value) = session_value_of(&user.cookie) else {
                return Err(invalid(format!(
                    "cookie of sim user {:?} has no {SESSION_COOKIE}= pair",
                    user.name
                )));
            };
            accounts.push(Account::new(&user.name, value));
        }
        Ok(Self {
            inner: Mutex::new(Inner {
                users: accounts,
                limits,
                monthly_used: 0,
            }),
        })
    }

    /// The user whose current `knoq_session` value the request carries, in any
    /// of its `Cookie` headers (HTTP/2 clients may split cookies over several).
    /// Has no side effects.
    pub(super) fn authenticate(&self, headers: &HeaderMap) -> Option<String> {
        let inner = self.lock();
        request_session_values(headers).find_map(|value| {
            inner
                .users
                .iter()
                .find(|account| account.session.as_deref() == Some(value))
                .map(|account| account.name.clone())
        })
    }

    /// Admits one request of `bucket` for `user` now, or says why not. An
    /// admitted request is counted at once; a refused one is not counted.
    pub(super) fn admit(
        &self,
        user: &str,
        bucket: Bucket,
        clock: &SimClock,
    ) -> Result<(), Refusal> {
        let mut guard = self.lock();
        let Inner {
            users,
            limits,
            monthly_used,
        } = &mut *guard;
        let now = Instant::now();
        let windows = limits.windows(bucket);
        let Some(account) = users.iter_mut().find(|a| a.name == user) else {
            // Cannot happen for an authenticated user; admitting is harmless.
            return Ok(());
        };
        let log = account.log_mut(bucket);
        if let Some(wait) = log.wait(windows, now) {
            return Err(Refusal::Window {
                bucket,
                retry_after: retry_after_secs(wait),
            });
        }
        let counts_monthly = matches!(bucket, Bucket::Message | Bucket::Session);
        if let (true, Some(cap)) = (counts_monthly, limits.monthly_queries) {
            if *monthly_used >= cap {
                let secs = clock.secs_until_next_month();
                return Err(Refusal::Monthly {
                    retry_after: u32::try_from(secs).unwrap_or(u32::MAX),
                    used: *monthly_used,
                    cap,
                });
            }
        }
        log.record(windows, now);
        if counts_monthly {
            *monthly_used = monthly_used.saturating_add(1);
        }
        Ok(())
    }

    /// The `Set-Cookie` lines to send with a response to `user`, consuming
    /// them. A pending rotation takes effect here, and only on success: from
    /// this response on, only the new value is accepted.
    pub(super) fn take_set_cookies(&self, user: &str, success: bool) -> Vec<String> {
        let mut inner = self.lock();
        let Some(account) = inner.users.iter_mut().find(|a| a.name == user) else {
            return Vec::new();
        };
        let mut lines = std::mem::take(&mut account.raw_set_cookies);
        if success {
            if let Some(new_value) = account.rotation.take() {
                lines.push(format!(
                    "{SESSION_COOKIE}={new_value}; {ROTATED_COOKIE_ATTRIBUTES}"
                ));
                account.session = Some(new_value);
            }
        }
        lines
    }

    /// The `knoq_session` value accepted for `user` now, if any.
    pub(super) fn session_of(&self, user: &str) -> Option<String> {
        let inner = self.lock();
        inner
            .users
            .iter()
            .find(|a| a.name == user)
            .and_then(|a| a.session.clone())
    }

    /// Schedules a rotation; false if there is no such user.
    pub(super) fn rotate(&self, user: &str, new_value: &str) -> bool {
        self.with_account(user, |a| a.rotation = Some(new_value.to_string()))
    }

    /// Queues a raw `Set-Cookie` line; false if there is no such user.
    pub(super) fn push_set_cookie(&self, user: &str, raw: &str) -> bool {
        self.with_account(user, |a| a.raw_set_cookies.push(raw.to_string()))
    }

    /// Makes the user's current cookie invalid; false if there is no such user.
    pub(super) fn expire(&self, user: &str) -> bool {
        self.with_account(user, |a| {
            a.session = None;
            a.rotation = None;
        })
    }

    /// Makes `value` the user's accepted `knoq_session` value, adding the user
    /// if it does not exist yet.
    pub(super) fn set_session(&self, user: &str, value: &str) {
        let mut inner = self.lock();
        match inner.users.iter_mut().find(|a| a.name == user) {
            Some(account) => {
                account.session = Some(value.to_string());
                account.rotation = None;
            }
            None => inner.users.push(Account::new(user, value)),
        }
    }

    pub(super) fn set_limits(&self, limits: SimLimits) {
        self.lock().limits = limits;
    }

    fn with_account(&self, user: &str, change: impl FnOnce(&mut Account)) -> bool {
        let mut inner = self.lock();
        match inner.users.iter_mut().find(|a| a.name == user) {
            Some(account) => {
                change(account);
                true
            }
            None => false,
        }
    }

    /// A panic while holding this lock cannot leave accounts half-updated in a
    /// way that matters to a simulator, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Account ===

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("expired", &self.session.is_none())
            .field("rotation_pending", &self.rotation.is_some())
            .finish_non_exhaustive()
    }
}

impl Account {
    fn new(name: &str, session: &str) -> Self {
        Self {
            name: name.to_string(),
            session: Some(session.to_string()),
            rotation: None,
            raw_set_cookies: Vec::new(),
            messages: RateLog::default(),
            sessions: RateLog::default(),
            cancels: RateLog::default(),
        }
    }

    fn log_mut(&mut self, bucket: Bucket) -> &mut RateLog {
        match bucket {
            Bucket::Message => &mut self.messages,
            Bucket::Session => &mut self.sessions,
            Bucket::Cancel => &mut self.cancels,
        }
    }
}

// === impl SimLimits (bucket lookup) ===

impl SimLimits {
    fn windows(&self, bucket: Bucket) -> &[Window] {
        match bucket {
            Bucket::Message => &self.message,
            Bucket::Session => &self.session,
            Bucket::Cancel => &self.cancel,
        }
    }
}

// === impl Bucket ===

impl Bucket {
    /// Plural noun for error texts.
    pub(super) fn noun(self) -> &'static str {
        match self {
            Bucket::Message => "messages",
            Bucket::Session => "sessions",
            Bucket::Cancel => "cancels",
        }
    }
}

/// The `knoq_session` value in a cookie string such as `"a=1; knoq_session=x"`.
fn session_value_of(cookie: &str) -> Option<&str> {
    cookie.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name.trim() == SESSION_COOKIE).then(|| value.trim())
    })
}

/// Every `knoq_session` value in the request's `Cookie` headers.
fn request_session_values(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookie| {
            cookie.split(';').filter_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                (name.trim() == SESSION_COOKIE).then(|| value.trim())
            })
        })
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn accounts() -> Accounts {
        Accounts::new(
            &[SimUser::new("ann", "theme=dark; knoq_session=a1")],
            SimLimits::unlimited(),
        )
        .expect("valid users")
    }

    fn cookie(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn authenticates_by_the_session_pair_only() {
        let accounts = accounts();
        assert_eq!(
            accounts.authenticate(&cookie("knoq_session=a1")).as_deref(),
            Some("ann")
        );
        assert_eq!(
            accounts
                .authenticate(&cookie("x=1;knoq_session=a1 ; y=2"))
                .as_deref(),
            Some("ann")
        );
        assert_eq!(accounts.authenticate(&cookie("theme=dark")), None);
        assert_eq!(accounts.authenticate(&cookie("knoq_session=a2")), None);
        assert_eq!(accounts.authenticate(&HeaderMap::new()), None);
    }

    #[test]
    fn rotation_waits_for_a_success_then_replaces_the_value() {
        let accounts = accounts();
        assert!(accounts.rotate("ann", "a2"));
        assert!(accounts.take_set_cookies("ann", false).is_empty());
        assert!(accounts.authenticate(&cookie("knoq_session=a1")).is_some());
        let lines = accounts.take_set_cookies("ann", true);
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("knoq_session=a2; Path=/; HttpOnly"));
        assert!(accounts.authenticate(&cookie("knoq_session=a1")).is_none());
        assert!(accounts.authenticate(&cookie("knoq_session=a2")).is_some());
        assert!(!accounts.rotate("nobody", "x"));
    }

    #[test]
    fn rejects_bad_user_lists() {
        let dup = [
            SimUser::new("a", "knoq_session=1"),
            SimUser::new("a", "knoq_session=2"),
        ];
        assert!(Accounts::new(&dup, SimLimits::knoq()).is_err());
        let no_pair = [SimUser::new("a", "other=1")];
        assert!(Accounts::new(&no_pair, SimLimits::knoq()).is_err());
    }

    #[test]
    fn monthly_quota_counts_messages_and_sessions_only() {
        let limits = SimLimits {
            monthly_queries: Some(2),
            ..SimLimits::unlimited()
        };
        let accounts =
            Accounts::new(&[SimUser::new("a", "knoq_session=1")], limits).expect("valid users");
        let clock = SimClock::new();
        assert_eq!(accounts.admit("a", Bucket::Session, &clock), Ok(()));
        assert_eq!(accounts.admit("a", Bucket::Cancel, &clock), Ok(()));
        assert_eq!(accounts.admit("a", Bucket::Message, &clock), Ok(()));
        assert!(matches!(
            accounts.admit("a", Bucket::Message, &clock),
            Err(Refusal::Monthly {
                used: 2,
                cap: 2,
                ..
            })
        ));
    }
}
