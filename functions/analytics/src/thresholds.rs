//! Thresholds: a named rule on a series' sum over a window, kept in Redis, evaluated at
//! every closed bucket, announced as `analytics.threshold_crossed` once per crossing and
//! `analytics.threshold_resolved` once when the value is back (the rule itself, with its
//! hysteresis, is [`crate::threshold_rule`]).
//!
//! - `PUT /api/realtime/analytics/thresholds/{name}` — create or replace (`201` / `200`);
//!   replacing starts the threshold afresh (armed), since the old state measured another
//!   rule;
//! - `GET /api/realtime/analytics/thresholds/{name}`, `GET /api/realtime/analytics/thresholds`
//!   — the definition with its state (`fired`, `since`, `lastValue`);
//! - `DELETE /api/realtime/analytics/thresholds/{name}`.
//!
//! Who: admin and service tokens any threshold; a project's owners the thresholds on that
//! project's series. A threshold the caller may not see is `404 threshold_not_found`, like
//! one that does not exist.
//!
//! Exactly once: the transition is a compare-and-set in Redis on the state's generation,
//! which also stores the event to publish (`pending`); the event is published with an id
//! derived from the threshold, its revision and the generation, and `pending` is cleared
//! after the ack. A pending event left by a failure is published before the next
//! evaluation, so an event is never lost and never doubled.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use inkwire_shared::auth::Caller;
use inkwire_shared::config::parse_duration;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::http::JsonBody;
use inkwire_shared::jetstream::{self, Outgoing};
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::problem::{
    Problem, checked_id, clip, dependency_failed, refuse_unknown_params,
};
use inkwire_shared::schema::schemas;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::api::AnalyticsApi;
use crate::closer::rfc3339;
use crate::config::{AnalyticsConfig, label};
use crate::counted::all_types;
use crate::hooks::{ClosedBucket, HookContext};
use crate::store;
use crate::threshold_rule::{Comparator, Transition, transition};

/// Every threshold's definition, by name.
pub fn definitions_key() -> String {
    format!("{}:thresholds", store::PREFIX)
}

/// A threshold's state: `fired` (0/1), `generation`, `since`, `value`, `revision`, and
/// `pending` (an event not yet acknowledged).
pub fn state_key(name: &str) -> String {
    format!("{}:threshold:{name}", store::PREFIX)
}

/// Most thresholds kept (each is evaluated at every bucket).
pub const MAX_THRESHOLDS: usize = 1_000;

/// A threshold as stored and answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Threshold {
    pub name: String,
    /// `total`, `words` or an event type (`word_added`).
    pub metric: String,
    /// The project whose series is watched; `None`: the overall series.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    /// The window the series is summed over (ms).
    pub window_ms: u64,
    pub comparator: Comparator,
    pub value: f64,
    pub hysteresis: f64,
    pub created_by: String,
    /// Counts replacements; part of the event ids, so a new rule's events are new events.
    pub revision: u64,
}

impl Threshold {
    /// The bucket field of the watched series.
    fn field(&self) -> String {
        let project = self.project_id.as_deref();
        match self.metric.as_str() {
            "total" => store::field(project, None),
            "words" => store::words_field(project),
            t => store::field(project, Some(t)),
        }
    }

    fn public(&self, state: &ThresholdState) -> Value {
        json!({
            "name": self.name,
            "metric": self.metric,
            "projectId": self.project_id,
            "window": label(self.window_ms),
            "comparator": self.comparator,
            "value": self.value,
            "hysteresis": self.hysteresis,
            "createdBy": self.created_by,
            "revision": self.revision,
            "state": {
                "fired": state.fired,
                "since": state.since.map(rfc3339),
                "lastValue": state.last_value,
            },
        })
    }
}

/// A threshold's state in Redis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ThresholdState {
    pub fired: bool,
    pub generation: u64,
    pub since: Option<u64>,
    pub last_value: Option<f64>,
    pub revision: u64,
    pub pending: Option<String>,
}

async fn read_state(
    redis: &mut ConnectionManager,
    name: &str,
) -> redis::RedisResult<ThresholdState> {
    let m: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(state_key(name))
        .query_async(redis)
        .await?;
    let num = |k: &str| m.get(k).and_then(|v| v.parse::<u64>().ok());
    Ok(ThresholdState {
        fired: m.get("fired").map(String::as_str) == Some("1"),
        generation: num("generation").unwrap_or(0),
        since: num("since"),
        last_value: m.get("value").and_then(|v| v.parse().ok()),
        revision: num("revision").unwrap_or(0),
        pending: m.get("pending").cloned(),
    })
}

