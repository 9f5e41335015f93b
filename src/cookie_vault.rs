//! The shared copy of every account's cookie in Redis (`[store] kind =
//! "redis"`), so a cookie Knoq rotates through one replica, an expiry one
//! replica sees, and a cookie an operator provides reach every replica.
//!
//! One record per account, `<prefix>{<account>}:cookie`, a hash of two
//! fields: `gen`, a generation number only a compare-and-set advances (one
//! server-side script: it writes only if `gen` is still the one the writer
//! based its change on), and `blob`, the record sealed with
//! ChaCha20-Poly1305 (ring) under `secret_key_file`: a random 96-bit nonce,
//! then the ciphertext and tag. The associated data binds the account and
//! the generation, so a blob copied to another account or replayed under a
//! later generation does not open. No cookie is ever written in clear.
//!
//! Every successful write publishes the account's name on
//! `<prefix>cookies`; replicas subscribe, and re-read every record after
//! each (re)subscription, since pub/sub drops what it sends while a
//! subscriber is away.

use std::fmt;
use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::shared_store::{SharedStore, StoreError};

/// Writes `ARGV[2]` as generation `ARGV[1] + 1` if `gen` is still
/// `ARGV[1]`, then announces the account; answers the generation in force
/// and whether this write made it.
const CAS: &str = r"
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
if gen ~= tonumber(ARGV[1]) then return {0, gen} end
redis.call('HSET', KEYS[1], 'gen', gen + 1, 'blob', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, gen + 1}
";

/// One account's shared cookie and what goes with it (the plaintext).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shared {
    pub cookie: String,
    /// SHA-256 of the configured source value this cookie descends from
    /// (`"operator"` for `credentials set`).
    pub source_sha256: String,
    /// Source values an operator has replaced since: a replica still
    /// configured with one of them takes the shared cookie, not its own.
    #[serde(default)]
    pub retired: Vec<String>,
    pub rotated_at: Option<Millis>,
    #[serde(default)]
    pub expired: bool,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("source_sha256", &self.source_sha256)
            .field("expired", &self.expired)
            .finish_non_exhaustive()
    }
}

/// How many replaced source values a record remembers.
const RETIRED: usize = 8;

impl Shared {
    /// Notes that `digest` is replaced by this record's source.
    pub fn retire(&mut self, digest: &str) {
        if !digest.is_empty()
            && digest != self.source_sha256
            && !self.retired.iter().any(|d| d == digest)
        {
            self.retired.push(digest.to_string());
            let over = self.retired.len().saturating_sub(RETIRED);
            self.retired.drain(..over);
        }
    }
}

/// What a compare-and-set did.
#[derive(Debug, PartialEq, Eq)]
pub enum Cas {
    /// Written as this generation.
    Stored(u64),
    /// Someone else wrote first: this generation is in force.
    Stale(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blob does not open with this key for this account and
    /// generation (another key, or tampered with).
    #[error("the shared cookie does not decrypt with store.secret_key_file (do all replicas use the same key?)")]
    Sealed,
}

/// The shared cookies, sealed with the store's key.
pub struct Vault {
    store: Arc<SharedStore>,
    key: LessSafeKey,
    rng: SystemRandom,
    channel: String,
    cas: redis::Script,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

/// Reads the 32-byte key: the raw bytes, or 64 hex digits.
pub fn read_key(path: &std::path::Path) -> Result<[u8; 32], String> {
    let bytes = crate::secrets::read_secret_file(path)?;
    let text = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("");
    let raw: Vec<u8> = if bytes.len() == 32 {
        bytes
    } else if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect()
    } else {
        return Err(format!(
            "{}: must hold exactly 32 bytes (raw, or as 64 hex digits)",
            path.display()
        ));
    };
    let mut key = [0u8; 32];
    key.copy_from_slice(&raw);
    Ok(key)
}

impl Vault {
    pub fn new(store: Arc<SharedStore>, key: &[u8; 32]) -> Vault {
        let unbound =
            UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte key fits ChaCha20-Poly1305");
        Vault {
            channel: store.channel("cookies"),
            store,
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
            cas: redis::Script::new(CAS),
        }
    }

    /// The channel every write is announced on (the account's name).
    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub fn store(&self) -> &Arc<SharedStore> {
        &self.store
    }

