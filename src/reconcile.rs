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
//! An earlier identical message (or a session with the same opening text)
//! must not pass for this one: the gateway remembers, for a few minutes,
//! the sends Knoq confirmed, and a look finds the request only if Knoq
//! shows *more* matches than the gateway already accounts for. A session is
//! answered only when exactly one unaccounted match exists. With a shared
//! store the record is kept in Redis too, so a replica counts the sends
//! other replicas made as well: `<prefix>{<account>}:confirmed:<sha256 of
//! what a look searches>`, a sorted set of send times that expires with
//! the record's span (the text itself is never a key).
//!
//! Times are compared with a small allowance for clock skew between the
//! gateway and Knoq. If the first look finds nothing, one more look follows
//! after `retry.reconcile_settle` (Knoq may still be writing). Reads go to
//! Knoq as the same account through the Knoq client, and are charged like
//! every read the gateway makes on its own (`knoq.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::clock::{parse_rfc3339_ms, Millis};
use crate::credentials::Credentials;
use crate::knoq::Knoq;
use crate::quota::Quotas;
use crate::route::Route;
use crate::shared_store::SharedStore;

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
    pub knoq: &'a Knoq,
    pub credentials: &'a Arc<Credentials>,
    pub quotas: &'a Quotas,
    pub settle: Duration,
    pub user: &'a str,
    pub confirmed: &'a Confirmed,
}

/// How long confirmed sends are remembered.
const CONFIRMED_FOR_MS: Millis = 10 * 60 * 1000;
/// A bound on remembered keys, so memory stays small whatever the traffic.
const CONFIRMED_MAX_KEYS: usize = 10_000;

/// Sends of messages and sessions that Knoq confirmed recently, by what a
/// reconciliation would look for.
#[derive(Debug, Default)]
pub struct Confirmed {
    entries: std::sync::Mutex<HashMap<(String, String), Vec<Millis>>>,
    /// The record every replica keeps, with a shared store.
    shared: Option<Arc<SharedStore>>,
}

impl Confirmed {
    /// A record kept in this process, and in `shared` too when given.
    pub fn new(shared: Option<Arc<SharedStore>>) -> Confirmed {
        Confirmed {
            entries: Default::default(),
            shared,
        }
    }

    /// The shared set for one search key.
    fn shared_key(store: &SharedStore, user: &str, key: &(String, String)) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::new()
            .chain_update(key.0.as_bytes())
            .chain_update([0])
            .chain_update(key.1.as_bytes())
            .finalize();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        store.key(user, &format!("confirmed:{hex}"))
    }

    /// Notes that Knoq confirmed `request_body` on `route` sent at `at`.
    pub fn record(&self, route: Route, user: &str, request_body: &Bytes, at: Millis) {
        let Some(key) = key(route, user, request_body) else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CONFIRMED_MAX_KEYS {
            entries.retain(|_, times| times.iter().any(|t| t + CONFIRMED_FOR_MS > at));
        }
        if let Some(store) = &self.shared {
            // Off the answer's path: a look that needs it comes seconds
            // later, and a failed write leaves this replica's own record.
            let (store, set) = (store.clone(), Self::shared_key(store, user, &key));
            let member = format!("{at}-{:016x}", rand_u64());
            tokio::spawn(async move {
                let _ = store
                    .call("confirmed_record", |mut c| async move {
                        redis::pipe()
                            .atomic()
                            .cmd("ZADD")
                            .arg(&set)
                            .arg(at)
                            .arg(member)
                            .ignore()
                            .cmd("ZREMRANGEBYSCORE")
                            .arg(&set)
                            .arg("-inf")
                            .arg(at.saturating_sub(CONFIRMED_FOR_MS))
                            .ignore()
                            .cmd("PEXPIRE")
                            .arg(&set)
                            .arg(CONFIRMED_FOR_MS)
                            .ignore()
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await;
            });
        }
        let times = entries.entry(key).or_default();
        times.retain(|t| t + CONFIRMED_FOR_MS > at);
        times.push(at);
    }

    /// Confirmed sends found by `key` since `since`: this replica's, or
    /// every replica's when the shared record answers.
    async fn count_since(&self, user: &str, key: &(String, String), since: Millis) -> usize {
        let local = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            entries
                .get(key)
                .map_or(0, |times| times.iter().filter(|t| **t >= since).count())
        };
        let Some(store) = &self.shared else {
            return local;
        };
        let set = Self::shared_key(store, user, key);
        let shared = store
            .call("confirmed_count", |mut c| async move {
                redis::cmd("ZCOUNT")
                    .arg(&set)
                    .arg(since)
                    .arg("+inf")
                    .query_async::<usize>(&mut c)
                    .await
            })
            .await;
        // Never fewer than this replica knows of (a write may be on its way).
        shared.map_or(local, |n| n.max(local))
    }
}

