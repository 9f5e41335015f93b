//! An upstream that misbehaves cannot get broken framing, a protocol
//! switch or an obsolete cookie header through to a client. The upstream
//! here is a small raw HTTP/1.1 server on loopback that answers every
//! request with one canned reply.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Starts an upstream that answers every request on every connection with
/// `reply`, and returns its base URL.
async fn lying_upstream(reply: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // One reply per request head (these requests have no body).
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
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

async fn bed_before(reply: &'static str) -> TestBed {
    BedBuilder {
        upstream_url: Some(lying_upstream(reply).await),
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
