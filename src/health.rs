//! What an operator must act on now, in one list: the problems that make
//! requests fail (an expired or missing cookie), and those that would
//! surprise later (the next start would fail, a changed setting waits for
//! a restart, a token is about to expire). `/readyz` shows the list,
//! `knoq_gateway_problems{kind}` counts it, `check` prints the part a
//! config file alone can tell.
//!
//! Each problem was also logged once, when it appeared, by the part that
//! found it; this module only reads.

use serde::Serialize;

use crate::clock::{format_rfc3339, Millis};
use crate::config::Config;
use crate::credentials::{CredentialState, UserStatus};
use crate::reload::Live;

/// Tokens expiring this soon are named (14 days).
pub const EXPIRY_NOTICE_MS: Millis = 14 * 24 * 3600 * 1000;

/// The kinds, each a series of `knoq_gateway_problems` (0 when none).
pub const KINDS: [&str; 8] = [
    "credential_expired",
    "credential_missing",
    "cookie_source",
    "reload_rejected",
    "restart_pending",
    "store_unavailable",
    "token_expiring",
    "token_expired",
];

/// One thing to act on: its kind, what it is about (an account, a token,
/// a key) and what to do. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: &'static str,
    pub subject: String,
    pub message: String,
}

/// Every problem of the running gateway.
pub fn of_live(live: &Live) -> Vec<Problem> {
    let gateway = live.current();
    let mut all = of_credentials(&gateway.credentials.status());
    if let Some(error) = live.failed_reload() {
        all.push(Problem {
            kind: "reload_rejected",
            subject: "config".into(),
            message: format!("the config file on disk was rejected (the running configuration stays in force; the next start would fail): {error}"),
        });
    }
    for key in live.pending_restart() {
        all.push(Problem {
            kind: "restart_pending",
            subject: key.to_string(),
            message: format!("{key} changed in the config file but applies only after a restart"),
        });
    }
    if let Some(shared) = &live.services().shared {
        if !shared.is_up() {
            all.push(Problem {
                kind: "store_unavailable",
                subject: "store".into(),
                message: format!(
                    "the shared store (Redis) does not answer within store.timeout; {}",
                    shared.while_away()
                ),
            });
        }
    }
    all.extend(of_tokens(&gateway.config, gateway.clock.now()));
    all
}

/// The credentials' problems: cookies Knoq rejected, accounts without a
/// cookie, sources the next start could not read.
pub fn of_credentials(status: &[UserStatus]) -> Vec<Problem> {
    let mut all = Vec::new();
    for s in status {
        let kind = match s.state {
            CredentialState::Expired => Some("credential_expired"),
            CredentialState::Missing => Some("credential_missing"),
            _ => None,
        };
        if let Some(kind) = kind {
            all.push(Problem {
                kind,
                subject: s.user.clone(),
                message: s.why.clone(),
            });
        }
        if let Some(problem) = &s.source_problem {
            all.push(Problem {
                kind: "cookie_source",
                subject: s.user.clone(),
                message: format!(
                    "{problem} (the account keeps the cookie it has; the next start would fail)"
                ),
            });
        }
    }
    all
}

/// Tokens that expired, or expire within [`EXPIRY_NOTICE_MS`] of `now`.
pub fn of_tokens(config: &Config, now: Millis) -> Vec<Problem> {
    config
        .tokens
        .iter()
        .filter_map(|t| {
            let at = t.expires?;
            let when = format_rfc3339(at);
            if at <= now {
                Some(Problem {
                    kind: "token_expired",
                    subject: t.name.clone(),
                    message: format!("expired at {when}; its requests get 401 (make a new one with `knoq-gateway token new --expires 90d`)"),
                })
            } else if at - now <= EXPIRY_NOTICE_MS {
                Some(Problem {
                    kind: "token_expiring",
                    subject: t.name.clone(),
                    message: format!("expires at {when}; give the tool a new token before then (`knoq-gateway token new --expires 90d`)"),
                })
            } else {
                None
            }
        })
        .collect()
}

/// How many problems of each kind, every kind named.
pub fn counts(problems: &[Problem]) -> Vec<(&'static str, usize)> {
    KINDS
        .iter()
        .map(|k| (*k, problems.iter().filter(|p| p.kind == *k).count()))
        .collect()
}
