//! The simulated Knoq, tested directly over real TLS (and once over plain
//! HTTP): routes, check order, transcript cursor, rate limits, faults, cookie
//! rotation, SCIM, HTTP/2 via ALPN, the `/_sim/` control routes, shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use knoq_sim::{
    Fault, SimConfig, SimHandle, SimKnoq, SimLimits, SimRoute, SimTls, SimUser, Window,
    DEMO_COOKIE, DEMO_USER, KNOQ_ORIGIN,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, timeout, Instant};

const SCIM_TOKEN: &str = "scim-test-token";
/// Upper bound for anything a test waits for; far above what it should take.
const DEADLINE: Duration = Duration::from_secs(5);

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A running simulator and a client that trusts only its certificate.
struct Bed {
    sim: SimHandle,
    client: HttpsClient,
    base: String,
}

/// What came back.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    json: Value,
    raw: Bytes,
}

/// Defaults for tests: fast agent, SCIM on.
fn config() -> SimConfig {
    SimConfig {
        agent_delay: Duration::from_millis(20),
        scim_token: Some(SCIM_TOKEN.to_string()),
        ..SimConfig::default()
    }
}

fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(cert.expect("PEM parses"))
            .expect("certificate accepted");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn https_client(ca_pem: &str, http2: bool) -> HttpsClient {
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(client_tls(ca_pem))
        .https_only();
    let connector = if http2 {
        builder.enable_all_versions().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

impl Bed {
    async fn start(config: SimConfig) -> Bed {
        Self::start_with(config, true).await
    }

    async fn start_with(config: SimConfig, http2: bool) -> Bed {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sim = SimKnoq::start(config, listener).await.expect("sim starts");
        let ca = sim.ca_pem().expect("self-signed certificate");
        let base = sim.base_url();
        assert!(base.starts_with("https://127.0.0.1:"), "{base}");
        Bed {
            client: https_client(&ca, http2),
            sim,
            base,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        self.try_send(method, path, headers, body)
            .await
            .expect("request succeeds")
    }

    async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<Answer, hyper_util::client::legacy::Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(value) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(value.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).expect("valid request");
        let response = timeout(DEADLINE, self.client.request(request))
            .await
            .expect("answered within the deadline")?;
        let status = response.status();
        let version = response.version();
        let headers = response.headers().clone();
        let raw = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).expect("a JSON body")
        };
        Ok(Answer {
            status,
            version,
            headers,
            json,
            raw,
        })
    }

    /// GET as the demo user.
    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[("cookie", DEMO_COOKIE)], None)
            .await
    }

    /// POST as the demo user, with the right Origin.
    async fn post(&self, path: &str, body: Value) -> Answer {
        self.send(
            Method::POST,
            path,
            &[("cookie", DEMO_COOKIE), ("origin", KNOQ_ORIGIN)],
            Some(body),
        )
        .await
    }

    async fn delete(&self, path: &str) -> Answer {
        self.send(
            Method::DELETE,
            path,
            &[("cookie", DEMO_COOKIE), ("origin", KNOQ_ORIGIN)],
            None,
        )
        .await
    }

    async fn create_session(&self, text: &str) -> String {
        let created = self
            .post("/api/managed-agents/session", json!({ "text": text }))
            .await;
        assert_eq!(created.status, StatusCode::OK, "{:?}", created.json);
        created.json["id"].as_str().expect("id").to_string()
    }

    /// Polls the transcript after `since` until a `status_idle` arrives;
    /// returns the new events.
    async fn until_idle(&self, session: &str, since: Option<&str>) -> Vec<Value> {
        let started = Instant::now();
        let mut events: Vec<Value> = Vec::new();
        let mut cursor = since.map(str::to_string);
        loop {
            let path = match &cursor {
                Some(c) => {
                    format!("/api/managed-agents/transcript?sessionId={session}&sinceEventId={c}")
                }
                None => format!("/api/managed-agents/transcript?sessionId={session}"),
            };
            let page = self.get(&path).await;
            assert_eq!(page.status, StatusCode::OK, "{:?}", page.json);
            let new = page.json["events"].as_array().expect("events").clone();
            if let Some(last) = new.last() {
                cursor = Some(last["id"].as_str().expect("id").to_string());
            }
            events.extend(new);
            if events.iter().any(|e| e["type"] == "status_idle") {
                return events;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "no status_idle in time: {events:?}"
            );
            sleep(Duration::from_millis(10)).await;
        }
    }
}

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect()
}

