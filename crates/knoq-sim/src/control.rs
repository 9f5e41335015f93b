//! [`SimControl`]: the in-process handle tests and the demo use to inject
//! faults, play with cookies and inspect what the simulator saw.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::config::SimLimits;
use super::faults::{Fault, SimRoute};
use super::log::SeenRequest;
use super::state::Shared;

/// Drives faults and inspects state of a running simulator. Cheap to clone;
/// usable from any thread. Every method takes effect at once.
#[derive(Clone)]
pub struct SimControl {
    shared: Arc<Shared>,
}

/// A session as `SimControl::sessions` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSession {
    pub id: String,
    pub title: String,
    pub run_id: String,
    /// Whether the agent is working on a turn (or has messages queued).
    pub turn_running: bool,
    /// Number of events in its transcript.
    pub events: usize,
}

// === impl SimControl ===

impl SimControl {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Queues faults for the next requests of `route`; each matching request
    /// pops one. A request uses its own route's queue before `Any`'s.
    pub fn fail_next(&self, route: SimRoute, faults: Vec<Fault>) {
        self.shared.faults.push(route, faults);
    }

    /// On the next successful (2xx) response to `user`, sends
    /// `Set-Cookie: knoq_session=<new_value>; Path=/; HttpOnly; Secure;
    /// SameSite=Lax; Max-Age=2592000`; from that response on only the new
    /// value is accepted. Returns false if there is no such user.
    pub fn rotate_cookie(&self, user: &str, new_value: &str) -> bool {
        self.shared.accounts.rotate(user, new_value)
    }

    /// Sends `raw_set_cookie` as a `Set-Cookie` line on the next response to
    /// `user` (any status, once authenticated), e.g. `other=; Max-Age=0`.
    /// Returns false if there is no such user.
    pub fn set_cookie_header(&self, user: &str, raw_set_cookie: &str) -> bool {
        self.shared.accounts.push_set_cookie(user, raw_set_cookie)
    }

    /// The `knoq_session` value Knoq accepts for `user` now (after any
    /// rotation it has sent), or `None` if none is or there is no such user.
    pub fn session_value(&self, user: &str) -> Option<String> {
        self.shared.accounts.session_of(user)
    }

    /// Makes `user`'s current cookie invalid (401) until `set_cookie`.
    /// Returns false if there is no such user.
    pub fn expire_cookie(&self, user: &str) -> bool {
        self.shared.accounts.expire(user)
    }

    /// Makes `value` the accepted `knoq_session` value of `user`, adding the
    /// user if it does not exist.
    pub fn set_cookie(&self, user: &str, value: &str) {
        self.shared.accounts.set_session(user, value);
    }

    /// Every request received (rejected ones too, not `/_sim/` control
    /// requests), in arrival order; the most recent
    /// [`REQUEST_LOG_CAP`](super::REQUEST_LOG_CAP) at most.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.log.snapshot()
    }

    pub fn clear_requests(&self) {
        self.shared.log.clear();
    }

    /// Requests being handled now (including delayed and hung ones).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Handler futures dropped before they answered: the client went away.
    pub fn cancelled(&self) -> u64 {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// 429s the simulator's own limits answered. Injected `Fault::Status`
    /// 429s are not counted: this number says whether a client overran Knoq.
    pub fn rate_limited(&self) -> u64 {
        self.shared.rate_limited.load(Ordering::SeqCst)
    }

    /// `user`'s sessions, oldest first (deleted ones are gone).
    pub fn sessions(&self, user: &str) -> Vec<SimSession> {
        self.shared.sessions.snapshots(user)
    }

    /// Texts of the `user_message` events of a session; empty if unknown.
    pub fn user_messages(&self, session_id: &str) -> Vec<String> {
        self.shared.sessions.user_messages(session_id)
    }

    /// Agent delay for turns that start from now on.
    pub fn set_agent_delay(&self, delay: Duration) {
        self.shared.set_agent_delay(delay);
    }

    /// Most events one transcript answer holds (default 100; at least 1).
    pub fn set_transcript_page_size(&self, size: usize) {
        self.shared.set_page_size(size);
    }

    /// Replaces the rate limits; logs of past requests are kept.
    pub fn set_limits(&self, limits: SimLimits) {
        self.shared.accounts.set_limits(limits);
    }
}

impl fmt::Debug for SimControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimControl")
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}
