//! Header rewriting in both directions, and a redacting view for logs.
//!
//! Towards Knoq the gateway removes everything that identifies or routes
//! the client (its credentials, `Host`, forwarding headers) and every
//! hop-by-hop header (RFC 9110 §7.6.1, including any header the client
//! names in `Connection`), *then* injects the user's cookie and Origin. The
//! order matters: a client naming `Cookie` in `Connection` cannot strip the
//! injected one, because stripping happens first.
//!
//! Back to the client, hop-by-hop headers, `Set-Cookie` (a cookie is a whole
//! Knoq account), CORS headers (the gateway is not a browser endpoint) and
//! `Alt-Svc` (it would point a client at Knoq directly) are removed.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{
    HeaderName, ALT_SVC, AUTHORIZATION, CONNECTION, COOKIE, ORIGIN, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, HeaderValue};

use crate::quota::Standing;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// RFC 2965's obsolete cookie header: never applied, never passed on.
const SET_COOKIE2: HeaderName = HeaderName::from_static("set-cookie2");

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy `Proxy-Connection`).
// `static`, not `const`: a const array is built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop = hop_by_hop(headers);
    remove_where(headers, |n| hop(n));
}

/// A test for the hop-by-hop headers of this message: the fixed list and
/// the names its `Connection` header lists.
fn hop_by_hop(headers: &HeaderMap) -> impl Fn(&HeaderName) -> bool {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    move |n| HOP_BY_HOP.contains(n) || named.contains(n)
}

/// Removes every header `drop` selects, in one pass: a `remove` per
/// candidate name would hash and probe the map a dozen times per request
/// for headers that are mostly absent.
fn remove_where(headers: &mut HeaderMap, drop: impl Fn(&HeaderName) -> bool) {
    if !headers.keys().any(&drop) {
        return;
    }
    // `keys_len`, not `len`: capacity counts names, and thousands of values
    // of one name would overflow it.
    let old = std::mem::replace(headers, HeaderMap::with_capacity(headers.keys_len()));
    let mut current: Option<HeaderName> = None;
    for (name, value) in old {
        // `into_iter` names a header once, then yields its further values
        // with `None`.
        if let Some(name) = name {
            current = Some(name);
        }
        let name = current
            .as_ref()
            .expect("the first value comes with its name");
        if !drop(name) {
            headers.append(name.clone(), value);
        }
    }
}

/// What the gateway authenticates to Knoq with on one request.
#[derive(Clone, Copy)]
pub enum UpstreamAuth<'a> {
    /// Managed-agents routes: the user's session cookie.
    Cookie(&'a HeaderValue),
    /// SCIM routes: `Bearer <scim token>`, no cookie.
    Bearer(&'a HeaderValue),
}

/// Removes everything from a client's request headers that identifies the
/// client or is for this hop only, before the gateway adds its own
/// identity ([`attach_identity`], once per attempt).
///
/// `Host` is removed: the upstream client sets it from the upstream URL, so
/// the client's `Host` never chooses or reaches the upstream.
pub fn strip_client_identity(headers: &mut HeaderMap) {
    let hop = hop_by_hop(headers);
    // `Expect` is answered by the gateway's own server (hyper sends
    // `100 Continue` once the body is read, i.e. after authentication).
    // `Via` and `Max-Forwards` describe the client's path to us, and
    // `HTTP2-Settings` belongs to an h2c upgrade the gateway never makes:
    // none of them is about the request to Knoq.
    remove_where(headers, |n| {
        // One match on the name's text: cheaper than comparing it with a
        // list of names, header by header.
        let s = n.as_str();
        hop(n)
            || matches!(
                s,
                "authorization"
                    | "cookie"
                    | "origin"
                    | "host"
                    | "forwarded"
                    | "expect"
                    | "via"
                    | "max-forwards"
                    | "http2-settings"
                    | "x-real-ip"
            )
            || s.starts_with("x-forwarded-")
            || s.starts_with("proxy-")
    });
}

/// Sets how the gateway authenticates to Knoq on one attempt: the
/// account's cookie (or, for SCIM, the SCIM bearer) and the `Origin`
/// Knoq's CSRF guard wants. Replaces any earlier value, so a retry carries
/// the cookie current at the moment it is sent.
pub fn attach_identity(headers: &mut HeaderMap, auth: UpstreamAuth<'_>, origin: &HeaderValue) {
    match auth {
        UpstreamAuth::Cookie(cookie) => headers.insert(COOKIE, cookie.clone()),
        UpstreamAuth::Bearer(bearer) => headers.insert(AUTHORIZATION, bearer.clone()),
    };
    headers.insert(ORIGIN, origin.clone());
}

/// Takes every `Set-Cookie` line out of Knoq's response headers, for the
/// credential store. Done before any other filtering: a `Connection`
/// header naming `Set-Cookie` must not make the gateway miss a rotation.
pub fn take_set_cookies(headers: &mut HeaderMap) -> Vec<HeaderValue> {
    match headers.entry(SET_COOKIE) {
        http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
        http::header::Entry::Vacant(_) => Vec::new(),
    }
}

/// Filters Knoq's response headers for the client: hop-by-hop headers,
/// `Alt-Svc` and `Access-Control-*` go, `Set-Cookie2` too, and so does any
/// `Set-Cookie` left
/// (the Knoq client has taken them already; a cookie never reaches a
/// client whatever path a response took).
pub fn filter_response(headers: &mut HeaderMap) {
    let hop = hop_by_hop(headers);
    remove_where(headers, |n| {
        hop(n)
            || n == SET_COOKIE
            || n == SET_COOKIE2
            || n == ALT_SVC
            || n.as_str().starts_with("access-control-")
    });
}

/// The request id: a sane client-supplied `X-Request-Id` is kept (so a
/// tool can correlate its own logs), anything else is replaced.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let sane = |v: &HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
    };
    match headers.get(X_REQUEST_ID) {
        Some(v) if sane(v) => v.clone(),
        _ => generate_request_id(),
    }
}

