//! The store every replica shares (`[store] kind = "redis"`): one Redis
//! connection per process, the key layout, a deadline on every call, the
//! store's health as operators see it, and its metrics.
//!
//! What is kept there belongs to the parts that use it (the quota windows
//! to `quota::shared`); this module only knows how to reach Redis, how
//! long to wait, and what to tell when it cannot. Every call is bounded
//! by `timeout`: past it, the call has failed ([`StoreError::Timeout`]),
//! whatever Redis does later, so no request ever waits on a paused or
//! unreachable server. The connection is made lazily and remade in the
//! background (redis-rs's `ConnectionManager`), so the gateway starts,
//! and says it is not ready, while Redis is away.
//!
//! Keys: `<key_prefix>{<account>}:<what>`. The account's name is the hash
//! tag, so everything one request touches lives in one Redis Cluster slot
//! and one script can change it atomically.
//!
//! One server or a Redis Cluster: `store.url` as one URL is one server; a
//! list of URLs is the seed nodes of a cluster, reached through redis-rs's
//! cluster client (which follows `MOVED`/`ASK` and loads scripts on every
//! master). Pub/sub on a cluster goes through one seed node at a time:
//! Redis forwards every `PUBLISH` to every node, so one subscriber
//! connection hears the whole cluster, and a subscriber that loses its node
//! takes the next seed.
//!
//! Secrets: a password comes only from `password_file` (a URL with one in
//! it is refused by the config), and neither the URL nor any value stored
//! is ever logged or exported.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Store-call latency buckets, 100 µs to 1 s: a loopback Redis answers in
/// well under a millisecond, and `timeout` is tens of milliseconds.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The store operations, for the `op` label (a fixed set).
pub const OPS: [&str; 9] = [
    "acquire",
    "check",
    "cool_down",
    "ping",
    "cookie_read",
    "cookie_write",
    "subscribe",
    "confirmed_record",
    "confirmed_count",
];

/// How often an idle gateway asks Redis whether it is there, so health
/// and `/readyz` are current without traffic.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// `[store]`, as the config validated it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StoreSettings {
    /// The state directory (the default): this process alone.
    #[default]
    Local,
    Redis(RedisSettings),
}

/// What a store call does when Redis fails or is too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Refuse the request (503 `quota_store_unavailable`): never risk
    /// Knoq's limits.
    Reject,
    /// Admit from this replica's memory, each limit divided by
    /// `replicas` (rounded down), so together the replicas stay within
    /// Knoq's limits; what was admitted is written back when Redis
    /// answers again.
    LocalShare { replicas: u32 },
}

/// Where Redis is. No URL holds a password (the config refuses one).
#[derive(Debug, Clone, PartialEq)]
pub enum RedisUrls {
    /// One server: `url = "redis://host:6379/0"` (or `rediss://`).
    Server(String),
    /// The seed nodes of a Redis Cluster: `url = ["redis://a:6379", …]`.
    /// Any one that answers is enough to learn the rest.
    Cluster(Vec<String>),
}

impl RedisUrls {
    /// Every URL given, the one server's or the seeds'.
    pub fn all(&self) -> &[String] {
        match self {
            RedisUrls::Server(url) => std::slice::from_ref(url),
            RedisUrls::Cluster(urls) => urls,
        }
    }
}

/// Nothing secret here: the URLs never hold a password (the config
/// refuses one), and the password file is only named.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://`, one server or a cluster's seeds.
    pub url: RedisUrls,
    pub password_file: Option<PathBuf>,
    /// 32 bytes (raw, or 64 hex digits) that encrypt the shared cookies.
    pub secret_key_file: PathBuf,
    pub key_prefix: String,
    /// The longest one store call may take.
    pub timeout: Duration,
    pub on_error: OnStoreError,
}

/// The store could not decide (unreachable, too slow, or refused the
/// call). The local store never fails this way.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the quota store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the quota store failed")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The store's series, registered by whoever owns the registry.
#[derive(Clone)]
struct Instruments {
    up: IntGauge,
    degraded: IntGauge,
    errors: IntCounterVec,
    duration: HistogramVec,
}

