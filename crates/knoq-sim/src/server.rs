//! The accept loop, one task per connection, and the life of one request.
//!
//! A request's life: its body is read; it is recorded in the request log;
//! a queued fault for its route may replace or wrap the handling; the handler
//! (`api::handle`) answers; the answer gets any pending `Set-Cookie` lines and
//! its outcome is written back to the log. An [`InFlight`] guard lives for the
//! whole life and counts it as cancelled if hyper drops it before it answered.
//!
//! "Reset" is an `Err` from the service: hyper then drops the connection
//! without writing a response (HTTP/1.1: the socket closes; HTTP/2: the stream
//! is reset). Shutdown stops accepting, wakes hung requests (they reset),
//! lets connections finish within [`DRAIN_DEADLINE`], then aborts the rest.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, SET_COOKIE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::admin;
use super::api;
use super::control::SimControl;
use super::faults::{Fault, SimRoute};
use super::log::{LogSeq, SeenRequest};
use super::reply::{Reply, SimRequest};
use super::state::Shared;

/// Largest request body read; larger ones get 413.
const MAX_BODY_BYTES: usize = 1 << 20;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown lets open connections finish before aborting them.
pub(super) const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// Pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

type Builder = auto::Builder<TokioExecutor>;

/// Why the service gave hyper an error instead of a response. Every variant
/// makes hyper drop the connection (or, on HTTP/2, the stream).
#[derive(Debug, thiserror::Error)]
pub(super) enum SimError {
    #[error("connection reset by an injected fault")]
    InjectedReset,
    #[error("the simulator is shutting down")]
    ShuttingDown,
    #[error("reading the request body failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Counts a request in flight; on drop before [`InFlight::answered`], counts
/// it as cancelled (hyper dropped the handler: the client went away).
struct InFlight {
    shared: Arc<Shared>,
    answered: bool,
}

/// Serves `listener` until `stop` turns true (or its sender is dropped).
/// A panic in a connection task is re-raised here, so that
/// `SimHandle::shutdown` re-raises it.
pub(super) async fn run(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(
                        tcp,
                        peer,
                        acceptor.clone(),
                        Arc::clone(&builder),
                        Arc::clone(&shared),
                        graceful.watcher(),
                    ));
                }
                Err(error) => {
                    warn!(%error, "simulated Knoq: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(joined) = connections.join_next(), if !connections.is_empty() => reraise(joined),
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        debug!("simulated Knoq: drain deadline passed, aborting open connections");
    }
    connections.abort_all();
    while let Some(joined) = connections.join_next().await {
        reraise(joined);
    }
}

/// Resolves when `stop` turns true or its sender is gone. (Drops the watch
/// guard at once: it must not live in the `select!` output across an await.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

fn reraise(joined: Result<(), JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            std::panic::resume_unwind(error.into_panic());
        }
    }
}

/// One connection: TLS handshake if configured, then HTTP/1.1 or HTTP/2
/// (hyper-util's auto builder reads the preface, so ALPN and prior knowledge
/// both work).
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    builder: Arc<Builder>,
    shared: Arc<Shared>,
    watcher: Watcher,
) {
    // Small JSON answers: do not let Nagle hold them back.
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = acceptor else {
        return serve_io(tcp, &builder, shared, watcher).await;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => serve_io(tls, &builder, shared, watcher).await,
        Ok(Err(error)) => debug!(%peer, %error, "simulated Knoq: TLS handshake failed"),
        Err(_) => debug!(%peer, "simulated Knoq: TLS handshake timed out"),
    }
}

async fn serve_io<I>(io: I, builder: &Builder, shared: Arc<Shared>, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| serve(Arc::clone(&shared), req));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(conn).await {
        // Resets and clients going away land here; both are routine.
        debug!(%error, "simulated Knoq: connection ended with an error");
    }
}

