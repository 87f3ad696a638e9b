//! The analytics HTTP API (bearer token on every route, problem+json errors, every
//! parameter checked before it reaches Redis):
//! - `GET /api/realtime/analytics/metrics?type=&projectId=&window=&step=` — a time series
//!   of event counts (all types or one; overall or one project's);
//! - `GET /api/realtime/analytics/projects/{id}` — a project's live figures: the current
//!   bucket, the last minute and hour with words per minute, today;
//! - `GET /api/realtime/analytics/books/{id}/sales?days=` — daily sales and the 7-day
//!   baseline.
//!
//! Who reads what: admin and service tokens everything; a project member (any role) that
//! project's series and figures; a book's sales, members of a project that a
//! `sales_updated` of the book named. Overall and per-type-global series need an admin or
//! service token.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::config::parse_duration;
use inkwire_shared::events::Category;
use inkwire_shared::membership;
use inkwire_shared::problem::{
    Problem, checked_id, clip, dependency_failed, refuse_unknown_params,
};
use serde_json::{Map, Value, json};

use crate::closer::{now_ms, rfc3339};
use crate::config::{AnalyticsConfig, DAY_MS, HOUR_MS, MINUTE_MS, label};
use crate::counted::all_types;
use crate::store;

/// Most points a series answer holds.
pub const MAX_POINTS: u64 = 1000;
/// Most bucket hashes one series read touches (window / resolution).
pub const MAX_BUCKETS: u64 = 10_000;
/// Default window of a series.
pub const DEFAULT_WINDOW_MS: u64 = 5 * MINUTE_MS;
/// Default and most days of a book's sales.
pub const DEFAULT_DAYS: u64 = 30;
pub const MAX_DAYS: u64 = 365;
/// Days the sales baseline averages.
pub const BASELINE_DAYS: u64 = 7;

#[derive(Clone)]
pub struct AnalyticsApi {
    pub app: AppState,
    pub config: Arc<AnalyticsConfig>,
}

impl axum::extract::FromRef<AnalyticsApi> for AppState {
    fn from_ref(a: &AnalyticsApi) -> AppState {
        a.app.clone()
    }
}

pub fn routes(api: AnalyticsApi) -> Router {
    Router::new()
        .route("/api/realtime/analytics/metrics", get(metrics))
        .route("/api/realtime/analytics/projects/{id}", get(project))
        .route("/api/realtime/analytics/books/{id}/sales", get(book_sales))
        .with_state(api.clone())
        .merge(crate::thresholds::routes(api))
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

fn invalid(name: &str, detail: impl std::fmt::Display) -> Problem {
    Problem::bad_request("invalid_parameter", format!("{name}: {detail}"))
}

/// A length such as `5s`, `15m`, `1h`, `7d` (`ms`, `s`, `m`, `h`, `d`).
fn duration_param(
    params: &HashMap<String, String>,
    name: &str,
    default: u64,
) -> Result<u64, Problem> {
    let Some(raw) = params.get(name) else {
        return Ok(default);
    };
    let bad = || {
        invalid(
            name,
            format!(
                "{:?} is not a length such as 5s, 15m, 1h or 7d",
                clip(raw, 32)
            ),
        )
    };
    // A short number first: parse_duration multiplies, and a long one would overflow.
    let digits = raw.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 7 {
        return Err(bad());
    }
    let ms = parse_duration(raw).map_err(|_| bad())?.as_millis() as u64;
    if ms == 0 {
        return Err(invalid(name, "must be more than zero"));
    }
    Ok(ms)
}

/// May `caller` read `project`'s figures? Admin and service tokens always; otherwise a
/// member of any role.
async fn check_member(api: &AnalyticsApi, caller: &Caller, project: &str) -> Result<(), Problem> {
    if caller.is_privileged() {
        return Ok(());
    }
    let mut redis = api.app.redis.clone();
    let role = membership::role_of(&mut redis, project, &caller.user_id)
        .await
        .map_err(redis_err)?;
    match role {
        Some(_) => Ok(()),
        None => Err(Problem::forbidden(format!(
            "you are not a member of project {project}"
        ))),
    }
}

/// How a series is read: which resolution, how many points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub window: u64,
    pub step: u64,
    pub resolution: u64,
    pub from: u64,
    pub to: u64,
}

/// Checks `window` and `step` and picks the coarsest resolution that divides the step.
pub fn plan(config: &AnalyticsConfig, window: u64, step: u64, now: u64) -> Result<Plan, Problem> {
    let b = config.bucket_ms();
    if !step.is_multiple_of(b) {
        return Err(invalid(
            "step",
            format!("must be a multiple of the bucket ({})", label(b)),
        ));
    }
    if !window.is_multiple_of(step) {
        return Err(invalid("window", "must be a multiple of step"));
    }
    if window / step > MAX_POINTS {
        return Err(invalid(
            "window",
            format!("at most {MAX_POINTS} points (window / step); use a larger step"),
        ));
    }
    let resolution = config
        .resolutions()
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| step.is_multiple_of(*r))
        .max()
        .unwrap_or(b);
    if window / resolution > MAX_BUCKETS {
        return Err(invalid(
            "step",
            format!(
                "the window needs more than {MAX_BUCKETS} {} buckets; use a step that is a multiple of a minute, an hour or a day",
                label(resolution)
            ),
        ));
    }
    let to = now - now % step + step;
    let from = to
        .checked_sub(window)
        .ok_or_else(|| invalid("window", "reaches before 1970"))?;
    Ok(Plan {
        window,
        step,
        resolution,
        from,
        to,
    })
}

