//! The request pipeline: one straight line of stages per request.
//!
//! ```text
//! handle (outer: request id, one log line, error -> response)
//!   └─ handle_inner
//!        admission -> admission.rs (503 when the gateway, then the account,
//!                                   has as many requests in flight as allowed)
//!        hygiene  -> inspect.rs   (400/405/421/431; nothing read yet)
//!        auth     -> auth.rs      (401)
//!        route    -> route.rs     (400/404; SCIM needs a scim token: 403)
//!        body cap -> Content-Length against server.max_body (413)
//!        credential -> credentials.rs (the user has a usable cookie, or the
//!                                    SCIM token is configured)
//!        quota    -> quota/       (429; consumes quota only when admitted)
//!        rewrite  -> headers.rs   (strip the client's identity)
//!        forward  -> forward.rs   (retries, reconciliation) -> knoq.rs (per
//!                                 attempt: circuit, cookie + Origin, metrics,
//!                                 Set-Cookie rotation, 401 expiry or resend)
//!                                 -> upstream/ (one bounded exchange)
//!        response -> headers.rs   (strip hop-by-hop, CORS, Alt-Svc)
//! ```
//!
//! Each stage returns a typed error that `?` lifts into `GatewayError`;
//! only `error.rs` turns it into a status. The body is never read before
//! authentication, so `Expect: 100-continue` is answered only for a valid
//! token (hyper sends `100 Continue` when the body is first polled). Both
//! bodies stream; a client that goes away drops this future, and with it
//! the upstream request; the request is still logged and counted, as 499.

use std::sync::Arc;

use http::header::{CONTENT_LENGTH, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::admission::{Counters, Limits};
use crate::auth::{Principal, TokenTable};
use crate::body::{self, BodyFault, BoxBody};
use crate::clock::Clock;
use crate::credentials::{CredentialState, Credentials};
use crate::error::{Blame, GatewayError};
use crate::forward::{Forwarder, Outbound, X_ATTEMPTS};
use crate::headers::{self, X_REQUEST_ID};
use crate::inspect::HygieneRules;
use crate::knoq::Identity;
use crate::metrics::{Metrics, Snapshot};
use crate::quota::{Bucket, Caller, Quotas};
use crate::route::{self, Route};

/// The status an abandoned request is logged and counted with: the client
/// closed the connection before the answer (nginx's 499).
pub const CLIENT_CLOSED: u16 = 499;

/// Everything the request path needs for one configuration. Built by
/// `assemble.rs`, at start-up and at every reload.
pub struct Gateway {
    pub(crate) hygiene: HygieneRules,
    pub(crate) max_body: u64,
    pub(crate) tokens: TokenTable,
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) quotas: Quotas,
    pub(crate) clock: Arc<dyn Clock>,
    /// The configuration this gateway was built from.
    pub(crate) config: Arc<crate::config::Config>,
    pub(crate) metrics: Arc<Metrics>,
    /// The in-flight counters (shared by every configuration) and this
    /// configuration's caps on them.
    pub(crate) admission: (Counters, Limits),
}

/// Facts the stages learn about one request, read once at the end for the
/// log line and the metrics: pingora's per-request `CTX`.
struct RequestCtx {
    request_id: HeaderValue,
    /// The client's address (the TCP peer).
    client: std::net::SocketAddr,
    start: Instant,
    method: Method,
    route: Option<Route>,
    principal: Option<Principal>,
    upstream_status: Option<StatusCode>,
    /// Upstream attempts made (0 when the gateway answered by itself).
    attempts: u32,
}

/// Holds one request's place in `knoq_gateway_inflight_requests` and owes
/// it one log line and one `knoq_gateway_requests_total` sample. Dropped
/// without [`finish`](InFlight::finish) (the client went away and hyper
/// dropped the handler's future), it still pays both, with status 499.
struct InFlight<'g> {
    gateway: &'g Gateway,
    ctx: RequestCtx,
    finished: bool,
}

impl<'g> InFlight<'g> {
    fn begin(gateway: &'g Gateway, ctx: RequestCtx) -> Self {
        gateway.metrics.inflight.inc();
        InFlight {
            gateway,
            ctx,
            finished: false,
        }
    }

