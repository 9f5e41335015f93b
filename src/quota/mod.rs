//! Quota stage: no Knoq account ever exceeds Knoq's limits, and each tool
//! gets its configured share.
//!
//! Runs after routing and before the upstream call. A request in a bucket
//! (`message`, `session`, `cancel`, `read`) passes only if every window of
//! its user's bucket *and* its token's bucket admits it, and no Knoq-imposed
//! cool-down is running for that user and bucket; the check and the consume
//! are one atomic step in the [`store`] (one lock per user, so unrelated
//! users never contend). A refusal consumes nothing.
//!
//! With `on_limit = "wait"` a refused request waits (asynchronously) for its
//! turn: requests of one token and bucket queue in arrival order on a fair
//! semaphore, the head of the queue sleeps until its retry time, and a
//! client that goes away leaves the queue when its future is dropped.
//!
//! Contract: `Ok(Some(grant))` means admitted and recorded (the grant tells
//! the tightest window, for the `RateLimit` headers); `Ok(None)` means the
//! route has no bucket; `Err(QuotaExceeded)` becomes a 429 in `error.rs`.

pub mod carry;
pub mod journal;
pub mod shared;
pub mod store;
pub mod window;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Semaphore;

use crate::clock::{Clock, Millis};
use crate::route::Route;
use window::Window;

pub use shared::{SharedQuotaStore, StoreTime};
pub use store::{Demand, LocalStore, QuotaStore, StoreError};

/// A group of Knoq endpoints that share a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Message = 0,
    Session = 1,
    Cancel = 2,
    Read = 3,
}

/// Windows per bucket, indexed by `Bucket as usize`.
pub type BucketWindows = [Vec<Window>; 4];
/// Per-bucket replacements; `None` keeps the default.
pub type BucketOverrides = [Option<Vec<Window>>; 4];

impl Bucket {
    pub const ALL: [Bucket; 4] = [
        Bucket::Message,
        Bucket::Session,
        Bucket::Cancel,
        Bucket::Read,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Bucket::Message => "message",
            Bucket::Session => "session",
            Bucket::Cancel => "cancel",
            Bucket::Read => "read",
        }
    }

    pub fn from_label(label: &str) -> Option<Bucket> {
        Bucket::ALL.into_iter().find(|b| b.label() == label)
    }

    /// The bucket a route draws from, if any. Deletes, SCIM and unknown
    /// paths have no published Knoq limit, so they are not metered.
    pub fn for_route(route: Route) -> Option<Bucket> {
        match route {
            Route::MessageSend => Some(Bucket::Message),
            Route::SessionCreate => Some(Bucket::Session),
            Route::Cancel => Some(Bucket::Cancel),
            Route::Transcript | Route::SessionsList => Some(Bucket::Read),
            Route::SessionDelete | Route::Scim | Route::Other => None,
        }
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Whose limit decided: the Knoq account's, the tool's own share, or a
/// cool-down Knoq itself imposed with a 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Token,
    Knoq,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Token => "token",
            Scope::Knoq => "knoq",
        }
    }
}

/// One window's standing after a decision: what the `RateLimit` headers show.
#[derive(Debug, Clone)]
pub struct Standing {
    pub bucket: Bucket,
    pub scope: Scope,
    /// `None` for a Knoq cool-down, which has no window of ours.
    pub window: Option<Window>,
    pub remaining: u32,
    /// Milliseconds until `remaining` grows.
    pub reset_ms: Millis,
}

impl Standing {
    /// Keeps the tighter of `tightest` and `candidate`: least remaining,
    /// then longest to reset (what the `RateLimit` headers show). Every
    /// store picks its grant's window this way.
    pub fn keep_tightest(tightest: &mut Option<Standing>, candidate: Standing) {
        let tighter = tightest.as_ref().is_none_or(|t| {
            (candidate.remaining, std::cmp::Reverse(candidate.reset_ms))
                < (t.remaining, std::cmp::Reverse(t.reset_ms))
        });
        if tighter {
            *tightest = Some(candidate);
        }
    }
}

/// An admitted request: the tightest of the windows it was checked against.
#[derive(Debug, Clone)]
pub struct Grant {
    pub tightest: Option<Standing>,
}

/// A refused request: the window (or cool-down) that refused it and when a
/// retry would be admitted if nothing else competes.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub standing: Standing,
    pub until: Millis,
}

/// The client-facing refusal.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the {} quota for {} is spent ({})", .standing.scope.label(), .standing.bucket, self.limit())]
pub struct QuotaExceeded {
    pub standing: Standing,
    /// Whole seconds, rounded up, at least 1.
    pub retry_after_secs: u64,
}

