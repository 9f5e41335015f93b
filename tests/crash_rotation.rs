//! `kill -9` at random moments of cookie rotations, on the real binary: no
//! temporary file (each holds a cookie) survives a start, and whenever the
//! cookie Knoq accepts had reached the disk, in the state copy or in a
//! temporary file a crash left, the first request after the restart uses
//! it.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::*;

/// Every file of the credentials directory: (name, contents).
fn credential_files(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| {
                    let name = e.file_name().into_string().unwrap();
                    (name, std::fs::read_to_string(e.path()).unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).unwrap();
    u64::from_le_bytes(b) % n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_rotation_never_loses_a_cookie_that_reached_the_disk() {
    let bed = TestBed::start().await;
    let gw = bed.process_config("crash.toml", Some("state-crash"));
    let creds = bed.dir.0.join("state-crash").join("credentials");
    let c = client();
    let url = format!("http://{}{SESSIONS}", gw.proxy);
    let token = bed.token("alice-svc").to_string();
    let get = |c: PlainClient, url: String, token: String| async move {
        tokio::time::timeout(
            Duration::from_secs(5),
            c.request(req("GET", &url, Some(&token), None)),
        )
        .await
        .map_err(|_| ())?
        .map(|r| r.status().as_u16())
        .map_err(|_| ())
    };
    let started = std::time::Instant::now();
    let (mut runs, mut on_disk_runs, mut adopted_from_tmp) = (0, 0, 0);
    while runs < 100 && started.elapsed() < Duration::from_secs(120) {
        runs += 1;
        let child = gw.run(Stdio::null());
        gw.wait_healthy(&c).await;
        // Rotate and request in a loop until the kill.
        let rotations = {
            let (c, url, token, control) =
                (c.clone(), url.clone(), token.clone(), bed.control.clone());
            tokio::spawn(async move {
                for j in 0.. {
                    control.rotate_cookie("alice", &format!("crash-{runs}-{j}"));
                    if get(c.clone(), url.clone(), token.clone()).await.is_err() {
                        return;
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(random_below(40))).await;
        child.kill();
        rotations.abort();
        let _ = rotations.await;

        // Knoq may still be reading (and rotating on) the dead process's
        // last request from its socket: what it accepts is known once it
        // has nothing in flight and has seen no new request for 100 ms.
        let control = bed.control.clone();
        let quiet_since = std::sync::Mutex::new((usize::MAX, std::time::Instant::now()));
        eventually(
            "Knoq has finished the killed gateway's requests",
            Duration::from_secs(10),
            || {
                let seen = control.requests().len();
                let idle = control.in_flight() == 0;
                let mut q = quiet_since.lock().unwrap();
                if q.0 != seen || !idle {
                    *q = (seen, std::time::Instant::now());
                }
                let quiet = q.1.elapsed() >= Duration::from_millis(100);
                async move { quiet }
            },
        )
        .await;
        let accepted = bed
            .control
            .session_value("alice")
            .expect("alice has a session");
        let files = credential_files(&creds);
        // The cookie as a state copy spells it (other pairs follow it).
        let stored = format!("knoq_session={accepted};");
        let on_disk = files.iter().any(|(_, text)| text.contains(&stored));
        let only_in_tmp = on_disk
            && !files
                .iter()
                .any(|(name, text)| name == "alice.json" && text.contains(&stored));

        let child = gw.run(Stdio::null());
        gw.wait_healthy(&c).await;
        let leftovers: Vec<String> = credential_files(&creds)
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| name.contains(".tmp-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "run {runs}: temporary files survived a start: {leftovers:?}"
        );
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            send(&c, req("GET", &url, Some(&token), None)),
        )
        .await
        .unwrap_or_else(|_| panic!("run {runs}: no answer after the restart"));
        let status = reply.status.as_u16();
        if on_disk && status != 200 {
            eprintln!(
                "run {runs}: {} {:?}",
                status,
                String::from_utf8_lossy(&reply.body)
            );
            for (name, text) in &files {
                eprintln!("  before restart {name}: {text}");
            }
            eprintln!("  Knoq accepts {accepted}");
        }
        if on_disk {
            on_disk_runs += 1;
            adopted_from_tmp += usize::from(only_in_tmp);
            assert_eq!(
                status, 200,
                "run {runs}: Knoq's current cookie was on disk{}, yet the first request after the restart failed",
                if only_in_tmp { " (in a temporary file)" } else { "" }
            );
        }
        child.kill();
        if status != 200 {
            // Killed before the new cookie reached the disk: nothing could
            // keep it. Start the next run from a clean account.
            let _ = std::fs::remove_dir_all(&creds);
            bed.control.set_cookie("alice", "alice-cookie-0001");
        }
    }
    assert!(runs >= 30, "only {runs} runs in the time allowed");
    assert!(
        on_disk_runs > 0,
        "no run had the cookie on disk: the test saw nothing"
    );
    eprintln!("{runs} runs, {on_disk_runs} with Knoq's cookie on disk, {adopted_from_tmp} of them only in a temporary file");
}
