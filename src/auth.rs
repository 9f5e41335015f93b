//! Authentication stage: `Authorization: Bearer <token>` to a [`Principal`].
//!
//! The config holds only SHA-256 digests of tokens, so the lookup hashes the
//! presented token and looks the digest up in a map. The plaintext token is
//! borrowed from the request head for the length of that hash and never
//! copied; the pipeline drops the `Authorization` header before anything is
//! sent upstream. Timing: a map lookup keyed by a digest reveals nothing an
//! attacker can use (they cannot choose digest prefixes), so no
//! constant-time comparison is needed on top.
//!
//! Contract: runs after request hygiene checks and before routing; `Ok` is
//! the caller's identity, `Err` becomes a 401 in `error.rs`. It touches no
//! other stage.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};

/// Who is calling: the token's name and the Knoq account it acts as.
#[derive(Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name from the config (a label, not the secret).
    pub token: Arc<str>,
    /// The `[[users]]` entry (Knoq account) this token acts as.
    pub user: Arc<str>,
    /// May this token reach `/api/scim/*`?
    pub scim: bool,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({} as {})", self.token, self.user)
    }
}

/// Why a request could not be authenticated. Each becomes 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing Authorization header; send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header must be `Bearer <token>`")]
    Malformed,
    #[error("more than one Authorization header")]
    Duplicate,
    #[error("unknown or revoked bearer token")]
    Unknown,
    /// Past the token's `expires` (the message names no token).
    #[error("this bearer token has expired")]
    Expired,
}

/// Token digests to principals. Built once from the config.
#[derive(Default)]
pub struct TokenTable {
    by_digest: HashMap<[u8; 32], (Principal, Option<u64>)>,
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenTable({} tokens)", self.by_digest.len())
    }
}

// === impl TokenTable ===

impl TokenTable {
    /// A table of tokens, each given by the SHA-256 of its secret, the
    /// principal it stands for, and when it expires (Unix milliseconds).
    pub fn new(tokens: impl IntoIterator<Item = ([u8; 32], Principal, Option<u64>)>) -> Self {
        TokenTable {
            by_digest: tokens
                .into_iter()
                .map(|(digest, who, expires)| (digest, (who, expires)))
                .collect(),
        }
    }

    /// Finds the principal for the request's bearer token. `now` (Unix
    /// milliseconds) is asked only for a token that expires.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        now: impl FnOnce() -> u64,
    ) -> Result<&Principal, AuthError> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let value = values.next().ok_or(AuthError::Missing)?;
        if values.next().is_some() {
            return Err(AuthError::Duplicate);
        }
        let token = parse_bearer(value.as_bytes()).ok_or(AuthError::Malformed)?;
        match self.by_digest.get(&sha256(token)) {
            None => Err(AuthError::Unknown),
            Some((_, Some(expires))) if now() >= *expires => Err(AuthError::Expired),
            Some((who, _)) => Ok(who),
        }
    }
}

/// Extracts the token from `Bearer <token>` (scheme case-insensitive, per
/// RFC 7235), accepting only token68 characters.
fn parse_bearer(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = value[SCHEME.len()..].trim_ascii();
    let token68 = |b: &u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(b);
    (!token.is_empty() && token.iter().all(token68)).then_some(token)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lower-case hex of a token's SHA-256: the value for `sha256 = "..."`.
pub fn digest_hex(token: &str) -> String {
    sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh bearer token: `kgw_` and 256 random bits in base64url.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the OS random source is available");
    format!(
        "kgw_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn table() -> TokenTable {
        let who = |token: &str| Principal {
            token: token.into(),
            user: "alice".into(),
            scim: false,
        };
        TokenTable::new([
            (sha256(b"kgw_good"), who("svc"), None),
            (sha256(b"kgw_dated"), who("dated"), Some(1_000)),
        ])
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn bearer_token_finds_its_principal() {
        let t = table();
        let p = t
            .authenticate(&headers(&["Bearer kgw_good"]), || 0)
            .unwrap();
        assert_eq!((&*p.token, &*p.user), ("svc", "alice"));
        assert!(t
            .authenticate(&headers(&["bearer   kgw_good"]), || 0)
            .is_ok());
    }

    #[test]
    fn a_token_is_refused_from_its_expiry_on() {
        let t = table();
        let at = |now: u64| t.authenticate(&headers(&["Bearer kgw_dated"]), move || now);
        assert_eq!(&*at(999).unwrap().token, "dated");
        assert_eq!(at(1_000).unwrap_err(), AuthError::Expired);
        assert_eq!(at(5_000).unwrap_err(), AuthError::Expired);
        // A token without `expires` never asks the clock.
        let never = || -> u64 { panic!("the clock was read") };
        assert!(t
            .authenticate(&headers(&["Bearer kgw_good"]), never)
            .is_ok());
    }

    #[test]
    fn every_bad_header_shape_is_refused() {
        let t = table();
        let err = |v: &[&str]| t.authenticate(&headers(v), || 0).unwrap_err();
        assert_eq!(err(&[]), AuthError::Missing);
        assert_eq!(err(&["Basic a2d3X2dvb2Q="]), AuthError::Malformed);
        assert_eq!(err(&["Bearer"]), AuthError::Malformed);
        assert_eq!(err(&["Bearer "]), AuthError::Malformed);
        assert_eq!(err(&["Bearer kgw good"]), AuthError::Malformed);
        assert_eq!(err(&["Bearer kgw_bad"]), AuthError::Unknown);
        assert_eq!(
            err(&["Bearer kgw_good", "Bearer kgw_good"]),
            AuthError::Duplicate
        );
    }

    #[test]
    fn new_tokens_are_long_random_and_match_their_digest() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("kgw_"));
        // 32 bytes of base64url without padding is 43 characters.
        assert_eq!(a.len(), 4 + 43);
        assert!(parse_bearer(format!("Bearer {a}").as_bytes()).is_some());
        let hex = digest_hex(&a);
        assert_eq!(hex.len(), 64);
        assert_eq!(
            digest_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }
}
