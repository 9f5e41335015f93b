//! Time for quotas and cool-downs, injectable so tests of minute, hour and
//! month windows run in milliseconds.
//!
//! Quota state is persisted, so times are wall-clock milliseconds since the
//! Unix epoch. [`SystemClock`] reads them as "wall time at start + tokio's
//! monotonic time since", so they never go backwards when the host clock is
//! stepped, and they follow `tokio::time::pause()` in tests. [`ManualClock`]
//! is moved by hand.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Millis;
}

/// Wall-clock anchor plus tokio's monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    wall_start: Millis,
    mono_start: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock {
            wall_start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as Millis),
            mono_start: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        self.wall_start + self.mono_start.elapsed().as_millis() as Millis
    }
}

/// A clock tests set and advance explicitly.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: Millis) -> Self {
        ManualClock(AtomicU64::new(start))
    }

    pub fn set(&self, t: Millis) {
        self.0.store(t, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: Millis) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.0.load(Ordering::SeqCst)
    }
}
