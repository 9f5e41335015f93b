//! Hot reload: config file changes and SIGHUP take effect without a restart
//! or a dropped request; a bad file changes nothing.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;

/// Rewrites the bed's config file (as an operator would).
fn rewrite(bed: &TestBed, text: &str) {
    std::fs::write(config_path(bed), text).unwrap();
}

/// The bed's config without the `[[tokens]]` entry named `name`.
fn without_token(text: &str, name: &str) -> String {
    let mut out = String::new();
    for block in text.split("[[tokens]]") {
        if block.contains(&format!("name = \"{name}\"")) {
            continue;
        }
        if !out.is_empty() {
            out.push_str("[[tokens]]");
        }
        out.push_str(block);
    }
    out
}

#[tokio::test]
async fn a_removed_token_is_refused_after_reload_while_its_request_in_flight_completes() {
    let bed = TestBed::start().await;
    let c = client();
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::Delay(Duration::from_millis(1500))],
    );
    let slow = {
        let (c, url, t) = (
            c.clone(),
            bed.url(SESSIONS),
            bed.token("alice-batch").to_string(),
        );
        tokio::spawn(async move { send(&c, req("GET", &url, Some(&t), None)).await })
    };
    let control = bed.control.clone();
    eventually(
        "the slow request reached Knoq",
        Duration::from_secs(5),
        || {
            let c = control.clone();
            async move { c.in_flight() == 1 }
        },
    )
    .await;
    rewrite(&bed, &without_token(&bed.config_text, "alice-batch"));
    eventually(
        "the removed token is refused",
        Duration::from_secs(5),
        || {
            let (c, r) = (
                c.clone(),
                req(
                    "GET",
                    &bed.url("/api/managed-agents/transcript?sessionId=x"),
                    Some(bed.token("alice-batch")),
                    None,
                ),
            );
            async move { send(&c, r).await.status == 401 }
        },
    )
    .await;
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the request it started still completed"
    );
    assert_eq!(bed.get(SESSIONS, "alice-svc").await.status, 200);
    bed.shutdown().await;
}

#[tokio::test]
async fn an_invalid_config_is_rejected_whole_and_reported_by_readyz() {
    let bed = TestBed::start().await;
    let c = client();
    let broken = bed
        .config_text
        .replace("[admin]", "[server.oops]\nfoo = 1\n[admin]");
    rewrite(&bed, &format!("{broken}\n[quotas]\nmessage = [\"lots\"]\n"));
    let ready_url = format!("http://{}/readyz", bed.admin);
    eventually(
        "readyz reports the failed reload",
        Duration::from_secs(5),
        || {
            let (c, r) = (c.clone(), req("GET", &ready_url, None, None));
            async move { send(&c, r).await.json()["reload"]["ok"] == false }
        },
    )
    .await;
    let ready = send(&c, req("GET", &ready_url, None, None)).await;
    assert!(
        ready.json()["reload"]["error"]
            .as_str()
            .unwrap()
            .contains("config"),
        "{:?}",
        ready.body
    );
    // The old configuration is still in force.
    assert_eq!(bed.get(SESSIONS, "alice-svc").await.status, 200);
    // Fixing the file clears the report.
    rewrite(&bed, &bed.config_text);
    eventually("the fixed config is loaded", Duration::from_secs(5), || {
        let (c, r) = (c.clone(), req("GET", &ready_url, None, None));
        async move { send(&c, r).await.json()["reload"]["ok"] == true }
    })
    .await;
    bed.shutdown().await;
}

