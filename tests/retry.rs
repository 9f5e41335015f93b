//! Retries, reconciliation, the budget and the circuit, driven through the
//! simulated Knoq's fault controls.

mod support;

use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The opening text of the sessions these tests open.
const OPENING: &str = "retry test";

/// Fast backoff so tests take milliseconds; other keys as given.
fn fast(extra_retry: &str) -> BedBuilder {
    BedBuilder {
        tail_toml: format!("[retry]\nbase_delay = \"10ms\"\nmax_delay = \"40ms\"\nreconcile_settle = \"200ms\"\n{extra_retry}"),
        ..TestBed::builder()
    }
}

fn attempts(r: &Reply) -> u32 {
    r.headers["x-knoq-gateway-attempts"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn post_message(
    bed: &TestBed,
    sid: &str,
    text: &str,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    req(
        "POST",
        &bed.url(MESSAGE),
        Some(bed.token("alice-svc")),
        Some(&message(sid, text)),
    )
}

fn messages_seen(bed: &TestBed) -> usize {
    bed.control
        .requests()
        .iter()
        .filter(|r| r.path == MESSAGE)
        .count()
}

#[tokio::test]
async fn two_502s_then_success_is_a_200_after_three_attempts() {
    let bed = fast("").start().await;
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::status(502), Fault::status(502)],
    );
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 200);
    assert_eq!(attempts(&r), 3);
    assert_eq!(bed.control.requests().len(), 3);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_persistent_502_ends_after_the_attempts_with_knoqs_own_answer() {
    let bed = fast("attempts = 3\n").start().await;
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::status(502); 5]);
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502);
    assert_eq!(attempts(&r), 3);
    assert!(r.json()["error"].is_string());
    assert!(r.json().get("code").is_none(), "Knoq's body, untouched");
    assert_eq!(bed.control.requests().len(), 3);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_503_retry_after_is_honoured_when_it_fits_the_deadline() {
    let bed = fast("").start().await;
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::status_retry_after(503, 1)],
    );
    let started = tokio::time::Instant::now();
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!((r.status.as_u16(), attempts(&r)), (200, 2));
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        started.elapsed()
    );
    bed.shutdown().await;

    // A Retry-After beyond the deadline: Knoq's 503 goes back as it is.
    let bed = bed_with_deadline("1s").start().await;
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::status_retry_after(503, 5)],
    );
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!((r.status.as_u16(), attempts(&r)), (503, 1));
    assert_eq!(r.headers["retry-after"], "5");
    bed.shutdown().await;
}

fn bed_with_deadline(deadline: &str) -> BedBuilder {
    fast(&format!("deadline = \"{deadline}\"\n"))
}

#[tokio::test]
async fn a_message_knoq_recorded_before_the_reset_is_reconciled_not_resent() {
    let bed = fast("").start().await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::ApplyThenReset]);
    let r = send(&client(), post_message(&bed, &sid, "did this arrive?")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), serde_json::json!({"ok": true}));
    assert_eq!(r.headers["x-knoq-gateway-reconciled"], "true");
    assert_eq!(attempts(&r), 1);
    let copies = bed
        .control
        .user_messages(&sid)
        .iter()
        .filter(|t| *t == "did this arrive?")
        .count();
    assert_eq!(copies, 1);
    assert_eq!(messages_seen(&bed), 1, "never sent twice");
    bed.shutdown().await;
}

#[tokio::test]
async fn a_message_knoq_never_recorded_is_outcome_unknown_and_sent_once() {
    let bed = fast("").start().await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::Reset]);
    let r = send(&client(), post_message(&bed, &sid, "lost?")).await;
    assert_eq!(r.status, 502);
    let j = r.json();
    assert_eq!(j["code"], "outcome_unknown");
    assert!(j["checked"].as_str().unwrap().contains("transcript"));
    assert_eq!(j["attempts"], 1);
    assert_eq!(messages_seen(&bed), 1);
    assert!(!bed
        .control
        .user_messages(&sid)
        .contains(&"lost?".to_string()));
    bed.shutdown().await;
}