async fn metrics(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &["type", "projectId", "window", "step"])?;
    let event_type = match params.get("type") {
        None => None,
        Some(t) if Category::of_type(t).is_some() => Some(t.as_str()),
        Some(t) => {
            return Err(invalid(
                "type",
                format!("{:?} is not an event type", clip(t, 64)),
            ));
        }
    };
    let project = match params.get("projectId") {
        None => None,
        Some(p) => Some(checked_id("project", p)?),
    };
    let window = duration_param(&params, "window", DEFAULT_WINDOW_MS)?;
    let step = duration_param(&params, "step", api.config.bucket_ms())?;
    let plan = plan(&api.config, window, step, now_ms())?;
    match project {
        Some(p) => check_member(&api, &caller, p).await?,
        None if caller.is_privileged() => {}
        None => {
            return Err(Problem::forbidden(
                "series across projects need an admin or service token; pass projectId",
            ));
        }
    }
    let field = store::field(project, event_type);
    let starts: Vec<u64> = (plan.from..plan.to)
        .step_by(plan.resolution as usize)
        .collect();
    let keys: Vec<String> = starts
        .iter()
        .map(|s| store::bucket_key(plan.resolution, *s))
        .collect();
    let mut redis = api.app.redis.clone();
    let rows = store::read_fields(&mut redis, &keys, &[field])
        .await
        .map_err(redis_err)?;
    let mut points: Vec<(u64, i64)> = (plan.from..plan.to)
        .step_by(plan.step as usize)
        .map(|s| (s, 0))
        .collect();
    for (start, row) in starts.iter().zip(rows) {
        let i = ((start - plan.from) / plan.step) as usize;
        if let Some(p) = points.get_mut(i) {
            p.1 += row.first().copied().unwrap_or(0);
        }
    }
    let total: i64 = points.iter().map(|p| p.1).sum();
    Ok(Json(json!({
        "type": event_type,
        "projectId": project,
        "window": label(plan.window),
        "step": label(plan.step),
        "resolution": label(plan.resolution),
        "from": rfc3339(plan.from),
        "to": rfc3339(plan.to),
        "points": points.iter().map(|(s, n)| json!({"start": rfc3339(*s), "count": n})).collect::<Vec<_>>(),
        "total": total,
    })))
}

/// Sums rows of `[total, words, type...]` into `{total, words, byType}`.
fn summed(rows: &[Vec<i64>], types: &[&str]) -> Map<String, Value> {
    let mut sums = vec![0i64; types.len() + 2];
    for row in rows {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    let mut by_type = Map::new();
    for (t, v) in types.iter().zip(&sums[2..]) {
        if *v != 0 {
            by_type.insert(t.to_string(), json!(v));
        }
    }
    let mut out = Map::new();
    out.insert("total".into(), json!(sums[0]));
    out.insert("words".into(), json!(sums[1]));
    out.insert("byType".into(), Value::Object(by_type));
    out
}

async fn project(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &[])?;
    let project = checked_id("project", &id)?;
    check_member(&api, &caller, project).await?;
    let now = now_ms();
    let b = api.config.bucket_ms();
    let types = all_types();
    let mut fields = vec![
        store::field(Some(project), None),
        store::words_field(Some(project)),
    ];
    fields.extend(types.iter().map(|t| store::field(Some(project), Some(t))));
    let current = now - now % b;
    let minute_from = current - MINUTE_MS;
    let this_minute = now - now % MINUTE_MS;
    let hour_from = this_minute - HOUR_MS;
    let today = now - now % DAY_MS;
    let mut keys = vec![store::bucket_key(b, current)];
    keys.extend(
        (minute_from..current)
            .step_by(b as usize)
            .map(|s| store::bucket_key(b, s)),
    );
    let minute_keys = keys.len() - 1;
    keys.extend(
        (hour_from..this_minute)
            .step_by(MINUTE_MS as usize)
            .map(|s| store::bucket_key(MINUTE_MS, s)),
    );
    keys.push(store::bucket_key(DAY_MS, today));
    let mut redis = api.app.redis.clone();
    let rows = store::read_fields(&mut redis, &keys, &fields)
        .await
        .map_err(redis_err)?;
    let mut current_fig = summed(&rows[..1], &types);
    current_fig.insert("start".into(), json!(rfc3339(current)));
    current_fig.insert("end".into(), json!(rfc3339(current + b)));
    let wpm = |m: &mut Map<String, Value>, minutes: f64| {
        let words = m["words"].as_i64().unwrap_or(0) as f64;
        m.insert("wpm".into(), json!(words / minutes));
    };
    let mut minute = summed(&rows[1..1 + minute_keys], &types);
    minute.insert("from".into(), json!(rfc3339(minute_from)));
    minute.insert("to".into(), json!(rfc3339(current)));
    wpm(&mut minute, 1.0);
    let mut hour = summed(&rows[1 + minute_keys..rows.len() - 1], &types);
    hour.insert("from".into(), json!(rfc3339(hour_from)));
    hour.insert("to".into(), json!(rfc3339(this_minute)));
    wpm(&mut hour, 60.0);
    let mut day = summed(&rows[rows.len() - 1..], &types);
    day.insert("from".into(), json!(rfc3339(today)));
    day.insert("to".into(), json!(rfc3339(now)));
    Ok(Json(json!({
        "projectId": project,
        "asOf": rfc3339(now),
        "bucket": label(b),
        "currentBucket": current_fig,
        "lastMinute": minute,
        "lastHour": hour,
        "today": day,
    })))
}