/// Moves the state from (`fired`, `generation`) to the other side and keeps the event to
/// publish, unless another instance moved it first (or the threshold was replaced).
const TRANSITION: &str = r#"
local fired = redis.call('HGET', KEYS[1], 'fired') or '0'
local generation = redis.call('HGET', KEYS[1], 'generation') or '0'
local revision = redis.call('HGET', KEYS[1], 'revision') or ARGV[1]
if revision ~= ARGV[1] or fired ~= ARGV[2] or generation ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'revision', ARGV[1], 'fired', ARGV[4],
  'generation', tostring(tonumber(generation) + 1), 'since', ARGV[5], 'value', ARGV[6],
  'pending', ARGV[7])
return 1
"#;
static TRANSITION_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TRANSITION));

/// The window `[end - window, end)` as bucket hashes: whole coarser buckets where they
/// fit, the shortest bucket at the edges (which lie within the shortest bucket's retention:
/// windows are at most that long).
pub fn cover(config: &AnalyticsConfig, start: u64, end: u64) -> Vec<(u64, u64)> {
    let resolutions: Vec<u64> = config.resolutions().iter().map(|(r, _)| *r).collect();
    let mut out = Vec::new();
    let mut t = start;
    while t < end {
        let r = resolutions
            .iter()
            .rev()
            .copied()
            .find(|r| t.is_multiple_of(*r) && t + r <= end)
            .unwrap_or(resolutions[0]);
        out.push((r, t));
        t += r;
    }
    out
}

/// Sums the threshold's series over its window ending at `end`.
async fn window_value(
    redis: &mut ConnectionManager,
    config: &AnalyticsConfig,
    t: &Threshold,
    end: u64,
) -> redis::RedisResult<f64> {
    let keys: Vec<String> = cover(config, end.saturating_sub(t.window_ms), end)
        .into_iter()
        .map(|(r, s)| store::bucket_key(r, s))
        .collect();
    let rows = store::read_fields(redis, &keys, &[t.field()]).await?;
    Ok(rows.iter().flatten().sum::<i64>() as f64)
}

/// The event of a transition.
fn event(t: &Threshold, kind: Transition, value: f64, generation: u64, at_ms: u64) -> Event {
    let event_type = match kind {
        Transition::Resolved => "threshold_resolved",
        _ => "threshold_crossed",
    };
    let metric = match &t.project_id {
        Some(p) => format!("project.{p}.{}", t.metric),
        None => t.metric.clone(),
    };
    let id_seed = format!("{}/{}/{generation}", t.name, t.revision);
    let mut b = Event::builder(Category::Analytics, event_type, &t.created_by)
        .id(Uuid::new_v5(&Uuid::NAMESPACE_OID, id_seed.as_bytes()))
        .source("analytics")
        .data(json!({
            "metric": metric,
            "value": value,
            "threshold": t.value,
            "direction": t.comparator.direction(),
            "name": t.name,
            "window": label(t.window_ms),
        }));
    if let Ok(at) = time::OffsetDateTime::from_unix_timestamp_nanos(at_ms as i128 * 1_000_000) {
        b = b.timestamp(at);
    }
    if let Some(p) = &t.project_id {
        b = b.project(p.clone());
    }
    b.build()
}

