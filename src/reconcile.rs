//! Reconciliation: when a `POST /message` or `POST /session` may have
//! reached Knoq but no answer came back (a timeout or a reset after the
//! body was sent), ask Knoq what happened instead of guessing.
//!
//! - A message: read the session's transcript (every page) for a
//!   `user_message` with the same text that occurred after the request was
//!   sent.
//! - A session: list the user's sessions for one created after the request
//!   whose title is the start of the same text (Knoq titles a session with
//!   the first 60 characters of its opening message), then read its
//!   transcript for the run id.
//!
//! Times are compared with a small allowance for clock skew between the
//! gateway and Knoq. If the first look finds nothing, one more look follows
//! after `retry.reconcile_settle` (Knoq may still be writing). Reads go to
//! Knoq with the same cookie, outside the quota (they are the gateway's own
//! bookkeeping, and Knoq publishes no read limit).

use std::time::Duration;

use bytes::Bytes;
use http::header::{COOKIE, ORIGIN};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};

use crate::body;
use crate::clock::{parse_rfc3339_ms, Millis};
use crate::route::Route;
use crate::upstream::Upstream;

/// Knoq's clock and ours may disagree by this much.
const CLOCK_SKEW_MS: Millis = 2_000;
/// Transcript pages read at most per look (a bound, not an expectation).
const MAX_PAGES: usize = 50;

/// What reconciliation found.
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// Knoq did act: the answer Knoq would have given.
    Found(Value),
    /// Knoq shows no trace of it.
    Missing { checked: String },
    /// Knoq could not be asked.
    Unreadable { checked: String },
}

pub struct Reconciler<'a> {
    pub upstream: &'a Upstream,
    pub cookie: &'a HeaderValue,
    pub origin: &'a HeaderValue,
    pub settle: Duration,
}

impl Reconciler<'_> {
    /// Looks, and looks once more after the settle time if nothing is found.
    pub async fn run(&self, route: Route, request_body: &Bytes, sent_at: Millis) -> Finding {
        let first = self.look(route, request_body, sent_at).await;
        if !matches!(first, Finding::Missing { .. }) {
            return first;
        }
        tokio::time::sleep(self.settle).await;
        self.look(route, request_body, sent_at).await
    }

    async fn look(&self, route: Route, request_body: &Bytes, sent_at: Millis) -> Finding {
        let Ok(sent) = serde_json::from_slice::<Value>(request_body) else {
            return Finding::Unreadable {
                checked: "the request body is not JSON, so there is nothing to look for".into(),
            };
        };
        let since = sent_at.saturating_sub(CLOCK_SKEW_MS);
        let text = sent["text"].as_str().unwrap_or_default();
        match route {
            Route::MessageSend => {
                let sid = sent["sessionId"].as_str().unwrap_or_default();
                self.message(sid, text, since).await
            }
            Route::SessionCreate => self.session(text, since).await,
            _ => Finding::Unreadable {
                checked: "this route cannot be reconciled".into(),
            },
        }
    }

    async fn message(&self, sid: &str, text: &str, since: Millis) -> Finding {
        let checked = format!("the transcript of session {sid} for a user_message with the same text sent since the request");
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut path = format!("/api/managed-agents/transcript?sessionId={}", encode(sid));
            if let Some(c) = &cursor {
                path.push_str(&format!("&sinceEventId={}", encode(c)));
            }
            let page = match self.get_json(&path).await {
                Ok(v) => v,
                Err(e) => {
                    return Finding::Unreadable {
                        checked: format!("{checked} ({e})"),
                    }
                }
            };
            let events = page["events"].as_array().cloned().unwrap_or_default();
            let hit = events.iter().any(|e| {
                e["type"] == "user_message"
                    && event_text(e) == Some(text)
                    && e["occurredAt"]
                        .as_str()
                        .and_then(parse_rfc3339_ms)
                        .is_some_and(|t| t >= since)
            });
            if hit {
                return Finding::Found(json!({ "ok": true }));
            }
            let last = events
                .last()
                .and_then(|e| e["id"].as_str())
                .map(str::to_string);
            match (page["hasMore"].as_bool(), last) {
                (Some(true), Some(id)) if cursor.as_deref() != Some(id.as_str()) => {
                    cursor = Some(id)
                }
                _ => return Finding::Missing { checked },
            }
        }
        Finding::Missing { checked }
    }

    async fn session(&self, text: &str, since: Millis) -> Finding {
        let checked = "the session list for a session created since the request whose title starts the same text".to_string();
        let list = match self.get_json("/api/managed-agents/sessions").await {
            Ok(v) => v,
            Err(e) => {
                return Finding::Unreadable {
                    checked: format!("{checked} ({e})"),
                }
            }
        };
        let mut candidates: Vec<(Millis, String)> = list["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let title = s["title"].as_str()?;
                let created = s["createdAt"].as_str().and_then(parse_rfc3339_ms)?;
                (!title.is_empty() && text.starts_with(title) && created >= since)
                    .then(|| (created, s["id"].as_str().map(str::to_string)))
                    .and_then(|(t, id)| Some((t, id?)))
            })
            .collect();
        candidates.sort();
        let Some((_, id)) = candidates.into_iter().next() else {
            return Finding::Missing { checked };
        };
        // The run id is the transcript's workflowRunId; without it, the id
        // alone still tells the tool its session exists.
        let path = format!("/api/managed-agents/transcript?sessionId={}", encode(&id));
        let run_id = self
            .get_json(&path)
            .await
            .ok()
            .map(|t| t["workflowRunId"].clone());
        let mut answer = json!({ "id": id });
        if let Some(run) = run_id.filter(|r| !r.is_null()) {
            answer["runId"] = run;
        }
        Finding::Found(answer)
    }

    async fn get_json(&self, path_and_query: &str) -> Result<Value, String> {
        let pq = path_and_query
            .parse()
            .map_err(|_| "could not build the read request".to_string())?;
        let req = Request::get(self.upstream.uri_for(Some(&pq)))
            .header(COOKIE, self.cookie.clone())
            .header(ORIGIN, self.origin.clone())
            .body(body::empty())
            .map_err(|_| "could not build the read request".to_string())?;
        let rsp = self.upstream.send(req).await.map_err(|e| e.to_string())?;
        let status = rsp.status();
        let bytes = rsp
            .into_body()
            .collect()
            .await
            .map_err(|_| "the read was cut off".to_string())?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!("Knoq answered {status}"));
        }
        serde_json::from_slice(&bytes).map_err(|_| "Knoq's answer was not JSON".to_string())
    }
}

/// Knoq's events carry their text in `text` or `payload.text`.
fn event_text(e: &Value) -> Option<&str> {
    e["text"].as_str().or_else(|| e["payload"]["text"].as_str())
}

/// Percent-encodes everything but unreserved characters, for a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("ses_ab-1.2~"), "ses_ab-1.2~");
        assert_eq!(encode("a&b=c d"), "a%26b%3Dc%20d");
    }

    #[test]
    fn event_text_is_found_in_either_shape() {
        assert_eq!(event_text(&json!({"text": "hi"})), Some("hi"));
        assert_eq!(event_text(&json!({"payload": {"text": "hi"}})), Some("hi"));
        assert_eq!(event_text(&json!({"payload": {}})), None);
    }
}
