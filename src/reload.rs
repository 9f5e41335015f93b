//! The live gateway and its reloads.
//!
//! [`Live`] holds the current [`Gateway`] behind an `Arc`: each request
//! takes a clone when it starts and finishes with the configuration it
//! started with, however many reloads happen meanwhile; no connection is
//! dropped. A reload (SIGHUP, or the config file changing on disk) builds a
//! complete new gateway from the new file, or rejects the file as a whole:
//! the old gateway stays in force, the problems are logged with their key
//! paths, and `/readyz` reports the failed reload.
//!
//! What is built, and what carries over from the running gateway, is
//! decided in one place, `assemble.rs` (its module doc has the rules);
//! this module only watches for reasons to reload and swaps the result in.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use hyper::body::Incoming;

use crate::assemble::{self, Services};
use crate::body::BoxBody;
use crate::config::{Config, ConfigError};
use crate::pipeline::Gateway;
use crate::server::Handler;

/// How often the config file is checked for changes.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// How often every shared cookie is re-read while notices are quiet.
const RESYNC_EVERY: Duration = Duration::from_secs(5);

/// The pause before subscribing again after the subscription broke.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);

pub struct Live {
    current: RwLock<Arc<Gateway>>,
    /// The config file's stamp when the running config was read from it.
    loaded: Mutex<Option<(SystemTime, u64)>>,
    /// What outlives every configuration (store, metrics, drain latch).
    services: Services,
    /// The last failed reload's problems, cleared by a successful one.
    failed: Mutex<Option<String>>,
    /// The config the process started with: what was bound at start-up.
    booted: Arc<Config>,
    /// Keys of the running config that differ from `booted` and wait for
    /// a restart.
    pending: Mutex<Vec<&'static str>>,
    prober: crate::probe::Prober,
}

impl Live {
    pub fn new(gateway: Gateway, services: Services) -> Self {
        let loaded = gateway.config.source.as_ref().and_then(stamp);
        let booted = gateway.config.clone();
        Live {
            booted,
            pending: Mutex::new(Vec::new()),
            current: RwLock::new(Arc::new(gateway)),
            loaded: Mutex::new(loaded),
            services,
            failed: Mutex::new(None),
            prober: crate::probe::Prober::default(),
        }
    }

    /// The long-lived services every configuration shares.
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// The gateway new requests use.
    pub fn current(&self) -> Arc<Gateway> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the last reload was rejected, while no later one succeeded.
    pub fn failed_reload(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Settings changed in the running config that only a restart applies.
    pub fn pending_restart(&self) -> Vec<&'static str> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Builds a gateway from `config` and makes it current, or changes
    /// nothing and returns every problem.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        let old = self.current();
        let restart = assemble::restart_keys(&self.booted, &config);
        let result = assemble::reload(&old, &self.services, config);
        let label = if result.is_ok() { "success" } else { "failure" };
        self.services
            .metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(gateway) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(gateway);
                *failed = None;
                tracing::info!("configuration reloaded");
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                if restart != *pending && !restart.is_empty() {
                    tracing::warn!(
                        keys = %restart.join(","),
                        "these settings changed but apply only after a restart"
                    );
                }
                *pending = restart;
                Ok(())
            }
            Err(e) => {
                *failed = Some(e.to_string());
                tracing::error!(error = %e, "configuration reload rejected; the previous configuration stays in force");
                Err(e)
            }
        }
    }

    /// Reads `path` and reloads from it; a file that does not parse is a
    /// rejected reload like any other.
    pub fn reload_file(&self, path: &Path) -> Result<(), ConfigError> {
        match Config::load(path) {
            Ok(mut config) => {
                config.source = Some(path.to_path_buf());
                self.reload(config)
            }
            Err(e) => {
                self.services
                    .metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                tracing::error!(error = %e, "configuration reload rejected; the previous configuration stays in force");
                Err(e)
            }
        }
    }

    /// Probes idle accounts (`probe` in `[[users]]`) until `stop` resolves.
    /// Its own task, so a slow probe never delays a reload.
    pub async fn probe_loop(self: Arc<Self>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(WATCH_EVERY) => {
                    let gateway = self.current();
                    self.prober.run_due(&gateway).await;
                }
            }
        }
    }

    /// Reloads on SIGHUP and when the config file changes, and refreshes
    /// cookies changed on disk, until `stop` resolves.
    /// With a shared store: follows the other replicas' cookie changes
    /// until `stop` resolves. Each notice names an account, brought in
    /// line at once; after every (re)subscription, and every
    /// [`RESYNC_EVERY`] besides, every account is re-read, since pub/sub
    /// drops what it sends while the subscriber is away.
    pub async fn follow_shared_cookies(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let Some(vault) = self.services.vault.clone() else {
            return stop.await;
        };
        let follow = async {
            loop {
                let mut notices = match vault.store().subscribe(vault.channel()).await {
                    Ok(pubsub) => pubsub.into_on_message(),
                    Err(_) => {
                        // The store's own health line says Redis is away.
                        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
                        continue;
                    }
                };
                self.current().credentials.sync_shared(None).await;
                loop {
                    tokio::select! {
                        notice = futures_util::StreamExt::next(&mut notices) => match notice {
                            Some(msg) => {
                                let account: String = msg.get_payload().unwrap_or_default();
                                self.current().credentials.sync_shared(Some(&account)).await;
                            }
                            None => break,
                        },
                        () = tokio::time::sleep(RESYNC_EVERY) => {
                            self.current().credentials.sync_shared(None).await;
                        }
                    }
                }
                tokio::time::sleep(RESUBSCRIBE_AFTER).await;
            }
        };
        tokio::select! {
            () = stop => {}
            () = follow => {}
        }
    }

    pub async fn watch(self: Arc<Self>, path: Option<PathBuf>, stop: impl Future<Output = ()>) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        tokio::pin!(stop);
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let reload = tokio::select! {
                () = &mut stop => break,
                () = hangup => {
                    tracing::info!("SIGHUP received; reloading the configuration");
                    true
                }
                () = tokio::time::sleep(WATCH_EVERY) => {
                    let now = path.as_ref().and_then(stamp);
                    let mut seen = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
                    let changed = now.is_some() && now != *seen;
                    *seen = now;
                    changed
                }
            };
            if reload {
                match &path {
                    Some(p) => {
                        // The version being read now is the one loaded: a
                        // SIGHUP after an edit must not make the next look
                        // at the file reload the same edit again.
                        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamp(p);
                        crate::service::reloading();
                        let _ = self.reload_file(p);
                        crate::service::reloaded();
                    }
                    None => tracing::warn!("no config file to reload from"),
                }
            }
            self.current().credentials.refresh().await;
        }
    }
}

/// What identifies a version of the file: modification time and length.
fn stamp(path: impl AsRef<Path>) -> Option<(SystemTime, u64)> {
    let path = path.as_ref();
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Handler for Live {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> impl Future<Output = Response<BoxBody>> + Send {
        let gateway = self.current();
        async move { gateway.handle(req, peer).await }
    }
}
