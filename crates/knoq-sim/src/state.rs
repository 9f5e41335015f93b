//! Everything a running simulator shares between its connections, its agent
//! tasks and its [`SimControl`](super::SimControl) handles.
//!
//! Each part guards itself (see each module): no lock here spans two parts,
//! and no lock is held across an `.await`. Counters are plain atomics.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::accounts::Accounts;
use super::clock::SimClock;
use super::config::SimConfig;
use super::faults::FaultQueues;
use super::log::RequestLog;
use super::scim::ScimDirectory;
use super::sessions::Sessions;

/// Transcript page size unless changed through `SimControl`.
pub(super) const DEFAULT_PAGE_SIZE: usize = 100;

/// The shared state of one simulator. Not `Debug`: it holds the SCIM token.
pub(super) struct Shared {
    /// `Origin` required on POST and DELETE.
    pub(super) origin: String,
    pub(super) origin_on_reads: bool,
    /// SCIM bearer token; `None`: SCIM answers 403.
    pub(super) scim_token: Option<String>,
    /// PEM of the self-signed certificate, served at `/_sim/ca`.
    pub(super) ca_pem: Option<String>,
    pub(super) accounts: Accounts,
    pub(super) sessions: Sessions,
    pub(super) scim: ScimDirectory,
    pub(super) faults: FaultQueues,
    pub(super) log: RequestLog,
    pub(super) clock: SimClock,
    /// Agent delay in nanoseconds (atomic so tests can change it while running).
    agent_delay_nanos: AtomicU64,
    page_size: AtomicUsize,
    /// Requests being handled now.
    pub(super) in_flight: AtomicUsize,
    /// Handler futures dropped before they answered.
    pub(super) cancelled: AtomicU64,
    /// 429s from the simulator's own limits.
    pub(super) rate_limited: AtomicU64,
    /// Becomes `true` when the simulator shuts down: hung requests and agent
    /// tasks watch it so that shutdown never waits on them.
    pub(super) stop: watch::Receiver<bool>,
}

// === impl Shared ===

impl Shared {
    /// Builds the state; fails with `InvalidInput` on a bad user list.
    pub(super) fn new(
        config: &SimConfig,
        ca_pem: Option<String>,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            origin: config.origin.clone(),
            origin_on_reads: config.origin_on_reads,
            scim_token: config.scim_token.clone(),
            ca_pem,
            accounts: Accounts::new(&config.users, config.limits.clone())?,
            sessions: Sessions::default(),
            scim: ScimDirectory::default(),
            faults: FaultQueues::default(),
            log: RequestLog::default(),
            clock: SimClock::new(),
            agent_delay_nanos: AtomicU64::new(duration_nanos(config.agent_delay)),
            page_size: AtomicUsize::new(DEFAULT_PAGE_SIZE),
            in_flight: AtomicUsize::new(0),
            cancelled: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            stop,
        })
    }

    pub(super) fn agent_delay(&self) -> Duration {
        Duration::from_nanos(self.agent_delay_nanos.load(Ordering::Relaxed))
    }

    pub(super) fn set_agent_delay(&self, delay: Duration) {
        self.agent_delay_nanos
            .store(duration_nanos(delay), Ordering::Relaxed);
    }

    pub(super) fn page_size(&self) -> usize {
        self.page_size.load(Ordering::Relaxed)
    }

    pub(super) fn set_page_size(&self, size: usize) {
        self.page_size.store(size.max(1), Ordering::Relaxed);
    }

    /// Resolves once the simulator is shutting down.
    pub(super) async fn stopped(&self) {
        let mut stop = self.stop.clone();
        // An error means the handle is gone: that is a shutdown too.
        let _ = stop.wait_for(|stopped| *stopped).await;
    }
}

/// A delay in nanoseconds, saturating (584 years is long enough).
fn duration_nanos(delay: Duration) -> u64 {
    u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX)
}
