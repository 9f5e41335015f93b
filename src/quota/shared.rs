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
//!
//! With `on_error = "local_share"`, a call that fails (or any call while
//! the store is known to be away, so no request waits on it) is decided by
//! an in-memory store of this replica's own, every limit divided by
//! `replicas`: together the replicas stay within Knoq's limits. Each
//! admission made so is kept (with its id and time) and written back, by
//! the script's `record`, before the first decision Redis makes again; the
//! id makes a repeated write-back count once.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;

use super::store::{Demand, LocalStore, QuotaStore, StoreFuture};
use super::window::{Period, Window};
use super::{Bucket, Grant, Policy, Refusal, Scope, Standing};
use crate::clock::Millis;
use crate::shared_store::{retryable, OnStoreError, SharedStore, StoreError};

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
    /// Redis's clock minus the caller's, as of the last answer (ms).
    skew: AtomicI64,
    fallback: Option<Fallback>,
}

/// This replica's share while Redis is away (`local_share`).
struct Fallback {
    replicas: u32,
    local: LocalStore,
    owed: Mutex<Vec<Owed>>,
    /// Set from the first admission on the share until all are written
    /// back: while set, no decision goes to Redis before the write-back.
    owing: std::sync::atomic::AtomicBool,
    /// One write-back at a time; the others wait for it.
    writing: tokio::sync::Mutex<()>,
}

/// An admission made on the replica's share, to be written back.
struct Owed {
    user: Box<str>,
    token: Box<str>,
    bucket: Bucket,
    user_windows: Vec<Window>,
    token_windows: Vec<Window>,
    id: String,
    at: Millis,
}

/// A bound on admissions kept for write-back (each limit's share bounds
/// them already; this bounds a misconfiguration).
const MAX_OWED: usize = 100_000;

impl Fallback {
    /// The demand's windows on this replica's share.
    fn shares(&self, demand: &Demand<'_>) -> (Vec<Window>, Vec<Window>) {
        (
            share(demand.user_windows, self.replicas),
            share(demand.token_windows, self.replicas),
        )
    }
}

