//! The credential store: each user's Knoq session cookie, its lifecycle
//! (rotation by Knoq's `Set-Cookie`, expiry on Knoq's 401, replacement by an
//! operator), and Knoq's SCIM token.
//!
//! Where a cookie comes from, in order of precedence:
//! 1. the state copy, `<state.dir>/credentials/<user>.json`, written when
//!    Knoq rotates the cookie or an operator runs `credentials set`, as long
//!    as it was made from the current source value;
//! 2. the source the config names (`cookie_file` or `cookie_env`); a
//!    `[[users]]` entry that names neither takes its cookie only from
//!    `credentials set`.
//!
//! A `cookie_file` is looked at about once a second. When it becomes
//! unusable (deleted, made readable by others, holding no cookie) the
//! account keeps the cookie it has, but the next start would fail: that is
//! logged once at error level when it happens (and once more when it is
//! fixed), and shown as the user's `source_problem` in `credentials status`,
//! `/readyz` and `knoq_gateway_problems`.
//!
//! Each state copy records the SHA-256 of the source value it superseded, so
//! when the operator puts a new cookie in `cookie_file`, the new one wins.
//!
//! Readers take a cheap clone of a `HeaderValue` (reference-counted bytes)
//! under a short read lock, never held across an `.await`. A writer
//! validates the new value, persists it atomically and durably
//! (`state::write_atomic`), and only then publishes it, so the next request
//! for that user carries it and a crash at any moment leaves the old or the
//! new cookie on disk, never a torn one. Every value is marked sensitive,
//! and nothing here prints a secret, in `Debug` or in a message.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::clock::Millis;
use crate::config::{Config, CookieSource, Problem};
use crate::cookie_vault::{Cas, Shared, Vault, VaultError};
use crate::cookies;
use crate::secrets::{read_secret_file, read_secret_line};

const STATE_SUBDIR: &str = "credentials";

/// A state copy made by `credentials set` for a source the CLI could not
/// read the way the gateway does (an environment variable, or a file the
/// CLI's user cannot read): it applies whatever the source holds.
const OPERATOR: &str = "operator";

/// What identifies one version of a file: modification time and inode (a
/// rename gives a new inode even within the same clock tick).
type Stamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.ino()))
}

/// What the operator and `/readyz` see of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CredentialState {
    /// Knoq accepted it on the last request.
    Valid,
    /// Knoq answered 401 with it: a human must provide a new one.
    Expired,
    /// The gateway has no cookie for this user.
    Missing,
    /// Not used since the gateway started.
    Unchecked,
}

/// Where the cookie in use came from (or, while there is none, where it
/// is expected from).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    File,
    Env,
    State,
}

/// A user's credential as the status views see it (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserStatus {
    pub user: String,
    pub state: CredentialState,
    /// Unix milliseconds of the last request Knoq accepted.
    pub last_success: Option<Millis>,
    /// Unix milliseconds of the last rotation or `credentials set`.
    pub last_rotation: Option<Millis>,
    pub source: Origin,
    /// Why that source is in force, or what to do while there is none.
    #[serde(default)]
    pub why: String,
    /// What is wrong with the configured source now (the next start would
    /// fail), while the account keeps the cookie it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_problem: Option<String>,
    /// With a shared store: the generation of the shared cookie this
    /// replica uses (0 before the first is stored); every replica shows
    /// the same number once a change has reached it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_generation: Option<u64>,
}

/// The state copy of one user's cookie, as stored on disk.
#[derive(Serialize, Deserialize)]
struct StateFile {
    cookie: String,
    /// SHA-256 (hex) of the source value this copy supersedes.
    source_sha256: String,
    rotated_at: Option<Millis>,
    #[serde(default)]
    expired: bool,
    /// One more than the copy it replaced: tells a newer copy left in a
    /// temporary file by a crash from an older one (0 before it existed).
    #[serde(default)]
    generation: u64,
}

#[derive(Debug, Default)]
struct Status {
    expired: bool,
    last_success: Option<Millis>,
    last_rotation: Option<Millis>,
    from_state: bool,
    /// Identity of the state file we last read or wrote.
    state_mtime: Option<Stamp>,
    /// Why the configured source cannot be used now (reported once).
    source_problem: Option<String>,
    source_sha256: String,
    /// With a shared store: the generation of the shared record the
    /// cookie in use matches (0: none yet), that record's source and
    /// retired sources, and a change made here that the record lacks.
    shared_gen: u64,
    shared_source: String,
    shared_retired: Vec<String>,
    pending: Option<Pending>,
    /// Why the shared record could not be used (reported once).
    shared_problem: Option<String>,
    /// A rotation Knoq sent this replica that lost the race to another
    /// replica's write of one at the same time. Which of the two Knoq
    /// issued last cannot be told from here: if Knoq refuses the winner,
    /// this one is tried once before calling it an expiry.
    runner_up: Option<HeaderValue>,
}

/// A change made by this replica that the shared record does not have yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// A rotation or an expiry, made on top of generation `shared_gen`:
    /// written unless another replica wrote meanwhile (then theirs wins).
    Local,
    /// A source value this replica has (at start-up, or a `cookie_file`
    /// edit): written unless the record already descends from it or an
    /// operator has replaced it.
    Source,
    /// `credentials set`: always written.
    Operator,
}

