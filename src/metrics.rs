//! Prometheus metrics: an owned struct on an explicit registry, passed to
//! the stages that record, never a global.
//!
//! Every label value comes from the config (user and token names) or from
//! a fixed set (routes, methods, status codes, buckets, error kinds); never
//! from client input such as a path, a session id or a presented token. A
//! request whose token is unknown is labelled `user="-", token="-"`, and a
//! method outside the allowed list is `method="other"`, so a client cannot
//! grow the number of series.
//!
//! Gauges that describe state (quota headroom, credential validity, the
//! circuit) are set when `/metrics` is scraped, from a [`Snapshot`] the
//! caller hands over: this module records and encodes, and reads no other
//! part of the gateway.

use std::sync::Arc;

use http::{Method, StatusCode};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::route::Route;

/// Latency buckets from 1 ms to 60 s (the upstream timeout's default).
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Kinds of upstream failure without an answer, for `upstream_errors_total`.
pub const ERROR_KINDS: [&str; 5] = ["connect", "tls", "timeout", "reset", "protocol"];

/// The state gauges' values at one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub circuit_open: bool,
    /// Each account, and whether its cookie is usable.
    pub credentials: Vec<(String, bool)>,
    /// Each account's window headroom: (user, bucket, window unit, remaining).
    pub quota_remaining: Vec<(String, &'static str, String, u32)>,
    /// Problems an operator must act on, by kind (every kind named).
    pub problems: Vec<(&'static str, usize)>,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub circuit_open: IntGauge,
    pub quota_rejections: IntCounterVec,
    pub quota_remaining: IntGaugeVec,
    pub upstream_rate_limited: IntCounterVec,
    pub credential_valid: IntGaugeVec,
    pub problems: IntGaugeVec,
    pub cookie_rotations: IntCounterVec,
    pub inflight: IntGauge,
    pub open_connections: IntGauge,
    pub config_reloads: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c =
        IntCounterVec::new(Opts::new(name, help), labels).expect("static metric options are valid");
    registry
        .register(Box::new(c.clone()))
        .expect("each metric name is registered once");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
        labels,
    )
    .expect("static metric options are valid");
    registry
        .register(Box::new(h.clone()))
        .expect("each metric name is registered once");
    h
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g =
        IntGaugeVec::new(Opts::new(name, help), labels).expect("static metric options are valid");
    registry
        .register(Box::new(g.clone()))
        .expect("each metric name is registered once");
    g
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("static metric options are valid");
    registry
        .register(Box::new(g.clone()))
        .expect("each metric name is registered once");
    g
}

// === impl Metrics ===