    /// The account's record and its generation; `None` before any.
    pub async fn read(&self, account: &str) -> Result<Option<(u64, Shared)>, VaultError> {
        let key = self.store.key(account, "cookie");
        let (gen, blob): (Option<u64>, Option<Vec<u8>>) = self
            .store
            .call("cookie_read", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(&key)
                    .arg("gen")
                    .arg("blob")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        match (gen, blob) {
            (Some(gen), Some(blob)) => Ok(Some((gen, self.open(account, gen, &blob)?))),
            _ => Ok(None),
        }
    }

    /// Writes `record` as the generation after `base`, if `base` is still
    /// the one in force.
    pub async fn write(
        &self,
        account: &str,
        base: u64,
        record: &Shared,
    ) -> Result<Cas, VaultError> {
        let blob = self.seal(account, base + 1, record);
        let key = self.store.key(account, "cookie");
        let (stored, gen): (u8, u64) = self
            .store
            .call("cookie_write", |mut c| {
                let mut invocation = self.cas.key(&key);
                invocation
                    .arg(base)
                    .arg(blob)
                    .arg(&self.channel)
                    .arg(account);
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        Ok(if stored == 1 {
            Cas::Stored(gen)
        } else {
            Cas::Stale(gen)
        })
    }

    fn aad(account: &str, gen: u64) -> Vec<u8> {
        format!("knoq-gateway cookie v1\0{account}\0{gen}").into_bytes()
    }

    fn seal(&self, account: &str, gen: u64, record: &Shared) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system's random source works");
        let mut data = serde_json::to_vec(record).expect("a record always serialises");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(account, gen)),
                &mut data,
            )
            .expect("sealing a small buffer cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&data);
        blob
    }

    fn open(&self, account: &str, gen: u64, blob: &[u8]) -> Result<Shared, VaultError> {
        if blob.len() < NONCE_LEN {
            return Err(VaultError::Sealed);
        }
        let (nonce, sealed) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| VaultError::Sealed)?;
        let mut data = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(Self::aad(account, gen)), &mut data)
            .map_err(|_| VaultError::Sealed)?;
        serde_json::from_slice(plain).map_err(|_| VaultError::Sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared_store::{OnStoreError, RedisSettings, RedisUrls};

    fn vault(key: u8) -> Vault {
        // Never connected: sealing and opening need no server.
        let settings = RedisSettings {
            url: RedisUrls::Server("redis://127.0.0.1:1/0".into()),
            password_file: None,
            secret_key_file: Default::default(),
            key_prefix: "t:".into(),
            timeout: std::time::Duration::from_millis(10),
            on_error: OnStoreError::Reject,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        Vault::new(
            Arc::new(SharedStore::connect(&settings).unwrap()),
            &[key; 32],
        )
    }

    fn record() -> Shared {
        Shared {
            cookie: "knoq_session=secret-value-123".into(),
            source_sha256: "abc".into(),
            retired: vec![],
            rotated_at: Some(5),
            expired: false,
        }
    }

    #[test]
    fn a_sealed_record_opens_only_for_its_account_generation_and_key() {
        let v = vault(7);
        let blob = v.seal("alice", 3, &record());
        assert!(
            !blob.windows(12).any(|w| w == b"secret-value"),
            "the cookie is not in clear"
        );
        assert_eq!(v.open("alice", 3, &blob).unwrap(), record());
        assert!(matches!(v.open("bob", 3, &blob), Err(VaultError::Sealed)));
        assert!(matches!(v.open("alice", 4, &blob), Err(VaultError::Sealed)));
        assert!(matches!(
            vault(8).open("alice", 3, &blob),
            Err(VaultError::Sealed)
        ));
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            v.open("alice", 3, &tampered),
            Err(VaultError::Sealed)
        ));
        // Two seals of one record differ (fresh nonce).
        assert_ne!(v.seal("alice", 3, &record()), blob);
    }

    #[test]
    fn retired_sources_are_bounded_and_never_the_current_one() {
        let mut r = record();
        r.retire("abc");
        assert!(r.retired.is_empty());
        for i in 0..20 {
            r.retire(&format!("d{i}"));
            r.retire(&format!("d{i}"));
        }
        assert_eq!(r.retired.len(), RETIRED);
        assert_eq!(r.retired.last().unwrap(), "d19");
    }

    #[test]
    fn keys_are_raw_or_hex_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("kgw-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            std::os::unix::fs::PermissionsExt::set_mode(
                &mut std::fs::metadata(&p).unwrap().permissions(),
                0o600,
            );
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            p
        };
        assert_eq!(read_key(&write("raw", &[9u8; 32])).unwrap(), [9u8; 32]);
        let hex = format!("{}\n", "0a".repeat(32));
        assert_eq!(read_key(&write("hex", hex.as_bytes())).unwrap(), [10u8; 32]);
        assert!(read_key(&write("short", b"abc")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
