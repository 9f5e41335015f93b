//! Request hygiene: the checks a request head must pass before the gateway
//! authenticates it or reads a byte of its body.
//!
//! These are the edge-proxy hardening rules: only origin-form targets, a
//! short list of methods (a `TRACE` echo would hand the injected cookie
//! back), no header names with `_` (some servers treat `X_Foo` as `X-Foo`,
//! a smuggling vector), no ambiguous body framing, a bounded head size, and
//! a `Host` from an allow list (a DNS-rebinding guard: a web page that
//! resolved its own name to 127.0.0.1 sends its own name as `Host`).
//!
//! Contract: pure function of the request head; `Err` becomes 400, 405, 421
//! or 431 in `error.rs`.

use http::header::{CONTENT_LENGTH, EXPECT, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::{Method, Version};

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HygieneError {
    #[error("the request target must be a path (origin-form), not an absolute URL or host:port")]
    NotOriginForm,
    #[error("method {0} is not allowed; use GET, HEAD, POST, PUT, PATCH, DELETE or OPTIONS")]
    MethodNotAllowed(Method),
    #[error("header names must not contain '_'")]
    UnderscoreHeader,
    #[error("the request has ambiguous framing (Content-Length with Transfer-Encoding, or several Content-Length headers)")]
    AmbiguousFraming,
    #[error("the request head is larger than {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("the Host header is missing")]
    MissingHost,
    #[error("the request names its host more than once, or differently in Host and :authority")]
    AmbiguousHost,
    #[error("only `Expect: 100-continue` is supported")]
    UnsupportedExpectation,
    #[error("this gateway does not serve that host name; use one of server.allowed_hosts")]
    MisdirectedHost,
}

/// What hygiene needs from the config, precomputed once.
#[derive(Debug, Clone)]
pub struct HygieneRules {
    pub max_header_bytes: usize,
    /// Lower-case host names, no port.
    pub allowed_hosts: Vec<String>,
}

pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

impl HygieneRules {
    pub fn check(&self, parts: &Parts) -> Result<(), HygieneError> {
        let is_h2 = parts.version == Version::HTTP_2;
        // HTTP/2 always carries scheme and authority pseudo-headers, so the
        // parsed URI has them; in HTTP/1 they mean absolute or authority form.
        if !is_h2 && (parts.uri.scheme().is_some() || parts.uri.authority().is_some()) {
            return Err(HygieneError::NotOriginForm);
        }
        let allowed = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::POST
                | Method::PUT
                | Method::PATCH
                | Method::DELETE
                | Method::OPTIONS
        );
        if !allowed {
            return Err(HygieneError::MethodNotAllowed(parts.method.clone()));
        }
        let mut size = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len()) + 16;
        for (name, value) in &parts.headers {
            if name.as_str().contains('_') {
                return Err(HygieneError::UnderscoreHeader);
            }
            size += name.as_str().len() + value.len() + 4;
        }
        if size > self.max_header_bytes {
            return Err(HygieneError::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        let lengths = parts.headers.get_all(CONTENT_LENGTH).iter().count();
        if lengths > 1 || (lengths == 1 && parts.headers.contains_key(TRANSFER_ENCODING)) {
            return Err(HygieneError::AmbiguousFraming);
        }
        if let Some(expect) = parts.headers.get(EXPECT) {
            if !expect.as_bytes().eq_ignore_ascii_case(b"100-continue") {
                return Err(HygieneError::UnsupportedExpectation);
            }
        }
        self.check_host(parts)
    }

    /// The DNS-rebinding guard: exactly one host name, from the allow list.
    /// HTTP/2 carries it in `:authority` (the URI); a `Host` header, if
    /// also present, must say the same.
    pub fn check_host(&self, parts: &Parts) -> Result<(), HygieneError> {
        let mut hosts = parts.headers.get_all(HOST).iter();
        let header = hosts.next();
        if hosts.next().is_some() {
            return Err(HygieneError::AmbiguousHost);
        }
        let header = match header {
            Some(h) => Some(h.to_str().map_err(|_| HygieneError::MisdirectedHost)?),
            None => None,
        };
        let authority = parts.uri.authority().map(|a| a.as_str());
        let host = match (header, authority) {
            (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a) => {
                return Err(HygieneError::AmbiguousHost)
            }
            (Some(h), _) => h,
            (None, Some(a)) => a,
            (None, None) if parts.version == Version::HTTP_10 => return Ok(()),
            (None, None) => return Err(HygieneError::MissingHost),
        };
        match host_name(host) {
            Some(name)
                if self
                    .allowed_hosts
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(name)) =>
            {
                Ok(())
            }
            _ => Err(HygieneError::MisdirectedHost),
        }
    }
}

