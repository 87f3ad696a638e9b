//! The activity HTTP API (bearer token on every route, problem+json errors, every parameter
//! checked before it reaches Redis):
//! - `GET /api/realtime/activity?from=&to=&type=&cursor=&limit=&userId=` — the log, newest
//!   first: `from` (inclusive) and `to` (exclusive) RFC 3339 times, `type` one of the
//!   activity types, `cursor` the `nextCursor` of the previous page, `limit` 1-100 (50);
//! - `GET /api/realtime/activity/stats?tz=&userId=` — counts per type per local day, active
//!   days, hours of the day, the busiest hours, the current and longest streak, over the
//!   retention window, in `tz` (IANA) or else the time zone of the user's notification
//!   preferences, or else UTC.
//!
//! A user reads their own activity. `userId` names another user's only with an admin or
//! service token (support and back ends); anyone else gets `403`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::membership::is_valid_id;
use inkwire_shared::problem::{Problem, clip, dependency_failed};
use jiff::tz::TimeZone;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::sources::{Kind, sources};
use crate::stats;
use crate::store;
use crate::worker::{ActivityConfig, now_ms};
use inkwire_shared::problem::refuse_unknown_params;

/// Default and largest page.
pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 100;

#[derive(Clone)]
pub struct ActivityApi {
    pub app: AppState,
    pub config: Arc<ActivityConfig>,
}

impl axum::extract::FromRef<ActivityApi> for AppState {
    fn from_ref(a: &ActivityApi) -> AppState {
        a.app.clone()
    }
}

pub fn routes(api: ActivityApi) -> Router {
    Router::new()
        .route("/api/realtime/activity", get(list))
        .route("/api/realtime/activity/stats", get(stats_route))
        .with_state(api)
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

fn invalid(name: &str, detail: impl std::fmt::Display) -> Problem {
    Problem::bad_request("invalid_parameter", format!("{name}: {detail}"))
}

/// Whose activity: the caller's, or `userId`'s for an admin or service token. `None` when the
/// caller's own id cannot have activity (it is not an id the log keys by).
fn subject(caller: &Caller, params: &HashMap<String, String>) -> Result<Option<String>, Problem> {
    match params.get("userId") {
        Some(user) => {
            if !is_valid_id(user) {
                return Err(Problem::bad_request(
                    "invalid_id",
                    format!(
                        "userId {:?} must be 1-64 characters of letters, digits, '_' or '-'",
                        clip(user, 64)
                    ),
                ));
            }
            if *user != caller.user_id && !caller.is_privileged() {
                return Err(Problem::forbidden(
                    "you may read only your own activity: userId names another user, which \
                     needs an admin or service token",
                ));
            }
            Ok(Some(user.clone()))
        }
        None => Ok(is_valid_id(&caller.user_id).then(|| caller.user_id.clone())),
    }
}

fn time_param(params: &HashMap<String, String>, name: &str) -> Result<Option<u64>, Problem> {
    let Some(raw) = params.get(name) else {
        return Ok(None);
    };
    let t = OffsetDateTime::parse(raw, &Rfc3339).map_err(|_| {
        invalid(
            name,
            format!(
                "{:?} is not an RFC 3339 time (e.g. 2026-12-01T00:00:00Z)",
                clip(raw, 64)
            ),
        )
    })?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    if !(0..=9_999_999_999_999).contains(&ms) {
        return Err(invalid(name, "must be between 1970 and 2286"));
    }
    Ok(Some(ms as u64))
}

fn rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

async fn list(
    State(api): State<ActivityApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(
        &params,
        &["from", "to", "type", "cursor", "limit", "userId"],
    )?;
    let user = subject(&caller, &params)?;
    let from = time_param(&params, "from")?;
    let to = time_param(&params, "to")?;
    if let (Some(f), Some(t)) = (from, to)
        && f >= t
    {
        return Err(invalid("from", "must be before to"));
    }
    let kind = match params.get("type") {
        None => None,
        Some(t) => Some(Kind::parse(t).ok_or_else(|| {
            invalid(
                "type",
                format!(
                    "unknown activity type {:?}; known: {}",
                    clip(t, 64),
                    Kind::names()
                ),
            )
        })?),
    };
    let names: Vec<&str> = sources().iter().map(|s| s.name).collect();
    let cursor = match params.get("cursor") {
        None => None,
        Some(c) if store::is_entry_id(c, &names) => Some(c.as_str()),
        Some(c) => {
            return Err(invalid(
                "cursor",
                format!("{:?} is not a cursor this API returned", clip(c, 64)),
            ));
        }
    };
    let limit = match params.get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n) && !v.starts_with('+'))
            .ok_or_else(|| {
                invalid(
                    "limit",
                    format!("{:?} is not a number from 1 to {MAX_PAGE}", clip(v, 64)),
                )
            })?,
    };
    let cutoff = now_ms().saturating_sub(api.config.retention_ms());
    let min = from.unwrap_or(0).max(cutoff);
    let Some(user) = user else {
        return Ok(Json(json!({"entries": [], "nextCursor": null})));
    };
    let key = match kind {
        Some(k) => store::type_key(&user, k),
        None => store::log_key(&user),
    };
    let mut redis = api.app.redis.clone();
    let page = store::page(&mut redis, &key, min, to, cursor, limit)
        .await
        .map_err(redis_err)?;
    Ok(Json(json!({
        "userId": user,
        "entries": page.entries,
        "nextCursor": page.next,
    })))
}