/// One user's cookie, where it came from, and how it is doing.
pub struct UserCredential {
    name: String,
    cookie: RwLock<Option<HeaderValue>>,
    source: CookieSource,
    status: Mutex<Status>,
    /// Serialises writers (rotation, reload) for this user.
    writer: tokio::sync::Mutex<()>,
    /// Exchanges with Knoq in flight as this user, and a wake-up when one
    /// ends: a 401 waits for them (see `mark_expired`).
    sending: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

impl fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserCredential")
            .field("user", &self.name)
            .field("source", &self.source)
            .field("present", &self.cookie().is_some())
            .finish()
    }
}

impl UserCredential {
    fn cookie(&self) -> Option<HeaderValue> {
        self.cookie
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, cookie: HeaderValue) {
        *self.cookie.write().unwrap_or_else(|p| p.into_inner()) = Some(cookie);
    }
}

/// How long a 401 waits for the user's other exchanges in flight before it
/// counts as an expiry (one of them may bring Knoq's rotated cookie).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// An exchange with Knoq in flight as one user ([`Credentials::sending`]).
pub struct Sending(Arc<UserCredential>);

impl Drop for Sending {
    fn drop(&mut self) {
        self.0
            .sending
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.settled.notify_waiters();
    }
}

/// Every user's cookie, and the SCIM bearer header when configured.
pub struct Credentials {
    users: HashMap<Arc<str>, Arc<UserCredential>>,
    scim_bearer: Option<HeaderValue>,
    state_dir: PathBuf,
    /// The copy every replica shares (`[store] kind = "redis"`).
    vault: Option<Arc<Vault>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users)
            .field("scim", &self.scim_bearer.is_some())
            .finish()
    }
}

// === impl Credentials ===

impl Credentials {
    /// Loads every cookie and the SCIM token, reporting every problem.
    pub fn load(config: &Config) -> Result<Credentials, Vec<Problem>> {
        Self::load_with(config, |name| std::env::var(name).ok(), None)
    }

    /// As [`load`](Self::load) for a reload: users whose cookie source did
    /// not change keep their live credential (cookie, status, writer lock),
    /// so a rotation in progress during the reload is not lost; and a
    /// cookie file that does not exist leaves that user `missing` (503 for
    /// its requests, `/readyz` naming it) instead of refusing the reload.
    pub fn reload(config: &Config, previous: &Credentials) -> Result<Credentials, Vec<Problem>> {
        Self::load_with(config, |name| std::env::var(name).ok(), Some(previous))
    }

    /// As [`load`](Self::load), with the environment passed in (tests).
    pub fn load_with(
        config: &Config,
        env: impl Fn(&str) -> Option<String>,
        previous: Option<&Credentials>,
    ) -> Result<Credentials, Vec<Problem>> {
        let state_dir = config.state.dir.join(STATE_SUBDIR);
        let mut problems = Vec::new();
        let mut users = HashMap::new();
        for (i, user) in config.users.iter().enumerate() {
            if let Some(kept) = previous
                .and_then(|p| p.users.get(user.name.as_str()))
                .filter(|c| c.source == user.cookie)
            {
                users.insert(user.name.as_str().into(), kept.clone());
                continue;
            }
            let state = match read_state(&state_dir, &user.name) {
                Ok(state) => state,
                Err(message) => {
                    problems.push(Problem::new("state.dir", message));
                    continue;
                }
            };
            let cred = Arc::new(UserCredential {
                name: user.name.clone(),
                cookie: RwLock::new(None),
                source: user.cookie.clone(),
                status: Mutex::new(Status::default()),
                writer: tokio::sync::Mutex::new(()),
                sending: std::sync::atomic::AtomicUsize::new(0),
                settled: tokio::sync::Notify::new(),
            });
            let Some((key, raw)) = source_value(i, &user.cookie, &env) else {
                adopt(&cred, None, state);
                if cred.cookie().is_none() {
                    tracing::warn!(user = %user.name, "no cookie yet; run `knoq-gateway credentials set {}`", user.name);
                }
                cred.status().pending = Some(Pending::Source);
                users.insert(user.name.as_str().into(), cred);
                continue;
            };
            cred.status().pending = Some(Pending::Source);
            match raw.and_then(|text| parse_cookie(&text).map(|c| (sha256_hex(&text), c))) {
                Ok(source) => adopt(&cred, Some(source), state),
                // On a reload, a missing source is a missing cookie, unless
                // a stored copy still applies; the next start would fail.
                Err(message) if previous.is_some() && is_missing(&user.cookie, &env) => {
                    adopt(&cred, None, state);
                    tracing::error!(user = %user.name, problem = %message, "the cookie source is missing; the next start will fail until it is provided");
                    cred.status().source_problem = Some(message);
                }
                Err(message) => {
                    problems.push(Problem::new(key, message));
                    continue;
                }
            }
            users.insert(user.name.as_str().into(), cred);
        }
        let scim_bearer = match &config.scim.token_file {
            None => None,
            Some(path) => match read_secret_line(path).and_then(|t| scim_bearer(&t)) {
                Ok(v) => Some(v),
                Err(message) => {
                    problems.push(Problem::new("scim.token_file", message));
                    None
                }
            },
        };
        if problems.is_empty() {
            Ok(Credentials {
                users,
                scim_bearer,
                state_dir,
                vault: previous.and_then(|p| p.vault.clone()),
            })
        } else {
            Err(problems)
        }
    }

