//! The floor of the gateway's stack, for `scripts/bench` only: the same
//! crates and settings as the gateway (tokio multi-thread runtime, hyper's
//! HTTP/1.1 server, hyper-util's pooled client over rustls with HTTP/2 by
//! ALPN) doing the least a proxy can: compare the bearer token, swap
//! `Authorization` for `Cookie` and `Origin`, forward, stream the answer
//! back. No quotas, journal, retries, metrics, request id or log line.
//!
//! What this costs per request is what any gateway built on these crates
//! costs before it does its own work; the benchmark reports it beside the
//! gateway and nginx so the gap between them can be split into "the stack"
//! and "the gateway's own work".
//!
//! Usage: floor_proxy LISTEN UPSTREAM_URL CA_FILE TOKEN COOKIE ORIGIN

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

struct Floor {
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    upstream: Uri,
    bearer: HeaderValue,
    cookie: HeaderValue,
    origin: HeaderValue,
}

impl Floor {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        if req.headers().get(AUTHORIZATION) != Some(&self.bearer) {
            return status(StatusCode::UNAUTHORIZED);
        }
        let (mut parts, body) = req.into_parts();
        parts.headers.remove(AUTHORIZATION);
        parts.headers.remove(HOST);
        parts.headers.insert(COOKIE, self.cookie.clone());
        parts.headers.insert(ORIGIN, self.origin.clone());
        let mut uri = http::uri::Parts::from(self.upstream.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri).expect("valid upstream URI");
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(rsp) => rsp.map(|b| b.boxed_unsync()),
            Err(_) => status(StatusCode::BAD_GATEWAY),
        }
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut rsp = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *rsp.status_mut() = code;
    rsp
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream, ca_file, token, cookie, origin] = &args[..] else {
        eprintln!("usage: floor_proxy LISTEN UPSTREAM_URL CA_FILE TOKEN COOKIE ORIGIN");
        std::process::exit(2);
    };
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_file).expect("CA file readable");
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).expect("CA certificate valid");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let floor = Arc::new(Floor {
        client: Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https),
        upstream: upstream.parse().expect("valid upstream URL"),
        bearer: HeaderValue::try_from(format!("Bearer {token}")).expect("valid token"),
        cookie: HeaderValue::try_from(cookie.as_str()).expect("valid cookie"),
        origin: HeaderValue::try_from(origin.as_str()).expect("valid origin"),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen.as_str())
            .await
            .expect("listen address free");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let floor = floor.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let floor = floor.clone();
                    async move { Ok::<_, Infallible>(floor.handle(req).await) }
                });
                let _ = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

/// The certificates in a PEM file (the gateway's own loader is not public).
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .expect("CA file is PEM")
}
