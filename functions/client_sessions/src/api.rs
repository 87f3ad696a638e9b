//! The client session HTTP API (every route behind a bearer token, every error
//! problem+json, ids checked before they reach a Redis key):
//! - `PUT /api/realtime/client-sessions/{id}` `{state?, preferences?}` — create (`201`) or
//!   replace the members sent (`200`); a member left out keeps its value (`null` / `{}` on
//!   create). `If-Match: "3"` makes it conditional (`412 version_mismatch` when the stored
//!   version is another, nothing changed); without `If-Match` the write applies to whatever
//!   is stored (last write wins: a client that may race itself sends `If-Match`).
//!   `If-None-Match: *` only creates (`412 client_session_exists`);
//! - `GET …/{id}` — the session (extends its expiry); `DELETE …/{id}` (`If-Match` too);
//! - `GET /api/realtime/client-sessions` — the caller's sessions without their state.
//!
//! Every answer with a session carries its version twice: the `ETag` header (`"3"`) and the
//! `version` field. Sessions are per user: another user's id is not there (`404`).
//! A write that changes the preferences is pushed to `user:{id}` (see `push`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::http::JsonBody;
use inkwire_shared::problem::{Problem, clip, dependency_failed};
use inkwire_shared::schema::schemas;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::ClientSessionConfig;
use crate::store::{self, Deleted, Precondition, Stored, Write, Written, is_valid_id};
use inkwire_shared::problem::{checked_id, refuse_unknown_params};

/// `data.event` of the frame pushed to `user:{id}` when a session's preferences change.
pub const PREFERENCES_EVENT: &str = "client_session_preferences";

/// Most entity tags read from one `If-Match`.
pub const MAX_ETAGS: usize = 32;

#[derive(Clone)]
pub struct ClientSessionsApi {
    pub app: AppState,
    pub config: Arc<ClientSessionConfig>,
}

impl axum::extract::FromRef<ClientSessionsApi> for AppState {
    fn from_ref(c: &ClientSessionsApi) -> AppState {
        c.app.clone()
    }
}

pub fn routes(api: ClientSessionsApi) -> Router {
    Router::new()
        .route("/api/realtime/client-sessions", get(list_sessions))
        .route(
            "/api/realtime/client-sessions/{id}",
            put(put_session).get(get_session).delete(delete_session),
        )
        .with_state(api)
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

/// The caller's user id becomes part of Redis keys. `Caller` refuses tokens whose `sub`
/// breaks the identifier rule already; checked again here because this is where the id
/// meets the key.
fn owner(caller: &Caller) -> Result<&str, Problem> {
    if is_valid_id(&caller.user_id) {
        Ok(&caller.user_id)
    } else {
        Err(Problem::forbidden(
            "your user id cannot hold client sessions (it breaks the identifier rule)",
        ))
    }
}

fn not_found(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "client_session_not_found",
        format!(
            "no client session {:?} of yours (it may have expired)",
            clip(id, 64)
        ),
    )
}

fn stale(current: u64) -> Problem {
    Problem::new(
        StatusCode::PRECONDITION_FAILED,
        "version_mismatch",
        format!(
            "If-Match does not name the stored version {current}: the session changed since \
             you read it; nothing was changed (read it again, merge, retry with If-Match: \
             \"{current}\")"
        ),
    )
    .with_extension("currentVersion", current)
}

fn invalid_precondition(header: &'static str, detail: String) -> Problem {
    Problem::bad_request("invalid_precondition", detail).with_extension("header", header)
}

/// Reads `If-Match`: absent, `*`, or a list of entity tags. A tag is `"3"` (a bare `3` is
/// taken too); a weak tag (`W/"3"`) or a quoted non-number is well-formed but never matches
/// (If-Match compares strongly, and versions are numbers).
pub fn if_match(headers: &HeaderMap) -> Result<Precondition, Problem> {
    let values: Vec<&str> = headers
        .get_all(header::IF_MATCH)
        .iter()
        .map(|v| v.to_str())
        .collect::<Result<_, _>>()
        .map_err(|_| invalid_precondition("If-Match", "If-Match is not ASCII".into()))?;
    if values.is_empty() {
        return Ok(Precondition::None);
    }
    let mut versions = Vec::new();
    let mut any = false;
    for tag in values.iter().flat_map(|v| v.split(',')).map(str::trim) {
        if tag.is_empty() {
            continue;
        }
        if versions.len() >= MAX_ETAGS {
            return Err(invalid_precondition(
                "If-Match",
                format!("If-Match lists more than {MAX_ETAGS} entity tags"),
            ));
        }
        if tag == "*" {
            any = true;
        } else if let Some(quoted) = tag.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            if let Ok(n) = quoted.parse::<u64>()
                && !quoted.starts_with('+')
            {
                versions.push(n);
            }
        } else if tag.starts_with("W/\"") && tag.ends_with('"') && tag.len() >= 4 {
            // Weak: never matches.
        } else if let Ok(n) = tag.parse::<u64>()
            && tag.bytes().all(|b| b.is_ascii_digit())
        {
            versions.push(n);
        } else {
            return Err(invalid_precondition(
                "If-Match",
                format!(
                    "If-Match: {:?} is not an entity tag; send the ETag you got, e.g. \"3\", or *",
                    clip(tag, 64)
                ),
            ));
        }
    }
    Ok(if any {
        Precondition::Exists
    } else {
        Precondition::Versions(versions)
    })
}

