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
use crate::clock::{Clock, Millis, SystemClock};
use crate::config::{Config, ConfigError, Problem};
use crate::credentials::Credentials;
use crate::inspect::HygieneRules;
use crate::pipeline::Gateway;
use crate::server::ServeOptions;
use crate::upstream::Upstream;

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
    let mut problems: Vec<Problem> = Vec::new();
    if let Err(p) = Credentials::load(config) {
        problems.extend(p);
    }
    if let Some(files) = &config.server.tls {
        if let Err(e) = tls::server_config(files) {
            problems.push(Problem::new("server.tls_key", e));
        }
    }
    if let Err(e) = tls::client_config(config.upstream.ca_file.as_deref()) {
        problems.push(Problem::new("upstream.ca_file", e));
    }
    if let Err(e) = quota::journal::Journal::inspect(&config.state.dir) {
        problems.push(Problem::new("state.dir", e));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.into())
    }
}

/// As [`prepare`], with the clock quotas use (tests drive it by hand).
pub fn prepare_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Prepared, ConfigError> {
    let mut problems: Vec<Problem> = Vec::new();
    if let Err(p) = Credentials::load(&config) {
        problems.extend(p);
    }
    let server_tls = match &config.server.tls {
        None => None,
        Some(files) => tls::server_config(files)
            .map_err(|e| problems.push(Problem::new("server.tls_key", e)))
            .ok(),
    };
    let client_tls = tls::client_config(config.upstream.ca_file.as_deref())
        .map_err(|e| problems.push(Problem::new("upstream.ca_file", e)))
        .ok();
    let policy = quota::Policy::new(&config);
    let margin = config.quotas.margin.as_millis() as Millis;
    let now = clock.now();
    let store = state::ensure_dir(&config.state.dir)
        .map_err(|e| format!("{}: {e}", config.state.dir.display()))
        .and_then(|()| {
            quota::journal::Journal::open(
                &config.state.dir,
                now,
                policy.retention(margin),
                quota::journal::SEGMENT_BYTES,
            )
        })
        .map(|(journal, history)| quota::LocalStore::open(journal, history, &policy, margin))
        .map_err(|e| problems.push(Problem::new("state.dir", e)))
        .ok();
    let (Some(client_tls), Some(store)) = (client_tls, store) else {
        return Err(problems.into());
    };
    if !problems.is_empty() {
        return Err(problems.into());
    }
    let metrics = metrics::Metrics::new();
    let forwarder = Arc::new(forward::Forwarder::new(
        Upstream::new(&config.upstream, client_tls),
        config.retry.clone(),
        &config.circuit,
        clock.clone(),
        metrics.clone(),
    ));
    let config = Arc::new(config);
    let gateway = build_gateway(
        config.clone(),
        clock.clone(),
        Arc::new(store),
        forwarder,
        metrics,
        None,
    )?;
    // The admin port also answers to the loopback names (a DNS-rebinding
    // page cannot send those), so `credentials status` always reaches it.
    let mut hygiene = gateway.hygiene.clone();
    for name in ["localhost", "127.0.0.1", "[::1]"] {
        if !hygiene.allowed_hosts.iter().any(|h| h == name) {
            hygiene.allowed_hosts.push(name.to_string());
        }
    }
    let live = Arc::new(reload::Live::new(gateway, clock));
    Ok(Prepared {
        admin: Arc::new(Admin::new(live.clone(), hygiene)),
        live,
        tls: server_tls.map(|c| TlsAcceptor::from(Arc::new(c))),
        config,
    })
}

/// Builds a gateway from a validated config around a quota store and a
/// forwarder (shared across reloads). Reads the credentials.
pub(crate) fn build_gateway(
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    store: Arc<dyn quota::QuotaStore>,
    forwarder: Arc<forward::Forwarder>,
    metrics: Arc<metrics::Metrics>,
    previous: Option<&Credentials>,
) -> Result<Gateway, ConfigError> {
    let credentials = match previous {
        Some(p) => Credentials::reload(&config, p),
        None => Credentials::load(&config),
    }
    .map_err(ConfigError::from)?;
    let policy = quota::Policy::new(&config);
    // A reload may add or lengthen windows: the journal must keep what the
    // new ones need (a bucket that had none was not even written).
    store.set_retention(policy.retention(config.quotas.margin.as_millis() as Millis));
    Ok(Gateway {
        hygiene: HygieneRules {
            max_header_bytes: config.server.max_header_bytes,
            allowed_hosts: config.server.allowed_hosts.clone(),
        },
        max_body: config.server.max_body,
        tokens: auth::TokenTable::new(&config.tokens),
        credentials: Arc::new(credentials),
        forwarder,
        origin: config.upstream.origin.clone(),
        quotas: quota::Quotas::new(policy, store, clock.clone(), &config.quotas),
        clock,
        config,
        metrics,
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
        connections: Some(prepared.live.current().metrics.open_connections.clone()),
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
        live.current().forwarder.begin_drain();
        let _ = stop_tx.send(true);
    };
    tokio::join!(proxy_task, admin_task, signal, watch, probes);
}
