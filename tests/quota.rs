//! Quotas through real sockets: exact admission counts under concurrency,
//! restarts (in-process and `kill -9`), Knoq's own 429, and the soak test
//! against the simulated Knoq enforcing the same limits.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use knoq_sim::{Fault, SimLimits, SimRoute, Window};
use support::*;

/// Each behaviour, once on the local store (the state directory) and once
/// on a real Redis shared store: the same answers from both.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(None).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(Some(super::RedisServer::start())).await
                }
            )*
        }
    };
}

on_both_stores!(
    concurrent_requests_from_ten_tokens_admit_exactly_the_limit,
    admitted_responses_carry_ratelimit_headers_for_the_tightest_window,
    consumed_quota_survives_a_restart,
    consumed_quota_survives_kill_9,
    knoqs_own_429_passes_through_and_holds_the_bucket,
    soak_knoq_never_rate_limits_and_the_windows_are_used,
);

/// The `[store]` section for a bed: none (local), or the Redis server's.
fn store_toml(redis: &Option<RedisServer>) -> String {
    match redis {
        None => String::new(),
        Some(r) => format!("{}timeout = \"500ms\"\n", redis_store_toml(r)),
    }
}

/// The opening text of the sessions these tests open.
const OPENING: &str = "quota test";

async fn concurrent_requests_from_ten_tokens_admit_exactly_the_limit(redis: Option<RedisServer>) {
    let extra: Vec<_> = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9"]
        .into_iter()
        .map(|n| (n, "alice", String::new()))
        .collect();
    let bed = BedBuilder {
        // An hour-long window cannot free a slot while the test runs.
        tail_toml: format!("[quotas]\nmessage = [\"37/hour\"]\n{}", store_toml(&redis)),
        // All 200 at once: with a store across a network they overlap, and
        // the per-account in-flight cap (100) would refuse some first.
        server_toml: "max_inflight_per_user = 200\n".into(),
        extra_tokens: extra,
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let token = bed.token(&format!("t{}", i % 10)).to_string();
        let (c, url, body) = (c.clone(), bed.url(MESSAGE), message(&sid, &format!("m{i}")));
        tasks.push(tokio::spawn(async move {
            send(&c, req("POST", &url, Some(&token), Some(&body))).await
        }));
    }
    let mut admitted = 0;
    let mut refused = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => {
                refused += 1;
                let j = r.json();
                assert_eq!(j["code"], "quota_exceeded");
                assert_eq!(
                    (
                        j["bucket"].as_str(),
                        j["limit"].as_str(),
                        j["scope"].as_str()
                    ),
                    (Some("message"), Some("37/hour"), Some("user"))
                );
                let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((3590..=3601).contains(&retry), "{retry}");
                assert_eq!(j["retryAfter"], retry);
                assert_eq!(
                    r.headers["ratelimit-policy"],
                    "\"message-user\";q=37;w=3600"
                );
                assert!(r.headers["ratelimit"]
                    .to_str()
                    .unwrap()
                    .starts_with("\"message-user\";r=0;t="));
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    assert_eq!((admitted, refused), (37, 163));
    // The session's opening text is its first user_message.
    assert_eq!(
        bed.control.user_messages(&sid).len(),
        1 + 37,
        "Knoq received exactly the admitted ones"
    );
    bed.shutdown().await;
}

async fn admitted_responses_carry_ratelimit_headers_for_the_tightest_window(
    redis: Option<RedisServer>,
) {
    let bed = BedBuilder {
        tail_toml: format!(
            "[quotas]\nsession = [\"10/min\", \"20/hour\"]\n{}",
            store_toml(&redis)
        ),
        extra_tokens: vec![(
            "tight",
            "alice",
            "quotas = { session = [\"3/hour\"] }\n".into(),
        )],
        ..TestBed::builder()
    }
    .start()
    .await;
    let r = bed.post(SESSION, "alice-svc", r#"{"text":"a"}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["ratelimit-policy"], "\"session-user\";q=10;w=60");
    assert!(r.headers["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"session-user\";r=9;t="));
    // The token's own share is tighter: 3/hour, one left after two.
    for expect_r in [2, 1, 0] {
        let r = bed.post(SESSION, "tight", r#"{"text":"b"}"#).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers["ratelimit-policy"],
            "\"session-token\";q=3;w=3600"
        );
        assert!(r.headers["ratelimit"]
            .to_str()
            .unwrap()
            .starts_with(&format!("\"session-token\";r={expect_r};")));
    }
    let r = bed.post(SESSION, "tight", r#"{"text":"b"}"#).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["scope"], "token");
    // The account still has room for its other tools.
    let r = bed.post(SESSION, "alice-batch", r#"{"text":"c"}"#).await;
    assert_eq!(r.status, 200);
    // Reads are not governed by default: no headers.
    let r = bed.get("/api/managed-agents/sessions", "alice-svc").await;
    assert!(!r.headers.contains_key("ratelimit"));
    bed.shutdown().await;
}

async fn consumed_quota_survives_a_restart(redis: Option<RedisServer>) {
    let mut bed = BedBuilder {
        tail_toml: format!("[quotas]\nmessage = [\"3/hour\"]\n{}", store_toml(&redis)),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    for i in 0..3 {
        let r = bed
            .post(MESSAGE, "alice-svc", &message(&sid, &format!("{i}")))
            .await;
        assert_eq!(r.status, 200);
    }
    bed.restart_gateway().await;
    let r = bed
        .post(MESSAGE, "alice-batch", &message(&sid, "after"))
        .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.json()["scope"], "user");
    // Bob's account was never touched.
    let bob = bed.open_session("bob-svc", OPENING).await;
    let r = bed.post(MESSAGE, "bob-svc", &message(&bob, "hi")).await;
    assert_eq!(r.status, 200);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_damaged_journal_stops_start_up_with_a_clear_message() {
    let bed = TestBed::start().await;
    let journal = bed.dir.0.join("state").join("quota.journal");
    std::fs::write(&journal, "knoq-gateway quota journal v1\nA garbage\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_knoq-gateway"))
        .args(["check", "--config"])
        .arg(config_path(&bed))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("state.dir") && err.contains("line 2 is damaged"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&journal).unwrap(),
        "knoq-gateway quota journal v1\nA garbage\n"
    );
    bed.shutdown().await;
}

/// `kill -9` the real binary right after it admitted requests; the new
/// process still refuses the next one.
async fn consumed_quota_survives_kill_9(redis: Option<RedisServer>) {
    let bed = BedBuilder {
        tail_toml: format!("[quotas]\nmessage = [\"4/hour\"]\n{}", store_toml(&redis)),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    let gw = bed.process_config("kill9.toml", Some("state-kill9"));
    let c = client();
    let mut child = gw.spawn(Stdio::null());
    gw.wait_healthy(&c).await;
    let base = format!("http://{}", gw.proxy);
    for i in 0..4 {
        let r = send(
            &c,
            req(
                "POST",
                &format!("{base}{MESSAGE}"),
                Some(bed.token("alice-svc")),
                Some(&message(&sid, &format!("k{i}"))),
            ),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut child = gw.spawn(Stdio::null());
    gw.wait_healthy(&c).await;
    let r = send(
        &c,
        req(
            "POST",
            &format!("{base}{MESSAGE}"),
            Some(bed.token("alice-svc")),
            Some(&message(&sid, "k4")),
        ),
    )
    .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(bed.control.user_messages(&sid).len(), 1 + 4);
    bed.shutdown().await;
}

async fn knoqs_own_429_passes_through_and_holds_the_bucket(redis: Option<RedisServer>) {
    let bed = BedBuilder {
        tail_toml: store_toml(&redis),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control.fail_next(
        SimRoute::MessageSend,
        vec![Fault::status_retry_after(429, 2)],
    );
    let c = client();
    let r = bed.post(MESSAGE, "alice-svc", &message(&sid, "one")).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "2");
    assert!(r.json().get("code").is_none(), "Knoq's own body, unchanged");
    let seen = bed.control.requests().len();

    // Meanwhile the gateway answers for Knoq, for every token of the user.
    let r = bed
        .post(MESSAGE, "alice-batch", &message(&sid, "two"))
        .await;
    assert_eq!(r.status, 429);
    let j = r.json();
    assert_eq!(
        (j["code"].as_str(), j["scope"].as_str(), j["limit"].as_str()),
        (Some("quota_exceeded"), Some("knoq"), Some("set by Knoq"))
    );
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    assert_eq!(bed.control.requests().len(), seen, "not sent to Knoq");
    // Other buckets and other users are unaffected.
    let r = bed.get("/api/managed-agents/sessions", "alice-svc").await;
    assert_eq!(r.status, 200);
    // After Knoq's Retry-After the bucket opens again.
    let control = bed.control.clone();
    let url = bed.url(MESSAGE);
    let token = bed.token("alice-svc").to_string();
    eventually("the cool-down ends", Duration::from_secs(5), || {
        let (c, url, token, sid) = (c.clone(), url.clone(), token.clone(), sid.clone());
        async move {
            send(
                &c,
                req("POST", &url, Some(&token), Some(&message(&sid, "three"))),
            )
            .await
            .status
                == 200
        }
    })
    .await;
    assert_eq!(control.user_messages(&sid), ["quota test", "three"]);
    bed.shutdown().await;
}

/// Several tokens hammer one account at several times the allowed rate for
/// a bounded time; the simulated Knoq enforces the same (scaled) limit on
/// arrival. Knoq must never answer 429, and the gateway must still admit as
/// many as the windows allow, less only what the margin costs.
async fn soak_knoq_never_rate_limits_and_the_windows_are_used(redis: Option<RedisServer>) {
    let mut sim = sim_config();
    sim.limits = SimLimits {
        message: vec![Window {
            limit: 5,
            period: Duration::from_secs(1),
        }],
        ..SimLimits::unlimited()
    };
    sim.agent_delay = Duration::from_millis(1);
    let bed = BedBuilder {
        sim,
        tail_toml: format!(
            "[quotas]\nmessage = [\"5/sec\"]\nmargin = \"300ms\"\n{}",
            store_toml(&redis)
        ),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    let run_for = Duration::from_secs(4);
    let end = tokio::time::Instant::now() + run_for;
    let mut workers = Vec::new();
    for (w, name) in [
        "alice-svc",
        "alice-batch",
        "idp-sync",
        "alice-svc",
        "alice-batch",
        "idp-sync",
    ]
    .into_iter()
    .enumerate()
    {
        let (c, url, token, sid) = (
            client(),
            bed.url(MESSAGE),
            bed.token(name).to_string(),
            sid.clone(),
        );
        workers.push(tokio::spawn(async move {
            let (mut ok, mut local, mut n) = (0u32, 0u32, 0u32);
            while tokio::time::Instant::now() < end {
                n += 1;
                let r = send(
                    &c,
                    req(
                        "POST",
                        &url,
                        Some(&token),
                        Some(&message(&sid, &format!("w{w}-{n}"))),
                    ),
                )
                .await;
                match r.status.as_u16() {
                    200 => ok += 1,
                    429 if r.json()["code"] == "quota_exceeded" => local += 1,
                    other => panic!("unexpected {other}: {:?}", r.body),
                }
                // A fast client: about 60 requests/s per worker, 70x the limit overall.
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (ok, local)
        }));
    }
    let (mut ok, mut local) = (0, 0);
    for w in workers {
        let (o, l) = w.await.unwrap();
        ok += o;
        local += l;
    }
    assert_eq!(
        bed.control.rate_limited(),
        0,
        "Knoq answered 429: the gateway let too much through"
    );
    // 5 per 1.3 s (window plus margin) over 4 s: at least 3 full windows.
    assert!(ok >= 15, "only {ok} admitted in {run_for:?}");
    assert!(
        ok <= 5 * 4 + 5,
        "{ok} admitted: more than the window allows"
    );
    assert!(
        local > 100,
        "the clients were not over the limit ({local} refusals)"
    );
    bed.shutdown().await;
}
