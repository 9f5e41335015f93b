//! Routing stage: which Knoq endpoint a request is for, decided on a path
//! that has been checked to be in normal form.
//!
//! The gateway never rewrites a path: it refuses any path whose meaning
//! could differ between the gateway and Knoq. Rather than list known tricks
//! (`..;`, `%252e`, overlong UTF-8, fullwidth slashes, matrix parameters...),
//! a path may hold only the characters Knoq's endpoints and ids use:
//! letters, digits, `-` `.` `_` `~` `@` `:` and `/`; no percent-escapes, no
//! dot segments, no empty segments. What it forwards is byte for byte what
//! it classified. Only two trees are reachable: `/api/managed-agents/...`
//! (cookie auth) and `/api/scim/...` (SCIM bearer auth).
//!
//! Contract: a pure function of method and path; `Err` becomes 400 or 404
//! in `error.rs`.

use http::Method;

const MANAGED: &str = "/api/managed-agents/";
const SCIM: &str = "/api/scim/";

/// The Knoq endpoint a request is for. `label()` is the bounded set used in
/// logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    SessionCreate,
    SessionsList,
    SessionDelete,
    MessageSend,
    Transcript,
    Cancel,
    Scim,
    /// Any other path under `/api/managed-agents/`: forwarded, Knoq decides.
    Other,
}

impl Route {
    pub const ALL: [Route; 8] = [
        Route::SessionCreate,
        Route::SessionsList,
        Route::SessionDelete,
        Route::MessageSend,
        Route::Transcript,
        Route::Cancel,
        Route::Scim,
        Route::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Route::SessionCreate => "session_create",
            Route::SessionsList => "sessions_list",
            Route::SessionDelete => "session_delete",
            Route::MessageSend => "message_send",
            Route::Transcript => "transcript",
            Route::Cancel => "cancel",
            Route::Scim => "scim",
            Route::Other => "other",
        }
    }

    /// SCIM routes authenticate upstream with the SCIM token, not a cookie.
    pub fn is_scim(self) -> bool {
        self == Route::Scim
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must not contain dot segments (`.` or `..`)")]
    DotSegment,
    #[error("the path must not contain empty segments (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("the path must not contain percent-escapes")]
    Escaped,
    #[error("the path may hold only letters, digits, '-', '.', '_', '~', '@', ':' and '/'")]
    ForbiddenChar,
    #[error("only /api/managed-agents/... and /api/scim/... are served")]
    NotFound,
}

impl PathError {
    /// `NotFound` is a 404; every other refusal is a malformed request.
    pub fn is_not_found(self) -> bool {
        self == PathError::NotFound
    }
}

/// Checks `path` is in normal form and names a served tree, then classifies.
pub fn classify(method: &Method, path: &str) -> Result<Route, PathError> {
    check_normal_form(path)?;
    if let Some(rest) = path.strip_prefix(MANAGED) {
        let route = match (method, rest) {
            (&Method::POST, "session") => Route::SessionCreate,
            (&Method::DELETE, "session") => Route::SessionDelete,
            (&Method::GET, "sessions") => Route::SessionsList,
            (&Method::POST, "message") => Route::MessageSend,
            (&Method::GET, "transcript") => Route::Transcript,
            (&Method::POST, "cancel") => Route::Cancel,
            _ => Route::Other,
        };
        return Ok(route);
    }
    if path.starts_with(SCIM) {
        return Ok(Route::Scim);
    }
    Err(PathError::NotFound)
}

