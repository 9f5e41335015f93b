//! knoq-gateway: a local authenticating reverse proxy for the Knoq API.
//!
//! Internal services call the gateway with a plain bearer token; the gateway
//! maps the token to a Knoq account, attaches that account's session cookie
//! and the `Origin` Knoq's CSRF guard wants, and forwards the request.
//!
//! # Map
//!
//! Every module of the crate, each using only modules listed below it, so
//! imports point one way: down the request path, and from the parts that
//! run the gateway to the leaves they are built of. Tests check that this
//! table names every module and that no module imports one above it.
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the subcommands: serve, check, token, credentials, mock-knoq, demo |
//! | `demo` | `knoq-gateway demo`: simulated Knoq and gateway in one process (feature `sim`) |
//! | `verify` | `check --online`: asking Knoq about each cookie and the SCIM token |
//! | `admin` | `/healthz`, `/readyz`, `/metrics`, `/credentials` on the admin port |
//! | `health` | what an operator must act on now: `/readyz`, `knoq_gateway_problems`, `check` |
//! | `reload` | the live gateway: SIGHUP and file-change reloads, atomic swap, the prober's task |
//! | `probe` | keep-alive checks of idle accounts' cookies |
//! | `assemble` | the one place a config becomes running parts (start-up, `check`, reload), and what a reload keeps |
//! | `logging` | the tracing subscriber, its lean text line, the reloadable level |
//! | `server` | accept loop, per-connection limits, graceful drain |
//! | `pipeline` | the per-request stages in order, the one log line, the in-flight guard |
//! | `forward` | retries, the retry budget, reconciliation of ambiguous POSTs |
//! | `reconcile` | reading Knoq back after an ambiguous POST |
//! | `knoq` | the one way out as an account: circuit, cookie + Origin, metrics, rotation, expiry |
//! | `error` | the one map from errors to status, code and JSON body |
//! | `credentials` | each user's cookie and the SCIM token; rotation and expiry state |
//! | [`tls`] | rustls server and client configs (ring provider only) |
//! | [`config`] | the TOML file: raw layer, validated `Config`, every problem with its key |
//! | [`headers`] | rewriting headers both ways; redacted view for logs |
//! | `metrics` | Prometheus series on an explicit registry; encodes the snapshot it is handed |
//! | `inspect` | request hygiene: target form, methods, header names, framing, size, Host |
//! | [`auth`] | bearer token to principal |
//! | [`quota`] | per-user and per-token windows, Knoq cool-downs, the async store and its journal, the Redis store, carrying a journal into Redis |
//! | `upstream` | the pooled HTTPS client towards Knoq, response bounds, typed errors, retry policy |
//! | [`route`] | normal-form path check and endpoint classification |
//! | `cookies` | `Set-Cookie` parsing and merging |
//! | `body` | body types and bounds (JSON, deadline, idle gap, in-flight guard) |
//! | `cookie_vault` | every account's cookie shared through Redis: sealed (ChaCha20-Poly1305), generation compare-and-set, change notices |
//! | [`shared_store`] | the Redis every replica shares: connection, key layout, per-call deadline, health, metrics |
//! | `secrets` | reading secret files (mode and symlink checks) |
//! | `state` | the state directory; atomic, durable file replacement |
//! | `shutdown` | the signals that end the process; the drain latch |
//! | `service` | telling systemd ready / reloading / stopping (`NOTIFY_SOCKET`) |
//! | `admission` | the in-flight caps: in all and per account, refused before anything is read |
//! | `clock` | injectable wall-clock milliseconds and all calendar arithmetic |
//! | `units` | duration and size parsing |
//!
//! # Request flow
//!
//! ```text
//! server::serve -> pipeline::Gateway::handle
//!     -> inspect -> auth -> route -> credentials -> body -> quota
//!     -> headers (strip the client's identity)
//!     -> forward (retries, reconcile) -> knoq (per attempt: circuit, cookie
//!        + Origin, metrics, Set-Cookie, 401) -> upstream
//!     -> headers (filter) -> response
//!     (one log line per request, at the end, or at the drop of an abandoned one)
//! ```
//!
//! Only `error` knows HTTP status codes. Each stage gets only its own
//! settings (a leaf owns its settings type; `config` fills it in).
//! The simulated Knoq is the workspace crate `knoq-sim`.

#![forbid(unsafe_code)]

mod admin;
mod admission;
mod assemble;
pub mod auth;
mod body;
pub mod cli;
mod clock;
pub mod config;
mod cookie_vault;
mod cookies;
mod credentials;
#[cfg(feature = "sim")]
mod demo;
mod error;
mod forward;
pub mod headers;
mod health;
mod inspect;
mod knoq;
mod logging;
mod metrics;
mod pipeline;
mod probe;
pub mod quota;
mod reconcile;
mod reload;
pub mod route;
mod secrets;
mod server;
mod service;
pub mod shared_store;
mod shutdown;
mod state;
pub mod tls;
mod units;
mod upstream;
mod verify;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::clock::SystemClock;
use crate::config::{Config, ConfigError};
use crate::server::ServeOptions;

/// A gateway ready to serve: every file read, every check passed.
pub struct Prepared {
    pub config: Arc<Config>,
    live: Arc<reload::Live>,
    admin: Arc<Admin>,
    tls: Option<TlsAcceptor>,
    carry: Option<quota::carry::CarryOver>,
}