fn date(ms: u64) -> String {
    rfc3339(ms).chars().take(10).collect()
}

async fn book_sales(
    State(api): State<AnalyticsApi>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &["days"])?;
    let book = checked_id("book", &id)?;
    let days = match params.get("days") {
        None => DEFAULT_DAYS,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=MAX_DAYS).contains(n) && !v.starts_with('+'))
            .ok_or_else(|| {
                invalid(
                    "days",
                    format!("{:?} is not a number from 1 to {MAX_DAYS}", clip(v, 32)),
                )
            })?,
    };
    let mut redis = api.app.redis.clone();
    let sales = store::book(&mut redis, book).await.map_err(redis_err)?;
    if !caller.is_privileged() {
        let mut allowed = false;
        for project in sales.keys().filter_map(|f| f.strip_prefix("p:")) {
            let role = membership::role_of(&mut redis, project, &caller.user_id)
                .await
                .map_err(redis_err)?;
            if role.is_some() {
                allowed = true;
                break;
            }
        }
        if !allowed {
            return Err(Problem::forbidden(
                "a book's sales need an admin or service token, or membership of a project its sales events named",
            ));
        }
    }
    let today = now_ms() - now_ms() % DAY_MS;
    let day = |d: u64| {
        let units = sales.get(&format!("d:{d}:units")).copied().unwrap_or(0);
        let cents = sales.get(&format!("d:{d}:revenue")).copied().unwrap_or(0);
        (units, cents)
    };
    let mut list = Vec::new();
    let (mut units, mut cents) = (0, 0);
    for i in (0..days).rev() {
        let d = today - i * DAY_MS;
        let (u, c) = day(d);
        units += u;
        cents += c;
        list.push(json!({"date": date(d), "units": u, "revenue": c as f64 / 100.0}));
    }
    let (mut base_units, mut base_cents) = (0, 0);
    for i in 1..=BASELINE_DAYS {
        let (u, c) = day(today - i * DAY_MS);
        base_units += u;
        base_cents += c;
    }
    Ok(Json(json!({
        "bookId": book,
        "days": list,
        "totals": {"units": units, "revenue": cents as f64 / 100.0},
        "baseline": {
            "from": date(today - BASELINE_DAYS * DAY_MS),
            "to": date(today - DAY_MS),
            "days": BASELINE_DAYS,
            "unitsPerDay": base_units as f64 / BASELINE_DAYS as f64,
            "revenuePerDay": base_cents as f64 / 100.0 / BASELINE_DAYS as f64,
        },
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_pick_the_coarsest_resolution_and_refuse_too_many_points() {
        let c = AnalyticsConfig::default();
        let now = 10 * DAY_MS + 12_345;
        let p = plan(&c, HOUR_MS, 5 * MINUTE_MS, now).unwrap();
        assert_eq!(p.resolution, MINUTE_MS);
        assert_eq!(p.to, now - now % (5 * MINUTE_MS) + 5 * MINUTE_MS);
        assert_eq!(p.to - p.from, HOUR_MS);
        assert_eq!(
            plan(&c, 7 * DAY_MS, DAY_MS, now).unwrap().resolution,
            DAY_MS
        );
        assert_eq!(plan(&c, MINUTE_MS, 5000, now).unwrap().resolution, 5000);
        assert_eq!(
            plan(&c, HOUR_MS, 3000, now).unwrap_err().code,
            "invalid_parameter"
        );
        assert!(plan(&c, 7 * DAY_MS, 5000, now).is_err(), "too many points");
        assert!(plan(&c, 90_000, MINUTE_MS, now).is_err(), "not a multiple");
    }

    #[test]
    fn durations_are_bounded() {
        let mut p = HashMap::new();
        assert_eq!(duration_param(&p, "window", 7).unwrap(), 7);
        for (v, ok) in [
            ("5s", true),
            ("1h", true),
            ("0s", false),
            ("5", false),
            ("99999999999d", false),
            ("-1s", false),
            ("1y", false),
        ] {
            p.insert("window".to_string(), v.to_string());
            assert_eq!(duration_param(&p, "window", 1).is_ok(), ok, "{v}");
        }
    }
}
