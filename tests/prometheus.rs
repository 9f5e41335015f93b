//! Proof against a real Prometheus: it scrapes a real gateway driven with
//! mixed traffic, loads the alert rules, and every PromQL expression of the
//! dashboard and the rules is evaluated through its HTTP API. `promtool`
//! checks the rules and a scrape. `./scripts/test` installs Prometheus.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;

/// Kills Prometheus when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn need(tool: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "`{tool}` is not installed: run ./scripts/test, which installs Debian's prometheus package"
    );
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn query(c: &PlainClient, prom: &str, expr: &str) -> serde_json::Value {
    let r = send(
        c,
        req(
            "GET",
            &format!("http://{prom}/api/v1/query?query={}", encode(expr)),
            None,
            None,
        ),
    )
    .await;
    let j = r.json();
    assert_eq!(
        j["status"],
        "success",
        "query failed: {expr}\n{}",
        String::from_utf8_lossy(&r.body)
    );
    j
}

/// The dashboard's expressions with its variables filled in.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value =
        serde_json::from_str(include_str!("../dashboards/knoq-gateway.json")).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            out.push(
                e.replace("$__rate_interval", "20s")
                    .replace("$user", ".*")
                    .replace("$route", ".*")
                    .replace("$job", ".*"),
            );
        }
    }
    out
}

/// (alert name, expression) from the rules file.
fn alert_exprs() -> Vec<(String, String)> {
    let text = include_str!("../dashboards/alerts.yml");
    let mut out = Vec::new();
    let mut name = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert: ") {
            name = n.to_string();
        } else if let Some(e) = t.strip_prefix("expr: ") {
            let mut expr = String::new();
            if e == ">-" {
                while let Some(next) = lines.peek() {
                    if next.trim_start().starts_with("for:") {
                        break;
                    }
                    expr.push_str(next.trim());
                    expr.push(' ');
                    lines.next();
                }
            } else {
                expr = e.to_string();
            }
            out.push((name.clone(), expr.trim().to_string()));
        }
    }
    out
}

/// An alert expression without its final comparison: the data it compares.
fn lhs(expr: &str) -> &str {
    for op in [" == ", " <= ", " >= ", " > ", " < "] {
        if let Some(i) = expr.rfind(op) {
            return expr[..i].trim();
        }
    }
    expr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_expression_works_against_real_prometheus() {
    need("prometheus");
    need("promtool");
    let rules = std::fs::canonicalize("dashboards/alerts.yml").unwrap();
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check.status.success() && !said.to_lowercase().contains("warn"),
        "{said}"
    );

    // On a Redis store, so the shared-store panels and alert have series.
    let redis = RedisServer::start();
    let bed = BedBuilder {
        tail_toml: format!(
            "{}[quotas]\nsession = [\"1/hour\"]\n[retry]\nbase_delay = \"5ms\"\nmax_delay = \"10ms\"\n",
            redis_store_toml(&redis)
        ),
        ..TestBed::builder()
    }
    .start()
    .await;
    let c = client();
    // Mixed traffic: successes, a quota rejection, a 502 burst with retries,
    // Knoq's own 429, a rotation and an expired cookie.
    let created = bed.post(SESSION, "alice-svc", r#"{"text":"one"}"#).await;
    assert_eq!(created.status, 200);
    let sid = created.json()["id"].as_str().unwrap().to_string();
    assert_eq!(
        bed.post(SESSION, "alice-svc", r#"{"text":"two"}"#)
            .await
            .status,
        429
    );
    bed.control.fail_next(
        SimRoute::SessionsList,
        vec![Fault::status(502), Fault::status(502)],
    );
    bed.control.fail_next(
        SimRoute::MessageSend,
        vec![Fault::status_retry_after(429, 1)],
    );
    bed.control.rotate_cookie("alice", "alice-rotated-5");
    let hello = message(&sid, "hello");

    let scrape = bed.scrape().await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(&scrape.body)
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}"
    );

    // Prometheus scraping the admin port every second, with the rules.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = format!("127.0.0.1:{port}");
    let cfg = bed.dir.0.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: knoq-gateway\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            bed.admin
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                bed.dir.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("Prometheus is ready", Duration::from_secs(30), || {
        let (c, prom) = (c.clone(), prom.clone());
        async move {
            let r = c
                .request(req("GET", &format!("http://{prom}/-/ready"), None, None))
                .await;
            r.is_ok_and(|r| r.status() == 200)
        }
    })
    .await;
    eventually(
        "Prometheus scrapes the gateway",
        Duration::from_secs(30),
        || {
            let (c, prom) = (c.clone(), prom.clone());
            async move {
                let j = query(&c, &prom, "up{job=\"knoq-gateway\"}").await;
                j["data"]["result"][0]["value"][1] == "1"
            }
        },
    )
    .await;
    // Traffic while Prometheus watches, so rates see increases.
    for _ in 0..3 {
        assert_eq!(bed.get(SESSIONS, "alice-svc").await.status, 200);
        bed.post(MESSAGE, "alice-svc", &hello).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    bed.control.expire_cookie("bob");
    bed.get("/api/managed-agents/sessions", "bob-svc").await;
    // Let a few more scrapes land.
    let until = query(&c, &prom, "time()").await["data"]["result"][1]
        .as_str()
        .unwrap_or("0")
        .parse::<f64>()
        .unwrap_or(0.0)
        + 4.0;
    eventually(
        "four more seconds of scrapes",
        Duration::from_secs(20),
        || {
            let (c, prom) = (c.clone(), prom.clone());
            async move {
                query(&c, &prom, "time()").await["data"]["result"][1]
                    .as_str()
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
                    >= until
            }
        },
    )
    .await;

    for expr in dashboard_exprs() {
        let j = query(&c, &prom, &expr).await;
        let empty = j["data"]["result"].as_array().is_some_and(|r| r.is_empty());
        assert!(!empty, "dashboard expression returned no data: {expr}");
    }
    for (name, expr) in alert_exprs() {
        query(&c, &prom, &expr).await;
        let j = query(&c, &prom, lhs(&expr)).await;
        let empty = j["data"]["result"].as_array().is_some_and(|r| r.is_empty());
        assert!(!empty, "alert {name}: {} returned no data", lhs(&expr));
    }
    eventually(
        "the expired-cookie alert fires for bob",
        Duration::from_secs(20),
        || {
            let (c, prom) = (c.clone(), prom.clone());
            async move {
                let r = send(
                    &c,
                    req("GET", &format!("http://{prom}/api/v1/alerts"), None, None),
                )
                .await;
                r.json()["data"]["alerts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|a| {
                        a["labels"]["alertname"] == "KnoqGatewayCredentialExpired"
                            && a["labels"]["user"] == "bob"
                            && a["state"] == "firing"
                    })
            }
        },
    )
    .await;
    bed.shutdown().await;
}
