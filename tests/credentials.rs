//! The credential lifecycle through the simulated Knoq: rotation, removal,
//! expiry and recovery, operator replacement, and crash safety of the
//! stored cookie.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_knoq-gateway");

fn list(bed: &TestBed, token: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    req("GET", &bed.url(SESSIONS), Some(bed.token(token)), None)
}

fn last_cookie(bed: &TestBed) -> String {
    let seen = bed.control.requests();
    seen.last().unwrap().headers["cookie"]
        .to_str()
        .unwrap()
        .to_string()
}

fn state_file(bed: &TestBed, user: &str) -> std::path::PathBuf {
    bed.dir
        .0
        .join("state")
        .join("credentials")
        .join(format!("{user}.json"))
}

#[tokio::test]
async fn a_rotated_cookie_is_stored_used_and_kept_across_a_restart() {
    let mut bed = TestBed::start().await;
    let c = client();
    bed.control.rotate_cookie("alice", "alice-rotated-0002");
    let r = send(&c, list(&bed, "alice-svc")).await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("set-cookie"));
    // The next request carries the new value; other pairs are kept.
    let r = send(&c, list(&bed, "alice-batch")).await;
    assert_eq!(
        r.status, 200,
        "the old cookie is dead at Knoq: the new one was used"
    );
    assert_eq!(
        last_cookie(&bed),
        "knoq_session=alice-rotated-0002; theme=dark"
    );
    let stored = std::fs::read_to_string(state_file(&bed, "alice")).unwrap();
    assert!(stored.contains("alice-rotated-0002"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state_file(&bed, "alice"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A restart starts from the stored copy, not the stale cookie_file.
    bed.restart_gateway().await;
    let r = send(&c, list(&bed, "alice-svc")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        last_cookie(&bed),
        "knoq_session=alice-rotated-0002; theme=dark"
    );

    // Max-Age=0 removes a pair.
    bed.control
        .set_cookie_header("alice", "theme=; Max-Age=0; Path=/");
    send(&c, list(&bed, "alice-svc")).await;
    send(&c, list(&bed, "alice-svc")).await;
    assert_eq!(last_cookie(&bed), "knoq_session=alice-rotated-0002");
    bed.shutdown().await;
}

#[tokio::test]
async fn an_expired_cookie_fails_fast_until_credentials_set_provides_a_new_one() {
    let bed = TestBed::start().await;
    let c = client();
    bed.control.expire_cookie("alice");
    let first = send(&c, list(&bed, "alice-svc")).await;
    assert_eq!(first.status, 503, "{:?}", first.body);
    let j = first.json();
    assert_eq!(j["code"], "upstream_credential_expired");
    assert_eq!(
        j["error"],
        "the Knoq session cookie for user 'alice' was rejected by Knoq; give the gateway a fresh one with `knoq-gateway credentials set alice`"
    );
    assert_eq!(first.headers["retry-after"], "60");
    let seen = bed.control.requests().len();
    for token in ["alice-svc", "alice-batch"] {
        let r = send(&c, list(&bed, token)).await;
        assert_eq!(r.status, 503);
    }
    assert_eq!(
        bed.control.requests().len(),
        seen,
        "failed fast: Knoq was not called"
    );
    // Other users are unaffected.
    assert_eq!(send(&c, list(&bed, "bob-svc")).await.status, 200);
    let ready = send(
        &c,
        req("GET", &format!("http://{}/readyz", bed.admin), None, None),
    )
    .await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.json()["credentials_expired"],
        serde_json::json!(["alice"])
    );
    // Off the runtime: the in-process gateway must keep answering.
    let path = config_path(&bed);
    let status = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["credentials", "status", "--config"])
            .arg(path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8(status.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("alice") && l.contains("expired")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("bob") && l.contains("valid")),
        "{table}"
    );
    assert!(
        !table.contains("cookie-0001"),
        "no secret in the status table"
    );

    // The operator pastes a fresh cookie; the running gateway takes it.
    bed.control.set_cookie("alice", "alice-fresh-0003");
    let config = config_path(&bed);
    let out = cli(
        &[
            "credentials",
            "set",
            "alice",
            "--config",
            config.to_str().unwrap(),
        ],
        Some("knoq_session=alice-fresh-0003\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("Knoq accepted it"), "{}", out.stderr);
    let said = out.said();
    assert!(
        !said.contains("alice-fresh-0003"),
        "the cookie is never echoed: {said}"
    );
    eventually(
        "the gateway uses the new cookie",
        Duration::from_secs(5),
        || {
            let c = c.clone();
            let r = list(&bed, "alice-svc");
            async move { send(&c, r).await.status == 200 }
        },
    )
    .await;
    assert_eq!(last_cookie(&bed), "knoq_session=alice-fresh-0003");
    let ready = send(
        &c,
        req("GET", &format!("http://{}/readyz", bed.admin), None, None),
    )
    .await;
    assert_eq!(ready.status, 200);
    bed.shutdown().await;
}

#[tokio::test]
async fn an_edited_cookie_file_wins_over_the_stored_copy() {
    let bed = TestBed::start().await;
    let c = client();
    bed.control.rotate_cookie("bob", "bob-rotated-0002");
    send(&c, list(&bed, "bob-svc")).await;
    assert!(state_file(&bed, "bob").exists());
    // The operator writes a brand new cookie into bob.cookie.
    bed.control.set_cookie("bob", "bob-from-file-0003");
    bed.dir
        .write_secret("bob.cookie", "knoq_session=bob-from-file-0003\n");
    eventually(
        "the new cookie_file is used",
        Duration::from_secs(5),
        || {
            let c = c.clone();
            let r = list(&bed, "bob-svc");
            async move { send(&c, r).await.status == 200 }
        },
    )
    .await;
    assert_eq!(last_cookie(&bed), "knoq_session=bob-from-file-0003");
    let admin = admin_get(bed.admin, "/credentials").await;
    let users = admin.json()["users"].clone();
    assert_eq!(users[1]["user"], "bob");
    assert_eq!(users[1]["source"], "file");
    assert!(
        !admin.body.windows(4).any(|w| w == b"0003"),
        "no cookie in /credentials"
    );
    bed.shutdown().await;
}

/// The newest complete copy of alice's cookie among the state file and
/// the temporary copies beside it: (value, generation of the value).
fn kept_cookie(dir: &std::path::Path) -> (String, u32) {
    let mut best: Option<(u64, String)> = None;
    for entry in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "alice.json" && !name.starts_with(".alice.json.tmp-") {
            continue;
        }
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(entry.path()).unwrap_or_default(),
        ) else {
            continue; // a torn temporary copy, which the start discards
        };
        let cookie = json["cookie"].as_str().unwrap().to_string();
        assert!(
            cookie.starts_with("knoq_session=alice-gen-") && cookie.ends_with("; theme=dark"),
            "{cookie}"
        );
        let generation = json["generation"].as_u64().unwrap();
        if best.as_ref().is_none_or(|(g, _)| generation > *g) {
            best = Some((generation, cookie));
        }
    }
    let cookie = best.expect("a stored cookie exists").1;
    let value = cookie
        .trim_start_matches("knoq_session=")
        .trim_end_matches("; theme=dark")
        .to_string();
    let generation = value.trim_start_matches("alice-gen-").parse().unwrap();
    (value, generation)
}

