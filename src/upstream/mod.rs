//! The upstream call: one exchange with Knoq over pooled HTTPS connections.
//!
//! A hyper-util legacy `Client` with a rustls connector: HTTP/2 or HTTP/1.1
//! chosen by ALPN, keep-alive pooling (no TLS handshake per request),
//! redirects never followed (the client never follows them; a 3xx goes back
//! to the caller as is). The caller says how a response is bounded
//! ([`ResponseBound`]): an ordinary exchange has one deadline for all of it
//! (connect, TLS, request, response head, and the body as it streams); a
//! long-lived response bounds its head by the same timeout and then only
//! the gap between two body chunks, and ends when the gateway drains.
//!
//! Contract: `send` takes a request whose headers are already rewritten and
//! returns Knoq's response untouched, or an [`UpstreamError`] that says what
//! failed. It knows nothing of users, routes or HTTP status mapping.

pub mod retry;

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::body::{Bounded, BoxBody, BoxError, DrainSignal};

/// What went wrong talking to Knoq, without an HTTP answer to show for it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("could not connect to Knoq")]
    Connect(#[source] BoxError),
    #[error("the TLS handshake with Knoq failed")]
    Tls(#[source] BoxError),
    #[error("Knoq did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection to Knoq was closed before a complete answer")]
    Reset(#[source] BoxError),
    #[error("Knoq's answer was not valid HTTP")]
    Protocol(#[source] BoxError),
}

impl UpstreamError {
    /// The `kind` label of `knoq_gateway_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Tls(_) => "tls",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Reset(_) => "reset",
            UpstreamError::Protocol(_) => "protocol",
        }
    }
}

/// `[upstream]`: where Knoq is and how to talk to it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Scheme and authority only, e.g. `https://knoq.one`.
    pub url: Uri,
    /// The `Origin` sent with every request (Knoq's CSRF guard checks it).
    pub origin: HeaderValue,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Bound on the whole exchange: connect, send, response head and body.
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// Offer HTTP/2 by ALPN (else HTTP/1.1 only, with a connection pool).
    pub http2: bool,
    /// Requests sent at once on one HTTP/2 connection to Knoq (RFC 9113
    /// asks servers to allow at least 100)...
    pub max_streams: usize,
    /// ...and connections opened for more, one after the other as each
    /// fills. Beyond `max_streams` × `max_connections` requests wait in the
    /// gateway, not in the HTTP client, where the wait would count against
    /// `timeout` and against Knoq.
    pub max_connections: usize,
    /// How long a request may wait for one of those places; past it, 503
    /// `gateway_overloaded`, and nothing was sent.
    pub queue_timeout: Duration,
}

/// How long a response may take.
pub enum ResponseBound {
    /// One deadline, `upstream.timeout`, for the whole exchange.
    Exchange,
    /// The head within `upstream.timeout`; then the body may go on as long
    /// as no gap between two chunks exceeds `gap`, and it ends cleanly
    /// when `drain` resolves.
    #[expect(
        dead_code,
        reason = "the first long-lived route (transcript streams, issue 15) will declare it"
    )]
    IdleGap { gap: Duration, drain: DrainSignal },
}

/// The client towards Knoq. Cheap to share: clone the `Arc` around it.
pub struct Upstream {
    /// The HTTP/2 connections every account shares (answers cannot cross
    /// streams there): each client holds one multiplexed connection, opened
    /// on first use. A request goes to the first one with fewer than
    /// `max_streams` in flight, so another connection opens only when the
    /// ones before it are full, up to `max_connections` (Envoy opens more
    /// upstream connections the same way instead of queueing).
    shared: Vec<Shard>,
    max_streams: usize,
    /// Over HTTP/1.1 an answer is matched to a request only by its order on
    /// the connection, so a confused Knoq (an extra, unsolicited answer)
    /// could hand one account another's: then each account gets its own
    /// pool, and a connection is only ever reused by the account it was
    /// opened for.
    per_account: DashMap<Box<str>, HttpClient>,
    /// Set once HTTP/1.1 is in use: from the start when HTTP/2 cannot be
    /// negotiated (`http2 = false`, or plain `http://`), else at the first
    /// HTTP/1.1 answer.
    partitioned: AtomicBool,
    /// Makes a client with the shared settings, for a new account's pool.
    connector: HttpsConnector<HttpConnector>,
    pool_idle_timeout: Duration,
    pool_max_idle: usize,
    scheme: Scheme,
    authority: Authority,
    timeout: Duration,
}

