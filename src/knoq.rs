//! The gateway talking to Knoq as an account: the one way out. Every
//! request the gateway sends goes through [`Knoq::exchange`], whoever asks:
//! a tool's proxied request and its retries, the resend after a stale
//! cookie, keep-alive probes, reconciliation reads (and later the stream
//! poller). So each of these events is handled, and counted, once.
//!
//! One exchange, in order:
//! 0. wait, at most `upstream.queue_timeout`, for one of the
//!    `upstream.max_streams` places towards Knoq (else 503
//!    `gateway_overloaded`: nothing was sent, so it is no failure of
//!    Knoq's and no ambiguous POST);
//! 1. ask the circuit breaker for a pass (refused at once while it is open);
//! 2. attach the identity as it is at this moment: the account's cookie
//!    (`upstream_credential_missing` when there is none) or the SCIM
//!    bearer, and `Origin`;
//! 3. send, bounded as the caller says ([`ResponseBound`]);
//! 4. record the upstream metrics and tell the circuit how it went (a
//!    transport failure or a 502/503 is a failure);
//! 5. take Knoq's `Set-Cookie` lines out of the answer and apply them to
//!    the account (stored durably, then used; a changed cookie counts one
//!    rotation), so no cookie ever travels further;
//! 6. read the answer for the account: a 401 to the cookie that is still
//!    the account's means it expired (`upstream_credential_expired`); a
//!    401 to a cookie replaced meanwhile is stale ([`Answer::StaleCookie`]:
//!    Knoq checks the cookie before acting, so nothing happened and the
//!    caller may send again); any answer below 500 is a sign of life.
//!
//! Reads the gateway makes on its own ([`Knoq::read`]: probes,
//! reconciliation) follow one rule: each is charged to the account's
//! `read` quota, its user windows and no tool's share, and is not sent
//! when that quota refuses, exactly as a tool's read would be, since Knoq
//! may count it. With the default `read = []` that never refuses.
//!
//! This module knows nothing of client connections, retries or the error
//! map: it returns Knoq's answer or a typed [`GatewayError`].

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::admission;
use crate::body::BoxBody;
use crate::clock::Clock;
use crate::credentials::Credentials;
use crate::error::GatewayError;
use crate::headers::{self, UpstreamAuth};
use crate::metrics::Metrics;
use crate::quota::{Caller, Quotas};
use crate::route::Route;
use crate::upstream::retry::{Circuit, CircuitConfig};
use crate::upstream::{ResponseBound, Upstream};

/// The token name the gateway's own reads are charged under: no tool's
/// share has it, so only the account's windows count them.
pub const GATEWAY_CALLER: &str = "(gateway)";

/// Whose identity a request carries to Knoq.
#[derive(Clone, Copy)]
pub enum Identity<'a> {
    /// A Knoq account: its cookie as the credential store has it now.
    Account {
        user: &'a str,
        credentials: &'a Arc<Credentials>,
    },
    /// The organisation's SCIM token (no cookie, nothing to rotate).
    Scim(&'a HeaderValue),
}

/// Knoq's answer to one exchange.
pub enum Answer {
    /// What Knoq said, to use as it is.
    Final(Response<BoxBody>),
    /// Knoq answered 401 to a cookie that has been replaced since it was
    /// sent: nothing happened at Knoq, and sending again with the current
    /// cookie may succeed.
    StaleCookie(Response<BoxBody>),
}

