//! The credential store: each user's Knoq session cookie and Knoq's SCIM
//! token, loaded from the files or environment variables the config names.
//!
//! Readers take a cheap clone of a `HeaderValue` (reference-counted bytes)
//! under a short read lock that is never held across an `.await`; a writer
//! (cookie rotation, `credentials set`) validates a new value before it
//! publishes it, so a reader only ever sees a complete, valid cookie. Every
//! value is marked sensitive, and no type here prints a secret in `Debug`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use http::HeaderValue;

use crate::config::{Config, CookieSource, Problem};
use crate::secrets::read_secret_line;

/// One user's cookie and where it came from.
pub struct UserCredential {
    cookie: RwLock<Option<HeaderValue>>,
    source: CookieSource,
}

impl fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserCredential")
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
}

/// Every user's cookie, and the SCIM bearer header when configured.
pub struct Credentials {
    users: HashMap<Arc<str>, UserCredential>,
    scim_bearer: Option<HeaderValue>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users)
            .field("scim", &self.scim_bearer.is_some())
            .finish()
    }
}

/// A user's credential as the readiness check sees it (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStatus {
    pub user: String,
    pub present: bool,
}

// === impl Credentials ===

impl Credentials {
    /// Loads every cookie and the SCIM token, reporting every problem.
    pub fn load(config: &Config) -> Result<Credentials, Vec<Problem>> {
        Self::load_with(config, |name| std::env::var(name).ok())
    }

    /// As [`load`](Self::load), with the environment passed in (tests).
    pub fn load_with(
        config: &Config,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut users = HashMap::new();
        for (i, user) in config.users.iter().enumerate() {
            let (key, raw) = match &user.cookie {
                CookieSource::File(path) => {
                    (format!("users[{i}].cookie_file"), read_secret_line(path))
                }
                CookieSource::Env(var) => (
                    format!("users[{i}].cookie_env"),
                    env(var).ok_or_else(|| format!("environment variable {var} is not set")),
                ),
            };
            let cookie = raw.and_then(|text| parse_cookie(&text));
            match cookie {
                Ok(value) => {
                    users.insert(
                        user.name.as_str().into(),
                        UserCredential {
                            cookie: RwLock::new(Some(value)),
                            source: user.cookie.clone(),
                        },
                    );
                }
                Err(message) => problems.push(Problem::new(key, message)),
            }
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
            Ok(Credentials { users, scim_bearer })
        } else {
            Err(problems)
        }
    }

    /// The user's current cookie, or `None` when it is missing.
    pub fn cookie(&self, user: &str) -> Option<HeaderValue> {
        self.users.get(user).and_then(UserCredential::cookie)
    }

    /// `Bearer <scim token>`, when configured.
    pub fn scim_bearer(&self) -> Option<&HeaderValue> {
        self.scim_bearer.as_ref()
    }

    /// Every user's status, sorted by name.
    pub fn status(&self) -> Vec<UserStatus> {
        let mut all: Vec<UserStatus> = self
            .users
            .iter()
            .map(|(name, cred)| UserStatus {
                user: name.to_string(),
                present: cred.cookie().is_some(),
            })
            .collect();
        all.sort_by(|a, b| a.user.cmp(&b.user));
        all
    }
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
        "the cookie holds characters a header cannot carry (control characters or non-ASCII); copy the value again".to_string()
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
    use std::path::Path;

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
            Path::new("/"),
        )
        .unwrap();
        let problems = Credentials::load_with(&config, |v| {
            (v == "A_COOKIE").then(|| "knoq_session=x".to_string())
        })
        .unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "users[1].cookie_env");
        let creds = Credentials::load_with(&config, |_| Some("knoq_session=x".into())).unwrap();
        assert_eq!(creds.cookie("a").unwrap(), "knoq_session=x");
        assert!(creds.cookie("nobody").is_none());
        let dbg = format!("{creds:?}");
        assert!(!dbg.contains("knoq_session"), "{dbg}");
    }
}