#[tokio::test]
async fn resend_unconfirmed_resends_once_and_knoq_holds_one_copy() {
    let bed = fast("resend_unconfirmed = true\n").start().await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::Reset]);
    let r = send(&client(), post_message(&bed, &sid, "again")).await;
    assert_eq!((r.status.as_u16(), attempts(&r)), (200, 2));
    assert_eq!(messages_seen(&bed), 2);
    let copies = bed
        .control
        .user_messages(&sid)
        .iter()
        .filter(|t| *t == "again")
        .count();
    assert_eq!(copies, 1);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_timeout_never_yields_a_second_copy() {
    let bed = BedBuilder {
        upstream_toml: "timeout = \"400ms\"\n".into(),
        ..fast("")
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    // Applied, then no answer: reconciled.
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::ApplyThenHang]);
    let r = send(&client(), post_message(&bed, &sid, "slow one")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-knoq-gateway-reconciled"], "true");
    // Not applied, no answer: 504 outcome_unknown, sent once.
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::Hang]);
    let r = send(&client(), post_message(&bed, &sid, "never")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["code"], "outcome_unknown");
    assert_eq!(messages_seen(&bed), 2);
    let msgs = bed.control.user_messages(&sid);
    assert_eq!(msgs.iter().filter(|t| *t == "slow one").count(), 1);
    assert!(!msgs.contains(&"never".to_string()));
    bed.shutdown().await;
}

#[tokio::test]
async fn a_session_created_before_the_reset_is_reconciled_with_its_ids() {
    let bed = fast("").start().await;
    bed.control
        .fail_next(SimRoute::SessionCreate, vec![Fault::ApplyThenReset]);
    let r = bed
        .post(
            SESSION,
            "alice-svc",
            r#"{"text":"A long opening message that is certainly longer than sixty characters"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-knoq-gateway-reconciled"], "true");
    let sessions = bed.control.sessions("alice");
    assert_eq!(sessions.len(), 1);
    assert_eq!(r.json()["id"], sessions[0].id.as_str());
    assert_eq!(r.json()["runId"], sessions[0].run_id.as_str());
    bed.shutdown().await;
}

#[tokio::test]
async fn reads_are_retried_after_a_reset_and_connect_refused_is_reported() {
    let bed = fast("").start().await;
    bed.control
        .fail_next(SimRoute::Transcript, vec![Fault::Reset]);
    let r = bed
        .get("/api/managed-agents/transcript?sessionId=nope", "alice-svc")
        .await;
    assert_eq!((r.status.as_u16(), attempts(&r)), (404, 2));
    bed.shutdown().await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let bed = BedBuilder {
        upstream_url: Some(format!("https://127.0.0.1:{port}")),
        ..fast("")
    }
    .start()
    .await;
    let r = bed.post(SESSION, "alice-svc", r#"{"text":"x"}"#).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        (r.json()["code"].as_str(), r.json()["attempts"].as_u64()),
        (Some("upstream_unreachable"), Some(4))
    );
    assert_eq!(attempts(&r), 4);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_during_backoff_stops_the_retries() {
    let bed = TestBed::start().await;
    // A fixed one-second wait (Knoq's Retry-After), so the disconnect
    // surely lands inside it.
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::status_retry_after(503, 1); 4],
    );
    let mut s = TcpStream::connect(bed.addr).await.unwrap();
    let get = format!(
        "GET {SESSIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\r\n",
        bed.token("alice-svc")
    );
    s.write_all(get.as_bytes()).await.unwrap();
    let control = bed.control.clone();
    eventually(
        "the first attempt reached Knoq",
        Duration::from_secs(5),
        || {
            let c = control.clone();
            async move { c.requests().len() == 1 }
        },
    )
    .await;
    drop(s);
    // Wait past the retry time: no second attempt may come.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(bed.control.requests().len(), 1);
    bed.shutdown().await;
}

