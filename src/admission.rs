//! Admission: how many requests the gateway handles at once, in all and
//! per Knoq account, so overload is refused early and cheaply instead of
//! queueing everyone behind one busy upstream connection.
//!
//! The counters live as long as the process (a reload keeps them: requests
//! started under the old configuration still count); the limits come from
//! each configuration. A refusal is decided before anything is read or
//! charged, and never reaches Knoq, so it cannot open the circuit or spend
//! quota.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

/// The caps of one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight in the whole gateway.
    pub total: usize,
    /// Requests in flight for one Knoq account.
    pub per_user: usize,
}

/// Which cap refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Gateway,
    Account,
    /// No place to send to Knoq came free within `upstream.queue_timeout`.
    Upstream,
}

/// The in-flight counters (long-lived, shared by every configuration).
#[derive(Debug, Default, Clone)]
pub struct Counters {
    total: Arc<AtomicUsize>,
    per_user: Arc<DashMap<Box<str>, Arc<AtomicUsize>>>,
}

/// One admitted request's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    total: Arc<AtomicUsize>,
    user: Option<Arc<AtomicUsize>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(u) = &self.user {
            u.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

// === impl Counters ===

impl Counters {
    /// A place in the gateway-wide count, or `Full::Gateway`.
    pub fn enter(&self, limits: Limits) -> Result<Slot, Full> {
        take(&self.total, limits.total)?;
        Ok(Slot {
            total: self.total.clone(),
            user: None,
        })
    }

    /// Adds the account's count to an admitted request, or `Full::Account`
    /// (the slot is then released when the caller drops it).
    pub fn enter_user(&self, slot: &mut Slot, user: &str, limits: Limits) -> Result<(), Full> {
        let count = match self.per_user.get(user) {
            Some(c) => c.clone(),
            None => self.per_user.entry(user.into()).or_default().clone(),
        };
        take(&count, limits.per_user).map_err(|_| Full::Account)?;
        slot.user = Some(count);
        Ok(())
    }
}

/// Takes one place under `cap`, or refuses without changing the count.
fn take(count: &AtomicUsize, cap: usize) -> Result<(), Full> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .map(drop)
        .map_err(|_| Full::Gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_in_all_and_per_account_and_freed_on_drop() {
        let c = Counters::default();
        let limits = Limits {
            total: 3,
            per_user: 2,
        };
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = c.enter(limits).unwrap();
            c.enter_user(&mut s, "alice", limits).unwrap();
            held.push(s);
        }
        let mut third = c.enter(limits).unwrap();
        assert_eq!(
            c.enter_user(&mut third, "alice", limits),
            Err(Full::Account)
        );
        drop(third);
        let mut bob = c.enter(limits).unwrap();
        c.enter_user(&mut bob, "bob", limits).unwrap();
        assert_eq!(c.enter(limits).unwrap_err(), Full::Gateway, "3 in flight");
        drop(held.pop());
        let mut again = c.enter(limits).unwrap();
        c.enter_user(&mut again, "alice", limits).unwrap();
    }
}
