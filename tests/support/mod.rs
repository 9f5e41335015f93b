//! Test bed: a simulated Knoq over real HTTPS and a gateway in front of it,
//! both on 127.0.0.1 ephemeral ports, plus small HTTP helpers.
#![allow(dead_code)] // each test file uses a different part of this module

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use knoq_gateway::config::Config;
use knoq_sim::{SimConfig, SimControl, SimHandle, SimKnoq, SimUser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The key beds on a shared store seal cookies with (64 hex digits).
pub const STORE_KEY: &str = "4b6e6f712d676174657761792d746573742d6b65792d6f6e6c792d3332627973";

/// `[store]` on `redis` for a bed (its key file is `store.key`), open to
/// more keys after it.
pub fn redis_store_toml(redis: &RedisServer) -> String {
    format!(
        "[store]\nkind = \"redis\"\nurl = \"{}\"\nsecret_key_file = \"store.key\"\n",
        redis.url()
    )
}

pub const ALICE_COOKIE: &str = "knoq_session=alice-cookie-0001; theme=dark";
pub const BOB_COOKIE: &str = "knoq_session=bob-cookie-0001";
pub const SCIM_TOKEN: &str = "scim-token-0123456789abcdef";

/// Knoq's managed-agents routes the tests call most.
pub const SESSIONS: &str = "/api/managed-agents/sessions";
pub const SESSION: &str = "/api/managed-agents/session";
pub const MESSAGE: &str = "/api/managed-agents/message";

/// Tokens the default bed creates: name -> (user, scim).
pub const TOKENS: [(&str, &str, bool); 4] = [
    ("alice-svc", "alice", false),
    ("alice-batch", "alice", false),
    ("bob-svc", "bob", false),
    ("idp-sync", "alice", true),
];

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let mut r = [0u8; 6];
        getrandom::getrandom(&mut r).unwrap();
        let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("kgw-{tag}-{name}"));
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir(path)
    }

    pub fn write_secret(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct BedBuilder {
    pub sim: SimConfig,
    /// Extra TOML appended to `[server]`.
    pub server_toml: String,
    /// Extra TOML appended to `[upstream]`.
    pub upstream_toml: String,
    /// Replace the upstream URL (e.g. a closed port).
    pub upstream_url: Option<String>,
    /// Leave `ca_file` out (to see an untrusted upstream fail).
    pub trust_sim: bool,
    /// TOML appended at the end (e.g. a `[quotas]` table).
    pub tail_toml: String,
    /// Extra tokens: (name, user, TOML lines for the entry).
    pub extra_tokens: Vec<(&'static str, &'static str, String)>,
}

pub struct TestBed {
    pub sim: Option<SimHandle>,
    pub control: SimControl,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub tokens: HashMap<&'static str, String>,
    pub dir: TempDir,
    pub config_text: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// The bed tests/metrics.rs and tests/prometheus.rs drive: one session an
/// hour (so a second one is refused) and fast retries.
pub async fn metrics_bed() -> TestBed {
    BedBuilder {
        tail_toml: "[quotas]\nsession = [\"1/hour\"]\n[retry]\nbase_delay = \"5ms\"\nmax_delay = \"10ms\"\n".into(),
        ..TestBed::builder()
    }
    .start()
    .await
}

pub fn sim_config() -> SimConfig {
    SimConfig {
        users: vec![
            SimUser::new("alice", ALICE_COOKIE),
            SimUser::new("bob", BOB_COOKIE),
        ],
        scim_token: Some(SCIM_TOKEN.to_string()),
        agent_delay: Duration::from_millis(20),
        ..SimConfig::default()
    }
}

impl TestBed {
    pub fn builder() -> BedBuilder {
        BedBuilder {
            sim: sim_config(),
            server_toml: String::new(),
            upstream_toml: String::new(),
            upstream_url: None,
            trust_sim: true,
            tail_toml: String::new(),
            extra_tokens: Vec::new(),
        }
    }

    pub async fn start() -> TestBed {
        Self::builder().start().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(&self, name: &str) -> &str {
        &self.tokens[name]
    }

    /// Fires the shutdown future and waits for the gateway to drain.
    pub async fn stop_gateway(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the gateway task panicked");
        }
    }

    pub fn begin_stop(&mut self) -> JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("gateway running")
    }

    pub async fn shutdown(mut self) {
        self.stop_gateway().await;
        if let Some(sim) = self.sim.take() {
            sim.shutdown().await;
        }
    }
}

impl BedBuilder {
    pub async fn start(self) -> TestBed {
        let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = SimKnoq::start(self.sim, sim_listener).await.unwrap();
        let dir = TempDir::new("bed");
        dir.write_secret("alice.cookie", ALICE_COOKIE);
        dir.write_secret("bob.cookie", &format!("{BOB_COOKIE}\n"));
        dir.write_secret("scim.token", SCIM_TOKEN);
        // For beds on a shared store (`redis_store_toml`).
        dir.write_secret("store.key", STORE_KEY);
        if let Some(pem) = sim.ca_pem() {
            std::fs::write(dir.0.join("knoq-ca.pem"), pem).unwrap();
        }
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let mut tokens = HashMap::new();
        let mut token_toml = String::new();
        let all = TOKENS
            .iter()
            .map(|(n, u, scim)| (*n, *u, format!("scim = {scim}\n")))
            .chain(self.extra_tokens.iter().cloned());
        for (name, user, extra) in all {
            let token = knoq_gateway::auth::new_token();
            token_toml.push_str(&format!(
                "[[tokens]]\nname = \"{name}\"\nuser = \"{user}\"\nsha256 = \"{}\"\n{extra}",
                knoq_gateway::auth::digest_hex(&token)
            ));
            tokens.insert(name, token);
        }
        let ca = if self.trust_sim {
            "ca_file = \"knoq-ca.pem\"\n"
        } else {
            ""
        };
        let config_text = format!(
            "[server]\nlisten = \"{addr}\"\n{server}\n[admin]\nlisten = \"{admin_addr}\"\n\
             [upstream]\nurl = \"{url}\"\n{ca}{upstream}\n[state]\ndir = \"state\"\n\
             [scim]\ntoken_file = \"scim.token\"\n\
             [[users]]\nname = \"alice\"\ncookie_file = \"alice.cookie\"\n\
             [[users]]\nname = \"bob\"\ncookie_file = \"bob.cookie\"\n{token_toml}{tail}",
            tail = self.tail_toml,
            server = self.server_toml,
            upstream = self.upstream_toml,
            url = self.upstream_url.unwrap_or_else(|| sim.base_url()),
        );
        std::fs::write(dir.0.join("gateway.toml"), &config_text).unwrap();
        let (stop_tx, task) = launch(&config_text, &dir.0.join("gateway.toml"), proxy, admin);
        TestBed {
            control: sim.control(),
            sim: Some(sim),
            addr,
            admin: admin_addr,
            tokens,
            dir,
            config_text,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// Builds and starts a gateway from config text on the given listeners.
fn launch(
    config_text: &str,
    file: &Path,
    proxy: TcpListener,
    admin: TcpListener,
) -> (oneshot::Sender<()>, JoinHandle<()>) {
    let mut config = Config::from_toml_str(config_text, file.parent().unwrap()).unwrap();
    // Reloads watch the file the bed wrote.
    config.source = Some(file.to_path_buf());
    let prepared = knoq_gateway::prepare(config).unwrap_or_else(|e| panic!("{e}"));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(knoq_gateway::run(prepared, proxy, admin, async move {
        let _ = stop_rx.await;
    }));
    (stop_tx, task)
}

impl TestBed {
    /// Stops the gateway and starts a new one on the same config and state
    /// directory (new ports), as a process restart would.
    pub async fn restart_gateway(&mut self) {
        self.stop_gateway().await;
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = proxy.local_addr().unwrap();
        self.admin = admin.local_addr().unwrap();
        let (stop, task) = launch(
            &self.config_text,
            &self.dir.0.join("gateway.toml"),
            proxy,
            admin,
        );
        self.stop = Some(stop);
        self.task = Some(task);
    }

    /// Another gateway in this process on the bed's config (the same sim,
    /// tokens, cookie files and store), with its own ports, config file
    /// `gateway-<name>.toml` and state directory `state-<name>`: a replica.
    pub async fn replica(&self, name: &str) -> Replica {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        let text = self
            .config_text
            .replace(
                &format!("listen = \"{}\"", self.addr),
                &format!("listen = \"{addr}\""),
            )
            .replace(
                &format!("listen = \"{}\"", self.admin),
                &format!("listen = \"{admin_addr}\""),
            )
            .replace("dir = \"state\"", &format!("dir = \"state-{name}\""));
        let file = self.dir.0.join(format!("gateway-{name}.toml"));
        std::fs::write(&file, &text).unwrap();
        let (stop, task) = launch(&text, &file, proxy, admin);
        Replica {
            addr,
            admin: admin_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

/// A second gateway on a bed's config ([`TestBed::replica`]).
pub struct Replica {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Replica {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the replica's task panicked");
        }
    }
}

// === HTTP helpers ===

impl TestBed {
    /// `GET path` through the gateway with the named token.
    pub async fn get(&self, path: &str, token: &str) -> Reply {
        send(
            &client(),
            req("GET", &self.url(path), Some(self.token(token)), None),
        )
        .await
    }

    /// `POST path` through the gateway with the named token and a JSON body.
    pub async fn post(&self, path: &str, token: &str, json: &str) -> Reply {
        send(
            &client(),
            req("POST", &self.url(path), Some(self.token(token)), Some(json)),
        )
        .await
    }

    /// Opens a session with `text` for the named token's user; its id.
    pub async fn open_session(&self, token: &str, text: &str) -> String {
        let body = serde_json::json!({ "text": text }).to_string();
        let r = self.post(SESSION, token, &body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// `GET /metrics` on the admin port, as Prometheus scrapes it.
    pub async fn scrape(&self) -> Reply {
        send(
            &client(),
            req("GET", &format!("http://{}/metrics", self.admin), None, None),
        )
        .await
    }
}

/// The JSON body of a message to session `sid`.
pub fn message(sid: &str, text: &str) -> String {
    format!(r#"{{"sessionId":"{sid}","text":"{text}"}}"#)
}

pub type PlainClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> PlainClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> PlainClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

pub async fn send(client: &PlainClient, req: Request<Full<Bytes>>) -> Reply {
    let rsp = client.request(req).await.expect("request failed");
    let (parts, body) = rsp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// Builds a request with the token of `token_name` (or none).
pub fn req(
    method: &str,
    url: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(t) = bearer {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    if json.is_some() {
        b = b.header("content-type", "application/json");
    }
    b.body(Full::from(json.unwrap_or("").to_string())).unwrap()
}

/// Sends raw bytes on a fresh connection and reads until the server closes
/// or `deadline` passes. Returns what was read.
pub async fn raw(addr: SocketAddr, bytes: &[u8], deadline: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(deadline, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until `cond` holds, checking every 10 ms, failing after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn config_path(bed: &TestBed) -> PathBuf {
    bed.dir.0.join("gateway.toml")
}

/// A second gateway, as a real process: the bed's config with fresh ports
/// (and, if given, its own state directory).
pub struct Process {
    pub config: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl TestBed {
    pub fn process_config(&self, name: &str, state_dir: Option<&str>) -> Process {
        let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (paddr, aaddr) = (proxy.local_addr().unwrap(), admin.local_addr().unwrap());
        drop((proxy, admin));
        let mut text = self
            .config_text
            .replace(&self.addr.to_string(), &paddr.to_string())
            .replace(&self.admin.to_string(), &aaddr.to_string());
        if let Some(dir) = state_dir {
            text = text.replace("dir = \"state\"", &format!("dir = \"{dir}\""));
        }
        let config = self.dir.0.join(name);
        std::fs::write(&config, text).unwrap();
        Process {
            config,
            proxy: paddr,
            admin: aaddr,
        }
    }
}

/// The value of one series (name and labels, as the text format writes
/// them) on the admin port `admin`, if present and the port answers.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let url = format!("http://{admin}/metrics");
    let r = client().request(req("GET", &url, None, None)).await.ok()?;
    let body = r.into_body().collect().await.ok()?;
    let text = String::from_utf8(body.to_bytes().to_vec()).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A child process killed (SIGKILL) and reaped when dropped, so a test
/// that fails half-way leaves no gateway running.
pub struct Running(pub std::process::Child);

impl Running {
    /// Kills the process now and waits for it.
    pub fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Process {
    /// Starts `knoq-gateway serve` on this config, killed when dropped.
    pub fn run(&self, stderr: std::process::Stdio) -> Running {
        Running(self.spawn(stderr))
    }

    /// Starts `knoq-gateway serve` on this config.
    pub fn spawn(&self, stderr: std::process::Stdio) -> std::process::Child {
        std::process::Command::new(env!("CARGO_BIN_EXE_knoq-gateway"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap()
    }

    /// Waits until the process answers on its admin port.
    pub async fn wait_healthy(&self, c: &PlainClient) {
        let url = format!("http://{}/healthz", self.admin);
        eventually("the gateway process is up", Duration::from_secs(10), || {
            let (c, url) = (c.clone(), url.clone());
            async move { c.request(req("GET", &url, None, None)).await.is_ok() }
        })
        .await;
    }
}

/// What one run of the `knoq-gateway` CLI printed.
pub struct CliRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Both streams, for assertions that do not care which.
    pub fn said(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the CLI with `args` (and `stdin`), off the runtime: the command
/// may call the in-process simulated Knoq, which must keep answering.
pub async fn cli(args: &[&str], stdin: Option<&str>) -> CliRun {
    use std::io::Write;
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let input = stdin.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_knoq-gateway"))
            .args(&args)
            .env_remove("KNOQ_GATEWAY_CONFIG")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = input {
            pipe.write_all(text.as_bytes()).unwrap();
        }
        drop(pipe);
        let out = child.wait_with_output().unwrap();
        CliRun {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

/// `GET path` on an admin port.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    send(
        &client(),
        req("GET", &format!("http://{admin}{path}"), None, None),
    )
    .await
}

/// A real `redis-server` (Debian's package, which ./scripts/test installs)
/// on a free loopback port, with its own directory; killed by PID on drop.
pub struct RedisServer {
    pub port: u16,
    pub dir: TempDir,
    extra: Vec<String>,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// As [`start`](Self::start), with extra `redis-server` arguments
    /// (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            dir: TempDir::new("redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        assert!(
            std::process::Command::new("redis-server")
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok(),
            "`redis-server` is not installed: run ./scripts/test, which installs Debian's redis-server package"
        );
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir.0)
            .args(["--save", "", "--protected-mode", "no", "--daemonize", "no"])
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `redis-cli -p PORT args…`, its output (empty when it fails).
    pub fn cli(&self, args: &[&str]) -> String {
        std::process::Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// `kill -9`, then the same server again on the same port and directory.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// `kill -STOP` / `kill -CONT`: a server that hangs, not one that refuses.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback, each a
/// [`RedisServer`] started with `--cluster-enabled yes`, joined by
/// `redis-cli --cluster create`; ready once every node says
/// `cluster_state:ok`. Stopped with its servers.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let made = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&made.stdout)
        );
        let cluster = RedisCluster { nodes };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !cluster
            .nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Every node's URL: the seeds for `store.url`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// `[store]` on the cluster for a bed, as [`redis_store_toml`].
    pub fn store_toml(&self) -> String {
        let list: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!(
            "[store]\nkind = \"redis\"\nurl = [{}]\nsecret_key_file = \"store.key\"\n",
            list.join(", ")
        )
    }

    /// `redis-cli -c` (following redirections) from the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        std::process::Command::new("redis-cli")
            .args(["-c", "-p"])
            .arg(self.nodes[0].port.to_string())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// What a test needs of the shared Redis, one server or a cluster: the
/// bed's `[store]`, a command where the key lives, and a command on every
/// node (e.g. `FLUSHALL`, `CLIENT KILL`).
pub trait SharedRedis {
    fn store_toml(&self) -> String;
    fn cli(&self, args: &[&str]) -> String;
    fn on_every_node(&self, args: &[&str]) -> Vec<String>;
}

impl SharedRedis for RedisServer {
    fn store_toml(&self) -> String {
        redis_store_toml(self)
    }
    fn cli(&self, args: &[&str]) -> String {
        RedisServer::cli(self, args)
    }
    fn on_every_node(&self, args: &[&str]) -> Vec<String> {
        vec![RedisServer::cli(self, args)]
    }
}

impl SharedRedis for RedisCluster {
    fn store_toml(&self) -> String {
        RedisCluster::store_toml(self)
    }
    fn cli(&self, args: &[&str]) -> String {
        RedisCluster::cli(self, args)
    }
    fn on_every_node(&self, args: &[&str]) -> Vec<String> {
        self.nodes.iter().map(|n| n.cli(args)).collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // SIGKILL ends a stopped process too; continuing it first
            // keeps its port from lingering in a half-closed state.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
