//! What an operator deploying the gateway is told, and when: `check
//! --online` against the simulated Knoq, `credentials set` asking Knoq
//! first, an account whose cookie only `credentials set` provides, and
//! every change that would break the next start made visible at once.

mod support;

use std::time::Duration;

use support::*;

fn readyz(bed: &TestBed) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    req("GET", &format!("http://{}/readyz", bed.admin), None, None)
}

/// The `problems` of `/readyz` as (kind, subject) pairs.
async fn problems(bed: &TestBed) -> Vec<(String, String)> {
    let r = send(&client(), readyz(bed)).await;
    r.json()["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().unwrap().to_string(),
                p["subject"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn check_online_tells_valid_rejected_and_unreachable_apart() {
    let bed = TestBed::start().await;
    let config = config_path(&bed);
    let path = config.to_str().unwrap();

    let out = cli(&["check", "--config", path, "--online"], None).await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    for line in [
        "  users alice: valid",
        "  users bob: valid",
        "  scim token: valid",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "{line}: {}",
            out.said()
        );
    }
    // It asked Knoq, once per account, as the account.
    let asked: Vec<_> = bed
        .control
        .requests()
        .into_iter()
        .filter(|r| r.path == SESSIONS)
        .map(|r| r.user)
        .collect();
    assert_eq!(asked, [Some("alice".to_string()), Some("bob".to_string())]);

    bed.control.expire_cookie("alice");
    let out = cli(&["check", "--config", path, "--online"], None).await;
    assert_eq!(out.code, Some(1), "{}", out.said());
    assert!(
        out.stdout.contains(
            "  users alice: rejected: Knoq answered 401; set a new cookie with `knoq-gateway credentials set alice`"
        ),
        "{}",
        out.said()
    );
    assert!(out.stdout.contains("  users bob: valid"), "{}", out.said());
    assert!(!out.said().contains("cookie-0001"), "no secret printed");

    // Knoq out of reach: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&bed.sim.as_ref().unwrap().base_url(), &dead);
    let unreachable = bed.dir.0.join("unreachable.toml");
    std::fs::write(&unreachable, text).unwrap();
    let out = cli(
        &[
            "check",
            "--config",
            unreachable.to_str().unwrap(),
            "--online",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.said());
    assert!(
        out.stdout.contains("  users bob: unreachable: "),
        "{}",
        out.said()
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn credentials_set_stores_only_what_knoq_accepts_unless_told_not_to_ask() {
    let bed = TestBed::start().await;
    let config = config_path(&bed);
    let path = config.to_str().unwrap();
    let stored = bed.dir.0.join("state/credentials/alice.json");

    // Knoq does not know this cookie: nothing is stored.
    let out = cli(
        &["credentials", "set", "alice", "--config", path],
        Some("knoq_session=never-issued\n"),
    )
    .await;
    assert_eq!(out.code, Some(1), "{}", out.said());
    assert!(
        out.stderr
            .contains("Knoq rejected this cookie (401), so it was not stored"),
        "{}",
        out.stderr
    );
    assert!(!stored.exists(), "nothing was stored");
    assert!(!out.said().contains("never-issued"), "never echoed");

    // With --no-check it is stored, and says it was not checked.
    let out = cli(
        &[
            "credentials",
            "set",
            "alice",
            "--config",
            path,
            "--no-check",
        ],
        Some("knoq_session=never-issued\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    assert!(out.stderr.contains("not checked with Knoq (--no-check)"));
    assert!(std::fs::read_to_string(&stored)
        .unwrap()
        .contains("never-issued"));

    // A cookie Knoq rotates while it is being checked is stored rotated.
    bed.control.set_cookie("alice", "alice-fresh-0005");
    bed.control.rotate_cookie("alice", "alice-rotated-0006");
    let out = cli(
        &["credentials", "set", "alice", "--config", path],
        Some("knoq_session=alice-fresh-0005\n"),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    assert!(out.stderr.contains("Knoq accepted it"), "{}", out.stderr);
    let text = std::fs::read_to_string(&stored).unwrap();
    assert!(text.contains("alice-rotated-0006"), "{text}");
    // The check's scratch directory is gone.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("knoq-gateway-check-")
                && std::fs::read_dir(e.path())
                    .map(|mut d| d.next().is_some())
                    .unwrap_or(false)
                && std::fs::read_to_string(e.path().join("credentials/alice.json"))
                    .is_ok_and(|t| t.contains("alice-rotated-0006"))
        })
        .collect();
    assert!(left.is_empty(), "scratch copies left: {left:?}");
    bed.shutdown().await;
}

#[tokio::test]
async fn an_account_without_cookie_source_is_served_after_credentials_set() {
    let bed = TestBed::start().await;
    // bob has no cookie_file: only `credentials set` gives him one.
    let text = bed
        .config_text
        .replace("cookie_file = \"bob.cookie\"\n", "");
    let p = bed.process_config("stored.toml", Some("state-stored"));
    let text = text
        .replace(&bed.addr.to_string(), &p.proxy.to_string())
        .replace(&bed.admin.to_string(), &p.admin.to_string())
        .replace("dir = \"state\"", "dir = \"state-stored\"");
    std::fs::write(&p.config, &text).unwrap();
    let path = p.config.to_str().unwrap();

    let out = cli(&["check", "--config", path], None).await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    assert!(
        out.stdout.contains(
            "warning: bob: no cookie yet (no cookie_file or cookie_env); set one with `knoq-gateway credentials set bob`"
        ),
        "{}",
        out.said()
    );

    let _gateway = p.run(std::process::Stdio::null());
    let c = client();
    p.wait_healthy(&c).await;
    let bob = bed.token("bob-svc").to_string();
    let list = |c: &PlainClient| {
        let r = req(
            "GET",
            &format!("http://{}{SESSIONS}", p.proxy),
            Some(&bob),
            None,
        );
        let c = c.clone();
        async move { send(&c, r).await }
    };
    let r = list(&c).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "upstream_credential_missing");
    let ready = send(
        &c,
        req("GET", &format!("http://{}/readyz", p.admin), None, None),
    )
    .await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        ready.json()["credentials_missing"],
        serde_json::json!(["bob"])
    );

    let out = cli(
        &["credentials", "set", "bob", "--config", path],
        Some(&format!("{BOB_COOKIE}\n")),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    eventually("bob is served", Duration::from_secs(5), || {
        let c = c.clone();
        let list = &list;
        async move { list(&c).await.status == 200 }
    })
    .await;
    let out = cli(&["credentials", "status", "--config", path], None).await;
    assert!(
        out.stdout.contains(
            "    why: the stored copy (no cookie_file or cookie_env): set by `credentials set`, kept current by Knoq's rotations"
        ),
        "{}",
        out.stdout
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn a_cookie_file_made_unusable_is_reported_at_once_and_the_account_keeps_working() {
    let bed = TestBed::start().await;
    let c = client();
    let cookie = bed.dir.0.join("alice.cookie");
    let alice = bed.token("alice-svc").to_string();
    let list = || req("GET", &bed.url(SESSIONS), Some(&alice), None);
    assert_eq!(send(&c, list()).await.status, 200);
    assert!(problems(&bed).await.is_empty());

    // Made readable by others: the next start would refuse it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o644)).unwrap();
    eventually(
        "/readyz names alice's cookie_file",
        Duration::from_secs(5),
        || async { problems(&bed).await == [("cookie_source".to_string(), "alice".to_string())] },
    )
    .await;
    let ready = send(&c, readyz(&bed)).await;
    assert_eq!(ready.status, 200, "traffic goes on with the cookie in hand");
    let message = ready.json()["problems"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("has mode 644"), "{message}");
    assert!(message.contains("chmod 600"), "{message}");
    assert_eq!(send(&c, list()).await.status, 200);
    assert_eq!(
        metric(bed.admin, "knoq_gateway_problems{kind=\"cookie_source\"}").await,
        Some(1.0)
    );
    let creds = admin_get(bed.admin, "/credentials").await;
    let alice_row = creds.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "alice")
        .cloned()
        .unwrap();
    assert!(alice_row["source_problem"]
        .as_str()
        .unwrap()
        .contains("mode 644"));

    // Fixed: the problem goes away.
    std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o600)).unwrap();
    eventually("the problem clears", Duration::from_secs(5), || async {
        problems(&bed).await.is_empty()
    })
    .await;

    // Deleted, then SIGHUP-equivalent reload: still named.
    std::fs::remove_file(&cookie).unwrap();
    eventually(
        "/readyz names the deleted file",
        Duration::from_secs(5),
        || async { problems(&bed).await == [("cookie_source".to_string(), "alice".to_string())] },
    )
    .await;
    assert_eq!(send(&c, list()).await.status, 200);
    assert_eq!(
        metric(bed.admin, "knoq_gateway_problems{kind=\"cookie_source\"}").await,
        Some(1.0)
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn a_setting_that_needs_a_restart_stays_visible_until_then() {
    let bed = TestBed::start().await;
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let moved = other.local_addr().unwrap().to_string();
    drop(other);
    let text = bed.config_text.replace(&bed.admin.to_string(), &moved);
    std::fs::write(config_path(&bed), &text).unwrap();
    eventually(
        "/readyz names admin.listen",
        Duration::from_secs(5),
        || async {
            problems(&bed).await == [("restart_pending".to_string(), "admin.listen".to_string())]
        },
    )
    .await;
    // A later, unrelated reload does not hide it.
    std::fs::write(config_path(&bed), format!("{text}\n# touched\n")).unwrap();
    let reloads = || {
        metric(
            bed.admin,
            "knoq_gateway_config_reloads_total{result=\"success\"}",
        )
    };
    eventually(
        "the second reload lands",
        Duration::from_secs(5),
        || async { reloads().await == Some(2.0) },
    )
    .await;
    assert_eq!(
        problems(&bed).await,
        [("restart_pending".to_string(), "admin.listen".to_string())]
    );
    assert_eq!(
        metric(bed.admin, "knoq_gateway_problems{kind=\"restart_pending\"}").await,
        Some(1.0)
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_refused_and_one_expiring_soon_is_named() {
    let soon = knoq_gateway::auth::new_token();
    let gone = knoq_gateway::auth::new_token();
    let in_a_week = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 7 * 86_400;
    let week = format_unix(in_a_week);
    let mut builder = TestBed::builder();
    builder.tail_toml = format!(
            "[[tokens]]\nname = \"soon\"\nuser = \"alice\"\nsha256 = \"{}\"\nexpires = \"{week}\"\n\
             [[tokens]]\nname = \"gone\"\nuser = \"alice\"\nsha256 = \"{}\"\nexpires = \"2020-01-01\"\n",
            knoq_gateway::auth::digest_hex(&soon),
            knoq_gateway::auth::digest_hex(&gone),
        );
    let bed = builder.start().await;
    let c = client();
    assert_eq!(
        send(&c, req("GET", &bed.url(SESSIONS), Some(&soon), None))
            .await
            .status,
        200
    );
    let r = send(&c, req("GET", &bed.url(SESSIONS), Some(&gone), None)).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json()["error"],
        "this bearer token has expired; get a token from the gateway's operator"
    );
    let mut named = problems(&bed).await;
    named.sort();
    assert_eq!(
        named,
        [
            ("token_expired".to_string(), "gone".to_string()),
            ("token_expiring".to_string(), "soon".to_string())
        ]
    );
    let out = cli(
        &["check", "--config", config_path(&bed).to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    assert!(
        out.stdout
            .contains(&format!("warning: soon: expires at {week}")),
        "{}",
        out.stdout
    );

    // `token new --expires` prints the line to paste.
    let out = cli(&["token", "new", "--expires", "90d"], None).await;
    assert_eq!(out.code, Some(0), "{}", out.said());
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("expires = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_string();
    let days = (parse_unix(&line) - in_a_week as i64 + 7 * 86_400) / 86_400;
    assert_eq!(days, 90, "{line}");
    let out = cli(&["token", "new", "--expires", "yesterday"], None).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("--expires \"yesterday\""),
        "{}",
        out.stderr
    );
    bed.shutdown().await;
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's algorithm).
fn format_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The inverse of [`format_unix`], to the second.
fn parse_unix(text: &str) -> i64 {
    let n = |r: std::ops::Range<usize>| text[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

#[tokio::test]
async fn an_expiry_is_one_warning_and_access_lines_name_the_client_and_the_metrics_route() {
    let bed = TestBed::start().await;
    let p = bed.process_config("logs.toml", Some("state-logs"));
    let mut gateway = p.run(std::process::Stdio::piped());
    let c = client();
    p.wait_healthy(&c).await;
    let alice = bed.token("alice-svc").to_string();
    let at = |path: &str| format!("http://{}{path}", p.proxy);
    bed.control.expire_cookie("alice");
    for _ in 0..5 {
        let r = send(&c, req("GET", &at(SESSIONS), Some(&alice), None)).await;
        assert_eq!(r.status, 503);
    }
    // Refused before it had a route: 401 for an unknown path, no token.
    let r = send(&c, req("GET", &at("/nowhere"), None, None)).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        metric(
            p.admin,
            "knoq_gateway_requests_total{code=\"401\",method=\"GET\",route=\"other\",token=\"-\",user=\"-\"}"
        )
        .await,
        Some(1.0)
    );
    // SIGTERM, then everything it logged.
    let stderr = gateway.0.stderr.take().unwrap();
    let pid = gateway.0.id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(term.success());
    let text = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        let mut stderr = stderr;
        stderr.read_to_string(&mut text).unwrap();
        text
    })
    .await
    .unwrap();
    drop(gateway);
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning for the expiry, none per refused request: {text}"
    );
    assert!(
        warnings[0].contains("Knoq rejected the session cookie"),
        "{text}"
    );
    let access: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("knoq_gateway::pipeline: request "))
        .collect();
    assert_eq!(access.len(), 6, "{text}");
    for line in &access {
        assert!(line.contains(" client=\"127.0.0.1:"), "{line}");
    }
    assert!(access[5].contains(" route=\"other\" "), "{}", access[5]);
    assert!(
        access[0].contains(" route=\"sessions_list\" "),
        "{}",
        access[0]
    );
    bed.shutdown().await;
}
