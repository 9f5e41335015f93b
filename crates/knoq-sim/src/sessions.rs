//! Sessions, their event logs and the state of their agent turns.
//!
//! Sessions live in a `DashMap` keyed by id, so transcript polls of different
//! sessions do not contend. A map guard is only ever held inside one of the
//! synchronous methods below, never across an `.await`.
//!
//! Event ids are `evt_` plus a process-wide sequence number, so they are
//! unique, sort like their events, and a `sinceEventId` cursor is found by
//! binary search. Each event's JSON is rendered once when it is appended: a
//! transcript answer is then a concatenation of ready strings, which keeps the
//! hot polling path cheap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde_json::json;

use super::clock::SimClock;
use super::control::SimSession;
use super::reply::{json_string, random_id};

/// Most sessions a list answer holds (Knoq: "at most 50").
const LIST_LIMIT: usize = 50;

/// Title length, in characters, taken from the opening message.
const TITLE_CHARS: usize = 60;

/// Prefix of event ids; the rest is the sequence number.
const EVENT_ID_PREFIX: &str = "evt_";

/// All sessions of all users.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    map: DashMap<String, Session>,
    /// Orders events and updates across all sessions; also names events.
    seq: AtomicU64,
}

#[derive(Debug)]
struct Session {
    owner: String,
    run_id: String,
    title: String,
    /// `title` and `run_id` already encoded as JSON strings.
    title_json: String,
    run_id_json: String,
    created_at: String,
    created_seq: u64,
    updated_at: String,
    updated_seq: u64,
    events: Vec<Event>,
    turn: Turn,
}

#[derive(Debug)]
struct Event {
    seq: u64,
    /// The text of a `user_message` (kept for `SimControl::user_messages`).
    user_text: Option<String>,
    /// The whole event as a JSON object.
    json: String,
}

/// The agent's work on one session. A turn runs while `pending` is not empty;
/// its front is the message being answered, the rest are queued behind it.
#[derive(Debug, Default)]
struct Turn {
    /// Bumped by cancel: an agent task holding an older generation stops.
    generation: u64,
    pending: VecDeque<String>,
}

/// A new session, as the create answer reports it.
#[derive(Debug)]
pub(super) struct Created {
    pub(super) id: String,
    pub(super) run_id: String,
    /// The generation an agent task must be started with.
    pub(super) generation: u64,
}

/// What a sent message did to the session's turn.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Queued {
    /// No turn was running: start an agent task with this generation.
    StartTurn(u64),
    /// A turn is running; the message waits behind it.
    Behind,
}

/// Why a transcript could not be read.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TranscriptError {
    NotFound,
    UnknownCursor,
}

/// What an agent task does after finishing a turn.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum AfterTurn {
    /// Another message is queued: answer it after another delay.
    Continue,
    /// Nothing queued, or the session was cancelled or deleted.
    Stop,
}

// === impl Sessions ===

impl Sessions {
    /// Creates a session whose first event is the opening `text`, with a turn running.
    pub(super) fn create(&self, owner: &str, text: &str, clock: &SimClock) -> Created {
        let id = format!("ses_{}", random_id());
        let run_id = format!("run_{}", random_id());
        let title: String = text.chars().take(TITLE_CHARS).collect();
        let now = clock.now_rfc3339();
        let created_seq = self.next_seq();
        let mut session = Session {
            owner: owner.to_string(),
            title_json: json_string(&title),
            run_id_json: json_string(&run_id),
            run_id: run_id.clone(),
            title,
            created_at: now.clone(),
            created_seq,
            updated_at: now,
            updated_seq: created_seq,
            events: Vec::new(),
            turn: Turn::default(),
        };
        self.push_message(&mut session, "user_message", text, clock);
        session.turn.pending.push_back(text.to_string());
        let generation = session.turn.generation;
        self.map.insert(id.clone(), session);
        Created {
            id,
            run_id,
            generation,
        }
    }

    /// Whether `owner` has a session `id` (deleted sessions are gone).
    pub(super) fn owns(&self, owner: &str, id: &str) -> bool {
        self.map.get(id).is_some_and(|s| s.owner == owner)
    }

    /// Appends a user message to the owner's session; `None` if there is no such session.
    pub(super) fn send(
        &self,
        owner: &str,
        id: &str,
        text: &str,
        clock: &SimClock,
    ) -> Option<Queued> {
        let mut session = self.map.get_mut(id).filter(|s| s.owner == owner)?;
        self.push_message(&mut session, "user_message", text, clock);
        let was_idle = session.turn.pending.is_empty();
        session.turn.pending.push_back(text.to_string());
        Some(if was_idle {
            Queued::StartTurn(session.turn.generation)
        } else {
            Queued::Behind
        })
    }

