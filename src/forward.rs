//! Forward stage: the upstream call with retries, the circuit breaker, the
//! retry budget and reconciliation of ambiguous POSTs.
//!
//! Runs after the quota stage with a fully rewritten request whose body is
//! buffered (bounded by `server.max_body`, so it can be replayed). Each
//! attempt is one exchange through the Knoq client (`knoq.rs`: circuit,
//! identity, metrics, cookie rotation and expiry), then `retry::classify`
//! decides. A 401 to a cookie rotated while the request was in flight is
//! sent once more at once, with the current cookie, if quota admits it. Before a retry: the deadline must leave room
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

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderName, Response, StatusCode};
use tokio::time::Instant;

use crate::body::{self, BoxBody};
use crate::clock::Clock;
use crate::error::GatewayError;
use crate::knoq::{Answer, Identity, Knoq};
use crate::metrics::Metrics;
use crate::quota::{Caller, Quotas};
use crate::reconcile::{Confirmed, Finding, Reconciler};
use crate::route::Route;
use crate::shutdown::Drain;
use crate::upstream::retry::{self, jitter_sample, Budget, RetryConfig, Verdict};
use crate::upstream::{ResponseBound, UpstreamError};

pub const X_ATTEMPTS: HeaderName = HeaderName::from_static("x-knoq-gateway-attempts");
pub const X_RECONCILED: HeaderName = HeaderName::from_static("x-knoq-gateway-reconciled");

pub struct Forwarder {
    pub(crate) knoq: Knoq,
    retry: RetryConfig,
    budget: Budget,
    clock: Arc<dyn Clock>,
    /// The gateway-wide drain latch: no retry starts once it is set, and
    /// retries sleeping in backoff wake and stop.
    drain: Drain,
    metrics: Arc<Metrics>,
    /// Sends Knoq confirmed recently, so reconciliation does not mistake
    /// an earlier identical message for this one.
    confirmed: Confirmed,
}

/// One request, ready to send.
pub struct Outbound<'a> {
    /// The client's request with its identity stripped and the upstream
    /// URI set; the Knoq client attaches the account's, per attempt.
    pub parts: http::request::Parts,
    pub body: Bytes,
    pub route: Route,
    /// Who the request acts as at Knoq.
    pub identity: Identity<'a>,
    /// Whose quota a retry or resend is charged to.
    pub caller: Caller<'a>,
    pub quotas: &'a Quotas,
    /// When the request arrived: the retry deadline counts from here.
    pub arrived: Instant,
}

/// A failure after `attempts` attempts.
pub struct Failed {
    pub error: GatewayError,
    pub attempts: u32,
}

impl Forwarder {
    pub fn new(
        knoq: Knoq,
        retry: RetryConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        drain: Drain,
        confirmed: Confirmed,
    ) -> Self {
        Forwarder {
            knoq,
            metrics,
            budget: Budget::new(retry.budget, retry.budget_floor),
            retry,
            clock,
            drain,
            confirmed,
        }
    }