/// `windows` with every limit divided by `replicas`, rounded down.
fn share(windows: &[Window], replicas: u32) -> Vec<Window> {
    windows
        .iter()
        .map(|w| {
            let mut w = w.clone();
            w.limit /= replicas.max(1);
            w
        })
        .collect()
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
            script: redis::Script::new(SCRIPT),
            margin,
            time,
            replica: format!("{:016x}", u64::from_le_bytes(seed)),
            next_id: AtomicU64::new(0),
            seen: DashMap::new(),
            skew: AtomicI64::new(0),
            fallback: match store.on_error() {
                OnStoreError::Reject => None,
                OnStoreError::LocalShare { replicas } => Some(Fallback {
                    replicas,
                    local: LocalStore::in_memory(margin),
                    owed: Mutex::new(Vec::new()),
                    owing: std::sync::atomic::AtomicBool::new(false),
                    writing: tokio::sync::Mutex::new(()),
                }),
            },
            store,
        }
    }

    fn new_id(&self) -> String {
        format!(
            "{}-{}",
            self.replica,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Notes Redis's time in an answer (its `now` at `index`).
    fn note_skew(&self, answer: &[i64], index: usize, now: Millis) {
        if let Some(server) = answer.get(index) {
            self.skew.store(server - now as i64, Ordering::Relaxed);
        }
    }

    /// Admits on this replica's share, and keeps the admission for
    /// write-back.
    /// `id`: the admission's id when a call to Redis failed (it may have
    /// counted there: the write-back then counts it once).
    async fn acquire_on_share(
        &self,
        fallback: &Fallback,
        demand: &Demand<'_>,
        now: Millis,
        id: Option<String>,
    ) -> Result<Result<Grant, Refusal>, StoreError> {
        let (user_windows, token_windows) = fallback.shares(demand);
        let scaled = Demand {
            user_windows: &user_windows,
            token_windows: &token_windows,
            ..*demand
        };
        let decision = fallback.local.acquire(&scaled, now).await?;
        if decision.is_ok() {
            let mut owed = fallback.owed.lock().unwrap_or_else(|p| p.into_inner());
            if owed.len() >= MAX_OWED {
                owed.remove(0);
            }
            owed.push(Owed {
                user: demand.user.into(),
                token: demand.token.into(),
                bucket: demand.bucket,
                user_windows: demand.user_windows.to_vec(),
                token_windows: demand.token_windows.to_vec(),
                id: id.unwrap_or_else(|| self.new_id()),
                at: now,
            });
            fallback.owing.store(true, Ordering::SeqCst);
        }
        Ok(decision)
    }

    /// What the share would refuse.
    async fn check_on_share(
        &self,
        fallback: &Fallback,
        demand: &Demand<'_>,
        now: Millis,
    ) -> Result<Result<(), Refusal>, StoreError> {
        let (user_windows, token_windows) = fallback.shares(demand);
        let scaled = Demand {
            user_windows: &user_windows,
            token_windows: &token_windows,
            ..*demand
        };
        fallback.local.check(&scaled, now).await
    }

    /// Whether decisions are Redis's again: it answers and what the share
    /// admitted meanwhile is written back.
    async fn back_on_redis(&self, fallback: &Fallback) -> bool {
        self.store.is_up() && self.write_back(fallback).await.is_ok()
    }

    /// Writes back what was admitted on the share while Redis was away,
    /// before Redis decides anything again. Stops at the first failure,
    /// keeping the rest.
    async fn write_back(&self, fallback: &Fallback) -> Result<(), StoreError> {
        if !fallback.owing.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _one = fallback.writing.lock().await;
        let owed: Vec<Owed> =
            std::mem::take(&mut *fallback.owed.lock().unwrap_or_else(|p| p.into_inner()));
        if owed.is_empty() {
            // Another task wrote them back while this one waited.
            return Ok(());
        }
        let total = owed.len();
        for (done, o) in owed.iter().enumerate() {
            let demand = Demand {
                user: &o.user,
                token: &o.token,
                bucket: o.bucket,
                user_windows: &o.user_windows,
                token_windows: &o.token_windows,
            };
            if let Err(e) = self.record(&demand, &o.id, o.at).await {
                let mut kept = fallback.owed.lock().unwrap_or_else(|p| p.into_inner());
                let rest: Vec<Owed> = owed.into_iter().skip(done).collect();
                kept.splice(0..0, rest);
                return Err(e);
            }
        }
        {
            // Admissions made on the share while this ran wait for the next.
            let kept = fallback.owed.lock().unwrap_or_else(|p| p.into_inner());
            fallback.owing.store(!kept.is_empty(), Ordering::SeqCst);
        }
        tracing::info!(admissions = total, "wrote back to the shared store what this replica admitted on its share while it was away");
        Ok(())
    }

    /// Records an admission made elsewhere (on the share, or by the local
    /// store this one replaces) at `at` on the caller's clock, in every
    /// window of `demand`, whatever they hold; `id` makes a repeat count
    /// once.
    pub(super) async fn record(
        &self,
        demand: &Demand<'_>,
        id: &str,
        at: Millis,
    ) -> Result<(), StoreError> {
        let call = self.prepare_with("record", demand, id.to_string());
        let at = match self.time {
            StoreTime::Server => (at as i64 + self.skew.load(Ordering::Relaxed)).max(0) as Millis,
            StoreTime::Caller => at,
        };
        self.run_at("acquire", &call, demand.bucket, Some(at), id)
            .await
            .map(drop)
    }

    /// Reads Redis's clock once, so times from this host's clock are
    /// placed right before any decision has told the skew.
    pub(super) async fn learn_skew(&self, now: Millis) -> Result<(), StoreError> {
        let (secs, micros): (i64, i64) = self
            .store
            .call("ping", |mut c| async move {
                redis::cmd("TIME").query_async(&mut c).await
            })
            .await?;
        if self.time == StoreTime::Server {
            self.skew
                .store(secs * 1000 + micros / 1000 - now as i64, Ordering::Relaxed);
        }
        Ok(())
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
        self.prepare_with(op, demand, self.new_id())
    }

    fn prepare_with<'d>(&self, op: &'static str, demand: &'d Demand<'d>, id: String) -> Call<'d> {
        let windows: Vec<(Scope, &Window)> = demand
            .user_windows
            .iter()
            .map(|w| (Scope::User, w))
            .chain(demand.token_windows.iter().map(|w| (Scope::Token, w)))
            .collect();
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

    /// Runs the script, and again with the same arguments while the
    /// connection is broken, within the store's one deadline.
    async fn run(
        &self,
        op_label: &'static str,
        call: &Call<'_>,
        bucket: Bucket,
        now: Millis,
        extra: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let at = match self.time {
            StoreTime::Server => None,
            StoreTime::Caller => Some(now),
        };
        self.run_at(op_label, call, bucket, at, extra).await
    }

    /// As [`run`](Self::run), at `at` on the script's clock (`None`: Redis's
    /// `TIME`).
    async fn run_at(
        &self,
        op_label: &'static str,
        call: &Call<'_>,
        bucket: Bucket,
        at: Option<Millis>,
        extra: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        invocation
            .arg(call.op)
            .arg(at.map_or_else(String::new, |t| t.to_string()))
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
                // A broken connection is remade in the background: try
                // again (same id, so counted once) until the store's
                // deadline ends the call.
                loop {
                    match invocation.invoke_async(&mut connection).await {
                        Err(e) if retryable(&e) => {
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await
                        }
                        other => return other,
                    }
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
            if let Some(fallback) = &self.fallback {
                // Away: decide at once on the share, without waiting for
                // a store known not to answer (the heartbeat finds it back).
                if !self.back_on_redis(fallback).await {
                    return self.acquire_on_share(fallback, demand, now, None).await;
                }
            }
            let call = self.prepare("acquire", demand);
            let answer = match self
                .run("acquire", &call, demand.bucket, now, &call.id)
                .await
            {
                Ok(answer) => answer,
                Err(e) => match &self.fallback {
                    // Refused by the script, the id never counted there.
                    Some(fallback) => {
                        return self
                            .acquire_on_share(fallback, demand, now, Some(call.id.clone()))
                            .await
                    }
                    None => return Err(e),
                },
            };
            Ok(match answer.first() {
                Some(1) | Some(2) => {
                    self.note_skew(&answer, 1, now);
                    Ok(self.grant(demand, &call, &answer, now))
                }
                _ => {
                    self.note_skew(&answer, 3, now);
                    Err(self.refusal(demand, &call, &answer, now))
                }
            })
        })
    }

    fn check<'a>(
        &'a self,
        demand: &'a Demand<'a>,
        now: Millis,
    ) -> StoreFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            if let Some(fallback) = &self.fallback {
                if !self.back_on_redis(fallback).await {
                    return self.check_on_share(fallback, demand, now).await;
                }
            }
            let call = self.prepare("check", demand);
            let answer = match self.run("check", &call, demand.bucket, now, "").await {
                Ok(answer) => answer,
                Err(e) => match &self.fallback {
                    Some(fallback) => return self.check_on_share(fallback, demand, now).await,
                    None => return Err(e),
                },
            };
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
            // The share keeps Knoq's cool-downs too, for when Redis is away.
            if let Some(fallback) = &self.fallback {
                fallback.local.cool_down(user, bucket, now, until).await?;
            }
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
            match self.run("cool_down", &call, bucket, now, &length).await {
                Err(_) if self.fallback.is_some() => Ok(()),
                other => other.map(drop),
            }
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