    /// Shares every cookie through `vault` from now on (set once, at
    /// start-up; reloads keep it).
    pub fn share_through(&mut self, vault: Arc<Vault>) {
        self.vault = Some(vault);
    }

    /// The user's current cookie, or `None` when it is missing.
    pub fn cookie(&self, user: &str) -> Option<HeaderValue> {
        self.users.get(user).and_then(|c| c.cookie())
    }

    /// Marks an exchange with Knoq as `user` in flight until the guard is
    /// dropped (after its `Set-Cookie` lines were applied).
    pub fn sending(&self, user: &str) -> Option<Sending> {
        let cred = self.users.get(user)?.clone();
        cred.sending
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(Sending(cred))
    }

    /// Whether the user has a cookie now (no copy of it taken).
    pub fn has_cookie(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|c| {
            c.cookie
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .is_some()
        })
    }

    /// `Bearer <scim token>`, when configured.
    pub fn scim_bearer(&self) -> Option<&HeaderValue> {
        self.scim_bearer.as_ref()
    }

    pub fn is_expired(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|c| c.status().expired)
    }

    /// Knoq accepted a request made with the user's cookie.
    pub fn mark_success(&self, user: &str, now: Millis) {
        if let Some(c) = self.users.get(user) {
            c.status().last_success = Some(now);
        }
    }

    /// Knoq answered 401 to a request that carried `sent`. Marks the user
    /// expired if `sent` is still the current cookie and returns `true`;
    /// returns `false` when the cookie has been replaced meanwhile (the
    /// 401 is stale, and the caller may try again with the new one).
    pub async fn mark_expired(&self, user: &str, sent: &HeaderValue) -> bool {
        let Some(cred) = self.users.get(user) else {
            return false;
        };
        // Knoq may have rotated the cookie in an answer to another request
        // still on its way: it refuses the old cookie at once, so this 401
        // may come before that answer. Let the exchanges in flight land
        // (briefly) before calling it an expiry.
        let deadline = tokio::time::Instant::now() + SETTLE;
        while cred.sending.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            let settled = cred.settled.notified();
            if cred.sending.load(std::sync::atomic::Ordering::SeqCst) == 0
                || tokio::time::timeout_at(deadline, settled).await.is_err()
            {
                break;
            }
        }
        let _w = cred.writer.lock().await;
        self.adopt_if_replaced(cred);
        // Another replica may have stored Knoq's new cookie: resend once.
        self.sync_locked(cred).await;
        if cred.cookie().as_ref() != Some(sent) {
            return false;
        }
        let runner_up = cred.status().runner_up.take();
        if let Some(candidate) = runner_up.filter(|c| c != sent) {
            tracing::info!(
                user,
                "Knoq refused the cookie another replica stored while this one stored its own rotation; resending once with this replica's"
            );
            let rotated = cred.status().last_rotation;
            if let Err(e) = self.persist(cred, &candidate, rotated, false).await {
                tracing::warn!(user, error = %e, "cannot keep the cookie in the state directory");
            }
            cred.publish(candidate);
            cred.status().pending = Some(Pending::Local);
            self.sync_locked(cred).await;
            return false;
        }
        let newly = {
            let mut s = cred.status();
            let newly = !s.expired;
            s.expired = true;
            newly
        };
        if newly {
            tracing::warn!(
                user,
                "Knoq rejected the session cookie; requests for this user now fail fast until `knoq-gateway credentials set {user}` provides a new one"
            );
            // Remember it across restarts and for `credentials status`.
            if let Err(e) = self.persist(cred, sent, None, true).await {
                tracing::error!(user, error = %e, "cannot record the expired cookie in the state directory");
            }
            // And tell every replica.
            cred.status().pending = Some(Pending::Local);
            self.sync_locked(cred).await;
        }
        true
    }

    /// Applies Knoq's `Set-Cookie` lines for `user`: the merged cookie is
    /// persisted, then published, before this returns. `true` if the
    /// cookie changed.
    pub async fn apply_set_cookies(&self, user: &str, lines: &[HeaderValue], now: Millis) -> bool {
        let Some(cred) = self.users.get(user) else {
            return false;
        };
        let changes: Vec<cookies::SetCookie> = lines
            .iter()
            .filter_map(|l| l.to_str().ok())
            .filter_map(|l| cookies::parse_set_cookie(l, now))
            .collect();
        if changes.len() < lines.len() {
            // Never the line itself: it holds a cookie.
            tracing::warn!(
                user,
                ignored = lines.len() - changes.len(),
                "Knoq sent a Set-Cookie line that is not a plain name=value pair of cookie characters; it was not applied"
            );
        }
        if changes.is_empty() {
            return false;
        }
        let _w = cred.writer.lock().await;
        if self.adopt_if_replaced(cred) {
            // An operator's new cookie arrived meanwhile: it wins.
            return false;
        }
        let Some(current) = cred.cookie() else {
            return false;
        };
        let merged = cookies::merge(current.to_str().unwrap_or_default(), &changes);
        if merged == current.to_str().unwrap_or_default() {
            return false;
        }
        let new = match parse_cookie(&merged) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(user, error = %e, "ignoring a Set-Cookie that would leave an unusable cookie");
                return false;
            }
        };
        match self.persist(cred, &new, Some(now), false).await {
            Ok(()) => {
                cred.publish(new);
                let mut s = cred.status();
                s.last_rotation = Some(now);
                s.expired = false;
                s.from_state = true;
                tracing::info!(user, "Knoq rotated the session cookie; stored and in use");
            }
            Err(e) => {
                // Still use it: the old one may already be dead at Knoq.
                cred.publish(new);
                tracing::error!(user, error = %e, "Knoq rotated the session cookie but the gateway cannot store it; a restart would fall back to the old one");
            }
        }
        // Every replica needs it now: Knoq refuses the old one already.
        cred.status().pending = Some(Pending::Local);
        self.sync_locked(cred).await;
        true
    }

    /// If the state file was replaced by someone else (`credentials set`)
    /// since we last read or wrote it, takes its cookie. `true` if it did.
    /// A copy that does not apply, or cannot be used, is noted (and
    /// reported once) so it is not read again until it changes. Called
    /// with the user's writer lock held.
    fn adopt_if_replaced(&self, cred: &UserCredential) -> bool {
        let path = state_path(&self.state_dir, &cred.name);
        let now = stamp(&path);
        if now.is_none() || now == cred.status().state_mtime {
            return false;
        }
        cred.status().state_mtime = now;
        let file = match read_state(&self.state_dir, &cred.name) {
            Ok(Some((file, _))) => file,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(user = %cred.name, error = %e, "cannot read the stored cookie; keeping the current one");
                return false;
            }
        };
        let digest = cred.status().source_sha256.clone();
        if file.source_sha256 != digest && file.source_sha256 != OPERATOR {
            return false;
        }
        let cookie = match parse_cookie(&file.cookie) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(user = %cred.name, error = %e, "the stored cookie is unusable; keeping the current one");
                return false;
            }
        };
        cred.publish(cookie);
        let mut s = cred.status();
        s.pending = Some(Pending::Operator);
        if s.expired && !file.expired {
            tracing::info!(user = %cred.name, "a new cookie was set; requests for this user go to Knoq again");
        }
        s.expired = file.expired;
        s.last_rotation = file.rotated_at;
        s.from_state = true;
        true
    }

    /// Writes the user's state copy (atomically, durably) and remembers its
    /// modification time so the poller does not re-read our own write.
    async fn persist(
        &self,
        cred: &UserCredential,
        cookie: &HeaderValue,
        rotated_at: Option<Millis>,
        expired: bool,
    ) -> std::io::Result<()> {
        let (source_sha256, rotated_at) = {
            let s = cred.status();
            (s.source_sha256.clone(), rotated_at.or(s.last_rotation))
        };
        let path = state_path(&self.state_dir, &cred.name);
        let file = StateFile {
            cookie: cookie.to_str().unwrap_or_default().to_string(),
            source_sha256,
            rotated_at,
            expired,
            generation: generation_of(&path) + 1,
        };
        // Someone else (`credentials set`) wrote the file since we last
        // looked: theirs wins, and ours must not overwrite it.
        let known = cred.status().state_mtime;
        if path.exists() && stamp(&path) != known {
            return Err(std::io::Error::other(
                "the stored cookie was replaced meanwhile",
            ));
        }
        let dir = self.state_dir.clone();
        let text = serde_json::to_vec(&file).expect("a state file always serialises");
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Stamp>> {
            crate::state::ensure_dir(&dir)?;
            crate::state::write_atomic(&path, &text)?;
            Ok(stamp(&path))
        })
        .await
        .map_err(std::io::Error::other)??;
        cred.status().state_mtime = written;
        Ok(())
    }

    /// Picks up what changed on disk since the last look: a state copy
    /// written by `credentials set`, or a new value in a `cookie_file`.
    /// Called about once a second by the gateway.
    pub async fn refresh(&self) {
        for cred in self.users.values() {
            let _w = cred.writer.lock().await;
            // The operator's file changed: its new cookie wins.
            if let CookieSource::File(path) = &cred.source {
                let problem = match read_secret_line(path) {
                    Err(e) => Some(e),
                    Ok(text) if sha256_hex(&text) == cred.status().source_sha256 => None,
                    Ok(text) => match parse_cookie(&text) {
                        Ok(cookie) => {
                            cred.publish(cookie);
                            let mut s = cred.status();
                            (s.source_sha256, s.expired, s.from_state) =
                                (sha256_hex(&text), false, false);
                            s.pending = Some(Pending::Source);
                            tracing::info!(user = %cred.name, "cookie_file changed; using the new cookie");
                            None
                        }
                        Err(e) => Some(format!("{}: {e}", path.display())),
                    },
                };
                let mut s = cred.status();
                if s.source_problem != problem {
                    match &problem {
                        Some(p) => {
                            tracing::error!(user = %cred.name, problem = %p, "cookie_file is unusable; the account keeps the cookie it has, but the next start will fail until this is fixed")
                        }
                        None => tracing::info!(user = %cred.name, "cookie_file is usable again"),
                    }
                    s.source_problem = problem;
                }
            }
            // A state copy written by someone else (`credentials set`).
            self.adopt_if_replaced(cred);
            if cred.status().pending.is_some() {
                self.sync_locked(cred).await;
            }
        }
    }

    /// Brings every user (or the one named) in line with the shared
    /// record: after a change notice, after (re)subscribing, and now and
    /// then in case a notice was lost.
    pub async fn sync_shared(&self, only: Option<&str>) {
        if self.vault.is_none() {
            return;
        }
        for (name, cred) in &self.users {
            if only.is_some_and(|o| o != &**name) {
                continue;
            }
            let _w = cred.writer.lock().await;
            self.sync_locked(cred).await;
        }
    }

    /// Reconciles one user's cookie with the shared record, with the
    /// user's writer lock held: writes this replica's change, or takes the
    /// record's. A store that fails leaves the change pending (the next
    /// sync writes it) and the cookie in use as it is.
    async fn sync_locked(&self, cred: &UserCredential) {
        let Some(vault) = &self.vault else { return };
        // Each lost race re-reads; three are plenty for a handful of
        // replicas writing one account at once.
        for _ in 0..3 {
            let found = match vault.read(&cred.name).await {
                Ok(found) => found,
                Err(e) => return self.shared_problem(cred, Some(e)),
            };
            self.shared_problem(cred, None);
            let (gen, record) = match found {
                Some((gen, record)) => (gen, Some(record)),
                None => (0, None),
            };
            let (pending, known, digest) = {
                let s = cred.status();
                (s.pending, s.shared_gen, s.source_sha256.clone())
            };
            let write = match (&record, pending) {
                (None, _) => cred.cookie().is_some(),
                (Some(_), Some(Pending::Local)) => gen == known,
                (Some(r), Some(Pending::Source)) => {
                    r.source_sha256 != digest && !r.retired.contains(&digest) && !digest.is_empty()
                }
                (Some(_), Some(Pending::Operator)) => true,
                (Some(_), None) => false,
            };
            if !write {
                if let (Some(r), Some(Pending::Local)) = (&record, pending) {
                    // Our rotation lost to another replica's: keep it in
                    // case Knoq issued it last.
                    let mine = cred.cookie();
                    let mut s = cred.status();
                    if !s.expired && mine.as_ref().and_then(|c| c.to_str().ok()) != Some(&r.cookie)
                    {
                        s.runner_up = mine;
                    }
                }
                if let Some(record) = record {
                    if gen != known || pending.is_some() {
                        self.adopt_shared(cred, gen, record).await;
                    }
                }
                cred.status().pending = None;
                return;
            }
            let Some(cookie) = cred.cookie() else { return };
            let mine = {
                let s = cred.status();
                let mut mine = match &record {
                    Some(r) => Shared {
                        cookie: String::new(),
                        source_sha256: r.source_sha256.clone(),
                        retired: r.retired.clone(),
                        rotated_at: s.last_rotation,
                        expired: s.expired,
                    },
                    None => Shared {
                        cookie: String::new(),
                        source_sha256: digest.clone(),
                        retired: Vec::new(),
                        rotated_at: s.last_rotation,
                        expired: s.expired,
                    },
                };
                match pending {
                    Some(Pending::Source) => {
                        let old = std::mem::replace(&mut mine.source_sha256, digest.clone());
                        mine.retire(&old);
                    }
                    Some(Pending::Operator) => {
                        let old = std::mem::replace(&mut mine.source_sha256, OPERATOR.into());
                        mine.retire(&old);
                        mine.retire(&digest);
                    }
                    _ => {}
                }
                mine.cookie = cookie.to_str().unwrap_or_default().to_string();
                mine
            };
            match vault.write(&cred.name, gen, &mine).await {
                Ok(Cas::Stored(gen)) => {
                    let mut s = cred.status();
                    (s.shared_gen, s.shared_source, s.shared_retired, s.pending) =
                        (gen, mine.source_sha256, mine.retired, None);
                    return;
                }
                Ok(Cas::Stale(_)) => continue,
                Err(e) => return self.shared_problem(cred, Some(e)),
            }
        }
    }

    /// Takes the shared record's cookie and state, and keeps a copy in the
    /// state directory (a restart while Redis is away starts from it).
    async fn adopt_shared(&self, cred: &UserCredential, gen: u64, record: Shared) {
        let cookie = match parse_cookie(&record.cookie) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(user = %cred.name, error = %e, "the shared cookie is unusable; keeping the current one");
                return;
            }
        };
        let changed = cred.cookie().as_ref() != Some(&cookie);
        let was_expired = cred.status().expired;
        cred.publish(cookie.clone());
        {
            let mut s = cred.status();
            (s.shared_gen, s.shared_source, s.shared_retired) =
                (gen, record.source_sha256.clone(), record.retired.clone());
            s.expired = record.expired;
            s.last_rotation = record.rotated_at;
            s.from_state = true;
        }
        match (changed, was_expired, record.expired) {
            (_, false, true) => {
                tracing::warn!(user = %cred.name, "another replica saw Knoq reject the session cookie; requests for this user now fail fast until `knoq-gateway credentials set {}` provides a new one", cred.name)
            }
            (true, _, _) => {
                tracing::info!(user = %cred.name, generation = gen, "using the cookie another replica stored")
            }
            _ => {}
        }
        if changed || was_expired != record.expired {
            if let Err(e) = self
                .persist(cred, &cookie, record.rotated_at, record.expired)
                .await
            {
                tracing::warn!(user = %cred.name, error = %e, "cannot keep a copy of the shared cookie in the state directory");
            }
        }
    }

    /// One log line per change of whether the shared record can be used.
    fn shared_problem(&self, cred: &UserCredential, error: Option<VaultError>) {
        let problem = error.map(|e| e.to_string());
        let mut s = cred.status();
        if s.shared_problem != problem {
            match &problem {
                Some(p) => {
                    tracing::error!(user = %cred.name, problem = %p, "cannot read or write the shared cookie; this replica keeps the cookie it has and writes its changes when the store answers")
                }
                None => tracing::info!(user = %cred.name, "the shared cookie is in reach again"),
            }
            s.shared_problem = problem;
        }
    }

    /// Every user's status, sorted by name.
    pub fn status(&self) -> Vec<UserStatus> {
        let mut all: Vec<UserStatus> = self
            .users
            .values()
            .map(|cred| {
                let present = cred.cookie().is_some();
                let s = cred.status();
                UserStatus {
                    user: cred.name.clone(),
                    state: if s.expired {
                        CredentialState::Expired
                    } else if !present {
                        CredentialState::Missing
                    } else if s.last_success.is_some() {
                        CredentialState::Valid
                    } else {
                        CredentialState::Unchecked
                    },
                    last_success: s.last_success,
                    last_rotation: s.last_rotation,
                    source: origin(&cred.source, s.from_state),
                    why: String::new(),
                    source_problem: s.source_problem.clone(),
                    shared_generation: self.vault.is_some().then_some(s.shared_gen),
                }
                .explained(&cred.source)
            })
            .collect();
        all.sort_by(|a, b| a.user.cmp(&b.user));
        all
    }
}

