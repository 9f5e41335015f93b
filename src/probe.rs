//! Keep-alive check: for an account with `probe` set, a cheap
//! `GET /api/managed-agents/sessions` when the account has been idle that
//! long, so an expired cookie is found before a tool needs the account.
//!
//! A probe is one of the gateway's own reads (`knoq.rs`): charged to the
//! account's `read` quota and skipped when the quota does not admit it,
//! through the circuit, without retries. Its answer feeds the credential
//! store exactly as a tool's request would, because it takes the same path:
//! 401 marks the cookie expired, `Set-Cookie` rotates it (and counts as a
//! rotation), any answer below 500 counts as a success.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::Millis;
use crate::pipeline::Gateway;
use crate::route::Route;

/// When each account was last probed.
#[derive(Debug, Default)]
pub struct Prober {
    last: Mutex<HashMap<String, Millis>>,
}

impl Prober {
    /// Probes every account whose probe interval has passed with no sign
    /// of life (no accepted request, no probe).
    pub async fn run_due(&self, gateway: &Gateway) {
        let now = gateway.clock.now();
        let status = gateway.credentials.status();
        for user in &gateway.config.users {
            let Some(every) = user.probe else { continue };
            let every = every.as_millis() as Millis;
            let last_success = status
                .iter()
                .find(|s| s.user == user.name)
                .and_then(|s| s.last_success)
                .unwrap_or(0);
            let last_probe = {
                let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                *last.entry(user.name.clone()).or_insert(now)
            };
            if now < last_success.max(last_probe) + every
                || gateway.credentials.is_expired(&user.name)
            {
                continue;
            }
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(user.name.clone(), now);
            probe(gateway, &user.name).await;
        }
    }
}

async fn probe(gateway: &Gateway, user: &str) {
    let pq = http::uri::PathAndQuery::from_static("/api/managed-agents/sessions");
    let knoq = &gateway.forwarder.knoq;
    match knoq
        .read(
            user,
            &gateway.credentials,
            &gateway.quotas,
            Route::SessionsList,
            pq,
        )
        .await
    {
        Ok(_) => tracing::debug!(user, "probed the account's cookie: Knoq accepted it"),
        Err(e) => tracing::debug!(user, error = %e, "probed the account's cookie"),
    }
}
