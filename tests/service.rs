//! The gateway under a service manager: systemd's readiness protocol on a
//! `NOTIFY_SOCKET` the test provides (`READY=1` once both ports serve,
//! `RELOADING=1` / `READY=1` around a SIGHUP reload, `STOPPING=1` when
//! SIGTERM starts the drain).

mod support;

use std::time::Duration;

use support::*;
use tokio::net::UnixDatagram;

/// The next datagram, within a deadline.
async fn next(sock: &UnixDatagram, what: &str) -> String {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no notification within 10 s: waiting for {what}"))
        .unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test]
async fn systemd_hears_ready_once_both_ports_serve_then_reloading_and_stopping() {
    let bed = TestBed::start().await;
    let p = bed.process_config("notify.toml", Some("state-notify"));
    let path = bed.dir.0.join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_knoq-gateway"))
        .args(["serve", "--config"])
        .arg(&p.config)
        .env("NOTIFY_SOCKET", &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut running = Running(child);

    let ready = next(&sock, "READY=1").await;
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    // Told ready: both ports answer now, with no retry.
    let c = client();
    let health = send(
        &c,
        req("GET", &format!("http://{}/healthz", p.admin), None, None),
    )
    .await;
    assert_eq!(health.status, 200);
    let token = bed.token("alice-svc").to_string();
    let list = send(
        &c,
        req(
            "GET",
            &format!("http://{}{SESSIONS}", p.proxy),
            Some(&token),
            None,
        ),
    )
    .await;
    assert_eq!(list.status, 200);

    signal(pid, "-HUP");
    let reloading = next(&sock, "RELOADING=1").await;
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "systemd wants the time of a reload: {reloading}"
    );
    let again = next(&sock, "READY=1 after the reload").await;
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");

    signal(pid, "-TERM");
    let stopping = next(&sock, "STOPPING=1").await;
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = tokio::task::spawn_blocking(move || running.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    bed.shutdown().await;
}