impl QuotaExceeded {
    fn new(refusal: Refusal, now: Millis) -> Self {
        let wait = refusal.until.saturating_sub(now);
        QuotaExceeded {
            standing: refusal.standing,
            retry_after_secs: wait.div_ceil(1000).max(1),
        }
    }

    /// Waited `max_wait` in line behind the tool's earlier requests.
    fn queue_full(bucket: Bucket) -> Self {
        QuotaExceeded {
            standing: Standing {
                bucket,
                scope: Scope::Token,
                window: None,
                remaining: 0,
                reset_ms: 1000,
            },
            retry_after_secs: 1,
        }
    }

    /// `"60/min"`, or `"set by Knoq"` for a cool-down.
    pub fn limit(&self) -> String {
        match (&self.standing.window, self.standing.scope) {
            (Some(w), _) => w.to_string(),
            (None, Scope::Knoq) => "set by Knoq".to_string(),
            (None, _) => "wait queue".to_string(),
        }
    }
}

/// `[quotas]`: the defaults every `[[users]]` entry gets, and what to do
/// when a request is over a limit.
#[derive(Debug, Clone)]
pub struct QuotaConfig {
    pub defaults: BucketWindows,
    pub on_limit: OnLimit,
    /// With `OnLimit::Wait`: the longest a request is held before rejection.
    pub max_wait: Duration,
    /// Added to every sliding window, so Knoq (counting on arrival) never
    /// sees more than its limit in its own window.
    pub margin: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLimit {
    Reject,
    Wait,
}

/// Why the quota stage did not admit a request.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Exceeded(#[from] QuotaExceeded),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The `on_limit = "wait"` queues, one fair line per token and bucket.
/// Long-lived: a reload keeps them, so requests waiting in line keep their
/// place and new ones queue behind them.
#[derive(Clone, Default)]
pub struct WaitQueues(Arc<DashMap<Box<str>, [Arc<Semaphore>; 4]>>);

/// Who a quota decision is for: the Knoq account and the tool's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    pub user: &'a str,
    pub token: &'a str,
}

/// Which windows apply to whom, resolved once from the config.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    users: HashMap<Box<str>, BucketWindows>,
    tokens: HashMap<Box<str>, BucketWindows>,
}

impl Policy {
    /// Resolves each account's windows (its own buckets, else the
    /// defaults) and each token's share (none unless it sets one).
    pub fn new<'a>(
        defaults: &BucketWindows,
        users: impl IntoIterator<Item = (&'a str, &'a BucketOverrides)>,
        tokens: impl IntoIterator<Item = (&'a str, &'a BucketOverrides)>,
    ) -> Self {
        let users = users
            .into_iter()
            .map(|(name, own)| {
                let windows =
                    std::array::from_fn(|b| own[b].clone().unwrap_or_else(|| defaults[b].clone()));
                (name.into(), windows)
            })
            .collect();
        let tokens = tokens
            .into_iter()
            .map(|(name, own)| {
                let windows = std::array::from_fn(|b| own[b].clone().unwrap_or_default());
                (name.into(), windows)
            })
            .collect();
        Policy { users, tokens }
    }

    pub fn user_windows(&self, user: &str, bucket: Bucket) -> &[Window] {
        self.users.get(user).map_or(&[], |w| &w[bucket as usize])
    }

    pub fn token_windows(&self, token: &str, bucket: Bucket) -> &[Window] {
        self.tokens.get(token).map_or(&[], |w| &w[bucket as usize])
    }

    /// How long the journal must remember each bucket's admissions.
    pub fn retention(&self, margin: Millis) -> journal::Retentions {
        let mut r = journal::Retentions::default();
        for per_bucket in self.users.values().chain(self.tokens.values()) {
            for (b, windows) in per_bucket.iter().enumerate() {
                for w in windows {
                    match w.period {
                        window::Period::Sliding(p) => r[b].span = r[b].span.max(p + margin),
                        window::Period::Month => (r[b].months, r[b].margin) = (true, margin),
                    }
                }
            }
        }
        r
    }
}

/// The quota stage.
pub struct Quotas {
    policy: Policy,
    store: Arc<dyn QuotaStore>,
    clock: Arc<dyn Clock>,
    on_limit: OnLimit,
    max_wait: Duration,
    /// With `on_limit = "wait"`: one fair queue per token and bucket.
    queues: WaitQueues,
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("on_limit", &self.on_limit)
            .finish_non_exhaustive()
    }
}

// === impl Quotas ===

impl Quotas {
    pub fn new(
        policy: Policy,
        store: Arc<dyn QuotaStore>,
        queues: WaitQueues,
        clock: Arc<dyn Clock>,
        config: &QuotaConfig,
    ) -> Self {
        Quotas {
            policy,
            store,
            clock,
            on_limit: config.on_limit,
            max_wait: config.max_wait,
            queues,
        }
    }