/// Why a gateway-initiated read has nothing to show.
#[derive(Debug, thiserror::Error)]
pub enum ReadFailed {
    #[error("the account's read quota does not admit it now")]
    NotAdmitted,
    #[error("Knoq answered {0}")]
    Status(StatusCode),
    #[error("the read was cut off")]
    Cut,
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// The client of Knoq, long-lived: its connection pool and its circuit
/// outlast reloads that leave `[upstream]` and `[circuit]` alone.
pub struct Knoq {
    upstream: Upstream,
    /// The `upstream.ca_file` certificates this client trusts (beside the
    /// platform's): a reload compares them with the file's contents.
    pub(crate) ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Places for requests in flight to Knoq (`upstream.max_streams`),
    /// each held from sending until the answer's head arrives.
    streams: Arc<Semaphore>,
    queue_timeout: std::time::Duration,
    circuit: Circuit,
    origin: HeaderValue,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

// === impl Knoq ===

impl Knoq {
    pub fn new(
        upstream: Upstream,
        ca: Vec<rustls_pki_types::CertificateDer<'static>>,
        limits: (usize, std::time::Duration),
        origin: HeaderValue,
        circuit: &CircuitConfig,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Knoq {
            upstream,
            ca,
            streams: Arc::new(Semaphore::new(limits.0)),
            queue_timeout: limits.1,
            circuit: Circuit::new(circuit.failures, circuit.open_for),
            origin,
            metrics,
            clock,
        }
    }

    /// The upstream URI for a path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        self.upstream.uri_for(path_and_query)
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

    /// One exchange as `who` (see the module doc). `parts` has the
    /// client's identity stripped and the upstream URI set; the identity is
    /// attached here, fresh for every attempt.
    pub async fn exchange(
        &self,
        who: &Identity<'_>,
        route: Route,
        parts: &Parts,
        body: &Bytes,
        bound: ResponseBound,
    ) -> Result<Answer, GatewayError> {
        let mut parts = parts.clone();
        let sent = match who {
            Identity::Account { user, credentials } => {
                let cookie =
                    credentials
                        .cookie(user)
                        .ok_or_else(|| GatewayError::CredentialMissing {
                            user: user.to_string(),
                        })?;
                headers::attach_identity(
                    &mut parts.headers,
                    UpstreamAuth::Cookie(&cookie),
                    &self.origin,
                );
                Some(cookie)
            }
            Identity::Scim(bearer) => {
                headers::attach_identity(
                    &mut parts.headers,
                    UpstreamAuth::Bearer(bearer),
                    &self.origin,
                );
                None
            }
        };
        // Wait here, not in the HTTP client: a request that gets no place
        // in time was never sent, so it is no failure of Knoq's (the
        // circuit never hears of it) and no ambiguous POST.
        let place = match self.streams.clone().try_acquire_owned() {
            Ok(place) => place,
            // Only a request that must wait arms a timer.
            Err(_) => {
                tokio::time::timeout(self.queue_timeout, self.streams.clone().acquire_owned())
                    .await
                    .map_err(|_| GatewayError::Overloaded(admission::Full::Upstream))?
                    .expect("the semaphore is never closed")
            }
        };
        let pass = self.circuit.pass().map_err(circuit_open)?;
        let req = Request::from_parts(
            parts,
            Full::new(body.clone())
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        let started = Instant::now();
        let account = match who {
            Identity::Account { user, .. } => Some(*user),
            Identity::Scim(_) => None,
        };
        // Counted from sending until its Set-Cookie lines are applied, so a
        // 401 to another request can wait for a rotation on its way.
        let sending = match who {
            Identity::Account { user, credentials } => credentials.sending(user),
            Identity::Scim(_) => None,
        };
        let outcome = self.upstream.send(req, account, bound).await;
        self.record(route, started, &outcome);
        let failed = match &outcome {
            Ok(rsp) => matches!(
                rsp.status(),
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
            ),
            Err(_) => true,
        };
        pass.record(!failed);
        // Knoq's answers are small JSON that follows its head at once: the
        // place is given back with the head (holding it for the body would
        // let a retry wait on the place its own last answer holds).
        drop(place);
        let mut rsp = outcome?;
        let set_cookies = headers::take_set_cookies(rsp.headers_mut());
        let (Identity::Account { user, credentials }, Some(sent)) = (who, sent) else {
            return Ok(Answer::Final(rsp));
        };
        let now = self.clock.now();
        // Stored and published before anyone sees this answer, on a task
        // of its own: Knoq may already have retired the old cookie, so a
        // client that goes away now must not take the rotation with it
        // (dropping this future would otherwise drop the half-done write).
        if !set_cookies.is_empty() {
            let credentials = Arc::clone(credentials);
            let metrics = Arc::clone(&self.metrics);
            let owner = user.to_string();
            let applied = tokio::spawn(async move {
                if credentials
                    .apply_set_cookies(&owner, &set_cookies, now)
                    .await
                {
                    metrics.cookie_rotations.with_label_values(&[&owner]).inc();
                }
                drop(sending);
            });
            // Only a runtime shutting down fails this; the task's own
            // panic would be a bug that the error log line shows.
            if let Err(e) = applied.await {
                tracing::error!(user, error = %e, "applying Knoq's Set-Cookie failed");
            }
        } else {
            drop(sending);
        }
        if rsp.status() == StatusCode::UNAUTHORIZED {
            if credentials.mark_expired(user, &sent).await {
                // Knoq's 401 is about the account's cookie, not the tool's
                // token: say so, in the answer every later request gets.
                return Err(GatewayError::CredentialExpired {
                    user: user.to_string(),
                });
            }
            return Ok(Answer::StaleCookie(rsp));
        }
        if !rsp.status().is_server_error() {
            credentials.mark_success(user, now);
        }
        Ok(Answer::Final(rsp))
    }

    /// A read the gateway makes on its own as an account (see the module
    /// doc for how it is charged): `GET path_and_query`, once, and once
    /// more if the cookie turned out to be stale. Returns the body of a
    /// 200 answer.
    pub async fn read(
        &self,
        user: &str,
        credentials: &Arc<Credentials>,
        quotas: &Quotas,
        route: Route,
        path_and_query: PathAndQuery,
    ) -> Result<Bytes, ReadFailed> {
        let who = Identity::Account { user, credentials };
        let caller = Caller {
            user,
            token: GATEWAY_CALLER,
        };
        let parts = Request::get(self.uri_for(Some(&path_and_query)))
            .body(())
            .expect("a GET of a valid URI is a valid request")
            .into_parts()
            .0;
        for _ in 0..2 {
            if !quotas.charge(caller, route).await {
                return Err(ReadFailed::NotAdmitted);
            }
            let answer = self
                .exchange(&who, route, &parts, &Bytes::new(), ResponseBound::Exchange)
                .await?;
            let rsp = match answer {
                Answer::Final(rsp) => rsp,
                Answer::StaleCookie(_) => continue,
            };
            let status = rsp.status();
            let bytes = rsp
                .into_body()
                .collect()
                .await
                .map_err(|_| ReadFailed::Cut)?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(ReadFailed::Status(status));
            }
            return Ok(bytes);
        }
        Err(ReadFailed::Status(StatusCode::UNAUTHORIZED))
    }

