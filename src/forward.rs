//! Forward stage: the upstream call with retries, the circuit breaker, the
//! retry budget and reconciliation of ambiguous POSTs.
//!
//! Runs after the quota stage with a fully rewritten request whose body is
//! buffered (bounded by `server.max_body`, so it can be replayed). Per
//! attempt: ask the circuit for a pass, send, record the result, and let
//! `retry::classify` decide. Before a retry: the deadline must leave room
//! for the wait, the gateway must not be draining, the gateway-wide budget
//! must allow it, and (after the backoff sleep, at the moment it is sent)
//! the quota must admit it again, since Knoq may count every attempt. When
//! any of these says no, the client gets Knoq's last answer untouched, or
//! the last transport error.
//!
//! Contract: `Ok` is the response to give (Knoq's, or the answer a
//! reconciliation found) with the number of attempts; `Err` carries the
//! error and the attempts made. Dropping the future (client gone) cancels
//! the attempt or the sleep in progress: nothing more is sent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{self, BoxBody};
use crate::clock::Clock;
use crate::config::RetryConfig;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::reconcile::{Confirmed, Finding, Reconciler};
use crate::route::Route;
use crate::upstream::retry::{self, jitter_sample, Budget, Circuit, Verdict};
use crate::upstream::{Upstream, UpstreamError};

pub const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-knoq-gateway-attempts");
pub const X_RECONCILED: HeaderName = HeaderName::from_static("x-knoq-gateway-reconciled");

pub struct Forwarder {
    pub(crate) upstream: Upstream,
    retry: RetryConfig,
    budget: Budget,
    circuit: Circuit,
    clock: Arc<dyn Clock>,
    draining: AtomicBool,
    metrics: Arc<Metrics>,
    /// Sends Knoq confirmed recently, so reconciliation does not mistake
    /// an earlier identical message for this one.
    confirmed: Confirmed,
    /// Wakes retries sleeping in backoff when draining starts.
    drain_started: Notify,
}

/// One request, ready to send.
pub struct Outbound<'a> {
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub route: Route,
    /// The Knoq account the request acts as.
    pub user: &'a str,
    /// When the request arrived: the retry deadline counts from here.
    pub arrived: Instant,
    /// The user's cookie, for reconciliation reads (`None` for SCIM).
    pub cookie: Option<&'a HeaderValue>,
    pub origin: &'a HeaderValue,
    /// Charges quota for a retry; `false` stops retrying.
    pub charge_retry: &'a (dyn Fn() -> bool + Send + Sync),
}

/// A failure after `attempts` attempts.
pub struct Failed {
    pub error: GatewayError,
    pub attempts: u32,
}

impl Forwarder {
    pub fn new(
        upstream: Upstream,
        retry: RetryConfig,
        circuit: &crate::config::CircuitConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Forwarder {
            upstream,
            metrics,
            budget: Budget::new(retry.budget, retry.budget_floor),
            circuit: Circuit::new(circuit.failures, circuit.open_for),
            retry,
            clock,
            draining: AtomicBool::new(false),
            confirmed: Confirmed::default(),
            drain_started: Notify::new(),
        }
    }