/// The time zone of the user's notification preferences, if they saved a valid one. The
/// document is the notifications function's (`inkwire:notify:prefs:{userId}`, see
/// `inkwire_notifications::api::preferences_key`); only its `timeZone` is read.
async fn preference_zone(api: &ActivityApi, user: &str) -> Result<Option<String>, Problem> {
    let mut redis = api.app.redis.clone();
    let doc: Option<String> = redis::cmd("GET")
        .arg(format!("inkwire:notify:prefs:{user}"))
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    Ok(doc
        .and_then(|d| serde_json::from_str::<Value>(&d).ok())
        .and_then(|v| v["timeZone"].as_str().map(str::to_string))
        .filter(|z| TimeZone::get(z).is_ok()))
}

async fn stats_route(
    State(api): State<ActivityApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &["tz", "userId"])?;
    let user = subject(&caller, &params)?;
    let asked = match params.get("tz") {
        None => None,
        Some(z) => {
            // Length first: a zone name is short, and jiff should not look up anything long.
            if z.len() > 64 || TimeZone::get(z).is_err() {
                return Err(invalid(
                    "tz",
                    format!(
                        "{:?} is not an IANA time zone (e.g. Europe/Berlin)",
                        clip(z, 64)
                    ),
                ));
            }
            Some(z.clone())
        }
    };
    let now = now_ms();
    let cutoff = now.saturating_sub(api.config.retention_ms());
    let zone_name = match (&asked, &user) {
        (Some(z), _) => z.clone(),
        (None, Some(u)) => preference_zone(&api, u)
            .await?
            .unwrap_or_else(|| "UTC".into()),
        (None, None) => "UTC".into(),
    };
    let tz = TimeZone::get(&zone_name).unwrap_or(TimeZone::UTC);
    let quarters = match &user {
        Some(u) => {
            let mut redis = api.app.redis.clone();
            store::quarters(&mut redis, u, cutoff, now)
                .await
                .map_err(redis_err)?
        }
        None => Vec::new(),
    };
    let today = jiff::Timestamp::from_millisecond(now as i64)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .to_zoned(tz.clone())
        .date();
    let mut out = stats::compute(&quarters, &tz, today);
    out["userId"] = json!(user);
    out["timeZone"] = json!(zone_name);
    out["from"] = json!(rfc3339(cutoff));
    out["to"] = json!(rfc3339(now));
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use inkwire_shared::auth::GlobalRole;

    fn caller(user: &str, roles: Vec<GlobalRole>) -> Caller {
        Caller {
            user_id: user.into(),
            roles,
            expires_at: u64::MAX,
        }
    }

    #[test]
    fn only_privileged_callers_read_someone_else() {
        let mut p = HashMap::new();
        assert_eq!(
            subject(&caller("u-1", vec![]), &p).unwrap().as_deref(),
            Some("u-1")
        );
        assert_eq!(subject(&caller("a.b", vec![]), &p).unwrap(), None);
        p.insert("userId".to_string(), "u-2".to_string());
        assert_eq!(subject(&caller("u-1", vec![]), &p).unwrap_err().status, 403);
        assert_eq!(
            subject(&caller("ops", vec![GlobalRole::Admin]), &p)
                .unwrap()
                .as_deref(),
            Some("u-2")
        );
        p.insert("userId".to_string(), "u*".to_string());
        assert_eq!(
            subject(&caller("ops", vec![GlobalRole::Service]), &p)
                .unwrap_err()
                .code,
            "invalid_id"
        );
    }

    #[test]
    fn times_are_rfc3339_within_range() {
        let mut p = HashMap::new();
        p.insert("from".to_string(), "2027-01-15T08:00:00Z".to_string());
        assert_eq!(time_param(&p, "from").unwrap(), Some(1_800_000_000_000));
        for bad in [
            "yesterday",
            "2027-01-15",
            "1969-12-31T23:59:59Z",
            "9999-01-01T00:00:00Z",
        ] {
            p.insert("from".to_string(), bad.to_string());
            assert!(time_param(&p, "from").is_err(), "{bad}");
        }
    }
}