impl Instruments {
    fn new() -> Self {
        let up = IntGauge::new(
            "knoq_gateway_store_up",
            "1 while the shared store (Redis) answered its last call in time.",
        )
        .expect("static metric options are valid");
        let degraded = IntGauge::new(
            "knoq_gateway_store_degraded",
            "1 while this replica decides quotas from its own share (store.on_error = \"local_share\") because the shared store does not answer.",
        )
        .expect("static metric options are valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "knoq_gateway_store_errors_total",
                "Shared-store calls that failed or passed store.timeout, by operation.",
            ),
            &["op"],
        )
        .expect("static metric options are valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "knoq_gateway_store_duration_seconds",
                "Time of each shared-store call, by operation, failures included.",
            )
            .buckets(BUCKETS.to_vec()),
            &["op"],
        )
        .expect("static metric options are valid");
        // Every series exists from the start, so a dashboard shows zeros.
        for op in OPS {
            errors.with_label_values(&[op]);
            duration.with_label_values(&[op]);
        }
        Instruments {
            up,
            degraded,
            errors,
            duration,
        }
    }
}

/// The connection every call shares: to one server, or to a cluster.
/// Clones share the same underlying connection(s).
#[derive(Clone)]
pub enum Connection {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Server(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Server(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// How the connection is made: at once (lazily connecting) for one
/// server; at the first call for a cluster, whose client needs the
/// runtime that calls it.
enum Link {
    Server(ConnectionManager),
    Cluster(Box<ClusterLink>),
}

struct ClusterLink {
    client: redis::cluster::ClusterClient,
    config: redis::cluster::ClusterConfig,
    connection: OnceLock<ClusterConnection>,
}

impl Link {
    fn connection(&self) -> Connection {
        match self {
            Link::Server(c) => Connection::Server(c.clone()),
            Link::Cluster(c) => Connection::Cluster(
                c.connection
                    .get_or_init(|| {
                        c.client
                            .get_pending_async_connection_with_config(c.config.clone())
                    })
                    .clone(),
            ),
        }
    }
}

/// A connection to the shared Redis and the rules for using it.
pub struct SharedStore {
    link: Link,
    /// For the subscriber's own connection (pub/sub needs one): the one
    /// server, or each seed of a cluster in turn.
    subscribers: Vec<redis::Client>,
    next_subscriber: AtomicUsize,
    prefix: String,
    timeout: Duration,
    on_error: OnStoreError,
    /// Whether the last call answered in time: a change is logged once.
    up: AtomicBool,
    instruments: Instruments,
}

impl fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

// === impl SharedStore ===

impl SharedStore {
    /// Prepares the connection without making it (it is made on the first
    /// call, and remade after any failure). Fails only on settings that
    /// cannot work: an unreadable password file, an unusable URL.
    pub fn connect(settings: &RedisSettings) -> Result<SharedStore, String> {
        // rediss:// goes through rustls, which redis-rs asks for the
        // process's provider: ours is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let password = match &settings.password_file {
            Some(path) => Some(crate::secrets::read_secret_line(path)?),
            None => None,
        };
        let mut infos = Vec::new();
        for url in settings.url.all() {
            let mut info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| format!("store.url is not a Redis URL: {e}"))?;
            if let Some(password) = &password {
                let redis = info.redis_settings().clone().set_password(password.clone());
                info = info.set_redis_settings(redis);
            }
            infos.push(info);
        }
        let connect_within = settings.timeout.max(Duration::from_millis(500));
        let subscribers = infos
            .iter()
            .map(|info| redis::Client::open(info.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("store.url: {e}"))?;
        let link = match &settings.url {
            RedisUrls::Server(_) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_response_timeout(Some(settings.timeout))
                    .set_connection_timeout(Some(connect_within))
                    // Reconnects keep being tried in the background; a
                    // call never waits for them longer than `timeout`.
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                Link::Server(
                    ConnectionManager::new_lazy_with_config(subscribers[0].clone(), config)
                        .map_err(|e| format!("store.url: {e}"))?,
                )
            }
            RedisUrls::Cluster(_) => Link::Cluster(Box::new(ClusterLink {
                client: redis::cluster::ClusterClientBuilder::new(infos)
                    // Redirections and reconnects are retried inside the
                    // call's deadline, a few times, quickly.
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(100)
                    .build()
                    .map_err(|e| format!("store.url: {e}"))?,
                config: redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_within)
                    .set_response_timeout(settings.timeout),
                connection: OnceLock::new(),
            })),
        };
        let instruments = Instruments::new();
        Ok(SharedStore {
            link,
            subscribers,
            next_subscriber: AtomicUsize::new(0),
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            on_error: settings.on_error,
            up: AtomicBool::new(true),
            instruments,
        })
    }

