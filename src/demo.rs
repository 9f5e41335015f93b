//! `knoq-gateway demo`: the simulated Knoq and a gateway in one process, on
//! 127.0.0.1, with a demo user and a freshly made token, and three `curl`
//! lines that work as printed.
//!
//! Everything it writes (the demo cookie, the simulator's CA certificate)
//! goes to a private temporary directory removed on exit. The demo token is
//! printed because that is the point of a demo; a real gateway never prints
//! or logs a token.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use knoq_sim::{SimConfig, SimKnoq, DEMO_COOKIE, DEMO_USER};
use tokio::net::TcpListener;

use crate::config::Config;

/// Runs the demo until `shutdown` resolves.
pub async fn run(listen: SocketAddr, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    let sim_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind the simulated Knoq: {e}"))?;
    let sim = SimKnoq::start(SimConfig::default(), sim_listener)
        .await
        .map_err(|e| format!("cannot start the simulated Knoq: {e}"))?;

    let proxy = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("note: {listen} is not free ({e}); using a free port instead");
            TcpListener::bind((listen.ip(), 0))
                .await
                .map_err(|e| format!("cannot bind the gateway: {e}"))?
        }
    };
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot bind the admin port: {e}"))?;
    let proxy_addr = proxy.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;

    let dir = TempDir::new()?;
    write_private(&dir.0.join("demo.cookie"), DEMO_COOKIE)?;
    let ca = sim
        .ca_pem()
        .ok_or("the simulated Knoq has no self-signed certificate")?;
    std::fs::write(dir.0.join("knoq-ca.pem"), ca).map_err(|e| e.to_string())?;
    let token = crate::auth::new_token();
    let text = format!(
        r#"
        [server]
        listen = "{proxy_addr}"
        [admin]
        listen = "{admin_addr}"
        [upstream]
        url = "{upstream}"
        ca_file = "knoq-ca.pem"
        [state]
        dir = "state"
        [[users]]
        name = "{DEMO_USER}"
        cookie_file = "demo.cookie"
        [[tokens]]
        name = "demo-tool"
        user = "{DEMO_USER}"
        sha256 = "{digest}"
        "#,
        upstream = sim.base_url(),
        digest = crate::auth::digest_hex(&token),
    );
    let config = Config::from_toml_str(&text, &dir.0).map_err(|e| e.to_string())?;
    let prepared = crate::prepare(config).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(crate::run(prepared, proxy, admin, async move {
        let _ = stop_rx.await;
    }));

    let base = format!("http://{proxy_addr}");
    let session = create_session(&base, &token).await?;
    println!(
        "\nknoq-gateway demo: a simulated Knoq at {sim_url} and the gateway at {base}\n\
         (admin: http://{admin_addr}/readyz). Token for the demo tool:\n\n  TOKEN={token}\n\n\
         A session \"{session}\" is open. Try, in another shell:\n\n\
         # 1. create a session\n\
         curl -s -X POST {base}/api/managed-agents/session -H \"Authorization: Bearer {token}\" -H 'Content-Type: application/json' -d '{{\"text\":\"Summarise last week in three bullets\"}}'\n\n\
         # 2. send a message to the open session\n\
         curl -s -X POST {base}/api/managed-agents/message -H \"Authorization: Bearer {token}\" -H 'Content-Type: application/json' -d '{{\"sessionId\":\"{session}\",\"text\":\"And the week before?\"}}'\n\n\
         # 3. read its transcript (the simulated agent answers within a second)\n\
         curl -s '{base}/api/managed-agents/transcript?sessionId={session}' -H \"Authorization: Bearer {token}\"\n\n\
         Ctrl-C stops the demo.",
        sim_url = sim.base_url(),
    );

    shutdown.await;
    let _ = stop_tx.send(());
    let _ = gateway.await;
    sim.shutdown().await;
    Ok(())
}

/// Opens the session the printed `curl` lines use, through the gateway.
async fn create_session(base: &str, token: &str) -> Result<String, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("{base}/api/managed-agents/session"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::from(r#"{"text":"Demo session: what can you do?"}"#))
        .map_err(|e| e.to_string())?;
    let rsp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = rsp.status();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!(
            "creating the demo session through the gateway failed with {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    json["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "the session answer has no id".to_string())
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

/// A private directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, String> {
        let mut suffix = [0u8; 8];
        getrandom::getrandom(&mut suffix).map_err(|e| e.to_string())?;
        let name: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("knoq-gateway-demo-{name}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
