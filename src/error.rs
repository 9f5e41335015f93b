//! The one place that decides what a client sees when the gateway itself
//! answers: status, stable `code`, message, and extra headers.
//!
//! Leaf stages return their own typed errors (`HygieneError`, `AuthError`,
//! `PathError`, `UpstreamError`); they flow up into [`GatewayError`] and are
//! mapped here by one exhaustive `match` (no `_ =>` arm, so a new variant
//! cannot silently become a 500). Bodies are Knoq-shaped JSON,
//! `{"error": "...", "code": "..."}`, and never carry internal detail: the
//! cause chain goes to the log, not to the client.

use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use serde_json::json;

use crate::admission::Full;
use crate::auth::AuthError;
use crate::body::{self, BoxBody};
use crate::inspect::{HygieneError, ALLOWED_METHODS};
use crate::quota::{QuotaError, QuotaExceeded, StoreError};
use crate::route::PathError;
use crate::upstream::UpstreamError;

/// Everything that makes the gateway answer instead of Knoq.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Hygiene(#[from] HygieneError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("this token may not use the SCIM API")]
    ScimForbidden,
    #[error("the gateway has no SCIM token configured")]
    ScimNotConfigured,
    #[error("no Knoq session cookie is loaded for user '{user}'")]
    CredentialMissing { user: String },
    #[error("the Knoq session cookie for user '{user}' was rejected by Knoq; give the gateway a fresh one with `knoq-gateway credentials set {user}`")]
    CredentialExpired { user: String },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body ended abnormally while it was being sent to Knoq")]
    ClientBodyFailed,
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// The quota store could not decide; nothing was sent.
    #[error(transparent)]
    QuotaStore(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("Knoq is failing; the gateway is not sending requests for a while")]
    CircuitOpen { retry_after_secs: u64 },
    #[error("the gateway has as many client connections open as it allows")]
    TooManyConnections,
    #[error("the gateway is handling as many requests as it allows ({})", match .0 { Full::Gateway => "in all", Full::Account => "for this account", Full::Upstream => "towards Knoq" })]
    Overloaded(Full),
    #[error("the request may or may not have been applied by Knoq; {checked}")]
    OutcomeUnknown { timed_out: bool, checked: String },
}

impl From<QuotaError> for GatewayError {
    fn from(e: QuotaError) -> Self {
        match e {
            QuotaError::Exceeded(q) => GatewayError::Quota(q),
            QuotaError::Store(s) => GatewayError::QuotaStore(s),
        }
    }
}

/// Who caused the failure, as pingora's `ErrorSource`: decides log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something we refuse (4xx).
    Downstream,
    /// Knoq, or the way to it, failed (5xx).
    Upstream,
    /// The gateway's own configuration or state (5xx).
    Internal,
}

/// The client-facing form of an error.
pub struct ErrorReply {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub blame: Blame,
}

// === impl GatewayError ===

impl GatewayError {
    /// Refused at once because of a state that was logged once when it
    /// began (so its requests need no warning each).
    pub fn fails_fast(&self) -> bool {
        matches!(
            self,
            GatewayError::CredentialExpired { .. }
                | GatewayError::CredentialMissing { .. }
                | GatewayError::CircuitOpen { .. }
        )
    }

