//! The `/_sim/` control interface, for driving a standalone simulator
//! (`knoq-gateway mock-knoq`) over HTTP. In-process code uses
//! [`SimControl`](super::SimControl) instead; this is a thin JSON veneer on it.
//!
//! | method | path | body | effect |
//! |---|---|---|---|
//! | GET | `/_sim/state` | | `{"inFlight","cancelled","rateLimited","requests"}` |
//! | GET | `/_sim/requests` | | the request log; Cookie and Authorization values redacted |
//! | DELETE | `/_sim/requests` | | clears the log |
//! | POST | `/_sim/fail` | `{"route":"message_send","faults":[{"status":502,"retryAfter":3},{"delayMs":500},"reset","apply_then_reset","hang","apply_then_hang"]}` | `fail_next` |
//! | POST | `/_sim/rotate` | `{"user","value"}` | `rotate_cookie` |
//! | POST | `/_sim/expire` | `{"user"}` | `expire_cookie` |
//! | POST | `/_sim/cookie` | `{"user","value"}` | `set_cookie` |
//! | POST | `/_sim/agent-delay` | `{"ms"}` | `set_agent_delay` |
//! | GET | `/_sim/ca` | | `{"caPem"}`: the self-signed certificate to trust (404 if none) |
//!
//! There is no authentication: anyone who reaches the listener can drive the
//! simulator. It holds no real credentials, and it listens where it is told
//! (loopback in the CLI's default).

use std::time::Duration;

use http::header::{AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION};
use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::control::SimControl;
use super::faults::{Fault, SimRoute};
use super::log::SeenRequest;
use super::reply::{Reply, SimRequest};

/// Path prefix of the control interface.
pub(super) const PREFIX: &str = "/_sim/";

/// Handles a request under `/_sim/`.
pub(super) fn handle(control: &SimControl, ca_pem: Option<&str>, req: &SimRequest) -> Reply {
    let path = req.path.strip_prefix(PREFIX).unwrap_or("");
    let result = match (&req.method, path) {
        (&Method::GET, "state") => Ok(Reply::ok(json!({
            "inFlight": control.in_flight(),
            "cancelled": control.cancelled(),
            "rateLimited": control.rate_limited(),
            "requests": control.requests().len(),
        }))),
        (&Method::GET, "requests") => {
            let requests: Vec<Value> = control.requests().iter().map(redacted).collect();
            Ok(Reply::ok(json!({ "requests": requests })))
        }
        (&Method::DELETE, "requests") => {
            control.clear_requests();
            Ok(ok())
        }
        (&Method::POST, "fail") => fail(control, req),
        (&Method::POST, "rotate") => with_user(req, |body, user| {
            let value = string(body, "value")?;
            known(control.rotate_cookie(user, value))
        }),
        (&Method::POST, "expire") => with_user(req, |_, user| known(control.expire_cookie(user))),
        (&Method::POST, "cookie") => with_user(req, |body, user| {
            control.set_cookie(user, string(body, "value")?);
            Ok(ok())
        }),
        (&Method::POST, "agent-delay") => agent_delay(control, req),
        (&Method::GET, "ca") => match ca_pem {
            Some(pem) => Ok(Reply::ok(json!({ "caPem": pem }))),
            None => Err(Reply::error(
                StatusCode::NOT_FOUND,
                "no self-signed certificate in use",
            )),
        },
        _ => Err(Reply::not_found()),
    };
    result.unwrap_or_else(|error_reply| error_reply)
}

fn fail(control: &SimControl, req: &SimRequest) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let route_name = string(&body, "route")?;
    let route = SimRoute::from_name(route_name)
        .ok_or_else(|| bad_request(&format!("unknown route {route_name:?}")))?;
    let faults = body
        .get("faults")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_request("faults must be an array"))?
        .iter()
        .map(|value| parse_fault(value).ok_or_else(|| bad_request(&format!("bad fault {value}"))))
        .collect::<Result<Vec<_>, _>>()?;
    control.fail_next(route, faults);
    Ok(ok())
}

fn agent_delay(control: &SimControl, req: &SimRequest) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let ms = body
        .get("ms")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad_request("ms is required"))?;
    control.set_agent_delay(Duration::from_millis(ms));
    Ok(ok())
}

/// A fault as the control interface spells it (see the module table).
fn parse_fault(value: &Value) -> Option<Fault> {
    match value {
        Value::String(name) => match name.as_str() {
            "reset" => Some(Fault::Reset),
            "apply_then_reset" => Some(Fault::ApplyThenReset),
            "hang" => Some(Fault::Hang),
            "apply_then_hang" => Some(Fault::ApplyThenHang),
            _ => None,
        },
        Value::Object(fields) => {
            if let Some(status) = fields.get("status").and_then(Value::as_u64) {
                let retry_after = match fields.get("retryAfter") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(u32::try_from(v.as_u64()?).ok()?),
                };
                Some(Fault::Status {
                    status: u16::try_from(status).ok()?,
                    retry_after,
                })
            } else {
                let ms = fields.get("delayMs").and_then(Value::as_u64)?;
                Some(Fault::Delay(Duration::from_millis(ms)))
            }
        }
        _ => None,
    }
}

/// A logged request as JSON, without credential header values.
fn redacted(request: &SeenRequest) -> Value {
    let headers: Vec<Value> = request
        .headers
        .iter()
        .map(|(name, value)| {
            let secret = [COOKIE, AUTHORIZATION, PROXY_AUTHORIZATION].contains(name);
            let shown = if secret {
                "<redacted>".into()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            json!([name.as_str(), shown])
        })
        .collect();
    json!({
        "method": request.method.as_str(),
        "path": request.path,
        "query": request.query,
        "headers": headers,
        "body": String::from_utf8_lossy(&request.body),
        "user": request.user,
        "status": request.status,
    })
}

/// Runs `action` with the body and its `user` field.
fn with_user(
    req: &SimRequest,
    action: impl FnOnce(&Map<String, Value>, &str) -> Result<Reply, Reply>,
) -> Result<Reply, Reply> {
    let body = req.json_object()?;
    let user = string(&body, "user")?;
    action(&body, user)
}

fn string<'a>(body: &'a Map<String, Value>, field: &str) -> Result<&'a str, Reply> {
    body.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request(&format!("{field} is required")))
}

fn known(found: bool) -> Result<Reply, Reply> {
    if found {
        Ok(ok())
    } else {
        Err(Reply::error(StatusCode::NOT_FOUND, "no such user"))
    }
}

fn ok() -> Reply {
    Reply::ok(json!({ "ok": true }))
}

fn bad_request(message: &str) -> Reply {
    Reply::error(StatusCode::BAD_REQUEST, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault_spelling() {
        assert_eq!(
            parse_fault(&json!({"status": 502, "retryAfter": 3})),
            Some(Fault::status_retry_after(502, 3))
        );
        assert_eq!(
            parse_fault(&json!({"status": 503})),
            Some(Fault::status(503))
        );
        assert_eq!(
            parse_fault(&json!({"delayMs": 20})),
            Some(Fault::Delay(Duration::from_millis(20)))
        );
        assert_eq!(
            parse_fault(&json!("apply_then_hang")),
            Some(Fault::ApplyThenHang)
        );
        assert_eq!(parse_fault(&json!("explode")), None);
        assert_eq!(parse_fault(&json!({"status": 70000})), None);
    }
}
