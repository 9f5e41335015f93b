//! Several replicas on one real redis-server: a cookie rotated through one
//! replica reaches the others at once, an expiry one sees all see, a new
//! `cookie_file` reaches everyone, Redis never holds a cookie in clear,
//! and one replica's confirmed message never passes for another's lost one.

mod support;

use std::time::Duration;

use support::*;

const ROTATED: &str = "alice-shared-rotated-0002";

async fn two_replicas(redis: &impl SharedRedis) -> (TestBed, Replica) {
    let bed = BedBuilder {
        tail_toml: redis.store_toml(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let b = bed.replica("b").await;
    (bed, b)
}

async fn list_via(url: String, token: &str) -> Reply {
    send(&client(), req("GET", &url, Some(token), None)).await
}

fn stored_copy(bed: &TestBed, state: &str) -> String {
    let path = bed.dir.0.join(state).join("credentials").join("alice.json");
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn alice(admin: std::net::SocketAddr) -> serde_json::Value {
    let all = admin_get(admin, "/credentials").await.json();
    let users = all["users"].as_array().cloned().unwrap_or_default();
    users
        .into_iter()
        .find(|u| u["user"] == "alice")
        .unwrap_or_default()
}

async fn alice_state(admin: std::net::SocketAddr) -> String {
    alice(admin).await["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

async fn generation(admin: std::net::SocketAddr) -> u64 {
    alice(admin).await["shared_generation"]
        .as_u64()
        .unwrap_or(0)
}

/// Both replicas have met the shared record (their start-up sync is
/// done) at the same generation; that generation.
async fn in_step(a: std::net::SocketAddr, b: std::net::SocketAddr) -> u64 {
    eventually(
        "both replicas use one shared generation",
        Duration::from_secs(5),
        || async {
            let (ga, gb) = (generation(a).await, generation(b).await);
            ga > 0 && ga == gb
        },
    )
    .await;
    generation(a).await
}

#[tokio::test]
async fn a_rotation_through_one_replica_reaches_the_other_at_once_and_never_in_clear() {
    rotation_reaches_the_other(&RedisServer::start()).await;
}

#[tokio::test]
async fn on_a_cluster_a_rotation_reaches_the_other_replica_at_once() {
    // The notice is published on alice's master; each replica listens on
    // a seed of its own turn, which Redis Cluster forwards it to.
    rotation_reaches_the_other(&RedisCluster::start()).await;
}

async fn rotation_reaches_the_other(redis: &impl SharedRedis) {
    let (bed, b) = two_replicas(redis).await;
    let token = bed.token("alice-svc").to_string();
    assert_eq!(list_via(bed.url(SESSIONS), &token).await.status, 200);
    assert_eq!(list_via(b.url(SESSIONS), &token).await.status, 200);
    let before = in_step(bed.admin, b.admin).await;

    bed.control.rotate_cookie("alice", ROTATED);
    assert_eq!(list_via(bed.url(SESSIONS), &token).await.status, 200);
    assert_eq!(generation(bed.admin).await, before + 1);
    // The notice reaches B well before its periodic re-read (5 s) would.
    eventually(
        "B takes the rotated cookie",
        Duration::from_secs(2),
        || async {
            // And keeps a copy for a restart while Redis is away.
            generation(b.admin).await == before + 1
                && stored_copy(&bed, "state-b").contains(ROTATED)
        },
    )
    .await;
    bed.control.clear_requests();
    let r = list_via(b.url(SESSIONS), &token).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = bed.control.requests();
    assert_eq!(
        seen.len(),
        1,
        "B sent the new cookie first time: no 401, no resend"
    );
    assert!(seen[0].headers["cookie"]
        .to_str()
        .unwrap()
        .contains(ROTATED));

    // Redis holds the record sealed: no cookie value, old or new, in clear.
    let raw = redis.cli(&["HGETALL", "kgw:{alice}:cookie"]);
    assert!(raw.contains("gen"), "{raw}");
    assert!(!raw.contains(ROTATED) && !raw.contains("alice-cookie-0001"));
    let dump = redis.cli(&["--no-raw", "HGET", "kgw:{alice}:cookie", "blob"]);
    assert!(!dump.contains("alice-shared") && !dump.contains("knoq_session"));

    b.stop().await;
    bed.shutdown().await;
}

#[tokio::test]
async fn a_replica_with_a_stale_cookie_resends_once_with_the_shared_one_instead_of_expiring() {
    stale_cookie_resends_once(&RedisServer::start()).await;
}

#[tokio::test]
async fn on_a_cluster_a_replica_that_missed_a_notice_resends_once_and_listens_again() {
    stale_cookie_resends_once(&RedisCluster::start()).await;
}

async fn stale_cookie_resends_once(redis: &impl SharedRedis) {
    let (bed, b) = two_replicas(redis).await;
    let token = bed.token("alice-svc").to_string();
    assert_eq!(list_via(b.url(SESSIONS), &token).await.status, 200);
    let before = in_step(bed.admin, b.admin).await;
    // Cut the replicas' subscriptions: B misses the notice of the
    // rotation A is about to store, and still holds the old cookie.
    redis.on_every_node(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    bed.control.rotate_cookie("alice", ROTATED);
    assert_eq!(list_via(bed.url(SESSIONS), &token).await.status, 200);
    bed.control.clear_requests();
    let r = list_via(b.url(SESSIONS), &token).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let answered: Vec<Option<u16>> = bed.control.requests().iter().map(|r| r.status).collect();
    assert_eq!(
        answered,
        [Some(401), Some(200)],
        "one 401 for the old cookie, one resend with the new"
    );
    assert_ne!(alice_state(b.admin).await, "expired");
    assert_eq!(generation(b.admin).await, before + 1);
    b.stop().await;

    // A replica started later from the stale cookie_file takes the shared
    // cookie before using its own.
    let c = bed.replica("c").await;
    eventually(
        "C meets the shared record",
        Duration::from_secs(5),
        || async { generation(c.admin).await == before + 1 },
    )
    .await;
    bed.control.clear_requests();
    assert_eq!(list_via(c.url(SESSIONS), &token).await.status, 200);
    let seen = bed.control.requests();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers["cookie"]
        .to_str()
        .unwrap()
        .contains(ROTATED));
    c.stop().await;
    bed.shutdown().await;
}

#[tokio::test]
async fn an_expiry_seen_by_one_replica_is_seen_by_all_and_a_new_cookie_file_revives_all() {
    let redis = RedisServer::start();
    let (bed, b) = two_replicas(&redis).await;
    let token = bed.token("alice-svc").to_string();
    assert_eq!(list_via(b.url(SESSIONS), &token).await.status, 200);
    assert_eq!(list_via(bed.url(SESSIONS), &token).await.status, 200);
    in_step(bed.admin, b.admin).await;

    bed.control.expire_cookie("alice");
    let r = list_via(bed.url(SESSIONS), &token).await;
    assert_eq!(
        r.json()["code"],
        "upstream_credential_expired",
        "{:?}",
        r.body
    );
    eventually("B learns the expiry", Duration::from_secs(2), || async {
        alice_state(b.admin).await == "expired"
    })
    .await;
    // B fails fast, without asking Knoq.
    bed.control.clear_requests();
    let r = list_via(b.url(SESSIONS), &token).await;
    assert_eq!(
        r.json()["code"],
        "upstream_credential_expired",
        "{:?}",
        r.body
    );
    assert!(bed.control.requests().is_empty());

    // The operator provides a new cookie: both replicas use it.
    bed.control.set_cookie("alice", "alice-fresh-0003");
    bed.dir
        .write_secret("alice.cookie", "knoq_session=alice-fresh-0003");
    for (what, url, admin) in [
        ("A", bed.url(SESSIONS), bed.admin),
        ("B", b.url(SESSIONS), b.admin),
    ] {
        eventually(
            &format!("{what} uses the new cookie"),
            Duration::from_secs(5),
            || async { alice_state(admin).await != "expired" },
        )
        .await;
        assert_eq!(list_via(url, &token).await.status, 200, "{what}");
    }
    b.stop().await;
    bed.shutdown().await;
}

#[tokio::test]
async fn an_identical_message_sent_through_another_replica_does_not_pass_for_a_lost_one() {
    let redis = RedisServer::start();
    let bed = BedBuilder {
        tail_toml: format!(
            "{}[retry]\nbase_delay = \"10ms\"\nmax_delay = \"40ms\"\nreconcile_settle = \"200ms\"\n",
            redis_store_toml(&redis)
        ),
        ..TestBed::builder()
    }
    .start()
    .await;
    let b = bed.replica("b").await;
    let token = bed.token("alice-svc").to_string();
    let sid = bed.open_session("alice-svc", "replicas").await;
    let post = |url: String| {
        let body = message(&sid, "yes");
        let token = token.clone();
        async move { send(&client(), req("POST", &url, Some(&token), Some(&body))).await }
    };
    assert_eq!(post(bed.url(MESSAGE)).await.status, 200);
    // The same text through B, lost before Knoq recorded it: Knoq's
    // transcript shows one "yes", which A's confirmed send accounts for.
    bed.control.fail_next(
        knoq_sim::SimRoute::MessageSend,
        vec![knoq_sim::Fault::Reset],
    );
    let r = post(b.url(MESSAGE)).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.json()["code"], "outcome_unknown");
    // And when Knoq did record B's copy, B finds it.
    bed.control.fail_next(
        knoq_sim::SimRoute::MessageSend,
        vec![knoq_sim::Fault::ApplyThenReset],
    );
    let r = post(b.url(MESSAGE)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-knoq-gateway-reconciled"], "true");
    // The shared record names no text.
    let keys = redis.cli(&["KEYS", "kgw:{alice}:confirmed:*"]);
    assert!(!keys.is_empty() && !keys.contains("yes"), "{keys}");
    b.stop().await;
    bed.shutdown().await;
}

/// Sends `n` messages at once through `proxy`; the statuses, each answered
/// within a liveness bound (no request waits on a broken store).
async fn flood(
    proxy: std::net::SocketAddr,
    token: &str,
    sid: &str,
    n: usize,
    tag: &str,
) -> Vec<u16> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = format!("http://{proxy}{MESSAGE}");
            let (token, body) = (token.to_string(), message(sid, &format!("{tag}-{i}")));
            tokio::spawn(async move {
                let answer = tokio::time::timeout(
                    Duration::from_secs(10),
                    send(&client(), req("POST", &url, Some(&token), Some(&body))),
                )
                .await;
                answer.expect("a request hung").status.as_u16()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_on_one_redis_admit_exactly_one_gateways_quota_through_faults() {
    three_processes_flood(&RedisServer::start()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_on_a_three_master_cluster_admit_exactly_one_gateways_quota() {
    three_processes_flood(&RedisCluster::start()).await;
}

async fn three_processes_flood(redis: &impl SharedRedis) {
    let bed = BedBuilder {
        tail_toml: format!(
            "{}timeout = \"200ms\"\n[quotas]\nmessage = [\"25/hour\"]\n",
            redis.store_toml()
        ),
        ..TestBed::builder()
    }
    .start()
    .await;
    let c = client();
    let procs: Vec<Process> = (1..=3)
        .map(|i| bed.process_config(&format!("g{i}.toml"), Some(&format!("state-{i}"))))
        .collect();
    let _running: Vec<Running> = procs
        .iter()
        .map(|p| p.run(std::process::Stdio::null()))
        .collect();
    for p in &procs {
        p.wait_healthy(&c).await;
    }
    let token = bed.token("alice-svc").to_string();
    let sid = bed.open_session("alice-svc", "flood").await;
    bed.control.clear_requests();

    // Phase 1: 3 x 12 at once against 25/hour: exactly 25 pass, 11 are
    // the gateway's 429s, and Knoq (60/min) never has to refuse one.
    let floods = procs.iter().map(|p| flood(p.proxy, &token, &sid, 12, "a"));
    let statuses: Vec<u16> = futures_util::future::join_all(floods).await.concat();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 25, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 11);
    assert_eq!(bed.control.rate_limited(), 0);

    // Phase 2: a fresh hour's worth under faults: every client connection
    // to Redis is killed while the floods run. Requests end (admitted,
    // 429, or 503 quota_store_unavailable), and every admission is
    // counted exactly once: what Knoq received is what Redis holds.
    redis.on_every_node(&["FLUSHALL"]);
    bed.control.clear_requests();
    let floods = procs.iter().map(|p| flood(p.proxy, &token, &sid, 15, "b"));
    let killer = async {
        let mut killed = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(15)).await;
            for said in redis.on_every_node(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            {
                killed += said
                    .trim()
                    .trim_start_matches("(integer) ")
                    .parse::<usize>()
                    .unwrap_or(0);
            }
        }
        killed
    };
    let (statuses, killed) = tokio::join!(futures_util::future::join_all(floods), killer);
    assert!(killed > 0, "the faults hit the replicas' connections");
    let statuses: Vec<u16> = statuses.concat();
    assert!(
        statuses.iter().all(|s| [200, 429, 503].contains(s)),
        "{statuses:?}"
    );
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok <= 25, "{ok} admitted over a limit of 25");
    assert_eq!(bed.control.rate_limited(), 0);
    let sent = bed
        .control
        .requests()
        .iter()
        .filter(|r| r.path == MESSAGE && r.status == Some(200))
        .count();
    assert_eq!(
        sent, ok,
        "Knoq received exactly what clients were told passed"
    );
    let counted: usize = redis
        .cli(&["ZCARD", "kgw:{alice}:q:message:25:s3600000:u"])
        .trim()
        .parse()
        .unwrap();
    // A call whose answer was lost past the deadline may have counted
    // there (the client got 503, nothing was sent): never the other way.
    let failed = statuses.iter().filter(|s| **s == 503).count();
    assert!(
        ok <= counted && counted <= ok + failed,
        "{ok} admitted, {failed} failed, {counted} counted in Redis"
    );
    eprintln!("under faults: {killed} connections killed, {ok} admitted, {failed} failed, {counted} counted");
    bed.shutdown().await;
}

/// Sends one message through `proxy`; its status.
async fn one_message(proxy: std::net::SocketAddr, token: &str, sid: &str, text: &str) -> u16 {
    let url = format!("http://{proxy}{MESSAGE}");
    send(
        &client(),
        req("POST", &url, Some(token), Some(&message(sid, text))),
    )
    .await
    .status
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_from_local_to_redis_carries_the_consumed_quota_and_the_rotated_cookie_once() {
    let redis = RedisServer::start();
    let bed = BedBuilder {
        tail_toml: "[quotas]\nmessage = [\"5/hour\", \"8/month\"]\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let c = client();
    let token = bed.token("alice-svc").to_string();
    let sid = bed.open_session("alice-svc", "moving").await;

    // On `local`: three messages, and a cookie Knoq rotates (kept only in
    // this state directory: cookie_file still holds the old one).
    let local = bed.process_config("local.toml", Some("state-m"));
    let running = local.run(std::process::Stdio::null());
    local.wait_healthy(&c).await;
    for i in 0..3 {
        assert_eq!(
            one_message(local.proxy, &token, &sid, &format!("local-{i}")).await,
            200
        );
    }
    bed.control.rotate_cookie("alice", ROTATED);
    assert_eq!(one_message(local.proxy, &token, &sid, "local-3").await, 200);
    drop(running); // kill -9: the journal holds every admission already

    // The same state directory on Redis: 4 of 5 are used this hour.
    let shared = bed.process_config("shared.toml", Some("state-m"));
    let text = std::fs::read_to_string(&shared.config).unwrap();
    std::fs::write(
        &shared.config,
        format!("{text}\n{}", redis_store_toml(&redis)),
    )
    .unwrap();
    let mut running = shared.run(std::process::Stdio::null());
    shared.wait_healthy(&c).await;
    let window = "kgw:{alice}:q:message:5:s3600000:u";
    assert_eq!(
        redis.cli(&["ZCARD", window]).trim(),
        "4",
        "the hour's admissions carried"
    );
    bed.control.clear_requests();
    assert_eq!(
        one_message(shared.proxy, &token, &sid, "shared-0").await,
        200
    );
    let seen = bed.control.requests();
    assert_eq!(seen.len(), 1, "the rotated cookie went first time: no 401");
    assert!(seen[0].headers["cookie"]
        .to_str()
        .unwrap()
        .contains(ROTATED));
    assert_eq!(
        one_message(shared.proxy, &token, &sid, "shared-1").await,
        429
    );
    assert_eq!(
        bed.control.rate_limited(),
        0,
        "the gateway refused, not Knoq"
    );
    let mark = std::fs::read_to_string(bed.dir.0.join("state-m").join("quota.carried")).unwrap();
    assert!(mark.ends_with("done\n"), "{mark}");

    // A restart does not carry the journal again: the month's count stays.
    let month = "kgw:{alice}:q:message:8:m:u";
    assert_eq!(redis.cli(&["HGET", month, "count"]).trim(), "5");
    drop(running);
    // Past the ids' ten minutes, only the mark keeps a second carry out.
    let ids = redis.cli(&["--scan", "--pattern", "kgw:{alice}:id:carried-*"]);
    assert_eq!(ids.lines().count(), 4, "{ids}");
    for id in ids.lines() {
        redis.cli(&["DEL", id]);
    }
    running = shared.run(std::process::Stdio::null());
    shared.wait_healthy(&c).await;
    assert_eq!(
        one_message(shared.proxy, &token, &sid, "shared-2").await,
        429
    );
    assert_eq!(redis.cli(&["HGET", month, "count"]).trim(), "5");
    drop(running);
    bed.shutdown().await;
}

#[tokio::test]
async fn two_rotations_at_once_end_on_knoqs_last_cookie_never_on_an_expiry() {
    let redis = RedisServer::start();
    let (bed, b) = two_replicas(&redis).await;
    let token = bed.token("alice-svc").to_string();
    assert_eq!(list_via(b.url(SESSIONS), &token).await.status, 200);
    let before = in_step(bed.admin, b.admin).await;
    // B cannot hear A's write before its own: both rotations are made on
    // the same generation, and A's is stored first.
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    bed.control
        .set_cookie_header("alice", "knoq_session=alice-race-a; Path=/");
    assert_eq!(list_via(bed.url(SESSIONS), &token).await.status, 200);
    bed.control
        .set_cookie_header("alice", "knoq_session=alice-race-b; Path=/");
    assert_eq!(list_via(b.url(SESSIONS), &token).await.status, 200);
    // Knoq issued B's last: only that one is accepted now.
    bed.control.set_cookie("alice", "alice-race-b");

    bed.control.clear_requests();
    let r = list_via(b.url(SESSIONS), &token).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let sent: Vec<String> = bed
        .control
        .requests()
        .iter()
        .map(|r| r.headers["cookie"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        sent.len(),
        2,
        "the stored winner, then B's own once: {sent:?}"
    );
    assert!(sent[0].contains("alice-race-a") && sent[1].contains("alice-race-b"));
    assert_ne!(alice_state(b.admin).await, "expired");
    // B's is stored on top, and A follows it.
    eventually(
        "both replicas on B's rotation",
        Duration::from_secs(5),
        || async {
            generation(bed.admin).await == before + 2 && generation(b.admin).await == before + 2
        },
    )
    .await;
    bed.control.clear_requests();
    assert_eq!(list_via(bed.url(SESSIONS), &token).await.status, 200);
    assert_eq!(bed.control.requests().len(), 1);
    b.stop().await;
    bed.shutdown().await;
}

#[tokio::test]
async fn credentials_set_on_one_host_reaches_every_replica() {
    let redis = RedisServer::start();
    let (bed, b) = two_replicas(&redis).await;
    let c = bed.replica("c").await;
    let token = bed.token("alice-svc").to_string();
    let before = in_step(bed.admin, b.admin).await;
    bed.control.set_cookie("alice", "alice-operator-0004");
    let config = config_path(&bed);
    let out = cli(
        &[
            "credentials",
            "set",
            "alice",
            "--no-check",
            "--config",
            config.to_str().unwrap(),
        ],
        Some("knoq_session=alice-operator-0004\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for (what, admin) in [("A", bed.admin), ("B", b.admin), ("C", c.admin)] {
        eventually(
            &format!("{what} takes the operator's cookie"),
            Duration::from_secs(5),
            || async { generation(admin).await > before },
        )
        .await;
    }
    for (what, url) in [("B", b.url(SESSIONS)), ("C", c.url(SESSIONS))] {
        bed.control.clear_requests();
        assert_eq!(list_via(url, &token).await.status, 200, "{what}");
        let seen = bed.control.requests();
        assert_eq!(seen.len(), 1, "{what} sent the new cookie first time");
        assert!(seen[0].headers["cookie"]
            .to_str()
            .unwrap()
            .contains("alice-operator-0004"));
    }
    b.stop().await;
    c.stop().await;
    bed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_on_two_replicas_are_admitted_as_the_shared_window_frees() {
    let redis = RedisServer::start();
    let mut sim = sim_config();
    // Knoq enforces the same 2 per second, on arrival.
    sim.limits = knoq_sim::SimLimits {
        message: vec![knoq_sim::Window {
            limit: 2,
            period: Duration::from_secs(1),
        }],
        ..knoq_sim::SimLimits::unlimited()
    };
    let bed = BedBuilder {
        sim,
        tail_toml: format!(
            "{}[quotas]\non_limit = \"wait\"\nmax_wait = \"10s\"\nmessage = [\"2/sec\"]\n",
            redis.store_toml()
        ),
        ..TestBed::builder()
    }
    .start()
    .await;
    let b = bed.replica("b").await;
    let token = bed.token("alice-svc").to_string();
    let sid = bed.open_session("alice-svc", "waiting").await;
    bed.control.clear_requests();
    let started = std::time::Instant::now();
    let (on_a, on_b) = tokio::join!(
        flood(bed.addr, &token, &sid, 3, "a"),
        flood(b.addr, &token, &sid, 3, "b")
    );
    let waited = started.elapsed();
    assert_eq!(
        [on_a, on_b].concat(),
        [200; 6],
        "every waiting request admitted"
    );
    assert_eq!(bed.control.rate_limited(), 0, "Knoq never refused one");
    // 6 at 2 per second (plus the margin) from two replicas: the later
    // ones waited for the shared window, on whichever replica.
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    b.stop().await;
    bed.shutdown().await;
}