    /// Which windows apply to whom.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Headroom of each of the account's windows in `bucket` now, from
    /// the store's memory (never a round trip): for `/metrics`.
    pub fn headroom(&self, user: &str, bucket: Bucket) -> Vec<(&Window, u32)> {
        let windows = self.policy.user_windows(user, bucket);
        let pairs: Vec<(Bucket, &Window)> = windows.iter().map(|w| (bucket, w)).collect();
        let left = self.store.headroom(user, &pairs, self.clock.now());
        windows.iter().zip(left).collect()
    }

    /// Admits one request for `route`, or refuses it (see the module doc).
    pub async fn admit(&self, who: Caller<'_>, route: Route) -> Result<Option<Grant>, QuotaError> {
        let Some(bucket) = Bucket::for_route(route) else {
            return Ok(None);
        };
        let demand = self.demand(who, bucket);
        if self.on_limit == OnLimit::Reject || self.max_wait.is_zero() {
            let now = self.clock.now();
            return match self.store.acquire(&demand, now).await? {
                Ok(grant) => Ok(Some(grant)),
                Err(r) => Err(QuotaExceeded::new(r, now).into()),
            };
        }
        self.admit_waiting(&demand).await.map(Some)
    }

    async fn admit_waiting(&self, demand: &Demand<'_>) -> Result<Grant, QuotaError> {
        let queue = self.queue(demand.token, demand.bucket);
        let deadline = tokio::time::Instant::now() + self.max_wait;
        // Arrival order: the semaphore is fair, so whoever asked first holds
        // the head of the line; dropping this future leaves the line.
        let Ok(_permit) = tokio::time::timeout_at(deadline, queue.acquire_owned()).await else {
            // Never reached the head: refuse without jumping the line.
            let now = self.clock.now();
            return Err(match self.store.check(demand, now).await? {
                Err(r) => QuotaExceeded::new(r, now),
                Ok(()) => QuotaExceeded::queue_full(demand.bucket),
            }
            .into());
        };
        loop {
            let now = self.clock.now();
            let refusal = match self.store.acquire(demand, now).await? {
                Ok(grant) => return Ok(grant),
                Err(r) => r,
            };
            let wait = Duration::from_millis(refusal.until.saturating_sub(now));
            if tokio::time::Instant::now() + wait > deadline {
                return Err(QuotaExceeded::new(refusal, now).into());
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// One line per tool (token) and bucket: a tool waiting on its own
    /// tighter share never holds up the account's other tools.
    fn queue(&self, token: &str, bucket: Bucket) -> Arc<Semaphore> {
        if let Some(q) = self.queues.0.get(token) {
            return q[bucket as usize].clone();
        }
        let entry = self
            .queues
            .0
            .entry(token.into())
            .or_insert_with(|| std::array::from_fn(|_| Arc::new(Semaphore::new(1))));
        entry[bucket as usize].clone()
    }

    /// What `who` asks of `bucket`: its account's and its token's windows.
    fn demand<'a>(&'a self, who: Caller<'a>, bucket: Bucket) -> Demand<'a> {
        Demand {
            user: who.user,
            token: who.token,
            bucket,
            user_windows: self.policy.user_windows(who.user, bucket),
            token_windows: self.policy.token_windows(who.token, bucket),
        }
    }

    /// Charges quota for one more send that is not a tool's first attempt
    /// (a retry, a resend, a read the gateway makes on its own), without
    /// waiting: Knoq may count every one. `false` means do not send it; a
    /// store that cannot answer says no too (it is logged).
    pub async fn charge(&self, who: Caller<'_>, route: Route) -> bool {
        let Some(bucket) = Bucket::for_route(route) else {
            return true;
        };
        let demand = self.demand(who, bucket);
        match self.store.acquire(&demand, self.clock.now()).await {
            Ok(admitted) => admitted.is_ok(),
            Err(e) => {
                tracing::warn!(user = who.user, bucket = bucket.label(), error = %e, "quota store failed; not sending");
                false
            }
        }
    }

    /// Knoq answered 429 on `route`: stop sending that bucket for the user
    /// until Knoq's `Retry-After` (seconds; 60 when absent or unreadable).
    pub async fn knoq_refused(&self, who: Caller<'_>, route: Route, retry_after: Option<&str>) {
        let Some(bucket) = Bucket::for_route(route) else {
            return;
        };
        let secs = retry_after
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(60);
        let now = self.clock.now();
        if let Err(e) = self
            .store
            .cool_down(who.user, bucket, now, now + secs * 1000)
            .await
        {
            tracing::error!(user = who.user, bucket = bucket.label(), error = %e, "quota store failed; Knoq's cool-down is not recorded");
        }
        tracing::warn!(
            user = %who.user,
            bucket = bucket.label(),
            retry_after_secs = secs,
            "Knoq answered 429; holding this bucket for the user until its Retry-After passes"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An owned caller, as the pipeline's principal would be.
    #[derive(Clone)]
    struct Who {
        token: String,
        user: String,
    }

    impl Who {
        fn c(&self) -> Caller<'_> {
            Caller {
                user: &self.user,
                token: &self.token,
            }
        }
    }
    use crate::clock::SystemClock;
    use std::path::Path;

    fn setup(quotas: &str) -> (Arc<Quotas>, Who) {
        let text = format!(
            "[quotas]\n{quotas}\n[[users]]\nname = \"alice\"\ncookie_env = \"X\"\n[[tokens]]\nname = \"svc\"\nuser = \"alice\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"tight\"\nuser = \"alice\"\nsha256 = \"{}\"\nquotas = {{ message = [\"1/min\"] }}\n",
            "ab".repeat(32),
            "cd".repeat(32)
        );
        let config = crate::config::Config::from_toml_str(&text, Path::new("/")).unwrap();
        let margin = config.quotas.margin.as_millis() as Millis;
        let q = Quotas::new(
            config.quota_policy(),
            Arc::new(LocalStore::in_memory(margin)),
            WaitQueues::default(),
            Arc::new(SystemClock::new()),
            &config.quotas,
        );
        let who = Who {
            token: "svc".into(),
            user: "alice".into(),
        };
        (Arc::new(q), who)
    }

    fn exceeded(e: QuotaError) -> QuotaExceeded {
        match e {
            QuotaError::Exceeded(q) => q,
            QuotaError::Store(s) => panic!("the local store never fails: {s}"),
        }
    }

    /// Lets every spawned task run until it blocks (time is paused).
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_requests_are_admitted_in_arrival_order_and_leave_when_dropped() {
        let (q, who) = setup(
            "message = [\"1/sec\"]\nmargin = \"0s\"\non_limit = \"wait\"\nmax_wait = \"10s\"",
        );
        let start = tokio::time::Instant::now();
        q.admit(who.c(), Route::MessageSend).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for name in ["first", "second", "gone", "third"] {
            let (q, who, tx) = (q.clone(), who.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                q.admit(who.c(), Route::MessageSend).await.unwrap();
                tx.send((name, start.elapsed().as_millis())).unwrap();
            }));
            settle().await;
        }
        // A client that goes away while queued leaves the line.
        tasks[2].abort();
        let mut order = Vec::new();
        for _ in 0..3 {
            order.push(rx.recv().await.unwrap());
        }
        assert_eq!(order, [("first", 1000), ("second", 2000), ("third", 3000)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tool_waiting_on_its_own_share_does_not_hold_up_the_others() {
        let (q, svc) = setup(
            "message = [\"60/min\"]\nmargin = \"0s\"\non_limit = \"wait\"\nmax_wait = \"2min\"",
        );
        let tight = Who {
            token: "tight".into(),
            ..svc.clone()
        };
        q.admit(tight.c(), Route::MessageSend).await.unwrap();
        let waiting = {
            let (q, tight) = (q.clone(), tight.clone());
            tokio::spawn(async move { q.admit(tight.c(), Route::MessageSend).await })
        };
        settle().await;
        let start = tokio::time::Instant::now();
        q.admit(svc.c(), Route::MessageSend).await.unwrap();
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "svc was not queued behind tight"
        );
        assert!(!waiting.is_finished());
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_longer_than_max_wait_is_refused_with_the_full_retry_time() {
        let (q, who) =
            setup("message = [\"2/min\"]\nmargin = \"0s\"\non_limit = \"wait\"\nmax_wait = \"5s\"");
        q.admit(who.c(), Route::MessageSend).await.unwrap();
        q.admit(who.c(), Route::MessageSend).await.unwrap();
        let before = tokio::time::Instant::now();
        let err = exceeded(q.admit(who.c(), Route::MessageSend).await.unwrap_err());
        assert_eq!(err.retry_after_secs, 60);
        assert!(
            before.elapsed() < Duration::from_secs(5),
            "refused at once: the wait cannot fit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_answers_at_once_and_reads_are_free_by_default() {
        let (q, who) = setup("message = [\"1/min\"]");
        q.admit(who.c(), Route::MessageSend).await.unwrap();
        let err = exceeded(q.admit(who.c(), Route::MessageSend).await.unwrap_err());
        // 60 s plus the default 250 ms margin, rounded up.
        assert_eq!(err.retry_after_secs, 61);
        assert_eq!(err.limit(), "1/min");
        for _ in 0..100 {
            assert!(q
                .admit(who.c(), Route::Transcript)
                .await
                .unwrap()
                .unwrap()
                .tightest
                .is_none());
        }
        assert!(q
            .admit(who.c(), Route::SessionDelete)
            .await
            .unwrap()
            .is_none());
    }
}
