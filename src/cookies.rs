//! Cookie arithmetic: applying Knoq's `Set-Cookie` lines to a stored
//! `Cookie` header value. Pure functions; the credential store persists
//! and publishes the result.
//!
//! Only the names a `Set-Cookie` sets change; every other pair is kept in
//! place. `Max-Age=0` (or negative), or an `Expires` in the past, removes
//! the pair. Attributes (`Path`, `Domain`, `Secure`, ...) do not travel in a
//! `Cookie` header and are dropped.

use crate::clock::Millis;

/// One `Set-Cookie` line, reduced to what matters for the `Cookie` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCookie {
    pub name: String,
    pub value: String,
    /// The cookie is being deleted.
    pub remove: bool,
}

/// Parses a `Set-Cookie` value; `None` when it has no `name=value` pair.
pub fn parse_set_cookie(line: &str, now: Millis) -> Option<SetCookie> {
    let mut parts = line.split(';');
    let (name, value) = parts.next()?.split_once('=')?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    {
        return None;
    }
    // RFC 6265 §4.1.1: `*cookie-octet`, or the same in one pair of quotes.
    // Anything else (a quote, comma, semicolon or backslash inside, spaces,
    // controls) could be read differently by Knoq and by us: refused.
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if !value.bytes().all(is_cookie_octet) {
        return None;
    }
    let mut remove = false;
    for attr in parts {
        let (key, val) = attr.split_once('=').unwrap_or((attr, ""));
        let removal = match key.trim().to_ascii_lowercase().as_str() {
            "max-age" => val.trim().parse::<i64>().is_ok_and(|secs| secs <= 0),
            "expires" => crate::clock::parse_http_date_ms(val.trim()).is_some_and(|t| t <= now),
            _ => false,
        };
        remove |= removal;
    }
    Some(SetCookie {
        name: name.to_string(),
        value: value.to_string(),
        remove,
    })
}

/// RFC 6265's `cookie-octet`: printable ASCII but space, `"`, `,`, `;`, `\\`.
fn is_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// Applies `changes` to a `Cookie` header value (`a=1; b=2`), keeping the
/// order of untouched pairs and appending new names at the end.
pub fn merge(cookie: &str, changes: &[SetCookie]) -> String {
    let mut pairs: Vec<(String, String)> = cookie
        .split(';')
        .filter_map(|p| {
            let (n, v) = p.trim().split_once('=')?;
            Some((n.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    for change in changes {
        let at = pairs.iter().position(|(n, _)| *n == change.name);
        match (at, change.remove) {
            (Some(i), true) => {
                pairs.remove(i);
            }
            (Some(i), false) => pairs[i].1 = change.value.clone(),
            (None, false) => pairs.push((change.name.clone(), change.value.clone())),
            (None, true) => {}
        }
    }
    pairs
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const NOW: Millis = 1_795_942_561_204; // 2026-11-29T08:56:01.204Z

    fn sc(line: &str) -> SetCookie {
        parse_set_cookie(line, NOW).unwrap()
    }

    #[test]
    fn set_cookie_lines_reduce_to_name_value_and_removal() {
        let c =
            sc("knoq_session=new-value; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age=2592000");
        assert_eq!(
            (c.name.as_str(), c.value.as_str(), c.remove),
            ("knoq_session", "new-value", false)
        );
        assert!(sc("other=; Max-Age=0").remove);
        assert!(sc("other=x; max-age=-1").remove);
        assert!(sc("other=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT").remove);
        assert!(!sc("other=x; Expires=Fri, 01 Jan 2100 00:00:00 GMT").remove);
        assert_eq!(sc("q=\"quoted\"").value, "quoted");
        assert_eq!(parse_set_cookie("no pair here", NOW), None);
        assert_eq!(parse_set_cookie("=x", NOW), None);
        assert_eq!(parse_set_cookie("a=b\u{7f}", NOW), None);
        // A quote, comma or backslash inside a value: Knoq might read it
        // differently, so it is not applied.
        for bad in ["a=x\"y", "a=\"x", "a=x,y", "a=x\\y", "a=x y"] {
            assert_eq!(parse_set_cookie(bad, NOW), None, "{bad}");
        }
    }

    #[test]
    fn merge_changes_only_the_names_set() {
        let stored = "knoq_session=old; theme=dark; other=1";
        let merged = merge(
            stored,
            &[
                sc("knoq_session=new; Path=/"),
                sc("other=; Max-Age=0"),
                sc("fresh=2"),
            ],
        );
        assert_eq!(merged, "knoq_session=new; theme=dark; fresh=2");
        assert_eq!(merge(stored, &[sc("absent=; Max-Age=0")]), stored);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// RFC 6265 `cookie-octet`: what a value may hold so that every
        /// parser reads the same pairs.
        fn cookie_octet(b: u8) -> bool {
            matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
        }

        fn token(b: u8) -> bool {
            b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn a_merged_cookie_reads_back_as_the_same_unambiguous_pairs(
                stored in proptest::collection::btree_map("[a-z_]{1,6}", "[a-zA-Z0-9-]{0,8}", 0..5),
                lines in proptest::collection::vec(
                    prop_oneof!["[a-z_]{1,6}=[ -~]{0,12}(; [A-Za-z-]{1,8}(=[ -~]{0,8})?){0,2}", "[ -~]{0,30}"],
                    0..6,
                ),
            ) {
                let cookie = stored.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join("; ");
                let changes: Vec<SetCookie> = lines.iter().filter_map(|l| parse_set_cookie(l, NOW)).collect();
                let merged = merge(&cookie, &changes);
                prop_assert!(HeaderValue::from_str(&merged).is_ok(), "{merged:?}");
                let mut names = std::collections::HashSet::new();
                for pair in merged.split("; ").filter(|p| !p.is_empty()) {
                    let (n, v) = pair.split_once('=').expect("every pair is name=value");
                    prop_assert!(!n.is_empty() && n.bytes().all(token), "name {n:?} in {merged:?}");
                    prop_assert!(v.bytes().all(cookie_octet), "value {v:?} in {merged:?}");
                    prop_assert!(names.insert(n.to_string()), "{n} twice in {merged:?}");
                }
            }
        }
    }
}
