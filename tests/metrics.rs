//! /metrics: the series ops rely on, bounded cardinality under hostile
//! traffic, and a structural check of the Grafana dashboard.

mod support;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use knoq_sim::{Fault, SimRoute};
use support::*;

async fn scrape(bed: &TestBed) -> String {
    let r = bed.scrape().await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    String::from_utf8(r.body.to_vec()).unwrap()
}

fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
        .collect()
}

#[tokio::test]
async fn traffic_shows_up_in_the_documented_series() {
    let bed = metrics_bed().await;
    let t = bed.token("alice-svc");
    let create = || bed.post(SESSION, "alice-svc", r#"{"text":"m"}"#);
    assert_eq!(create().await.status, 200);
    assert_eq!(create().await.status, 429);
    bed.control
        .fail_next(SimRoute::SessionsList, vec![Fault::status(502)]);
    assert_eq!(bed.get(SESSIONS, "alice-svc").await.status, 200);
    bed.control.rotate_cookie("alice", "alice-rotated-9");
    bed.get(SESSIONS, "alice-svc").await;
    bed.control.expire_cookie("bob");
    bed.get("/api/managed-agents/sessions", "bob-svc").await;

    let text = scrape(&bed).await;
    for line in [
        r#"knoq_gateway_requests_total{code="200",method="POST",route="session_create",token="alice-svc",user="alice"} 1"#,
        r#"knoq_gateway_requests_total{code="429",method="POST",route="session_create",token="alice-svc",user="alice"} 1"#,
        r#"knoq_gateway_quota_rejections_total{bucket="session",scope="user",token="alice-svc",user="alice"} 1"#,
        r#"knoq_gateway_upstream_requests_total{code="502",route="sessions_list"} 1"#,
        r#"knoq_gateway_retries_total{reason="status_502",route="sessions_list"} 1"#,
        r#"knoq_gateway_cookie_rotations_total{user="alice"} 1"#,
        r#"knoq_gateway_credential_valid{user="alice"} 1"#,
        r#"knoq_gateway_credential_valid{user="bob"} 0"#,
        r#"knoq_gateway_quota_remaining{bucket="session",user="alice",window="hour"} 0"#,
        r#"knoq_gateway_quota_remaining{bucket="message",user="bob",window="min"} 60"#,
        r#"knoq_gateway_circuit_open 0"#,
        r#"knoq_gateway_upstream_errors_total{kind="tls"} 0"#,
        r#"knoq_gateway_config_reloads_total{result="failure"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    for name in [
        "knoq_gateway_request_duration_seconds_bucket",
        "knoq_gateway_upstream_duration_seconds_bucket",
        "knoq_gateway_inflight_requests",
        "knoq_gateway_open_connections",
        "knoq_gateway_build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    for secret in ["alice-cookie-0001", "alice-rotated-9", SCIM_TOKEN, t] {
        assert!(!text.contains(secret), "a secret reached /metrics");
    }
    bed.shutdown().await;
}

/// Random paths, methods and tokens must not grow the number of series.
#[tokio::test]
async fn a_flood_of_random_requests_keeps_the_series_bounded() {
    let bed = TestBed::start().await;
    let c = client();
    // Warm up so every per-route series that legitimate traffic creates exists.
    bed.get("/api/managed-agents/sessions", "alice-svc").await;
    let before = series(&scrape(&bed).await).len();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW", "PURGE", "X-ZZ",
    ];
    let mut tasks = Vec::new();
    for i in 0..300 {
        let r = next();
        let method = methods[(r % methods.len() as u64) as usize];
        let path = match r % 4 {
            0 => format!("/api/managed-agents/x{r:x}"),
            1 => format!("/random/{r:x}/{i}"),
            2 => format!("/api/scim/v2/Users/{r:x}"),
            _ => format!("/api/managed-agents/transcript?sessionId={r:x}"),
        };
        let token = if r % 3 == 0 {
            bed.token("alice-svc").to_string()
        } else {
            format!("kgw_{r:x}")
        };
        let (c, url) = (c.clone(), bed.url(&path));
        tasks.push(tokio::spawn(async move {
            let rq = http::Request::builder()
                .method(method)
                .uri(url)
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::default())
                .unwrap();
            let _ = c.request(rq).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let after = series(&scrape(&bed).await);
    // What may appear: per route x method x a handful of statuses for the
    // known tokens, plus the unauthenticated "-" line per status; never a
    // series per path, method name or token.
    assert!(
        after.len() < before + 250,
        "{} series after the flood (from {before})",
        after.len()
    );
    let joined: String = after.iter().cloned().collect::<Vec<_>>().join("\n");
    assert!(
        !joined.contains("BREW") && !joined.contains("random") && !joined.contains("kgw_"),
        "client input in labels"
    );
    bed.shutdown().await;
}

#[test]
fn the_dashboard_is_well_formed() {
    let text = include_str!("../dashboards/knoq-gateway.json");
    let dash: serde_json::Value = serde_json::from_str(text).unwrap();
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: HashSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for v in ["datasource", "user", "route"] {
        assert!(vars.contains(v), "variable {v}");
    }
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = HashSet::new();
    let mut cells: HashSet<(u64, u64)> = HashSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "panel {} wider than the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "panel {} overlaps another at ({cx},{cy})",
                    p["title"]
                );
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            !p["description"].as_str().unwrap_or("").is_empty(),
            "panel {} has no description",
            p["title"]
        );
        assert!(
            p["fieldConfig"]["defaults"]["unit"].is_string(),
            "panel {} has no unit",
            p["title"]
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}");
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {}",
                p["title"]
            );
            assert!(
                t["expr"].as_str().unwrap().contains("knoq_gateway_")
                    || t["expr"].as_str().unwrap().contains("process_")
            );
        }
    }
    let _ = Duration::ZERO;
}
