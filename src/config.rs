//! The gateway's configuration: a TOML file read once at start-up.
//!
//! Two layers, as in pingora's `load_from_yaml -> from_yaml -> validate`:
//! [`RawConfig`] mirrors the file (serde, `deny_unknown_fields` so a typo is
//! an error, every default a named `DEFAULT_*` const) and [`Config`] holds
//! the validated, typed values (`SocketAddr`, `Duration`, `Uri`, digests).
//! Validation collects **every** problem, each with its key path, before it
//! returns, so an operator fixes a config in one pass.
//!
//! This module does no I/O besides reading the config file itself. Files the
//! config names (cookies, SCIM token, TLS material) are read and checked by
//! their owners (`credentials`, `tls`), which report problems in the same
//! [`Problem`] form so `knoq-gateway check` prints them all together.
//!
//! Relative paths in the file are resolved against the directory holding the
//! config file, so the gateway behaves the same whatever its working
//! directory.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderValue, Uri};
use serde::Deserialize;

use crate::clock::Millis;
use crate::quota::window::Window;
use crate::quota::{Bucket, BucketOverrides, BucketWindows};
use crate::shared_store::{OnStoreError, RedisSettings, RedisUrls, StoreSettings};
use crate::units::{parse_duration, parse_size};
use crate::upstream::retry::Backoff;

// Each stage owns its settings type; the config layer fills them in.
pub use crate::quota::{OnLimit, QuotaConfig};
pub use crate::upstream::retry::{CircuitConfig, RetryConfig};
pub use crate::upstream::UpstreamConfig;

/// Where the config is when neither `--config` nor `KNOQ_GATEWAY_CONFIG`
/// says: the service layout (see README, "Running as a service").
pub const DEFAULT_CONFIG_PATH: &str = "/etc/knoq-gateway/gateway.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAX_BODY: &str = "1MiB";
pub const DEFAULT_MAX_HEADER_BYTES: &str = "16KiB";
pub const DEFAULT_HEADER_READ_TIMEOUT: &str = "10s";
pub const DEFAULT_IDLE_TIMEOUT: &str = "75s";
pub const DEFAULT_FIRST_BYTE_TIMEOUT: &str = "5s";
pub const DEFAULT_SEND_TIMEOUT: &str = "30s";
/// nginx's `keepalive_requests`.
pub const DEFAULT_MAX_REQUESTS_PER_CONNECTION: u64 = 1000;
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Envoy's default circuit-breaker `max_requests`.
pub const DEFAULT_MAX_INFLIGHT: usize = 1024;
/// One account alone cannot take more streams than an HTTP/2 upstream
/// commonly allows on one connection (100).
pub const DEFAULT_MAX_INFLIGHT_PER_USER: usize = 100;
pub const DEFAULT_SHUTDOWN_GRACE: &str = "30s";
pub const DEFAULT_UPSTREAM_URL: &str = "https://knoq.one";
pub const DEFAULT_ORIGIN: &str = "https://knoq.one";
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
pub const DEFAULT_UPSTREAM_TIMEOUT: &str = "60s";
pub const DEFAULT_POOL_IDLE_TIMEOUT: &str = "90s";
pub const DEFAULT_POOL_MAX_IDLE: usize = 64;
/// What HTTP/2 servers commonly allow on one connection (RFC 9113 asks for
/// at least 100), so the gateway never queues inside its HTTP client.
pub const DEFAULT_UPSTREAM_MAX_STREAMS: usize = 100;
pub const DEFAULT_UPSTREAM_QUEUE_TIMEOUT: &str = "1s";
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 4;
pub const DEFAULT_STATE_DIR: &str = "state";
/// Knoq's published per-user limits.
pub const DEFAULT_QUOTA_MESSAGE: &[&str] = &["60/min"];
pub const DEFAULT_QUOTA_SESSION: &[&str] = &["10/min", "20/hour"];
pub const DEFAULT_QUOTA_CANCEL: &[&str] = &["30/min"];
pub const DEFAULT_QUOTA_READ: &[&str] = &[];
pub const DEFAULT_QUOTA_MARGIN: &str = "250ms";
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 4;
pub const DEFAULT_RETRY_BASE_DELAY: &str = "200ms";
pub const DEFAULT_RETRY_MAX_DELAY: &str = "5s";
pub const DEFAULT_RETRY_DEADLINE: &str = "30s";
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;
pub const DEFAULT_RETRY_BUDGET_FLOOR: u32 = 10;
pub const DEFAULT_RECONCILE_SETTLE: &str = "2s";
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 5;
pub const DEFAULT_CIRCUIT_OPEN_FOR: &str = "10s";
/// A loopback or same-zone Redis answers in well under a millisecond.
pub const DEFAULT_STORE_TIMEOUT: &str = "50ms";
pub const DEFAULT_STORE_PREFIX: &str = "kgw:";

// === Raw layer: exactly what the file says ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    scim: RawScim,
    #[serde(default)]
    quotas: RawQuotas,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    circuit: RawCircuit,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    users: Vec<RawUser>,
    #[serde(default)]
    tokens: Vec<RawToken>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_body: Option<String>,
    max_header_bytes: Option<String>,
    header_read_timeout: Option<String>,
    first_byte_timeout: Option<String>,
    idle_timeout: Option<String>,
    send_timeout: Option<String>,
    max_requests_per_connection: Option<u64>,
    max_connections: Option<usize>,
    max_inflight: Option<usize>,
    max_inflight_per_user: Option<usize>,
    shutdown_grace: Option<String>,
    allowed_hosts: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    origin: Option<String>,
    ca_file: Option<PathBuf>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle: Option<usize>,
    http2: Option<bool>,
    max_streams: Option<usize>,
    max_connections: Option<usize>,
    queue_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScim {
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    // Listed, not `#[serde(flatten)]`: flatten disables deny_unknown_fields.
    message: Option<Vec<String>>,
    session: Option<Vec<String>>,
    cancel: Option<Vec<String>>,
    read: Option<Vec<String>>,
    on_limit: Option<String>,
    max_wait: Option<String>,
    margin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<u32>,
    base_delay: Option<String>,
    max_delay: Option<String>,
    deadline: Option<String>,
    budget: Option<f64>,
    budget_floor: Option<u32>,
    reconcile_settle: Option<String>,
    resend_unconfirmed: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuit {
    failures: Option<u32>,
    open_for: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    url: Option<RawUrls>,
    password_file: Option<PathBuf>,
    key_prefix: Option<String>,
    timeout: Option<String>,
    on_error: Option<String>,
    replicas: Option<u32>,
    secret_key_file: Option<PathBuf>,
}

/// `store.url`: one URL (one server) or a list (a cluster's seeds).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawUrls {
    One(String),
    Seeds(Vec<String>),
}