    /// `<prefix>{<account>}:<what>`: every key of one account in one slot.
    pub fn key(&self, account: &str, what: &str) -> String {
        format!("{}{{{account}}}:{what}", self.prefix)
    }

    /// `<prefix><what>`: a pub/sub channel every replica listens on.
    pub fn channel(&self, what: &str) -> String {
        format!("{}{what}", self.prefix)
    }

    /// A connection subscribed to `channel`, made within `timeout` (or the
    /// half-second a connection may take).
    pub async fn subscribe(&self, channel: &str) -> Result<redis::aio::PubSub, StoreError> {
        let deadline = self.timeout.max(Duration::from_millis(500));
        // Each attempt takes the next seed, so a subscriber whose node went
        // away finds another (one server: always the same).
        let turn = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let client = self.subscribers[turn % self.subscribers.len()].clone();
        let channel = channel.to_string();
        let made = tokio::time::timeout(deadline, async move {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let result = match made {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(StoreError::Failed(Box::new(e))),
            Err(_) => Err(StoreError::Timeout(deadline)),
        };
        if result.is_err() {
            self.instruments
                .errors
                .with_label_values(&["subscribe"])
                .inc();
        }
        result
    }

    pub fn on_error(&self) -> OnStoreError {
        self.on_error
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the last call answered in time.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// What is in force, for `/readyz` and `credentials status`:
    /// `shared`, `local_share` (Redis away, each replica on its share) or
    /// `unavailable` (Redis away, metered requests refused).
    pub fn mode(&self) -> &'static str {
        match (self.is_up(), self.on_error) {
            (true, _) => "shared",
            (false, OnStoreError::LocalShare { .. }) => "local_share",
            (false, OnStoreError::Reject) => "unavailable",
        }
    }

    /// What metered requests get while Redis is away (for messages).
    pub fn while_away(&self) -> String {
        match self.on_error {
            OnStoreError::Reject => "metered requests are refused (503 quota_store_unavailable) until it answers".into(),
            OnStoreError::LocalShare { replicas } => format!("each replica admits from its own memory, every limit divided by {replicas} (store.replicas), until it answers; what it admits meanwhile is written back then"),
        }
    }

    /// The series to register: `knoq_gateway_store_*`.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let i = &self.instruments;
        vec![
            Box::new(i.up.clone()),
            Box::new(i.degraded.clone()),
            Box::new(i.errors.clone()),
            Box::new(i.duration.clone()),
        ]
    }

    /// Runs one call on the shared connection, within `timeout` from now
    /// (however many attempts `call` makes inside it), and keeps the
    /// store's health and metrics.
    pub async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, call(self.link.connection())).await;
        self.instruments
            .duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(StoreError::Failed(Box::new(e))),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        self.note(op, &result);
        result
    }

    /// PINGs Redis every [`HEARTBEAT`] until `stop` resolves, so the
    /// store's health follows Redis even while no request needs it.
    pub async fn heartbeat(&self, stop: impl Future<Output = ()>) {
        let beat = async {
            let mut tick = tokio::time::interval(HEARTBEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = self
                    .call("ping", |mut c| async move {
                        redis::cmd("PING").query_async::<String>(&mut c).await
                    })
                    .await;
            }
        };
        tokio::select! {
            () = stop => {}
            () = beat => {}
        }
    }

    /// One line per change of the store's health, never one per request.
    fn note<T>(&self, op: &'static str, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => {
                self.instruments.up.set(1);
                self.instruments.degraded.set(0);
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("the shared store (Redis) answers again; quotas are shared across replicas again");
                }
            }
            Err(e) => {
                self.instruments.up.set(0);
                if let OnStoreError::LocalShare { .. } = self.on_error {
                    self.instruments.degraded.set(1);
                }
                self.instruments.errors.with_label_values(&[op]).inc();
                if self.up.swap(false, Ordering::Relaxed) {
                    let error = match e {
                        StoreError::Failed(source) => source.to_string(),
                        StoreError::Timeout(_) => e.to_string(),
                    };
                    tracing::error!(
                        op,
                        error = %error,
                        "the shared store (Redis) failed; {}",
                        self.while_away()
                    );
                }
            }
        }
    }
}

/// Whether a failed call may be tried again with the same arguments:
/// the connection broke, so the call may or may not have run (every call
/// that is retried is idempotent).
pub fn retryable(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_io_error()
}