/// Publishes a stored pending event and clears it once acknowledged.
async fn publish_pending(
    ctx: &HookContext,
    redis: &mut ConnectionManager,
    name: &str,
    pending: &str,
) -> anyhow::Result<()> {
    let event: Event = serde_json::from_str(pending)?;
    jetstream::publish(
        &ctx.js,
        Outgoing {
            subject: event.subject(),
            msg_id: event.id.to_string(),
            payload: Bytes::from(pending.to_string()),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("threshold event not published: {e}"))?;
    // Cleared only if it is still this event (a later transition replaces it only after
    // this one was published, but a replaced threshold starts afresh).
    redis::cmd("EVAL")
        .arg("if redis.call('HGET', KEYS[1], 'pending') == ARGV[1] then return redis.call('HDEL', KEYS[1], 'pending') end return 0")
        .arg(1)
        .arg(state_key(name))
        .arg(pending)
        .query_async::<i64>(redis)
        .await?;
    Ok(())
}

/// Evaluates every threshold at the end of `bucket` (called by the closer's hook).
pub async fn evaluate(ctx: &HookContext, bucket: &ClosedBucket) -> anyhow::Result<()> {
    let mut redis = ctx.redis.clone();
    let all: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(definitions_key())
        .query_async(&mut redis)
        .await?;
    let mut first_error = None;
    for raw in all.values() {
        let Ok(t) = serde_json::from_str::<Threshold>(raw) else {
            continue;
        };
        if let Err(e) = evaluate_one(ctx, &mut redis, &t, bucket.end_ms).await {
            tracing::warn!(threshold = %t.name, error = %e, "threshold not evaluated");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn evaluate_one(
    ctx: &HookContext,
    redis: &mut ConnectionManager,
    t: &Threshold,
    end: u64,
) -> anyhow::Result<()> {
    let mut state = read_state(redis, &t.name).await?;
    if state.revision != 0 && state.revision != t.revision {
        return Ok(()); // being replaced: the PUT resets the state
    }
    if let Some(pending) = state.pending.take() {
        publish_pending(ctx, redis, &t.name, &pending).await?;
    }
    let value = window_value(redis, &ctx.config, t, end).await?;
    let kind = transition(state.fired, t.comparator, t.value, t.hysteresis, value);
    if kind == Transition::None {
        redis::cmd("HSET")
            .arg(state_key(&t.name))
            .arg("value")
            .arg(value)
            .query_async::<()>(redis)
            .await?;
        return Ok(());
    }
    let ev = event(t, kind, value, state.generation + 1, end);
    let payload = serde_json::to_string(&ev)?;
    let moved: i64 = TRANSITION_SCRIPT
        .key(state_key(&t.name))
        .arg(t.revision)
        .arg(if state.fired { "1" } else { "0" })
        .arg(state.generation)
        .arg(if kind == Transition::Crossed {
            "1"
        } else {
            "0"
        })
        .arg(end)
        .arg(value)
        .arg(&payload)
        .invoke_async(redis)
        .await?;
    if moved == 1 {
        publish_pending(ctx, redis, &t.name, &payload).await?;
    }
    Ok(())
}

// --- API ---------------------------------------------------------------------------------

pub fn routes(api: AnalyticsApi) -> Router {
    Router::new()
        .route("/api/realtime/analytics/thresholds", get(list))
        .route(
            "/api/realtime/analytics/thresholds/{name}",
            get(read).put(put).delete(delete),
        )
        .with_state(api)
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

fn not_found(name: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "threshold_not_found",
        format!("no threshold {:?} that you may see", clip(name, 64)),
    )
}

/// May `caller` manage thresholds on `project` (`None`: the overall series)?
async fn may_manage(
    redis: &mut ConnectionManager,
    caller: &Caller,
    project: Option<&str>,
) -> Result<bool, Problem> {
    if caller.is_privileged() {
        return Ok(true);
    }
    let Some(project) = project else {
        return Ok(false);
    };
    let role = membership::role_of(redis, project, &caller.user_id)
        .await
        .map_err(redis_err)?;
    Ok(role == Some(ProjectRole::Owner))
}

async fn stored(redis: &mut ConnectionManager, name: &str) -> Result<Option<Threshold>, Problem> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(definitions_key())
        .arg(name)
        .query_async(redis)
        .await
        .map_err(redis_err)?;
    Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
}

/// The threshold `name` if `caller` may see it; `404 threshold_not_found` as for one that
/// does not exist otherwise.
async fn visible(
    redis: &mut ConnectionManager,
    caller: &Caller,
    name: &str,
) -> Result<Threshold, Problem> {
    let t = stored(redis, name).await?.ok_or_else(|| not_found(name))?;
    if !may_manage(redis, caller, t.project_id.as_deref()).await? {
        return Err(not_found(name));
    }
    Ok(t)
}

async fn read(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, Problem> {
    let name = checked_id("threshold", &name)?;
    let mut redis = api.app.redis.clone();
    let t = visible(&mut redis, &caller, name).await?;
    let state = read_state(&mut redis, name).await.map_err(redis_err)?;
    Ok(Json(t.public(&state)))
}

async fn list(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &[])?;
    let mut redis = api.app.redis.clone();
    let all: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(definitions_key())
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    let mut visible = Vec::new();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    for name in names {
        let Ok(t) = serde_json::from_str::<Threshold>(&all[name]) else {
            continue;
        };
        if may_manage(&mut redis, &caller, t.project_id.as_deref()).await? {
            let state = read_state(&mut redis, name).await.map_err(redis_err)?;
            visible.push(t.public(&state));
        }
    }
    Ok(Json(json!({ "thresholds": visible })))
}

async fn put(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let name = checked_id("threshold", &name)?;
    schemas()
        .validate("api/analytics-threshold-request.json", &body)
        .map_err(Problem::validation)?;
    let metric = body["metric"].as_str().unwrap_or_default().to_string();
    if metric != "total" && metric != "words" && !all_types().contains(&metric.as_str()) {
        return Err(Problem::bad_request(
            "invalid_parameter",
            format!(
                "metric: {:?} is not total, words or an event type",
                clip(&metric, 64)
            ),
        ));
    }
    let project_id = match body.get("projectId").and_then(Value::as_str) {
        Some(p) => Some(checked_id("project", p)?.to_string()),
        None => None,
    };
    let window_raw = body["window"].as_str().unwrap_or_default();
    // Checked: `999999999999999h` parses, but its milliseconds do not fit a u64.
    let window_ms = parse_duration(window_raw)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            Problem::bad_request(
                "invalid_parameter",
                format!(
                    "window: {:?} is not a length such as 30s, 5m or 1h",
                    clip(window_raw, 32)
                ),
            )
        })?;
    let bucket = api.config.bucket_ms();
    let longest = api.config.bucket_retention.as_millis() as u64;
    if !window_ms.is_multiple_of(bucket) || window_ms > longest {
        return Err(Problem::bad_request(
            "invalid_parameter",
            format!(
                "window: must be a whole number of buckets ({}) and at most {}",
                label(bucket),
                label(longest)
            ),
        ));
    }
    let comparator: Comparator = serde_json::from_value(body["comparator"].clone())
        .map_err(|_| Problem::bad_request("invalid_parameter", "comparator: gt, gte, lt or lte"))?;
    let value = body["value"].as_f64().unwrap_or(0.0);
    let hysteresis = body
        .get("hysteresis")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let mut redis = api.app.redis.clone();
    if !may_manage(&mut redis, &caller, project_id.as_deref()).await? {
        return Err(Problem::forbidden(match &project_id {
            Some(p) => format!(
                "only the owners of project {p} (or admin and service tokens) manage its thresholds"
            ),
            None => "thresholds on the overall series need an admin or service token".to_string(),
        }));
    }
    let old = stored(&mut redis, name).await?;
    if let Some(old) = &old
        && !may_manage(&mut redis, &caller, old.project_id.as_deref()).await?
    {
        return Err(not_found(name));
    }
    let count: usize = redis::cmd("HLEN")
        .arg(definitions_key())
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    if old.is_none() && count >= MAX_THRESHOLDS {
        return Err(Problem::conflict(
            "too_many_thresholds",
            format!("at most {MAX_THRESHOLDS} thresholds; delete one first"),
        )
        .with_extension("limit", MAX_THRESHOLDS));
    }
    // The same rule again (a retried PUT) changes nothing: its state and events stand.
    if let Some(old) = &old
        && (&old.metric, &old.project_id, old.window_ms, old.comparator)
            == (&metric, &project_id, window_ms, comparator)
        && old.value == value
        && old.hysteresis == hysteresis
    {
        let state = read_state(&mut redis, name).await.map_err(redis_err)?;
        return Ok((StatusCode::OK, Json(old.public(&state))).into_response());
    }
    let t = Threshold {
        name: name.to_string(),
        metric,
        project_id,
        window_ms,
        comparator,
        value,
        hysteresis,
        created_by: caller.user_id.clone(),
        revision: old.as_ref().map_or(1, |o| o.revision + 1),
    };
    // The definition and a fresh state in one step.
    redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(definitions_key())
        .arg(name)
        .arg(serde_json::to_string(&t).expect("thresholds serialize"))
        .ignore()
        .cmd("DEL")
        .arg(state_key(name))
        .ignore()
        .cmd("HSET")
        .arg(state_key(name))
        .arg("revision")
        .arg(t.revision)
        .ignore()
        .query_async::<()>(&mut redis)
        .await
        .map_err(redis_err)?;
    let state = ThresholdState {
        revision: t.revision,
        ..Default::default()
    };
    let status = if old.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(t.public(&state))).into_response())
}