/// Reads a user's source value; the key names the config entry. `None`
/// for a user whose cookie only `credentials set` provides.
fn source_value(
    i: usize,
    source: &CookieSource,
    env: &impl Fn(&str) -> Option<String>,
) -> Option<(String, Result<String, String>)> {
    Some(match source {
        CookieSource::File(path) => (format!("users[{i}].cookie_file"), read_secret_line(path)),
        CookieSource::Env(var) => (
            format!("users[{i}].cookie_env"),
            env(var).ok_or_else(|| format!("environment variable {var} is not set")),
        ),
        CookieSource::Stored => return None,
    })
}

/// Chooses between the source value and the state copy at start-up.
fn adopt(
    cred: &UserCredential,
    source: Option<(String, HeaderValue)>,
    state: Option<(StateFile, Option<Stamp>)>,
) {
    let mut s = cred.status();
    let digest = source.as_ref().map(|(d, _)| d.clone()).unwrap_or_default();
    s.source_sha256 = digest.clone();
    let (file, mtime) = match state {
        Some((file, mtime)) => (Some(file), mtime),
        None => (None, None),
    };
    s.state_mtime = mtime;
    let copy = file.filter(|f| f.source_sha256 == digest || f.source_sha256 == OPERATOR);
    match (
        copy.and_then(|f| parse_cookie(&f.cookie).ok().map(|c| (c, f))),
        source,
    ) {
        (Some((cookie, f)), _) => {
            cred.publish(cookie);
            s.expired = f.expired;
            s.last_rotation = f.rotated_at;
            s.from_state = true;
        }
        // No copy, or one made from an older source value: the source wins.
        (None, Some((_, cookie))) => cred.publish(cookie),
        (None, None) => {}
    }
}

