//! Assembly: the one place that turns a validated [`Config`] into the
//! running parts, for `serve`, for `check` (which changes no file) and for
//! every reload. Nothing else constructs a long-lived service.
//!
//! Two kinds of parts:
//! - **Services** ([`Services`]), long-lived: the clock, the metrics
//!   registry, the quota store, the `on_limit = "wait"` queues and the drain
//!   latch, built once at start-up; and the forwarder with its Knoq client
//!   (connection pool, circuit breaker, retry budget, recently confirmed
//!   sends), carried over by the rule below.
//! - **Stages**, per configuration: request hygiene, the token table, the
//!   credentials, the quota policy. Built anew from every config, around
//!   the services ([`Gateway`]).
//!
//! What a reload carries over, by explicit rules:
//!
//! | part | kept when | otherwise |
//! |---|---|---|
//! | quota store, wait queues, in-flight counters, metrics, clock, drain latch | always | `state.dir` applies after a restart (a warning says so) |
//! | forwarder: pool, circuit, retry budget, confirmed sends | `[upstream]`, `[retry]` and `[circuit]` are equal, and `upstream.ca_file` holds the same certificates | rebuilt from the new sections |
//! | a user's live credential (cookie, status, rotation lock) | its cookie source is the same | read from the new source |
//! | listen addresses, the clients' TLS files | bound at start-up | apply after a restart (a warning says so) |
//!
//! Every file a config names is read once per start, check or reload, and
//! every problem is reported at once, with its key.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use tokio_rustls::TlsAcceptor;

use crate::admission::Counters;
use crate::auth::{Principal, TokenTable};
use crate::clock::{Clock, Millis};
use crate::config::{Config, ConfigError, Problem};
use crate::cookie_vault::Vault;
use crate::credentials::Credentials;
use crate::forward::Forwarder;
use crate::inspect::HygieneRules;
use crate::knoq::Knoq;
use crate::metrics::Metrics;
use crate::pipeline::Gateway;
use crate::quota::carry::{Carry, CarryOver};
use crate::quota::{LocalStore, QuotaStore, Quotas, SharedQuotaStore, StoreTime, WaitQueues};
use crate::reconcile::Confirmed;
use crate::shared_store::{SharedStore, StoreSettings};
use crate::shutdown::Drain;
use crate::upstream::Upstream;

/// The parts that outlive any one configuration.
pub struct Services {
    pub clock: Arc<dyn Clock>,
    /// Requests in flight, in all and per account.
    pub inflight: Counters,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn QuotaStore>,
    /// The Redis every replica shares, when `[store] kind = "redis"`.
    pub shared: Option<Arc<SharedStore>>,
    /// Every account's cookie as the replicas share it (with `shared`).
    pub vault: Option<Arc<Vault>>,
    pub queues: WaitQueues,
    pub drain: Drain,
}

/// What start-up builds: the first gateway, its services, and the
/// clients' TLS acceptor (bound once).
pub struct Started {
    pub gateway: Gateway,
    pub services: Services,
    pub tls: Option<TlsAcceptor>,
    /// The state directory's quota, still to carry into Redis before
    /// serving (the first start on `kind = "redis"` after `local`).
    pub carry: Option<CarryOver>,
}

/// The files a config names, each read once.
struct Files {
    credentials: Option<Credentials>,
    server_tls: Option<Option<rustls::ServerConfig>>,
    client_tls: Option<ClientTls>,
}

/// The TLS config towards Knoq, with the `upstream.ca_file` certificates
/// it was built from (a reload compares them).
struct ClientTls {
    config: rustls::ClientConfig,
    ca: Vec<CertificateDer<'static>>,
}

/// Reads every file the config names, recording each problem.
fn read_files(config: &Config, problems: &mut Vec<Problem>) -> Files {
    let credentials = Credentials::load(config)
        .map_err(|p| problems.extend(p))
        .ok();
    let server_tls = match &config.server.tls {
        None => Some(None),
        Some(files) => crate::tls::server_config(files)
            .map_err(|e| problems.push(Problem::new("server.tls_key", e)))
            .ok()
            .map(Some),
    };
    Files {
        credentials,
        server_tls,
        client_tls: client_tls(config, problems),
    }
}

/// `upstream.ca_file`'s certificates (none when it is not set), read once.
fn ca_certs(config: &Config, problems: &mut Vec<Problem>) -> Option<Vec<CertificateDer<'static>>> {
    match config.upstream.ca_file.as_deref() {
        None => Some(Vec::new()),
        Some(path) => crate::tls::read_certs(path)
            .map_err(|e| problems.push(Problem::new("upstream.ca_file", e)))
            .ok(),
    }
}

fn client_tls_from(
    config: &Config,
    ca: Vec<CertificateDer<'static>>,
    problems: &mut Vec<Problem>,
) -> Option<ClientTls> {
    crate::tls::client_config_with(&ca, config.upstream.ca_file.as_deref())
        .map_err(|e| problems.push(Problem::new("upstream.ca_file", e)))
        .ok()
        .map(|config| ClientTls { config, ca })
}

