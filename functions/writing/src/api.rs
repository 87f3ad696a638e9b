//! The writing-session HTTP API (paths from the seeds):
//! `POST /api/realtime/writing/sessions/start`, `POST …/{sessionId}/keystroke`,
//! `GET …/{sessionId}/metrics`, `POST …/{sessionId}/pause|resume|end`,
//! `GET /api/realtime/writing/sessions/active`, and
//! `GET /api/realtime/analytics/project/{projectId}/writing`.
//!
//! Writes are published to JetStream (the tracker applies them); reads come from the Redis
//! projections. Only the session's owner writes to it; project members may read.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::http::JsonBody;
use inkwire_shared::jetstream::{Outgoing, publish};
use inkwire_shared::membership::{self, ProjectRole, is_valid_id};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::schema::{FieldError, schemas};
use redis::AsyncCommands;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::session::Session;
use crate::state_machine::{SessionState, TrackerConfig, allowed};
use crate::store;

/// `metadata.source` of what the API publishes.
pub const SOURCE: &str = "api";
/// How far in the future a client timestamp may be (clock skew).
const MAX_CLOCK_SKEW_MS: i128 = 5 * 60 * 1000;

#[derive(Clone)]
pub struct WritingApi {
    pub app: AppState,
    pub config: Arc<TrackerConfig>,
}

impl axum::extract::FromRef<WritingApi> for AppState {
    fn from_ref(w: &WritingApi) -> AppState {
        w.app.clone()
    }
}

pub fn routes(api: WritingApi) -> Router {
    Router::new()
        .route("/api/realtime/writing/sessions/start", post(start))
        .route("/api/realtime/writing/sessions/active", get(active))
        .route(
            "/api/realtime/writing/sessions/{session_id}/keystroke",
            post(keystroke),
        )
        .route(
            "/api/realtime/writing/sessions/{session_id}/metrics",
            get(metrics),
        )
        .route(
            "/api/realtime/writing/sessions/{session_id}/pause",
            post(|s, c, p| request(s, c, p, SessionState::Paused)),
        )
        .route(
            "/api/realtime/writing/sessions/{session_id}/resume",
            post(|s, c, p| request(s, c, p, SessionState::ActiveWriting)),
        )
        .route(
            "/api/realtime/writing/sessions/{session_id}/end",
            post(|s, c, p| request(s, c, p, SessionState::Ended)),
        )
        .route(
            "/api/realtime/analytics/project/{project_id}/writing",
            get(project_analytics),
        )
        .route(
            "/api/realtime/writing/preferences",
            axum::routing::put(put_preferences),
        )
        .route("/api/realtime/writing/stats", get(user_stats))
        .with_state(api)
}

fn now_ms() -> u64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

async fn publish_event(api: &WritingApi, event: Event) -> Result<u64, Problem> {
    let payload = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
    let published = publish(
        &api.app.js,
        Outgoing {
            subject: event.subject(),
            msg_id: event.id.to_string(),
            payload,
        },
    )
    .await
    .map_err(|e| dependency_failed("nats", e))?;
    Ok(published.sequence)
}

fn event(caller: &Caller, session: &Session, event_type: &str, data: Value) -> Event {
    let mut b = Event::builder(Category::Writing, event_type, caller.user_id.clone())
        .data(data)
        .source(SOURCE);
    if let Some(p) = &session.project_id {
        b = b.project(p.clone());
    }
    if let Some(d) = &session.document_id {
        b = b.document(d.clone());
    }
    b.build()
}

/// Loads a session, 404 when unknown.
async fn load(api: &WritingApi, id: &str) -> Result<Session, Problem> {
    if !is_valid_id(id) {
        return Err(Problem::not_found(format!("no writing session {id:?}")));
    }
    let mut redis = api.app.redis.clone();
    store::load(&mut redis, id)
        .await
        .map_err(redis_err)?
        .map(|l| l.session)
        .ok_or_else(|| Problem::not_found(format!("no writing session {id:?}")))
}

fn owner_only(caller: &Caller, s: &Session) -> Result<(), Problem> {
    if s.user_id == caller.user_id || caller.is_service() {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "only the session's owner may write to it",
        ))
    }
}

