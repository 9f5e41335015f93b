//! The quota store on the shared Redis (`[store] kind = "redis"`): every
//! replica's check-and-consume over every window of the account and of the
//! token, and the Knoq cool-downs, run as one atomic script per request
//! (`admit.lua`, by `EVALSHA`, loaded again by redis-rs on `NOSCRIPT`).
//!
//! Exact across replicas: the script keeps each sliding window as a sorted
//! set of admissions (score the time, member the admission's unique id) and
//! each month window as the local ledger's three numbers, with the same
//! arithmetic as [`window`](super::window), and reads the time from Redis
//! (`TIME`), so the replicas' clocks do not matter. A refused request
//! consumes nothing. Each admission carries an id; a call whose connection
//! broke is tried again with the same id, and a script that already
//! recorded it answers "admitted" without counting it twice.
//!
//! Times the script returns are converted to the caller's clock as
//! durations (`until = now + wait`), so `Retry-After` is right whatever the
//! skew between this host and Redis.
//!
//! `/metrics` headroom never waits: it shows what the last decision for
//! each window said.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::store::{Demand, QuotaStore, StoreFuture};
use super::window::{Period, Window};
use super::{Bucket, Grant, Policy, Refusal, Scope, Standing};
use crate::clock::Millis;
use crate::shared_store::{retryable, SharedStore, StoreError};

const SCRIPT: &str = include_str!("admit.lua");

/// Whose clock the script reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreTime {
    /// Redis's `TIME`: one clock for every replica (what `serve` uses).
    Server,
    /// The `now` each call is given (tests that drive time themselves).
    Caller,
}

/// The last standing seen for one of an account's windows.
#[derive(Debug, Clone, Copy)]
struct Seen {
    remaining: u32,
    at: Millis,
    span: Millis,
}

pub struct SharedQuotaStore {
    store: Arc<SharedStore>,
    script: redis::Script,
    margin: Millis,
    time: StoreTime,
    /// This process's prefix for admission ids, random per start.
    replica: String,
    next_id: AtomicU64,
    seen: DashMap<(Box<str>, Bucket, Window), Seen>,
}

/// What the script was asked, and of which windows, in its order.
struct Call<'a> {
    op: &'static str,
    windows: Vec<(Scope, &'a Window)>,
    keys: Vec<String>,
    id: String,
}

// === impl SharedQuotaStore ===