/// Windows per bucket, e.g. `message = ["60/min", "5000/month"]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucketQuotas {
    message: Option<Vec<String>>,
    session: Option<Vec<String>>,
    cancel: Option<Vec<String>>,
    read: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    cookie_file: Option<PathBuf>,
    cookie_env: Option<String>,
    quotas: Option<RawBucketQuotas>,
    probe: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    user: String,
    sha256: String,
    #[serde(default)]
    scim: bool,
    quotas: Option<RawBucketQuotas>,
    expires: Option<String>,
}

// === Typed layer ===

/// The validated configuration. Every field already has its final type.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the file was read from (for messages); `None` when built from a string.
    pub source: Option<PathBuf>,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    pub state: StateConfig,
    pub log: LogConfig,
    pub scim: ScimConfig,
    pub quotas: QuotaConfig,
    pub retry: RetryConfig,
    pub circuit: CircuitConfig,
    /// `[store]`: where quotas live (the state directory, or a Redis every
    /// replica shares).
    pub store: StoreSettings,
    pub users: Vec<UserConfig>,
    pub tokens: Vec<TokenConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// Largest request body accepted, in bytes (413 above).
    pub max_body: u64,
    /// Largest request head (request line plus headers) accepted (431 above).
    pub max_header_bytes: usize,
    /// A client must send a whole request head within this time.
    pub header_read_timeout: Duration,
    /// A connection that sends nothing for this long after it opens is
    /// closed (at most `header_read_timeout`).
    pub first_byte_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A response the client takes nothing of for this long (HTTP/1.1: the
    /// socket accepts no byte; HTTP/2: the stream's window stays shut) is
    /// abandoned: its connection closes, its upstream request is dropped.
    pub send_timeout: Duration,
    /// Requests one connection may carry before it is closed gracefully.
    pub max_requests_per_connection: u64,
    /// Connections beyond this are refused at once (503, then closed).
    pub max_connections: usize,
    /// Requests in flight at once, in all and per account; past either,
    /// 503 `gateway_overloaded` at once.
    pub admission: crate::admission::Limits,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Host names (without port, lower case) a request's `Host` may carry.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `knoq_gateway=debug`;
    /// `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct ScimConfig {
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub cookie: CookieSource,
    /// Buckets this account sets itself, replacing `[quotas]` defaults.
    pub quotas: BucketOverrides,
    /// Check an idle account's cookie this often (`None`: never).
    pub probe: Option<Duration>,
}

/// Where a user's Knoq cookie comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieSource {
    File(PathBuf),
    Env(String),
    /// Neither: only `knoq-gateway credentials set` provides one, kept in
    /// the state directory.
    Stored,
}

#[derive(Clone)]
pub struct TokenConfig {
    pub name: String,
    pub user: String,
    pub sha256: [u8; 32],
    pub scim: bool,
    /// A tighter share for this tool, checked on top of its user's limits.
    pub quotas: BucketOverrides,
    /// Unix milliseconds from which the token is refused (`None`: never).
    pub expires: Option<Millis>,
}

impl fmt::Debug for TokenConfig {
    // The digest is not a secret, but it is the one thing that identifies a
    // token in the file; keep it out of debug dumps all the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("user", &self.user)
            .field("scim", &self.scim)
            .finish_non_exhaustive()
    }
}

// === Problems ===

/// One thing wrong with the configuration, named by its key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Every problem found in a configuration, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl From<Vec<Problem>> for ConfigError {
    fn from(problems: Vec<Problem>) -> Self {
        ConfigError { problems }
    }
}

// === impl Config ===

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::from(vec![Problem::new(
                path.display().to_string(),
                format!("cannot read the config file: {e} (name another with --config or KNOQ_GATEWAY_CONFIG)"),
            )])
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let mut config = Config::from_toml_str(&text, base)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Which quota windows apply to each account and token.
    pub fn quota_policy(&self) -> crate::quota::Policy {
        crate::quota::Policy::new(
            &self.quotas.defaults,
            self.users.iter().map(|u| (u.name.as_str(), &u.quotas)),
            self.tokens.iter().map(|t| (t.name.as_str(), &t.quotas)),
        )
    }

    /// Parses and validates config text; relative paths resolve against `base`.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from(vec![toml_problem(text, &e)]))?;
        raw.validate(base)
    }
}

/// A TOML or shape error as one line: the key path (`server.max_bdy`,
/// `users[1].cookie_file`), what is wrong in our words, the line number, and
/// for an unknown key the closest valid one.
fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let message = e.message().trim();
    let Some(span) = e.span() else {
        return Problem::new("config", message.replace('\n', " "));
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    // The table the offending line is in: the last header above it.
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in text[..start].lines() {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = arrays.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = name.trim().to_string();
        }
    }
    // The key: the text under the span, or the key of the span's line.
    let line = text[start..].lines().next().unwrap_or_default();
    let under = text.get(span.clone()).unwrap_or_default().trim();
    let key = if !under.is_empty()
        && under
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        under.to_string()
    } else {
        let full = text[text[..start].rfind('\n').map_or(0, |i| i + 1)..]
            .lines()
            .next()
            .unwrap_or(line);
        full.split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let path = match (table.is_empty(), key.is_empty() || key.starts_with('[')) {
        (true, true) => "config".to_string(),
        (true, false) => key.clone(),
        (false, true) => table.clone(),
        (false, false) => format!("{table}.{key}"),
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let expected: Vec<&str> = rest
            .split("expected ")
            .nth(1)
            .map(|list| {
                list.trim_start_matches("one of ")
                    .split(", ")
                    .map(|k| k.trim_matches(|c| c == '`' || c == ' '))
                    .collect()
            })
            .unwrap_or_default();
        let hint = closest(&key, &expected)
            .map(|k| format!(" (did you mean {k}?)"))
            .unwrap_or_else(|| format!(" (the keys here: {})", expected.join(", ")));
        return Problem::new(path, format!("unknown key{hint}, line {line_no}"));
    }
    Problem::new(
        path,
        format!("{}, line {line_no}", message.replace('\n', " ")),
    )
}