async fn start(
    State(api): State<WritingApi>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    schemas()
        .validate("api/writing-start-request.json", &body)
        .map_err(Problem::validation)?;
    let project = body["projectId"].as_str().expect("schema").to_string();
    let document = body["documentId"].as_str().expect("schema").to_string();
    let goal = body
        .get("goalWords")
        .and_then(Value::as_u64)
        .map(|g| g as u32);
    let mut redis = api.app.redis.clone();
    let role = membership::role_of(&mut redis, &project, &caller.user_id)
        .await
        .map_err(redis_err)?;
    match role {
        Some(ProjectRole::Owner | ProjectRole::Editor) => {}
        Some(_) => {
            return Err(Problem::forbidden(format!(
                "writing in project {project:?} needs the owner or editor role"
            )));
        }
        None => {
            return Err(Problem::forbidden(format!(
                "you are not a member of project {project:?}"
            )));
        }
    }
    match membership::project_of_document(&mut redis, &document)
        .await
        .map_err(redis_err)?
    {
        Some(p) if p == project => {}
        _ => {
            return Err(Problem::unprocessable(
                "unknown_document",
                format!("document {document:?} is not registered in project {project:?}"),
            ));
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let baseline = store::baseline(&mut redis, &caller.user_id, api.config.default_baseline_wpm)
        .await
        .map_err(redis_err)?;
    let session = Session::new(
        &id,
        &caller.user_id,
        Some(project),
        Some(document),
        goal,
        now_ms(),
        baseline,
    );
    let mut data = json!({"sessionId": id});
    if let Some(g) = goal {
        data["goalWords"] = json!(g);
    }
    let mut ev = event(&caller, &session, "session_started", data);
    ev.timestamp =
        OffsetDateTime::from_unix_timestamp_nanos(session.started_ms as i128 * 1_000_000)
            .unwrap_or(ev.timestamp);
    // The projection exists as soon as the answer is sent; the tracker creates the same one
    // from the event (and does, on replay).
    store::save(&mut redis, &session, 0, &api.config, 0, "")
        .await
        .map_err(redis_err)?;
    publish_event(&api, ev).await?;
    Ok((StatusCode::CREATED, Json(session.metrics(now_ms()))).into_response())
}

async fn keystroke(
    State(api): State<WritingApi>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let session = load(&api, &id).await?;
    owner_only(&caller, &session)?;
    schemas()
        .validate("api/writing-keystroke-request.json", &body)
        .map_err(Problem::validation)?;
    if let Some(ts) = body.get("clientTimestamp").and_then(Value::as_str)
        && let Ok(t) = OffsetDateTime::parse(ts, &Rfc3339)
        && (t - OffsetDateTime::now_utc()).whole_milliseconds() > MAX_CLOCK_SKEW_MS
    {
        return Err(Problem::validation(vec![FieldError::new(
            "/clientTimestamp",
            "maximumTime",
            body.get("clientTimestamp"),
            "client timestamp is more than 5 minutes in the future",
        )]));
    }
    if session.state == SessionState::Ended {
        return Err(Problem::conflict(
            "session_ended",
            format!("session {id:?} has ended"),
        ));
    }
    let mut data = body;
    data["sessionId"] = json!(id);
    let seq = publish_event(&api, event(&caller, &session, "keystroke", data)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"sessionId": id, "sequence": seq})),
    )
        .into_response())
}

async fn request(
    State(api): State<WritingApi>,
    caller: Caller,
    Path(id): Path<String>,
    to: SessionState,
) -> Result<Response, Problem> {
    let session = load(&api, &id).await?;
    owner_only(&caller, &session)?;
    let verb = match to {
        SessionState::Paused => "pause",
        SessionState::Ended => "end",
        _ => "resume",
    };
    let effective = match (session.state, to) {
        (SessionState::Break, SessionState::ActiveWriting) => SessionState::WarmingUp,
        (SessionState::Paused, SessionState::ActiveWriting) => SessionState::ActiveWriting,
        (s, SessionState::ActiveWriting) if s != SessionState::Paused => s,
        (_, t) => t,
    };
    if !allowed(session.state, effective)
        || (to == SessionState::ActiveWriting
            && !matches!(session.state, SessionState::Paused | SessionState::Break))
    {
        return Err(Problem::conflict(
            "invalid_transition",
            format!("cannot {verb} a session that is {}", session.state.as_str()),
        ));
    }
    if to == SessionState::Ended {
        // Ending is final: the second request is refused even before the tracker applied
        // the first.
        let mut redis = api.app.redis.clone();
        let first: bool = redis
            .set_nx(store::end_requested_key(&id), 1)
            .await
            .map_err(redis_err)?;
        if !first {
            return Err(Problem::conflict(
                "invalid_transition",
                format!("session {id:?} is already ending"),
            ));
        }
        let _: () = redis
            .expire(store::end_requested_key(&id), 48 * 3600)
            .await
            .map_err(redis_err)?;
    }
    let data = json!({"sessionId": id, "from": session.state, "to": to, "reason": "user"});
    let seq = publish_event(
        &api,
        event(&caller, &session, "session_state_changed", data),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"sessionId": id, "requested": to, "sequence": seq})),
    )
        .into_response())
}

async fn metrics(
    State(api): State<WritingApi>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let session = load(&api, &id).await?;
    if session.user_id != caller.user_id && !caller.is_privileged() {
        let mut redis = api.app.redis.clone();
        let member = match &session.project_id {
            Some(p) => membership::role_of(&mut redis, p, &caller.user_id)
                .await
                .map_err(redis_err)?
                .is_some(),
            None => false,
        };
        if !member {
            return Err(Problem::forbidden(
                "only the owner and members of the session's project may read it",
            ));
        }
    }
    Ok(Json(session.metrics(now_ms())).into_response())
}

async fn sessions_in(api: &WritingApi, set_key: &str) -> Result<Vec<Session>, Problem> {
    let mut redis = api.app.redis.clone();
    let ids = store::active(&mut redis, set_key)
        .await
        .map_err(redis_err)?;
    let mut out = Vec::new();
    for id in ids {
        if let Some(l) = store::load(&mut redis, &id).await.map_err(redis_err)?
            && l.session.state != SessionState::Ended
        {
            out.push(l.session);
        }
    }
    Ok(out)
}

