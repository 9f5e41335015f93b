//! Accept loop and per-connection driver, shared by the clients' port and
//! the admin port.
//!
//! Per connection: optional TLS handshake (bounded by the header read
//! timeout), then hyper-util's auto builder (HTTP/1.1, or HTTP/2 with prior
//! knowledge, i.e. h2c; `Upgrade` is never honoured because connections are
//! served without upgrade support). Protections against bad clients, none
//! of which lets one client stall another:
//! - `max_connections`: a semaphore permit per connection; beyond it new
//!   connections wait in the kernel's accept queue;
//! - header read timeout: hyper's HTTP/1 timer, and for a connection that
//!   has not started a request yet, the idle watcher below;
//! - idle timeout: a connection with no request in flight for that long is
//!   closed gracefully (GOAWAY for HTTP/2);
//! - head size: hyper's read buffer is bounded (the JSON 431 comes earlier,
//!   from `inspect.rs`; hyper's own 431 is the backstop).
//!
//! Shutdown: stop accepting, ask every connection to finish gracefully
//! (in-flight requests complete, idle ones close), wait up to the grace
//! period, then return (remaining connections are dropped).

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::body::{BoxBody, Guarded};

/// Something that answers requests: the proxy pipeline or the admin page.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Response<BoxBody>> + Send;
}

/// Connection-level settings for one listener.
#[derive(Clone)]
pub struct ServeOptions {
    pub tls: Option<TlsAcceptor>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
    /// Counts open connections, when given.
    pub connections: Option<prometheus::IntGauge>,
}

/// Serves `listener` with `handler` until `shutdown` resolves, then drains.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let builder = Arc::new(connection_builder(&opts));
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    let (drain_tx, drain_rx) = watch::channel(false);
    // Each connection task holds a clone of `done_tx`; when the last one is
    // dropped, `done_rx.recv()` returns `None`: every connection has ended.
    let (done_tx, mut done_rx) = mpsc::channel::<Infallible>(1);
    let mut accept_backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        accept_backoff = Duration::from_millis(5);
        let handler = handler.clone();
        let opts = opts.clone();
        let builder = builder.clone();
        let drain = drain_rx.clone();
        let done = done_tx.clone();
        tokio::spawn(async move {
            tracing::trace!(%peer, "connection accepted");
            let gauge = opts.connections.clone();
            if let Some(g) = &gauge {
                g.inc();
            }
            serve_connection(stream, &builder, handler, opts, drain).await;
            if let Some(g) = &gauge {
                g.dec();
            }
            drop(permit);
            drop(done);
        });
    }
    drop(listener);
    let _ = drain_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(opts.shutdown_grace, done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = ?opts.shutdown_grace,
            "shutdown grace period ended with requests still in flight"
        );
    }
}

/// The HTTP settings every connection of a listener shares, built once.
fn connection_builder(opts: &ServeOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .keep_alive(true)
        // Our own limit answers with JSON first (inspect.rs); hyper's bare
        // 431 is only the backstop for heads far beyond it.
        .max_headers(256)
        // hyper's floor is 8 KiB; leave room above our own (JSON) limit.
        .max_buf_size((opts.max_header_bytes * 2).max(8192 + 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(opts.max_header_bytes * 2).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        // A peer that stops answering pings is dead: close it.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    handler: Arc<H>,
    opts: ServeOptions,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    match &opts.tls {
        None => drive(stream, builder, handler, &opts, drain).await,
        Some(acceptor) => {
            match tokio::time::timeout(opts.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => drive(tls, builder, handler, &opts, drain).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn drive<I, H>(
    io: I,
    builder: &auto::Builder<TokioExecutor>,
    handler: Arc<H>,
    opts: &ServeOptions,
    mut drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity::new());
    let svc_activity = activity.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let in_flight = svc_activity.begin();
        async move {
            let rsp = handler.handle(req).await;
            // The request counts as in flight until its body is sent.
            Ok::<_, Infallible>(rsp.map(|b| Guarded::new(b, in_flight).boxed_unsync()))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    let mut closing_since = Instant::now();
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = drain.changed(), if !closing => {
                (closing, closing_since) = (true, Instant::now());
                conn.as_mut().graceful_shutdown();
            }
            () = activity.idle(opts.header_read_timeout, opts.idle_timeout, None), if !closing => {
                tracing::trace!("closing idle connection");
                (closing, closing_since) = (true, Instant::now());
                conn.as_mut().graceful_shutdown();
            }
            // A graceful close waits for the peer (an HTTP/2 GOAWAY wants a
            // ping answer); a peer that never answers must not keep the
            // connection, or its slot, forever.
            () = activity.idle(opts.header_read_timeout, opts.header_read_timeout, Some(closing_since)), if closing => {
                tracing::trace!("dropping a connection that did not close in time");
                break;
            }
        }
    }
}

// === impl Activity ===

/// Tracks whether a connection has a request in flight and since when it
/// has been idle, so an idle connection can be closed.
///
/// Requests only touch atomics; the watcher finds out on its own timer.
/// (Waking it on every request start and end cost about 1 µs per request.)
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `born` when the connection last became idle.
    idle_since_ms: AtomicU64,
    served_any: AtomicBool,
}

/// Marks one request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.born.elapsed().as_millis() as u64, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new() -> Self {
        Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served_any: AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.served_any.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for the
    /// idle timeout (or, before its first request, the header read timeout),
    /// counting from `not_before` at the earliest.
    ///
    /// It wakes no earlier than a close could be due: a request in flight
    /// (or one that might still arrive and finish at once) cannot make the
    /// connection idle for `idle_timeout` before now + `idle_timeout`. So a
    /// watcher never needs waking by the requests themselves, and an idle
    /// connection still closes on time.
    async fn idle(
        &self,
        first_request_timeout: Duration,
        idle_timeout: Duration,
        not_before: Option<Instant>,
    ) {
        loop {
            let now = Instant::now();
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                now + idle_timeout
            } else {
                let served = self.served_any.load(Ordering::Acquire);
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let idle_from = (self.born + since).max(not_before.unwrap_or(self.born));
                let limit = if served {
                    idle_timeout
                } else {
                    first_request_timeout
                };
                if now >= idle_from + limit {
                    return;
                }
                if served {
                    idle_from + limit
                } else {
                    (idle_from + limit).min(now + idle_timeout)
                }
            };
            tokio::time::sleep_until(deadline).await;
        }
    }
}
