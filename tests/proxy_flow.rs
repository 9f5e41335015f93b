//! The gateway in front of the simulated Knoq over real HTTPS: every route
//! answers as Knoq does, and what reaches Knoq carries the user's cookie and
//! Origin and nothing of the client's identity.

mod support;

use std::time::Duration;

use support::*;

const MANAGED: &str = "/api/managed-agents";

#[tokio::test]
async fn every_route_answers_as_knoq_does() {
    let bed = TestBed::start().await;
    let c = client();
    let t = bed.token("alice-svc");

    let created = bed
        .post(
            SESSION,
            "alice-svc",
            r#"{"text":"Quarterly numbers, please"}"#,
        )
        .await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let sid = created.json()["id"].as_str().unwrap().to_string();
    assert!(created.json()["runId"].is_string());

    let sent = bed
        .post(MESSAGE, "alice-svc", &message(&sid, "and Q2?"))
        .await;
    assert_eq!(
        (sent.status.as_u16(), sent.json()),
        (200, serde_json::json!({"ok": true}))
    );

    // Poll the transcript until the simulated agent has finished its turn.
    let transcript_url = bed.url(&format!("{MANAGED}/transcript?sessionId={sid}"));
    eventually(
        "status_idle after the message",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            let url = transcript_url.clone();
            async move {
                let r = send(&c, req("GET", &url, Some(t), None)).await;
                let events = r.json()["events"].as_array().cloned().unwrap_or_default();
                events.iter().filter(|e| e["type"] == "status_idle").count() >= 2
            }
        },
    )
    .await;

    // Reads through the gateway are byte-identical to reads made directly
    // with the user's cookie.
    let direct = direct_client(&bed);
    for path in [
        format!("{MANAGED}/sessions"),
        format!("{MANAGED}/transcript?sessionId={sid}"),
        format!("{MANAGED}/transcript?sessionId={sid}&sinceEventId=nonexistent"),
        format!("{MANAGED}/transcript"),
    ] {
        let via = send(&c, req("GET", &bed.url(&path), Some(t), None)).await;
        let straight = direct.get(&path, ALICE_COOKIE).await;
        assert_eq!(via.status, straight.status, "{path}");
        assert_eq!(via.body, straight.body, "{path}");
    }

    let cancel = bed
        .post(
            &format!("{MANAGED}/cancel"),
            "alice-svc",
            &format!(r#"{{"sessionId":"{sid}"}}"#),
        )
        .await;
    assert_eq!(cancel.status, 200);
    assert_eq!(cancel.json()["ok"], true);

    let del = send(
        &c,
        req(
            "DELETE",
            &bed.url(&format!("{MANAGED}/session?sessionId={sid}")),
            Some(t),
            None,
        ),
    )
    .await;
    assert_eq!(
        (del.status.as_u16(), del.json()),
        (200, serde_json::json!({"ok": true}))
    );
    let gone = send(
        &c,
        req(
            "DELETE",
            &bed.url(&format!("{MANAGED}/session?sessionId={sid}")),
            Some(t),
            None,
        ),
    )
    .await;
    assert_eq!(gone.status, 404);
    assert!(
        gone.json()["error"].is_string(),
        "Knoq's own error passes through"
    );

    // Knoq's 400 for an empty text passes through untouched.
    let bad = bed.post(SESSION, "alice-svc", r#"{"text":""}"#).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].is_string());
    assert!(bad.json().get("code").is_none(), "not a gateway error");

    // Sessions are scoped to the token's user: bob sees none of alice's.
    let bobs = bed.get(&format!("{MANAGED}/sessions"), "bob-svc").await;
    assert_eq!(bobs.json()["sessions"].as_array().unwrap().len(), 0);
    bed.shutdown().await;
}

#[tokio::test]
async fn knoq_sees_the_users_cookie_and_origin_and_nothing_of_the_client() {
    let bed = TestBed::start().await;
    let c = client();
    let r = Request::post(bed.url(&format!("{MANAGED}/session")))
        .header(
            "authorization",
            format!("Bearer {}", bed.token("alice-batch")),
        )
        .header("content-type", "application/json")
        .header("cookie", "knoq_session=stolen")
        .header("origin", "https://evil.example")
        .header("x-forwarded-for", "10.9.9.9")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=10.9.9.9")
        .header("x-request-id", "trace-me-42")
        .header("x-tool-note", "kept")
        .body(http_body_util::Full::from(r#"{"text":"hello"}"#))
        .unwrap();
    let reply = send(&c, r).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["x-request-id"], "trace-me-42");

    let seen = bed.control.requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(seen[0].user.as_deref(), Some("alice"));
    assert_eq!(
        h.get_all("cookie").iter().collect::<Vec<_>>(),
        [ALICE_COOKIE]
    );
    assert_eq!(
        h.get_all("origin").iter().collect::<Vec<_>>(),
        ["https://knoq.one"]
    );
    let host = h.get("host").map(|v| v.to_str().unwrap().to_string());
    let sim_host = bed.sim.as_ref().unwrap().addr().to_string();
    // HTTP/2 carries the authority in the URI instead of a Host header.
    assert!(
        host.is_none() || host.as_deref() == Some(sim_host.as_str()),
        "{host:?}"
    );
    for absent in [
        "authorization",
        "x-forwarded-for",
        "x-forwarded-host",
        "forwarded",
    ] {
        assert!(!h.contains_key(absent), "{absent} reached Knoq");
    }
    assert_eq!(h["x-tool-note"], "kept");
    assert_eq!(h["x-request-id"], "trace-me-42");
    assert_eq!(seen[0].body, r#"{"text":"hello"}"#);
    bed.shutdown().await;
}

#[tokio::test]
async fn naming_cookie_or_origin_in_connection_cannot_strip_them() {
    let bed = TestBed::start().await;
    let raw_req = format!(
        "POST {MANAGED}/session HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
         Connection: close, Cookie, Origin\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{{\"text\":\"hi\"}}",
        bed.token("alice-svc")
    );
    let out = raw(bed.addr, raw_req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = bed.control.requests();
    assert_eq!(seen[0].headers["cookie"], ALICE_COOKIE);
    assert_eq!(seen[0].headers["origin"], "https://knoq.one");
    bed.shutdown().await;
}

#[tokio::test]
async fn set_cookie_never_reaches_the_client() {
    let bed = TestBed::start().await;
    bed.control.set_cookie_header("alice", "other=1; Path=/");
    let r = bed.get(&format!("{MANAGED}/sessions"), "alice-svc").await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("set-cookie"), "{:?}", r.headers);
    // Knoq did send one: the gateway removed it.
    assert!(bed.control.requests()[0].status == Some(200));
    bed.shutdown().await;
}

#[tokio::test]
async fn http2_clients_work() {
    let bed = TestBed::start().await;
    let r = send(
        &h2c_client(),
        req(
            "GET",
            &bed.url(&format!("{MANAGED}/sessions")),
            Some(bed.token("alice-svc")),
            None,
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["sessions"].is_array());
    let bad = send(
        &h2c_client(),
        req("GET", &bed.url(&format!("{MANAGED}/sessions")), None, None),
    )
    .await;
    assert_eq!(bad.status, 401);
    bed.shutdown().await;
}

#[tokio::test]
async fn scim_is_for_scim_tokens_only_and_uses_the_scim_bearer() {
    let bed = TestBed::start().await;
    let denied = bed.get("/api/scim/v2/Users", "alice-svc").await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["code"], "forbidden");
    assert!(bed.control.requests().is_empty(), "refused before Knoq");

    let ok = bed.get("/api/scim/v2/Users", "idp-sync").await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let seen = bed.control.requests();
    assert_eq!(
        seen[0].headers["authorization"],
        format!("Bearer {SCIM_TOKEN}")
    );
    assert!(!seen[0].headers.contains_key("cookie"));
    assert!(!ok
        .body
        .windows(SCIM_TOKEN.len())
        .any(|w| w == SCIM_TOKEN.as_bytes()));
    bed.shutdown().await;
}

/// A direct HTTPS client to the simulated Knoq, for side-by-side checks.
struct Direct {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<bytes::Bytes>,
    >,
    base: String,
}

fn direct_client(bed: &TestBed) -> Direct {
    let sim = bed.sim.as_ref().unwrap();
    let ca = bed.dir.0.join("knoq-ca.pem");
    let tls = knoq_gateway::tls::client_config(Some(&ca)).unwrap();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Direct {
        client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
        base: sim.base_url(),
    }
}

impl Direct {
    async fn get(&self, path: &str, cookie: &str) -> Reply {
        let rsp = self
            .client
            .request(
                Request::get(format!("{}{path}", self.base))
                    .header("cookie", cookie)
                    .body(http_body_util::Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        let (parts, body) = rsp.into_parts();
        use http_body_util::BodyExt;
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }
}

use http::Request;