fn error_text(answer: &Answer) -> &str {
    answer.json["error"].as_str().expect("an error field")
}

/// Sends raw HTTP/1.1 over TLS (ALPN http/1.1) and returns every byte the
/// server sent until it closed the connection.
async fn raw_http1(sim: &SimHandle, request: &str) -> Vec<u8> {
    let mut tls = raw_connect(sim).await;
    tls.write_all(request.as_bytes()).await.expect("write");
    tls.flush().await.expect("flush");
    let mut received = Vec::new();
    // The sim closes without close_notify on a reset: an error here is fine,
    // only the bytes matter.
    let _ = timeout(DEADLINE, tls.read_to_end(&mut received))
        .await
        .expect("connection closed within the deadline");
    received
}

async fn raw_connect(sim: &SimHandle) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = client_tls(&sim.ca_pem().expect("self-signed"));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(sim.addr()).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("valid name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

fn raw_post(path: &str, body: &Value) -> String {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nCookie: {DEMO_COOKIE}\r\nOrigin: {KNOQ_ORIGIN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn cookie_is_checked_first() {
    let bed = Bed::start(config()).await;
    let sessions = "/api/managed-agents/sessions";

    let none = bed.send(Method::GET, sessions, &[], None).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers[CONTENT_TYPE], "application/json");
    assert!(!error_text(&none).is_empty());

    let wrong = bed
        .send(
            Method::GET,
            sessions,
            &[("cookie", "knoq_session=nope")],
            None,
        )
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    // 401 comes before 404 for unknown paths under managed-agents.
    let unknown = bed
        .send(Method::GET, "/api/managed-agents/nope", &[], None)
        .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        bed.get("/api/managed-agents/nope").await.status,
        StatusCode::NOT_FOUND
    );

    // Pair order and other pairs do not matter.
    let reordered = bed
        .send(
            Method::GET,
            sessions,
            &[("cookie", "theme=dark; knoq_session=demo-cookie-0001; x=1")],
            None,
        )
        .await;
    assert_eq!(reordered.status, StatusCode::OK);
    assert_eq!(reordered.json, json!({ "sessions": [] }));

    let elsewhere = bed.send(Method::GET, "/nope", &[], None).await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
    assert!(!error_text(&elsewhere).is_empty());
    assert_eq!(
        bed.get("/api/managed-agents/session").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );

    let seen = bed.sim.control().requests();
    assert_eq!(seen.len(), 7);
    assert_eq!(seen[0].user, None);
    assert_eq!(seen[0].status, Some(401));
    assert_eq!(seen[4].user.as_deref(), Some(DEMO_USER));
    assert_eq!(
        seen[4].headers[COOKIE],
        "theme=dark; knoq_session=demo-cookie-0001; x=1"
    );
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn mutations_need_the_origin_after_the_cookie() {
    let bed = Bed::start(config()).await;
    let path = "/api/managed-agents/session";
    let body = Some(json!({ "text": "hi" }));

    let no_origin = bed
        .send(Method::POST, path, &[("cookie", DEMO_COOKIE)], body.clone())
        .await;
    assert_eq!(no_origin.status, StatusCode::FORBIDDEN);
    assert_eq!(error_text(&no_origin), "CSRF check failed");

    let wrong_origin = bed
        .send(
            Method::POST,
            path,
            &[("cookie", DEMO_COOKIE), ("origin", "https://evil.example")],
            body.clone(),
        )
        .await;
    assert_eq!(wrong_origin.status, StatusCode::FORBIDDEN);

    let delete = bed
        .send(
            Method::DELETE,
            "/api/managed-agents/session?sessionId=x",
            &[("cookie", DEMO_COOKIE)],
            None,
        )
        .await;
    assert_eq!(delete.status, StatusCode::FORBIDDEN);

    let no_cookie = bed.send(Method::POST, path, &[], body.clone()).await;
    assert_eq!(no_cookie.status, StatusCode::UNAUTHORIZED);

    assert!(bed.sim.control().sessions(DEMO_USER).is_empty());
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn session_message_transcript_list_delete() {
    let bed = Bed::start(config()).await;
    let control = bed.sim.control();
    let opening = "Hello Knoq, this opening message is comfortably longer than sixty characters.";

    let created = bed
        .post("/api/managed-agents/session", json!({ "text": opening }))
        .await;
    assert_eq!(created.status, StatusCode::OK);
    assert_eq!(created.json["noConnectors"], true);
    let first = created.json["id"].as_str().expect("id").to_string();
    let run_id = created.json["runId"].as_str().expect("runId").to_string();

    let events = bed.until_idle(&first, None).await;
    assert_eq!(
        types(&events),
        ["user_message", "agent_message", "status_idle"]
    );
    assert_eq!(events[0]["text"], opening);
    assert!(events[0]["occurredAt"]
        .as_str()
        .expect("time")
        .ends_with('Z'));

    let whole = bed
        .get(&format!("/api/managed-agents/transcript?sessionId={first}"))
        .await;
    let title: String = opening.chars().take(60).collect();
    assert_eq!(whole.json["title"], title.as_str());
    assert_eq!(whole.json["workflowRunId"], run_id.as_str());
    assert_eq!(whole.json["hasMore"], false);
    assert_eq!(whole.json["backfillFailed"], false);

    // The cursor: only events after it.
    let last_id = events[2]["id"].as_str().expect("id").to_string();
    let sent = bed
        .post(
            "/api/managed-agents/message",
            json!({ "sessionId": first, "text": "second" }),
        )
        .await;
    assert_eq!(sent.json, json!({ "ok": true }));
    let newer = bed.until_idle(&first, Some(&last_id)).await;
    assert_eq!(
        types(&newer),
        ["user_message", "agent_message", "status_idle"]
    );
    assert_eq!(newer[0]["text"], "second");
    assert_eq!(control.user_messages(&first), [opening, "second"]);

    let unknown_cursor = bed
        .get(&format!(
            "/api/managed-agents/transcript?sessionId={first}&sinceEventId=evt_nope"
        ))
        .await;
    assert_eq!(unknown_cursor.status, StatusCode::BAD_REQUEST);

    // Paging: the first page after the cursor, hasMore while more remain.
    control.set_transcript_page_size(4);
    let page = bed
        .get(&format!("/api/managed-agents/transcript?sessionId={first}"))
        .await;
    assert_eq!(page.json["events"].as_array().expect("events").len(), 4);
    assert_eq!(page.json["hasMore"], true);
    let fourth = page.json["events"][3]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let rest = bed
        .get(&format!(
            "/api/managed-agents/transcript?sessionId={first}&sinceEventId={fourth}"
        ))
        .await;
    assert_eq!(rest.json["events"].as_array().expect("events").len(), 2);
    assert_eq!(rest.json["hasMore"], false);

    // List: newest update first.
    let second = bed.create_session("another one").await;
    let listed = bed.get("/api/managed-agents/sessions").await;
    let ids: Vec<&str> = listed.json["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [second.as_str(), first.as_str()]);
    assert_eq!(listed.json["sessions"][1]["title"], title.as_str());
    bed.post(
        "/api/managed-agents/message",
        json!({ "sessionId": first, "text": "third" }),
    )
    .await;
    let relisted = bed.get("/api/managed-agents/sessions").await;
    assert_eq!(relisted.json["sessions"][0]["id"], first.as_str());
    assert_eq!(relisted.json["sessions"][0]["status"], "running");

    // Delete: gone for good.
    let deleted = bed
        .delete(&format!("/api/managed-agents/session?sessionId={second}"))
        .await;
    assert_eq!(deleted.json, json!({ "ok": true }));
    let gone = bed
        .get(&format!(
            "/api/managed-agents/transcript?sessionId={second}"
        ))
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    let again = bed
        .delete(&format!("/api/managed-agents/session?sessionId={second}"))
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(
        bed.delete("/api/managed-agents/session").await.status,
        StatusCode::BAD_REQUEST
    );
    let sessions = control.sessions(DEMO_USER);
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].id, first);
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_400_and_unknown_sessions_404() {
    let bed = Bed::start(config()).await;
    let empty = bed
        .post("/api/managed-agents/session", json!({ "text": "  " }))
        .await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_text(&empty), "text is required");

    let not_json = bed
        .send(
            Method::POST,
            "/api/managed-agents/session",
            &[("cookie", DEMO_COOKIE), ("origin", KNOQ_ORIGIN)],
            None,
        )
        .await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);

    let no_session = bed
        .post("/api/managed-agents/message", json!({ "text": "x" }))
        .await;
    assert_eq!(no_session.status, StatusCode::BAD_REQUEST);
    let unknown = bed
        .post(
            "/api/managed-agents/message",
            json!({ "sessionId": "ses_unknown", "text": "x" }),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(
        bed.get("/api/managed-agents/transcript").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        bed.get("/api/managed-agents/transcript?sessionId=ses_unknown")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn cancel_is_idempotent() {
    let bed = Bed::start(config()).await;
    bed.sim.control().set_agent_delay(Duration::from_secs(30));
    let id = bed.create_session("take your time").await;

    let cancelled = bed
        .post("/api/managed-agents/cancel", json!({ "sessionId": id }))
        .await;
    assert_eq!(cancelled.json, json!({ "ok": true }));
    let events = bed.until_idle(&id, None).await;
    assert_eq!(types(&events), ["user_message", "status_idle"]);
    assert_eq!(events[1]["payload"]["reason"], "cancelled");

    let again = bed
        .post("/api/managed-agents/cancel", json!({ "sessionId": id }))
        .await;
    assert_eq!(again.json, json!({ "ok": true, "alreadyCancelled": true }));
    let unknown = bed
        .post(
            "/api/managed-agents/cancel",
            json!({ "sessionId": "ses_x" }),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let bed = Bed::start(SimConfig {
        limits: SimLimits {
            message: vec![Window::new(2, Duration::from_millis(500))],
            session: vec![Window::new(1, Duration::from_secs(10))],
            ..SimLimits::unlimited()
        },
        ..config()
    })
    .await;
    let control = bed.sim.control();
    let id = bed.create_session("limits").await;

    let refused = bed
        .post("/api/managed-agents/session", json!({ "text": "more" }))
        .await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = refused.headers[RETRY_AFTER]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((9..=10).contains(&wait), "{wait}");

    let message = json!({ "sessionId": id, "text": "m" });
    for _ in 0..2 {
        let ok = bed
            .post("/api/managed-agents/message", message.clone())
            .await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    let over = bed
        .post("/api/managed-agents/message", message.clone())
        .await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(over.headers[RETRY_AFTER], "1");
    assert!(error_text(&over).contains("messages"));
    assert_eq!(control.rate_limited(), 2);
    // Refused requests did not count: the window reopens on schedule.
    sleep(Duration::from_secs(1)).await;
    let again = bed.post("/api/managed-agents/message", message).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(control.user_messages(&id).len(), 4);
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn monthly_quota_carries_cost_fields() {
    let bed = Bed::start(SimConfig {
        limits: SimLimits {
            monthly_queries: Some(1),
            ..SimLimits::knoq()
        },
        ..config()
    })
    .await;
    let id = bed.create_session("one query").await;
    let spent = bed
        .post(
            "/api/managed-agents/message",
            json!({ "sessionId": id, "text": "two" }),
        )
        .await;
    assert_eq!(spent.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(spent.headers.contains_key(RETRY_AFTER));
    assert!(spent.json["capUsd"].is_number());
    assert!(spent.json["monthToDateUsd"].is_number());
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn injected_status_delay_and_any() {
    let bed = Bed::start(config()).await;
    let control = bed.sim.control();
    let id = bed.create_session("faults").await;

    control.fail_next(
        SimRoute::MessageSend,
        vec![Fault::status_retry_after(502, 3)],
    );
    let failed = bed
        .post(
            "/api/managed-agents/message",
            json!({ "sessionId": id, "text": "lost" }),
        )
        .await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(failed.headers[RETRY_AFTER], "3");
    assert!(!error_text(&failed).is_empty());
    assert_eq!(control.user_messages(&id), ["faults"]);

    control.fail_next(SimRoute::Any, vec![Fault::status(503)]);
    assert_eq!(
        bed.get("/api/managed-agents/sessions").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        bed.get("/api/managed-agents/sessions").await.status,
        StatusCode::OK
    );

    control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::Delay(Duration::from_millis(150))],
    );
    let started = Instant::now();
    assert_eq!(
        bed.get("/api/managed-agents/sessions").await.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        control.rate_limited(),
        0,
        "injected statuses are not counted"
    );
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn reset_closes_the_connection_without_a_response() {
    let bed = Bed::start(config()).await;
    let control = bed.sim.control();
    let id = bed.create_session("resets").await;
    let path = "/api/managed-agents/message";

    // The raw client itself works: a normal request gets its bytes.
    let normal = raw_http1(
        &bed.sim,
        &format!(
            "GET /api/managed-agents/sessions HTTP/1.1\r\nHost: localhost\r\nCookie: {DEMO_COOKIE}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(
        normal.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&normal)
    );

    control.fail_next(SimRoute::MessageSend, vec![Fault::Reset]);
    let received = raw_http1(
        &bed.sim,
        &raw_post(path, &json!({ "sessionId": id, "text": "never" })),
    )
    .await;
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(control.user_messages(&id), ["resets"]);

    control.fail_next(SimRoute::MessageSend, vec![Fault::ApplyThenReset]);
    let received = raw_http1(
        &bed.sim,
        &raw_post(path, &json!({ "sessionId": id, "text": "once" })),
    )
    .await;
    assert!(
        received.is_empty(),
        "{}",
        String::from_utf8_lossy(&received)
    );
    assert_eq!(control.user_messages(&id), ["resets", "once"]);

    let seen = control.requests();
    let last = seen.last().expect("logged");
    assert_eq!(last.path, path);
    assert_eq!(last.status, None);
    assert_eq!(last.user.as_deref(), Some(DEMO_USER));

    // Over HTTP/2 the client sees an error, not a response.
    control.fail_next(SimRoute::SessionsList, vec![Fault::Reset]);
    let result = bed
        .try_send(
            Method::GET,
            "/api/managed-agents/sessions",
            &[("cookie", DEMO_COOKIE)],
            None,
        )
        .await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(control.cancelled(), 0);
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn hang_until_the_client_goes_away() {
    let bed = Bed::start(config()).await;
    let control = bed.sim.control();
    control.fail_next(SimRoute::SessionsList, vec![Fault::Hang]);
    let mut tls = raw_connect(&bed.sim).await;
    let request = format!(
        "GET /api/managed-agents/sessions HTTP/1.1\r\nHost: localhost\r\nCookie: {DEMO_COOKIE}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    tls.flush().await.expect("flush");
    wait_until("the request to be in flight", || control.in_flight() == 1).await;
    let mut byte = [0u8; 1];
    assert!(
        timeout(Duration::from_millis(100), tls.read(&mut byte))
            .await
            .is_err(),
        "no answer"
    );
    drop(tls);
    wait_until("the handler to be dropped", || control.in_flight() == 0).await;
    assert_eq!(control.cancelled(), 1);
    assert_eq!(control.requests()[0].status, None);
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_hung_requests() {
    let bed = Bed::start(config()).await;
    bed.sim
        .control()
        .fail_next(SimRoute::SessionsList, vec![Fault::ApplyThenHang]);
    let mut tls = raw_connect(&bed.sim).await;
    let request = format!(
        "GET /api/managed-agents/sessions HTTP/1.1\r\nHost: localhost\r\nCookie: {DEMO_COOKIE}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let control = bed.sim.control();
    wait_until("the request to be in flight", || control.in_flight() == 1).await;
    let addr = bed.sim.addr();
    let started = Instant::now();
    bed.sim.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(control.in_flight(), 0);
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

#[tokio::test]
async fn cookie_rotation_and_expiry() {
    let bed = Bed::start(config()).await;
    let control = bed.sim.control();
    let sessions = "/api/managed-agents/sessions";

    assert!(control.rotate_cookie(DEMO_USER, "rotated-0002"));
    let rotated = bed.get(sessions).await;
    assert_eq!(rotated.status, StatusCode::OK);
    assert_eq!(
        rotated.headers[SET_COOKIE],
        "knoq_session=rotated-0002; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=2592000"
    );
    assert_eq!(bed.get(sessions).await.status, StatusCode::UNAUTHORIZED);
    let new_cookie = [("cookie", "knoq_session=rotated-0002; theme=dark")];
    let fresh = bed.send(Method::GET, sessions, &new_cookie, None).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert!(!fresh.headers.contains_key(SET_COOKIE));

    assert!(control.set_cookie_header(DEMO_USER, "other=; Max-Age=0"));
    let removal = bed.send(Method::GET, sessions, &new_cookie, None).await;
    assert_eq!(removal.headers[SET_COOKIE], "other=; Max-Age=0");

    assert!(control.expire_cookie(DEMO_USER));
    let expired = bed.send(Method::GET, sessions, &new_cookie, None).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    control.set_cookie(DEMO_USER, "demo-cookie-0001");
    assert_eq!(bed.get(sessions).await.status, StatusCode::OK);
    assert!(!control.rotate_cookie("nobody", "x"));
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn scim_needs_the_plan_and_the_token() {
    let off = Bed::start(SimConfig::default()).await;
    let forbidden = off
        .send(
            Method::GET,
            "/api/scim/v2/Users",
            &[("authorization", "Bearer anything")],
            None,
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    off.sim.shutdown().await;

    let bed = Bed::start(config()).await;
    let bearer = format!("Bearer {SCIM_TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    let users = "/api/scim/v2/Users";
    assert_eq!(
        bed.send(Method::GET, users, &[], None).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        bed.send(
            Method::GET,
            users,
            &[("authorization", "Bearer wrong")],
            None
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );

    let created = bed
        .send(
            Method::POST,
            users,
            &auth,
            Some(json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": "ann@example.com",
                "name": { "givenName": "Ann" },
            })),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.json["active"], true);
    let id = created.json["id"].as_str().expect("id").to_string();
    assert!(created.headers.contains_key("location"));
    let duplicate = bed
        .send(
            Method::POST,
            users,
            &auth,
            Some(json!({ "userName": "ANN@example.com" })),
        )
        .await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);

    // The non-v2 form reaches the same directory.
    let fetched = bed
        .send(Method::GET, &format!("/api/scim/Users/{id}"), &auth, None)
        .await;
    assert_eq!(fetched.json["userName"], "ann@example.com");
    let filtered = bed
        .send(
            Method::GET,
            "/api/scim/v2/Users?filter=userName%20eq%20%22ann%40example.com%22",
            &auth,
            None,
        )
        .await;
    assert_eq!(filtered.json["totalResults"], 1);
    assert_eq!(
        filtered.json["schemas"][0],
        "urn:ietf:params:scim:api:messages:2.0:ListResponse"
    );

    let patched = bed
        .send(
            Method::PATCH,
            &format!("{users}/{id}"),
            &auth,
            Some(json!({
                "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                "Operations": [{ "op": "replace", "path": "active", "value": false }],
            })),
        )
        .await;
    assert_eq!(patched.json["active"], false);
    let groups = bed
        .send(Method::GET, "/api/scim/v2/Groups", &auth, None)
        .await;
    assert_eq!(groups.json["Resources"][0]["members"], json!([]));

    let replaced = bed
        .send(
            Method::PUT,
            &format!("{users}/{id}"),
            &auth,
            Some(json!({ "userName": "ann@example.org", "active": true })),
        )
        .await;
    assert_eq!(replaced.json["userName"], "ann@example.org");

    let deleted = bed
        .send(Method::DELETE, &format!("{users}/{id}"), &auth, None)
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = bed
        .send(Method::GET, &format!("{users}/{id}"), &auth, None)
        .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert!(!error_text(&gone).is_empty());
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn alpn_picks_http2_or_http1() {
    let h2 = Bed::start_with(config(), true).await;
    let answer = h2.get("/api/managed-agents/sessions").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.version, Version::HTTP_2);
    h2.sim.shutdown().await;

    let h1 = Bed::start_with(config(), false).await;
    let answer = h1.get("/api/managed-agents/sessions").await;
    assert_eq!(answer.version, Version::HTTP_11);
    h1.sim.shutdown().await;
}

#[tokio::test]
async fn plain_http_mode() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sim = SimKnoq::start(
        SimConfig {
            tls: SimTls::Plain,
            users: vec![SimUser::new("p", "knoq_session=plain")],
            ..config()
        },
        listener,
    )
    .await
    .expect("start");
    assert!(sim.base_url().starts_with("http://127.0.0.1:"));
    assert_eq!(sim.ca_pem(), None);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::get(format!("{}/api/managed-agents/sessions", sim.base_url()))
        .header(COOKIE, "knoq_session=plain")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client.request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    sim.shutdown().await;
}

#[tokio::test]
async fn http_control_interface() {
    let bed = Bed::start(config()).await;
    let set = bed
        .send(
            Method::POST,
            "/_sim/fail",
            &[],
            Some(
                json!({ "route": "sessions_list", "faults": [{ "status": 503, "retryAfter": 2 }] }),
            ),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let failed = bed.get("/api/managed-agents/sessions").await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.headers[RETRY_AFTER], "2");

    let log = bed.send(Method::GET, "/_sim/requests", &[], None).await;
    let text = String::from_utf8_lossy(&log.raw);
    assert!(!text.contains("demo-cookie-0001"), "{text}");
    assert_eq!(log.json["requests"].as_array().expect("requests").len(), 1);

    let rotate = bed
        .send(
            Method::POST,
            "/_sim/rotate",
            &[],
            Some(json!({ "user": DEMO_USER, "value": "via-http" })),
        )
        .await;
    assert_eq!(rotate.status, StatusCode::OK);
    let rotated = bed.get("/api/managed-agents/sessions").await;
    assert!(rotated.headers[SET_COOKIE]
        .to_str()
        .expect("ascii")
        .starts_with("knoq_session=via-http;"));

    let ca = bed.send(Method::GET, "/_sim/ca", &[], None).await;
    assert_eq!(ca.json["caPem"].as_str(), bed.sim.ca_pem().as_deref());
    let bad = bed
        .send(
            Method::POST,
            "/_sim/fail",
            &[],
            Some(json!({ "route": "nope", "faults": [] })),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    bed.sim.shutdown().await;
}

#[tokio::test]
async fn users_only_see_their_own_sessions() {
    let bed = Bed::start(SimConfig {
        users: vec![
            SimUser::new(DEMO_USER, DEMO_COOKIE),
            SimUser::new("bob", "knoq_session=bob-0001"),
        ],
        ..config()
    })
    .await;
    let id = bed.create_session("mine").await;
    let bob = [("cookie", "knoq_session=bob-0001"), ("origin", KNOQ_ORIGIN)];
    let listed = bed
        .send(Method::GET, "/api/managed-agents/sessions", &bob, None)
        .await;
    assert_eq!(listed.json, json!({ "sessions": [] }));
    let foreign = bed
        .send(
            Method::GET,
            &format!("/api/managed-agents/transcript?sessionId={id}"),
            &bob,
            None,
        )
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    let delete = bed
        .send(
            Method::DELETE,
            &format!("/api/managed-agents/session?sessionId={id}"),
            &bob,
            None,
        )
        .await;
    assert_eq!(delete.status, StatusCode::NOT_FOUND);
    assert_eq!(bed.sim.control().sessions(DEMO_USER).len(), 1);
    bed.sim.shutdown().await;
}
