//! The shared (Redis) quota store against a real `redis-server`: it decides
//! exactly as the local store does, on the same demands at the same times,
//! across sliding windows, month edges, margins and cool-downs; and it
//! fails in bounded time when Redis hangs or is gone.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use knoq_gateway::quota::window::Window;
use knoq_gateway::quota::{
    Bucket, Demand, LocalStore, QuotaStore, SharedQuotaStore, StoreError, StoreTime,
};
use knoq_gateway::shared_store::{OnStoreError, RedisSettings, RedisUrls, SharedStore};
use support::{RedisCluster, RedisServer};

fn settings(redis: &RedisServer, timeout: Duration) -> RedisSettings {
    on_urls(RedisUrls::Server(redis.url()), timeout)
}

fn on_urls(url: RedisUrls, timeout: Duration) -> RedisSettings {
    RedisSettings {
        url,
        password_file: None,
        secret_key_file: Default::default(),
        key_prefix: "kgw-test:".into(),
        timeout,
        on_error: OnStoreError::Reject,
    }
}

fn windows(texts: &[&str]) -> Vec<Window> {
    texts.iter().map(|t| Window::parse(t).unwrap()).collect()
}

/// A small deterministic generator, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// 2026-01-31T23:59:40Z: the run starts 20 s before a month's end.
const START: u64 = 1_769_903_980_000;
/// 2026-01-01T00:00:00Z and the length of each month of 2026 and 2027.
const YEAR_2026: u64 = 1_767_225_600_000;
const MONTH_DAYS: [u64; 24] = [
    31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31,
];