#[tokio::test]
async fn each_retry_consumes_quota_and_a_spent_quota_stops_retrying() {
    let bed = BedBuilder {
        tail_toml: "[quotas]\nmessage = [\"2/hour\"]\n[retry]\nbase_delay = \"10ms\"\nmax_delay = \"40ms\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::status(502); 4]);
    let r = send(&client(), post_message(&bed, &sid, "q")).await;
    // Attempt 1 and its retry use both slots; the next retry is not charged.
    assert_eq!((r.status.as_u16(), attempts(&r)), (502, 2));
    assert_eq!(messages_seen(&bed), 2);
    let r = send(&client(), post_message(&bed, &sid, "q2")).await;
    assert_eq!(r.status, 429);
    bed.shutdown().await;
}

/// Knoq fails for everyone: retries stay within the budget, the circuit
/// opens and requests fail fast, and one probe closes it once Knoq is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_and_circuit_under_a_total_failure_phase() {
    let bed = BedBuilder {
        tail_toml:
            "[retry]\nbase_delay = \"5ms\"\nmax_delay = \"20ms\"\nbudget = 0.2\nbudget_floor = 5\n\
                    [circuit]\nfailures = 1000\nopen_for = \"1s\"\n"
                .into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::status(502); 2000]);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (c, url, t) = (
            client(),
            bed.url(SESSIONS),
            bed.token("alice-svc").to_string(),
        );
        tasks.push(tokio::spawn(async move {
            send(&c, req("GET", &url, Some(&t), None)).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 502);
    }
    let upstream = bed.control.requests().len() as f64;
    assert!(
        upstream <= 1.2 * 100.0 + 5.0,
        "{upstream} upstream attempts for 100 requests"
    );
    assert!(upstream >= 100.0);
    bed.shutdown().await;

    // The circuit: 5 consecutive failures open it for a second.
    let bed = BedBuilder {
        tail_toml: "[retry]\nattempts = 1\n[circuit]\nfailures = 5\nopen_for = \"1s\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::status(503); 5]);
    let c = client();
    let get = || {
        req(
            "GET",
            &bed.url(SESSIONS),
            Some(bed.token("alice-svc")),
            None,
        )
    };
    for _ in 0..5 {
        assert_eq!(send(&c, get()).await.status, 503);
    }
    let fast = send(&c, get()).await;
    assert_eq!(fast.status, 503);
    assert_eq!(fast.json()["code"], "upstream_unavailable");
    assert_eq!(fast.headers["retry-after"], "1");
    assert_eq!(bed.control.requests().len(), 5, "failed fast, not sent");
    // After open_for, one probe goes through; its success closes the circuit.
    eventually(
        "the circuit half-opens and the probe succeeds",
        Duration::from_secs(5),
        || {
            let c = c.clone();
            let r = get();
            async move { send(&c, r).await.status == 200 }
        },
    )
    .await;
    assert_eq!(send(&c, get()).await.status, 200);
    bed.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_starts_no_new_retry() {
    let mut bed = BedBuilder {
        ..TestBed::builder()
    }
    .start()
    .await;
    // Knoq asks for a 20 s wait; shutdown comes during it.
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::status_retry_after(503, 20)],
    );
    let (c, url, t) = (
        client(),
        bed.url(SESSIONS),
        bed.token("alice-svc").to_string(),
    );
    let pending = tokio::spawn(async move { send(&c, req("GET", &url, Some(&t), None)).await });
    let control = bed.control.clone();
    eventually(
        "the first attempt reached Knoq",
        Duration::from_secs(5),
        || {
            let c = control.clone();
            async move { c.requests().len() == 1 }
        },
    )
    .await;
    let stopping = bed.begin_stop();
    let r = pending.await.unwrap();
    assert_eq!(
        (r.status.as_u16(), attempts(&r)),
        (503, 1),
        "Knoq's last answer, no retry"
    );
    stopping.await.unwrap();
    assert_eq!(bed.control.requests().len(), 1);
    bed.shutdown().await;
}