impl Metrics {
    /// Adds series that another part owns and records (the shared
    /// store's), so one scrape shows them beside these.
    pub fn register(&self, collectors: Vec<Box<dyn prometheus::core::Collector>>) {
        for c in collectors {
            self.registry
                .register(c)
                .expect("each metric name is registered once");
        }
    }

    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let m = Metrics {
            requests: counter(
                &r,
                "knoq_gateway_requests_total",
                "Client requests, including local rejections.",
                &["route", "method", "code", "user", "token"],
            ),
            request_duration: histogram(
                &r,
                "knoq_gateway_request_duration_seconds",
                "Time from a request's arrival to its response headers.",
                &["route"],
            ),
            upstream_requests: counter(
                &r,
                "knoq_gateway_upstream_requests_total",
                "Attempts sent to Knoq; code is the status, or error when none came back.",
                &["route", "code"],
            ),
            upstream_duration: histogram(
                &r,
                "knoq_gateway_upstream_duration_seconds",
                "Time of one attempt to Knoq, to its response headers.",
                &["route"],
            ),
            upstream_errors: counter(
                &r,
                "knoq_gateway_upstream_errors_total",
                "Attempts to Knoq that got no answer, by kind.",
                &["kind"],
            ),
            retries: counter(
                &r,
                "knoq_gateway_retries_total",
                "Retries sent to Knoq, by reason.",
                &["route", "reason"],
            ),
            circuit_open: gauge(
                &r,
                "knoq_gateway_circuit_open",
                "1 while the circuit breaker fails requests fast, else 0.",
            ),
            quota_rejections: counter(
                &r,
                "knoq_gateway_quota_rejections_total",
                "Requests refused locally by a quota.",
                &["user", "token", "bucket", "scope"],
            ),
            quota_remaining: gauge_vec(
                &r,
                "knoq_gateway_quota_remaining",
                "Requests an account's window admits now.",
                &["user", "bucket", "window"],
            ),
            upstream_rate_limited: counter(
                &r,
                "knoq_gateway_upstream_rate_limited_total",
                "429 answers from Knoq itself (should stay at 0).",
                &["user", "bucket"],
            ),
            credential_valid: gauge_vec(
                &r,
                "knoq_gateway_credential_valid",
                "1 if the account's cookie is usable, 0 if expired or missing.",
                &["user"],
            ),
            problems: gauge_vec(
                &r,
                "knoq_gateway_problems",
                "Problems an operator must act on now, by kind (see /readyz for which).",
                &["kind"],
            ),
            cookie_rotations: counter(
                &r,
                "knoq_gateway_cookie_rotations_total",
                "Cookies replaced by Knoq's Set-Cookie.",
                &["user"],
            ),
            inflight: gauge(
                &r,
                "knoq_gateway_inflight_requests",
                "Client requests being handled.",
            ),
            open_connections: gauge(
                &r,
                "knoq_gateway_open_connections",
                "Open client connections.",
            ),
            config_reloads: counter(
                &r,
                "knoq_gateway_config_reloads_total",
                "Configuration reloads, by result.",
                &["result"],
            ),
            registry: r,
        };
        let build = gauge_vec(
            &m.registry,
            "knoq_gateway_build_info",
            "Always 1; the version is a label.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("the process collector is registered once");
        for result in ["success", "failure"] {
            m.config_reloads.with_label_values(&[result]);
        }
        for kind in ERROR_KINDS {
            m.upstream_errors.with_label_values(&[kind]);
        }
        Arc::new(m)
    }

    /// One finished client request.
    pub fn record_request(
        &self,
        route: Option<Route>,
        method: &Method,
        status: StatusCode,
        user: &str,
        token: &str,
        seconds: f64,
    ) {
        let route = route_label(route);
        let code = status.as_str();
        self.requests
            .with_label_values(&[route, method_label(method), code, user, token])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// Sets the state gauges from `state`, then encodes everything in the
    /// Prometheus text format.
    pub fn encode(&self, state: &Snapshot) -> Vec<u8> {
        self.circuit_open.set(i64::from(state.circuit_open));
        for (user, valid) in &state.credentials {
            self.credential_valid
                .with_label_values(&[user])
                .set(i64::from(*valid));
        }
        for (kind, n) in &state.problems {
            self.problems.with_label_values(&[kind]).set(*n as i64);
        }
        for (user, bucket, window, left) in &state.quota_remaining {
            self.quota_remaining
                .with_label_values(&[user, bucket, window])
                .set(i64::from(*left));
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

/// The route label of a request: its route, or `other` when it was
/// refused before it had one (the log line uses the same name).
pub fn route_label(route: Option<Route>) -> &'static str {
    route.map_or("other", Route::label)
}

/// The method label: one of the methods the gateway serves, else `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_series_use_bounded_labels() {
        let m = Metrics::new();
        m.record_request(
            Some(Route::MessageSend),
            &Method::POST,
            StatusCode::OK,
            "alice",
            "svc",
            0.01,
        );
        m.record_request(
            None,
            &Method::from_bytes(b"BREW").unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "-",
            "-",
            0.001,
        );
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(r#"knoq_gateway_requests_total{code="200",method="POST",route="message_send",token="svc",user="alice"} 1"#), "{text}");
        assert!(text.contains(r#"knoq_gateway_requests_total{code="405",method="other",route="other",token="-",user="-"} 1"#), "{text}");
        assert!(text.contains(r#"knoq_gateway_build_info{version=""#));
        assert!(text.contains(
            r#"knoq_gateway_request_duration_seconds_bucket{route="message_send",le="0.01"} 1"#
        ));
    }
}
