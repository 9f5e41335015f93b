//! Knoq's REST routes: the managed-agents endpoints, SCIM, and 404 for the rest.
//!
//! Order of checks under `/api/managed-agents`, as Knoq documents it: the
//! cookie (401) before anything else, including 404 for unknown paths; then
//! the CSRF `Origin` check on POST and DELETE (403); then the handler. A
//! handler validates its input (400), then finds the session (404), then asks
//! the rate limiter (429), and only then changes anything: refused or invalid
//! requests never count against a limit.

use std::sync::Arc;

use http::header::ORIGIN;
use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::accounts::{Bucket, Refusal, USD_PER_QUERY};
use super::agent;
use super::reply::{Reply, SimRequest};
use super::scim;
use super::sessions::{Queued, TranscriptError};
use super::state::Shared;

const MANAGED_PREFIX: &str = "/api/managed-agents";

/// Handles any request outside `/_sim/`.
pub(super) fn handle(shared: &Arc<Shared>, req: &SimRequest) -> Reply {
    if let Some(rest) = managed_subpath(&req.path) {
        return managed(shared, req, rest);
    }
    if req.path == "/api/scim" || req.path.starts_with("/api/scim/") {
        return scim::handle(shared, req);
    }
    Reply::not_found()
}

/// Whether `path` is under `/api/managed-agents` (and so needs the cookie).
pub(super) fn is_managed(path: &str) -> bool {
    managed_subpath(path).is_some()
}

/// The path after `/api/managed-agents`, if the request is under it.
fn managed_subpath(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(MANAGED_PREFIX)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn managed(shared: &Arc<Shared>, req: &SimRequest, rest: &str) -> Reply {
    let Some(user) = shared.accounts.authenticate(&req.headers) else {
        return Reply::error(StatusCode::UNAUTHORIZED, "authentication required");
    };
    let mutating =
        req.method == Method::POST || req.method == Method::DELETE || shared.origin_on_reads;
    let reply = if mutating && req.header_str(ORIGIN) != Some(shared.origin.as_str()) {
        Reply::error(StatusCode::FORBIDDEN, "CSRF check failed")
    } else {
        route(shared, req, rest, &user).unwrap_or_else(|refusal| refusal)
    };
    reply.for_user(&user)
}

/// Dispatches an authenticated, CSRF-checked request. `Err` is an error reply.
fn route(shared: &Arc<Shared>, req: &SimRequest, rest: &str, user: &str) -> Result<Reply, Reply> {
    match (rest, &req.method) {
        ("/session", &Method::POST) => create_session(shared, req, user),
        ("/session", &Method::DELETE) => delete_session(shared, req, user),
        ("/sessions", &Method::GET) => {
            Ok(Reply::json(StatusCode::OK, shared.sessions.list_json(user)))
        }
        ("/message", &Method::POST) => send_message(shared, req, user),
        ("/transcript", &Method::GET) => transcript(shared, req, user),
        ("/cancel", &Method::POST) => cancel(shared, req, user),
        ("/session" | "/sessions" | "/message" | "/transcript" | "/cancel", _) => {
            Err(Reply::method_not_allowed())
        }
        _ => Err(Reply::not_found()),
    }
}

/// `POST /session {"text"}`: a new session whose agent starts answering.
fn create_session(shared: &Arc<Shared>, req: &SimRequest, user: &str) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let text = required(&body, "text")?;
    admit(shared, user, Bucket::Session)?;
    let created = shared.sessions.create(user, text, &shared.clock);
    agent::start_turn(shared, created.id.clone(), created.generation);
    Ok(Reply::ok(json!({
        "id": created.id,
        "runId": created.run_id,
        "noConnectors": true,
    })))
}

/// `DELETE /session?sessionId=`: permanent; a running turn ends with it.
fn delete_session(shared: &Arc<Shared>, req: &SimRequest, user: &str) -> Result<Reply, Reply> {
    let id = required_param(req, "sessionId")?;
    if shared.sessions.delete(user, &id) {
        Ok(Reply::ok(json!({ "ok": true })))
    } else {
        Err(session_not_found())
    }
}

