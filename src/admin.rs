//! The admin port: health endpoints for operators and load balancers.
//! Served on its own listener (loopback by default), never on the clients'
//! port, and it never touches the request pipeline.
//!
//! | method | path       | answer |
//! |--------|------------|--------|
//! | GET    | `/healthz` | 200 `{"status":"ok"}` while the process runs |
//! | GET    | `/readyz`  | 200 when the config is loaded and every user's cookie is present and not expired, else 503 naming the users; either way `problems` lists what needs an operator (see `health.rs`) |
//! | GET    | `/metrics` | Prometheus text format (see `metrics.rs`) |
//! | GET    | `/credentials` | each user's credential state, last success, last rotation, source (never the cookie) |
//!
//! Anything else: 404, or 405 for a known path with another method. All
//! bodies are JSON and name no secret.

use std::sync::Arc;

use http::header::{ALLOW, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::{self, BoxBody};
use crate::credentials::CredentialState;
use crate::error::GatewayError;
use crate::inspect::HygieneRules;
use crate::reload::Live;
use crate::server::Handler;

pub struct Admin {
    live: Arc<Live>,
    /// The same DNS-rebinding guard as the clients' port: a web page on
    /// this machine must not read the admin answers (they name users).
    hosts: HygieneRules,
}

impl Admin {
    pub fn new(live: Arc<Live>, hosts: HygieneRules) -> Self {
        Admin { live, hosts }
    }

    fn readyz(&self) -> Response<BoxBody> {
        let status = self.live.current().credentials.status();
        let problems = crate::health::of_live(&self.live);
        let reload = match self.live.failed_reload() {
            None => json!({ "ok": true }),
            Some(error) => json!({ "ok": false, "error": error }),
        };
        let named = |state: CredentialState| -> Vec<&str> {
            status
                .iter()
                .filter(|s| s.state == state)
                .map(|s| s.user.as_str())
                .collect()
        };
        let (expired, missing) = (
            named(CredentialState::Expired),
            named(CredentialState::Missing),
        );
        let store = store_json(&self.live);
        // On its share of each limit a replica still serves: ready.
        let store_down = self
            .live
            .services()
            .shared
            .as_ref()
            .is_some_and(|s| s.mode() == "unavailable");
        if expired.is_empty() && missing.is_empty() && !store_down {
            json_rsp(
                StatusCode::OK,
                json!({ "status": "ready", "reload": reload, "store": store, "problems": problems }),
            )
        } else {
            json_rsp(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "status": "not_ready",
                    "credentials_expired": expired,
                    "credentials_missing": missing,
                    "reload": reload,
                    "store": store,
                    "problems": problems,
                }),
            )
        }
    }

    fn credentials(&self) -> Response<BoxBody> {
        json_rsp(
            StatusCode::OK,
            json!({ "users": self.live.current().credentials.status(), "store": store_json(&self.live) }),
        )
    }
}

impl Handler for Admin {
    async fn handle(
        &self,
        req: Request<Incoming>,
        _peer: std::net::SocketAddr,
    ) -> Response<BoxBody> {
        let (parts, _body) = req.into_parts();
        if let Err(e) = self.hosts.check_host(&parts) {
            return GatewayError::from(e).into_response(0);
        }
        match (&parts.method, parts.uri.path()) {
            (&Method::GET | &Method::HEAD, "/healthz") => {
                json_rsp(StatusCode::OK, json!({ "status": "ok" }))
            }
            (&Method::GET | &Method::HEAD, "/readyz") => self.readyz(),
            (&Method::GET | &Method::HEAD, "/credentials") => self.credentials(),
            (&Method::GET | &Method::HEAD, "/metrics") => {
                let gateway = self.live.current();
                let mut snapshot = gateway.snapshot();
                snapshot.problems = crate::health::counts(&crate::health::of_live(&self.live));
                Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                    .body(body::full(gateway.metrics.encode(&snapshot)))
                    .expect("static status and headers make a valid response")
            }
            (_, "/healthz" | "/readyz" | "/credentials" | "/metrics") => method_not_allowed(),
            _ => not_found(),
        }
    }
}

/// `{"kind": "local"}`, or `{"kind": "redis", "mode": …}`.
fn store_json(live: &crate::reload::Live) -> serde_json::Value {
    match &live.services().shared {
        None => json!({ "kind": "local" }),
        Some(shared) => json!({ "kind": "redis", "mode": shared.mode() }),
    }
}

fn json_rsp(status: StatusCode, value: serde_json::Value) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(body::json(&value))
        .expect("static status and headers make a valid response")
}

fn not_found() -> Response<BoxBody> {
    json_rsp(
        StatusCode::NOT_FOUND,
        json!({ "error": "no such admin endpoint; try /healthz, /readyz, /metrics or /credentials", "code": "not_found" }),
    )
}

fn method_not_allowed() -> Response<BoxBody> {
    let mut rsp = json_rsp(
        StatusCode::METHOD_NOT_ALLOWED,
        json!({ "error": "use GET", "code": "method_not_allowed" }),
    );
    rsp.headers_mut()
        .insert(ALLOW, http::HeaderValue::from_static("GET, HEAD"));
    rsp
}