    /// Cancels the running turn and drops queued messages. `Some(true)` if a
    /// turn was running (a `status_idle` "cancelled" event is appended),
    /// `Some(false)` if none was, `None` if there is no such session.
    pub(super) fn cancel(&self, owner: &str, id: &str, clock: &SimClock) -> Option<bool> {
        let mut session = self.map.get_mut(id).filter(|s| s.owner == owner)?;
        if session.turn.pending.is_empty() {
            return Some(false);
        }
        session.turn.generation += 1;
        session.turn.pending.clear();
        self.push_idle(&mut session, "cancelled", clock);
        Some(true)
    }

    /// Deletes the owner's session for good; false if there is no such session.
    /// A running turn ends with it: its agent task finds the session gone.
    pub(super) fn delete(&self, owner: &str, id: &str) -> bool {
        self.map.remove_if(id, |_, s| s.owner == owner).is_some()
    }

    /// Called by the agent task of `generation` when its delay is over: answers
    /// the front message and ends the turn with `status_idle`.
    pub(super) fn finish_turn(&self, id: &str, generation: u64, clock: &SimClock) -> AfterTurn {
        let Some(mut session) = self.map.get_mut(id) else {
            return AfterTurn::Stop;
        };
        if session.turn.generation != generation {
            return AfterTurn::Stop;
        }
        let Some(question) = session.turn.pending.pop_front() else {
            return AfterTurn::Stop;
        };
        let answer = agent_answer(&question);
        self.push_message(&mut session, "agent_message", &answer, clock);
        self.push_idle(&mut session, "end_turn", clock);
        if session.turn.pending.is_empty() {
            AfterTurn::Stop
        } else {
            AfterTurn::Continue
        }
    }

    /// The `GET /sessions` answer for `owner`: newest update first, at most 50.
    pub(super) fn list_json(&self, owner: &str) -> String {
        let mut mine: Vec<(u64, serde_json::Value)> = self
            .map
            .iter()
            .filter(|entry| entry.owner == owner)
            .map(|entry| {
                let summary = json!({
                    "id": entry.key(),
                    "title": entry.title,
                    "createdAt": entry.created_at,
                    "updatedAt": entry.updated_at,
                    "status": if entry.turn.pending.is_empty() { "idle" } else { "running" },
                });
                (entry.updated_seq, summary)
            })
            .collect();
        mine.sort_unstable_by_key(|(seq, _)| std::cmp::Reverse(*seq));
        let sessions: Vec<_> = mine.into_iter().take(LIST_LIMIT).map(|(_, s)| s).collect();
        json!({ "sessions": sessions }).to_string()
    }