    /// One `GET path_and_query` with the SCIM token, for `check --online`:
    /// Knoq's status (SCIM has no quota bucket, and nothing to rotate).
    pub async fn scim_status(
        &self,
        bearer: &HeaderValue,
        path_and_query: PathAndQuery,
    ) -> Result<StatusCode, GatewayError> {
        let parts = Request::get(self.uri_for(Some(&path_and_query)))
            .body(())
            .expect("a GET of a valid URI is a valid request")
            .into_parts()
            .0;
        let who = Identity::Scim(bearer);
        match self
            .exchange(
                &who,
                Route::Scim,
                &parts,
                &Bytes::new(),
                ResponseBound::Exchange,
            )
            .await?
        {
            Answer::Final(rsp) | Answer::StaleCookie(rsp) => Ok(rsp.status()),
        }
    }

    /// The upstream series of one attempt.
    fn record(
        &self,
        route: Route,
        started: Instant,
        outcome: &Result<Response<BoxBody>, crate::upstream::UpstreamError>,
    ) {
        let route = route.label();
        self.metrics
            .upstream_duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
        match outcome {
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
    }
}

/// The fail-fast answer while the circuit is open for `remaining`.
fn circuit_open(remaining: std::time::Duration) -> GatewayError {
    GatewayError::CircuitOpen {
        retry_after_secs: remaining.as_millis().div_ceil(1000).max(1) as u64,
    }
}
