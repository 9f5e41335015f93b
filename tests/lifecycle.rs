//! Start-up, shutdown, the admin port, HTTPS on the clients' port, and the
//! command line, through real processes where it matters.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_knoq-gateway");

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_request() {
    let mut bed = TestBed::start().await;
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::Delay(Duration::from_millis(800))],
    );
    let c = client();
    let url = bed.url(SESSIONS);
    let token = bed.token("alice-svc").to_string();
    let in_flight =
        tokio::spawn(async move { send(&c, req("GET", &url, Some(&token), None)).await });
    let control = bed.control.clone();
    eventually("the request reached Knoq", Duration::from_secs(5), || {
        let c = control.clone();
        async move { c.in_flight() == 1 }
    })
    .await;
    let stopping = bed.begin_stop();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the gateway drained and stopped")
        .unwrap();
    // New connections are refused once the gateway has stopped.
    assert!(tokio::net::TcpStream::connect(bed.addr).await.is_err());
    bed.shutdown().await;
}

#[tokio::test]
async fn admin_port_reports_health_and_readiness_as_json() {
    let bed = TestBed::start().await;
    let c = client();
    let health = send(
        &c,
        req("GET", &format!("http://{}/healthz", bed.admin), None, None),
    )
    .await;
    assert_eq!(
        (health.status.as_u16(), health.json()["status"].as_str()),
        (200, Some("ok"))
    );
    let ready = send(
        &c,
        req("GET", &format!("http://{}/readyz", bed.admin), None, None),
    )
    .await;
    assert_eq!(
        (ready.status.as_u16(), ready.json()["status"].as_str()),
        (200, Some("ready"))
    );
    let other = send(
        &c,
        req("GET", &format!("http://{}/nope", bed.admin), None, None),
    )
    .await;
    assert_eq!(other.status, 404);
    assert!(other.json()["error"].is_string());
    // The clients' port does not serve admin endpoints.
    let r = bed.get("/healthz", "alice-svc").await;
    assert_eq!(r.status, 404);
    bed.shutdown().await;
}

#[tokio::test]
async fn clients_port_serves_https_with_h2_and_http1() {
    let dir = TempDir::new("tls");
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.0.join("gw.crt"), cert.cert.pem()).unwrap();
    let key = dir.write_secret("gw.key", &cert.key_pair.serialize_pem());
    let bed = BedBuilder {
        server_toml: format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            dir.0.join("gw.crt").display(),
            key.display()
        ),
        ..TestBed::builder()
    }
    .start()
    .await;
    let tls = knoq_gateway::tls::client_config(Some(&dir.0.join("gw.crt"))).unwrap();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    let c: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https);
    let url = format!("https://localhost:{}{SESSIONS}", bed.addr.port());
    let rsp = c
        .request(
            http::Request::get(url)
                .header(
                    "authorization",
                    format!("Bearer {}", bed.token("alice-svc")),
                )
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.version(), http::Version::HTTP_2, "ALPN picked h2");
    bed.shutdown().await;
}

