//! `Standalone`, the simulator as `knoq-gateway mock-knoq` runs it, over real
//! sockets: the stable certificate directory, the `ca_out` file, SCIM with a
//! token, and the checks made before binding.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use knoq_sim::{run_standalone, SimHandle, SimTls, Standalone, DEMO_COOKIE};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Upper bound for anything a test waits for; far above what it should take.
const DEADLINE: Duration = Duration::from_secs(5);

const SCIM_TOKEN: &str = "scim-standalone-token";

/// A fresh directory under the system's temporary one, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).expect("randomness");
        let dir = std::env::temp_dir().join(format!(
            "knoq-sim-{tag}-{}-{:016x}",
            std::process::id(),
            u64::from_be_bytes(random)
        ));
        fs::create_dir(&dir).expect("temporary directory");
        TempDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

fn options(tls: SimTls) -> Standalone {
    Standalone {
        tls,
        ..Standalone::new(loopback())
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// What came back from one request.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    json: Value,
}

/// One HTTP/1.1 request over TLS to `sim`, trusting only `ca_pem`; the
/// connection is closed before this returns, so shutdown has none to drain.
async fn request(
    sim: &SimHandle,
    ca_pem: &str,
    method: Method,
    path: &str,
    headers: &[(http::HeaderName, &str)],
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let tcp = TcpStream::connect(sim.addr()).await?;
        let tls = connector
            .connect(ServerName::IpAddress(sim.addr().ip().into()), tcp)
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let conn = tokio::spawn(conn);
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, sim.addr().to_string())
            .header(CONNECTION, "close");
        for (name, value) in headers {
            builder = builder.header(name, *value);
        }
        let response = sender
            .send_request(builder.body(Full::new(Bytes::new()))?)
            .await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        drop(sender);
        conn.await??;
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body)?
        };
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Answer { status, json })
    };
    timeout(DEADLINE, exchange).await?
}

/// `GET /_sim/ca`'s PEM, fetched trusting `trusted`.
async fn served_ca(sim: &SimHandle, trusted: &str) -> String {
    let answer = request(sim, trusted, Method::GET, "/_sim/ca", &[])
        .await
        .expect("GET /_sim/ca");
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    answer.json["caPem"]
        .as_str()
        .expect("caPem is a string")
        .to_string()
}

fn parses_as_one_certificate(pem: &str) {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("PEM parses");
    assert_eq!(certs.len(), 1, "{pem}");
}

#[tokio::test]
async fn stable_dir_gives_the_same_certificate_across_starts() {
    let tmp = TempDir::new("stable");
    let dir = tmp.join("certs"); // missing: the first start creates it
    let first = options(SimTls::SelfSignedIn(dir.clone()))
        .start()
        .await
        .expect("first start");
    let first_pem = first.ca_pem().expect("self-signed");
    assert_eq!(
        fs::read_to_string(dir.join("cert.pem")).expect("cert.pem"),
        first_pem
    );
    assert!(
        fs::read_to_string(dir.join("key.pem"))
            .expect("key.pem")
            .contains("PRIVATE KEY"),
        "key.pem holds a key"
    );
    assert_eq!(served_ca(&first, &first_pem).await, first_pem);
    first.shutdown().await;

    let key_before = fs::read(dir.join("key.pem")).expect("key.pem");
    let second = options(SimTls::SelfSignedIn(dir.clone()))
        .start()
        .await
        .expect("second start");
    assert_eq!(second.ca_pem().as_deref(), Some(first_pem.as_str()));
    // A client that trusted the first run's certificate still gets in.
    assert_eq!(served_ca(&second, &first_pem).await, first_pem);
    assert_eq!(fs::read(dir.join("key.pem")).expect("key.pem"), key_before);
    second.shutdown().await;

    // Without the directory, every start makes a different certificate.
    let fresh = options(SimTls::SelfSigned).start().await.expect("start");
    assert_ne!(fresh.ca_pem().as_deref(), Some(first_pem.as_str()));
    fresh.shutdown().await;
}

