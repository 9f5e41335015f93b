//! Keep-alive check: for an account with `probe` set, a cheap
//! `GET /api/managed-agents/sessions` when the account has been idle that
//! long, so an expired cookie is found before a tool needs the account.
//!
//! A probe is charged to the account's `read` quota like any read, and is
//! skipped when the quota does not admit it; it goes to Knoq once, without
//! retries. Its answer feeds the credential store exactly as a tool's
//! request would: 401 marks the cookie expired, `Set-Cookie` rotates it,
//! anything else counts as a success.

use std::collections::HashMap;
use std::sync::Mutex;

use http::header::{COOKIE, ORIGIN};
use http::{Request, StatusCode};

use crate::body;
use crate::clock::Millis;
use crate::pipeline::Gateway;
use crate::quota::Caller;
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
            probe(gateway, &user.name, now).await;
        }
    }
}

async fn probe(gateway: &Gateway, user: &str, now: Millis) {
    let who = Caller {
        user,
        token: "(probe)",
    };
    if !gateway.quotas.charge_retry(who, Route::SessionsList) {
        tracing::debug!(user, "probe skipped: the read quota does not admit it now");
        return;
    }
    let Some(cookie) = gateway.credentials.cookie(user) else {
        return;
    };
    let upstream = &gateway.forwarder.upstream;
    let pq = http::uri::PathAndQuery::from_static("/api/managed-agents/sessions");
    let req = Request::get(upstream.uri_for(Some(&pq)))
        .header(COOKIE, cookie.clone())
        .header(ORIGIN, gateway.origin.clone())
        .body(body::empty())
        .expect("static parts make a valid request");
    match upstream.send(req).await {
        Ok(mut rsp) => {
            let set_cookies = crate::headers::filter_response(rsp.headers_mut());
            gateway
                .credentials
                .apply_set_cookies(user, &set_cookies, now)
                .await;
            if rsp.status() == StatusCode::UNAUTHORIZED {
                gateway.credentials.mark_expired(user, &cookie).await;
            } else if !rsp.status().is_server_error() {
                gateway.credentials.mark_success(user, now);
            }
            tracing::debug!(
                user,
                status = rsp.status().as_u16(),
                "probed the account's cookie"
            );
        }
        Err(e) => tracing::debug!(user, error = %e, "probe could not reach Knoq"),
    }
}