/// The service: control requests aside, every request runs under an
/// [`InFlight`] guard.
async fn serve(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, SimError> {
    if req.uri().path().starts_with(admin::PREFIX) {
        return serve_control(shared, req).await;
    }
    let guard = InFlight::enter(&shared);
    let result = serve_knoq(&shared, req).await;
    guard.answered();
    result
}

async fn serve_control(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, SimError> {
    let req = match read_request(req).await? {
        Ok(req) => req,
        Err(too_large) => return Ok(respond(too_large, Vec::new())),
    };
    let ca_pem = shared.ca_pem.clone();
    let reply = admin::handle(&SimControl::new(shared), ca_pem.as_deref(), &req);
    Ok(respond(reply, Vec::new()))
}

/// A Knoq request: record, apply any fault, handle, answer.
async fn serve_knoq(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, SimError> {
    let req = match read_request(req).await? {
        Ok(req) => req,
        Err(too_large) => return Ok(respond(too_large, Vec::new())),
    };
    let route = SimRoute::of(&req.method, &req.path);
    let seq = shared.log.push(SeenRequest {
        method: req.method.clone(),
        path: req.path.clone(),
        query: req.query.clone(),
        headers: req.headers.clone(),
        body: req.body.clone(),
        // Who it is, even if a fault answers before authentication runs.
        user: api::is_managed(&req.path)
            .then(|| shared.accounts.authenticate(&req.headers))
            .flatten(),
        status: None,
    });
    match shared.faults.pop(route) {
        None => Ok(answer(shared, seq, &req)),
        Some(Fault::Status {
            status,
            retry_after,
        }) => Ok(finish(shared, seq, fault_reply(status, retry_after))),
        Some(Fault::Delay(delay)) => {
            tokio::select! {
                _ = tokio::time::sleep(delay) => Ok(answer(shared, seq, &req)),
                _ = shared.stopped() => Err(SimError::ShuttingDown),
            }
        }
        Some(Fault::Reset) => Err(SimError::InjectedReset),
        Some(Fault::ApplyThenReset) => {
            apply_unanswered(shared, seq, &req);
            Err(SimError::InjectedReset)
        }
        Some(Fault::Hang) => {
            shared.stopped().await;
            Err(SimError::ShuttingDown)
        }
        Some(Fault::ApplyThenHang) => {
            apply_unanswered(shared, seq, &req);
            shared.stopped().await;
            Err(SimError::ShuttingDown)
        }
    }
}

/// Reads the whole body. The outer `Err` breaks the connection; the inner
/// `Err` is a 413 reply.
async fn read_request(req: Request<Incoming>) -> Result<Result<SimRequest, Reply>, SimError> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Ok(Err(Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
            )));
        }
        Err(error) => return Err(SimError::Body(error)),
    };
    Ok(Ok(SimRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers,
        body,
    }))
}

/// Handles the request and builds its response.
fn answer(shared: &Arc<Shared>, seq: LogSeq, req: &SimRequest) -> Response<Full<Bytes>> {
    let reply = api::handle(shared, req);
    finish(shared, seq, reply)
}

/// Handles the request but answers nothing: the client never sees the
/// outcome, so no `Set-Cookie` is consumed and no rotation happens.
fn apply_unanswered(shared: &Arc<Shared>, seq: LogSeq, req: &SimRequest) {
    let reply = api::handle(shared, req);
    if reply.rate_limited {
        shared.rate_limited.fetch_add(1, Ordering::SeqCst);
    }
    shared.log.complete(seq, reply.user, None);
}

/// Turns a reply into the response: counts a 429 of the limiter, adds the
/// user's pending `Set-Cookie` lines, and records the outcome.
fn finish(shared: &Shared, seq: LogSeq, reply: Reply) -> Response<Full<Bytes>> {
    if reply.rate_limited {
        shared.rate_limited.fetch_add(1, Ordering::SeqCst);
    }
    let set_cookies = match &reply.user {
        Some(user) => shared
            .accounts
            .take_set_cookies(user, reply.status.is_success()),
        None => Vec::new(),
    };
    shared
        .log
        .complete(seq, reply.user.clone(), Some(reply.status.as_u16()));
    respond(reply, set_cookies)
}

/// The injected answer of a `Fault::Status`.
fn fault_reply(status: u16, retry_after: Option<u32>) -> Reply {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status
        .canonical_reason()
        .unwrap_or("unknown status")
        .to_ascii_lowercase();
    let reply = Reply::error(status, &format!("{reason} (simulated)"));
    match retry_after {
        Some(secs) => reply.retry_after(secs),
        None => reply,
    }
}

fn respond(reply: Reply, set_cookies: Vec<String>) -> Response<Full<Bytes>> {
    let has_body = !reply.body.is_empty();
    let mut response = Response::new(Full::new(reply.body));
    *response.status_mut() = reply.status;
    let headers = response.headers_mut();
    headers.extend(reply.headers);
    if has_body {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    for line in set_cookies {
        match HeaderValue::from_str(&line) {
            Ok(value) => {
                headers.append(SET_COOKIE, value);
            }
            Err(_) => {
                warn!("simulated Knoq: dropping a Set-Cookie line that is not a valid header value")
            }
        }
    }
    response
}

// === impl InFlight ===

impl InFlight {
    fn enter(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        Self {
            shared: Arc::clone(shared),
            answered: false,
        }
    }

    /// The handler returned (a response or a deliberate reset).
    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.answered {
            self.shared.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}