/// Reads `If-None-Match` of a `PUT`: only `*` (create, never replace) is meaningful there.
pub fn create_only(headers: &HeaderMap) -> Result<bool, Problem> {
    let mut seen = false;
    for v in headers.get_all(header::IF_NONE_MATCH) {
        match v.to_str().map(str::trim) {
            Ok("*") => seen = true,
            _ => {
                return Err(invalid_precondition(
                    "If-None-Match",
                    "If-None-Match on PUT must be * (create only)".into(),
                ));
            }
        }
    }
    Ok(seen)
}

fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("a number is a header value")
}

fn view(id: &str, s: &Stored) -> Value {
    json!({
        "id": id,
        "version": s.version,
        "state": parse(&s.state),
        "preferences": parse(&s.prefs),
        "createdAt": rfc3339(s.created_ms),
        "updatedAt": rfc3339(s.updated_ms),
        "expiresAt": rfc3339(s.expires_ms),
    })
}

fn answer(status: StatusCode, id: &str, s: &Stored) -> Response {
    let mut res = (status, Json(view(id, s))).into_response();
    res.headers_mut().insert(header::ETAG, etag(s.version));
    // A user's client state: no cache keeps it (and `GET` never answers `304`).
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Pushes the session's preferences to `user:{user}` as a `user_message` with `data`
/// `{event: "client_session_preferences", sessionId, version, preferences, updatedAt}`:
/// the user's other sessions take them, the origin recognises its own `sessionId` and
/// ignores the echo. The push id is the session's incarnation and version, so a repeated
/// push of the same change is stored once. A failed push is logged and left flagged in the
/// session (`unpushed`): the write stands, and the next read or write of the session pushes
/// it again.
async fn push(api: &ClientSessionsApi, user: &str, id: &str, s: &Stored) {
    let data = json!({
        "event": PREFERENCES_EVENT,
        "sessionId": id,
        "version": s.version,
        "preferences": parse(&s.prefs),
        "updatedAt": rfc3339(s.updated_ms),
    });
    let published = channels::publish(
        &api.app.js,
        &Channel::new(ChannelKind::User, user),
        MessageType::UserMessage,
        &data,
        format!("csess-{user}-{id}-{}-{}", s.created_ms, s.version),
    )
    .await;
    match published {
        Ok(_) => {
            let mut redis = api.app.redis.clone();
            if let Err(e) = store::mark_pushed(&mut redis, user, id, &s.prefs).await {
                // The flag stays: a later read pushes the same preferences once more.
                tracing::warn!(error = %e, "client session pushed, flag not cleared");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "client session preferences saved, push failed");
        }
    }
}

fn ttl_ms(api: &ClientSessionsApi) -> u64 {
    api.config.ttl.as_millis().min(u64::MAX as u128) as u64
}

async fn put_session(
    State(api): State<ClientSessionsApi>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let id = checked_id("client session", &id)?;
    let user = owner(&caller)?;
    let if_match = if_match(&headers)?;
    let create_only = create_only(&headers)?;
    if create_only && if_match != Precondition::None {
        return Err(invalid_precondition(
            "If-None-Match",
            "send If-Match or If-None-Match: *, not both".into(),
        ));
    }
    schemas()
        .validate("api/client-session-request.json", &body)
        .map_err(Problem::validation)?;
    // Canonical texts (keys sorted at every level; numbers were canonicalized by `JsonBody`):
    // equal preferences give equal texts, which is what the script compares to decide
    // whether they changed.
    let mut body = body;
    body.sort_all_objects();
    let state = body.get("state").map(Value::to_string);
    let prefs = body.get("preferences").map(Value::to_string);
    let max = api.config.max_bytes;
    let sent = state.as_ref().map_or(0, String::len) + prefs.as_ref().map_or(0, String::len);
    if sent > max {
        return Err(too_large(sent, max));
    }
    let mut redis = api.app.redis.clone();
    let written = store::put(
        &mut redis,
        user,
        id,
        &Write {
            state: state.as_deref(),
            prefs: prefs.as_deref(),
            if_match,
            create_only,
            ttl_ms: ttl_ms(&api),
            max_sessions: api.config.max_per_user,
            max_bytes: max,
        },
    )
    .await
    .map_err(redis_err)?;
    match written {
        Written::Done { session, created } => {
            if session.unpushed {
                push(&api, user, id, &session).await;
            }
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(answer(status, id, &session))
        }
        Written::Exists(current) => Err(Problem::new(
            StatusCode::PRECONDITION_FAILED,
            "client_session_exists",
            format!(
                "client session {id:?} exists (If-None-Match: * only creates); nothing was \
                 changed"
            ),
        )
        .with_extension("currentVersion", current)),
        Written::Missing => Err(not_found(id)),
        Written::Stale(current) => Err(stale(current)),
        Written::TooMany => Err(Problem::conflict(
            "too_many_client_sessions",
            format!(
                "you hold {} client sessions, the most allowed; delete one (or let it expire) \
                 before creating another",
                api.config.max_per_user
            ),
        )
        .with_extension("limit", api.config.max_per_user)),
        Written::TooLarge(size) => Err(too_large(size, max)),
    }
}

fn too_large(size: usize, max: usize) -> Problem {
    Problem::payload_too_large(format!(
        "a client session holds at most {max} bytes of state and preferences (JSON text); \
         this one would hold {size}"
    ))
    .with_extension("limit", max)
}

async fn get_session(
    State(api): State<ClientSessionsApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = checked_id("client session", &id)?;
    let user = owner(&caller)?;
    let mut redis = api.app.redis.clone();
    let session = store::get(&mut redis, user, id, ttl_ms(&api))
        .await
        .map_err(redis_err)?
        .ok_or_else(|| not_found(id))?;
    if session.unpushed {
        // A change whose push failed earlier: finish it now.
        push(&api, user, id, &session).await;
    }
    Ok(answer(StatusCode::OK, id, &session))
}

async fn delete_session(
    State(api): State<ClientSessionsApi>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = checked_id("client session", &id)?;
    let user = owner(&caller)?;
    let precondition = if_match(&headers)?;
    let mut redis = api.app.redis.clone();
    match store::delete(&mut redis, user, id, &precondition)
        .await
        .map_err(redis_err)?
    {
        Deleted::Done(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        Deleted::Missing => Err(not_found(id)),
        Deleted::Stale(current) => Err(stale(current)),
    }
}

async fn list_sessions(
    State(api): State<ClientSessionsApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &[])?;
    let user = owner(&caller)?;
    let mut redis = api.app.redis.clone();
    let sessions = store::list(&mut redis, user).await.map_err(redis_err)?;
    let sessions: Vec<Value> = sessions
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "version": s.version,
                "preferences": parse(&s.prefs),
                "createdAt": rfc3339(s.created_ms),
                "updatedAt": rfc3339(s.updated_ms),
                "expiresAt": rfc3339(s.expires_ms),
            })
        })
        .collect();
    Ok(Json(json!({"sessions": sessions})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: header::HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn if_match_forms() {
        assert_eq!(if_match(&HeaderMap::new()).unwrap(), Precondition::None);
        let h = |v: &[&str]| if_match(&headers(header::IF_MATCH, v));
        assert_eq!(h(&["*"]).unwrap(), Precondition::Exists);
        assert_eq!(h(&["\"3\""]).unwrap(), Precondition::Versions(vec![3]));
        assert_eq!(
            h(&["\"3\", \"4\"", "5"]).unwrap(),
            Precondition::Versions(vec![3, 4, 5])
        );
        // Well-formed but never matching.
        assert_eq!(
            h(&["W/\"3\"", "\"abc\"", "\"+3\""]).unwrap(),
            Precondition::Versions(vec![])
        );
        for bad in ["abc", "3x", "\"3", "-1", "W/3"] {
            assert_eq!(h(&[bad]).unwrap_err().code, "invalid_precondition", "{bad}");
        }
        let many = vec!["\"1\""; MAX_ETAGS + 1].join(",");
        assert_eq!(h(&[&many]).unwrap_err().code, "invalid_precondition");
    }

    #[test]
    fn if_none_match_is_star_only() {
        assert!(!create_only(&HeaderMap::new()).unwrap());
        assert!(create_only(&headers(header::IF_NONE_MATCH, &["*"])).unwrap());
        assert_eq!(
            create_only(&headers(header::IF_NONE_MATCH, &["\"3\""]))
                .unwrap_err()
                .code,
            "invalid_precondition"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(checked_id("client session", "tab-1_A").is_ok());
        for bad in ["", "a.b", "a:b", "a b", "*", &"x".repeat(65)] {
            assert_eq!(
                checked_id("client session", bad).unwrap_err().code,
                "invalid_id",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.5Z");
    }
}
