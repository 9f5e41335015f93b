//! SCIM attribute handling: names, validation, PATCH operations, filters.
//!
//! SCIM attribute names are case-insensitive; known core attributes are
//! stored under their canonical spelling so that `UserName` and `userName`
//! are one attribute.

use serde_json::{json, Map, Value};

use super::invalid;
use crate::reply::Reply;

/// Attribute names with their canonical spelling; SCIM names are case-insensitive.
const CANONICAL: [&str; 8] = [
    "userName",
    "active",
    "displayName",
    "externalId",
    "name",
    "emails",
    "nickName",
    "title",
];

pub(super) fn apply_operation(
    attrs: &mut Map<String, Value>,
    operation: &Value,
) -> Result<(), Reply> {
    let op = operation
        .get("op")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let path = operation.get("path").and_then(Value::as_str);
    let value = operation.get("value");
    match (op.as_str(), path, value) {
        ("add" | "replace", None, Some(Value::Object(map))) => {
            for (key, value) in map {
                set_path(attrs, key, value.clone())?;
            }
            Ok(())
        }
        ("add" | "replace", Some(path), Some(value)) => set_path(attrs, path, value.clone()),
        ("remove", Some(path), _) => remove_path(attrs, path),
        _ => Err(invalid("invalidSyntax", "unsupported PATCH operation")),
    }
}

/// Sets `attr` or `attr.sub`, matching existing names case-insensitively.
fn set_path(attrs: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), Reply> {
    if path.contains('[') {
        return Err(invalid("invalidPath", "filtered paths are not supported"));
    }
    match path.split_once('.') {
        None => {
            let key = key_for(attrs, path);
            attrs.insert(key, value);
        }
        Some((parent, child)) => {
            let key = key_for(attrs, parent);
            let entry = attrs.entry(key).or_insert_with(|| json!({}));
            let Value::Object(object) = entry else {
                return Err(invalid(
                    "invalidPath",
                    "path does not name a complex attribute",
                ));
            };
            let child_key = key_for(object, child);
            object.insert(child_key, value);
        }
    }
    Ok(())
}

fn remove_path(attrs: &mut Map<String, Value>, path: &str) -> Result<(), Reply> {
    if path.contains('[') {
        return Err(invalid("invalidPath", "filtered paths are not supported"));
    }
    match path.split_once('.') {
        None => {
            attrs.remove(&key_for(attrs, path));
        }
        Some((parent, child)) => {
            if let Some(Value::Object(object)) = attrs.get_mut(&key_for(attrs, parent)) {
                object.remove(&key_for(object, child));
            }
        }
    }
    Ok(())
}

/// The key to use for `name`: an existing key equal ignoring case, else the
/// canonical spelling of a known attribute, else `name` itself.
fn key_for(attrs: &Map<String, Value>, name: &str) -> String {
    match attrs.keys().find(|k| k.eq_ignore_ascii_case(name)) {
        Some(existing) => existing.clone(),
        None => canonical(name),
    }
}

pub(super) fn canonical(name: &str) -> String {
    CANONICAL
        .iter()
        .find(|c| c.eq_ignore_ascii_case(name))
        .map_or_else(|| name.to_string(), |c| (*c).to_string())
}

/// Checks and normalises a user's attributes: drops `id`, `schemas` and
/// `meta`, canonicalises known names, requires a non-empty `userName`, and
/// makes `active` a boolean (default true; IdPs that send `"False"` are
/// forgiven).
pub(super) fn validate(raw: Map<String, Value>) -> Result<Map<String, Value>, Reply> {
    let mut attrs = Map::new();
    for (key, value) in raw {
        let key = canonical(&key);
        if !matches!(key.as_str(), "id" | "schemas" | "meta") {
            attrs.insert(key, value);
        }
    }
    let user_name_ok = attrs
        .get("userName")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty());
    if !user_name_ok {
        return Err(invalid("invalidValue", "userName is required"));
    }
    let active = match attrs.get("active") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
        Some(_) => return Err(invalid("invalidValue", "active must be a boolean")),
    };
    attrs.insert("active".to_string(), Value::Bool(active));
    Ok(attrs)
}

/// `attr eq "value"` for `userName` or `externalId`; anything else is a 400.
pub(super) fn parse_filter(text: &str) -> Result<(String, String), Reply> {
    let bad = || {
        invalid(
            "invalidFilter",
            "only 'userName eq \"...\"' and 'externalId eq \"...\"' filters are supported",
        )
    };
    let mut parts = text.trim().splitn(3, ' ');
    let (Some(attr), Some(op), Some(value)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let attr = canonical(attr);
    if !op.eq_ignore_ascii_case("eq") || !matches!(attr.as_str(), "userName" | "externalId") {
        return Err(bad());
    }
    let value = value
        .trim()
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .ok_or_else(bad)?;
    Ok((attr, value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_requires_user_name_and_normalises_active() {
        let attrs = validate(
            json!({"UserName": "a@x", "Active": "False", "id": "forged"})
                .as_object()
                .cloned()
                .expect("object"),
        )
        .expect("valid");
        assert_eq!(attrs.get("userName"), Some(&json!("a@x")));
        assert_eq!(attrs.get("active"), Some(&json!(false)));
        assert!(!attrs.contains_key("id"));
        assert!(validate(Map::new()).is_err());
    }

    #[test]
    fn patch_paths() {
        let mut attrs = Map::new();
        apply_operation(
            &mut attrs,
            &json!({"op": "Replace", "path": "name.givenName", "value": "Ann"}),
        )
        .expect("ok");
        apply_operation(
            &mut attrs,
            &json!({"op": "add", "value": {"active": false}}),
        )
        .expect("ok");
        assert_eq!(attrs["name"]["givenName"], json!("Ann"));
        assert_eq!(attrs["active"], json!(false));
        apply_operation(
            &mut attrs,
            &json!({"op": "remove", "path": "name.givenName"}),
        )
        .expect("ok");
        assert_eq!(attrs["name"], json!({}));
        assert!(apply_operation(
            &mut attrs,
            &json!({"op": "remove", "path": "emails[type eq \"work\"]"})
        )
        .is_err());
    }

    #[test]
    fn filters() {
        assert_eq!(
            parse_filter("userName eq \"a b@x\"").ok(),
            Some(("userName".to_string(), "a b@x".to_string()))
        );
        assert!(parse_filter("userName co \"a\"").is_err());
        assert!(parse_filter("emails eq \"a\"").is_err());
    }
}