#[tokio::test]
async fn quota_state_survives_a_reload_for_users_that_still_exist() {
    let bed = BedBuilder {
        tail_toml: "[quotas]\nread = [\"2/hour\"]\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(bed.get(SESSIONS, "alice-svc").await.status, 200);
    }
    // A reload that changes something else (a new limit for cancels).
    let text = bed.config_text.replace(
        "read = [\"2/hour\"]",
        "read = [\"2/hour\"]\ncancel = [\"5/min\"]",
    );
    rewrite(&bed, &text);
    let ready_url = format!("http://{}/readyz", bed.admin);
    // Wait for the reload to land: the new cancel limit shows in headers.
    eventually("the reload landed", Duration::from_secs(5), || {
        let (c, r) = (
            c.clone(),
            req(
                "POST",
                &bed.url("/api/managed-agents/cancel"),
                Some(bed.token("bob-svc")),
                Some(r#"{"sessionId":"x"}"#),
            ),
        );
        async move {
            send(&c, r)
                .await
                .headers
                .get("ratelimit-policy")
                .is_some_and(|v| v.to_str().unwrap().contains("q=5"))
        }
    })
    .await;
    let r = bed.get(SESSIONS, "alice-batch").await;
    assert_eq!(r.status, 429, "alice's consumed reads were kept");
    assert_eq!(
        send(&c, req("GET", &ready_url, None, None)).await.status,
        200
    );
    bed.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_and_does_not_stop_the_process() {
    let bed = TestBed::start().await;
    let gw = bed.process_config("hup.toml", None);
    let (config, text) = (
        gw.config.clone(),
        std::fs::read_to_string(&gw.config).unwrap(),
    );
    let mut child = gw.spawn(Stdio::piped());
    let c = client();
    gw.wait_healthy(&c).await;
    let url = format!("http://{}{SESSIONS}", gw.proxy);
    assert_eq!(
        send(&c, req("GET", &url, Some(bed.token("bob-svc")), None))
            .await
            .status,
        200
    );
    // Remove bob's token, then SIGHUP.
    std::fs::write(&config, without_token(&text, "bob-svc")).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status();
    eventually(
        "bob's token is refused after the reload",
        Duration::from_secs(5),
        || {
            let (c, r) = (
                c.clone(),
                req("GET", &url, Some(bed.token("bob-svc")), None),
            );
            async move { send(&c, r).await.status == 401 }
        },
    )
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the gateway"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("configuration reloaded"));
    bed.shutdown().await;
}

#[tokio::test]
async fn new_contents_of_the_ca_file_are_trusted_after_a_reload() {
    let mut bed = TestBed::start().await;
    assert_eq!(bed.get(SESSIONS, "alice-svc").await.status, 200);
    // Knoq restarts on the same address with a new certificate, from a
    // new CA: the gateway cannot trust it yet.
    let sim = bed.sim.take().unwrap();
    let addr = sim.addr();
    sim.shutdown().await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let new_sim = knoq_sim::SimKnoq::start(sim_config(), listener)
        .await
        .unwrap();
    let r = bed.get(SESSIONS, "alice-svc").await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "upstream_tls");
    // The operator puts the new CA in the same file and touches the
    // config: [upstream] is unchanged, but the file's contents are not.
    std::fs::write(bed.dir.0.join("knoq-ca.pem"), new_sim.ca_pem().unwrap()).unwrap();
    rewrite(&bed, &format!("{}\n# ca rotated\n", bed.config_text));
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = bed.get(SESSIONS, "alice-svc").await.status;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the new CA was never trusted ({status})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bed.sim = Some(new_sim);
    bed.shutdown().await;
}

#[tokio::test]
async fn a_reloaded_log_level_applies_without_a_restart() {
    let bed = TestBed::start().await;
    let gw = bed.process_config("level.toml", Some("state-level"));
    let quiet = std::fs::read_to_string(&gw.config)
        .unwrap()
        .replace("[state]", "[log]\nlevel = \"warn\"\n[state]");
    std::fs::write(&gw.config, &quiet).unwrap();
    let log = bed.dir.0.join("level.log");
    let _child = gw.run(Stdio::from(std::fs::File::create(&log).unwrap()));
    let c = client();
    gw.wait_healthy(&c).await;
    let url = format!("http://{}{SESSIONS}", gw.proxy);
    let token = bed.token("alice-svc").to_string();
    let get = || send(&c, req("GET", &url, Some(&token), None));
    assert_eq!(get().await.status, 200);
    let request_lines = || {
        std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(" request ") && l.contains("status=200"))
            .count()
    };
    assert_eq!(request_lines(), 0, "at warn, no request line");
    std::fs::write(
        &gw.config,
        quiet.replace("level = \"warn\"", "level = \"info\""),
    )
    .unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while request_lines() == 0 {
        assert!(
            tokio::time::Instant::now() < end,
            "the new level never applied"
        );
        assert_eq!(get().await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("log level changed"), "{text}");
    bed.shutdown().await;
}

#[tokio::test]
async fn an_edit_and_a_sighup_make_one_reload_not_two() {
    let bed = TestBed::start().await;
    let gw = bed.process_config("once.toml", Some("state-once"));
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let child = gw.run(Stdio::null());
    let c = client();
    gw.wait_healthy(&c).await;
    let url = format!("http://{}{SESSIONS}", gw.proxy);
    let refused = |token: &'static str| {
        let (c, url, t) = (c.clone(), url.clone(), bed.token(token).to_string());
        async move { send(&c, req("GET", &url, Some(&t), None)).await.status == 401 }
    };
    // One edit, and the SIGHUP an operator sends after it.
    let first = without_token(&text, "bob-svc");
    std::fs::write(&gw.config, &first).unwrap();
    let _ = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status();
    eventually("the edit applies", Duration::from_secs(5), || {
        refused("bob-svc")
    })
    .await;
    // The file watch looks every 500 ms: a duplicate of the first reload
    // could only come at one of its looks, so let three pass before the
    // second edit (which would otherwise hide a duplicate in itself).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // A second edit, seen by the file watch alone.
    std::fs::write(&gw.config, without_token(&first, "alice-batch")).unwrap();
    eventually("the second edit applies", Duration::from_secs(5), || {
        refused("alice-batch")
    })
    .await;
    let metrics = send(
        &c,
        req("GET", &format!("http://{}/metrics", gw.admin), None, None),
    )
    .await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(r#"knoq_gateway_config_reloads_total{result="success"}"#))
        .unwrap_or_default()
        .to_string();
    assert!(line.ends_with(" 2"), "two edits, two reloads: {line}");
    child.kill();
    bed.shutdown().await;
}