/// Whether the source simply does not exist (as opposed to being unsafe).
fn is_missing(source: &CookieSource, env: &impl Fn(&str) -> Option<String>) -> bool {
    match source {
        CookieSource::File(path) => !path.exists(),
        CookieSource::Env(var) => env(var).is_none(),
        CookieSource::Stored => true,
    }
}

fn state_path(dir: &Path, user: &str) -> PathBuf {
    dir.join(format!("{user}.json"))
}

/// The user's state copy with its modification time, if there is one. A
/// damaged copy is an error: the gateway never guesses which cookie to use.
fn read_state(dir: &Path, user: &str) -> Result<Option<(StateFile, Option<Stamp>)>, String> {
    let path = state_path(dir, user);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_secret_file(&path)?;
    let file: StateFile = serde_json::from_slice(&bytes).map_err(|_| {
        format!(
            "{} is damaged; delete it to fall back to the configured cookie, or run `knoq-gateway credentials set {user}`",
            path.display()
        )
    })?;
    Ok(Some((file, stamp(&path))))
}

/// The generation of the state copy at `path`; 0 if there is none or it
/// cannot be read.
fn generation_of(path: &Path) -> u64 {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<StateFile>(&bytes).ok())
        .map_or(0, |f| f.generation)
}

/// Finishes what a crash interrupted, at start-up (never while a gateway
/// runs, and never for `check`): a rotation is written to a temporary
/// file, then renamed over the user's state copy, and Knoq may already
/// refuse the old cookie when the process dies in between. So a complete
/// temporary copy (it parses, its cookie is valid) that is newer than the
/// state copy (a higher generation) replaces it; then every temporary file
/// left in the directory is removed (each holds a cookie).
pub fn recover_interrupted_writes(state_dir: &Path) -> Result<(), String> {
    let dir = state_dir.join(STATE_SUBDIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    // Per user: the newest complete temporary copy.
    let mut newest: HashMap<String, (u64, PathBuf)> = HashMap::new();
    let mut leftovers = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(user) = name
            .strip_prefix('.')
            .and_then(|rest| rest.split_once(".json.tmp-"))
            .map(|(user, _)| user.to_string())
        else {
            continue;
        };
        let path = entry.path();
        let complete = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<StateFile>(&bytes).ok())
            .filter(|f| parse_cookie(&f.cookie).is_ok());
        if let Some(file) = complete {
            let better = newest.get(&user).is_none_or(|(g, _)| file.generation > *g);
            if better {
                newest.insert(user, (file.generation, path.clone()));
            }
        }
        leftovers.push(path);
    }
    for (user, (generation, tmp)) in newest {
        let target = state_path(&dir, &user);
        if generation > generation_of(&target) {
            std::fs::rename(&tmp, &target)
                .and_then(|()| std::fs::File::open(&dir)?.sync_all())
                .map_err(|e| format!("{}: {e}", target.display()))?;
            tracing::warn!(user = %user, "adopted a cookie rotation that a crash interrupted before it was saved");
        }
    }
    for path in leftovers.iter().filter(|p| p.exists()) {
        std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Stores `cookie` as the user's state copy, superseding the current source
/// value: what `knoq-gateway credentials set` does. A running gateway picks
/// it up within a second.
pub fn store_operator_cookie(config: &Config, user: &str, cookie: &str) -> Result<(), String> {
    let i = config
        .users
        .iter()
        .position(|u| u.name == user)
        .ok_or_else(|| format!("no [[users]] entry is named \"{user}\""))?;
    parse_cookie(cookie)?;
    let source = source_value(i, &config.users[i].cookie, &|v| std::env::var(v).ok())
        .map_or_else(|| Err(String::new()), |(_, source)| source);
    // A copy names the source value it supersedes, so that a later edit of
    // cookie_file wins over it; where the CLI cannot see the source the way
    // the gateway does (an environment variable, an unreadable file), the
    // copy is marked as the operator's and applies whatever the source holds.
    let digest = match (&config.users[i].cookie, source) {
        (CookieSource::File(_), Ok(text)) => sha256_hex(&text),
        _ => OPERATOR.to_string(),
    };
    let dir = config.state.dir.join(STATE_SUBDIR);
    let file = StateFile {
        cookie: cookie.trim().to_string(),
        source_sha256: digest,
        rotated_at: Some(crate::clock::Clock::now(&crate::clock::SystemClock::new())),
        expired: false,
        generation: generation_of(&state_path(&dir, user)) + 1,
    };
    crate::state::ensure_dir(&config.state.dir)
        .and_then(|()| crate::state::ensure_dir(&dir))
        .and_then(|()| {
            crate::state::write_atomic(
                &state_path(&dir, user),
                &serde_json::to_vec(&file).expect("serialises"),
            )
        })
        .map_err(|e| format!("{}: {e}", dir.display()))
}

/// Reads the status of every user from the files alone, for
/// `credentials status` when no gateway is running.
pub fn status_from_files(config: &Config) -> Vec<UserStatus> {
    let dir = config.state.dir.join(STATE_SUBDIR);
    config
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let source = source_value(i, &u.cookie, &|v| std::env::var(v).ok())
                .map_or_else(|| Err(String::new()), |(_, source)| source);
            let digest = source.as_ref().ok().map(|t| sha256_hex(t));
            let state = read_state(&dir, &u.name).ok().flatten().map(|(f, _)| f);
            let current_copy = state.filter(|f| {
                Some(&f.source_sha256) == digest.as_ref()
                    || digest.is_none()
                    || f.source_sha256 == OPERATOR
            });
            let (st, origin, rotation) = match (&current_copy, &source) {
                (Some(f), _) if f.expired => {
                    (CredentialState::Expired, Origin::State, f.rotated_at)
                }
                (Some(f), _) => (CredentialState::Unchecked, Origin::State, f.rotated_at),
                (None, Ok(_)) => (CredentialState::Unchecked, origin(&u.cookie, false), None),
                (None, Err(_)) => (CredentialState::Missing, origin(&u.cookie, false), None),
            };
            UserStatus {
                user: u.name.clone(),
                state: st,
                last_success: None,
                last_rotation: rotation,
                source: origin,
                why: String::new(),
                source_problem: match (&u.cookie, source) {
                    (CookieSource::Stored, _) | (_, Ok(_)) => None,
                    (_, Err(e)) => Some(e),
                },
                shared_generation: None,
            }
            .explained(&u.cookie)
        })
        .collect()
}