// === impl Upstream ===

impl Upstream {
    pub fn new(config: &UpstreamConfig, tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1();
        let https = if config.http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.wrap_connector(http)
        };
        let shard = || Shard {
            client: http_client(
                https.clone(),
                config.pool_idle_timeout,
                config.pool_max_idle,
            ),
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        let plain = config.url.scheme() == Some(&Scheme::HTTP);
        Upstream {
            shared: (0..config.max_connections).map(|_| shard()).collect(),
            max_streams: config.max_streams,
            per_account: DashMap::new(),
            partitioned: AtomicBool::new(!config.http2 || plain),
            connector: https,
            pool_idle_timeout: config.pool_idle_timeout,
            pool_max_idle: config.pool_max_idle,
            scheme: config
                .url
                .scheme()
                .cloned()
                .expect("config validation guarantees a scheme"),
            authority: config
                .url
                .authority()
                .cloned()
                .expect("config validation guarantees a host"),
            timeout: config.timeout,
        }
    }

    /// The upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
    }

    /// The first shared connection with room for one more stream (the last
    /// one if all are full: the caller's place was granted by the
    /// gateway-wide count, `max_streams` × `max_connections`), and the
    /// stream it takes until the answer's head arrives.
    fn shard(&self) -> (&Shard, StreamTaken) {
        let shard = self
            .shared
            .iter()
            .find(|s| s.in_flight.load(Ordering::Acquire) < self.max_streams)
            .unwrap_or_else(|| self.shared.last().expect("at least one connection"));
        shard.in_flight.fetch_add(1, Ordering::AcqRel);
        (shard, StreamTaken(shard.in_flight.clone()))
    }

    /// The pool of `account` once connections are partitioned (see
    /// `per_account`); `None` while every account shares `client`.
    fn own_pool(&self, account: Option<&str>) -> Option<HttpClient> {
        let user = account.filter(|_| self.partitioned.load(Ordering::Acquire))?;
        if let Some(c) = self.per_account.get(user) {
            return Some(c.clone());
        }
        let pool = self.per_account.entry(user.into()).or_insert_with(|| {
            http_client(
                self.connector.clone(),
                self.pool_idle_timeout,
                self.pool_max_idle,
            )
        });
        Some(pool.clone())
    }

    /// Sends one request as `account` (`None`: no account, e.g. SCIM) and
    /// returns Knoq's response, its body bounded as `bound` says.
    pub async fn send(
        &self,
        mut req: Request<BoxBody>,
        account: Option<&str>,
        bound: ResponseBound,
    ) -> Result<Response<BoxBody>, UpstreamError> {
        // The connector picks HTTP/2 or HTTP/1.1 by ALPN; the request must
        // not insist on the version the client happened to speak to us.
        *req.version_mut() = Version::HTTP_11;
        let deadline = Instant::now() + self.timeout;
        // The shared clients are used by reference: no clone on the hot path.
        let own = self.own_pool(account);
        let (client, _stream) = match &own {
            Some(own) => (own, None),
            None => {
                let (shard, stream) = self.shard();
                (&shard.client, Some(stream))
            }
        };
        let response = tokio::time::timeout_at(deadline, client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
            .map_err(classify)?;
        if response.version() < Version::HTTP_2 && !self.partitioned.load(Ordering::Relaxed) {
            tracing::info!(
                "Knoq answers over HTTP/1.1: each account gets its own connections from now on"
            );
            self.partitioned.store(true, Ordering::Release);
        }
        check_framing(&response)?;
        Ok(match bound {
            ResponseBound::Exchange => {
                response.map(|body| Bounded::deadline(body, deadline).boxed_unsync())
            }
            ResponseBound::IdleGap { gap, drain } => {
                response.map(|body| Bounded::idle_gap(body, gap, drain).boxed_unsync())
            }
        })
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, BoxBody>;

/// One shared upstream connection (a client with its own pool) and the
/// streams in flight on it.
struct Shard {
    client: HttpClient,
    in_flight: Arc<AtomicUsize>,
}

/// A stream taken on a shard, given back when dropped.
struct StreamTaken(Arc<AtomicUsize>);

impl Drop for StreamTaken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn http_client(
    connector: HttpsConnector<HttpConnector>,
    idle: Duration,
    max_idle: usize,
) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// An answer whose framing a client could read differently from us.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadFraming(&'static str);

/// Refuses answers that must not be passed on: a body framed by both a
/// length and a transfer coding (hyper has decoded the chunks, so the
/// length would be stale and a client would read a truncated or torn
/// body), lengths that disagree, and a `101 Switching Protocols` nobody
/// asked for (HTTP/2 cannot even carry it). Envoy and nginx answer 502.
fn check_framing<B>(rsp: &Response<B>) -> Result<(), UpstreamError> {
    use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
    let bad = |why| Err(UpstreamError::Protocol(Box::new(BadFraming(why))));
    if rsp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        return bad("Knoq switched protocols unasked");
    }
    let mut lengths = rsp.headers().get_all(CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if rsp.headers().contains_key(TRANSFER_ENCODING) {
            return bad("Knoq's answer has both Content-Length and Transfer-Encoding");
        }
        if lengths.any(|other| other != first) {
            return bad("Knoq's answer has Content-Length values that disagree");
        }
    }
    Ok(())
}

/// Sorts a client error into what an operator can act on.
fn classify(err: hyper_util::client::legacy::Error) -> UpstreamError {
    let causes = || chain(&err);
    if causes().any(is_tls) {
        return UpstreamError::Tls(err.into());
    }
    if err.is_connect() {
        return UpstreamError::Connect(err.into());
    }
    let hyper_err = causes().find_map(|e| e.downcast_ref::<hyper::Error>());
    if let Some(h) = hyper_err {
        if h.is_parse() || h.is_parse_status() {
            return UpstreamError::Protocol(err.into());
        }
    }
    let reset = causes().any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled() || h.is_closed())
            || e.downcast_ref::<io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionAborted
                )
            })
            || e.downcast_ref::<h2::Error>()
                .is_some_and(|h| h.is_io() || h.is_reset() || h.is_go_away())
    });
    if reset {
        return UpstreamError::Reset(err.into());
    }
    UpstreamError::Protocol(err.into())
}

