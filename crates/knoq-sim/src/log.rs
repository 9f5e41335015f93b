//! The record of every request the simulator received, for assertions.
//!
//! A request is recorded once its body is read, before faults or handlers run,
//! so rejected, reset and hung requests are all there; its `user` and `status`
//! are filled in when it is answered. The log keeps the most recent
//! [`REQUEST_LOG_CAP`] requests so a long benchmark cannot exhaust memory.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Method};

/// Most requests the log keeps; older ones are forgotten first.
pub const REQUEST_LOG_CAP: usize = 10_000;

/// One request as the simulator saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    /// All request headers, unredacted (tests assert on the cookie sent).
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// The status answered; `None` if reset, hung, or the client went away.
    pub status: Option<u16>,
}

/// Requests in arrival order, each with a sequence number for later updates.
#[derive(Debug, Default)]
pub(super) struct RequestLog {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    entries: VecDeque<SeenRequest>,
}

/// Where a recorded request sits in the log, to fill in its outcome later.
#[derive(Debug, Clone, Copy)]
pub(super) struct LogSeq(u64);

// === impl RequestLog ===

impl RequestLog {
    pub(super) fn push(&self, request: SeenRequest) -> LogSeq {
        let mut inner = self.lock();
        if inner.entries.len() >= REQUEST_LOG_CAP {
            inner.entries.pop_front();
            inner.first_seq += 1;
        }
        inner.entries.push_back(request);
        LogSeq(inner.first_seq + inner.entries.len() as u64 - 1)
    }

    /// Fills in the outcome; a no-op if the entry was cleared or aged out.
    pub(super) fn complete(&self, seq: LogSeq, user: Option<String>, status: Option<u16>) {
        let mut inner = self.lock();
        let Some(index) = seq.0.checked_sub(inner.first_seq) else {
            return;
        };
        if let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| inner.entries.get_mut(i))
        {
            if user.is_some() {
                entry.user = user;
            }
            entry.status = status;
        }
    }

    pub(super) fn snapshot(&self) -> Vec<SeenRequest> {
        self.lock().entries.iter().cloned().collect()
    }

    pub(super) fn clear(&self) {
        let mut inner = self.lock();
        inner.first_seq += inner.entries.len() as u64;
        inner.entries.clear();
    }

    /// The log is only ever appended to or updated in place: a panic while
    /// holding the lock leaves it consistent, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(path: &str) -> SeenRequest {
        SeenRequest {
            method: Method::GET,
            path: path.into(),
            query: None,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            user: None,
            status: None,
        }
    }

    #[test]
    fn completes_the_right_entry_across_clears() {
        let log = RequestLog::default();
        let a = log.push(seen("/a"));
        log.clear();
        let b = log.push(seen("/b"));
        log.complete(a, Some("ann".into()), Some(200));
        log.complete(b, None, Some(404));
        let entries = log.snapshot();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].path, "/b");
        assert_eq!(entries[0].status, Some(404));
        assert_eq!(entries[0].user, None);
    }
}
