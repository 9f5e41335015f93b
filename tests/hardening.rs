//! What the gateway refuses, and how: JSON errors with the documented
//! status, before anything reaches Knoq; and the limits that keep one bad
//! client from hurting others.

mod support;

use std::time::Duration;

use http::Request;
use knoq_sim::{Fault, SimRoute};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn raw_get(path: &str, token: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n{extra}Connection: close\r\n\r\n")
}

fn status_of(out: &str) -> u16 {
    out.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"))
}

fn json_body(out: &str) -> serde_json::Value {
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test]
async fn traversal_and_encoded_variants_are_refused_before_knoq() {
    let bed = TestBed::start().await;
    let t = bed.token("alice-svc").to_string();
    let cases = [
        ("/api/managed-agents/../scim/v2/Users", 400),
        ("/api/managed-agents/%2e%2e/scim/v2/Users", 400),
        ("/api/managed-agents/%2E%2E/scim/v2/Users", 400),
        ("/api/managed-agents/..%2fscim%2fv2%2fUsers", 400),
        ("/api/managed-agents/..%5cscim", 400),
        ("/api/managed-agents/.%2e/scim", 400),
        ("/api/managed-agents//sessions", 400),
        ("/api/managed-agents/./sessions", 400),
        ("/api/managed-agents/sessions/", 400),
        ("/api/managed-agents\\..\\scim", 400),
        ("/api/managed-agents/..;/scim/v2/Users", 400),
        ("/api/managed-agents/%252e%252e/scim/v2/Users", 400),
        ("/api/managed-agents/%c0%ae%c0%ae/scim/v2/Users", 400),
        ("/api/managed-agents/%ef%bc%8fscim", 400),
        ("/api/managed-agents/sessions;jsessionid=1", 400),
        ("/api/other", 404),
        ("/", 404),
        ("/_sim/requests", 404),
    ];
    for (path, want) in cases {
        let out = raw(
            bed.addr,
            raw_get(path, &t, "").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(status_of(&out), want, "{path}: {out}");
        assert!(json_body(&out)["code"].is_string(), "{path}: {out}");
    }
    // Absolute-form and authority-form targets.
    for target in [
        "http://evil.example/api/managed-agents/sessions",
        "https://127.0.0.1/api/managed-agents/sessions",
    ] {
        let out = raw(
            bed.addr,
            raw_get(target, &t, "").as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(status_of(&out), 400, "{target}: {out}");
        assert_eq!(json_body(&out)["code"], "bad_request_target");
    }
    let connect = "CONNECT knoq.one:443 HTTP/1.1\r\nHost: knoq.one:443\r\n\r\n";
    let out = raw(bed.addr, connect.as_bytes(), Duration::from_secs(5)).await;
    assert!(matches!(status_of(&out), 400 | 405), "{out}");
    assert!(bed.control.requests().is_empty(), "nothing reached Knoq");
    bed.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_get_401_json_with_www_authenticate() {
    let bed = TestBed::start().await;
    let c = client();
    for bearer in [None, Some("kgw_not-a-real-token")] {
        let r = send(&c, req("GET", &bed.url(SESSIONS), bearer, None)).await;
        assert_eq!(r.status, 401);
        assert!(r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        assert_eq!(r.json()["code"], "unauthorized");
    }
    let t = bed.token("alice-svc");
    let two = Request::get(bed.url(SESSIONS))
        .header("authorization", format!("Bearer {t}"))
        .header("authorization", format!("Bearer {t}"))
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(send(&c, two).await.status, 401);
    let basic = Request::get(bed.url(SESSIONS))
        .header("authorization", "Basic YWxpY2U6cHc=")
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(send(&c, basic).await.status, 401);
    assert!(bed.control.requests().is_empty());
    bed.shutdown().await;
}

#[tokio::test]
async fn methods_hosts_header_names_and_framing_are_policed() {
    let bed = TestBed::start().await;
    let t = bed.token("alice-svc").to_string();
    let trace = format!("TRACE {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n");
    let out = raw(bed.addr, trace.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 405, "{out}");
    assert!(out.to_ascii_lowercase().contains("allow: get"), "{out}");
    assert!(!out.contains(&t), "TRACE must not echo the request");

    let evil = format!("GET {SESSIONS} HTTP/1.1\r\nHost: rebind.evil.example:8080\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n");
    let out = raw(bed.addr, evil.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 421, "{out}");
    assert_eq!(json_body(&out)["code"], "misdirected_request");

    let out = raw(
        bed.addr,
        raw_get(SESSIONS, &t, "X_Api_Key: 1\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 400, "{out}");

    // Content-Length with Transfer-Encoding: hyper's parser applies RFC 9112
    // §6.3 (Transfer-Encoding wins, Content-Length is dropped, and the
    // connection closes after the response), so the bytes after the chunked
    // body can never become a second, smuggled request.
    let smuggle = format!(
        "POST /api/managed-agents/session HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    );
    let out = raw(bed.addr, smuggle.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(
        out.matches("HTTP/1.1 ").count(),
        1,
        "one response only: {out}"
    );
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    let seen = bed.control.requests();
    assert!(
        seen.iter().all(|r| r.path != SESSIONS),
        "a smuggled request reached Knoq"
    );
    assert!(
        seen.iter().all(|r| r.body.is_empty()),
        "the chunked framing won"
    );
    bed.control.clear_requests();

    let out = raw(
        bed.addr,
        raw_get(SESSIONS, &t, "Expect: teapot\r\n").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), 417, "{out}");
    let two_hosts = format!("GET {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n");
    let out = raw(bed.addr, two_hosts.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 400, "{out}");

    let upgrade = raw_get(
        SESSIONS,
        &t,
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
    );
    let out = raw(bed.addr, upgrade.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 200, "served as plain HTTP/1.1: {out}");
    assert!(!out.contains("101"), "{out}");
    let seen = bed.control.requests();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].headers.contains_key("upgrade"));
    bed.shutdown().await;
}

#[tokio::test]
async fn oversized_bodies_and_heads_get_json_413_and_431() {
    let bed = TestBed::builder();
    let bed = BedBuilder {
        server_toml: "max_body = \"1KiB\"\nmax_header_bytes = \"4KiB\"\n".into(),
        ..bed
    }
    .start()
    .await;
    let t = bed.token("alice-svc");
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(2000));
    let r = bed.post(SESSION, "alice-svc", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "body_too_large");

    // A chunked body without Content-Length that grows past the limit.
    let mut s = TcpStream::connect(bed.addr).await.unwrap();
    let head = format!("POST /api/managed-agents/session HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = "y".repeat(600);
    for _ in 0..3 {
        let _ = s
            .write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&out), 413, "{out}");
    assert!(bed.control.sessions("alice").is_empty(), "nothing created");

    // Just over the limit, and five times it: both get the JSON answer
    // (hyper's own bare 431 only starts past its 64 KiB buffer).
    for size in [5_000, 20_000] {
        let huge = raw_get(SESSIONS, t, &format!("X-Padding: {}\r\n", "p".repeat(size)));
        let out = raw(bed.addr, huge.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), 431, "{out}");
        assert_eq!(
            json_body(&out)["code"],
            "headers_too_large",
            "{size}: {out}"
        );
    }
    bed.shutdown().await;
}

#[tokio::test]
async fn expect_continue_is_answered_only_after_the_token_is_checked() {
    let bed = TestBed::start().await;
    let head = |token: &str| {
        format!("POST /api/managed-agents/session HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
                 Content-Type: application/json\r\nContent-Length: 13\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
    };
    // Bad token: a final 401, never `100 Continue`, and the body is not awaited.
    let out = raw(
        bed.addr,
        head("kgw_wrong").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(!out.contains("100 Continue"));

    // Good token: `100 Continue`, then the body, then Knoq's answer.
    let mut s = TcpStream::connect(bed.addr).await.unwrap();
    s.write_all(head(bed.token("alice-svc")).as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(br#"{"text":"hi"}"#).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).contains("200 OK"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn a_slow_headers_client_is_cut_off_without_slowing_others() {
    let bed = BedBuilder {
        server_toml: "header_read_timeout = \"400ms\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let mut slow = TcpStream::connect(bed.addr).await.unwrap();
    slow.write_all(b"GET /api/managed-agents/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();

    // Meanwhile, normal requests are served at once, several times.
    for _ in 0..5 {
        let r = bed.get(SESSIONS, "alice-svc").await;
        assert_eq!(r.status, 200);
    }
    // The slow client's connection is closed by the gateway.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow connection was not closed");

    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(bed.addr).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the silent connection was not closed");
    bed.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_frees_the_upstream_request() {
    let bed = TestBed::start().await;
    bed.control
        .fail_next(SimRoute::Transcript, vec![Fault::Hang]);
    let mut s = TcpStream::connect(bed.addr).await.unwrap();
    let get = raw_get(
        "/api/managed-agents/transcript?sessionId=x",
        bed.token("alice-svc"),
        "",
    );
    s.write_all(get.as_bytes()).await.unwrap();
    let control = bed.control.clone();
    eventually("the request reached Knoq", Duration::from_secs(5), || {
        let c = control.clone();
        async move { c.in_flight() == 1 }
    })
    .await;
    drop(s);
    eventually(
        "Knoq saw the request cancelled",
        Duration::from_secs(5),
        || {
            let c = control.clone();
            async move { c.in_flight() == 0 && c.cancelled() >= 1 }
        },
    )
    .await;
    bed.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_are_json_502_and_504() {
    // Connection refused: a port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let bed = BedBuilder {
        upstream_url: Some(format!("https://127.0.0.1:{port}")),
        upstream_toml: "connect_timeout = \"1s\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "upstream_unreachable");
    bed.shutdown().await;

    // An upstream whose certificate the gateway does not trust.
    let bed = BedBuilder {
        trust_sim: false,
        ..TestBed::builder()
    }
    .start()
    .await;
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "upstream_tls");
    assert!(bed.control.requests().is_empty());
    bed.shutdown().await;

    // An upstream that never answers.
    let bed = BedBuilder {
        upstream_toml: "timeout = \"300ms\"\n".into(),
        // One attempt: this test is about what a single failure looks like.
        tail_toml: "[retry]\nattempts = 1\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::Hang]);
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["code"], "upstream_timeout");
    // A reset after Knoq applied the request: the client is told it may have.
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::ApplyThenReset]);
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "upstream_reset");
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("may still have acted"));
    // Knoq's own failures pass through untouched.
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::status(503)]);
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 503);
    assert!(r.json().get("code").is_none(), "Knoq's body, not ours");
    bed.shutdown().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_but_slow_requests_are_not() {
    let bed = BedBuilder {
        server_toml: "idle_timeout = \"300ms\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let t = bed.token("alice-svc").to_string();
    // A request that takes longer than the idle timeout still completes.
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::Delay(Duration::from_millis(800))],
    );
    let mut s = TcpStream::connect(bed.addr).await.unwrap();
    let keep_alive =
        format!("GET {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n");
    s.write_all(keep_alive.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Then, idle, the connection is closed by the gateway.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the idle keep-alive connection was not closed"
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn past_max_connections_a_connection_is_refused_at_once_with_json_not_left_waiting() {
    let bed = BedBuilder {
        server_toml: "max_connections = 2\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let t = bed.token("alice-svc").to_string();
    bed.control
        .fail_next(SimRoute::Transcript, vec![Fault::Hang, Fault::Hang]);
    let hold = |n: u32| {
        let (addr, t) = (bed.addr, t.clone());
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let get = format!("GET /api/managed-agents/transcript?sessionId=h{n} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n");
            s.write_all(get.as_bytes()).await.unwrap();
            s
        }
    };
    let first = hold(1).await;
    let second = hold(2).await;
    let control = bed.control.clone();
    eventually("both slots are busy", Duration::from_secs(5), || {
        let c = control.clone();
        async move { c.in_flight() == 2 }
    })
    .await;
    // The third connection is answered at once, not held in the queue.
    let get = raw_get(SESSIONS, &t, "");
    let out = raw(bed.addr, get.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 503, "{out}");
    let body = json_body(&out);
    assert_eq!(body["code"], "too_many_connections", "{out}");
    assert!(out.to_ascii_lowercase().contains("retry-after: 1"), "{out}");
    assert_eq!(
        bed.control.requests().len(),
        2,
        "the refused request never reached Knoq"
    );
    // A freed slot serves the next connection.
    drop(first);
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = bed.get(SESSIONS, "alice-svc").await.status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "refused, until the slot frees");
        assert!(tokio::time::Instant::now() < end, "no slot freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
    bed.shutdown().await;
}

#[tokio::test]
async fn an_upstream_redirect_is_passed_through_not_followed() {
    let bed = TestBed::start().await;
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::status(302)]);
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 302);
    assert_eq!(
        bed.control.requests().len(),
        1,
        "the gateway did not follow it"
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn a_clients_path_and_upgrade_headers_never_reach_knoq() {
    let bed = TestBed::start().await;
    let get = raw_get(
        SESSIONS,
        bed.token("alice-svc"),
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nVia: 1.1 corp-proxy\r\nMax-Forwards: 3\r\nProxy-Authorization: Basic eDp5\r\nTE: trailers, deflate\r\n",
    );
    let out = raw(bed.addr, get.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), 200, "{out}");
    let seen = bed.control.requests();
    assert_eq!(seen.len(), 1);
    for name in [
        "http2-settings",
        "via",
        "max-forwards",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(!seen[0].headers.contains_key(name), "{name} reached Knoq");
    }
    bed.shutdown().await;
}

#[tokio::test]
async fn a_connection_carries_at_most_max_requests_per_connection_even_pipelined() {
    let bed = BedBuilder {
        server_toml: "max_requests_per_connection = 3\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let one = format!(
        "GET {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
        bed.token("alice-svc")
    );
    // Ten requests pipelined in one write, never waiting for an answer.
    let out = raw(bed.addr, one.repeat(10).as_bytes(), Duration::from_secs(10)).await;
    let answers = out.matches("HTTP/1.1 200").count();
    assert_eq!(answers, 3, "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert_eq!(bed.control.requests().len(), 3, "no more reached Knoq");
    bed.shutdown().await;
}

#[tokio::test]
async fn a_silent_connection_gets_the_short_first_byte_timeout_and_a_started_head_the_header_timeout(
) {
    let bed = BedBuilder {
        server_toml: "first_byte_timeout = \"300ms\"\nheader_read_timeout = \"3s\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    // Nothing sent: closed after the first-byte timeout, long before the
    // header timeout.
    let started = std::time::Instant::now();
    let out = raw(bed.addr, b"", Duration::from_secs(5)).await;
    assert!(out.is_empty(), "{out}");
    let silent = started.elapsed();
    assert!(
        silent < Duration::from_secs(2),
        "a silent connection was held {silent:?}"
    );
    // A head begun: the header timeout applies, not the first-byte one.
    let started = std::time::Instant::now();
    let _ = raw(
        bed.addr,
        b"GET /api/managed-agents/sessions HTTP/1.1\r\n",
        Duration::from_secs(10),
    )
    .await;
    let begun = started.elapsed();
    assert!(
        begun >= Duration::from_secs(2),
        "a begun head was cut after {begun:?}"
    );
    bed.shutdown().await;
}