/// What a reconciliation of this request looks for: the session and text
/// of a message, or the user and title of a session.
fn key(route: Route, user: &str, request_body: &Bytes) -> Option<(String, String)> {
    let sent: Value = serde_json::from_slice(request_body).ok()?;
    let text = sent["text"].as_str()?;
    match route {
        Route::MessageSend => Some((
            format!("m:{}", sent["sessionId"].as_str()?),
            text.to_string(),
        )),
        Route::SessionCreate => Some((
            format!("s:{user}"),
            text.chars().take(TITLE_CHARS).collect(),
        )),
        _ => None,
    }
}

/// A random number for unique set members.
fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).expect("the system's random source works");
    u64::from_le_bytes(bytes)
}

/// Knoq titles a session with the first 60 characters of its opening text.
const TITLE_CHARS: usize = 60;

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
        // Our own confirmed sends that a look would also find.
        let accounted = match key(route, self.user, request_body) {
            Some(k) => {
                self.confirmed
                    .count_since(self.user, &k, since.saturating_sub(CLOCK_SKEW_MS))
                    .await
            }
            None => 0,
        };
        match route {
            Route::MessageSend => {
                let sid = sent["sessionId"].as_str().unwrap_or_default();
                self.message(sid, text, since, accounted).await
            }
            Route::SessionCreate => self.session(text, since, accounted).await,
            _ => Finding::Unreadable {
                checked: "this route cannot be reconciled".into(),
            },
        }
    }

    async fn message(&self, sid: &str, text: &str, since: Millis, accounted: usize) -> Finding {
        let checked = format!("the transcript of session {sid} for a user_message with the same text sent since the request");
        let mut cursor: Option<String> = None;
        let mut matches = 0;
        for _ in 0..MAX_PAGES {
            let mut path = format!("/api/managed-agents/transcript?sessionId={}", encode(sid));
            if let Some(c) = &cursor {
                path.push_str(&format!("&sinceEventId={}", encode(c)));
            }
            let page = match self.get_json(Route::Transcript, &path).await {
                Ok(v) => v,
                Err(e) => {
                    return Finding::Unreadable {
                        checked: format!("{checked} ({e})"),
                    }
                }
            };
            let events = page["events"].as_array().cloned().unwrap_or_default();
            matches += events
                .iter()
                .filter(|e| {
                    e["type"] == "user_message"
                        && event_text(e) == Some(text)
                        && e["occurredAt"]
                            .as_str()
                            .and_then(parse_rfc3339_ms)
                            .is_some_and(|t| t >= since)
                })
                .count();
            if matches > accounted {
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

    async fn session(&self, text: &str, since: Millis, accounted: usize) -> Finding {
        let checked = "the session list for a session created since the request whose title starts the same text".to_string();
        let list = match self
            .get_json(Route::SessionsList, "/api/managed-agents/sessions")
            .await
        {
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
        // The newest ones are the unaccounted ones; exactly one may be ours.
        candidates.sort();
        let unaccounted = candidates.len().saturating_sub(accounted);
        if unaccounted > 1 {
            return Finding::Unreadable {
                checked: format!("{checked}: {unaccounted} sessions match, so which one is this request's cannot be told"),
            };
        }
        let Some((_, id)) = candidates
            .into_iter()
            .next_back()
            .filter(|_| unaccounted == 1)
        else {
            return Finding::Missing { checked };
        };
        // The run id is the transcript's workflowRunId; without it, the id
        // alone still tells the tool its session exists.
        let path = format!("/api/managed-agents/transcript?sessionId={}", encode(&id));
        let run_id = self
            .get_json(Route::Transcript, &path)
            .await
            .ok()
            .map(|t| t["workflowRunId"].clone());
        let mut answer = json!({ "id": id });
        if let Some(run) = run_id.filter(|r| !r.is_null()) {
            answer["runId"] = run;
        }
        Finding::Found(answer)
    }

    /// Reads `path_and_query` (which `route` serves) as the account.
    async fn get_json(&self, route: Route, path_and_query: &str) -> Result<Value, String> {
        let pq = path_and_query
            .parse()
            .map_err(|_| "could not build the read request".to_string())?;
        let bytes = self
            .knoq
            .read(self.user, self.credentials, self.quotas, route, pq)
            .await
            .map_err(|e| e.to_string())?;
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
