//! `knoq-gateway check --online` and the check `credentials set` makes:
//! ask Knoq whether each account's cookie, and the SCIM token, are
//! accepted, before any tool's request finds out.
//!
//! One cheap authenticated read per account (`GET
//! /api/managed-agents/sessions`), sent as one of the gateway's own reads
//! (`knoq.rs`): charged to the account's `read` windows, not sent when
//! they refuse, no retry. The SCIM token, when configured, is shown to
//! `GET /api/scim/v2/Users?count=1`. Knoq's answer is applied as a running
//! gateway would (a rotated cookie is stored; a 401 marks it expired).

use std::fmt;

use http::uri::PathAndQuery;
use http::StatusCode;

use crate::error::GatewayError;
use crate::knoq::ReadFailed;
use crate::pipeline::Gateway;
use crate::route::Route;

/// What Knoq made of one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Knoq accepted it.
    Valid,
    /// Knoq refused it (401 or 403): a human must provide a new one.
    Rejected(String),
    /// No answer about it: Knoq could not be reached, answered 5xx, or the
    /// request was not sent.
    Unreachable(String),
    /// There is nothing to check (no cookie yet).
    Missing(String),
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        *self == Verdict::Valid
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Valid => f.write_str("valid"),
            Verdict::Rejected(why) => write!(f, "rejected: {why}"),
            Verdict::Unreachable(why) => write!(f, "unreachable: {why}"),
            Verdict::Missing(why) => write!(f, "missing: {why}"),
        }
    }
}

/// Checks one account's cookie with Knoq.
pub async fn account(gateway: &Gateway, user: &str) -> Verdict {
    if !gateway.credentials.has_cookie(user) {
        return Verdict::Missing(format!(
            "no cookie; set one with `knoq-gateway credentials set {user}`"
        ));
    }
    let read = gateway
        .forwarder
        .knoq
        .read(
            user,
            &gateway.credentials,
            &gateway.quotas,
            Route::SessionsList,
            PathAndQuery::from_static("/api/managed-agents/sessions"),
        )
        .await;
    match read {
        Ok(_) => Verdict::Valid,
        Err(ReadFailed::Gateway(GatewayError::CredentialExpired { .. }))
        | Err(ReadFailed::Status(StatusCode::UNAUTHORIZED)) => Verdict::Rejected(format!(
            "Knoq answered 401; set a new cookie with `knoq-gateway credentials set {user}`"
        )),
        Err(ReadFailed::Status(status)) if status.is_client_error() => {
            Verdict::Rejected(format!("Knoq answered {status}"))
        }
        Err(e) => Verdict::Unreachable(e.to_string()),
    }
}

/// Checks the SCIM token with Knoq, when one is configured.
pub async fn scim(gateway: &Gateway) -> Option<Verdict> {
    let bearer = gateway.credentials.scim_bearer()?;
    let status = gateway
        .forwarder
        .knoq
        .scim_status(
            bearer,
            PathAndQuery::from_static("/api/scim/v2/Users?count=1"),
        )
        .await;
    Some(match status {
        Ok(s) if s.is_success() => Verdict::Valid,
        Ok(s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)) => Verdict::Rejected(format!(
            "Knoq answered {s}; make a new SCIM token (Admin -> SSO -> SCIM) and put it in scim.token_file"
        )),
        Ok(s) if s.is_client_error() => Verdict::Rejected(format!("Knoq answered {s}")),
        Ok(s) => Verdict::Unreachable(format!("Knoq answered {s}")),
        Err(e) => Verdict::Unreachable(e.to_string()),
    })
}