/// Is this a rustls error, possibly wrapped in (nested) `io::Error`s? The
/// TLS stack reports handshake failures that way, and `io::Error::source`
/// skips the wrapped error, so the plain cause chain does not reach it.
fn is_tls(mut e: &(dyn StdError + 'static)) -> bool {
    loop {
        if e.is::<rustls::Error>() {
            return true;
        }
        match e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => e = inner,
            None => return false,
        }
    }
}

/// The error and every cause below it.
fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |e| (*e).source())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsp(status: u16, headers: &[(&str, &str)]) -> Response<()> {
        let mut b = Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn answers_with_ambiguous_framing_are_refused() {
        assert!(check_framing(&rsp(200, &[("content-length", "5")])).is_ok());
        assert!(check_framing(&rsp(200, &[("transfer-encoding", "chunked")])).is_ok());
        assert!(check_framing(&rsp(
            200,
            &[("content-length", "5"), ("content-length", "5")]
        ))
        .is_ok());
        for bad in [
            rsp(
                200,
                &[("content-length", "5"), ("transfer-encoding", "chunked")],
            ),
            rsp(200, &[("content-length", "5"), ("content-length", "6")]),
            rsp(101, &[("upgrade", "websocket")]),
        ] {
            let err = check_framing(&bad).unwrap_err();
            assert_eq!(err.kind(), "protocol", "{err}");
        }
    }
}