fn client_tls(config: &Config, problems: &mut Vec<Problem>) -> Option<ClientTls> {
    let ca = ca_certs(config, problems)?;
    client_tls_from(config, ca, problems)
}

/// Checks everything start-up would, without changing any file (no state
/// directory is created, no journal compacted).
pub fn check(config: &Config) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let _ = read_files(config, &mut problems);
    if let Err(e) = LocalStore::inspect_dir(&config.state.dir) {
        problems.push(Problem::new("state.dir", e));
    }
    if let StoreSettings::Redis(settings) = &config.store {
        if let Err(e) = crate::cookie_vault::read_key(&settings.secret_key_file) {
            problems.push(Problem::new("store.secret_key_file", e));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.into())
    }
}

/// As [`check`], then the gateway `check --online` asks Knoq through. Its
/// quota store lives in memory: the journal belongs to a gateway that may
/// be running, and this process never writes it. What Knoq says back is
/// applied as a running gateway would: a rotated cookie is stored, a
/// rejected one recorded as expired (a running gateway picks either up).
pub fn for_online_check(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, ConfigError> {
    let mut problems = Vec::new();
    let files = read_files(&config, &mut problems);
    if let Err(e) = LocalStore::inspect_dir(&config.state.dir) {
        problems.push(Problem::new("state.dir", e));
    }
    let (Some(credentials), Some(_), Some(client_tls), true) = (
        files.credentials,
        files.server_tls,
        files.client_tls,
        problems.is_empty(),
    ) else {
        return Err(problems.into());
    };
    let margin = config.quotas.margin.as_millis() as Millis;
    let services = Services {
        clock,
        inflight: Counters::default(),
        metrics: Metrics::new(),
        store: Arc::new(LocalStore::in_memory(margin)),
        shared: None,
        vault: None,
        queues: WaitQueues::default(),
        drain: Drain::default(),
    };
    let forwarder = forwarder(&config, client_tls, &services);
    Ok(stages(Arc::new(config), &services, credentials, forwarder))
}

/// Builds everything for `serve`: reads every file, opens the quota store
/// (creating the state directory if needed), and the first gateway.
/// Binds nothing.
pub fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Started, ConfigError> {
    let mut problems = Vec::new();
    // Before anything reads a cookie: finish a rotation a crash cut short.
    if let Err(e) = crate::credentials::recover_interrupted_writes(&config.state.dir) {
        problems.push(Problem::new("state.dir", e));
    }
    let files = read_files(&config, &mut problems);
    let policy = config.quota_policy();
    // A config that cannot start leaves the state directory as it was.
    let store = if problems.is_empty() {
        open_store(&config, &policy, clock.now())
    } else {
        LocalStore::inspect_dir(&config.state.dir).map(|()| None)
    }
    .map_err(|e| {
        let key = match config.store {
            StoreSettings::Local => "state.dir",
            StoreSettings::Redis(_) => "store.url",
        };
        problems.push(Problem::new(key, e))
    })
    .ok()
    .flatten();
    let vault = match (&config.store, &store) {
        (StoreSettings::Redis(settings), Some((_, Some(shared), _))) => {
            crate::cookie_vault::read_key(&settings.secret_key_file)
                .map(|key| Some(Arc::new(Vault::new(shared.clone(), &key))))
                .map_err(|e| problems.push(Problem::new("store.secret_key_file", e)))
                .ok()
        }
        _ => Some(None),
    };
    let (Some(mut credentials), Some(server_tls), Some(client_tls), Some(store), Some(vault), true) = (
        files.credentials,
        files.server_tls,
        files.client_tls,
        store,
        vault,
        problems.is_empty(),
    ) else {
        return Err(problems.into());
    };
    let (store, shared, carry) = store;
    if let Some(vault) = &vault {
        credentials.share_through(vault.clone());
    }
    let metrics = Metrics::new();
    if let Some(shared) = &shared {
        metrics.register(shared.collectors());
    }
    let services = Services {
        clock,
        inflight: Counters::default(),
        metrics,
        store,
        shared,
        vault,
        queues: WaitQueues::default(),
        drain: Drain::default(),
    };
    let forwarder = forwarder(&config, client_tls, &services);
    let gateway = stages(Arc::new(config), &services, credentials, forwarder);
    Ok(Started {
        gateway,
        services,
        tls: server_tls.map(|c| TlsAcceptor::from(Arc::new(c))),
        carry,
    })
}

/// Builds the gateway for a reloaded config around the running services,
/// or changes nothing and returns every problem.
pub fn reload(old: &Gateway, services: &Services, config: Config) -> Result<Gateway, ConfigError> {
    let before = &old.config;
    let mut problems = Vec::new();
    let credentials = Credentials::reload(&config, &old.credentials)
        .map_err(|p| problems.extend(p))
        .ok();
    // The CA file is read at every reload: new contents under the same
    // name (a rotated upstream certificate) need a new client too.
    let ca = ca_certs(&config, &mut problems);
    let same_upstream = before.upstream == config.upstream
        && before.retry == config.retry
        && before.circuit == config.circuit
        && ca.as_ref() == Some(&old.forwarder.knoq.ca);
    let forwarder = match ca {
        Some(_) if same_upstream => Some(old.forwarder.clone()),
        Some(ca) => {
            if before.upstream == config.upstream {
                tracing::info!(
                    "upstream.ca_file changed; new connections to Knoq trust its new contents"
                );
            }
            client_tls_from(&config, ca, &mut problems).map(|tls| forwarder(&config, tls, services))
        }
        None => None,
    };
    let (Some(credentials), Some(forwarder), true) = (credentials, forwarder, problems.is_empty())
    else {
        return Err(problems.into());
    };
    if before.log.level != config.log.level {
        // Checked when the file was parsed; applied as the reload lands.
        if let Err(e) = crate::logging::set_level(&config.log.level) {
            return Err(vec![Problem::new("log.level", e)].into());
        }
        tracing::info!(level = %config.log.level, "log level changed");
    }
    Ok(stages(Arc::new(config), services, credentials, forwarder))
}

/// The keys whose new value in `new` only a restart applies: what was
/// bound or opened at start-up (`running` is the config the process
/// started with).
pub fn restart_keys(running: &Config, new: &Config) -> Vec<&'static str> {
    [
        ("server.listen", running.server.listen != new.server.listen),
        ("admin.listen", running.admin.listen != new.admin.listen),
        ("server.tls_cert", running.server.tls != new.server.tls),
        ("state.dir", running.state.dir != new.state.dir),
        ("store", running.store != new.store),
        ("log.format", running.log.format != new.log.format),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

/// A quota store, and the shared Redis behind it when there is one.
type OpenedStore = (
    Arc<dyn QuotaStore>,
    Option<Arc<SharedStore>>,
    Option<CarryOver>,
);

/// The quota store the config asks for: the state directory's journalled
/// store, or the Redis every replica shares (connected lazily: a Redis
/// that is away at start-up is reported, not fatal).
fn open_store(
    config: &Config,
    policy: &crate::quota::Policy,
    now: Millis,
) -> Result<Option<OpenedStore>, String> {
    let margin = config.quotas.margin.as_millis() as Millis;
    match &config.store {
        StoreSettings::Local => {
            let store = LocalStore::open_dir(&config.state.dir, policy, margin, now)?;
            Ok(Some((Arc::new(store), None, None)))
        }
        StoreSettings::Redis(settings) => {
            let shared = Arc::new(SharedStore::connect(settings)?);
            let store = Arc::new(SharedQuotaStore::new(
                shared.clone(),
                margin,
                StoreTime::Server,
            ));
            // A state directory that ran on `local`: its quota goes into
            // Redis before anything is served.
            let carry =
                Carry::pending(&config.state.dir, policy, margin, now)?.map(|carry| CarryOver {
                    carry,
                    store: store.clone(),
                    policy: policy.clone(),
                });
            Ok(Some((store, Some(shared), carry)))
        }
    }
}

/// The forwarder and its Knoq client for the `[upstream]`, `[retry]` and
/// `[circuit]` sections.
fn forwarder(config: &Config, tls: ClientTls, services: &Services) -> Arc<Forwarder> {
    let knoq = Knoq::new(
        Upstream::new(&config.upstream, tls.config),
        tls.ca,
        (
            config.upstream.max_streams * config.upstream.max_connections,
            config.upstream.queue_timeout,
        ),
        config.upstream.origin.clone(),
        &config.circuit,
        services.metrics.clone(),
        services.clock.clone(),
    );
    Arc::new(Forwarder::new(
        knoq,
        config.retry.clone(),
        services.clock.clone(),
        services.metrics.clone(),
        services.drain.clone(),
        Confirmed::new(services.shared.clone()),
    ))
}

/// The per-configuration stages around the services.
fn stages(
    config: Arc<Config>,
    services: &Services,
    credentials: Credentials,
    forwarder: Arc<Forwarder>,
) -> Gateway {
    let policy = config.quota_policy();
    // A reload may add or lengthen windows: the store must keep what the
    // new ones need.
    services.store.adopt_policy(&policy);
    let tokens = TokenTable::new(config.tokens.iter().map(|t| {
        let principal = Principal {
            token: t.name.as_str().into(),
            user: t.user.as_str().into(),
            scim: t.scim,
        };
        (t.sha256, principal, t.expires)
    }));
    Gateway {
        hygiene: HygieneRules {
            max_header_bytes: config.server.max_header_bytes,
            allowed_hosts: config.server.allowed_hosts.clone(),
        },
        max_body: config.server.max_body,
        tokens,
        credentials: Arc::new(credentials),
        forwarder,
        quotas: Quotas::new(
            policy,
            services.store.clone(),
            services.queues.clone(),
            services.clock.clone(),
            &config.quotas,
        ),
        clock: services.clock.clone(),
        admission: (services.inflight.clone(), config.server.admission),
        config,
        metrics: services.metrics.clone(),
    }
}