    /// The answer is ready: its log line and sample, once.
    fn finish(&mut self, status: StatusCode) {
        self.finished = true;
        self.gateway.record(&self.ctx, status);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.gateway.metrics.inflight.dec();
        if !self.finished {
            let closed = StatusCode::from_u16(CLIENT_CLOSED).expect("499 is a valid status code");
            self.gateway.record(&self.ctx, closed);
        }
    }
}

/// Every cause below an error, joined: "a: b: c". Our errors and the
/// libraries' below them describe what failed, never a header or body.
fn cause_chain(err: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut next = err.source();
    while let Some(e) = next {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

// === impl Gateway ===

impl Gateway {
    /// Runs the pipeline for one request. Never fails: errors become JSON.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: std::net::SocketAddr,
    ) -> Response<BoxBody> {
        let ctx = RequestCtx {
            request_id: headers::request_id(req.headers()),
            client,
            start: Instant::now(),
            method: req.method().clone(),
            route: None,
            principal: None,
            upstream_status: None,
            attempts: 0,
        };
        let mut inflight = InFlight::begin(self, ctx);
        let result = self.handle_inner(req, &mut inflight.ctx).await;
        let ctx = &inflight.ctx;
        let mut rsp = match result {
            Ok(rsp) => rsp,
            Err(err) => {
                let reply = err.reply();
                // Causes go to the log (never to the client). A client's
                // own mistake is not worth a warning, and neither is a
                // request failed fast by a state already logged once when
                // it began (an expired or missing cookie, an open circuit).
                let request_id = ctx.request_id.to_str().unwrap_or("-");
                let cause = cause_chain(&err);
                match reply.blame {
                    _ if err.fails_fast() || reply.blame == Blame::Downstream => {
                        tracing::debug!(request_id, code = reply.code, error = %err, "refused")
                    }
                    _ if cause.is_empty() => tracing::warn!(
                        request_id,
                        code = reply.code,
                        error = %err,
                        "request failed"
                    ),
                    _ => tracing::warn!(
                        request_id,
                        code = reply.code,
                        error = %err,
                        cause = %cause,
                        "request failed"
                    ),
                }
                if let (GatewayError::Quota(q), Some(p)) = (&err, &ctx.principal) {
                    self.metrics
                        .quota_rejections
                        .with_label_values(&[
                            &p.user,
                            &p.token,
                            q.standing.bucket.label(),
                            q.standing.scope.label(),
                        ])
                        .inc();
                }
                err.into_response(ctx.attempts)
            }
        };
        if ctx.attempts > 0 {
            rsp.headers_mut()
                .insert(X_ATTEMPTS, HeaderValue::from(ctx.attempts));
        }
        rsp.headers_mut()
            .insert(X_REQUEST_ID, ctx.request_id.clone());
        inflight.finish(rsp.status());
        rsp
    }

    /// The one log line and the request series of a finished (or
    /// abandoned) request.
    fn record(&self, ctx: &RequestCtx, status: StatusCode) {
        let (user, token) = match &ctx.principal {
            Some(p) => (&*p.user, &*p.token),
            None => ("-", "-"),
        };
        let seconds = ctx.start.elapsed().as_secs_f64();
        self.metrics
            .record_request(ctx.route, &ctx.method, status, user, token, seconds);
        tracing::info!(
            request_id = ctx.request_id.to_str().unwrap_or("-"),
            client = %ctx.client,
            method = ctx.method.as_str(),
            // The same names as the metrics' `route` label.
            route = crate::metrics::route_label(ctx.route),
            user,
            token,
            status = status.as_u16(),
            upstream_status = ctx.upstream_status.map_or(0, |s| s.as_u16()),
            attempts = ctx.attempts,
            duration_us = (seconds * 1e6) as u64,
            "request"
        );
    }

    /// The state gauges' values now, for `/metrics`: read from memory
    /// only, so a scrape never waits on Knoq or a store.
    pub fn snapshot(&self) -> Snapshot {
        let credentials = self
            .credentials
            .status()
            .into_iter()
            .map(|s| {
                let valid = !matches!(s.state, CredentialState::Expired | CredentialState::Missing);
                (s.user, valid)
            })
            .collect();
        let mut quota_remaining = Vec::new();
        for user in &self.config.users {
            for bucket in Bucket::ALL {
                for (w, left) in self.quotas.headroom(&user.name, bucket) {
                    quota_remaining.push((
                        user.name.clone(),
                        bucket.label(),
                        w.unit_label().to_string(),
                        left,
                    ));
                }
            }
        }
        Snapshot {
            circuit_open: self.forwarder.knoq.circuit_open(),
            credentials,
            quota_remaining,
            problems: Vec::new(),
        }
    }

    /// One pass through the forward stage, noting what it did in `ctx`.
    async fn forward(
        &self,
        outbound: &Outbound<'_>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<BoxBody>, GatewayError> {
        match self.forwarder.send(outbound).await {
            Ok((rsp, attempts)) => {
                ctx.attempts += attempts;
                ctx.upstream_status = Some(rsp.status());
                Ok(rsp)
            }
            Err(failed) => {
                ctx.attempts += failed.attempts;
                Err(failed.error)
            }
        }
    }

    async fn handle_inner(
        &self,
        req: Request<Incoming>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<BoxBody>, GatewayError> {
        // Overload is refused first, before anything is read or charged.
        let (counters, limits) = &self.admission;
        let mut slot = counters.enter(*limits).map_err(GatewayError::Overloaded)?;
        let (mut parts, body) = req.into_parts();
        self.hygiene.check(&parts)?;

        let principal = self
            .tokens
            .authenticate(&parts.headers, || self.clock.now())?
            .clone();
        ctx.principal = Some(principal.clone());
        counters
            .enter_user(&mut slot, &principal.user, *limits)
            .map_err(GatewayError::Overloaded)?;

        let route = route::classify(&parts.method, parts.uri.path())?;
        ctx.route = Some(route);

        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body) {
            return Err(GatewayError::BodyTooLarge {
                limit: self.max_body,
            });
        }

        let identity = if route.is_scim() {
            if !principal.scim {
                return Err(GatewayError::ScimForbidden);
            }
            Identity::Scim(
                self.credentials
                    .scim_bearer()
                    .ok_or(GatewayError::ScimNotConfigured)?,
            )
        } else {
            let user = || principal.user.to_string();
            if self.credentials.is_expired(&principal.user) {
                // Fail fast: Knoq would only answer 401 again.
                return Err(GatewayError::CredentialExpired { user: user() });
            }
            if !self.credentials.has_cookie(&principal.user) {
                return Err(GatewayError::CredentialMissing { user: user() });
            }
            Identity::Account {
                user: &principal.user,
                credentials: &self.credentials,
            }
        };
        // The body is read whole (bounded by max_body) so that an attempt
        // can be replayed; Knoq's bodies are small JSON.
        let body = body::read_capped(body, self.max_body)
            .await
            .map_err(|fault| match fault {
                BodyFault::TooLarge => GatewayError::BodyTooLarge {
                    limit: self.max_body,
                },
                BodyFault::Failed => GatewayError::ClientBodyFailed,
            })?;

        // Quota last before sending: a request refused for another reason
        // (including an open circuit) consumes nothing.
        self.forwarder.knoq.precheck()?;
        let caller = Caller {
            user: &principal.user,
            token: &principal.token,
        };
        let grant = self.quotas.admit(caller, route).await?;

        headers::strip_client_identity(&mut parts.headers);
        // Unique per request: HPACK must not index it, or every request
        // would evict the cookie and origin from the upstream connection's
        // header table (h2 then re-encodes them in full).
        let mut request_id = ctx.request_id.clone();
        request_id.set_sensitive(true);
        parts.headers.insert(X_REQUEST_ID, request_id);
        parts.uri = self.forwarder.knoq.uri_for(parts.uri.path_and_query());

        let outbound = Outbound {
            parts,
            body,
            route,
            identity,
            caller,
            quotas: &self.quotas,
            arrived: ctx.start,
        };
        let mut rsp = self.forward(&outbound, ctx).await?;
        headers::filter_response(rsp.headers_mut());

        if rsp.status() == StatusCode::TOO_MANY_REQUESTS {
            if let Some(bucket) = Bucket::for_route(route) {
                self.metrics
                    .upstream_rate_limited
                    .with_label_values(&[&principal.user, bucket.label()])
                    .inc();
            }
            let retry_after = rsp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok());
            self.quotas.knoq_refused(caller, route, retry_after).await;
        }
        if let Some(standing) = grant.and_then(|g| g.tightest) {
            headers::insert_rate_limit(rsp.headers_mut(), &standing);
        }
        Ok(rsp)
    }
}
