//! Quota state behind one operation: an atomic check-and-consume over
//! several windows. [`QuotaStore`] is the seam where a shared store (Redis,
//! for several gateway replicas) can be added without touching the request
//! path: its calls are asynchronous and can fail with a [`StoreError`], so
//! a store across a network never blocks a runtime worker, and a failure
//! reaches `error.rs` as a typed error. [`LocalStore`] keeps state in this
//! process, journalled to disk; it answers at once and never fails.
//!
//! `LocalStore` holds one `Mutex` per user (in a `DashMap`), taken for the
//! microseconds of a check-and-consume and never across an `.await`: a
//! user's token and user windows change together, and different users never
//! wait for each other. The journal line of an admission is written while
//! the lock is held, before the request is forwarded, so a crash can lose
//! nothing that was sent.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;

use dashmap::DashMap;

use super::journal::{Journal, Record};
use super::window::{Ledger, Period, Window};
use super::{Bucket, Grant, Policy, Refusal, Scope, Standing};
use crate::clock::Millis;

/// One request's claim on quota.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    pub user: &'a str,
    pub token: &'a str,
    pub bucket: Bucket,
    pub user_windows: &'a [Window],
    pub token_windows: &'a [Window],
}

pub use crate::shared_store::StoreError;

/// What a store call returns: a future, so a networked store can wait
/// without holding a thread, boxed so the trait can be a `dyn` seam.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

pub trait QuotaStore: Send + Sync {
    /// If every window of the demand admits one more request at `now` and
    /// no cool-down runs, records it in all of them; otherwise changes
    /// nothing and says what refused it.
    fn acquire<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<Grant, Refusal>>;

    /// What `acquire` would refuse, without recording anything.
    fn check<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<(), Refusal>>;

    /// Refuses the user's bucket until `until` (a 429 from Knoq).
    fn cool_down<'a>(
        &'a self,
        user: &'a str,
        bucket: Bucket,
        now: Millis,
        until: Millis,
    ) -> StoreFuture<'a, ()>;

    /// Headroom of every window of the user's buckets at `now`, for
    /// `/metrics`. Never waits: a store across a network answers from the
    /// last values it saw, so a scrape costs no round trip per series.
    fn headroom(&self, user: &str, windows: &[(Bucket, &Window)], now: Millis) -> Vec<u32>;

    /// The windows in force from now on (start-up, or a reload that
    /// changed them): a store keeps what they need, and may forget the rest.
    fn adopt_policy(&self, policy: &Policy);
}

/// A store answer that is ready at once.
fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct WindowKey {
    bucket: Bucket,
    limit: u32,
    period: Period,
}

impl WindowKey {
    fn new(bucket: Bucket, w: &Window) -> Self {
        WindowKey {
            bucket,
            limit: w.limit,
            period: w.period,
        }
    }
}

type Ledgers = HashMap<WindowKey, Ledger>;

/// Everything one user has consumed, and its tokens' shares.
#[derive(Debug, Default)]
struct UserState {
    own: Ledgers,
    tokens: HashMap<Box<str>, Ledgers>,
    /// Per bucket: no request before this time (Knoq's 429).
    cool_down: [Millis; 4],
    /// The latest admission recorded. Clocks are read before the lock, so
    /// two requests may arrive here out of order; a time earlier than this
    /// is raised to it, keeping every log in time order.
    latest: Millis,
}

/// In-process quota state with an optional journal for restarts.
pub struct LocalStore {
    users: DashMap<Box<str>, Mutex<UserState>>,
    margin: Millis,
    journal: Option<Journal>,
}

// === impl LocalStore ===

impl LocalStore {
    /// A store that forgets everything on restart (tests, benchmarks).
    pub fn in_memory(margin: Millis) -> Self {
        LocalStore {
            users: DashMap::new(),
            margin,
            journal: None,
        }
    }

    /// The store of a state directory: creates the directory if needed,
    /// checks, compacts and replays the journal in it, and appends to it
    /// from now on. The error names the file and line of any damage.
    pub fn open_dir(
        dir: &Path,
        policy: &Policy,
        margin: Millis,
        now: Millis,
    ) -> Result<Self, String> {
        crate::state::ensure_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (journal, history) = Journal::open(
            dir,
            now,
            policy.retention(margin),
            super::journal::SEGMENT_BYTES,
        )?;
        Ok(LocalStore::open(journal, history, policy, margin))
    }

