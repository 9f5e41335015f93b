//! What a standalone simulator logs with SCIM on: the start-up lines, never
//! the SCIM token. Its own test binary, as it installs a process-wide
//! subscriber that records every event and span at every level.

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use knoq_sim::{SimTls, Standalone};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const SCIM_TOKEN: &str = "scim-token-that-must-not-be-logged";
const DEADLINE: Duration = Duration::from_secs(5);

/// Appends every event's and span's fields, as `name=value`, to one string.
struct Capture(Arc<Mutex<String>>);

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl Capture {
    fn text(&self) -> std::sync::MutexGuard<'_, String> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        span.record(&mut Fields(&mut self.text()));
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, values: &Record<'_>) {
        values.record(&mut Fields(&mut self.text()));
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = self.text();
        text.push('\n');
        event.record(&mut Fields(&mut text));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// A plain-HTTP GET, so the SCIM code path runs with the token offered.
async fn get(addr: std::net::SocketAddr, path: &str, authorization: &str) -> StatusCode {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        let conn = tokio::spawn(conn);
        let request = Request::get(path)
            .header(HOST, addr.to_string())
            .header(CONNECTION, "close")
            .header(AUTHORIZATION, authorization)
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        response.into_body().collect().await?;
        drop(sender);
        conn.await??;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
    };
    timeout(DEADLINE, exchange)
        .await
        .expect("answered within the deadline")
        .expect("request succeeds")
}

#[tokio::test]
async fn the_scim_token_is_never_logged() {
    let captured = Arc::new(Mutex::new(String::new()));
    tracing::subscriber::set_global_default(Capture(Arc::clone(&captured)))
        .expect("the only subscriber in this binary");

    for tls in [SimTls::SelfSigned, SimTls::Plain] {
        let plain = matches!(tls, SimTls::Plain);
        let sim = Standalone {
            tls,
            scim_token: Some(SCIM_TOKEN.to_string()),
            ..Standalone::new("127.0.0.1:0".parse().expect("address"))
        }
        .start()
        .await
        .expect("start");
        if plain {
            let users = "/api/scim/v2/Users";
            let right = format!("Bearer {SCIM_TOKEN}");
            assert_eq!(get(sim.addr(), users, &right).await, StatusCode::OK);
            let wrong = format!("Bearer {SCIM_TOKEN}-wrong");
            assert_eq!(
                get(sim.addr(), users, &wrong).await,
                StatusCode::UNAUTHORIZED
            );
        }
        sim.shutdown().await;
    }

    let text = captured.lock().unwrap_or_else(PoisonError::into_inner);
    // The capture works: the start-up lines are there, SCIM said to be on.
    assert!(text.contains("simulated Knoq listening"), "{text}");
    assert!(text.contains("scim=true"), "{text}");
    assert!(text.contains("sha256="), "{text}");
    assert!(!text.contains(SCIM_TOKEN), "{text}");
}