    /// From now on no new retry starts (graceful shutdown); attempts in
    /// flight finish.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.drain_started.notify_waiters();
    }

    pub fn circuit_open(&self) -> bool {
        self.circuit.is_open()
    }

    /// Refuses at once while the circuit is open, so that a request that
    /// will not be sent consumes no quota.
    pub fn precheck(&self) -> Result<(), GatewayError> {
        match self.circuit.refuses() {
            Some(remaining) => Err(circuit_open(remaining)),
            None => Ok(()),
        }
    }

    pub async fn send(&self, out: &Outbound<'_>) -> Result<(Response<BoxBody>, u32), Failed> {
        let method = out.parts.method.clone();
        let mut attempt: u32 = 0;
        let mut wait_hint = None;
        let mut resent_unconfirmed = false;
        // Set while resending an unconfirmed POST: what to answer if the
        // resend cannot happen.
        let mut unknown: Option<GatewayError> = None;
        let mut last: Option<Result<Response<BoxBody>, UpstreamError>> = None;
        let mut retry_reason = "";
        let mut carried: Vec<HeaderValue> = Vec::new();
        let route = out.route.label();
        loop {
            attempt += 1;
            let pass = if attempt == 1 {
                match self.circuit.pass() {
                    Ok(p) => p,
                    Err(remaining) => {
                        return Err(Failed {
                            error: circuit_open(remaining),
                            attempts: 0,
                        })
                    }
                }
            } else {
                // A retry needs the deadline, budget and quota (may_retry)
                // and then a pass from the circuit; else stop here.
                let pass = if self.may_retry(out, attempt, wait_hint).await {
                    self.circuit.pass().ok()
                } else {
                    None
                };
                match pass {
                    Some(p) => p,
                    None => {
                        attempt -= 1;
                        if let Some(error) = unknown {
                            return Err(Failed {
                                error,
                                attempts: attempt,
                            });
                        }
                        break;
                    }
                }
            };
            if attempt == 1 {
                self.budget.first_attempt();
            } else {
                self.metrics
                    .retries
                    .with_label_values(&[route, retry_reason])
                    .inc();
            }
            let sent_at = self.clock.now();
            let req = Request::from_parts(
                out.parts.clone(),
                Full::new(out.body.clone())
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            );
            let started = Instant::now();
            let outcome = self.upstream.send(req).await;
            self.metrics
                .upstream_duration
                .with_label_values(&[route])
                .observe(started.elapsed().as_secs_f64());
            match &outcome {
                Ok(rsp) => self
                    .metrics
                    .upstream_requests
                    .with_label_values(&[route, rsp.status().as_str()])
                    .inc(),
                Err(e) => {
                    self.metrics
                        .upstream_requests
                        .with_label_values(&[route, "error"])
                        .inc();
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[e.kind()])
                        .inc();
                }
            }
            let (facts, failed) = match &outcome {
                Ok(rsp) => {
                    let s = rsp.status();
                    let after = retry::parse_retry_after(rsp.headers().get(RETRY_AFTER));
                    (
                        Ok((s, after)),
                        matches!(s, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE),
                    )
                }
                Err(e) => (Err(e), true),
            };
            let verdict = retry::classify(facts, &method, out.route);
            pass.record(!failed);
            match verdict {
                Verdict::Done => {
                    if let Ok(rsp) = &outcome {
                        if rsp.status().is_success() && retry::reconcilable(out.route) {
                            self.confirmed
                                .record(out.route, out.user, &out.body, sent_at);
                        }
                    }
                    return outcome
                        .map(|r| (with_carried(r, carried), attempt))
                        .map_err(|e| failed_with(e, attempt));
                }
                Verdict::Fail => {
                    let Err(e) = outcome else {
                        unreachable!("Fail is only for transport errors")
                    };
                    return Err(failed_with(e, attempt));
                }
                Verdict::Retry { reason, after } => {
                    tracing::debug!(attempt, reason, "upstream attempt failed; may retry");
                    wait_hint = after;
                    retry_reason = reason;
                    // A response about to be dropped may still rotate the
                    // cookie: keep its Set-Cookie for the final answer.
                    if let Some(Ok(mut dropped)) = last.replace(outcome) {
                        carried.extend(take_set_cookies(&mut dropped));
                    }
                    if attempt >= self.retry.attempts {
                        break;
                    }
                }
                Verdict::Reconcile => {
                    let Err(err) = outcome else {
                        unreachable!("Reconcile is only for transport errors")
                    };
                    let timed_out = matches!(err, UpstreamError::Timeout(_));
                    let checked = match self.reconcile(out, sent_at).await {
                        Ok(found) => return Ok((with_carried(found, carried), attempt)),
                        Err(checked) => checked,
                    };
                    let error = GatewayError::OutcomeUnknown { timed_out, checked };
                    if self.retry.resend_unconfirmed
                        && !resent_unconfirmed
                        && attempt < self.retry.attempts
                    {
                        // The operator chose a possible duplicate over an
                        // unknown outcome: resend once, if allowed.
                        resent_unconfirmed = true;
                        wait_hint = None;
                        retry_reason = "resend_unconfirmed";
                        unknown = Some(error);
                        continue;
                    }
                    return Err(Failed {
                        error,
                        attempts: attempt,
                    });
                }
            }
        }
        match last {
            Some(Ok(rsp)) => Ok((with_carried(rsp, carried), attempt)),
            Some(Err(e)) => Err(failed_with(e, attempt)),
            None => unreachable!("the first attempt always runs"),
        }
    }

    /// Checks and waits for retry `attempt`; `false` means stop here.
    async fn may_retry(
        &self,
        out: &Outbound<'_>,
        attempt: u32,
        hint: Option<std::time::Duration>,
    ) -> bool {
        let wait = hint.unwrap_or_else(|| self.retry.backoff.delay(attempt - 1, jitter_sample()));
        if Instant::now() + wait > out.arrived + self.retry.deadline {
            return false;
        }
        let drained = self.drain_started.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if self.draining.load(Ordering::Acquire) || !self.budget.try_retry() {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = drained => return false,
        }
        // Charge quota only for an attempt that will really be sent.
        self.circuit.refuses().is_none() && (out.charge_retry)()
    }

    /// Asks Knoq whether an ambiguous POST took effect. `Ok` is the answer
    /// to give; `Err` says what was checked.
    async fn reconcile(
        &self,
        out: &Outbound<'_>,
        sent_at: u64,
    ) -> Result<Response<BoxBody>, String> {
        let Some(cookie) = out.cookie else {
            return Err("nothing: this request has no session cookie to read with".into());
        };
        let reconciler = Reconciler {
            upstream: &self.upstream,
            cookie,
            origin: out.origin,
            settle: self.retry.reconcile_settle,
            user: out.user,
            confirmed: &self.confirmed,
        };
        // Reconciliation reads are bounded by the request's retry deadline.
        let deadline = out.arrived + self.retry.deadline;
        let finding =
            tokio::time::timeout_at(deadline, reconciler.run(out.route, &out.body, sent_at))
                .await
                .unwrap_or_else(|_| Finding::Unreadable {
                    checked: "Knoq's record of it before the retry deadline".into(),
                });
        match finding {
            Finding::Found(answer) => {
                self.confirmed
                    .record(out.route, out.user, &out.body, sent_at);
                tracing::info!(
                    route = out.route.label(),
                    "ambiguous request reconciled: Knoq had applied it"
                );
                Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header(CONTENT_TYPE, "application/json")
                    .header(X_RECONCILED, "true")
                    .body(body::json(&answer))
                    .expect("static status and headers make a valid response"))
            }
            Finding::Missing { checked } => Err(format!("checked {checked}: not found")),
            Finding::Unreadable { checked } => Err(format!("could not check {checked}")),
        }
    }
}

/// The fail-fast answer while the circuit is open for `remaining`.
fn circuit_open(remaining: std::time::Duration) -> GatewayError {
    GatewayError::CircuitOpen {
        retry_after_secs: remaining.as_millis().div_ceil(1000).max(1) as u64,
    }
}

fn take_set_cookies(rsp: &mut Response<BoxBody>) -> Vec<HeaderValue> {
    match rsp.headers_mut().entry(SET_COOKIE) {
        http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
        http::header::Entry::Vacant(_) => Vec::new(),
    }
}

/// Puts the `Set-Cookie` lines of dropped attempts before the final
/// answer's own, so the latest rotation wins when they are applied.
fn with_carried(mut rsp: Response<BoxBody>, carried: Vec<HeaderValue>) -> Response<BoxBody> {
    if carried.is_empty() {
        return rsp;
    }
    let own = take_set_cookies(&mut rsp);
    for v in carried.into_iter().chain(own) {
        rsp.headers_mut().append(SET_COOKIE, v);
    }
    rsp
}

fn failed_with(error: UpstreamError, attempts: u32) -> Failed {
    Failed {
        error: error.into(),
        attempts,
    }
}