    /// Checks what [`open_dir`](Self::open_dir) would read, changing no file.
    pub fn inspect_dir(dir: &Path) -> Result<(), String> {
        Journal::inspect(dir).map(drop)
    }

    /// A store whose admissions and cool-downs survive restarts: replays
    /// the journal against the current policy, then appends to it.
    pub fn open(journal: Journal, history: Vec<Record>, policy: &Policy, margin: Millis) -> Self {
        let store = LocalStore {
            users: DashMap::new(),
            margin,
            journal: None,
        };
        for record in history {
            match record {
                Record::Admit {
                    at,
                    user,
                    token,
                    bucket,
                } => {
                    let demand = Demand {
                        user: &user,
                        token: &token,
                        bucket,
                        user_windows: policy.user_windows(&user, bucket),
                        token_windows: policy.token_windows(&token, bucket),
                    };
                    store.with_user(&user, |state| {
                        state.latest = state.latest.max(at);
                        record_all(state, &demand, margin, at);
                    });
                }
                Record::CoolDown {
                    until,
                    user,
                    bucket,
                } => {
                    store.with_user(&user, |state| {
                        let slot = &mut state.cool_down[bucket as usize];
                        *slot = (*slot).max(until);
                    });
                }
            }
        }
        LocalStore {
            journal: Some(journal),
            ..store
        }
    }

    fn with_user<R>(&self, user: &str, f: impl FnOnce(&mut UserState) -> R) -> R {
        if let Some(state) = self.users.get(user) {
            return f(&mut state.lock().unwrap_or_else(|p| p.into_inner()));
        }
        let state = self.users.entry(user.into()).or_default();
        let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

/// Every (scope, key, window) a demand touches, user scope first.
fn scopes<'d>(demand: &'d Demand<'d>) -> impl Iterator<Item = (Scope, &'d Window)> {
    demand
        .user_windows
        .iter()
        .map(|w| (Scope::User, w))
        .chain(demand.token_windows.iter().map(|w| (Scope::Token, w)))
}

fn ledger<'s>(
    state: &'s mut UserState,
    scope: Scope,
    token: &str,
    key: WindowKey,
    w: &Window,
) -> &'s mut Ledger {
    let ledgers = match scope {
        Scope::User | Scope::Knoq => &mut state.own,
        Scope::Token => {
            if !state.tokens.contains_key(token) {
                state.tokens.insert(token.into(), Ledgers::new());
            }
            state.tokens.get_mut(token).expect("inserted above")
        }
    };
    ledgers.entry(key).or_insert_with(|| Ledger::new(w))
}

fn record_all(state: &mut UserState, demand: &Demand<'_>, margin: Millis, at: Millis) {
    for (scope, w) in scopes(demand) {
        ledger(
            state,
            scope,
            demand.token,
            WindowKey::new(demand.bucket, w),
            w,
        )
        .record(w, margin, at);
    }
}

/// What refuses `demand` at `now`, if anything: a Knoq cool-down, or the
/// window that stays blocked the longest.
fn refusal(
    state: &mut UserState,
    demand: &Demand<'_>,
    now: Millis,
    margin: Millis,
) -> Option<Refusal> {
    let cooling = state.cool_down[demand.bucket as usize];
    if cooling > now {
        return Some(Refusal {
            standing: Standing {
                bucket: demand.bucket,
                scope: Scope::Knoq,
                window: None,
                remaining: 0,
                reset_ms: cooling - now,
            },
            until: cooling,
        });
    }
    let mut refusal: Option<Refusal> = None;
    for (scope, w) in scopes(demand) {
        let key = WindowKey::new(demand.bucket, w);
        if let Some(until) =
            ledger(state, scope, demand.token, key, w).blocked_until(w, margin, now)
        {
            if refusal.as_ref().is_none_or(|r| until > r.until) {
                refusal = Some(Refusal {
                    standing: Standing {
                        bucket: demand.bucket,
                        scope,
                        window: Some(w.clone()),
                        remaining: 0,
                        reset_ms: until - now,
                    },
                    until,
                });
            }
        }
    }
    refusal
}

impl QuotaStore for LocalStore {
    fn check<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<(), Refusal>> {
        ready(self.check_now(demand, now))
    }