/// Refuses every path whose meaning a server could normalise differently.
fn check_normal_form(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || path == "/" {
        return Err(PathError::NotFound);
    }
    for &b in bytes {
        match b {
            b'%' => return Err(PathError::Escaped),
            b if b.is_ascii_alphanumeric() || b"-._~@:/".contains(&b) => {}
            _ => return Err(PathError::ForbiddenChar),
        }
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(PathError::EmptySegment),
            "." | ".." => return Err(PathError::DotSegment),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_knoq_endpoint_has_its_route() {
        let cases = [
            (
                Method::POST,
                "/api/managed-agents/session",
                Route::SessionCreate,
            ),
            (
                Method::DELETE,
                "/api/managed-agents/session",
                Route::SessionDelete,
            ),
            (
                Method::GET,
                "/api/managed-agents/sessions",
                Route::SessionsList,
            ),
            (
                Method::POST,
                "/api/managed-agents/message",
                Route::MessageSend,
            ),
            (
                Method::GET,
                "/api/managed-agents/transcript",
                Route::Transcript,
            ),
            (Method::POST, "/api/managed-agents/cancel", Route::Cancel),
            (Method::GET, "/api/scim/v2/Users", Route::Scim),
            (Method::PATCH, "/api/scim/Users/u1", Route::Scim),
            (Method::GET, "/api/managed-agents/session", Route::Other),
            (
                Method::GET,
                "/api/managed-agents/something-new",
                Route::Other,
            ),
        ];
        for (m, p, r) in cases {
            assert_eq!(classify(&m, p), Ok(r), "{m} {p}");
        }
    }

    #[test]
    fn paths_outside_the_two_trees_are_not_found() {
        for p in [
            "/",
            "/api",
            "/api/managed-agents",
            "/api/scim",
            "/api/other/x",
            "/_sim/requests",
            "*",
        ] {
            assert_eq!(classify(&Method::GET, p), Err(PathError::NotFound), "{p}");
        }
    }

    #[test]
    fn traversal_and_its_encodings_are_refused() {
        let cases = [
            ("/api/managed-agents/../scim/Users", PathError::DotSegment),
            ("/api/managed-agents/./session", PathError::DotSegment),
            ("/api/scim/..", PathError::DotSegment),
            ("/api/managed-agents/%2e%2e/x", PathError::Escaped),
            ("/api/managed-agents/a%2Fb", PathError::Escaped),
            ("/api/managed-agents/%252e%252e/x", PathError::Escaped),
            ("/api/managed-agents/%c0%ae%c0%ae/x", PathError::Escaped),
            ("/api/managed-agents/%ef%bc%8fscim", PathError::Escaped),
            ("/api/managed-agents/x%20y", PathError::Escaped),
            ("/api/managed-agents/a\\b", PathError::ForbiddenChar),
            (
                "/api/managed-agents/..;/scim/v2/Users",
                PathError::ForbiddenChar,
            ),
            ("/api/managed-agents/sessions;x=1", PathError::ForbiddenChar),
            ("/api/managed-agents/caf\u{e9}", PathError::ForbiddenChar),
            ("/api/managed-agents//session", PathError::EmptySegment),
            ("/api/managed-agents/session/", PathError::EmptySegment),
            ("//api/managed-agents/session", PathError::EmptySegment),
        ];
        for (p, e) in cases {
            assert_eq!(classify(&Method::GET, p), Err(e), "{p}");
        }
    }

    #[test]
    fn ids_and_names_knoq_uses_pass() {
        for p in [
            "/api/scim/v2/Users/2819c223-7f76-453a-919d-413861904646",
            "/api/scim/Users/alice@example.com",
            "/api/scim/v2/Users/urn:x:1",
        ] {
            assert_eq!(classify(&Method::GET, p), Ok(Route::Scim), "{p}");
        }
    }

    #[test]
    fn labels_are_the_documented_set() {
        let labels: Vec<_> = Route::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "session_create",
                "sessions_list",
                "session_delete",
                "message_send",
                "transcript",
                "cancel",
                "scim",
                "other"
            ]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Paths built from the characters that matter: separators, dots,
        /// escapes, the allowed set and a few that are not.
        fn path() -> impl Strategy<Value = String> {
            prop_oneof![
                "(/[a-z0-9._~@:%;\\\\-]{0,5}){1,5}/?",
                "/api/managed-agents/[a-z./%-]{0,14}",
                "/api/scim/[A-Za-z0-9./%]{0,14}",
                "\\PC{0,24}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn an_accepted_path_is_its_own_normal_form_under_a_served_prefix(p in path()) {
                let method = Method::GET;
                if classify(&method, &p).is_ok() {
                    prop_assert!(p.starts_with(MANAGED) || p.starts_with(SCIM), "{p}");
                    prop_assert!(
                        p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~@:/".contains(&b)),
                        "{p}"
                    );
                    prop_assert!(
                        p.split('/').skip(1).all(|s| !s.is_empty() && s != "." && s != ".."),
                        "{p}"
                    );
                }
            }
        }
    }
}
