//! knoq-gateway: a local authenticating reverse proxy for the Knoq API.
//!
//! Internal services call the gateway with a plain bearer token; the gateway
//! maps the token to a Knoq account, attaches that account's session cookie
//! and the `Origin` Knoq's CSRF guard wants, and forwards the request.
//!
//! # Map
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the TOML file: raw layer, validated `Config`, every problem with its key |
//! | [`units`] | duration and size parsing |
//! | [`secrets`] | reading secret files (mode and symlink checks) |
//! | [`tls`] | rustls server and client configs (ring provider only) |
//! | [`server`] | accept loop, per-connection limits, graceful drain |
//! | [`pipeline`] | the per-request stages, in order, and the one log line |
//! | [`inspect`] | request hygiene: target form, methods, header names, framing, size, Host |
//! | [`auth`] | bearer token to principal |
//! | [`route`] | normal-form path check and endpoint classification |
//! | [`credentials`] | each user's cookie and the SCIM token |
//! | [`quota`] | per-user and per-token windows, Knoq cool-downs, the journal |
//! | [`clock`] | injectable wall-clock milliseconds for quotas |
//! | [`state`] | the state directory; atomic, durable file replacement |
//! | [`headers`] | rewriting headers both ways; redacted view for logs |
//! | [`upstream`] | the pooled HTTPS client towards Knoq, typed errors |
//! | [`error`] | the one map from errors to status, code and JSON body |
//! | [`body`] | body type and helpers (JSON, deadline, in-flight guard) |
//! | [`probe`] | keep-alive checks of idle accounts' cookies |
//! | [`reload`] | the live gateway: SIGHUP and file-change reloads, atomic swap |
//! | [`metrics`] | Prometheus series on an explicit registry; bounded labels |
//! | [`admin`] | `/healthz`, `/readyz` on the admin port |
//! | [`sim`] | the simulated Knoq used by tests, the demo and the benchmark |
//! | [`demo`] | `knoq-gateway demo`: simulated Knoq and gateway in one process |
//!
//! # Request flow
//!
//! ```text
//! server::serve -> pipeline::Gateway::handle
//!     -> inspect -> auth -> route -> credentials -> quota -> headers (rewrite)
//!     -> upstream::send -> headers (filter) -> response
//!     (one log line per request, at the end)
//! ```
//!
//! Dependencies point down that list: leaf modules know nothing of HTTP
//! status codes (only `error` does) or of each other. Config is read once at
//! start-up; each stage gets only its own piece of it.

pub mod admin;
pub mod assemble;
pub mod auth;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod cookies;
pub mod credentials;
#[cfg(feature = "sim")]
pub mod demo;
pub mod error;
pub mod forward;
pub mod headers;
pub mod inspect;
pub mod knoq;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod probe;
pub mod quota;
pub mod reconcile;
pub mod reload;
pub mod route;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod tls;
pub mod units;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};
use crate::server::ServeOptions;

/// A gateway ready to serve: every file read, every check passed.
pub struct Prepared {
    pub config: Arc<Config>,
    live: Arc<reload::Live>,
    admin: Arc<Admin>,
    tls: Option<TlsAcceptor>,
}

/// Reads every file the config names and builds the gateway, reporting
/// every problem at once. Binds nothing. Opens (and compacts) the quota
/// journal in the state directory, creating the directory if needed.
pub fn prepare(config: Config) -> Result<Prepared, ConfigError> {
    prepare_with_clock(config, Arc::new(SystemClock::new()))
}

/// Checks everything `prepare` would, without changing any file.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    assemble::check(config)
}

/// As [`prepare`], with the clock quotas use (tests drive it by hand).
pub fn prepare_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Prepared, ConfigError> {
    let started = assemble::start(config, clock)?;
    let config = started.gateway.config.clone();
    // The admin port also answers to the loopback names (a DNS-rebinding
    // page cannot send those), so `credentials status` always reaches it.
    let mut hygiene = started.gateway.hygiene.clone();
    for name in ["localhost", "127.0.0.1", "[::1]"] {
        if !hygiene.allowed_hosts.iter().any(|h| h == name) {
            hygiene.allowed_hosts.push(name.to_string());
        }
    }
    let live = Arc::new(reload::Live::new(started.gateway, started.services));
    Ok(Prepared {
        admin: Arc::new(Admin::new(live.clone(), hygiene)),
        live,
        tls: started.tls,
        config,
    })
}

/// Serves the clients' port and the admin port until `shutdown` resolves,
/// then drains both within `server.shutdown_grace`.
pub async fn run(
    prepared: Prepared,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let server = &prepared.config.server;
    let proxy_opts = ServeOptions {
        tls: prepared.tls.clone(),
        header_read_timeout: server.header_read_timeout,
        idle_timeout: server.idle_timeout,
        max_connections: server.max_connections,
        max_header_bytes: server.max_header_bytes,
        shutdown_grace: server.shutdown_grace,
        connections: Some(prepared.live.services().metrics.open_connections.clone()),
    };
    let admin_opts = ServeOptions {
        tls: None,
        max_connections: 64,
        connections: None,
        ..proxy_opts.clone()
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let stop_rx_watch = stop_rx.clone();
    let stop_rx_probe = stop_rx.clone();
    let proxy_task = server::serve(
        proxy,
        prepared.live.clone(),
        proxy_opts,
        stopped(stop_rx.clone()),
    );
    let admin_task = server::serve(admin, prepared.admin.clone(), admin_opts, stopped(stop_rx));
    let live = prepared.live.clone();
    let watch = prepared
        .live
        .clone()
        .watch(prepared.config.source.clone(), stopped(stop_rx_watch));
    let probes = prepared.live.clone().probe_loop(stopped(stop_rx_probe));
    let signal = async move {
        shutdown.await;
        live.services().drain.begin();
        let _ = stop_tx.send(true);
    };
    tokio::join!(proxy_task, admin_task, signal, watch, probes);
}
