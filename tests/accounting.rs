//! Every request and every cookie rotation is accounted for, whichever
//! path it took: a request its client abandons still gets its log line and
//! its `knoq_gateway_requests_total` sample (status 499) and leaves the
//! in-flight gauge; a rotation Knoq sends to a resend after a stale cookie,
//! or to a keep-alive probe, counts like any other.

mod support;

use std::process::Stdio;
use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;
use tokio::io::AsyncWriteExt;

/// A gateway process of the bed's config, with `edit` applied to its text,
/// logging to a file it returns the path of.
async fn process(
    bed: &TestBed,
    name: &str,
    edit: impl Fn(String) -> String,
) -> (Process, Running, std::path::PathBuf) {
    let gw = bed.process_config(&format!("{name}.toml"), Some(&format!("state-{name}")));
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, edit(text)).unwrap();
    let log = bed.dir.0.join(format!("{name}.log"));
    let child = gw.run(Stdio::from(std::fs::File::create(&log).unwrap()));
    gw.wait_healthy(&client()).await;
    (gw, child, log)
}

#[tokio::test]
async fn an_abandoned_request_leaves_the_inflight_gauge_and_is_logged_and_counted_as_499() {
    let bed = TestBed::start().await;
    let (gw, child, log) = process(&bed, "abandon", |t| t).await;
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::Hang]);
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let head = format!(
        "GET /api/managed-agents/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {}\r\n\r\n",
        bed.token("alice-svc")
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let control = bed.control.clone();
    eventually("Knoq holds the request", Duration::from_secs(10), || {
        let control = control.clone();
        async move { control.in_flight() == 1 }
    })
    .await;
    assert_eq!(
        metric(gw.admin, "knoq_gateway_inflight_requests").await,
        Some(1.0),
        "counted while it waits on Knoq"
    );
    drop(s);
    let sample = r#"knoq_gateway_requests_total{code="499",method="GET",route="sessions_list",token="alice-svc",user="alice"}"#;
    eventually(
        "the abandoned request is counted and leaves the gauge",
        Duration::from_secs(10),
        || async {
            metric(gw.admin, "knoq_gateway_inflight_requests").await == Some(0.0)
                && metric(gw.admin, sample).await == Some(1.0)
        },
    )
    .await;
    child.kill();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" request ") || l.ends_with(" request"))
        .filter(|l| l.contains(r#"route="sessions_list""#))
        .collect();
    assert_eq!(lines.len(), 1, "one request line for it: {text}");
    assert!(lines[0].contains("status=499"), "{}", lines[0]);
    assert!(lines[0].contains(r#"token="alice-svc""#), "{}", lines[0]);
}

#[tokio::test]
async fn a_rotation_on_the_resend_after_a_stale_cookie_is_counted() {
    let bed = TestBed::start().await;
    let c = client();
    let t = bed.token("alice-svc").to_string();
    // The first request waits at Knoq's door (before its cookie is
    // checked) while a second one rotates the cookie.
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::Delay(Duration::from_millis(800))],
    );
    let slow = {
        let (c, url, t) = (
            c.clone(),
            bed.url("/api/managed-agents/sessions"),
            t.clone(),
        );
        tokio::spawn(async move { send(&c, req("GET", &url, Some(&t), None)).await })
    };
    let control = bed.control.clone();
    eventually(
        "the first request waits at Knoq",
        Duration::from_secs(10),
        || {
            let control = control.clone();
            async move { control.in_flight() == 1 }
        },
    )
    .await;
    assert!(bed.control.rotate_cookie("alice", "alice-rotated-1"));
    let r = bed.get("/api/managed-agents/sessions", "alice-svc").await;
    assert_eq!(
        r.status, 200,
        "Knoq answered (and rotated) the second request"
    );
    // The next rotation rides on the resend of the first request: its
    // old cookie gets 401, the gateway sends it again with the new one.
    assert!(bed.control.rotate_cookie("alice", "alice-rotated-2"));
    let r = slow.await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["x-knoq-gateway-attempts"], "2");
    let seen: Vec<String> = bed
        .control
        .requests()
        .iter()
        .filter_map(|r| r.headers.get("cookie")?.to_str().ok().map(str::to_string))
        .collect();
    assert!(
        seen.iter().any(|c| c.contains("alice-rotated-1")),
        "the resend carried the rotated cookie: {seen:?}"
    );
    let rotations = r#"knoq_gateway_cookie_rotations_total{user="alice"}"#;
    assert_eq!(metric(bed.admin, rotations).await, Some(2.0));
}

#[tokio::test]
async fn a_rotation_seen_by_a_keep_alive_probe_is_counted() {
    let bed = TestBed::start().await;
    let (gw, child, _log) = process(&bed, "probe", |t| {
        t.replace(
            "cookie_file = \"alice.cookie\"\n",
            "cookie_file = \"alice.cookie\"\nprobe = \"1s\"\n",
        )
    })
    .await;
    assert!(bed.control.rotate_cookie("alice", "alice-probed-1"));
    let rotations = r#"knoq_gateway_cookie_rotations_total{user="alice"}"#;
    eventually(
        "the probe's rotation is counted",
        Duration::from_secs(15),
        || async { metric(gw.admin, rotations).await == Some(1.0) },
    )
    .await;
    // The probe went to Knoq as alice: no tool sent anything.
    assert!(bed.control.requests().iter().any(|r| {
        r.path == "/api/managed-agents/sessions" && r.user.as_deref() == Some("alice")
    }));
    child.kill();
}