    /// The `GET /transcript` answer: up to `page_size` events after `since`
    /// (from the start without a cursor), oldest first.
    ///
    /// Knoq's doc says "`hasMore: true` means poll again without advancing the
    /// cursor". We read that as "poll again at once": the answer is always the
    /// *first* page after the cursor, so re-polling with the same cursor is
    /// safe (the same page again, nothing skipped), and a client that advances
    /// to the last id it received gets the next page. `hasMore` is true when
    /// events remain after this page.
    ///
    /// An unknown `sinceEventId` is a 400, not "from the start": silently
    /// replaying the whole log would hand a confused client duplicates.
    pub(super) fn transcript_json(
        &self,
        owner: &str,
        id: &str,
        since: Option<&str>,
        page_size: usize,
    ) -> Result<String, TranscriptError> {
        let session = self
            .map
            .get(id)
            .filter(|s| s.owner == owner)
            .ok_or(TranscriptError::NotFound)?;
        let events = &session.events;
        let start = match since {
            None => 0,
            Some(cursor) => {
                let seq = parse_event_id(cursor).ok_or(TranscriptError::UnknownCursor)?;
                let index = events
                    .binary_search_by_key(&seq, |e| e.seq)
                    .map_err(|_| TranscriptError::UnknownCursor)?;
                index + 1
            }
        };
        let end = events.len().min(start.saturating_add(page_size.max(1)));
        let page = &events[start..end];
        let size = 96
            + session.title_json.len()
            + session.run_id_json.len()
            + page.iter().map(|e| e.json.len() + 1).sum::<usize>();
        let mut out = String::with_capacity(size);
        out.push_str("{\"title\":");
        out.push_str(&session.title_json);
        out.push_str(",\"workflowRunId\":");
        out.push_str(&session.run_id_json);
        out.push_str(",\"events\":[");
        for (i, event) in page.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&event.json);
        }
        out.push_str("],\"hasMore\":");
        out.push_str(if end < events.len() { "true" } else { "false" });
        out.push_str(",\"backfillFailed\":false}");
        Ok(out)
    }

    /// The owner's sessions, oldest first.
    pub(super) fn snapshots(&self, owner: &str) -> Vec<SimSession> {
        let mut mine: Vec<(u64, SimSession)> = self
            .map
            .iter()
            .filter(|entry| entry.owner == owner)
            .map(|entry| {
                let snapshot = SimSession {
                    id: entry.key().clone(),
                    title: entry.title.clone(),
                    run_id: entry.run_id.clone(),
                    turn_running: !entry.turn.pending.is_empty(),
                    events: entry.events.len(),
                };
                (entry.created_seq, snapshot)
            })
            .collect();
        mine.sort_unstable_by_key(|(seq, _)| *seq);
        mine.into_iter().map(|(_, s)| s).collect()
    }

    /// Texts of the session's `user_message` events, in order; empty if unknown.
    pub(super) fn user_messages(&self, id: &str) -> Vec<String> {
        self.map
            .get(id)
            .map(|s| {
                s.events
                    .iter()
                    .filter_map(|e| e.user_text.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn push_message(&self, session: &mut Session, kind: &str, text: &str, clock: &SimClock) {
        let seq = self.next_seq();
        let occurred_at = clock.now_rfc3339();
        let json = json!({
            "id": event_id(seq),
            "type": kind,
            "occurredAt": occurred_at,
            "text": text,
        })
        .to_string();
        let user_text = (kind == "user_message").then(|| text.to_string());
        session.push(
            Event {
                seq,
                user_text,
                json,
            },
            occurred_at,
        );
    }

    fn push_idle(&self, session: &mut Session, reason: &str, clock: &SimClock) {
        let seq = self.next_seq();
        let occurred_at = clock.now_rfc3339();
        let json = json!({
            "id": event_id(seq),
            "type": "status_idle",
            "occurredAt": occurred_at,
            "payload": { "reason": reason },
        })
        .to_string();
        session.push(
            Event {
                seq,
                user_text: None,
                json,
            },
            occurred_at,
        );
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }
}

// === impl Session ===

impl Session {
    fn push(&mut self, event: Event, occurred_at: String) {
        self.updated_seq = event.seq;
        self.updated_at = occurred_at;
        self.events.push(event);
    }
}

fn event_id(seq: u64) -> String {
    format!("{EVENT_ID_PREFIX}{seq:012}")
}

fn parse_event_id(id: &str) -> Option<u64> {
    id.strip_prefix(EVENT_ID_PREFIX)?.parse().ok()
}

/// What the simulated agent says: enough to tell answers apart in tests.
fn agent_answer(question: &str) -> String {
    format!("Simulated answer to: {question}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(json: &str) -> (Vec<String>, bool) {
        let value: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
        let ids = value["events"]
            .as_array()
            .expect("events array")
            .iter()
            .map(|e| e["id"].as_str().expect("id").to_string())
            .collect();
        (ids, value["hasMore"].as_bool().expect("hasMore"))
    }

    #[test]
    fn pages_after_the_cursor() {
        let sessions = Sessions::default();
        let clock = SimClock::new();
        let created = sessions.create("ann", "hello", &clock);
        assert_eq!(
            sessions.finish_turn(&created.id, created.generation, &clock),
            AfterTurn::Stop
        );
        let (all, more) = ids(&sessions
            .transcript_json("ann", &created.id, None, 100)
            .expect("ok"));
        assert_eq!(all.len(), 3);
        assert!(!more);
        let (first, more) = ids(&sessions
            .transcript_json("ann", &created.id, None, 2)
            .expect("ok"));
        assert_eq!(first, all[..2]);
        assert!(more);
        let (rest, more) = ids(&sessions
            .transcript_json("ann", &created.id, Some(&first[1]), 2)
            .expect("ok"));
        assert_eq!(rest, all[2..]);
        assert!(!more);
        assert_eq!(
            sessions.transcript_json("ann", &created.id, Some("evt_999999"), 2),
            Err(TranscriptError::UnknownCursor)
        );
        assert_eq!(
            sessions.transcript_json("bob", &created.id, None, 2),
            Err(TranscriptError::NotFound)
        );
    }

    #[test]
    fn messages_queue_behind_a_running_turn_and_cancel_drops_them() {
        let sessions = Sessions::default();
        let clock = SimClock::new();
        let created = sessions.create("ann", "one", &clock);
        assert_eq!(
            sessions.send("ann", &created.id, "two", &clock),
            Some(Queued::Behind)
        );
        assert_eq!(sessions.send("bob", &created.id, "x", &clock), None);
        assert_eq!(
            sessions.finish_turn(&created.id, created.generation, &clock),
            AfterTurn::Continue
        );
        assert_eq!(sessions.cancel("ann", &created.id, &clock), Some(true));
        assert_eq!(sessions.cancel("ann", &created.id, &clock), Some(false));
        // The old agent task finds its generation outdated.
        assert_eq!(
            sessions.finish_turn(&created.id, created.generation, &clock),
            AfterTurn::Stop
        );
        assert_eq!(sessions.user_messages(&created.id), ["one", "two"]);
        assert!(sessions.delete("ann", &created.id));
        assert!(!sessions.delete("ann", &created.id));
    }
}