#[tokio::test]
async fn an_earlier_identical_message_does_not_pass_for_a_lost_one() {
    let bed = fast("").start().await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    let r = send(&client(), post_message(&bed, &sid, "yes")).await;
    assert_eq!(r.status, 200);
    // The same text again, lost before Knoq recorded it.
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::Reset]);
    let r = send(&client(), post_message(&bed, &sid, "yes")).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.json()["code"], "outcome_unknown");
    // And when Knoq did record it, the second copy is found.
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::ApplyThenReset]);
    let r = send(&client(), post_message(&bed, &sid, "yes")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.headers["x-knoq-gateway-reconciled"], "true");
    bed.shutdown().await;
}

#[tokio::test]
async fn sessions_sharing_a_title_are_not_mistaken_for_each_other() {
    let bed = fast("").start().await;
    let prefix = "A".repeat(60);
    let create = |suffix: &str| {
        let body = format!(r#"{{"text":"{prefix}: report {suffix}"}}"#);
        req(
            "POST",
            &bed.url(SESSION),
            Some(bed.token("alice-svc")),
            Some(&body),
        )
    };
    let first = send(&client(), create("A")).await;
    assert_eq!(first.status, 200);
    let report_a = first.json()["id"].as_str().unwrap().to_string();
    bed.control
        .fail_next(SimRoute::SessionCreate, vec![Fault::Reset]);
    let r = send(&client(), create("B")).await;
    assert_eq!(
        r.status, 502,
        "report A's session must not be handed back: {:?}",
        r.body
    );
    assert_eq!(r.json()["code"], "outcome_unknown");
    bed.control
        .fail_next(SimRoute::SessionCreate, vec![Fault::ApplyThenReset]);
    let r = send(&client(), create("C")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let found = r.json()["id"].as_str().unwrap().to_string();
    assert_ne!(found, report_a);
    let ids: Vec<String> = bed
        .control
        .sessions("alice")
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&found) && ids.contains(&report_a));
    bed.shutdown().await;
}

#[tokio::test]
async fn resend_unconfirmed_never_exceeds_the_attempts() {
    let bed = fast("attempts = 2\nresend_unconfirmed = true\n")
        .start()
        .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control.fail_next(
        SimRoute::MessageSend,
        vec![Fault::status(502), Fault::Reset],
    );
    let r = send(&client(), post_message(&bed, &sid, "bounded")).await;
    assert_eq!(messages_seen(&bed), 2);
    assert_eq!(r.status, 502);
    assert_eq!(
        r.json()["code"],
        "outcome_unknown",
        "the maybe-sent answer is kept"
    );
    assert_eq!(attempts(&r), 2);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_request_refused_by_the_open_circuit_consumes_no_quota() {
    let bed = BedBuilder {
        tail_toml: "[quotas]\nmessage = [\"2/hour\"]\n[retry]\nattempts = 1\n[circuit]\nfailures = 1\nopen_for = \"1s\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let sid = bed.open_session("alice-svc", OPENING).await;
    bed.control
        .fail_next(SimRoute::MessageSend, vec![Fault::status(503)]);
    assert_eq!(
        send(&client(), post_message(&bed, &sid, "a")).await.status,
        503
    );
    let fast_fail = send(&client(), post_message(&bed, &sid, "b")).await;
    assert_eq!(fast_fail.json()["code"], "upstream_unavailable");
    // Once the circuit lets requests through, one slot is still left.
    let c = client();
    eventually("the circuit closes again", Duration::from_secs(5), || {
        let (c, r) = (c.clone(), post_message(&bed, &sid, "c"));
        async move { send(&c, r).await.status == 200 }
    })
    .await;
    bed.shutdown().await;
}
