//! The simulated agent: answers each user message after the agent delay.
//!
//! One tokio task per running turn. It sleeps (tokio time, so paused-time
//! tests work), then asks [`Sessions::finish_turn`](super::sessions::Sessions)
//! to append `agent_message` and `status_idle`; if more messages were queued
//! meanwhile it goes on with the next. A cancel or delete makes its generation
//! stale and it stops; shutdown stops it too.

use std::sync::Arc;

use super::sessions::AfterTurn;
use super::state::Shared;

/// Starts answering the session's pending messages.
pub(super) fn start_turn(shared: &Arc<Shared>, session_id: String, generation: u64) {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        loop {
            let delay = shared.agent_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shared.stopped() => return,
            }
            let next = shared
                .sessions
                .finish_turn(&session_id, generation, &shared.clock);
            if next == AfterTurn::Stop {
                return;
            }
        }
    });
}
