//! Overload is refused at once, with a JSON 503 that blames no one but
//! the gateway, and never spills onto another account or opens the
//! circuit: past `server.max_inflight_per_user` an account's further
//! requests get `gateway_overloaded` while other accounts are served, and
//! past `server.max_inflight` everyone's do.

mod support;

use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;
use tokio::io::AsyncWriteExt;

/// Opens a transcript request that Knoq holds, on its own connection.
async fn held(bed: &TestBed, token: &str, n: usize) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(bed.addr).await.unwrap();
    let get = format!(
        "GET /api/managed-agents/transcript?sessionId=held{n} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
        bed.token(token)
    );
    s.write_all(get.as_bytes()).await.unwrap();
    s
}

async fn wait_in_flight(bed: &TestBed, n: usize) {
    let control = bed.control.clone();
    eventually("Knoq holds the requests", Duration::from_secs(10), || {
        let control = control.clone();
        async move { control.in_flight() == n }
    })
    .await;
}

#[tokio::test]
async fn one_accounts_burst_is_refused_at_once_while_others_are_served_and_the_circuit_stays_closed(
) {
    let bed = BedBuilder {
        server_toml: "max_inflight = 4\nmax_inflight_per_user = 3\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    bed.control
        .fail_next(SimRoute::Transcript, vec![Fault::Hang; 4]);
    let mut holding = Vec::new();
    for n in 0..3 {
        holding.push(held(&bed, "alice-svc", n).await);
    }
    wait_in_flight(&bed, 3).await;

    // Alice's next request, by any of her tokens: refused at once.
    let started = std::time::Instant::now();
    let r = bed.get(SESSIONS, "alice-batch").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "gateway_overloaded");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    // Bob is served meanwhile.
    let r = bed.get(SESSIONS, "bob-svc").await;
    assert_eq!(r.status, 200);

    // The gateway-wide cap: one more of Bob's held makes four in flight.
    holding.push(held(&bed, "bob-svc", 3).await);
    wait_in_flight(&bed, 4).await;
    let r = bed.get(SESSIONS, "bob-svc").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["code"], "gateway_overloaded");
    let seen = bed.control.requests().len();
    assert_eq!(seen, 5, "refused requests never reached Knoq");

    let metrics = String::from_utf8(bed.scrape().await.body.to_vec()).unwrap();
    assert!(
        metrics.lines().any(|l| l == "knoq_gateway_circuit_open 0"),
        "overload is not Knoq's failure"
    );
    // Places free as requests end.
    drop(holding);
    wait_in_flight(&bed, 0).await;
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while bed.get(SESSIONS, "alice-svc").await.status != 200 {
        assert!(tokio::time::Instant::now() < end, "places never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bed.shutdown().await;
}

#[tokio::test]
async fn requests_past_upstream_max_streams_wait_briefly_then_get_503_never_blamed_on_knoq() {
    let bed = BedBuilder {
        upstream_toml: "max_streams = 2\nmax_connections = 1\nqueue_timeout = \"300ms\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", "overload").await;
    bed.control
        .fail_next(SimRoute::Transcript, vec![Fault::Hang; 2]);
    let a = held(&bed, "alice-svc", 0).await;
    let b = held(&bed, "bob-svc", 1).await;
    wait_in_flight(&bed, 2).await;
    let before = bed.control.requests().len();

    // A read: refused after the queue timeout, nothing sent.
    let started = std::time::Instant::now();
    let r = bed.get(SESSIONS, "bob-svc").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "gateway_overloaded");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // A message: the same, and never "outcome unknown", since it was
    // never sent.
    let r = bed
        .post(MESSAGE, "alice-svc", &message(&sid, "queued"))
        .await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "gateway_overloaded");
    assert!(
        r.headers.get("x-knoq-gateway-attempts").is_none(),
        "no attempt was made"
    );
    assert_eq!(bed.control.requests().len(), before, "nothing reached Knoq");
    assert!(bed
        .control
        .user_messages(&sid)
        .iter()
        .all(|m| m != "queued"));
    let metrics = String::from_utf8(bed.scrape().await.body.to_vec()).unwrap();
    assert!(metrics.lines().any(|l| l == "knoq_gateway_circuit_open 0"));
    drop((a, b));
    bed.shutdown().await;
}

/// A TCP relay in front of Knoq that counts the connections made through
/// it: how many upstream connections the gateway opened.
/// Its target is set once the bed (and its simulator) has started.
async fn counting_relay(
    to: std::sync::Arc<std::sync::OnceLock<String>>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = opened.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let to = to.get().cloned();
            tokio::spawn(async move {
                let Some(to) = to else { return };
                let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (format!("https://{addr}"), opened)
}

#[tokio::test]
async fn a_full_upstream_connection_makes_the_gateway_open_another_up_to_its_bound() {
    let target = std::sync::Arc::new(std::sync::OnceLock::new());
    let (relay, opened) = counting_relay(target.clone()).await;
    let bed = BedBuilder {
        upstream_url: Some(relay),
        upstream_toml: "max_streams = 2\nmax_connections = 3\nqueue_timeout = \"300ms\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    // The gateway connects on its first request: point the relay at the
    // bed's simulator now.
    let sim = bed.sim.as_ref().unwrap().base_url();
    let sim = sim
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    target.set(sim).unwrap();
    bed.control
        .fail_next(SimRoute::Transcript, vec![Fault::Hang; 6]);
    let opened_now = || opened.load(std::sync::atomic::Ordering::SeqCst);
    let mut holding = Vec::new();
    for (n, expect) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)] {
        holding.push(held(&bed, "alice-svc", n).await);
        wait_in_flight(&bed, n).await;
        assert_eq!(opened_now(), expect, "after {n} held requests");
    }
    // Six places in all (2 streams x 3 connections): the next one waits,
    // then is refused, and no fourth connection opens.
    let r = bed.get(SESSIONS, "bob-svc").await;
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "gateway_overloaded");
    assert_eq!(opened_now(), 3);
    drop(holding);
    bed.shutdown().await;
}