#[cfg(unix)]
#[tokio::test]
async fn stable_key_is_0600_cert_0644_and_dir_0700() {
    let tmp = TempDir::new("modes");
    let dir = tmp.join("certs");
    let sim = options(SimTls::SelfSignedIn(dir.clone()))
        .start()
        .await
        .expect("start");
    assert_eq!(mode(&dir.join("key.pem")), 0o600);
    assert_eq!(mode(&dir.join("cert.pem")), 0o644);
    assert_eq!(mode(&dir), 0o700);
    let names: Vec<String> = fs::read_dir(&dir)
        .expect("read dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn ca_out_holds_what_sim_ca_serves() {
    let tmp = TempDir::new("ca-out");
    let ca_out = tmp.join("ca.pem");
    let sim = Standalone {
        ca_out: Some(ca_out.clone()),
        ..options(SimTls::SelfSigned)
    }
    .start()
    .await
    .expect("start");
    let written = fs::read_to_string(&ca_out).expect("ca_out written by start");
    parses_as_one_certificate(&written);
    // Trusting only the file's certificate, a client gets in, and is served it.
    assert_eq!(served_ca(&sim, &written).await, written);
    #[cfg(unix)]
    assert_eq!(mode(&ca_out), 0o644);
    sim.shutdown().await;
}

#[tokio::test]
async fn ca_out_with_a_stable_dir_is_its_cert_and_is_replaced() {
    let tmp = TempDir::new("ca-out-stable");
    let dir = tmp.join("certs");
    let ca_out = tmp.join("ca.pem");
    fs::write(&ca_out, "stale").expect("stale file");
    let sim = Standalone {
        ca_out: Some(ca_out.clone()),
        ..options(SimTls::SelfSignedIn(dir.clone()))
    }
    .start()
    .await
    .expect("start");
    let written = fs::read_to_string(&ca_out).expect("ca_out");
    assert_eq!(
        written,
        fs::read_to_string(dir.join("cert.pem")).expect("cert.pem")
    );
    parses_as_one_certificate(&written);
    assert_eq!(served_ca(&sim, &written).await, written);
    sim.shutdown().await;
}

#[tokio::test]
async fn ca_out_without_a_self_signed_certificate_is_refused() {
    let tmp = TempDir::new("ca-out-refused");
    let ca_out = tmp.join("ca.pem");
    let files = SimTls::Files {
        cert: tmp.join("given-cert.pem"),
        key: tmp.join("given-key.pem"),
    };
    for tls in [files, SimTls::Plain] {
        let error = Standalone {
            ca_out: Some(ca_out.clone()),
            ..options(tls.clone())
        }
        .start()
        .await
        .expect_err("ca_out needs a self-signed certificate");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{tls:?}");
        assert!(error.to_string().contains("self-signed"), "{error}");
        assert!(!ca_out.exists(), "nothing written");
    }
}

#[tokio::test]
async fn a_damaged_pair_is_an_error_naming_the_file_and_is_kept() {
    let tmp = TempDir::new("damaged");
    let dir = tmp.join("certs");
    let stable = || options(SimTls::SelfSignedIn(dir.clone()));
    stable()
        .start()
        .await
        .expect("first start")
        .shutdown()
        .await;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let cert = fs::read_to_string(&cert_path).expect("cert.pem");
    let key = fs::read_to_string(&key_path).expect("key.pem");

    // A truncated certificate.
    let truncated = &cert[..cert.len() / 2];
    fs::write(&cert_path, truncated).expect("truncate");
    let error = stable().start().await.expect_err("truncated cert.pem");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(
        error.to_string().contains(&cert_path.display().to_string()),
        "{error}"
    );
    assert_eq!(fs::read_to_string(&cert_path).expect("kept"), truncated);
    fs::write(&cert_path, &cert).expect("restore");

    // A missing key.
    fs::remove_file(&key_path).expect("remove key.pem");
    let error = stable().start().await.expect_err("missing key.pem");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(
        error.to_string().contains(&key_path.display().to_string()),
        "{error}"
    );
    assert!(!key_path.exists(), "no key made up");
    assert_eq!(fs::read_to_string(&cert_path).expect("kept"), cert);

    // A key that is not this certificate's.
    let other = TempDir::new("damaged-other");
    let other_dir = other.join("certs");
    options(SimTls::SelfSignedIn(other_dir.clone()))
        .start()
        .await
        .expect("other pair")
        .shutdown()
        .await;
    fs::copy(other_dir.join("key.pem"), &key_path).expect("foreign key");
    let error = stable().start().await.expect_err("foreign key.pem");
    assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    assert!(
        error.to_string().contains(&dir.display().to_string()),
        "{error}"
    );

    // Put back, it works again, with the same certificate.
    fs::write(&key_path, &key).expect("restore key");
    let sim = stable().start().await.expect("restored pair");
    assert_eq!(sim.ca_pem().as_deref(), Some(cert.as_str()));
    sim.shutdown().await;
}

#[tokio::test]
async fn scim_token_enables_scim() {
    let sim = Standalone {
        scim_token: Some(SCIM_TOKEN.to_string()),
        ..options(SimTls::SelfSigned)
    }
    .start()
    .await
    .expect("start");
    let ca = sim.ca_pem().expect("self-signed");
    let bearer = format!("Bearer {SCIM_TOKEN}");
    let users = "/api/scim/v2/Users";

    let with = request(&sim, &ca, Method::GET, users, &[(AUTHORIZATION, &bearer)])
        .await
        .expect("with the token");
    assert_eq!(with.status, StatusCode::OK, "{with:?}");
    assert_eq!(with.json["totalResults"], 0, "{with:?}");

    let without = request(&sim, &ca, Method::GET, users, &[])
        .await
        .expect("without a token");
    assert_eq!(without.status, StatusCode::UNAUTHORIZED, "{without:?}");

    let wrong = request(
        &sim,
        &ca,
        Method::GET,
        users,
        &[(AUTHORIZATION, "Bearer not-the-token")],
    )
    .await
    .expect("with a wrong token");
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{wrong:?}");

    // The cookie opens the managed-agents API, not SCIM.
    let cookie = request(
        &sim,
        &ca,
        Method::GET,
        users,
        &[(http::header::COOKIE, DEMO_COOKIE)],
    )
    .await
    .expect("with the demo cookie");
    assert_eq!(cookie.status, StatusCode::UNAUTHORIZED, "{cookie:?}");
    sim.shutdown().await;

    // Without a token SCIM is off: 403 even with the bearer.
    let off = options(SimTls::SelfSigned).start().await.expect("start");
    let ca = off.ca_pem().expect("self-signed");
    let answer = request(&off, &ca, Method::GET, users, &[(AUTHORIZATION, &bearer)])
        .await
        .expect("SCIM off");
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{answer:?}");
    off.shutdown().await;
}

#[tokio::test]
async fn unusable_scim_tokens_are_refused_before_binding() {
    for token in ["", "token\n", "two words"] {
        let error = Standalone {
            scim_token: Some(token.to_string()),
            ..options(SimTls::SelfSigned)
        }
        .start()
        .await
        .expect_err("unusable token");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{token:?}");
        if !token.is_empty() {
            assert!(!error.to_string().contains(token), "{error}");
        }
    }
}

#[test]
fn debug_hides_the_scim_token() {
    let options = Standalone {
        scim_token: Some("secret-token".into()),
        ..Standalone::new(loopback())
    };
    let text = format!("{options:?}");
    assert!(!text.contains("secret"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
}

#[tokio::test]
async fn run_standalone_writes_ca_out_then_stops_on_shutdown() {
    let tmp = TempDir::new("run");
    let ca_out = tmp.join("ca.pem");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(run_standalone(
        Standalone {
            ca_out: Some(ca_out.clone()),
            ..options(SimTls::SelfSignedIn(tmp.join("certs")))
        },
        async {
            let _ = stopped.await;
        },
    ));
    // As a script would: wait for the file.
    let deadline = Instant::now() + DEADLINE;
    while !ca_out.exists() {
        assert!(Instant::now() < deadline, "ca_out never appeared");
        assert!(!run.is_finished(), "run_standalone ended early");
        tokio::task::yield_now().await;
    }
    let written = fs::read_to_string(&ca_out).expect("ca_out");
    parses_as_one_certificate(&written);
    assert_eq!(
        written,
        fs::read_to_string(tmp.join("certs").join("cert.pem")).expect("cert.pem")
    );
    stop.send(()).expect("still running");
    timeout(DEADLINE, run)
        .await
        .expect("stops within the deadline")
        .expect("no panic")
        .expect("ran without error");
}