/// The candidate closest to `word` by edit distance, if it is close enough
/// to be a typo of it.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    candidates
        .iter()
        .map(|c| (distance(word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

/// The longest duration any key takes: a longer one is a typo, and would
/// overflow the runtime's timers.
const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// Collects problems while validating; each parser helper records its own.
struct Checker<'a> {
    base: &'a Path,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, key: impl Into<String>, msg: impl Into<String>) {
        self.problems.push(Problem::new(key, msg));
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        let text = value.unwrap_or(default);
        let fallback = || parse_duration(default).expect("defaults are valid durations");
        match parse_duration(text) {
            Ok(d) if d <= MAX_DURATION => d,
            Ok(_) => {
                self.problem(key, format!("\"{text}\" is too long: at most \"1d\""));
                fallback()
            }
            Err(e) => {
                self.problem(key, e);
                fallback()
            }
        }
    }

    fn positive_duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        let d = self.duration(key, value, default);
        if d.is_zero() {
            self.problem(key, "must be greater than zero");
        }
        d
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let text = value.unwrap_or(default);
        text.parse().unwrap_or_else(|_| {
            self.problem(
                key,
                format!("\"{text}\" is not an IP address with a port, e.g. \"127.0.0.1:8080\""),
            );
            default.parse().expect("defaults are valid addresses")
        })
    }

    fn windows(&mut self, key: &str, texts: &[String]) -> Vec<Window> {
        let mut out: Vec<Window> = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            match Window::parse(text) {
                Ok(w) if out.iter().any(|o| o.period == w.period) => self.problem(
                    format!("{key}[{i}]"),
                    format!("two limits for the same period ({w}); keep the tighter one"),
                ),
                Ok(w) => out.push(w),
                Err(e) => self.problem(format!("{key}[{i}]"), e),
            }
        }
        out
    }

    fn bucket_overrides(&mut self, key: &str, raw: Option<RawBucketQuotas>) -> BucketOverrides {
        let raw = raw.unwrap_or_default();
        let mut out = BucketOverrides::default();
        for (bucket, texts) in raw.by_bucket() {
            if let Some(texts) = texts {
                out[bucket as usize] =
                    Some(self.windows(&format!("{key}.{}", bucket.label()), &texts));
            }
        }
        out
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// Names end up in log lines, metric labels and error messages, so they are
/// kept to a plain, bounded alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A token's `expires`: a date (`2027-03-01`, the start of that day, UTC)
/// or a full RFC 3339 time.
pub fn parse_expiry(text: &str) -> Option<Millis> {
    if text.len() == 10 {
        return crate::clock::parse_rfc3339_ms(&format!("{text}T00:00:00Z"));
    }
    crate::clock::parse_rfc3339_ms(text)
}

fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

impl RawConfig {
    fn validate(self, base: &Path) -> Result<Config, ConfigError> {
        let mut c = Checker {
            base,
            problems: Vec::new(),
        };
        let server = self.server.validate(&mut c);
        let admin = AdminConfig {
            listen: c.addr(
                "admin.listen",
                self.admin.listen.as_deref(),
                DEFAULT_ADMIN_LISTEN,
            ),
        };
        if admin.listen == server.listen {
            c.problem(
                "admin.listen",
                "must differ from server.listen: metrics and health never share the clients' port",
            );
        }
        let upstream = self.upstream.validate(&mut c);
        let state = StateConfig {
            dir: c.path(
                self.state
                    .dir
                    .as_deref()
                    .unwrap_or(Path::new(DEFAULT_STATE_DIR)),
            ),
        };
        let log = LogConfig {
            format: match self.log.format.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    c.problem(
                        "log.format",
                        format!("\"{other}\" is not a log format; use \"text\" or \"json\""),
                    );
                    LogFormat::Text
                }
            },
            level: match self.log.level {
                Some(level) if tracing_subscriber::EnvFilter::try_new(&level).is_err() => {
                    c.problem(
                        "log.level",
                        format!("\"{level}\" is not a level or filter; use e.g. \"info\", \"debug\" or \"knoq_gateway=debug\""),
                    );
                    "info".to_string()
                }
                Some(level) => level,
                None => "info".to_string(),
            },
        };
        let scim = ScimConfig {
            token_file: self.scim.token_file.as_deref().map(|p| c.path(p)),
        };

        let quotas = self.quotas.validate(&mut c);
        let retry = self.retry.validate(&mut c);
        let circuit = CircuitConfig {
            failures: match self.circuit.failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES) {
                0 => {
                    c.problem("circuit.failures", "must be at least 1");
                    1
                }
                n => n,
            },
            open_for: c.positive_duration(
                "circuit.open_for",
                self.circuit.open_for.as_deref(),
                DEFAULT_CIRCUIT_OPEN_FOR,
            ),
        };

        let store = self.store.validate(&mut c);

        let mut users = Vec::with_capacity(self.users.len());
        let mut user_names = HashSet::new();
        for (i, u) in self.users.into_iter().enumerate() {
            let key = format!("users[{i}]");
            if !valid_name(&u.name) {
                c.problem(
                    format!("{key}.name"),
                    format!(
                        "\"{}\" must be 1-64 characters of letters, digits, '-', '_' or '.'",
                        u.name
                    ),
                );
            }
            if !user_names.insert(u.name.clone()) {
                c.problem(
                    format!("{key}.name"),
                    format!("user \"{}\" is defined twice", u.name),
                );
            }
            let cookie = match (u.cookie_file, u.cookie_env) {
                (Some(f), None) => CookieSource::File(c.path(&f)),
                (None, Some(e)) if !e.is_empty() => CookieSource::Env(e),
                (None, Some(_)) => {
                    c.problem(format!("{key}.cookie_env"), "must not be empty");
                    continue;
                }
                (Some(_), Some(_)) => {
                    c.problem(key.clone(), "set cookie_file or cookie_env, not both");
                    continue;
                }
                (None, None) => CookieSource::Stored,
            };
            let quotas = c.bucket_overrides(&format!("{key}.quotas"), u.quotas);
            let probe = u.probe.as_deref().map(|p| {
                let d = c.duration(&format!("{key}.probe"), Some(p), "10m");
                if d < Duration::from_secs(1) {
                    c.problem(format!("{key}.probe"), "must be at least 1s");
                }
                d
            });
            users.push(UserConfig {
                name: u.name,
                cookie,
                quotas,
                probe,
            });
        }

        let mut tokens = Vec::with_capacity(self.tokens.len());
        let mut token_names = HashSet::new();
        let mut digests = HashSet::new();
        for (i, t) in self.tokens.into_iter().enumerate() {
            let key = format!("tokens[{i}]");
            if !valid_name(&t.name) {
                c.problem(
                    format!("{key}.name"),
                    format!(
                        "\"{}\" must be 1-64 characters of letters, digits, '-', '_' or '.'",
                        t.name
                    ),
                );
            }
            if !token_names.insert(t.name.clone()) {
                c.problem(
                    format!("{key}.name"),
                    format!("token \"{}\" is defined twice", t.name),
                );
            }
            if !user_names.contains(&t.user) {
                c.problem(
                    format!("{key}.user"),
                    format!("no [[users]] entry is named \"{}\"", t.user),
                );
            }
            let Some(sha256) = parse_sha256_hex(&t.sha256) else {
                c.problem(
                    format!("{key}.sha256"),
                    "must be 64 hex digits: the SHA-256 of the token, as printed by `knoq-gateway token new`",
                );
                continue;
            };
            if sha256 == [0; 32] {
                c.problem(
                    format!("{key}.sha256"),
                    "is the example's placeholder; make a token with `knoq-gateway token new` and paste the sha256 line it prints",
                );
            }
            let expires = t.expires.as_deref().and_then(|text| {
                let parsed = parse_expiry(text);
                if parsed.is_none() {
                    c.problem(
                        format!("{key}.expires"),
                        format!("\"{text}\" is not a date (\"2027-03-01\", meaning 00:00 UTC) or an RFC 3339 time (\"2027-03-01T12:00:00Z\")"),
                    );
                }
                parsed
            });
            if !digests.insert(sha256) {
                c.problem(
                    format!("{key}.sha256"),
                    "the same token digest appears twice; give each tool its own token",
                );
            }
            let quotas = c.bucket_overrides(&format!("{key}.quotas"), t.quotas);
            tokens.push(TokenConfig {
                name: t.name,
                user: t.user,
                sha256,
                scim: t.scim,
                quotas,
                expires,
            });
        }
        if tokens.iter().any(|t| t.scim) && scim.token_file.is_none() {
            c.problem(
                "scim.token_file",
                "a token has scim = true, so the gateway needs Knoq's SCIM token file",
            );
        }

        if !c.problems.is_empty() {
            return Err(c.problems.into());
        }
        Ok(Config {
            source: None,
            server,
            admin,
            upstream,
            state,
            log,
            scim,
            quotas,
            retry,
            circuit,
            store,
            users,
            tokens,
        })
    }
}