fn origin(source: &CookieSource, from_state: bool) -> Origin {
    match (source, from_state) {
        (CookieSource::Stored, _) | (_, true) => Origin::State,
        (CookieSource::File(_), false) => Origin::File,
        (CookieSource::Env(_), false) => Origin::Env,
    }
}

impl UserStatus {
    /// Fills in `why`: the source in force and the reason, or the command
    /// that fixes what is wrong.
    fn explained(mut self, configured: &CookieSource) -> UserStatus {
        let user = &self.user;
        let named = match configured {
            CookieSource::File(path) => format!("cookie_file {}", path.display()),
            CookieSource::Env(var) => format!("cookie_env {var}"),
            CookieSource::Stored => "no cookie_file or cookie_env".to_string(),
        };
        self.why = match (self.state, self.source) {
            (CredentialState::Expired, _) => format!(
                "Knoq rejected the cookie (401); set a new one with `knoq-gateway credentials set {user}`"
            ),
            (CredentialState::Missing, _) => match configured {
                CookieSource::Stored => format!(
                    "no cookie yet ({named}); set one with `knoq-gateway credentials set {user}`"
                ),
                _ => format!(
                    "{named} gives no cookie; fix it, or run `knoq-gateway credentials set {user}`"
                ),
            },
            (_, Origin::State) => match configured {
                CookieSource::Stored => format!(
                    "the stored copy ({named}): set by `credentials set`, kept current by Knoq's rotations"
                ),
                _ => format!(
                    "the stored copy: set by `credentials set` or rotated by Knoq since {named} last changed; a new value there wins"
                ),
            },
            (_, _) => format!("{named}, as configured"),
        };
        self
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Validates a Cookie header value as copied from a browser:
/// `name=value[; name2=value2]`, header-safe characters only.
/// Errors describe the shape, never the value.
pub fn parse_cookie(text: &str) -> Result<HeaderValue, String> {
    let text = text.trim();
    if !text.is_ascii() {
        return Err("the cookie holds non-ASCII characters; copy the value again".to_string());
    }
    let mut value = HeaderValue::from_str(text).map_err(|_| {
        "the cookie holds characters a header cannot carry (control characters); copy the value again".to_string()
    })?;
    for pair in text.split(';') {
        let pair = pair.trim();
        match pair.split_once('=') {
            Some((name, _)) if !name.trim().is_empty() && !name.contains([' ', '\t', ',']) => {}
            _ => {
                return Err(
                    "the cookie must be `name=value` pairs separated by `; ` (the Cookie header value as the browser sends it)"
                        .to_string(),
                )
            }
        }
    }
    value.set_sensitive(true);
    Ok(value)
}

fn scim_bearer(token: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the SCIM token holds characters a header cannot carry".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(cookie: &str, generation: u64) -> Vec<u8> {
        serde_json::to_vec(&StateFile {
            cookie: cookie.into(),
            source_sha256: "s".into(),
            rotated_at: None,
            expired: false,
            generation,
        })
        .unwrap()
    }

    /// Writes a private file, as the gateway's own writes are.
    fn put(path: impl AsRef<Path>, bytes: impl AsRef<[u8]>) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap()
            .write_all(bytes.as_ref())
            .unwrap();
    }