/// `host[:port]` to `host`, keeping IPv6 brackets (`[::1]:80` to `[::1]`);
/// `None` when the port is not a number (`localhost:@evil.example`).
fn host_name(host: &str) -> Option<&str> {
    let (name, port) = if host.starts_with('[') {
        let end = host.find(']')?;
        (&host[..=end], host[end + 1..].strip_prefix(':'))
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    match port {
        Some(p) if p.parse::<u16>().is_err() => None,
        _ => Some(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn rules() -> HygieneRules {
        HygieneRules {
            max_header_bytes: 1024,
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()],
        }
    }

    fn check(req: Request<()>) -> Result<(), HygieneError> {
        rules().check(&req.into_parts().0)
    }

    fn get(uri: &str) -> http::request::Builder {
        Request::get(uri).header("host", "127.0.0.1:8080")
    }

    #[test]
    fn a_plain_request_passes() {
        assert_eq!(
            check(get("/api/managed-agents/sessions").body(()).unwrap()),
            Ok(())
        );
        let v6 = Request::get("/x")
            .header("host", "[::1]:8080")
            .body(())
            .unwrap();
        assert_eq!(check(v6), Ok(()));
        let named = Request::get("/x")
            .header("host", "LOCALHOST")
            .body(())
            .unwrap();
        assert_eq!(check(named), Ok(()));
    }

    #[test]
    fn absolute_and_authority_targets_are_refused() {
        let abs = get("http://knoq.one/api/managed-agents/sessions")
            .body(())
            .unwrap();
        assert_eq!(check(abs), Err(HygieneError::NotOriginForm));
        let auth = Request::connect("knoq.one:443")
            .header("host", "localhost")
            .body(())
            .unwrap();
        assert_eq!(check(auth), Err(HygieneError::NotOriginForm));
    }

    #[test]
    fn trace_and_connect_are_not_allowed() {
        let trace = get("/x").method(Method::TRACE).body(()).unwrap();
        assert_eq!(
            check(trace),
            Err(HygieneError::MethodNotAllowed(Method::TRACE))
        );
        let custom = get("/x").method("PROPFIND").body(()).unwrap();
        assert!(matches!(
            check(custom),
            Err(HygieneError::MethodNotAllowed(_))
        ));
    }

    #[test]
    fn underscore_headers_and_ambiguous_framing_are_refused() {
        let u = get("/x").header("x_api_key", "1").body(()).unwrap();
        assert_eq!(check(u), Err(HygieneError::UnderscoreHeader));
        let clte = get("/x")
            .header("content-length", "5")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        assert_eq!(check(clte), Err(HygieneError::AmbiguousFraming));
        let two = get("/x")
            .header("content-length", "5")
            .header("content-length", "5")
            .body(())
            .unwrap();
        assert_eq!(check(two), Err(HygieneError::AmbiguousFraming));
    }

    #[test]
    fn head_size_is_bounded_at_the_limit() {
        // 16 (allowance) + 2 (path) + host (4+14+4) = 40; fill up to exactly 1024.
        let fill = 1024 - 40 - (1 + 4);
        let at = get("/x").header("x", "a".repeat(fill)).body(()).unwrap();
        assert_eq!(check(at), Ok(()));
        let over = get("/x")
            .header("x", "a".repeat(fill + 1))
            .body(())
            .unwrap();
        assert_eq!(
            check(over),
            Err(HygieneError::HeadersTooLarge { limit: 1024 })
        );
    }

    #[test]
    fn foreign_hosts_are_misdirected() {
        let evil = Request::get("/x")
            .header("host", "evil.example:8080")
            .body(())
            .unwrap();
        assert_eq!(check(evil), Err(HygieneError::MisdirectedHost));
        let tricky = Request::get("/x")
            .header("host", "localhost.evil.example")
            .body(())
            .unwrap();
        assert_eq!(check(tricky), Err(HygieneError::MisdirectedHost));
        let none = Request::get("/x").body(()).unwrap();
        assert_eq!(check(none), Err(HygieneError::MissingHost));
        let userinfo = Request::get("/x")
            .header("host", "localhost:@evil.example")
            .body(())
            .unwrap();
        assert_eq!(check(userinfo), Err(HygieneError::MisdirectedHost));
        let two = Request::get("/x")
            .header("host", "localhost")
            .header("host", "evil.example")
            .body(())
            .unwrap();
        assert_eq!(check(two), Err(HygieneError::AmbiguousHost));
    }

    #[test]
    fn http2_authority_is_checked_and_must_match_host() {
        let h2 = |authority: &str, host: Option<&str>| {
            let mut b = Request::get(format!("http://{authority}/x")).version(Version::HTTP_2);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            check(b.body(()).unwrap())
        };
        assert_eq!(h2("127.0.0.1:8080", None), Ok(()));
        assert_eq!(h2("evil.example", None), Err(HygieneError::MisdirectedHost));
        assert_eq!(
            h2("evil.example", Some("127.0.0.1")),
            Err(HygieneError::AmbiguousHost)
        );
    }

    #[test]
    fn only_100_continue_is_an_acceptable_expectation() {
        let ok = get("/x").header("expect", "100-Continue").body(()).unwrap();
        assert_eq!(check(ok), Ok(()));
        let odd = get("/x")
            .header("expect", "something-else")
            .body(())
            .unwrap();
        assert_eq!(check(odd), Err(HygieneError::UnsupportedExpectation));
    }
}