/// `POST /message {"sessionId","text"}`: appends the message; the answer
/// follows in the transcript (queued behind a running turn).
fn send_message(shared: &Arc<Shared>, req: &SimRequest, user: &str) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let id = required(&body, "sessionId")?;
    let text = required(&body, "text")?;
    if !shared.sessions.owns(user, id) {
        return Err(session_not_found());
    }
    admit(shared, user, Bucket::Message)?;
    match shared.sessions.send(user, id, text, &shared.clock) {
        Some(Queued::StartTurn(generation)) => {
            agent::start_turn(shared, id.to_string(), generation)
        }
        Some(Queued::Behind) => {}
        // Deleted between the check and now.
        None => return Err(session_not_found()),
    }
    Ok(Reply::ok(json!({ "ok": true })))
}

/// `GET /transcript?sessionId=[&sinceEventId=]`: see `Sessions::transcript_json`
/// for paging and the cursor. An empty `sinceEventId` counts as absent.
fn transcript(shared: &Arc<Shared>, req: &SimRequest, user: &str) -> Result<Reply, Reply> {
    let id = required_param(req, "sessionId")?;
    let since = req.query_param("sinceEventId").filter(|s| !s.is_empty());
    match shared
        .sessions
        .transcript_json(user, &id, since.as_deref(), shared.page_size())
    {
        Ok(body) => Ok(Reply::json(StatusCode::OK, body)),
        Err(TranscriptError::NotFound) => Err(session_not_found()),
        Err(TranscriptError::UnknownCursor) => Err(Reply::error(
            StatusCode::BAD_REQUEST,
            "sinceEventId is not an event of this session",
        )),
    }
}

/// `POST /cancel {"sessionId"}`: idempotent.
fn cancel(shared: &Arc<Shared>, req: &SimRequest, user: &str) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let id = required(&body, "sessionId")?;
    if !shared.sessions.owns(user, id) {
        return Err(session_not_found());
    }
    admit(shared, user, Bucket::Cancel)?;
    match shared.sessions.cancel(user, id, &shared.clock) {
        Some(true) => Ok(Reply::ok(json!({ "ok": true }))),
        Some(false) => Ok(Reply::ok(json!({ "ok": true, "alreadyCancelled": true }))),
        None => Err(session_not_found()),
    }
}

/// Asks the rate limiter; a refusal becomes the 429 reply.
fn admit(shared: &Shared, user: &str, bucket: Bucket) -> Result<(), Reply> {
    let refusal = match shared.accounts.admit(user, bucket, &shared.clock) {
        Ok(()) => return Ok(()),
        Err(refusal) => refusal,
    };
    let mut reply = match refusal {
        Refusal::Window {
            bucket,
            retry_after,
        } => Reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            &format!("rate limit exceeded: too many {}", bucket.noun()),
        )
        .retry_after(retry_after),
        Refusal::Monthly {
            retry_after,
            used,
            cap,
        } => Reply::json(
            StatusCode::TOO_MANY_REQUESTS,
            json!({
                "error": "monthly query quota exhausted",
                "monthToDateUsd": f64::from(used) * USD_PER_QUERY,
                "capUsd": f64::from(cap) * USD_PER_QUERY,
            })
            .to_string(),
        )
        .retry_after(retry_after),
    };
    reply.rate_limited = true;
    Err(reply)
}

/// A non-empty (after trimming) string field of the body, or 400.
fn required<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, Reply> {
    body.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| Reply::error(StatusCode::BAD_REQUEST, &format!("{field} is required")))
}

/// A non-empty query parameter, or 400.
fn required_param(req: &SimRequest, name: &str) -> Result<String, Reply> {
    req.query_param(name)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Reply::error(StatusCode::BAD_REQUEST, &format!("{name} is required")))
}

fn session_not_found() -> Reply {
    Reply::error(StatusCode::NOT_FOUND, "session not found")
}
