//! The request pipeline: one straight line of stages per request.
//!
//! ```text
//! handle (outer: request id, one log line, error -> response)
//!   └─ handle_inner
//!        hygiene  -> inspect.rs   (400/405/421/431; nothing read yet)
//!        auth     -> auth.rs      (401)
//!        route    -> route.rs     (400/404; SCIM needs a scim token: 403)
//!        body cap -> Content-Length against server.max_body (413)
//!        credential -> credentials.rs (the user's cookie or the SCIM token)
//!        quota    -> quota/       (429; consumes quota only when admitted)
//!        rewrite  -> headers.rs   (strip client identity, inject cookie + Origin)
//!        upstream -> upstream/    (one exchange, deadline-bounded)
//!        response -> headers.rs   (strip Set-Cookie, hop-by-hop, CORS, Alt-Svc)
//!        lifecycle -> credentials.rs (store rotated cookies; a 401 marks the
//!                                    cookie expired, or, if it was rotated
//!                                    meanwhile, the request goes once more)
//! ```
//!
//! Each stage returns a typed error that `?` lifts into `GatewayError`;
//! only `error.rs` turns it into a status. The body is never read before
//! authentication, so `Expect: 100-continue` is answered only for a valid
//! token (hyper sends `100 Continue` when the body is first polled). Both
//! bodies stream; a client that goes away drops this future, and with it
//! the upstream request.

use std::sync::Arc;

