//! SCIM 2.0 user provisioning, modest but correct in shape.
//!
//! Served under both `/api/scim` and `/api/scim/v2`. `Authorization: Bearer
//! <scim_token>` is required (401 without or with a wrong one, no cookie
//! needed); with no token configured the plan "lacks the feature" and every
//! call is 403.
//!
//! Supported: `POST/GET /Users`, `GET/PUT/PATCH/DELETE /Users/{id}`, `GET
//! /Groups[/{id}]` (one built-in "Viewers" group whose members are the active
//! users, as Knoq provisions users as viewers). `GET /Users` understands
//! `filter=userName eq "x"` (and `externalId eq`), `startIndex` and `count`.
//! PATCH understands `add`/`replace`/`remove` on plain or dotted paths
//! (`active`, `name.givenName`), not filtered paths like `emails[type eq ..]`.
//!
//! Error bodies are SCIM error objects that also carry Knoq's `error` field,
//! so they satisfy both conventions. A DELETE answers 204 with no body, as
//! RFC 7644 §3.6 requires: the one answer that is not a JSON object.

mod attrs;

use std::sync::{Mutex, MutexGuard, PoisonError};

use http::header::{AUTHORIZATION, LOCATION};
use http::{HeaderValue, Method, StatusCode};
use serde_json::{json, Map, Value};

use self::attrs::{apply_operation, parse_filter, validate};
use super::clock::SimClock;
use super::reply::{random_id, Reply, SimRequest};
use super::state::Shared;

const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// The built-in group every provisioned user belongs to.
const VIEWERS_GROUP_ID: &str = "grp_viewers";

/// Default and maximum page size of `GET /Users`.
const MAX_COUNT: usize = 100;

/// Provisioned users, in creation order, behind one lock (SCIM traffic is rare).
#[derive(Debug, Default)]
pub(super) struct ScimDirectory {
    users: Mutex<Vec<ScimUser>>,
}

#[derive(Debug, Clone)]
struct ScimUser {
    id: String,
    /// Every attribute except `id`, `schemas` and `meta`; always holds a
    /// non-empty `userName` and a boolean `active`.
    attrs: Map<String, Value>,
    created: String,
    last_modified: String,
}