/// The first month start of 2026 or 2027 after `t`, if any.
fn next_month_start(t: u64) -> Option<u64> {
    let mut edge = YEAR_2026;
    for days in MONTH_DAYS {
        edge += days * 86_400_000;
        if edge > t {
            return Some(edge);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_store_decides_exactly_as_the_local_one() {
    let redis = RedisServer::start();
    decides_as_the_local_store(RedisUrls::Server(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_three_master_cluster_the_shared_store_decides_exactly_as_the_local_one() {
    let cluster = RedisCluster::start();
    decides_as_the_local_store(RedisUrls::Cluster(cluster.urls())).await;
    // The accounts' keys were spread over the masters, each account's in
    // its own slot.
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["DBSIZE"]).trim() != "0")
        .count();
    assert!(
        holding >= 2,
        "the accounts landed on {holding} of 3 masters"
    );
}

/// 1500 random steps over three accounts (each its own hash tag), the
/// same demands at the same times to the local and the shared store.
async fn decides_as_the_local_store(url: RedisUrls) {
    let margin = 300;
    let shared = Arc::new(SharedStore::connect(&on_urls(url, Duration::from_secs(2))).unwrap());
    let remote = SharedQuotaStore::new(shared, margin, StoreTime::Caller);
    let local = LocalStore::in_memory(margin);

    let user_windows = [
        windows(&["3/sec", "5/10s", "40/month"]),
        windows(&["2/2s"]),
        windows(&["2/month"]),
    ];
    let token_windows = [windows(&["2/sec"]), windows(&[]), windows(&["1/month"])];
    let tokens = ["svc", "batch"];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut now = START;
    let (mut admitted, mut refused, mut cooled) = (0, 0, 0);
    for step in 0..1500 {
        now = match rng.below(80) {
            // Now and then a jump to just before the end of a month not
            // used yet, where the margin makes admissions count in both
            // that month and the next.
            0..=2 => next_month_start(now)
                .and_then(next_month_start)
                .map_or(now, |edge| edge - rng.below(1200)),
            3..=10 => now, // the same millisecond as the last one
            _ => now + rng.below(700),
        };
        let b = rng.below(3) as usize;
        let bucket = [Bucket::Message, Bucket::Session, Bucket::Cancel][b];
        let t = rng.below(2) as usize;
        let demand = Demand {
            user: ["alice", "bob", "carol"][rng.below(3) as usize],
            token: tokens[t],
            bucket,
            user_windows: &user_windows[b],
            token_windows: if t == 0 { &token_windows[b] } else { &[] },
        };
        match rng.below(40) {
            0 => {
                let until = now + rng.below(3000);
                local
                    .cool_down(demand.user, bucket, now, until)
                    .await
                    .unwrap();
                remote
                    .cool_down(demand.user, bucket, now, until)
                    .await
                    .unwrap();
                cooled += 1;
            }
            1..=5 => {
                let l = local.check(&demand, now).await.unwrap();
                let r = remote.check(&demand, now).await.unwrap();
                assert_eq!(
                    format!("{r:?}"),
                    format!("{l:?}"),
                    "check at step {step}, t={now}"
                );
            }
            _ => {
                let l = local.acquire(&demand, now).await.unwrap();
                let r = remote.acquire(&demand, now).await.unwrap();
                assert_eq!(
                    format!("{r:?}"),
                    format!("{l:?}"),
                    "acquire at step {step}, t={now}"
                );
                if l.is_ok() {
                    admitted += 1;
                } else {
                    refused += 1;
                }
            }
        }
    }
    // The run exercised both outcomes and the cool-downs.
    assert!(
        admitted > 100 && refused > 100 && cooled > 10,
        "{admitted} admitted, {refused} refused, {cooled} cool-downs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_carry_the_accounts_hash_tag_and_expire_with_their_windows() {
    let redis = RedisServer::start();
    let shared = Arc::new(SharedStore::connect(&settings(&redis, Duration::from_secs(2))).unwrap());
    let store = SharedQuotaStore::new(shared, 300, StoreTime::Server);
    let user_windows = windows(&["5/min"]);
    let token_windows = windows(&["2/10s"]);
    let demand = Demand {
        user: "alice",
        token: "svc",
        bucket: Bucket::Message,
        user_windows: &user_windows,
        token_windows: &token_windows,
    };
    assert!(store.acquire(&demand, 0).await.unwrap().is_ok());
    let keys = redis.cli(&["--scan", "--pattern", "*"]);
    let mut keys: Vec<&str> = keys.lines().collect();
    keys.sort();
    // The admission's id (a retried call must not count twice), kept for
    // ten minutes.
    let id = keys
        .iter()
        .position(|k| k.starts_with("kgw-test:{alice}:id:"));
    let id = keys.remove(id.expect("the admission's id key"));
    let ttl: i64 = redis.cli(&["PTTL", id]).trim().parse().unwrap();
    assert!(ttl > 590_000 && ttl <= 600_000, "{id}: {ttl}");
    assert_eq!(
        keys,
        [
            "kgw-test:{alice}:account",
            "kgw-test:{alice}:q:message:2:s10000:t:svc",
            "kgw-test:{alice}:q:message:5:s60000:u",
        ],
        "every key of the account under its hash tag"
    );
    for (key, at_most) in [
        ("kgw-test:{alice}:q:message:5:s60000:u", 60_300),
        ("kgw-test:{alice}:q:message:2:s10000:t:svc", 10_300),
    ] {
        let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(ttl > 0 && ttl <= at_most, "{key}: {ttl}");
    }
    // A sliding window's member is the admission's id, never a timestamp.
    let members = redis.cli(&["ZRANGE", "kgw-test:{alice}:q:message:5:s60000:u", "0", "-1"]);
    assert!(members.trim().contains('-'), "{members}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_or_dead_redis_fails_the_call_within_the_timeout() {
    let mut redis = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let shared = Arc::new(SharedStore::connect(&settings(&redis, timeout)).unwrap());
    let store = SharedQuotaStore::new(shared.clone(), 300, StoreTime::Server);
    let user_windows = windows(&["100/min"]);
    let demand = Demand {
        user: "alice",
        token: "svc",
        bucket: Bucket::Message,
        user_windows: &user_windows,
        token_windows: &[],
    };
    assert!(store.acquire(&demand, 0).await.unwrap().is_ok());
    assert!(shared.is_up());

    // SIGSTOP: the connection stays open and nothing answers.
    redis.signal("STOP");
    let started = Instant::now();
    let outcome = store.acquire(&demand, 0).await;
    let took = started.elapsed();
    assert!(
        matches!(outcome, Err(StoreError::Timeout(_))),
        "{outcome:?}"
    );
    assert!(took < timeout + Duration::from_millis(400), "{took:?}");
    assert!(!shared.is_up());
    redis.signal("CONT");
    support::eventually("the store answers again", Duration::from_secs(10), || {
        let (store, demand) = (&store, &demand);
        async move { store.acquire(demand, 0).await.is_ok() }
    })
    .await;
    assert!(shared.is_up());

    // Killed: connections are refused; every call still ends in time.
    redis.kill();
    for _ in 0..5 {
        let started = Instant::now();
        assert!(store.acquire(&demand, 0).await.is_err());
        assert!(
            started.elapsed() < timeout + Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
    }
    redis.restart();
    support::eventually(
        "the store reconnects on its own",
        Duration::from_secs(10),
        || {
            let (store, demand) = (&store, &demand);
            async move { store.acquire(demand, 0).await.is_ok() }
        },
    )
    .await;

    // SCRIPT FLUSH: the next call loads the script again by itself.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    assert!(store.acquire(&demand, 0).await.unwrap().is_ok());
}

/// Admits at `now` until refused (at most `max`); how many were admitted.
async fn admit_all(store: &SharedQuotaStore, demand: &Demand<'_>, now: u64, max: usize) -> usize {
    let mut admitted = 0;
    for _ in 0..max {
        match store.acquire(demand, now).await {
            Ok(Ok(_)) => admitted += 1,
            Ok(Err(_)) => break,
            Err(e) => panic!("local_share never fails a call: {e}"),
        }
    }
    admitted
}

/// A gauge among the store's own series.
fn gauge(store: &SharedStore, name: &str) -> i64 {
    store
        .collectors()
        .iter()
        .flat_map(|c| c.collect())
        .find(|family| family.get_name() == name)
        .map(|family| family.get_metric()[0].get_gauge().get_value() as i64)
        .unwrap_or_else(|| panic!("no {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_share_admits_its_share_while_redis_is_away_and_writes_it_back_once() {
    let redis = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let mut sharing = settings(&redis, timeout);
    sharing.on_error = OnStoreError::LocalShare { replicas: 3 };
    let shared = Arc::new(SharedStore::connect(&sharing).unwrap());
    let store = SharedQuotaStore::new(shared.clone(), 300, StoreTime::Caller);
    // Another replica, refusing while Redis is away: it sees only Redis.
    let peer_shared = Arc::new(SharedStore::connect(&settings(&redis, timeout)).unwrap());
    let peer = SharedQuotaStore::new(peer_shared.clone(), 300, StoreTime::Caller);
    let user_windows = windows(&["30/min"]);
    let demand = Demand {
        user: "alice",
        token: "svc",
        bucket: Bucket::Message,
        user_windows: &user_windows,
        token_windows: &[],
    };
    assert_eq!(admit_all(&store, &demand, 1_000, 5).await, 5);
    assert_eq!(shared.mode(), "shared");
    assert_eq!(gauge(&shared, "knoq_gateway_store_degraded"), 0);
    assert_eq!(gauge(&peer_shared, "knoq_gateway_store_degraded"), 0);

    // Away: this replica admits floor(30 / 3) = 10, and not one more.
    redis.signal("STOP");
    assert_eq!(admit_all(&store, &demand, 2_000, 40).await, 10);
    assert_eq!(shared.mode(), "local_share");
    assert_eq!(gauge(&shared, "knoq_gateway_store_degraded"), 1);
    assert_eq!(gauge(&shared, "knoq_gateway_store_up"), 0);
    // A replica that refuses meanwhile is down, not degraded.
    assert!(peer.check(&demand, 2_000).await.is_err());
    assert_eq!(gauge(&peer_shared, "knoq_gateway_store_up"), 0);
    assert_eq!(gauge(&peer_shared, "knoq_gateway_store_degraded"), 0);
    let refused = store.acquire(&demand, 2_000).await.unwrap().unwrap_err();
    assert_eq!(
        refused.until,
        2_000 + 60_000 + 300,
        "the share's window, margin included"
    );

    // Back: the heartbeat finds it; the 10 are written back (the first of
    // them, whose call timed out, may have run late: its id counts once),
    // so the window has exactly 30 - 5 - 10 left, for every replica.
    redis.signal("CONT");
    let beat = tokio::spawn({
        let shared = shared.clone();
        async move { shared.heartbeat(std::future::pending()).await }
    });
    support::eventually("the store answers again", Duration::from_secs(10), || {
        let shared = shared.clone();
        async move { shared.is_up() }
    })
    .await;
    assert_eq!(admit_all(&store, &demand, 3_000, 40).await, 15);
    assert_eq!(gauge(&shared, "knoq_gateway_store_degraded"), 0);
    assert!(
        peer.check(&demand, 3_000).await.unwrap().is_err(),
        "the peer sees the window full"
    );
    beat.abort();
}
