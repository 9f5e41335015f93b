//! A client that stops reading cannot hold its connection, its slot or the
//! gateway's memory: after `server.send_timeout` without taking anything
//! of a response, the connection is closed, over HTTP/1.1 (a socket that
//! accepts no byte) and HTTP/2 (a stream window that stays shut).

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;

async fn bed_with_send_timeout() -> TestBed {
    BedBuilder {
        server_toml: "send_timeout = \"1s\"\nmax_body = \"2MiB\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await
}

#[tokio::test]
async fn an_http1_client_that_never_reads_a_large_answer_is_closed_after_the_send_timeout() {
    let bed = bed_with_send_timeout().await;
    let sid = big_session(&bed).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(bed.addr).await.unwrap();
    let get = format!(
        "GET /api/managed-agents/transcript?sessionId={sid} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
        bed.token("alice-svc")
    );
    s.write_all(get.as_bytes()).await.unwrap();
    let control = bed.control.clone();
    eventually(
        "Knoq has answered the transcript",
        Duration::from_secs(10),
        || {
            let control = control.clone();
            async move {
                control
                    .requests()
                    .iter()
                    .any(|r| r.path.ends_with("/transcript") && r.status == Some(200))
            }
        },
    )
    .await;
    // The socket stays open and unread: the gateway must let go.
    eventually(
        "the stalled connection is closed by the gateway",
        Duration::from_secs(15),
        || async { metric(bed.admin, "knoq_gateway_open_connections").await == Some(0.0) },
    )
    .await;
    drop(s);
    bed.shutdown().await;
}

/// A session whose transcript is a few MiB: far more than any socket or
/// stream buffer holds.
async fn big_session(bed: &TestBed) -> String {
    let big = format!(r#"{{"text":"{}"}}"#, "b".repeat(900_000));
    let r = bed.post(SESSION, "alice-svc", &big).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let sid = r.json()["id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        let m = format!(
            r#"{{"sessionId":"{sid}","text":"{}"}}"#,
            "m".repeat(900_000)
        );
        assert_eq!(bed.post(MESSAGE, "alice-svc", &m).await.status, 200);
    }
    sid
}

/// Opens an h2c connection whose every stream window is shut (the client
/// never grants the gateway room to send DATA), sends `paths` on it and
/// waits for each response head; the connection keeps being driven, so
/// PINGs are answered, as the attacker's were.
/// Returns the connection's driver and what must stay alive for the
/// connection to stay open on the client's side (its handle and streams).
async fn shut_window_client(
    bed: &TestBed,
    paths: &[String],
) -> (tokio::task::JoinHandle<Result<(), h2::Error>>, impl Sized) {
    let tcp = tokio::net::TcpStream::connect(bed.addr).await.unwrap();
    let (mut h2, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut responses = Vec::new();
    for path in paths {
        let req = http::Request::get(format!("http://127.0.0.1{path}"))
            .header(
                "authorization",
                format!("Bearer {}", bed.token("alice-svc")),
            )
            .body(())
            .unwrap();
        h2 = h2.ready().await.unwrap();
        let (rsp, _) = h2.send_request(req, true).unwrap();
        responses.push(rsp);
    }
    let mut bodies = Vec::new();
    for rsp in responses {
        let head = rsp.await.unwrap();
        assert_eq!(head.status(), 200, "the heads arrive; the bodies cannot");
        bodies.push(head.into_body());
    }
    (driver, (h2, bodies))
}

/// Sends `paths` on a shut-window connection and sees the gateway close it.
async fn shut_window_connection_is_closed(bed: &TestBed, paths: &[String]) {
    let (driver, _held) = shut_window_client(bed, paths).await;
    eventually(
        "the connection with shut windows is closed by the gateway",
        Duration::from_secs(15),
        || async { metric(bed.admin, "knoq_gateway_open_connections").await == Some(0.0) },
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(ended.is_ok(), "the client saw its connection end");
}

#[tokio::test]
async fn an_http2_client_with_a_shut_window_is_closed_after_the_send_timeout() {
    let bed = bed_with_send_timeout().await;
    let sid = big_session(&bed).await;
    let paths = vec![format!("/api/managed-agents/transcript?sessionId={sid}"); 3];
    shut_window_connection_is_closed(&bed, &paths).await;
    bed.shutdown().await;
}

#[tokio::test]
async fn small_answers_behind_a_shut_window_are_abandoned_too() {
    // Twenty small answers, each far below any buffer: the window is what
    // holds them, so the send timeout applies as to a large one.
    let bed = bed_with_send_timeout().await;
    shut_window_connection_is_closed(&bed, &vec![SESSIONS.to_string(); 20]).await;
    bed.shutdown().await;
}
