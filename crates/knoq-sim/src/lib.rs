//! A simulated Knoq: an in-memory HTTPS server that behaves like the Knoq API
//! described in `shared/knoq-api.md`, for the gateway's tests, the demo, the
//! benchmark and `knoq-gateway mock-knoq`.
//!
//! ```text
//! SimKnoq::start(config, listener) -> SimHandle { addr, base_url, ca_pem, control, shutdown }
//!
//! server   accept loop, TLS (ALPN h2/http1.1) or plain, request life cycle, faults, drop guard
//!   |-> admin     /_sim/ control routes (JSON veneer on SimControl)
//!   '-> api       managed-agents routes: 401 -> 403 CSRF -> 400 -> 404 -> 429 -> apply
//!         |-> accounts   users, cookies, rotation, per-user rate logs, monthly quota
//!         |-> sessions   sessions, event logs, turns      <- agent (tokio tasks answer turns)
//!         '-> scim       SCIM 2.0 users and the Viewers group (bearer token)
//! state    Shared: the parts above plus counters and the stop signal
//! control  SimControl: fail_next, rotate/expire cookies, request log, counters
//! tls      self-signed (fresh, or kept by `files` in a directory) or from files
//!
//! Standalone { listen, tls, .. }.start() / run_standalone(..): `mock-knoq`
//! ```
//!
//! Leaf modules (`limits`, `clock`, `faults`, `log`, `reply`) know nothing of
//! connections. Handlers are synchronous; only `server` and `agent` await,
//! and no lock is held across an `.await`. Time is tokio time throughout, so
//! the simulator works under `tokio::time::pause()`.
//!
//! Choices where Knoq's docs are silent are documented where they are made:
//! the cookie is named `knoq_session`; transcript paging and unknown cursors
//! (`sessions.rs`); check order and when limits count (`api.rs`, `limits.rs`);
//! fault order (`faults.rs`).

#![forbid(unsafe_code)]

mod accounts;
mod admin;
mod agent;
mod api;
mod clock;
mod config;
mod control;
mod faults;
mod files;
mod limits;
mod log;
mod reply;
mod scim;
mod server;
mod sessions;
mod state;
mod tls;

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::{fmt, fs};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info};

pub use config::{
    SimConfig, SimLimits, SimTls, SimUser, Window, DEFAULT_AGENT_DELAY, DEMO_COOKIE, DEMO_USER,
    KNOQ_ORIGIN, SESSION_COOKIE,
};
pub use control::{SimControl, SimSession};
pub use faults::{Fault, SimRoute};
pub use log::{SeenRequest, REQUEST_LOG_CAP};

use state::Shared;

/// Starts simulated Knoq servers.
#[derive(Debug)]
pub struct SimKnoq;

/// A running simulator. Dropping it stops the server (without waiting);
/// [`SimHandle::shutdown`] stops it and waits.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    tls: bool,
    ca_pem: Option<String>,
    control: SimControl,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

// === impl SimKnoq ===

impl SimKnoq {
    /// Serves on an already-bound listener (tests bind `127.0.0.1:0`).
    /// Returns once the accept loop is running.
    ///
    /// Fails with `InvalidInput` on a bad user list and `InvalidData` on
    /// unusable certificate files. Must be called within a tokio runtime.
    pub async fn start(config: SimConfig, listener: TcpListener) -> io::Result<SimHandle> {
        let addr = listener.local_addr()?;
        let tls = tls::setup(&config.tls)?;
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(&config, tls.ca_pem.clone(), stop_rx.clone())?);
        let task = tokio::spawn(server::run(
            listener,
            tls.acceptor.clone(),
            Arc::clone(&shared),
            stop_rx,
        ));
        Ok(SimHandle {
            addr,
            tls: tls.acceptor.is_some(),
            ca_pem: tls.ca_pem,
            control: SimControl::new(shared),
            stop,
            task: Some(task),
        })
    }
}

// === impl SimHandle ===

impl SimHandle {
    /// The address the simulator listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (`http://` for plain). An unspecified listen
    /// address (`0.0.0.0`, `::`) is replaced by loopback, which clients can reach.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// PEM of the self-signed certificate (fresh or kept in a directory), for
    /// the client to trust; `None` with certificate files or plain HTTP.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// A handle to inject faults and inspect state.
    pub fn control(&self) -> SimControl {
        self.control.clone()
    }