    pub fn reply(&self) -> ErrorReply {
        use Blame::*;
        let (status, code, blame) = match self {
            GatewayError::Hygiene(h) => match h {
                HygieneError::NotOriginForm => {
                    (StatusCode::BAD_REQUEST, "bad_request_target", Downstream)
                }
                HygieneError::MethodNotAllowed(_) => (
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    Downstream,
                ),
                HygieneError::UnderscoreHeader => {
                    (StatusCode::BAD_REQUEST, "bad_header_name", Downstream)
                }
                HygieneError::AmbiguousFraming => {
                    (StatusCode::BAD_REQUEST, "ambiguous_framing", Downstream)
                }
                HygieneError::HeadersTooLarge { .. } => (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers_too_large",
                    Downstream,
                ),
                HygieneError::MissingHost => (StatusCode::BAD_REQUEST, "missing_host", Downstream),
                HygieneError::AmbiguousHost => {
                    (StatusCode::BAD_REQUEST, "ambiguous_host", Downstream)
                }
                HygieneError::UnsupportedExpectation => (
                    StatusCode::EXPECTATION_FAILED,
                    "expectation_failed",
                    Downstream,
                ),
                HygieneError::MisdirectedHost => (
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected_request",
                    Downstream,
                ),
            },
            GatewayError::Auth(_) => (StatusCode::UNAUTHORIZED, "unauthorized", Downstream),
            GatewayError::Path(p) if p.is_not_found() => {
                (StatusCode::NOT_FOUND, "not_found", Downstream)
            }
            GatewayError::Path(_) => (StatusCode::BAD_REQUEST, "bad_path", Downstream),
            GatewayError::ScimForbidden => (StatusCode::FORBIDDEN, "forbidden", Downstream),
            GatewayError::ScimNotConfigured => {
                (StatusCode::FORBIDDEN, "scim_not_configured", Internal)
            }
            GatewayError::CredentialExpired { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_credential_expired",
                Internal,
            ),
            GatewayError::CredentialMissing { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_credential_missing",
                Internal,
            ),
            GatewayError::BodyTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", Downstream)
            }
            GatewayError::ClientBodyFailed => {
                (StatusCode::BAD_REQUEST, "bad_request_body", Downstream)
            }
            GatewayError::Quota(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", Downstream),
            // Provisional until the shared store lands (the local store
            // never fails): refuse rather than risk exceeding Knoq's limits.
            GatewayError::QuotaStore(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "quota_store_unavailable",
                Internal,
            ),
            GatewayError::CircuitOpen { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_unavailable",
                Upstream,
            ),
            GatewayError::TooManyConnections => (
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                Internal,
            ),
            GatewayError::Overloaded(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "gateway_overloaded",
                Internal,
            ),
            GatewayError::OutcomeUnknown {
                timed_out: true, ..
            } => (StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", Upstream),
            GatewayError::OutcomeUnknown {
                timed_out: false, ..
            } => (StatusCode::BAD_GATEWAY, "outcome_unknown", Upstream),
            GatewayError::Upstream(u) => match u {
                UpstreamError::Connect(_) => {
                    (StatusCode::BAD_GATEWAY, "upstream_unreachable", Upstream)
                }
                UpstreamError::Tls(_) => (StatusCode::BAD_GATEWAY, "upstream_tls", Upstream),
                UpstreamError::Timeout(_) => {
                    (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", Upstream)
                }
                UpstreamError::Reset(_) => (StatusCode::BAD_GATEWAY, "upstream_reset", Upstream),
                UpstreamError::Protocol(_) => {
                    (StatusCode::BAD_GATEWAY, "upstream_bad_response", Upstream)
                }
            },
        };
        ErrorReply {
            status,
            code,
            message: self.client_message(),
            blame,
        }
    }

    /// What the client reads: what happened and what to do. Built from our
    /// own words only, never from a cause's text (which may carry detail).
    fn client_message(&self) -> String {
        match self {
            GatewayError::Auth(e) => format!("{e}; get a token from the gateway's operator"),
            GatewayError::ScimNotConfigured => {
                "SCIM is not enabled on this gateway; ask its operator to set scim.token_file".into()
            }
            GatewayError::CredentialMissing { user } => format!(
                "the gateway has no Knoq session cookie for user '{user}'; its operator must provide one"
            ),
            GatewayError::Upstream(UpstreamError::Connect(_)) => {
                "Knoq could not be reached; retry later".into()
            }
            GatewayError::Upstream(UpstreamError::Tls(_)) => {
                "the TLS connection to Knoq failed (certificate or protocol); retry later or ask the gateway's operator".into()
            }
            GatewayError::Upstream(UpstreamError::Timeout(d)) => format!(
                "Knoq did not answer within {}; it may still have acted on the request",
                crate::units::format_duration(*d)
            ),
            GatewayError::Quota(q) => format!("{q}; retry after {} s", q.retry_after_secs),
            GatewayError::QuotaStore(_) => {
                "the gateway cannot reach its quota store, so it sent nothing; retry shortly".into()
            }
            GatewayError::TooManyConnections => {
                "the gateway has as many client connections open as it allows; retry shortly, or reuse a connection".into()
            }
            GatewayError::Overloaded(Full::Gateway) => {
                "the gateway is handling as many requests as it allows; nothing was sent to Knoq; retry shortly".into()
            }
            GatewayError::Overloaded(Full::Upstream) => {
                "the gateway has as many requests in flight to Knoq as it allows and none finished in time; nothing was sent to Knoq; retry shortly".into()
            }
            GatewayError::Overloaded(Full::Account) => {
                "this Knoq account has as many requests in flight as the gateway allows one account; nothing was sent to Knoq; retry shortly".into()
            }
            GatewayError::Upstream(UpstreamError::Reset(_)) => {
                "the connection to Knoq closed before a complete answer; it may still have acted on the request".into()
            }
            other => other.to_string(),
        }
    }

    /// Builds the JSON response for this error.
    /// Builds the JSON response for this error. `attempts` (upstream
    /// attempts made, 0 if none) is added to the body of upstream failures.
    pub fn into_response(self, attempts: u32) -> Response<BoxBody> {
        let reply = self.reply();
        let mut rsp = Response::builder()
            .status(reply.status)
            .header(CONTENT_TYPE, "application/json");
        match &self {
            GatewayError::Auth(AuthError::Unknown) => {
                rsp = rsp.header(WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"");
            }
            GatewayError::Auth(_) => rsp = rsp.header(WWW_AUTHENTICATE, "Bearer"),
            GatewayError::Hygiene(HygieneError::MethodNotAllowed(_)) => {
                rsp = rsp.header(ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
            }
            // The framing of the rest of the stream is unknowable: close it.
            GatewayError::Hygiene(HygieneError::AmbiguousFraming) => {
                rsp = rsp.header(CONNECTION, "close");
            }
            GatewayError::CredentialMissing { .. } | GatewayError::CredentialExpired { .. } => {
                rsp = rsp.header(RETRY_AFTER, "60")
            }
            GatewayError::Quota(q) => rsp = rsp.header(RETRY_AFTER, q.retry_after_secs),
            GatewayError::QuotaStore(_) => rsp = rsp.header(RETRY_AFTER, "1"),
            GatewayError::TooManyConnections => {
                rsp = rsp.header(RETRY_AFTER, "1").header(CONNECTION, "close")
            }
            GatewayError::Overloaded(_) => rsp = rsp.header(RETRY_AFTER, "1"),
            GatewayError::CircuitOpen { retry_after_secs } => {
                rsp = rsp.header(RETRY_AFTER, *retry_after_secs)
            }
            _ => {}
        }
        let mut body = json!({ "error": reply.message, "code": reply.code });
        if let GatewayError::Quota(q) = &self {
            body["bucket"] = q.standing.bucket.label().into();
            body["limit"] = q.limit().into();
            body["scope"] = q.standing.scope.label().into();
            body["retryAfter"] = q.retry_after_secs.into();
        }
        if let GatewayError::OutcomeUnknown { checked, .. } = &self {
            body["checked"] = checked.as_str().into();
        }
        if reply.blame == Blame::Upstream && attempts > 0 {
            body["attempts"] = attempts.into();
        }
        let mut rsp = rsp
            .body(body::json(&body))
            .expect("static status and headers make a valid response");
        if let GatewayError::Quota(q) = &self {
            crate::headers::insert_rate_limit(rsp.headers_mut(), &q.standing);
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_and_code(e: GatewayError) -> (u16, &'static str) {
        let r = e.reply();
        (r.status.as_u16(), r.code)
    }

    #[test]
    fn each_error_maps_to_its_documented_status() {
        let io = || -> crate::body::BoxError { "x".into() };
        let cases: Vec<(GatewayError, u16, &str)> = vec![
            (
                HygieneError::NotOriginForm.into(),
                400,
                "bad_request_target",
            ),
            (
                HygieneError::MethodNotAllowed(http::Method::TRACE).into(),
                405,
                "method_not_allowed",
            ),
            (
                HygieneError::UnderscoreHeader.into(),
                400,
                "bad_header_name",
            ),
            (
                HygieneError::AmbiguousFraming.into(),
                400,
                "ambiguous_framing",
            ),
            (
                HygieneError::HeadersTooLarge { limit: 1 }.into(),
                431,
                "headers_too_large",
            ),
            (
                HygieneError::MisdirectedHost.into(),
                421,
                "misdirected_request",
            ),
            (HygieneError::AmbiguousHost.into(), 400, "ambiguous_host"),
            (
                HygieneError::UnsupportedExpectation.into(),
                417,
                "expectation_failed",
            ),
            (
                GatewayError::CredentialExpired { user: "a".into() },
                503,
                "upstream_credential_expired",
            ),
            (AuthError::Missing.into(), 401, "unauthorized"),
            (AuthError::Unknown.into(), 401, "unauthorized"),
            (PathError::NotFound.into(), 404, "not_found"),
            (PathError::DotSegment.into(), 400, "bad_path"),
            (GatewayError::ScimForbidden, 403, "forbidden"),
            (
                GatewayError::TooManyConnections,
                503,
                "too_many_connections",
            ),
            (
                StoreError::Timeout(std::time::Duration::from_millis(50)).into(),
                503,
                "quota_store_unavailable",
            ),
            (
                GatewayError::CircuitOpen {
                    retry_after_secs: 3,
                },
                503,
                "upstream_unavailable",
            ),
            (
                GatewayError::OutcomeUnknown {
                    timed_out: true,
                    checked: String::new(),
                },
                504,
                "outcome_unknown",
            ),
            (
                GatewayError::OutcomeUnknown {
                    timed_out: false,
                    checked: String::new(),
                },
                502,
                "outcome_unknown",
            ),
            (
                GatewayError::BodyTooLarge { limit: 1 },
                413,
                "body_too_large",
            ),
            (GatewayError::ClientBodyFailed, 400, "bad_request_body"),
            (
                UpstreamError::Connect(io()).into(),
                502,
                "upstream_unreachable",
            ),
            (UpstreamError::Tls(io()).into(), 502, "upstream_tls"),
            (UpstreamError::Reset(io()).into(), 502, "upstream_reset"),
            (
                UpstreamError::Protocol(io()).into(),
                502,
                "upstream_bad_response",
            ),
            (
                UpstreamError::Timeout(std::time::Duration::from_secs(1)).into(),
                504,
                "upstream_timeout",
            ),
            (
                GatewayError::CredentialMissing { user: "a".into() },
                503,
                "upstream_credential_missing",
            ),
        ];
        for (err, status, code) in cases {
            assert_eq!(status_and_code(err), (status, code));
        }
    }

    #[test]
    fn upstream_cause_text_never_reaches_the_client() {
        let err = GatewayError::Upstream(UpstreamError::Connect(
            "dns lookup of secret-host failed".into(),
        ));
        assert!(!err.reply().message.contains("secret-host"));
    }

    #[test]
    fn unauthorized_carries_www_authenticate() {
        let rsp = GatewayError::Auth(AuthError::Missing).into_response(0);
        assert_eq!(rsp.headers()[WWW_AUTHENTICATE], "Bearer");
        assert_eq!(rsp.headers()[CONTENT_TYPE], "application/json");
    }
}