/// Handles a request under `/api/scim`.
pub(super) fn handle(shared: &Shared, req: &SimRequest) -> Reply {
    let Some(token) = shared.scim_token.as_deref() else {
        return error(
            StatusCode::FORBIDDEN,
            None,
            "SCIM is not available on this plan",
        );
    };
    if bearer(req) != Some(token) {
        return error(
            StatusCode::UNAUTHORIZED,
            None,
            "invalid or missing SCIM token",
        );
    }
    let (base, rest) = match req.path.strip_prefix("/api/scim/v2/") {
        Some(rest) => ("/api/scim/v2", rest),
        None => (
            "/api/scim",
            req.path.strip_prefix("/api/scim/").unwrap_or(""),
        ),
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let mut users = shared.scim.lock();
    let clock = &shared.clock;
    let result = match (&req.method, segments.as_slice()) {
        (&Method::GET, ["Users"]) => list_users(&users, req, base),
        (&Method::POST, ["Users"]) => create_user(&mut users, req, base, clock),
        (&Method::GET, ["Users", id]) => find(&users, id).map(|u| Reply::ok(u.render(base))),
        (&Method::PUT, ["Users", id]) => replace_user(&mut users, req, id, base, clock),
        (&Method::PATCH, ["Users", id]) => patch_user(&mut users, req, id, base, clock),
        (&Method::DELETE, ["Users", id]) => delete_user(&mut users, id),
        (&Method::GET, ["Groups"]) => Ok(list(vec![viewers(&users, base)], 1, 1)),
        (&Method::GET, ["Groups", VIEWERS_GROUP_ID]) => Ok(Reply::ok(viewers(&users, base))),
        (_, ["Users" | "Groups"]) | (_, ["Users", _]) => Err(error(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            "method not allowed",
        )),
        _ => Err(error(StatusCode::NOT_FOUND, None, "resource not found")),
    };
    result.unwrap_or_else(|error_reply| error_reply)
}

fn list_users(users: &[ScimUser], req: &SimRequest, base: &str) -> Result<Reply, Reply> {
    let filter = match req.query_param("filter") {
        Some(text) => Some(parse_filter(&text)?),
        None => None,
    };
    let matching: Vec<&ScimUser> = users
        .iter()
        .filter(|u| {
            filter
                .as_ref()
                .is_none_or(|(attr, value)| u.matches(attr, value))
        })
        .collect();
    let start = req
        .query_param("startIndex")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let count = req
        .query_param("count")
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(MAX_COUNT)
        .min(MAX_COUNT);
    let total = matching.len();
    let page: Vec<Value> = matching
        .into_iter()
        .skip(start - 1)
        .take(count)
        .map(|u| u.render(base))
        .collect();
    Ok(list(page, start, total))
}

fn create_user(
    users: &mut Vec<ScimUser>,
    req: &SimRequest,
    base: &str,
    clock: &SimClock,
) -> Result<Reply, Reply> {
    let attrs = validate(body_object(req)?)?;
    ensure_unique(users, &attrs, None)?;
    let now = clock.now_rfc3339();
    let user = ScimUser {
        id: uuid_like(),
        attrs,
        created: now.clone(),
        last_modified: now,
    };
    let mut reply = Reply::json(StatusCode::CREATED, user.render(base).to_string());
    if let Ok(location) = HeaderValue::from_str(&user.location(base)) {
        reply.headers.push((LOCATION, location));
    }
    users.push(user);
    Ok(reply)
}

fn replace_user(
    users: &mut [ScimUser],
    req: &SimRequest,
    id: &str,
    base: &str,
    clock: &SimClock,
) -> Result<Reply, Reply> {
    find(users, id)?;
    let attrs = validate(body_object(req)?)?;
    ensure_unique(users, &attrs, Some(id))?;
    update(users, id, attrs, base, clock)
}

/// `PATCH` with a SCIM PatchOp. `"active": false` is Knoq's full deprovision;
/// here it just makes the user inactive (and drops it from the group).
fn patch_user(
    users: &mut [ScimUser],
    req: &SimRequest,
    id: &str,
    base: &str,
    clock: &SimClock,
) -> Result<Reply, Reply> {
    let mut attrs = find(users, id)?.attrs.clone();
    let body = body_object(req)?;
    let operations = body
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("Operations"))
        .and_then(|(_, v)| v.as_array())
        .ok_or_else(|| invalid("invalidSyntax", "Operations is required"))?;
    for operation in operations {
        apply_operation(&mut attrs, operation)?;
    }
    let attrs = validate(attrs)?;
    ensure_unique(users, &attrs, Some(id))?;
    update(users, id, attrs, base, clock)
}

fn delete_user(users: &mut Vec<ScimUser>, id: &str) -> Result<Reply, Reply> {
    find(users, id)?;
    users.retain(|u| u.id != id);
    Ok(Reply::no_content())
}

fn update(
    users: &mut [ScimUser],
    id: &str,
    attrs: Map<String, Value>,
    base: &str,
    clock: &SimClock,
) -> Result<Reply, Reply> {
    let user = users
        .iter_mut()
        .find(|u| u.id == id)
        .ok_or_else(user_not_found)?;
    user.attrs = attrs;
    user.last_modified = clock.now_rfc3339();
    Ok(Reply::ok(user.render(base)))
}

/// 409 if another user (not `except`) has the same userName, ignoring case.
fn ensure_unique(
    users: &[ScimUser],
    attrs: &Map<String, Value>,
    except: Option<&str>,
) -> Result<(), Reply> {
    let name = attrs.get("userName").and_then(Value::as_str).unwrap_or("");
    let taken = users
        .iter()
        .filter(|u| Some(u.id.as_str()) != except)
        .any(|u| u.user_name().eq_ignore_ascii_case(name));
    if taken {
        return Err(error(
            StatusCode::CONFLICT,
            Some("uniqueness"),
            "userName is already taken",
        ));
    }
    Ok(())
}

