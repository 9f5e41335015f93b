//! Quota state behind one operation: an atomic check-and-consume over
//! several windows. [`QuotaStore`] is the seam where a shared store (Redis,
//! for several gateway replicas) can be added without touching the request
//! path; [`LocalStore`] keeps state in this process, journalled to disk.
//!
//! `LocalStore` holds one `Mutex` per user (in a `DashMap`), taken for the
//! microseconds of a check-and-consume and never across an `.await`: a
//! user's token and user windows change together, and different users never
//! wait for each other. The journal line of an admission is written while
//! the lock is held, before the request is forwarded, so a crash can lose
//! nothing that was sent.

use std::collections::HashMap;
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

pub trait QuotaStore: Send + Sync {
    /// If every window of the demand admits one more request at `now` and
    /// no cool-down runs, records it in all of them; otherwise changes
    /// nothing and says what refused it.
    fn acquire(&self, demand: &Demand<'_>, now: Millis) -> Result<Grant, Refusal>;

    /// Refuses the user's bucket until `until` (a 429 from Knoq).
    fn cool_down(&self, user: &str, bucket: Bucket, until: Millis);

    /// Headroom of every window of the user's buckets at `now` (metrics).
    fn headroom(&self, user: &str, windows: &[(Bucket, &Window)], now: Millis) -> Vec<u32>;
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
                    store.with_user(&user, |state| record_all(state, &demand, at));
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

fn record_all(state: &mut UserState, demand: &Demand<'_>, at: Millis) {
    for (scope, w) in scopes(demand) {
        ledger(
            state,
            scope,
            demand.token,
            WindowKey::new(demand.bucket, w),
            w,
        )
        .record(w, at);
    }
}

impl QuotaStore for LocalStore {
    fn acquire(&self, demand: &Demand<'_>, now: Millis) -> Result<Grant, Refusal> {
        let margin = self.margin;
        self.with_user(demand.user, |state| {
            let cooling = state.cool_down[demand.bucket as usize];
            if cooling > now {
                return Err(Refusal {
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
            // Check every window first; the latest "blocked until" decides.
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
            if let Some(r) = refusal {
                return Err(r);
            }
            record_all(state, demand, now);
            if let Some(journal) = &self.journal {
                journal.admit(now, demand.user, demand.token, demand.bucket);
            }
            // The tightest window: least remaining, then longest to reset.
            let mut tightest: Option<Standing> = None;
            for (scope, w) in scopes(demand) {
                let key = WindowKey::new(demand.bucket, w);
                let l = ledger(state, scope, demand.token, key, w);
                let (remaining, reset_ms) =
                    (l.remaining(w, margin, now), l.reset_in(w, margin, now));
                let tighter = tightest.as_ref().is_none_or(|t| {
                    (remaining, std::cmp::Reverse(reset_ms))
                        < (t.remaining, std::cmp::Reverse(t.reset_ms))
                });
                if tighter {
                    tightest = Some(Standing {
                        bucket: demand.bucket,
                        scope,
                        window: Some(w.clone()),
                        remaining,
                        reset_ms,
                    });
                }
            }
            Ok(Grant { tightest })
        })
    }

    fn cool_down(&self, user: &str, bucket: Bucket, until: Millis) {
        self.with_user(user, |state| {
            let slot = &mut state.cool_down[bucket as usize];
            *slot = (*slot).max(until);
            if let Some(journal) = &self.journal {
                journal.cool_down(until, user, bucket);
            }
        });
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
        assert!(store.acquire(&batch, 0).is_ok());
        assert!(store.acquire(&batch, 1).is_ok());
        let r = store.acquire(&batch, 2).unwrap_err();
        assert_eq!((r.standing.scope, r.until), (Scope::Token, 1000));
        // The token's refusal did not consume the user's third slot.
        let g = store.acquire(&svc, 3).unwrap();
        assert_eq!(g.tightest.unwrap().remaining, 0);
        let r = store.acquire(&svc, 4).unwrap_err();
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
        store.cool_down("alice", Bucket::Message, 5_000);
        let r = store.acquire(&d, 1_000).unwrap_err();
        assert_eq!((r.standing.scope, r.until), (Scope::Knoq, 5_000));
        let read = Demand {
            bucket: Bucket::Read,
            ..d
        };
        assert!(store.acquire(&read, 1_000).is_ok());
        assert!(store.acquire(&d, 5_000).is_ok());
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
            assert!(store.acquire(&d, t).is_ok(), "{t}");
        }
        // Per-second window is free again at 2_010, but the minute is full.
        let r = store.acquire(&d, 2_010).unwrap_err();
        assert_eq!(r.until, 60_000);
        assert_eq!(r.standing.window.unwrap().to_string(), "3/min");
    }
}
