//! The request as handlers see it, the answer they give, and small helpers
//! (JSON strings, ids, query parameters).
//!
//! Handlers are synchronous functions from a [`SimRequest`] to a [`Reply`];
//! only `server.rs` deals with hyper, bodies and connections.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::header::{HeaderName, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::json;

/// A request with its body already read.
#[derive(Debug)]
pub(super) struct SimRequest {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) query: Option<String>,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

/// A handler's answer: always a JSON body (empty only for a SCIM 204).
///
/// Kept small (headers in a `Vec`, not a `HeaderMap`) because handlers pass
/// error replies around as `Err` values.
#[derive(Debug)]
pub(super) struct Reply {
    pub(super) status: StatusCode,
    /// Headers besides `Content-Type` and `Set-Cookie`, which `server` adds.
    pub(super) headers: Vec<(HeaderName, HeaderValue)>,
    pub(super) body: Bytes,
    /// The authenticated user, if the handler got that far.
    pub(super) user: Option<String>,
    /// Whether this is a 429 from the simulator's own limits (not a fault).
    pub(super) rate_limited: bool,
}

// === impl SimRequest ===

impl SimRequest {
    /// The first value of query parameter `name`, percent-decoded.
    pub(super) fn query_param(&self, name: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key) == name).then(|| percent_decode(value))
        })
    }

    pub(super) fn header_str(&self, name: HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as a JSON object, or a 400 reply saying what is wrong.
    pub(super) fn json_object(&self) -> Result<serde_json::Map<String, serde_json::Value>, Reply> {
        match serde_json::from_slice(&self.body) {
            Ok(serde_json::Value::Object(map)) => Ok(map),
            Ok(_) => Err(Reply::error(
                StatusCode::BAD_REQUEST,
                "body must be a JSON object",
            )),
            Err(_) => Err(Reply::error(StatusCode::BAD_REQUEST, "invalid JSON body")),
        }
    }
}

// === impl Reply ===

impl Reply {
    /// A JSON answer with `status`.
    pub(super) fn json(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            user: None,
            rate_limited: false,
        }
    }

    /// 200 with `value`.
    pub(super) fn ok(value: serde_json::Value) -> Self {
        Self::json(StatusCode::OK, value.to_string())
    }

    /// `{"error": message}` with `status`.
    pub(super) fn error(status: StatusCode, message: &str) -> Self {
        Self::json(status, json!({ "error": message }).to_string())
    }

    /// 204 with no body (SCIM's answer to DELETE).
    pub(super) fn no_content() -> Self {
        Self::json(StatusCode::NO_CONTENT, Bytes::new())
    }

    pub(super) fn not_found() -> Self {
        Self::error(StatusCode::NOT_FOUND, "not found")
    }

    pub(super) fn method_not_allowed() -> Self {
        Self::error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    }

    /// Adds `Retry-After: secs`.
    pub(super) fn retry_after(mut self, secs: u32) -> Self {
        self.headers.push((RETRY_AFTER, HeaderValue::from(secs)));
        self
    }

    pub(super) fn for_user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }
}

/// `s` as a JSON string literal, quotes included.
pub(super) fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// 16 random hex digits for ids. Falls back to a counter if the OS has no
/// randomness to give: ids must be unique, not secret.
pub(super) fn random_id() -> String {
    static FALLBACK: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0u8; 8];
    let value = match getrandom::getrandom(&mut bytes) {
        Ok(()) => u64::from_be_bytes(bytes),
        Err(_) => FALLBACK.fetch_add(1, Ordering::Relaxed) | (1 << 63),
    };
    format!("{value:016x}")
}

/// Decodes `%XX` escapes and `+` (as space) of a query component. Invalid
/// escapes stay as they are; invalid UTF-8 becomes U+FFFD.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str) -> SimRequest {
        SimRequest {
            method: Method::GET,
            path: "/".into(),
            query: Some(query.into()),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    #[test]
    fn query_params_are_decoded() {
        let req = request("a=1&sessionId=ses%5F1+x&flag&b=%zz%4");
        assert_eq!(req.query_param("sessionId").as_deref(), Some("ses_1 x"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("b").as_deref(), Some("%zz%4"));
        assert_eq!(req.query_param("missing"), None);
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_id(), random_id());
        assert_eq!(random_id().len(), 16);
    }
}