impl RawStore {
    fn validate(self, c: &mut Checker<'_>) -> StoreSettings {
        let redis = match self.kind.as_deref() {
            None | Some("local") => false,
            Some("redis") => true,
            Some(other) => {
                c.problem(
                    "store.kind",
                    format!("\"{other}\" is not a store; use \"local\" (the state directory) or \"redis\" (shared by every replica)"),
                );
                false
            }
        };
        let timeout = c.positive_duration(
            "store.timeout",
            self.timeout.as_deref(),
            DEFAULT_STORE_TIMEOUT,
        );
        if timeout > Duration::from_secs(10) {
            c.problem(
                "store.timeout",
                "is too long: every metered request may wait this long; at most \"10s\"",
            );
        }
        let on_error = match self.on_error.as_deref() {
            None | Some("reject") => OnStoreError::Reject,
            Some("local_share") => match self.replicas {
                Some(replicas @ 1..=1000) => OnStoreError::LocalShare { replicas },
                Some(_) => {
                    c.problem("store.replicas", "must be from 1 to 1000: how many replicas share the account while Redis is away");
                    OnStoreError::Reject
                }
                None => {
                    c.problem("store.replicas", "store.on_error = \"local_share\" needs the number of replicas, which divides every limit while Redis is away (more replicas than this would admit too much)");
                    OnStoreError::Reject
                }
            },
            Some(other) => {
                c.problem(
                    "store.on_error",
                    format!(
                        "\"{other}\" is not a failure policy; use \"reject\" or \"local_share\""
                    ),
                );
                OnStoreError::Reject
            }
        };
        let key_prefix = self
            .key_prefix
            .unwrap_or_else(|| DEFAULT_STORE_PREFIX.to_string());
        if key_prefix
            .bytes()
            .any(|b| b == b'{' || b == b'}' || !b.is_ascii_graphic())
        {
            c.problem(
                "store.key_prefix",
                "must be printable ASCII without spaces or braces (the braces hold each account's Redis Cluster hash tag)",
            );
        }
        if !redis {
            for (key, set) in [
                ("store.url", self.url.is_some()),
                ("store.password_file", self.password_file.is_some()),
                ("store.secret_key_file", self.secret_key_file.is_some()),
                ("store.replicas", self.replicas.is_some()),
            ] {
                if set {
                    c.problem(key, "applies only with store.kind = \"redis\"");
                }
            }
            return StoreSettings::Local;
        }
        let url = match self.url {
            None => {
                c.problem(
                    "store.url",
                    "store.kind = \"redis\" needs the server's URL, e.g. \"redis://127.0.0.1:6379/0\" (or a list of a Redis Cluster's nodes)",
                );
                RedisUrls::Server(String::new())
            }
            Some(RawUrls::One(url)) => {
                if let Err(e) = check_redis_url(&url) {
                    c.problem("store.url", e);
                }
                RedisUrls::Server(url)
            }
            Some(RawUrls::Seeds(urls)) => {
                if let Err(e) = check_cluster_urls(&urls) {
                    c.problem("store.url", e);
                }
                RedisUrls::Cluster(urls)
            }
        };
        let secret_key_file = match self.secret_key_file {
            Some(p) => c.path(&p),
            None => {
                c.problem(
                    "store.secret_key_file",
                    "store.kind = \"redis\" needs a key to encrypt the cookies it shares: 32 random bytes in a file of mode 0600, e.g. `head -c 32 /dev/urandom > secrets/store.key`",
                );
                PathBuf::new()
            }
        };
        StoreSettings::Redis(RedisSettings {
            url,
            password_file: self.password_file.as_deref().map(|p| c.path(p)),
            secret_key_file,
            key_prefix,
            timeout,
            on_error,
        })
    }
}

/// `redis://host:port/db` or `rediss://…`, with no password in it (it
/// belongs in `store.password_file`, so it is never in a log or a diff).
/// The message never repeats the URL, which may hold a secret.
fn check_redis_url(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("must look like \"redis://127.0.0.1:6379/0\" (or rediss:// for TLS)".into());
    };
    if scheme != "redis" && scheme != "rediss" {
        return Err(format!(
            "the scheme \"{scheme}\" is not redis:// or rediss://"
        ));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err(
                "holds a password: put it in store.password_file (one line, mode 0600) and leave it out of the URL".into(),
            );
        }
    }
    if authority.rsplit('@').next().unwrap_or_default().is_empty() {
        return Err("names no host".into());
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(drop)
        .map_err(|e| format!("is not a Redis URL: {e}"))
}