/// Reads every file the config names and builds the gateway, reporting
/// every problem at once. Binds nothing. Opens (and compacts) the quota
/// journal in the state directory, creating the directory if needed.
pub fn prepare(config: Config) -> Result<Prepared, ConfigError> {
    let started = assemble::start(config, Arc::new(SystemClock::new()))?;

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
        carry: started.carry,
        config,
    })
}

/// Checks everything `prepare` would, without changing any file.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    assemble::check(config)
}

/// Serves the clients' port and the admin port until `shutdown` resolves,
/// then drains both within `server.shutdown_grace`.
pub async fn run(
    mut prepared: Prepared,
    proxy: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    // The state directory's quota goes into Redis before any request is
    // decided there (the first start on a shared store after `local`).
    if let Some(carry) = prepared.carry.take() {
        let clock = prepared.live.services().clock.clone();
        tokio::select! {
            () = carry.finish(clock.as_ref()) => {}
            () = &mut shutdown => return,
        }
    }
    let server = &prepared.config.server;
    let proxy_opts = ServeOptions {
        tls: prepared.tls.clone(),
        header_read_timeout: server.header_read_timeout,
        first_byte_timeout: server.first_byte_timeout,
        idle_timeout: server.idle_timeout,
        send_timeout: server.send_timeout,
        max_requests_per_connection: server.max_requests_per_connection,
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
    let stop_rx_store = stop_rx.clone();
    let stop_rx_cookies = stop_rx.clone();
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
    let shared = prepared.live.services().shared.clone();
    let heartbeat = async move {
        if let Some(shared) = shared {
            shared.heartbeat(stopped(stop_rx_store)).await;
        }
    };
    let cookies = prepared
        .live
        .clone()
        .follow_shared_cookies(stopped(stop_rx_cookies));
    let ready = async { service::ready() };
    let signal = async move {
        shutdown.await;
        service::stopping();
        live.services().drain.begin();
        let _ = stop_tx.send(true);
    };
    tokio::join!(proxy_task, admin_task, ready, signal, watch, probes, heartbeat, cookies);
}

#[cfg(test)]
mod map {
    //! The map above, and the README's code map, name every module, and
    //! the map's order is the direction of every import.

    use std::collections::BTreeSet;

    fn modules() -> Vec<String> {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
        let mut names: Vec<String> = std::fs::read_dir(src)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != "lib.rs" && n != "main.rs")
            .map(|n| n.trim_end_matches(".rs").to_string())
            .collect();
        names.sort();
        names
    }

    /// The module names of the map, in its order.
    fn map() -> Vec<&'static str> {
        include_str!("lib.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .filter_map(|l| l.strip_prefix("//! | "))
            .filter_map(|l| l.split(" | ").next())
            .map(|cell| cell.trim_matches(|c| "[]`".contains(c)))
            .filter(|cell| !cell.is_empty() && *cell != "module" && !cell.contains(' '))
            .collect()
    }

    /// The top-level modules `module`'s files name as `crate::x` (tests
    /// left out: they may reach anywhere).
    fn imports(module: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
        let src = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
        let mut files = vec![src.join(format!("{module}.rs"))];
        if let Ok(dir) = std::fs::read_dir(src.join(module)) {
            files.extend(dir.map(|e| e.unwrap().path()));
        }
        let mut found = BTreeSet::new();
        for file in files.iter().filter(|f| f.is_file()) {
            let text = std::fs::read_to_string(file).unwrap();
            let code = text.split("#[cfg(test)]\nmod ").next().unwrap_or_default();
            for line in code
                .lines()
                .map(|l| l.split("//").next().unwrap_or_default())
            {
                let mut rest = line;
                while let Some(at) = rest.find("crate::") {
                    rest = &rest[at + "crate::".len()..];
                    let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                        group
                            .split(['}', ';'])
                            .next()
                            .unwrap_or_default()
                            .split(',')
                            .collect()
                    } else {
                        vec![rest]
                    };
                    for name in names {
                        let name: String = name
                            .trim()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if known.contains(&name) && name != module {
                            found.insert(name);
                        }
                    }
                }
            }
        }
        found
    }

    #[test]
    fn the_crate_map_names_every_module_once() {
        let lib = include_str!("lib.rs");
        let map = map();
        for m in modules() {
            assert_eq!(
                map.iter().filter(|n| **n == m).count(),
                1,
                "src/{m} should be named once in lib.rs's map: {map:?}"
            );
            assert!(
                lib.contains(&format!("mod {m};")),
                "src/{m} is declared in lib.rs"
            );
        }
        assert_eq!(
            map.len(),
            modules().len(),
            "the map names no module that is gone: {map:?}"
        );
    }

    #[test]
    fn every_import_points_down_the_map() {
        let map = map();
        let known: BTreeSet<String> = modules().into_iter().collect();
        for (i, m) in map.iter().enumerate() {
            for used in imports(m, &known) {
                let at = map.iter().position(|n| *n == used).unwrap();
                assert!(
                    at > i,
                    "{m} imports {used}, which the map lists above it: move one, or break the arrow"
                );
            }
        }
    }

    #[test]
    fn the_readme_code_map_names_every_module() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("## Code map")
            .nth(1)
            .expect("the README has a Code map section");
        for m in modules() {
            assert!(
                section.contains(&format!("`{m}`")),
                "README's Code map should name `{m}`"
            );
        }
    }
}