impl SharedQuotaStore {
    pub fn new(store: Arc<SharedStore>, margin: Millis, time: StoreTime) -> Self {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).expect("the OS has a random source");
        SharedQuotaStore {
            store,
            script: redis::Script::new(SCRIPT),
            margin,
            time,
            replica: format!("{:016x}", u64::from_le_bytes(seed)),
            next_id: AtomicU64::new(0),
            seen: DashMap::new(),
        }
    }

    fn window_key(&self, demand: &Demand<'_>, scope: Scope, w: &Window) -> String {
        let period = match w.period {
            Period::Sliding(ms) => format!("s{ms}"),
            Period::Month => "m".to_string(),
        };
        let what = match scope {
            Scope::Token => format!(
                "q:{}:{}:{period}:t:{}",
                demand.bucket.label(),
                w.limit,
                demand.token
            ),
            Scope::User | Scope::Knoq => {
                format!("q:{}:{}:{period}:u", demand.bucket.label(), w.limit)
            }
        };
        self.store.key(demand.user, &what)
    }

    fn prepare<'d>(&self, op: &'static str, demand: &'d Demand<'d>) -> Call<'d> {
        let windows: Vec<(Scope, &Window)> = demand
            .user_windows
            .iter()
            .map(|w| (Scope::User, w))
            .chain(demand.token_windows.iter().map(|w| (Scope::Token, w)))
            .collect();
        let id = format!(
            "{}-{}",
            self.replica,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut keys = Vec::with_capacity(windows.len() + 2);
        keys.push(self.store.key(demand.user, "account"));
        keys.push(self.store.key(demand.user, &format!("id:{id}")));
        keys.extend(windows.iter().map(|(s, w)| self.window_key(demand, *s, w)));
        Call {
            op,
            windows,
            keys,
            id,
        }
    }

    /// Runs the script once, and once more with the same arguments if the
    /// connection broke (within the store's one deadline).
    async fn run(
        &self,
        op_label: &'static str,
        call: &Call<'_>,
        bucket: Bucket,
        now: Millis,
        extra: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        invocation
            .arg(call.op)
            .arg(match self.time {
                StoreTime::Server => String::new(),
                StoreTime::Caller => now.to_string(),
            })
            .arg(self.margin)
            .arg(bucket as usize)
            .arg(extra)
            .arg(call.windows.len());
        for (_, w) in &call.windows {
            let (kind, period) = match w.period {
                Period::Sliding(ms) => ("s", ms),
                Period::Month => ("m", 0),
            };
            invocation.arg(kind).arg(w.limit).arg(period);
        }
        self.store
            .call(op_label, |mut connection| async move {
                match invocation.invoke_async(&mut connection).await {
                    Err(e) if retryable(&e) => invocation.invoke_async(&mut connection).await,
                    other => other,
                }
            })
            .await
    }

    fn refusal(
        &self,
        demand: &Demand<'_>,
        call: &Call<'_>,
        answer: &[i64],
        now: Millis,
    ) -> Refusal {
        let wait = answer.get(1).copied().unwrap_or(1000).max(0) as Millis;
        let which = answer.get(2).copied().unwrap_or(0);
        let (scope, window) = match usize::try_from(which - 1)
            .ok()
            .and_then(|i| call.windows.get(i))
        {
            Some((scope, w)) => (*scope, Some((*w).clone())),
            None => (Scope::Knoq, None),
        };
        Refusal {
            standing: Standing {
                bucket: demand.bucket,
                scope,
                window,
                remaining: 0,
                reset_ms: wait,
            },
            until: now + wait,
        }
    }

    fn grant(&self, demand: &Demand<'_>, call: &Call<'_>, answer: &[i64], now: Millis) -> Grant {
        let mut tightest: Option<Standing> = None;
        for (i, (scope, w)) in call.windows.iter().enumerate() {
            let remaining = answer.get(2 + 2 * i).copied().unwrap_or(0).max(0) as u32;
            let reset_ms = answer.get(3 + 2 * i).copied().unwrap_or(0).max(0) as Millis;
            if *scope == Scope::User {
                let span = match w.period {
                    Period::Sliding(ms) => ms + self.margin,
                    Period::Month => 31 * crate::clock::DAY_MS + self.margin,
                };
                self.seen.insert(
                    (demand.user.into(), demand.bucket, (*w).clone()),
                    Seen {
                        remaining,
                        at: now,
                        span,
                    },
                );
            }
            Standing::keep_tightest(
                &mut tightest,
                Standing {
                    bucket: demand.bucket,
                    scope: *scope,
                    window: Some((*w).clone()),
                    remaining,
                    reset_ms,
                },
            );
        }
        Grant { tightest }
    }
}

impl QuotaStore for SharedQuotaStore {
    fn acquire<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<Grant, Refusal>> {
        Box::pin(async move {
            let call = self.prepare("acquire", demand);
            let answer = self
                .run("acquire", &call, demand.bucket, now, &call.id)
                .await?;
            Ok(match answer.first() {
                Some(1) | Some(2) => Ok(self.grant(demand, &call, &answer, now)),
                _ => Err(self.refusal(demand, &call, &answer, now)),
            })
        })
    }

    fn check<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let call = self.prepare("check", demand);
            let answer = self.run("check", &call, demand.bucket, now, "").await?;
            Ok(match answer.first() {
                Some(1) => Ok(()),
                _ => Err(self.refusal(demand, &call, &answer, now)),
            })
        })
    }

    fn cool_down<'a>(
        &'a self,
        user: &'a str,
        bucket: Bucket,
        now: Millis,
        until: Millis,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let demand = Demand {
                user,
                token: "",
                bucket,
                user_windows: &[],
                token_windows: &[],
            };
            let mut call = self.prepare("cool", &demand);
            // No admission: the id key is never written.
            call.keys[1] = self.store.key(user, "id:-");
            let length = until.saturating_sub(now).to_string();
            self.run("cool_down", &call, bucket, now, &length)
                .await
                .map(drop)
        })
    }

    fn headroom(&self, user: &str, windows: &[(Bucket, &Window)], now: Millis) -> Vec<u32> {
        windows
            .iter()
            .map(|(bucket, w)| {
                match self
                    .seen
                    .get(&(Box::<str>::from(user), *bucket, (*w).clone()))
                {
                    Some(seen) if now < seen.at + seen.span => seen.remaining,
                    _ => w.limit,
                }
            })
            .collect()
    }

    fn adopt_policy(&self, _policy: &Policy) {
        // Keys carry their own expiry, set from the windows of each call.
    }
}