/// A cluster's seed nodes: at least one, each a Redis URL as above, all
/// with one scheme, none naming a database other than 0 (a cluster has
/// only database 0). Messages name the seed by position, never by URL.
fn check_cluster_urls(urls: &[String]) -> Result<(), String> {
    if urls.is_empty() {
        return Err(
            "lists no node: give one URL for one server, or the URLs of a Redis Cluster's nodes"
                .into(),
        );
    }
    for (i, url) in urls.iter().enumerate() {
        check_redis_url(url).map_err(|e| format!("node {}: {e}", i + 1))?;
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("node {} is not a Redis URL: {e}", i + 1))?;
        if info.redis_settings().db() != 0 {
            return Err(format!(
                "node {} names database {}: a Redis Cluster has only database 0",
                i + 1,
                info.redis_settings().db()
            ));
        }
    }
    let schemes: std::collections::BTreeSet<&str> = urls
        .iter()
        .filter_map(|u| u.split_once("://"))
        .map(|(s, _)| s)
        .collect();
    if schemes.len() > 1 {
        return Err("mixes redis:// and rediss://: a cluster's nodes are reached one way".into());
    }
    Ok(())
}

impl RawBucketQuotas {
    fn by_bucket(self) -> [(Bucket, Option<Vec<String>>); 4] {
        [
            (Bucket::Message, self.message),
            (Bucket::Session, self.session),
            (Bucket::Cancel, self.cancel),
            (Bucket::Read, self.read),
        ]
    }
}

impl RawRetry {
    fn validate(self, c: &mut Checker<'_>) -> RetryConfig {
        let attempts = self.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS);
        if !(1..=20).contains(&attempts) {
            c.problem("retry.attempts", "must be between 1 (no retries) and 20");
        }
        let base = c.positive_duration(
            "retry.base_delay",
            self.base_delay.as_deref(),
            DEFAULT_RETRY_BASE_DELAY,
        );
        let max = c.positive_duration(
            "retry.max_delay",
            self.max_delay.as_deref(),
            DEFAULT_RETRY_MAX_DELAY,
        );
        let backoff = Backoff::try_new(base, max).unwrap_or_else(|e| {
            c.problem("retry.max_delay", e);
            Backoff::try_new(base, base.max(max)).expect("max clamped to at least base")
        });
        let budget = self.budget.unwrap_or(DEFAULT_RETRY_BUDGET);
        if !(0.0..=10.0).contains(&budget) {
            c.problem(
                "retry.budget",
                "must be a fraction between 0 and 10, e.g. 0.2",
            );
        }
        RetryConfig {
            attempts: attempts.clamp(1, 20),
            backoff,
            deadline: c.positive_duration(
                "retry.deadline",
                self.deadline.as_deref(),
                DEFAULT_RETRY_DEADLINE,
            ),
            budget: budget.clamp(0.0, 10.0),
            budget_floor: self.budget_floor.unwrap_or(DEFAULT_RETRY_BUDGET_FLOOR),
            reconcile_settle: c.duration(
                "retry.reconcile_settle",
                self.reconcile_settle.as_deref(),
                DEFAULT_RECONCILE_SETTLE,
            ),
            resend_unconfirmed: self.resend_unconfirmed.unwrap_or(false),
        }
    }
}

impl RawQuotas {
    fn validate(self, c: &mut Checker<'_>) -> QuotaConfig {
        let defaults_for = |b: Bucket| -> &'static [&'static str] {
            match b {
                Bucket::Message => DEFAULT_QUOTA_MESSAGE,
                Bucket::Session => DEFAULT_QUOTA_SESSION,
                Bucket::Cancel => DEFAULT_QUOTA_CANCEL,
                Bucket::Read => DEFAULT_QUOTA_READ,
            }
        };
        let buckets = RawBucketQuotas {
            message: self.message,
            session: self.session,
            cancel: self.cancel,
            read: self.read,
        };
        let mut defaults = BucketWindows::default();
        for (bucket, texts) in buckets.by_bucket() {
            let texts = texts
                .unwrap_or_else(|| defaults_for(bucket).iter().map(|s| s.to_string()).collect());
            defaults[bucket as usize] = c.windows(&format!("quotas.{}", bucket.label()), &texts);
        }
        let on_limit = match self.on_limit.as_deref() {
            None | Some("reject") => OnLimit::Reject,
            Some("wait") => OnLimit::Wait,
            Some(other) => {
                c.problem(
                    "quotas.on_limit",
                    format!("\"{other}\" is not a choice; use \"reject\" or \"wait\""),
                );
                OnLimit::Reject
            }
        };
        QuotaConfig {
            defaults,
            on_limit,
            max_wait: c.duration("quotas.max_wait", self.max_wait.as_deref(), "0s"),
            margin: c.duration(
                "quotas.margin",
                self.margin.as_deref(),
                DEFAULT_QUOTA_MARGIN,
            ),
        }
    }
}

