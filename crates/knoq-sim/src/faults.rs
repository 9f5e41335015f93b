//! Fault injection: what can go wrong on the next requests of a route.
//!
//! Faults are queued per [`SimRoute`]; each matching request pops one. A
//! request first looks at its own route's queue, then at [`SimRoute::Any`]'s.
//! Faults act before anything else (before authentication), as a load
//! balancer or a crashed backend in front of Knoq would; they never apply to
//! the `/_sim/` control routes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use http::Method;

/// What the simulator does to one request instead of (or around) handling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer `status` with `{"error": ..}` (and `Retry-After` if given)
    /// without handling the request: it is not applied. A status that is not
    /// a valid HTTP status code is answered as 500.
    Status {
        status: u16,
        retry_after: Option<u32>,
    },
    /// Wait, then handle the request normally.
    Delay(Duration),
    /// Close the connection without any response; the request is not applied.
    /// On HTTP/1.1 the socket is closed; on HTTP/2 the stream is reset.
    Reset,
    /// Apply the request (e.g. record the message), then close the connection
    /// without any response.
    ApplyThenReset,
    /// Never answer, until the client goes away or the simulator shuts down.
    Hang,
    /// Apply the request, then never answer.
    ApplyThenHang,
}

/// The routes faults can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimRoute {
    /// Every request except `/_sim/` control requests.
    Any,
    /// `POST /api/managed-agents/session`
    SessionCreate,
    /// `GET /api/managed-agents/sessions`
    SessionsList,
    /// `DELETE /api/managed-agents/session`
    SessionDelete,
    /// `POST /api/managed-agents/message`
    MessageSend,
    /// `GET /api/managed-agents/transcript`
    Transcript,
    /// `POST /api/managed-agents/cancel`
    Cancel,
    /// Anything under `/api/scim/`.
    Scim,
}

/// The queued faults of every route.
#[derive(Debug, Default)]
pub(super) struct FaultQueues {
    queues: Mutex<HashMap<SimRoute, VecDeque<Fault>>>,
    /// Faults queued in total, so that requests skip the lock when none are.
    queued: AtomicUsize,
}

// === impl Fault ===

impl Fault {
    /// `Status` without `Retry-After`.
    pub fn status(status: u16) -> Self {
        Fault::Status {
            status,
            retry_after: None,
        }
    }

    /// `Status` with `Retry-After: secs`.
    pub fn status_retry_after(status: u16, secs: u32) -> Self {
        Fault::Status {
            status,
            retry_after: Some(secs),
        }
    }
}

// === impl SimRoute ===

impl SimRoute {
    /// The route a request belongs to, if any besides `Any`.
    pub fn of(method: &Method, path: &str) -> Option<SimRoute> {
        if path.starts_with("/api/scim/") || path == "/api/scim" {
            return Some(SimRoute::Scim);
        }
        let route = match (method.as_str(), path) {
            ("POST", "/api/managed-agents/session") => SimRoute::SessionCreate,
            ("DELETE", "/api/managed-agents/session") => SimRoute::SessionDelete,
            ("GET", "/api/managed-agents/sessions") => SimRoute::SessionsList,
            ("POST", "/api/managed-agents/message") => SimRoute::MessageSend,
            ("GET", "/api/managed-agents/transcript") => SimRoute::Transcript,
            ("POST", "/api/managed-agents/cancel") => SimRoute::Cancel,
            _ => return None,
        };
        Some(route)
    }

    /// The snake_case name the `/_sim/fail` control route uses.
    pub fn name(self) -> &'static str {
        match self {
            SimRoute::Any => "any",
            SimRoute::SessionCreate => "session_create",
            SimRoute::SessionsList => "sessions_list",
            SimRoute::SessionDelete => "session_delete",
            SimRoute::MessageSend => "message_send",
            SimRoute::Transcript => "transcript",
            SimRoute::Cancel => "cancel",
            SimRoute::Scim => "scim",
        }
    }

    /// Inverse of [`SimRoute::name`].
    pub fn from_name(name: &str) -> Option<SimRoute> {
        [
            SimRoute::Any,
            SimRoute::SessionCreate,
            SimRoute::SessionsList,
            SimRoute::SessionDelete,
            SimRoute::MessageSend,
            SimRoute::Transcript,
            SimRoute::Cancel,
            SimRoute::Scim,
        ]
        .into_iter()
        .find(|route| route.name() == name)
    }
}

// === impl FaultQueues ===

impl FaultQueues {
    pub(super) fn push(&self, route: SimRoute, faults: Vec<Fault>) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        self.queued.fetch_add(faults.len(), Ordering::SeqCst);
        queues.entry(route).or_default().extend(faults);
    }

    /// Pops the fault for a request of `route`: its own queue first, then `Any`'s.
    pub(super) fn pop(&self, route: Option<SimRoute>) -> Option<Fault> {
        if self.queued.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let fault = route
            .and_then(|r| queues.get_mut(&r)?.pop_front())
            .or_else(|| queues.get_mut(&SimRoute::Any)?.pop_front())?;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_route_first_then_any() {
        let queues = FaultQueues::default();
        queues.push(SimRoute::Any, vec![Fault::Reset]);
        queues.push(SimRoute::MessageSend, vec![Fault::status(502)]);
        assert_eq!(queues.pop(Some(SimRoute::Transcript)), Some(Fault::Reset));
        assert_eq!(queues.pop(Some(SimRoute::Transcript)), None);
        assert_eq!(
            queues.pop(Some(SimRoute::MessageSend)),
            Some(Fault::status(502))
        );
        assert_eq!(queues.pop(None), None);
    }

    #[test]
    fn routes_by_method_and_path() {
        assert_eq!(
            SimRoute::of(&Method::DELETE, "/api/managed-agents/session"),
            Some(SimRoute::SessionDelete)
        );
        assert_eq!(
            SimRoute::of(&Method::GET, "/api/scim/v2/Users"),
            Some(SimRoute::Scim)
        );
        assert_eq!(SimRoute::of(&Method::GET, "/api/managed-agents/nope"), None);
        for route in [SimRoute::Any, SimRoute::Cancel, SimRoute::Scim] {
            assert_eq!(SimRoute::from_name(route.name()), Some(route));
        }
    }
}