#[test]
fn token_new_prints_a_token_and_its_digest() {
    let out = Command::new(BIN).args(["token", "new"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text
        .split_whitespace()
        .find(|w| w.starts_with("kgw_"))
        .expect("a kgw_ token");
    let digest = knoq_gateway::auth::digest_hex(token);
    assert!(text.contains(&format!("sha256 = \"{digest}\"")), "{text}");
}

#[test]
fn check_reports_every_problem_with_its_key_and_exits_1() {
    let dir = TempDir::new("check");
    let cookie = dir.0.join("alice.cookie");
    std::fs::write(&cookie, "knoq_session=TOPSECRET").unwrap(); // mode 0644: refused
    let config = dir.0.join("gateway.toml");
    std::fs::write(
        &config,
        "[server]\nmax_body = \"big\"\n[[users]]\nname = \"alice\"\ncookie_file = \"alice.cookie\"\n\
         [[tokens]]\nname = \"t\"\nuser = \"nobody\"\nsha256 = \"00\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    for key in ["server.max_body", "tokens[0].user", "tokens[0].sha256"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }

    // With the config fixed, the cookie file's mode is the one problem left.
    std::fs::write(
        &config,
        "[[users]]\nname = \"alice\"\ncookie_file = \"alice.cookie\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("users[0].cookie_file") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("TOPSECRET"));

    std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A symlink to a private file is refused all the same.
    std::fs::rename(&cookie, dir.0.join("real.cookie")).unwrap();
    std::os::unix::fs::symlink(dir.0.join("real.cookie"), &cookie).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("symlink"));
}

#[test]
fn the_example_config_passes_check_once_its_files_exist_and_its_token_is_real() {
    let dir = TempDir::new("example");
    let example = include_str!("../config/gateway.example.toml");
    let config = dir.0.join("gateway.toml");
    std::fs::write(&config, example).unwrap();
    std::fs::create_dir(dir.0.join("secrets")).unwrap();
    dir.write_secret("secrets/alice.cookie", "knoq_session=abc");
    let check = || {
        Command::new(BIN)
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    // Untouched, the placeholder digest is refused, with what to do.
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("tokens[0].sha256: is the example's placeholder; make a token with `knoq-gateway token new`"),
        "{text}"
    );
    // `token new` prints the line to paste.
    let new = Command::new(BIN).args(["token", "new"]).output().unwrap();
    let printed = String::from_utf8_lossy(&new.stdout);
    let line = printed
        .lines()
        .find(|l| l.trim_start().starts_with("sha256 = "))
        .unwrap()
        .trim();
    let placeholder = format!("sha256 = \"{}\"", "0".repeat(64));
    std::fs::write(&config, example.replace(&placeholder, line)).unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn serve_exits_non_zero_on_a_busy_port_and_on_a_bad_config() {
    let bed = TestBed::start().await;
    // The bed's own gateway already holds these ports.
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config_path(&bed))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"));

    let bad = bed.dir.0.join("bad.toml");
    std::fs::write(&bad, "[server]\nlisten = \"nonsense\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen"));
    bed.shutdown().await;
}

/// Runs the real binary at trace level, drives traffic that carries every
/// kind of secret, and searches everything it logged.
#[tokio::test]
async fn no_secret_appears_in_logs_at_trace_level() {
    let bed = TestBed::start().await;
    // A second gateway process on fresh ports, same secrets and upstream.
    let gw = bed.process_config("trace.toml", None);
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&gw.config)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr on a thread: at trace level the pipe fills quickly.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut logs = String::new();
        stderr.read_to_string(&mut logs).unwrap();
        logs
    });

    let c = client();
    let base = format!("http://{}", gw.proxy);
    gw.wait_healthy(&c).await;
    bed.control
        .set_cookie_header("alice", "knoq_extra=ROTATEDSECRET; Path=/");
    let alice = bed.token("alice-svc");
    for (method, path, token, body) in [
        (
            "POST",
            "/api/managed-agents/session",
            alice,
            Some(r#"{"text":"BODYSECRET"}"#),
        ),
        ("GET", SESSIONS, alice, None),
        ("GET", "/api/scim/v2/Users", bed.token("idp-sync"), None),
        ("GET", SESSIONS, "kgw_WRONGSECRET", None),
    ] {
        let _ = send(&c, req(method, &format!("{base}{path}"), Some(token), body)).await;
    }
    let h2 = send(
        &h2c_client(),
        req("GET", &format!("{base}{SESSIONS}"), Some(alice), None),
    )
    .await;
    assert_eq!(h2.status, 200);

    // SIGTERM: the process drains and exits 0.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    // Wait off the runtime: the test's clients must keep running to answer
    // the gateway's HTTP/2 GOAWAY ping while it drains.
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let logs = reader.join().unwrap();
    assert!(
        logs.contains("request"),
        "the request log lines are there: {logs}"
    );
    let mut secrets: Vec<&str> = vec![
        "alice-cookie-0001",
        "bob-cookie-0001",
        SCIM_TOKEN,
        "ROTATEDSECRET",
        "BODYSECRET",
        "WRONGSECRET",
    ];
    for name in ["alice-svc", "alice-batch", "bob-svc", "idp-sync"] {
        secrets.push(bed.token(name));
    }
    for s in secrets {
        assert!(!logs.contains(s), "secret {s:?} found in the logs");
    }
    bed.shutdown().await;
}