fn find<'a>(users: &'a [ScimUser], id: &str) -> Result<&'a ScimUser, Reply> {
    users.iter().find(|u| u.id == id).ok_or_else(user_not_found)
}

fn body_object(req: &SimRequest) -> Result<Map<String, Value>, Reply> {
    req.json_object()
        .map_err(|_| invalid("invalidSyntax", "body must be a JSON object"))
}

/// The built-in Viewers group with every active user as a member.
fn viewers(users: &[ScimUser], base: &str) -> Value {
    let members: Vec<Value> = users
        .iter()
        .filter(|u| u.active())
        .map(|u| json!({ "value": u.id, "display": u.user_name(), "$ref": u.location(base) }))
        .collect();
    json!({
        "schemas": [GROUP_SCHEMA],
        "id": VIEWERS_GROUP_ID,
        "displayName": "Viewers",
        "members": members,
        "meta": {
            "resourceType": "Group",
            "location": format!("{base}/Groups/{VIEWERS_GROUP_ID}"),
        },
    })
}

/// A `ListResponse`: one page starting at `start_index` of `total` results.
fn list(resources: Vec<Value>, start_index: usize, total: usize) -> Reply {
    Reply::ok(json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": total,
        "startIndex": start_index,
        "itemsPerPage": resources.len(),
        "Resources": resources,
    }))
}

/// A SCIM error that also carries Knoq's `error` field.
fn error(status: StatusCode, scim_type: Option<&str>, detail: &str) -> Reply {
    let mut body = json!({
        "schemas": [ERROR_SCHEMA],
        "status": status.as_str(),
        "detail": detail,
        "error": detail,
    });
    if let Some(scim_type) = scim_type {
        body["scimType"] = json!(scim_type);
    }
    Reply::json(status, body.to_string())
}

fn invalid(scim_type: &str, detail: &str) -> Reply {
    error(StatusCode::BAD_REQUEST, Some(scim_type), detail)
}

fn user_not_found() -> Reply {
    error(StatusCode::NOT_FOUND, None, "user not found")
}

/// The bearer token of the request, if it has one.
fn bearer(req: &SimRequest) -> Option<&str> {
    let (scheme, token) = req.header_str(AUTHORIZATION)?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A random id shaped like a UUID, as IdPs expect SCIM ids to look.
fn uuid_like() -> String {
    let hex = format!("{}{}", random_id(), random_id());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

// === impl ScimDirectory ===

impl ScimDirectory {
    /// Nothing in the directory can be left half-changed by a panic that
    /// matters to a simulator, so poisoning is ignored.
    fn lock(&self) -> MutexGuard<'_, Vec<ScimUser>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl ScimUser ===

impl ScimUser {
    fn user_name(&self) -> &str {
        self.attrs
            .get("userName")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    fn active(&self) -> bool {
        self.attrs
            .get("active")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    fn matches(&self, attr: &str, value: &str) -> bool {
        let actual = self.attrs.get(attr).and_then(Value::as_str).unwrap_or("");
        match attr {
            // userName is caseExact=false in the core schema; externalId is caseExact.
            "userName" => actual.eq_ignore_ascii_case(value),
            _ => actual == value,
        }
    }

    fn location(&self, base: &str) -> String {
        format!("{base}/Users/{}", self.id)
    }

    fn render(&self, base: &str) -> Value {
        let mut object = Map::new();
        object.insert("schemas".into(), json!([USER_SCHEMA]));
        object.insert("id".into(), json!(self.id));
        object.extend(self.attrs.clone());
        object.insert(
            "meta".into(),
            json!({
                "resourceType": "User",
                "created": self.created,
                "lastModified": self.last_modified,
                "location": self.location(base),
            }),
        );
        Value::Object(object)
    }
}