async fn delete(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Value>, Problem> {
    let name = checked_id("threshold", &name)?;
    let mut redis = api.app.redis.clone();
    visible(&mut redis, &caller, name).await?;
    redis::pipe()
        .atomic()
        .cmd("HDEL")
        .arg(definitions_key())
        .arg(name)
        .ignore()
        .cmd("DEL")
        .arg(state_key(name))
        .ignore()
        .query_async::<()>(&mut redis)
        .await
        .map_err(redis_err)?;
    Ok(Json(json!({"name": name, "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_covered_by_whole_buckets() {
        let config = AnalyticsConfig::default(); // 5 s buckets
        let m = 60_000;
        // 12:00:55 to 12:03:05 → 12:00:55 (5 s), 12:01 and 12:02 (1 m), 12:03:00 (5 s).
        let start = 12 * 3_600_000 + 55_000;
        let end = 12 * 3_600_000 + 3 * m + 5_000;
        assert_eq!(
            cover(&config, start, end),
            vec![
                (5_000, start),
                (m, 12 * 3_600_000 + m),
                (m, 12 * 3_600_000 + 2 * m),
                (5_000, 12 * 3_600_000 + 3 * m),
            ]
        );
        let total: u64 = cover(&config, start, end).iter().map(|(r, _)| r).sum();
        assert_eq!(total, end - start);
    }
}