async fn active(State(api): State<WritingApi>, caller: Caller) -> Result<Response, Problem> {
    let now = now_ms();
    let sessions: Vec<Value> = sessions_in(&api, &store::user_active_key(&caller.user_id))
        .await?
        .iter()
        .map(|s| s.metrics(now))
        .collect();
    Ok(Json(json!({"userId": caller.user_id, "sessions": sessions})).into_response())
}

async fn project_analytics(
    State(api): State<WritingApi>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Response, Problem> {
    if !is_valid_id(&project) {
        return Err(Problem::bad_request(
            "invalid_id",
            format!("projectId {project:?} is not a valid id"),
        ));
    }
    let mut redis = api.app.redis.clone();
    if !caller.is_privileged()
        && membership::role_of(&mut redis, &project, &caller.user_id)
            .await
            .map_err(redis_err)?
            .is_none()
    {
        return Err(Problem::forbidden(format!(
            "you are not a member of project {project:?}"
        )));
    }
    let now = now_ms();
    let sessions = sessions_in(&api, &store::project_active_key(&project)).await?;
    let today = {
        let t = OffsetDateTime::now_utc();
        format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
    };
    let words_today: Option<i64> = redis
        .hget(store::project_days_key(&project), &today)
        .await
        .map_err(redis_err)?;
    let writing: Vec<&Session> = sessions.iter().filter(|s| s.state.is_writing()).collect();
    let average_wpm = if writing.is_empty() {
        0.0
    } else {
        writing.iter().map(|s| s.wpm(now, 300)).sum::<f64>() / writing.len() as f64
    };
    let writers: Vec<Value> = sessions
        .iter()
        .map(|s| json!({"userId": s.user_id, "sessionId": s.id, "documentId": s.document_id, "state": s.state, "wpm5m": (s.wpm(now, 300) * 100.0).round() / 100.0, "words": s.net_words()}))
        .collect();
    Ok(Json(json!({
        "projectId": project,
        "activeWriters": writers,
        "wordsToday": words_today.unwrap_or(0).max(0),
        "averageWpm": (average_wpm * 100.0).round() / 100.0,
        "sessionsInFlow": sessions.iter().filter(|s| s.state == SessionState::FlowState).count(),
    }))
    .into_response())
}

async fn put_preferences(
    State(api): State<WritingApi>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    schemas()
        .validate("api/writing-preferences-request.json", &body)
        .map_err(Problem::validation)?;
    let mut redis = api.app.redis.clone();
    let key = store::preferences_key(&caller.user_id);
    if let Some(tz) = body.get("timeZone").and_then(Value::as_str) {
        if crate::days::time_zone(tz).is_none() {
            return Err(Problem::validation(vec![FieldError::new(
                "/timeZone",
                "timeZone",
                body.get("timeZone"),
                format!("{tz:?} is not an IANA time zone"),
            )]));
        }
        let _: () = redis.hset(&key, "timeZone", tz).await.map_err(redis_err)?;
    }
    if let Some(goal) = body.get("dailyGoalWords").and_then(Value::as_u64) {
        let _: () = redis
            .hset(&key, "dailyGoalWords", goal)
            .await
            .map_err(redis_err)?;
    }
    user_stats(State(api), caller).await
}

/// The caller's words per local day (last 30 days), today's goal progress and streak.
async fn user_stats(State(api): State<WritingApi>, caller: Caller) -> Result<Response, Problem> {
    let mut redis = api.app.redis.clone();
    let prefs: std::collections::HashMap<String, String> = redis
        .hgetall(store::preferences_key(&caller.user_id))
        .await
        .map_err(redis_err)?;
    let tz = prefs.get("timeZone").cloned();
    let goal: Option<u64> = prefs.get("dailyGoalWords").and_then(|g| g.parse().ok());
    let days: std::collections::HashMap<String, i64> = redis
        .hgetall(store::user_days_key(&caller.user_id))
        .await
        .map_err(redis_err)?;
    let words_on = |d: &str| days.get(d).copied().unwrap_or(0).max(0) as u64;
    let today = crate::days::local_day(now_ms(), tz.as_deref());
    let mut recent: Vec<(&String, &i64)> = days.iter().collect();
    recent.sort();
    let recent: Vec<Value> = recent
        .iter()
        .rev()
        .take(30)
        .map(|(d, w)| json!({"date": d, "words": (**w).max(0)}))
        .collect();
    Ok(Json(json!({
        "userId": caller.user_id,
        "timeZone": tz.unwrap_or_else(|| "UTC".into()),
        "dailyGoalWords": goal,
        "today": {"date": today, "words": words_on(&today), "goalProgress": goal.map(|g| ((words_on(&today) as f64 / g as f64).min(1.0) * 100.0).round() / 100.0)},
        "streakDays": crate::days::streak(&today, goal.unwrap_or(1), words_on),
        "days": recent,
    }))
    .into_response())
}
