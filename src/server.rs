//! Accept loop and per-connection driver, shared by the clients' port and
//! the admin port.
//!
//! Per connection: optional TLS handshake (bounded by the header read
//! timeout), then hyper-util's auto builder (HTTP/1.1, or HTTP/2 with prior
//! knowledge, i.e. h2c; `Upgrade` is never honoured because connections are
//! served without upgrade support). Protections against bad clients, none
//! of which lets one client stall another:
//! - `max_connections`: a semaphore permit per connection; a connection
//!   beyond it is answered at once with 503 `too_many_connections` and
//!   closed (a TLS one is closed), never left waiting in the accept queue;
//! - first byte timeout: a connection that sends nothing at all is closed
//!   after `first_byte_timeout` (the idle watcher below);
//! - header read timeout: hyper's HTTP/1 timer, and for a connection that
//!   has sent something but not started a request yet, the idle watcher;
//! - idle timeout: a connection with no request in flight for that long is
//!   closed gracefully (GOAWAY for HTTP/2);
//! - `max_requests_per_connection` (nginx's `keepalive_requests`): a
//!   connection that carried that many requests is closed gracefully,
//!   which also bounds what a client pipelining without reading can make
//!   the gateway send to Knoq before the send timeout stops it;
//! - send timeout: a response the client takes nothing of for
//!   `send_timeout` (an HTTP/1.1 socket that accepts no byte, an HTTP/2
//!   stream whose window stays shut) closes its connection, which drops
//!   its upstream request; checked whether or not anything polls the body;
//! - head size: hyper's read buffer is bounded at four times
//!   `max_header_bytes` (at least 64 KiB), so the JSON 431 from
//!   `inspect.rs` answers every head up to it; hyper's bare 431 is the
//!   backstop beyond;
//! - HTTP/2: at most 100 concurrent streams, 64 KiB receive window per
//!   stream and 64 KiB of response buffered per stream (Envoy's edge
//!   settings), so a client that stops reading holds little memory.
//!
//! Shutdown: stop accepting, ask every connection to finish gracefully
//! (in-flight requests complete, idle ones close), wait up to the grace
//! period, then return (remaining connections are dropped).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
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

use crate::body::BoxBody;
use crate::error::GatewayError;

/// Something that answers requests: the proxy pipeline or the admin page.
pub trait Handler: Send + Sync + 'static {
    /// Answers `req`, which arrived from `peer`.
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<BoxBody>> + Send;
}

/// Connection-level settings for one listener.
#[derive(Clone)]
pub struct ServeOptions {
    pub tls: Option<TlsAcceptor>,
    pub header_read_timeout: Duration,
    /// A connection must send its first byte within this.
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
    /// Requests one connection may carry; then it is closed gracefully.
    pub max_requests_per_connection: u64,
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
    // Connections past the cap are answered by a small task each; these
    // are bounded too, past which a connection is simply closed.
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    loop {
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "connection refused: max_connections reached");
            if let (None, Ok(slot)) = (&opts.tls, refusals.clone().try_acquire_owned()) {
                let builder = builder.clone();
                tokio::spawn(async move {
                    refuse(stream, &builder).await;
                    drop(slot);
                });
            }
            continue;
        };
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
            serve_connection(stream, peer, &builder, handler, opts, drain).await;
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

/// Refusal tasks that may run at once (connections past the cap).
const REFUSALS_AT_ONCE: usize = 64;
/// How long a refused connection gets to read its 503.
const REFUSAL_TIME: Duration = Duration::from_secs(2);

/// Answers every request of a connection past `max_connections` with 503
/// `too_many_connections` and closes it, within a short bound. Plain
/// connections only: a TLS client would need a handshake first, so it is
/// simply closed.
async fn refuse(stream: TcpStream, builder: &auto::Builder<TokioExecutor>) {
    let service = service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(GatewayError::TooManyConnections.into_response(0))
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_TIME, conn).await;
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
        .max_buf_size(parser_buffer(opts.max_header_bytes));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(
            u32::try_from(parser_buffer(opts.max_header_bytes)).unwrap_or(u32::MAX),
        )
        // Envoy's edge-proxy settings: few streams, small windows, and a
        // small send buffer per stream, so a client that stops reading
        // holds little of the gateway's memory until the send timeout.
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER)
        // A peer that stops answering pings is dead: close it.
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    builder
}

/// The largest head hyper reads before refusing it itself: four times our
/// own JSON limit, and never below 64 KiB (hyper wants at least 8 KiB).
fn parser_buffer(max_header_bytes: usize) -> usize {
    (max_header_bytes * 4).max(64 * 1024)
}

const H2_MAX_STREAMS: u32 = 100;
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
const H2_SEND_BUFFER: usize = 64 * 1024;
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    handler: Arc<H>,
    opts: ServeOptions,
    drain: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    match &opts.tls {
        None => drive(stream, peer, builder, handler, &opts, drain).await,
        Some(acceptor) => {
            match tokio::time::timeout(opts.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => drive(tls, peer, builder, handler, &opts, drain).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        }
    }
}

