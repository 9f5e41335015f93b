//! Telling the service manager how the gateway is (systemd's `Type=notify`
//! protocol, through the `sd-notify` crate): `READY=1` once both ports
//! serve, `RELOADING=1` then `READY=1` around a reload, `STOPPING=1` when
//! the drain begins. Without `NOTIFY_SOCKET` in the environment each call
//! does nothing. A failure to notify is logged, never fatal: the gateway
//! serves either way.

use sd_notify::NotifyState;

/// Both ports accept connections.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A reload starts; [`reloaded`] follows, whatever its outcome.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A reload ended: serving again (with the new or the old configuration).
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// The drain begins: no new connections.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