/// A process-unique id: a random per-process prefix and a counter, so no
/// system call per request.
fn generate_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).expect("the OS random source is available");
        u32::from_le_bytes(b)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // `kgw-` + 8 hex digits + `-` + 12 hex digits, written without `format!`
    // (this runs for every request without an id of its own).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = *b"kgw-00000000-000000000000";
    for i in 0..8 {
        id[4 + i] = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    for i in 0..12 {
        id[13 + i] = HEX[((n >> (44 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Adds the IETF `RateLimit-Policy` and `RateLimit` headers
/// (draft-ietf-httpapi-ratelimit-headers, structured-field form) for one
/// window: `"message-user";q=60;w=60` and `"message-user";r=59;t=0`, where
/// `r` is what remains and `t` the seconds until it grows. A Knoq cool-down
/// has no window of ours, so it gets only `RateLimit`.
pub fn insert_rate_limit(headers: &mut HeaderMap, s: &Standing) {
    // Built by hand, not with `format!`: this runs for every metered
    // answer, and core::fmt was a visible share of the per-request cost.
    let mut value = String::with_capacity(48);
    value.push('"');
    value.push_str(s.bucket.label());
    value.push('-');
    value.push_str(s.scope.label());
    value.push('"');
    let name_len = value.len();
    let header = |v: &str| HeaderValue::from_str(v).expect("labels and digits are header-safe");
    if let Some(w) = &s.window {
        value.push_str(";q=");
        crate::units::push_decimal(&mut value, u64::from(w.limit));
        value.push_str(";w=");
        crate::units::push_decimal(&mut value, w.seconds());
        headers.insert(RATELIMIT_POLICY, header(&value));
        value.truncate(name_len);
    }
    value.push_str(";r=");
    crate::units::push_decimal(&mut value, u64::from(s.remaining));
    value.push_str(";t=");
    crate::units::push_decimal(&mut value, s.reset_ms.div_ceil(1000));
    headers.insert(RATELIMIT, header(&value));
}

/// A `Debug` view of headers that masks every credential-bearing value.
pub struct Redacted<'a>(pub &'a HeaderMap);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.0 {
            if is_secret(name) || value.is_sensitive() {
                map.entry(&name.as_str(), &"<redacted>");
            } else {
                map.entry(&name.as_str(), &value);
            }
        }
        map.finish()
    }
}

fn is_secret(name: &HeaderName) -> bool {
    [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, SET_COOKIE].contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the gateway does to a client's headers before one attempt.
    fn rewrite_request(h: &mut HeaderMap, auth: UpstreamAuth<'_>, origin: &HeaderValue) {
        strip_client_identity(h);
        attach_identity(h, auth, origin);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn request_loses_client_identity_and_gains_the_users_cookie() {
        let mut h = map(&[
            ("authorization", "Bearer kgw_x"),
            ("cookie", "evil=1"),
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=1.2.3.4"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
            ("x-forwarded-for", "5.6.7.8"),
            ("cookie", "evil=2"),
            ("x-custom", "kept too"),
        ]);
        let cookie = HeaderValue::from_static("knoq_session=abc");
        let origin = HeaderValue::from_static("https://knoq.one");
        rewrite_request(&mut h, UpstreamAuth::Cookie(&cookie), &origin);
        assert_eq!(h.get_all(COOKIE).iter().collect::<Vec<_>>(), [&cookie]);
        assert_eq!(h.get_all(ORIGIN).iter().collect::<Vec<_>>(), [&origin]);
        for gone in [
            "authorization",
            "host",
            "x-forwarded-for",
            "x-forwarded-host",
            "forwarded",
            "keep-alive",
            "te",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be gone");
        }
        assert_eq!(h["content-type"], "application/json");
        // Every value of a kept header, in order; none of a dropped one.
        assert_eq!(
            h.get_all("x-custom").iter().collect::<Vec<_>>(),
            ["kept", "kept too"]
        );
        assert_eq!(h.len(), 5, "{h:?}");
    }

    #[test]
    fn hop_and_path_headers_of_the_client_never_reach_knoq() {
        let mut h = map(&[
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("via", "1.1 corp-proxy"),
            ("max-forwards", "3"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-anything", "1"),
            ("te", "trailers, deflate"),
            ("accept", "application/json"),
        ]);
        strip_client_identity(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn set_cookie2_never_reaches_a_client() {
        let mut h = map(&[("set-cookie2", "a=b; Version=1"), ("set-cookie", "c=d")]);
        filter_response(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn naming_cookie_in_connection_cannot_strip_the_injected_cookie() {
        let mut h = map(&[
            ("connection", "cookie, origin, x-custom"),
            ("x-custom", "1"),
        ]);
        let cookie = HeaderValue::from_static("knoq_session=abc");
        let origin = HeaderValue::from_static("https://knoq.one");
        rewrite_request(&mut h, UpstreamAuth::Cookie(&cookie), &origin);
        assert_eq!(h[COOKIE], cookie);
        assert_eq!(h[ORIGIN], origin);
        assert!(!h.contains_key("x-custom"), "named in Connection");
        assert!(!h.contains_key(CONNECTION));
    }

    #[test]
    fn scim_requests_carry_the_scim_bearer_and_no_cookie() {
        let mut h = map(&[("cookie", "a=b"), ("authorization", "Bearer kgw_x")]);
        let bearer = HeaderValue::from_static("Bearer scim-secret");
        rewrite_request(
            &mut h,
            UpstreamAuth::Bearer(&bearer),
            &HeaderValue::from_static("o"),
        );
        assert_eq!(h[AUTHORIZATION], bearer);
        assert!(!h.contains_key(COOKIE));
    }

    #[test]
    fn response_loses_set_cookie_cors_alt_svc_and_hop_by_hop() {
        let mut h = map(&[
            ("set-cookie", "knoq_session=new; Path=/"),
            ("set-cookie", "other=1"),
            ("access-control-allow-origin", "*"),
            ("alt-svc", "h3=\":443\""),
            ("connection", "x-hop, set-cookie"),
            ("x-hop", "1"),
            ("content-type", "application/json"),
            ("retry-after", "3"),
        ]);
        // Named in Connection too: still handed over for rotation.
        let cookies = take_set_cookies(&mut h);
        assert_eq!(cookies.len(), 2);
        filter_response(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "retry-after"]);
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_unique_otherwise() {
        let kept = request_id(&map(&[("x-request-id", "abc-123.4:5")]));
        assert_eq!(kept, "abc-123.4:5");
        let a = request_id(&map(&[("x-request-id", "has space")]));
        let b = request_id(&HeaderMap::new());
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().starts_with("kgw-"));
        let long = "a".repeat(129);
        assert_ne!(request_id(&map(&[("x-request-id", &long)])), long.as_str());
    }

    #[test]
    fn redacted_view_masks_credentials() {
        let h = map(&[
            ("authorization", "Bearer kgw_SECRET"),
            ("cookie", "knoq_session=SECRET"),
            ("x-ok", "visible"),
        ]);
        let text = format!("{:?}", Redacted(&h));
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("visible"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("cookie".to_string()),
                Just("origin".to_string()),
                Just("authorization".to_string()),
                Just("host".to_string()),
                Just("connection".to_string()),
                Just("te".to_string()),
                Just("proxy-authorization".to_string()),
                "x-[a-z]{1,4}",
                "[a-z][a-z0-9-]{0,6}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn no_client_chosen_identity_reaches_knoq(
                headers in proptest::collection::vec((name(), "[ -~]{0,16}"), 0..12),
                named in proptest::collection::vec(name(), 0..4),
                scim in any::<bool>(),
            ) {
                let mut h = HeaderMap::new();
                for (n, v) in &headers {
                    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
                        h.append(n, v);
                    }
                }
                if !named.is_empty() {
                    h.append(CONNECTION, HeaderValue::from_str(&named.join(", ")).unwrap());
                }
                let ours = HeaderValue::from_static("knoq_session=ours");
                let bearer = HeaderValue::from_static("Bearer scim-ours");
                let origin = HeaderValue::from_static("https://knoq.one");
                strip_client_identity(&mut h);
                let auth = if scim { UpstreamAuth::Bearer(&bearer) } else { UpstreamAuth::Cookie(&ours) };
                attach_identity(&mut h, auth, &origin);
                let all = |n: HeaderName| h.get_all(n).iter().cloned().collect::<Vec<_>>();
                prop_assert_eq!(all(ORIGIN), vec![origin.clone()]);
                prop_assert!(all(http::header::HOST).is_empty());
                if scim {
                    prop_assert_eq!(all(AUTHORIZATION), vec![bearer.clone()]);
                    prop_assert!(all(COOKIE).is_empty());
                } else {
                    prop_assert_eq!(all(COOKIE), vec![ours.clone()]);
                    prop_assert!(all(AUTHORIZATION).is_empty());
                }
                prop_assert!(!h.keys().any(|k| k.as_str().starts_with("proxy-") || k == TE || k == CONNECTION));
            }
        }
    }
}
