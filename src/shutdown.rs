//! Process signals that end the gateway: SIGTERM (service managers) and
//! SIGINT (Ctrl-C). Tests fire their own shutdown future instead.

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; draining"),
        _ = int.recv() => tracing::info!("SIGINT received; draining"),
    }
}

/// The gateway-wide "we are draining" latch, shared by every reload's
/// stages: once begun, no new retry starts, retries sleeping in backoff
/// stop, and long-lived responses end at their next chance, so an open
/// stream does not hold shutdown for the whole grace period. It only moves
/// one way.
#[derive(Debug, Clone)]
pub struct Drain {
    tx: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            tx: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

impl Drain {
    /// Starts draining; idempotent.
    pub fn begin(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once draining has begun (at once if it already has).
    pub fn begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // The sender lives as long as any `Drain` clone; if every one
            // is gone, nothing can drain any more: wait forever.
            if rx.wait_for(|d| *d).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_wakes_waiters_and_stays_begun() {
        let drain = Drain::default();
        let waiting = tokio::spawn(drain.begun());
        assert!(!drain.is_draining());
        drain.begin();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("a waiter wakes when draining begins")
            .unwrap();
        assert!(drain.is_draining());
        // Asking after the fact resolves at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), drain.begun())
            .await
            .expect("already begun");
    }
}