    /// Stops accepting, ends hung requests and agent turns, lets open
    /// connections finish (at most two seconds), and waits. Re-raises a panic
    /// of the server task.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                if error.is_panic() {
                    std::panic::resume_unwind(error.into_panic());
                }
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// How `knoq-gateway mock-knoq` runs a simulator on its own: the default
/// simulation (one demo user, [`DEMO_USER`] with [`DEMO_COOKIE`]) with these
/// choices. [`Standalone::new`] gives the defaults for the other fields.
/// `Debug` leaves the SCIM token out.
#[derive(Clone)]
pub struct Standalone {
    /// Where to listen. Port 0 picks a free one ([`SimHandle::addr`] says
    /// which, and the start-up log line).
    pub listen: SocketAddr,
    /// How the listener speaks; [`SimTls::SelfSignedIn`] keeps the
    /// certificate across restarts.
    pub tls: SimTls,
    /// Also require `Origin` on reads (see [`SimConfig::origin_on_reads`]).
    pub origin_on_reads: bool,
    /// Write the PEM of the certificate clients must trust to this file
    /// (atomically, mode 0644) once the simulator accepts connections and
    /// before the line that says it listens is logged, so a script can wait
    /// for the file. It is the same PEM as `GET /_sim/ca` serves. Only for
    /// [`SimTls::SelfSigned`] and [`SimTls::SelfSignedIn`]: with certificate
    /// files or plain HTTP, [`Standalone::start`] fails with `InvalidInput`
    /// (clients of a given certificate trust whatever CA issued it, which the
    /// simulator does not know). An existing file is replaced, not removed
    /// first: a script that waits for it should delete it before starting.
    pub ca_out: Option<PathBuf>,
    /// Enables SCIM (under `/api/scim` and `/api/scim/v2`) with this bearer
    /// token; `None`: every SCIM call is 403, as on a plan without SCIM. It
    /// must be non-empty without whitespace (trim what a file ends with), or
    /// [`Standalone::start`] fails with `InvalidInput`. Never logged.
    pub scim_token: Option<String>,
}

// === impl Standalone ===

impl Standalone {
    /// Listens on `listen` with a fresh self-signed certificate, `Origin` on
    /// mutations only, no `ca_out` file and no SCIM.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            tls: SimTls::SelfSigned,
            origin_on_reads: false,
            ca_out: None,
            scim_token: None,
        }
    }

    /// Binds, starts the simulator, writes `ca_out` if set, then logs the
    /// address and the demo user's name (never a cookie or the SCIM token)
    /// and, with a self-signed certificate, its SHA-256 fingerprint (the PEM
    /// is at `GET /_sim/ca`, and in the debug log).
    ///
    /// Fails with `InvalidInput` on a `ca_out` without a self-signed
    /// certificate or an unusable SCIM token (both before binding), with the
    /// errors of [`SimKnoq::start`] and of [`SimTls::SelfSignedIn`], and
    /// with the bind or write error (naming the address or the file).
    pub async fn start(self) -> io::Result<SimHandle> {
        self.check()?;
        let listener = TcpListener::bind(self.listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("listening on {}: {e}", self.listen)))?;
        let scim = self.scim_token.is_some();
        let config = SimConfig {
            tls: self.tls,
            origin_on_reads: self.origin_on_reads,
            scim_token: self.scim_token,
            ..SimConfig::default()
        };
        let handle = SimKnoq::start(config, listener).await?;
        if let (Some(path), Some(pem)) = (&self.ca_out, handle.ca_pem.as_deref()) {
            files::write_atomic(path, pem.as_bytes(), files::PUBLIC_MODE)?;
        }
        info!(
            addr = %handle.addr(),
            base_url = %handle.base_url(),
            user = DEMO_USER,
            scim,
            origin_on_reads = self.origin_on_reads,
            "simulated Knoq listening; control interface under /_sim/"
        );
        if let Some(pem) = handle.ca_pem.as_deref() {
            let sha256 = certificate_fingerprint(pem);
            match &self.ca_out {
                Some(path) => info!(
                    %sha256,
                    ca_out = %path.display(),
                    "simulated Knoq uses a self-signed certificate; written to the ca_out file"
                ),
                None => info!(
                    %sha256,
                    "simulated Knoq uses a self-signed certificate; fetch it from GET /_sim/ca"
                ),
            }
            debug!(%pem, "simulated Knoq certificate");
        }
        Ok(handle)
    }

    /// The checks that need no socket or file.
    fn check(&self) -> io::Result<()> {
        if let Some(path) = &self.ca_out {
            if !matches!(self.tls, SimTls::SelfSigned | SimTls::SelfSignedIn(_)) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "ca_out ({}) only applies to a self-signed certificate; with certificate \
                         files clients trust the CA that issued them, and plain HTTP has none",
                        path.display()
                    ),
                ));
            }
            if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("ca_out ({}) is a directory", path.display()),
                ));
            }
        }
        if let Some(token) = &self.scim_token {
            if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the SCIM token is empty or holds whitespace or control characters",
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Standalone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Standalone")
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("origin_on_reads", &self.origin_on_reads)
            .field("ca_out", &self.ca_out)
            .field(
                "scim_token",
                &self.scim_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Runs a simulator as `options` say until `shutdown` resolves:
/// `knoq-gateway mock-knoq`. Starts with [`Standalone::start`] (see it for
/// what is logged and written, and the errors), then stops and waits as
/// [`SimHandle::shutdown`] does.
pub async fn run_standalone(
    options: Standalone,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let handle = options.start().await?;
    shutdown.await;
    info!("simulated Knoq shutting down");
    handle.shutdown().await;
    Ok(())
}

/// SHA-256 of the certificate's DER, as `AB:CD:..` (what `openssl x509
/// -fingerprint -sha256` prints), so a human can check what a client trusts.
fn certificate_fingerprint(pem: &str) -> String {
    match CertificateDer::from_pem_slice(pem.as_bytes()) {
        Ok(der) => Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
        Err(_) => "unavailable".to_string(),
    }
}