    #[test]
    fn a_newer_complete_copy_left_by_a_crash_is_adopted_and_every_leftover_removed() {
        let state = std::env::temp_dir().join(format!("kgw-recover-{}", std::process::id()));
        let dir = state.join(STATE_SUBDIR);
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&dir).unwrap();
        put(dir.join("alice.json"), copy("k=old", 3));
        // The newest complete one wins; a torn one and an older one go.
        put(dir.join(".alice.json.tmp-1-0"), copy("k=newer", 4));
        put(dir.join(".alice.json.tmp-1-1"), copy("k=newest", 5));
        put(dir.join(".alice.json.tmp-2-0"), &copy("k=torn", 9)[..20]);
        // Bob's state copy is newer than his leftover: it stays.
        put(dir.join("bob.json"), copy("k=bob-current", 7));
        put(dir.join(".bob.json.tmp-1-2"), copy("k=bob-stale", 6));
        // Carol crashed before her first copy was renamed into place.
        put(dir.join(".carol.json.tmp-1-3"), copy("k=carol", 1));
        recover_interrupted_writes(&state).unwrap();
        let cookie = |user: &str| {
            let (f, _) = read_state(&dir, user).unwrap().unwrap();
            (f.cookie, f.generation)
        };
        assert_eq!(cookie("alice"), ("k=newest".into(), 5));
        assert_eq!(cookie("bob"), ("k=bob-current".into(), 7));
        assert_eq!(cookie("carol"), ("k=carol".into(), 1));
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["alice.json", "bob.json", "carol.json"]);
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn browser_cookie_strings_are_accepted_and_marked_sensitive() {
        let v = parse_cookie("knoq_session=abc123; theme=dark\n").unwrap();
        assert_eq!(v, "knoq_session=abc123; theme=dark");
        assert!(v.is_sensitive());
    }

    #[test]
    fn malformed_cookies_are_refused_without_echoing_them() {
        for bad in ["justavalue", "a=1; nope", "=x", "a=1\u{7}", "a=é"] {
            let err = parse_cookie(bad).unwrap_err();
            assert!(!err.contains(bad), "{err}");
        }
    }

    #[test]
    fn env_cookies_load_and_missing_ones_are_problems() {
        let config = Config::from_toml_str(
            "[[users]]\nname = \"a\"\ncookie_env = \"A_COOKIE\"\n[[users]]\nname = \"b\"\ncookie_env = \"B_COOKIE\"\n",
            Path::new("/nonexistent-kgw"),
        )
        .unwrap();
        let problems = Credentials::load_with(
            &config,
            |v| (v == "A_COOKIE").then(|| "knoq_session=x".to_string()),
            None,
        )
        .unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "users[1].cookie_env");
        let creds =
            Credentials::load_with(&config, |_| Some("knoq_session=x".into()), None).unwrap();
        assert_eq!(creds.cookie("a").unwrap(), "knoq_session=x");
        assert!(creds.cookie("nobody").is_none());
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains("knoq_session"), "{dbg}");
        assert!(creds
            .status()
            .iter()
            .all(|s| s.state == CredentialState::Unchecked && s.source == Origin::Env));
    }
}