impl RawServer {
    fn validate(self, c: &mut Checker<'_>) -> ServerConfig {
        let listen = c.addr("server.listen", self.listen.as_deref(), DEFAULT_LISTEN);
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: c.path(&cert),
                key: c.path(&key),
            }),
            (None, None) => None,
            _ => {
                c.problem(
                    "server",
                    "tls_cert and tls_key go together: set both or neither",
                );
                None
            }
        };
        let max_body = parse_size(self.max_body.as_deref().unwrap_or(DEFAULT_MAX_BODY))
            .unwrap_or_else(|e| {
                c.problem("server.max_body", e);
                0
            });
        let max_header_bytes = parse_size(
            self.max_header_bytes
                .as_deref()
                .unwrap_or(DEFAULT_MAX_HEADER_BYTES),
        )
        .unwrap_or_else(|e| {
            c.problem("server.max_header_bytes", e);
            0
        });
        // hyper's read buffer must hold a whole head; it wants at least 8 KiB.
        if !(1024..=1 << 20).contains(&max_header_bytes) {
            c.problem("server.max_header_bytes", "must be between 1KiB and 1MiB");
        }
        let max_connections = self.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            c.problem("server.max_connections", "must be at least 1");
        }
        let max_inflight = self.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT);
        if max_inflight == 0 {
            c.problem("server.max_inflight", "must be at least 1");
        }
        let max_inflight_per_user = self
            .max_inflight_per_user
            .unwrap_or(DEFAULT_MAX_INFLIGHT_PER_USER.min(max_inflight));
        if max_inflight_per_user == 0 || max_inflight_per_user > max_inflight {
            c.problem(
                "server.max_inflight_per_user",
                "must be at least 1 and at most server.max_inflight",
            );
        }
        let allowed_hosts = match self.allowed_hosts {
            Some(list) => {
                let mut hosts = Vec::new();
                for (i, h) in list.iter().enumerate() {
                    let h = h.trim().to_ascii_lowercase();
                    if h.is_empty() || h.contains('/') || h.contains(char::is_whitespace) {
                        c.problem(
                            format!("server.allowed_hosts[{i}]"),
                            "must be a host name or IP address without scheme or port",
                        );
                    } else {
                        hosts.push(h);
                    }
                }
                hosts
            }
            None => default_allowed_hosts(listen),
        };
        ServerConfig {
            listen,
            tls,
            max_body,
            max_header_bytes: max_header_bytes as usize,
            header_read_timeout: c.positive_duration(
                "server.header_read_timeout",
                self.header_read_timeout.as_deref(),
                DEFAULT_HEADER_READ_TIMEOUT,
            ),
            first_byte_timeout: c.positive_duration(
                "server.first_byte_timeout",
                self.first_byte_timeout.as_deref(),
                DEFAULT_FIRST_BYTE_TIMEOUT,
            ),
            idle_timeout: c.positive_duration(
                "server.idle_timeout",
                self.idle_timeout.as_deref(),
                DEFAULT_IDLE_TIMEOUT,
            ),
            send_timeout: c.positive_duration(
                "server.send_timeout",
                self.send_timeout.as_deref(),
                DEFAULT_SEND_TIMEOUT,
            ),
            max_requests_per_connection: match self.max_requests_per_connection {
                Some(0) => {
                    c.problem("server.max_requests_per_connection", "must be at least 1");
                    1
                }
                n => n.unwrap_or(DEFAULT_MAX_REQUESTS_PER_CONNECTION),
            },
            max_connections,
            admission: crate::admission::Limits {
                total: max_inflight,
                per_user: max_inflight_per_user,
            },
            shutdown_grace: c.duration(
                "server.shutdown_grace",
                self.shutdown_grace.as_deref(),
                DEFAULT_SHUTDOWN_GRACE,
            ),
            allowed_hosts,
        }
    }
}

/// The loopback names, plus the listen address when it is not a wildcard.
fn default_allowed_hosts(listen: SocketAddr) -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "[::1]".to_string(),
    ];
    let ip = listen.ip();
    if !ip.is_unspecified() && !ip.is_loopback() {
        hosts.push(match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        });
    }
    hosts
}