async fn drive<I, H>(
    io: I,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    handler: Arc<H>,
    opts: &ServeOptions,
    mut drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity::new(opts.max_requests_per_connection));
    let svc_activity = activity.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let in_flight = svc_activity.begin();
        async move {
            let rsp = handler.handle(req, peer).await;
            // The request counts as in flight until its body is sent, and
            // the body tells the watcher when it waits on the client.
            Ok::<_, Infallible>(rsp.map(|b| Watched::new(b, in_flight).boxed_unsync()))
        }
    });
    let io = FirstByte {
        inner: io,
        activity: activity.clone(),
    };
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
            () = activity.idle(opts.first_byte_timeout, opts.header_read_timeout, opts.idle_timeout, None), if !closing => {
                tracing::trace!("closing idle connection");
                (closing, closing_since) = (true, Instant::now());
                conn.as_mut().graceful_shutdown();
            }
            () = activity.limit_reached.notified(), if !closing => {
                tracing::debug!("closing a connection that carried max_requests_per_connection requests");
                (closing, closing_since) = (true, Instant::now());
                conn.as_mut().graceful_shutdown();
            }
            () = activity.stalled(opts.send_timeout) => {
                tracing::info!(
                    send_timeout = ?opts.send_timeout,
                    "closing a connection whose client took nothing of a response for the send timeout"
                );
                break;
            }
            // A graceful close waits for the peer (an HTTP/2 GOAWAY wants a
            // ping answer); a peer that never answers must not keep the
            // connection, or its slot, forever.
            () = activity.idle(opts.header_read_timeout, opts.header_read_timeout, opts.header_read_timeout, Some(closing_since)), if closing => {
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
    /// Requests begun, and how many the connection may carry: when the
    /// count reaches the limit, `limit_reached` wakes the watcher (once).
    requests: AtomicU64,
    max_requests: u64,
    limit_reached: tokio::sync::Notify,
    /// One clock per response being sent: milliseconds after `born` (plus
    /// one, so 0 means "not waiting") since the response has waited on the
    /// client to take what it was handed.
    waiting: std::sync::Mutex<Vec<Arc<AtomicU64>>>,
    /// Milliseconds after `born` when the connection last became idle.
    idle_since_ms: AtomicU64,
    served_any: AtomicBool,
    /// The client has sent at least one byte.
    got_byte: AtomicBool,
}

/// Marks one request in flight until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    /// Milliseconds since the connection was born, plus one (never 0).
    fn now_mark(&self) -> u64 {
        self.0.born.elapsed().as_millis() as u64 + 1
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms
            .store(a.born.elapsed().as_millis() as u64, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Activity {
    fn new(max_requests: u64) -> Self {
        Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            max_requests,
            limit_reached: tokio::sync::Notify::new(),
            waiting: std::sync::Mutex::new(Vec::new()),
            idle_since_ms: AtomicU64::new(0),
            served_any: AtomicBool::new(false),
            got_byte: AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.served_any.store(true, Ordering::Release);
        if self.requests.fetch_add(1, Ordering::Relaxed) + 1 == self.max_requests {
            // A permit is stored if the watcher is not waiting right now.
            self.limit_reached.notify_one();
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// A clock for one response, registered with the watcher.
    fn response_clock(&self) -> Arc<AtomicU64> {
        let clock = Arc::new(AtomicU64::new(0));
        let mut all = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        // Responses that have ended hold no other reference.
        all.retain(|c| Arc::strong_count(c) > 1);
        all.push(clock.clone());
        clock
    }

    /// Resolves once some response has waited on the client for longer
    /// than `send_timeout`. Wakes on its own timer, at the earliest moment
    /// one could be due, never woken by the requests.
    async fn stalled(&self, send_timeout: Duration) {
        loop {
            let now_ms = self.born.elapsed().as_millis() as u64 + 1;
            let limit = send_timeout.as_millis() as u64;
            let oldest = {
                let mut all = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                all.retain(|c| Arc::strong_count(c) > 1);
                all.iter()
                    .map(|c| c.load(Ordering::Acquire))
                    .filter(|since| *since != 0)
                    .min()
            };
            let next = match oldest {
                Some(since) if now_ms >= since + limit => return,
                Some(since) => Duration::from_millis(since + limit - now_ms),
                // A response handed over from now on cannot be due sooner.
                None => send_timeout,
            };
            tokio::time::sleep(next).await;
        }
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
        first_byte_timeout: Duration,
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
                } else if self.got_byte.load(Ordering::Acquire) {
                    first_request_timeout
                } else {
                    first_byte_timeout.min(first_request_timeout)
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

// === impl FirstByte ===

/// The connection's stream, noting the client's first byte for the
/// watcher (a connection that sends nothing gets `first_byte_timeout`, one
/// that has started its head `header_read_timeout`). One relaxed load per
/// read once the byte has come.
struct FirstByte<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstByte<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before && !self.activity.got_byte.load(Ordering::Relaxed) {
            self.activity.got_byte.store(true, Ordering::Release);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstByte<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === impl Watched ===

pin_project_lite::pin_project! {
    /// A response body as the connection sends it: holds the request's
    /// in-flight mark until the body ends, and keeps the response's clock
    /// for the send timeout. From the moment it hands hyper something (the
    /// head, then each frame) until hyper asks for more, the response is
    /// waiting on the client; while it is polled, it is not (a slow
    /// upstream is not the client's fault).
    struct Watched<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
        clock: Arc<AtomicU64>,
    }
}

impl<B> Watched<B> {
    fn new(inner: B, in_flight: InFlight) -> Self {
        let clock = in_flight.0.response_clock();
        clock.store(in_flight.now_mark(), Ordering::Release);
        Watched {
            inner,
            in_flight: Some(in_flight),
            clock,
        }
    }
}

impl<B: http_body::Body> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.project();
        this.clock.store(0, Ordering::Release);
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                if let Some(mark) = this.in_flight.as_ref().map(InFlight::now_mark) {
                    this.clock.store(mark, Ordering::Release);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.in_flight.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