use http::header::{CONTENT_LENGTH, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::auth::{Principal, TokenTable};
use crate::body::{self, BodyFault, BoxBody};
use crate::clock::Clock;
use crate::credentials::Credentials;
use crate::error::{Blame, GatewayError};
use crate::forward::{Forwarder, Outbound, X_ATTEMPTS};
use crate::headers::{self, UpstreamAuth, X_REQUEST_ID};
use crate::inspect::HygieneRules;
use crate::metrics::Metrics;
use crate::quota::{Bucket, Caller, Quotas};
use crate::route::{self, Route};

/// Everything the request path needs, built once at start-up.
pub struct Gateway {
    pub(crate) hygiene: HygieneRules,
    pub(crate) max_body: u64,
    pub(crate) tokens: TokenTable,
    pub(crate) credentials: Arc<Credentials>,
    pub(crate) forwarder: Arc<Forwarder>,
    pub(crate) origin: HeaderValue,
    pub(crate) quotas: Quotas,
    pub(crate) clock: Arc<dyn Clock>,
    /// The configuration this gateway was built from.
    pub(crate) config: Arc<crate::config::Config>,
    pub(crate) metrics: Arc<Metrics>,
}

/// Facts the stages learn about one request, read once at the end for the
/// log line (and, later, metrics): pingora's per-request `CTX`.
struct RequestCtx {
    request_id: HeaderValue,
    start: Instant,
    route: Option<Route>,
    principal: Option<Principal>,
    upstream_status: Option<StatusCode>,
    /// Upstream attempts made (0 when the gateway answered by itself).
    attempts: u32,
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
    pub async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody> {
        let mut ctx = RequestCtx {
            request_id: headers::request_id(req.headers()),
            start: Instant::now(),
            route: None,
            principal: None,
            upstream_status: None,
            attempts: 0,
        };
        let method = req.method().clone();
        self.metrics.inflight.inc();
        let result = self.handle_inner(req, &mut ctx).await;
        self.metrics.inflight.dec();
        let mut rsp = match result {
            Ok(rsp) => rsp,
            Err(err) => {
                let reply = err.reply();
                // Causes go to the log (never to the client); a client's
                // own mistake is not worth a warning.
                match reply.blame {
                    Blame::Downstream => {
                        tracing::debug!(request_id = ?ctx.request_id, code = reply.code, error = %err, "refused")
                    }
                    Blame::Upstream | Blame::Internal => tracing::warn!(
                        request_id = ?ctx.request_id,
                        code = reply.code,
                        error = %err,
                        cause = %cause_chain(&err),
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
        let (user, token) = match &ctx.principal {
            Some(p) => (&*p.user, &*p.token),
            None => ("-", "-"),
        };
        let seconds = ctx.start.elapsed().as_secs_f64();
        self.metrics
            .record_request(ctx.route, &method, rsp.status(), user, token, seconds);
        tracing::info!(
            request_id = ctx.request_id.to_str().unwrap_or("-"),
            method = method.as_str(),
            route = ctx.route.map_or("-", Route::label),
            user,
            token,
            status = rsp.status().as_u16(),
            upstream_status = ctx.upstream_status.map_or(0, |s| s.as_u16()),
            attempts = ctx.attempts,
            duration_us = (seconds * 1e6) as u64,
            "request"
        );
        rsp
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
        let (mut parts, body) = req.into_parts();
        self.hygiene.check(&parts)?;

        let principal = self.tokens.authenticate(&parts.headers)?.clone();
        ctx.principal = Some(principal.clone());

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

        let cookie;
        let auth = if route.is_scim() {
            if !principal.scim {
                return Err(GatewayError::ScimForbidden);
            }
            UpstreamAuth::Bearer(
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
            cookie = self
                .credentials
                .cookie(&principal.user)
                .ok_or_else(|| GatewayError::CredentialMissing { user: user() })?;
            UpstreamAuth::Cookie(&cookie)
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
        self.forwarder.precheck()?;
        let caller = Caller {
            user: &principal.user,
            token: &principal.token,
        };
        let grant = self.quotas.admit(caller, route).await?;

        let cookie_ref = match &auth {
            UpstreamAuth::Cookie(c) => Some(*c),
            UpstreamAuth::Bearer(_) => None,
        };
        headers::rewrite_request(&mut parts.headers, auth, &self.origin);
        // Unique per request: HPACK must not index it, or every request
        // would evict the cookie and origin from the upstream connection's
        // header table (h2 then re-encodes them in full).
        let mut request_id = ctx.request_id.clone();
        request_id.set_sensitive(true);
        parts.headers.insert(X_REQUEST_ID, request_id);
        parts.uri = self.forwarder.upstream.uri_for(parts.uri.path_and_query());

        let charge_retry = || self.quotas.charge_retry(caller, route);
        let mut outbound = Outbound {
            parts,
            body,
            route,
            user: &principal.user,
            arrived: ctx.start,
            cookie: cookie_ref,
            origin: &self.origin,
            charge_retry: &charge_retry,
        };
        let mut rsp = self.forward(&outbound, ctx).await?;
        let mut set_cookies = headers::filter_response(rsp.headers_mut());

        if let Some(sent) = cookie_ref {
            let now = self.clock.now();
            if !set_cookies.is_empty() {
                // Stored and published before the client gets its answer.
                let rotated = self
                    .credentials
                    .apply_set_cookies(&principal.user, &set_cookies, now)
                    .await;
                if rotated {
                    self.metrics
                        .cookie_rotations
                        .with_label_values(&[&principal.user])
                        .inc();
                }
            }
            if rsp.status() == StatusCode::UNAUTHORIZED
                && self.credentials.mark_expired(&principal.user, sent).await
            {
                // Knoq's 401 is about the account's cookie, not the tool's
                // token: say so, in the answer every later request gets.
                return Err(GatewayError::CredentialExpired {
                    user: principal.user.to_string(),
                });
            }
            if rsp.status() == StatusCode::UNAUTHORIZED {
                // The cookie was rotated while this request was in flight:
                // Knoq checks the cookie before acting, so nothing happened;
                // send it once more with the current cookie.
                // It is one more send: it needs quota like a retry.
                let current = self
                    .credentials
                    .cookie(&principal.user)
                    .filter(|_| self.quotas.charge_retry(caller, route));
                if let Some(current) = current {
                    outbound.parts.headers.insert(http::header::COOKIE, current);
                    rsp = self.forward(&outbound, ctx).await?;
                    set_cookies = headers::filter_response(rsp.headers_mut());
                    self.credentials
                        .apply_set_cookies(&principal.user, &set_cookies, now)
                        .await;
                    let resent = &outbound.parts.headers[http::header::COOKIE];
                    if rsp.status() == StatusCode::UNAUTHORIZED
                        && self.credentials.mark_expired(&principal.user, resent).await
                    {
                        return Err(GatewayError::CredentialExpired {
                            user: principal.user.to_string(),
                        });
                    }
                }
            }
            if rsp.status() != StatusCode::UNAUTHORIZED {
                self.credentials.mark_success(&principal.user, now);
            }
        }
        if rsp.status() == StatusCode::TOO_MANY_REQUESTS {
            if let Some(bucket) = Bucket::for_route(route) {
                self.metrics
                    .upstream_rate_limited
                    .with_label_values(&[&principal.user, bucket.label()])
                    .inc();
            }
            let retry_after = rsp.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok());
            self.quotas.knoq_refused(caller, route, retry_after);
        }
        if let Some(standing) = grant.and_then(|g| g.tightest) {
            headers::insert_rate_limit(rsp.headers_mut(), &standing);
        }
        Ok(rsp)
    }
}