impl RawUpstream {
    fn validate(self, c: &mut Checker<'_>) -> UpstreamConfig {
        let url_text = self.url.as_deref().unwrap_or(DEFAULT_UPSTREAM_URL);
        let url = match url_text.parse::<Uri>() {
            Ok(u) => {
                let host = u.host().unwrap_or("").to_ascii_lowercase();
                let loopback = host == "localhost"
                    || host
                        .trim_matches(|ch| ch == '[' || ch == ']')
                        .parse::<IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                match u.scheme_str() {
                    Some("https") => {}
                    Some("http") if loopback => {}
                    Some("http") => c.problem(
                        "upstream.url",
                        "must be https: the session cookie must never cross a network in clear (plain http is allowed only to a loopback address)",
                    ),
                    _ => c.problem("upstream.url", format!("\"{url_text}\" is not an https:// URL")),
                }
                if u.authority().is_none() {
                    c.problem("upstream.url", format!("\"{url_text}\" has no host"));
                }
                if !matches!(u.path(), "" | "/") || u.query().is_some() {
                    c.problem(
                        "upstream.url",
                        "must be scheme and host only, e.g. \"https://knoq.one\"; client paths are appended",
                    );
                }
                u
            }
            Err(e) => {
                c.problem("upstream.url", format!("\"{url_text}\": {e}"));
                Uri::from_static(DEFAULT_UPSTREAM_URL)
            }
        };
        let origin_text = self.origin.as_deref().unwrap_or(DEFAULT_ORIGIN);
        let origin = HeaderValue::from_str(origin_text).unwrap_or_else(|_| {
            c.problem(
                "upstream.origin",
                "must be a valid header value, e.g. \"https://knoq.one\"",
            );
            HeaderValue::from_static(DEFAULT_ORIGIN)
        });
        let pool_max_idle = self.pool_max_idle.unwrap_or(DEFAULT_POOL_MAX_IDLE);
        let max_streams = self.max_streams.unwrap_or(DEFAULT_UPSTREAM_MAX_STREAMS);
        if max_streams == 0 {
            c.problem("upstream.max_streams", "must be at least 1");
        }
        let max_connections = self
            .max_connections
            .unwrap_or(DEFAULT_UPSTREAM_MAX_CONNECTIONS);
        if !(1..=64).contains(&max_connections) {
            c.problem("upstream.max_connections", "must be between 1 and 64");
        }
        UpstreamConfig {
            url,
            origin,
            ca_file: self.ca_file.as_deref().map(|p| c.path(p)),
            connect_timeout: c.positive_duration(
                "upstream.connect_timeout",
                self.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            timeout: c.positive_duration(
                "upstream.timeout",
                self.timeout.as_deref(),
                DEFAULT_UPSTREAM_TIMEOUT,
            ),
            pool_idle_timeout: c.positive_duration(
                "upstream.pool_idle_timeout",
                self.pool_idle_timeout.as_deref(),
                DEFAULT_POOL_IDLE_TIMEOUT,
            ),
            pool_max_idle,
            http2: self.http2.unwrap_or(true),
            max_streams,
            max_connections: max_connections.clamp(1, 64),
            queue_timeout: c.duration(
                "upstream.queue_timeout",
                self.queue_timeout.as_deref(),
                DEFAULT_UPSTREAM_QUEUE_TIMEOUT,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/kgw"))
    }

    /// The one problem of `text`, as `check` prints it.
    fn only_problem(text: &str) -> String {
        let err = parse(text).expect_err("the config has a problem");
        assert_eq!(err.problems.len(), 1, "{err}");
        err.problems[0].to_string()
    }

    fn user_and_token() -> String {
        format!("[[users]]\nname = \"a\"\ncookie_env = \"A\"\n[[tokens]]\nname = \"t\"\nuser = \"a\"\nsha256 = \"{HASH}\"\n")
    }

    #[test]
    fn one_url_is_one_server_and_a_list_is_a_clusters_seeds() {
        let store = |url: &str| {
            format!(
                "{}[store]\nkind = \"redis\"\nurl = {url}\nsecret_key_file = \"k\"\n",
                user_and_token()
            )
        };
        let urls = |text: &str| match parse(&store(text)).unwrap().store {
            StoreSettings::Redis(r) => r.url,
            StoreSettings::Local => panic!("redis expected"),
        };
        assert_eq!(
            urls("\"redis://10.0.0.1:6379/2\""),
            RedisUrls::Server("redis://10.0.0.1:6379/2".into())
        );
        assert_eq!(
            urls("[\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]"),
            RedisUrls::Cluster(vec![
                "redis://10.0.0.1:7000".into(),
                "redis://10.0.0.2:7000".into()
            ])
        );
        // A list of one is still a cluster: its other nodes are learned.
        assert!(matches!(
            urls("[\"rediss://10.0.0.1:7000\"]"),
            RedisUrls::Cluster(u) if u.len() == 1
        ));
        for (bad, says) in [
            ("[]", "lists no node"),
            (
                "[\"redis://a:7000\", \"redis://b:7000/3\"]",
                "node 2 names database 3",
            ),
            (
                "[\"redis://a:7000\", \"rediss://b:7000\"]",
                "mixes redis:// and rediss://",
            ),
            ("[\"redis://u:hunter2@a:7000\"]", "node 1: holds a password"),
            ("[\"http://a:7000\"]", "node 1: the scheme"),
        ] {
            let problem = only_problem(&store(bad));
            assert!(problem.starts_with("store.url:"), "{bad}: {problem}");
            assert!(problem.contains(says), "{bad}: {problem}");
            assert!(!problem.contains("hunter2"), "{problem}");
        }
    }

    #[test]
    fn the_redis_store_needs_a_key_and_local_share_needs_replicas() {
        let store = |extra: &str| {
            format!(
                "{}[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\n{extra}",
                user_and_token()
            )
        };
        let key = "secret_key_file = \"store.key\"\n";
        assert!(only_problem(&store("")).starts_with("store.secret_key_file:"));
        let c = parse(&store(&format!(
            "{key}on_error = \"local_share\"\nreplicas = 3\n"
        )))
        .unwrap();
        match c.store {
            StoreSettings::Redis(r) => {
                assert_eq!(r.on_error, OnStoreError::LocalShare { replicas: 3 });
                assert_eq!(r.secret_key_file, Path::new("/etc/kgw/store.key"));
            }
            StoreSettings::Local => panic!("redis expected"),
        }
        assert!(
            only_problem(&store(&format!("{key}on_error = \"local_share\"\n")))
                .starts_with("store.replicas:")
        );
        assert!(only_problem(&store(&format!(
            "{key}on_error = \"local_share\"\nreplicas = 0\n"
        )))
        .starts_with("store.replicas:"));
        let local = format!("{}[store]\nreplicas = 2\n", user_and_token());
        assert!(only_problem(&local).starts_with("store.replicas: applies only"));
    }

    #[test]
    fn an_unknown_key_is_named_by_its_path_with_the_closest_valid_one_on_one_line() {
        assert_eq!(
            only_problem("[server]\nmax_bdy = \"1MiB\"\n"),
            "server.max_bdy: unknown key (did you mean max_body?), line 2"
        );
        let two_users = "[[users]]\nname = \"a\"\ncookie_env = \"A\"\n[[users]]\nname = \"b\"\ncookei_env = \"B\"\n";
        assert_eq!(
            only_problem(two_users),
            "users[1].cookei_env: unknown key (did you mean cookie_env?), line 6"
        );
        let far = only_problem("[upstream]\nbanana = 1\n");
        assert!(
            far.starts_with("upstream.banana: unknown key (the keys here: url, "),
            "{far}"
        );
        assert!(!far.contains('\n'), "{far}");
    }

    #[test]
    fn quota_strings_and_durations_are_explained_in_their_own_terms() {
        let text = format!("[quotas]\nmessage = [\"60/mins\"]\n{}", user_and_token());
        let p = only_problem(&text);
        assert!(p.starts_with("quotas.message[0]: "), "{p}");
        assert!(
            p.contains("unknown unit \"mins\"; use sec, min, hour, day or month"),
            "{p}"
        );
        for key in ["timeout", "connect_timeout"] {
            let text = format!("[upstream]\n{key} = \"99999999999h\"\n{}", user_and_token());
            assert_eq!(
                only_problem(&text),
                format!("upstream.{key}: \"99999999999h\" is too long: at most \"1d\"")
            );
        }
        let text = format!("[circuit]\nopen_for = \"2d\"\n{}", user_and_token());
        assert_eq!(
            only_problem(&text),
            "circuit.open_for: \"2d\" is too long: at most \"1d\""
        );
    }

    fn keys(err: ConfigError) -> Vec<String> {
        err.problems.into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn empty_file_gets_every_default() {
        let c = parse("").unwrap();
        assert_eq!(c.server.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
        assert_eq!(c.server.max_body, 1 << 20);
        assert_eq!(c.upstream.url, "https://knoq.one");
        assert_eq!(c.upstream.origin, "https://knoq.one");
        assert_eq!(c.upstream.timeout, Duration::from_secs(60));
        assert_eq!(c.state.dir, Path::new("/etc/kgw/state"));
        assert_eq!(c.server.allowed_hosts, ["localhost", "127.0.0.1", "[::1]"]);
        assert!(c.users.is_empty() && c.tokens.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = parse("[server]\nlistn = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = parse(&format!(
            r#"
            [server]
            max_body = "lots"
            header_read_timeout = "0s"
            [upstream]
            url = "http://knoq.one"
            timeout = "60"
            [[users]]
            name = "alice"
            [[tokens]]
            name = "t"
            user = "bob"
            sha256 = "{HASH}"
            [[tokens]]
            name = "t"
            user = "alice"
            sha256 = "zz"
            "#
        ))
        .unwrap_err();
        assert_eq!(
            keys(err),
            [
                "server.max_body",
                "server.header_read_timeout",
                "upstream.url",
                "upstream.timeout",
                "tokens[0].user",
                "tokens[1].name",
                "tokens[1].sha256",
            ]
        );
    }

    #[test]
    fn paths_resolve_against_the_config_directory() {
        let c = parse(&format!(
            r#"
            [[users]]
            name = "alice"
            cookie_file = "secrets/alice.cookie"
            [[users]]
            name = "bob"
            cookie_env = "BOB_COOKIE"
            [[tokens]]
            name = "svc"
            user = "alice"
            sha256 = "{HASH}"
            "#
        ))
        .unwrap();
        assert_eq!(
            c.users[0].cookie,
            CookieSource::File("/etc/kgw/secrets/alice.cookie".into())
        );
        assert_eq!(c.users[1].cookie, CookieSource::Env("BOB_COOKIE".into()));
        assert_eq!(c.tokens[0].sha256[0], 0x9f);
        assert!(!c.tokens[0].scim);
    }

    #[test]
    fn plain_http_upstream_only_on_loopback() {
        assert!(parse("[upstream]\nurl = \"http://127.0.0.1:9999\"").is_ok());
        assert!(parse("[upstream]\nurl = \"http://localhost:9999\"").is_ok());
        assert_eq!(
            keys(parse("[upstream]\nurl = \"http://10.0.0.1\"").unwrap_err()),
            ["upstream.url"]
        );
        assert_eq!(
            keys(parse("[upstream]\nurl = \"https://knoq.one/api\"").unwrap_err()),
            ["upstream.url"]
        );
    }

    #[test]
    fn admin_port_never_equals_clients_port() {
        let err =
            parse("[server]\nlisten = \"127.0.0.1:7000\"\n[admin]\nlisten = \"127.0.0.1:7000\"")
                .unwrap_err();
        assert_eq!(keys(err), ["admin.listen"]);
    }

    #[test]
    fn scim_tokens_need_the_scim_token_file() {
        let err = parse(&format!(
            "[[users]]\nname = \"a\"\ncookie_env = \"A\"\n[[tokens]]\nname = \"idp\"\nuser = \"a\"\nsha256 = \"{HASH}\"\nscim = true\n"
        ))
        .unwrap_err();
        assert_eq!(keys(err), ["scim.token_file"]);
    }

    #[test]
    fn a_non_loopback_listen_address_is_an_allowed_host() {
        let c = parse("[server]\nlisten = \"10.1.2.3:8080\"").unwrap();
        assert!(c.server.allowed_hosts.contains(&"10.1.2.3".to_string()));
        let c = parse("[server]\nallowed_hosts = [\"GW.internal\"]").unwrap();
        assert_eq!(c.server.allowed_hosts, ["gw.internal"]);
    }

    #[test]
    fn quota_defaults_mirror_knoqs_published_limits() {
        let c = parse("").unwrap();
        let q = &c.quotas;
        let texts = |b: Bucket| {
            q.defaults[b as usize]
                .iter()
                .map(|w| w.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(Bucket::Message), ["60/min"]);
        assert_eq!(texts(Bucket::Session), ["10/min", "20/hour"]);
        assert_eq!(texts(Bucket::Cancel), ["30/min"]);
        assert!(texts(Bucket::Read).is_empty());
        assert_eq!(q.on_limit, OnLimit::Reject);
        assert_eq!(q.margin, Duration::from_millis(250));
    }

    #[test]
    fn quota_overrides_per_user_and_token_and_their_errors() {
        let c = parse(&format!(
            r#"
            [quotas]
            read = ["600/min"]
            on_limit = "wait"
            max_wait = "2s"
            [[users]]
            name = "alice"
            cookie_env = "A"
            quotas = {{ message = ["60/min", "5000/month"] }}
            [[tokens]]
            name = "batch"
            user = "alice"
            sha256 = "{HASH}"
            quotas = {{ message = ["10/min"] }}
            "#
        ))
        .unwrap();
        let user = &c.users[0].quotas[Bucket::Message as usize];
        assert_eq!(user.as_ref().unwrap().len(), 2);
        assert!(
            c.users[0].quotas[Bucket::Session as usize].is_none(),
            "defaults apply"
        );
        assert_eq!(
            c.tokens[0].quotas[Bucket::Message as usize]
                .as_ref()
                .unwrap()[0]
                .to_string(),
            "10/min"
        );
        assert_eq!(c.quotas.on_limit, OnLimit::Wait);

        let err = parse(
            "[quotas]\nmessage = [\"60/min\", \"10/min\"]\ncancel = [\"lots\"]\non_limit = \"panic\"\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(err),
            ["quotas.message[1]", "quotas.cancel[0]", "quotas.on_limit"]
        );
    }

    #[test]
    fn retry_and_circuit_defaults_and_their_checks() {
        let c = parse("").unwrap();
        assert_eq!(c.retry.attempts, 4);
        assert_eq!(c.retry.backoff.ceiling(1), Duration::from_millis(200));
        assert_eq!(c.retry.backoff.max(), Duration::from_secs(5));
        assert_eq!(c.retry.deadline, Duration::from_secs(30));
        assert_eq!((c.retry.budget, c.retry.budget_floor), (0.2, 10));
        assert_eq!(c.retry.reconcile_settle, Duration::from_secs(2));
        assert!(!c.retry.resend_unconfirmed);
        assert_eq!(
            (c.circuit.failures, c.circuit.open_for),
            (5, Duration::from_secs(10))
        );
        let err = parse(
            "[retry]\nattempts = 0\nbase_delay = \"2s\"\nmax_delay = \"1s\"\nbudget = -1.0\n[circuit]\nfailures = 0\n",
        )
        .unwrap_err();
        assert_eq!(
            keys(err),
            [
                "retry.attempts",
                "retry.max_delay",
                "retry.budget",
                "circuit.failures"
            ]
        );
    }

    #[test]
    fn example_config_parses_once_its_placeholder_digest_is_replaced() {
        let text = include_str!("../config/gateway.example.toml");
        // Untouched, it names the one thing left to do.
        let err = parse(text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "1 problem in the configuration:\n  - tokens[0].sha256: is the example's placeholder; make a token with `knoq-gateway token new` and paste the sha256 line it prints"
        );
        let edited = text.replace(&"0".repeat(64), HASH);
        let c = parse(&edited).unwrap_or_else(|e| panic!("example config: {e}"));
        assert!(!c.users.is_empty() && !c.tokens.is_empty());
    }

    #[test]
    fn a_user_without_cookie_source_takes_it_from_credentials_set() {
        let c = parse("[[users]]\nname = \"a\"\n").unwrap();
        assert_eq!(c.users[0].cookie, CookieSource::Stored);
    }

    #[test]
    fn token_expiry_is_a_date_or_a_time_and_nothing_else() {
        let with = |e: &str| {
            parse(&format!(
                "[[users]]\nname = \"a\"\n[[tokens]]\nname = \"t\"\nuser = \"a\"\nsha256 = \"{HASH}\"\nexpires = \"{e}\"\n"
            ))
        };
        let day = 86_400_000;
        let march = crate::clock::days_from_civil(2027, 3, 1) as u64 * day;
        assert_eq!(with("2027-03-01").unwrap().tokens[0].expires, Some(march));
        assert_eq!(
            with("2027-03-01T12:00:00Z").unwrap().tokens[0].expires,
            Some(march + day / 2)
        );
        assert_eq!(
            with("90d").unwrap_err().to_string(),
            "1 problem in the configuration:\n  - tokens[0].expires: \"90d\" is not a date (\"2027-03-01\", meaning 00:00 UTC) or an RFC 3339 time (\"2027-03-01T12:00:00Z\")"
        );
    }
}
