//! An upstream that misbehaves cannot get broken framing, a protocol
//! switch or an obsolete cookie header through to a client. The upstream
//! here is a small raw HTTP/1.1 server on loopback that answers every
//! request with one canned reply.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Starts an HTTP/1.1 upstream that answers each request head on each
/// connection with what `answer` makes of it: a reply, and optionally the
/// same reply once more after a pause, unasked. Returns its base URL.
async fn scripted_upstream(
    answer: impl Fn(&str) -> (String, Option<Duration>) + Send + Sync + 'static,
) -> String {
    let answer = std::sync::Arc::new(answer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                loop {
                    // These requests have no body: one reply per head.
                    let end = loop {
                        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).to_string();
                    seen.drain(..end + 4);
                    let (reply, again) = answer(&head);
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    if let Some(pause) = again {
                        tokio::time::sleep(pause).await;
                        if s.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// An upstream that answers every request with one canned reply.
async fn lying_upstream(reply: &'static str) -> String {
    scripted_upstream(move |_| (reply.to_string(), None)).await
}

async fn bed_before(reply: &'static str) -> TestBed {
    bed_on(lying_upstream(reply).await).await
}

/// A bed whose gateway talks to `upstream` (plain HTTP), one attempt each.
async fn bed_on(upstream: String) -> TestBed {
    BedBuilder {
        upstream_url: Some(upstream),
        trust_sim: false,
        tail_toml: "[retry]\nattempts = 1\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await
}

#[tokio::test]
async fn a_length_and_a_chunked_body_together_are_a_502_not_a_truncated_200() {
    let bed = bed_before(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502, "{:?}", r.headers);
    assert_eq!(r.json()["code"], "upstream_bad_response");
    bed.shutdown().await;
}

#[tokio::test]
async fn lengths_that_disagree_are_a_502() {
    let bed =
        bed_before("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}").await;
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "upstream_bad_response");
    bed.shutdown().await;
}

#[tokio::test]
async fn an_unasked_protocol_switch_is_a_502_on_both_client_protocols() {
    let bed = bed_before(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    for c in [client(), h2c_client()] {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            send(
                &c,
                req(
                    "GET",
                    &bed.url(SESSIONS),
                    Some(bed.token("alice-svc")),
                    None,
                ),
            ),
        )
        .await
        .expect("an answer, not a hang");
        assert_eq!(r.status, 502);
        assert_eq!(r.json()["code"], "upstream_bad_response");
    }
    bed.shutdown().await;
}

#[tokio::test]
async fn set_cookie2_never_reaches_the_client() {
    let bed = bed_before(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie2: knoq_session=leak; Version=1\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 200);
    assert!(!r.headers.contains_key("set-cookie2"), "{:?}", r.headers);
    assert!(!String::from_utf8_lossy(&r.body).contains("leak"));
    bed.shutdown().await;
}

/// An HTTP/1.1 upstream that answers each request with an echo of its
/// `Cookie`, and then, 100 ms later, with the same answer once more,
/// unasked: whatever is sent next on that connection reads that answer.
async fn confused_upstream() -> String {
    scripted_upstream(|head| {
        let cookie = head
            .lines()
            .find_map(|l| l.strip_prefix("cookie: "))
            .unwrap_or("-");
        let body = format!(r#"{{"cookie":"{cookie}"}}"#);
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        (reply, Some(Duration::from_millis(100)))
    })
    .await
}

#[tokio::test]
async fn an_unsolicited_answer_on_a_reused_connection_never_reaches_another_account() {
    let bed = bed_on(confused_upstream().await).await;
    for _ in 0..5 {
        let a = bed.get(SESSIONS, "alice-svc").await;
        assert_eq!(a.status, 200);
        // At once, while alice's connection has an extra answer coming.
        let b = bed.get(SESSIONS, "bob-svc").await;
        let text = String::from_utf8_lossy(&b.body).to_string();
        assert!(!text.contains("alice"), "bob got alice's answer: {text}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    bed.shutdown().await;
}

#[tokio::test]
async fn an_answer_that_arrives_while_the_connection_is_idle_is_never_taken_for_the_next_one() {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let upstream = scripted_upstream(|_| {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let body = format!(r#"{{"seq":{n}}}"#);
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        (reply, Some(Duration::from_millis(50)))
    })
    .await;
    let bed = bed_on(upstream).await;
    for _ in 0..3 {
        let before = SEQ.load(std::sync::atomic::Ordering::SeqCst);
        let r = bed.get(SESSIONS, "alice-svc").await;
        assert_eq!(r.status, 200);
        let seq = r.json()["seq"].as_u64().unwrap() as usize;
        assert_eq!(
            seq,
            before + 1,
            "the answer to this request, not a stale one"
        );
        // Let the extra answer arrive while the connection sits idle.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    bed.shutdown().await;
}