    fn acquire<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<Grant, Refusal>> {
        ready(self.acquire_now(demand, now))
    }

    fn cool_down<'a>(
        &'a self,
        user: &'a str,
        bucket: Bucket,
        now: Millis,
        until: Millis,
    ) -> StoreFuture<'a, ()> {
        self.cool_down_now(user, bucket, now, until);
        ready(())
    }

    fn headroom(&self, user: &str, windows: &[(Bucket, &Window)], now: Millis) -> Vec<u32> {
        let margin = self.margin;
        self.with_user(user, |state| {
            windows
                .iter()
                .map(|(bucket, w)| {
                    state
                        .own
                        .get(&WindowKey::new(*bucket, w))
                        .map_or(w.limit, |l| l.remaining(w, margin, now))
                })
                .collect()
        })
    }

    fn adopt_policy(&self, policy: &Policy) {
        if let Some(journal) = &self.journal {
            journal.set_retention(policy.retention(self.margin));
        }
    }
}

// The local store's answers, computed at once under the user's lock.
impl LocalStore {
    /// What `acquire` would refuse, without recording anything.
    pub fn check_now(&self, demand: &Demand<'_>, now: Millis) -> Result<(), Refusal> {
        self.with_user(demand.user, |state| {
            let now = now.max(state.latest);
            refusal(state, demand, now, self.margin).map_or(Ok(()), Err)
        })
    }

    /// Checks and consumes in one step (see [`QuotaStore::acquire`]).
    pub fn acquire_now(&self, demand: &Demand<'_>, now: Millis) -> Result<Grant, Refusal> {
        let margin = self.margin;
        self.with_user(demand.user, |state| {
            let now = now.max(state.latest);
            if let Some(r) = refusal(state, demand, now, margin) {
                return Err(r);
            }
            state.latest = now;
            record_all(state, demand, margin, now);
            // A bucket with no window (reads, by default) has nothing to
            // replay: it costs no journal write.
            let metered = !(demand.user_windows.is_empty() && demand.token_windows.is_empty());
            if let (Some(journal), true) = (&self.journal, metered) {
                journal.admit(now, demand.user, demand.token, demand.bucket);
            }
            // The tightest window: least remaining, then longest to reset.
            let mut tightest: Option<Standing> = None;
            for (scope, w) in scopes(demand) {
                let key = WindowKey::new(demand.bucket, w);
                let l = ledger(state, scope, demand.token, key, w);
                let (remaining, reset_ms) =
                    (l.remaining(w, margin, now), l.reset_in(w, margin, now));
                Standing::keep_tightest(
                    &mut tightest,
                    Standing {
                        bucket: demand.bucket,
                        scope,
                        window: Some(w.clone()),
                        remaining,
                        reset_ms,
                    },
                );
            }
            Ok(Grant { tightest })
        })
    }