    pub async fn send(&self, out: &Outbound<'_>) -> Result<(Response<BoxBody>, u32), Failed> {
        let method = &out.parts.method;
        let mut attempt: u32 = 0;
        let mut wait_hint = None;
        let mut resent_unconfirmed = false;
        let mut resent_stale = false;
        // The next send is the resend after a stale cookie: no backoff.
        let mut resend_now = false;
        // Set while resending an unconfirmed POST: what to answer if the
        // resend cannot happen.
        let mut unknown: Option<GatewayError> = None;
        let mut last: Option<Result<Response<BoxBody>, UpstreamError>> = None;
        let mut retry_reason = "";
        let route = out.route.label();
        loop {
            attempt += 1;
            let retrying = attempt > 1 && !std::mem::take(&mut resend_now);
            // A retry needs the deadline, budget and quota (may_retry), and
            // then a pass from the circuit (in the exchange); else stop.
            if retrying && !self.may_retry(out, attempt, wait_hint).await {
                return stop(unknown, last, attempt - 1);
            }
            let sent_at = self.clock.now();
            let exchanged = self
                .knoq
                .exchange(
                    &out.identity,
                    out.route,
                    &out.parts,
                    &out.body,
                    ResponseBound::Exchange,
                )
                .await;
            let outcome =
                match exchanged {
                    // Not sent (circuit open, no place towards Knoq): not an
                    // attempt, and no outcome to doubt.
                    Err(
                        error @ (GatewayError::CircuitOpen { .. } | GatewayError::Overloaded(_)),
                    ) if attempt == 1 => return Err(Failed { error, attempts: 0 }),
                    Err(GatewayError::CircuitOpen { .. } | GatewayError::Overloaded(_)) => {
                        return stop(unknown, last, attempt - 1)
                    }
                    Err(GatewayError::Upstream(e)) => Err(e),
                    Err(error) => {
                        return Err(Failed {
                            error,
                            attempts: attempt,
                        })
                    }
                    Ok(Answer::Final(rsp)) => Ok(rsp),
                    Ok(Answer::StaleCookie(rsp)) => {
                        // Rotated while in flight: once more with the current
                        // cookie. It is one more send: it needs quota.
                        if !resent_stale && out.quotas.charge(out.caller, out.route).await {
                            resent_stale = true;
                            resend_now = true;
                            // What the client gets if the resend cannot go.
                            last = Some(Ok(rsp));
                            continue;
                        }
                        return Ok((rsp, attempt));
                    }
                };
            if attempt == 1 {
                self.budget.first_attempt();
            } else if retrying {
                self.metrics
                    .retries
                    .with_label_values(&[route, retry_reason])
                    .inc();
            }
            let facts = match &outcome {
                Ok(rsp) => Ok((
                    rsp.status(),
                    retry::parse_retry_after(rsp.headers().get(RETRY_AFTER)),
                )),
                Err(e) => Err(e),
            };
            match retry::classify(facts, method, out.route) {
                Verdict::Done => {
                    if let Ok(rsp) = &outcome {
                        if rsp.status().is_success() && retry::reconcilable(out.route) {
                            self.confirmed
                                .record(out.route, out.caller.user, &out.body, sent_at);
                        }
                    }
                    return outcome
                        .map(|r| (r, attempt))
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
                    last = Some(outcome);
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
                        Ok(found) => return Ok((found, attempt)),
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
            Some(Ok(rsp)) => Ok((rsp, attempt)),
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
        if self.drain.is_draining() || !self.budget.try_retry() {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = self.drain.begun() => return false,
        }
        // Charge quota only for an attempt that will really be sent.
        self.knoq.precheck().is_ok() && out.quotas.charge(out.caller, out.route).await
    }

    /// Asks Knoq whether an ambiguous POST took effect. `Ok` is the answer
    /// to give; `Err` says what was checked.
    async fn reconcile(
        &self,
        out: &Outbound<'_>,
        sent_at: u64,
    ) -> Result<Response<BoxBody>, String> {
        let Identity::Account { user, credentials } = out.identity else {
            return Err("nothing: this request has no session cookie to read with".into());
        };
        let reconciler = Reconciler {
            knoq: &self.knoq,
            credentials,
            quotas: out.quotas,
            settle: self.retry.reconcile_settle,
            user,
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
                    .record(out.route, out.caller.user, &out.body, sent_at);
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

/// Stops before attempt `attempts + 1`: the unknown outcome of an
/// unconfirmed POST that could not be resent, or Knoq's last answer.
fn stop(
    unknown: Option<GatewayError>,
    last: Option<Result<Response<BoxBody>, UpstreamError>>,
    attempts: u32,
) -> Result<(Response<BoxBody>, u32), Failed> {
    if let Some(error) = unknown {
        return Err(Failed { error, attempts });
    }
    match last {
        Some(Ok(rsp)) => Ok((rsp, attempts)),
        Some(Err(e)) => Err(failed_with(e, attempts)),
        None => unreachable!("a retry follows a failed attempt"),
    }
}

fn failed_with(error: UpstreamError, attempts: u32) -> Failed {
    Failed {
        error: error.into(),
        attempts,
    }
}