/// Kill the gateway at arbitrary moments, with requests in flight, while
/// Knoq rotates the cookie on every answer: the stored copy is always one
/// whole cookie, and never older than the last rotation a client was
/// answered after (a rotation is stored before the answer goes out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_rotations_never_leaves_a_torn_or_stale_cookie() {
    let bed = TestBed::start().await;
    let gw = bed.process_config("kill.toml", Some("state-kill"));
    let paddr = gw.proxy;
    let state = bed
        .dir
        .0
        .join("state-kill")
        .join("credentials")
        .join("alice.json");
    let c = client();
    let generation = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    for round in 0..6u64 {
        let log = bed.dir.0.join(format!("kill-{round}.log"));
        let mut child = gw.spawn(Stdio::from(std::fs::File::create(&log).unwrap()));
        gw.wait_healthy(&c).await;
        // Two clients keep requests in flight; each answer follows a rotation.
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (c, control, gen, answered) = (
                c.clone(),
                bed.control.clone(),
                generation.clone(),
                answered.clone(),
            );
            let (token, url) = (
                bed.token("alice-svc").to_string(),
                format!("http://{paddr}{SESSIONS}"),
            );
            clients.push(tokio::spawn(async move {
                loop {
                    let g = gen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    control.rotate_cookie("alice", &format!("alice-gen-{g:06}"));
                    if let Ok(r) = c.request(req("GET", &url, Some(&token), None)).await {
                        if r.status() == 200 && !r.headers().contains_key("set-cookie") {
                            answered.fetch_max(g, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(80 + round * 53)).await;
        child.kill().unwrap(); // SIGKILL, mid-flight
        let seen_before_kill = answered.load(std::sync::atomic::Ordering::SeqCst);
        for t in &clients {
            t.abort();
        }
        child.wait().unwrap();
        let stored = std::fs::read(&state).expect("a stored cookie exists");
        let _: serde_json::Value =
            serde_json::from_slice(&stored).expect("the stored copy is whole JSON");
        // What the next start uses: the stored copy, or a complete copy a
        // kill left before its rename (the start adopts the newest one).
        let (value, stored_gen) = kept_cookie(state.parent().unwrap());
        // A rotation is stored before its answer, so nothing a client saw
        // answered can be older on disk... except a rotation issued to the
        // other client's request, in flight at the kill: allow that one.
        assert!(
            stored_gen + 2 >= seen_before_kill,
            "stored generation {stored_gen} is older than {seen_before_kill}"
        );
        // Every rotation reached the requests after it: none of them was
        // sent with a cookie Knoq had already retired and taken for expiry.
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            !said.contains("Knoq rejected the session cookie"),
            "round {round}: a rotation was lost and the cookie taken for expired:\n{said}"
        );
        // Knoq accepts what the gateway kept, as it would the newest cookie.
        bed.control.set_cookie("alice", &value);
    }
    assert!(generation.load(std::sync::atomic::Ordering::SeqCst) > 6);
    bed.shutdown().await;
}

#[tokio::test]
async fn an_idle_accounts_expired_cookie_is_found_by_the_probe() {
    let bed = TestBed::start().await;
    let c = client();
    // Give alice a one-second probe, by reloading the config.
    let text = bed.config_text.replace(
        "name = \"alice\"\ncookie_file = \"alice.cookie\"\n",
        "name = \"alice\"\ncookie_file = \"alice.cookie\"\nprobe = \"1s\"\n",
    );
    assert_ne!(text, bed.config_text);
    std::fs::write(config_path(&bed), text).unwrap();
    bed.control.expire_cookie("alice");
    let ready = format!("http://{}/readyz", bed.admin);
    eventually(
        "the probe finds alice's cookie expired",
        Duration::from_secs(10),
        || {
            let (c, r) = (c.clone(), req("GET", &ready, None, None));
            async move {
                send(&c, r).await.json()["credentials_expired"] == serde_json::json!(["alice"])
            }
        },
    )
    .await;
    let probes: Vec<_> = bed
        .control
        .requests()
        .into_iter()
        .filter(|r| r.path == SESSIONS)
        .collect();
    assert!(!probes.is_empty());
    assert!(probes.iter().all(|r| r.headers["cookie"] == ALICE_COOKIE));
    bed.shutdown().await;
}