    /// Refuses the user's bucket until `until`, journalled.
    pub fn cool_down_now(&self, user: &str, bucket: Bucket, now: Millis, until: Millis) {
        self.with_user(user, |state| {
            let slot = &mut state.cool_down[bucket as usize];
            *slot = (*slot).max(until);
            if let Some(journal) = &self.journal {
                journal.cool_down(now, until, user, bucket);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(texts: &[&str]) -> Vec<Window> {
        texts.iter().map(|t| Window::parse(t).unwrap()).collect()
    }

    #[test]
    fn token_and_user_windows_are_checked_together_and_refusal_consumes_nothing() {
        let store = LocalStore::in_memory(0);
        let user = windows(&["3/sec"]);
        let tight = windows(&["2/sec"]);
        let batch = Demand {
            user: "alice",
            token: "batch",
            bucket: Bucket::Message,
            user_windows: &user,
            token_windows: &tight,
        };
        let svc = Demand {
            token: "svc",
            token_windows: &[],
            ..batch
        };
        assert!(store.acquire_now(&batch, 0).is_ok());
        assert!(store.acquire_now(&batch, 1).is_ok());
        let r = store.acquire_now(&batch, 2).unwrap_err();
        assert_eq!((r.standing.scope, r.until), (Scope::Token, 1000));
        // The token's refusal did not consume the user's third slot.
        let g = store.acquire_now(&svc, 3).unwrap();
        assert_eq!(g.tightest.unwrap().remaining, 0);
        let r = store.acquire_now(&svc, 4).unwrap_err();
        assert_eq!(r.standing.scope, Scope::User);
        assert_eq!(r.until, 1000);
    }

    #[test]
    fn cool_down_refuses_until_it_ends_for_that_bucket_only() {
        let store = LocalStore::in_memory(0);
        let user = windows(&["60/min"]);
        let d = Demand {
            user: "alice",
            token: "t",
            bucket: Bucket::Message,
            user_windows: &user,
            token_windows: &[],
        };
        store.cool_down_now("alice", Bucket::Message, 0, 5_000);
        let r = store.acquire_now(&d, 1_000).unwrap_err();
        assert_eq!((r.standing.scope, r.until), (Scope::Knoq, 5_000));
        let read = Demand {
            bucket: Bucket::Read,
            ..d
        };
        assert!(store.acquire_now(&read, 1_000).is_ok());
        assert!(store.acquire_now(&d, 5_000).is_ok());
    }

    #[test]
    fn out_of_order_clock_reads_cannot_overfill_a_window() {
        let store = LocalStore::in_memory(0);
        let user = windows(&["2/sec"]);
        let d = Demand {
            user: "a",
            token: "t",
            bucket: Bucket::Message,
            user_windows: &user,
            token_windows: &[],
        };
        // Read 500, 499 (a slower thread), then 1499: three in (499, 1499]
        // would pass a log that trusts the order; this one refuses the third.
        assert!(store.acquire_now(&d, 500).is_ok());
        assert!(store.acquire_now(&d, 499).is_ok());
        assert!(store.acquire_now(&d, 1_499).is_err());
        assert!(store.acquire_now(&d, 1_500).is_ok());
    }

    #[test]
    fn cool_downs_and_admissions_survive_a_replay_through_the_journal() {
        let dir = std::env::temp_dir().join(format!("kgw-store-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = crate::config::Config::from_toml_str(
            &format!(
                "[quotas]\nmessage = [\"2/hour\"]\n[[users]]\nname = \"alice\"\ncookie_env = \"X\"\n[[tokens]]\nname = \"svc\"\nuser = \"alice\"\nsha256 = \"{}\"\n",
                "ab".repeat(32)
            ),
            std::path::Path::new("/"),
        )
        .unwrap();
        let policy = config.quota_policy();
        let open = |now| {
            let (j, history) = Journal::open(&dir, now, policy.retention(0), 1 << 20).unwrap();
            LocalStore::open(j, history, &policy, 0)
        };
        let d = |bucket| Demand {
            user: "alice",
            token: "svc",
            bucket,
            user_windows: policy.user_windows("alice", bucket),
            token_windows: &[],
        };
        let store = open(1_000);
        assert!(store.acquire_now(&d(Bucket::Message), 1_000).is_ok());
        assert!(store.acquire_now(&d(Bucket::Message), 1_001).is_ok());
        // Reads have no window here: admitted, and never written down.
        assert!(store.acquire_now(&d(Bucket::Read), 1_002).is_ok());
        store.cool_down_now("alice", Bucket::Read, 1_002, 90_000);
        drop(store);
        let text = std::fs::read_to_string(dir.join(crate::quota::journal::FILE_NAME)).unwrap();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("A ")).count(),
            2,
            "only the metered admissions: {text}"
        );
        let store = open(2_000);
        let r = store.acquire_now(&d(Bucket::Message), 2_000).unwrap_err();
        assert_eq!(r.until, 1_000 + 3_600_000);
        let r = store.acquire_now(&d(Bucket::Read), 2_000).unwrap_err();
        assert_eq!((r.standing.scope, r.until), (Scope::Knoq, 90_000));
    }

    #[test]
    fn the_latest_blocking_window_decides_retry_time() {
        let store = LocalStore::in_memory(0);
        let user = windows(&["2/sec", "3/min"]);
        let d = Demand {
            user: "a",
            token: "t",
            bucket: Bucket::Session,
            user_windows: &user,
            token_windows: &[],
        };
        for t in [0, 10, 2_000] {
            assert!(store.acquire_now(&d, t).is_ok(), "{t}");
        }
        // Per-second window is free again at 2_010, but the minute is full.
        let r = store.acquire_now(&d, 2_010).unwrap_err();
        assert_eq!(r.until, 60_000);
        assert_eq!(r.standing.window.unwrap().to_string(), "3/min");
    }
}
