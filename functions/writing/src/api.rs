//! The writing-session HTTP API (paths from the seeds):
//! `POST /api/realtime/writing/sessions/start`, `POST …/{sessionId}/keystroke`,
//! `GET …/{sessionId}/metrics`, `POST …/{sessionId}/pause|resume|end`,
//! `GET /api/realtime/writing/sessions/active`, and
//! `GET /api/realtime/analytics/project/{projectId}/writing`.
//!
//! Writes are published to JetStream (the tracker applies them); reads come from the Redis
//! projections. Only the session's owner writes to it; project members may read.
//!
//! Every write (start, keystroke, pause, resume, end) is retry-safe: it runs through
//! `shared::idempotent_requests`, so an `Idempotency-Key` makes the published event id the
//! same for every retry and keeps the first answer.

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
use inkwire_shared::idempotent_requests::{self, Attempt, IdempotencyKey, Scope};
use inkwire_shared::jetstream::{Outgoing, publish_acked};
use inkwire_shared::membership::{self, ProjectRole, is_valid_id};
use inkwire_shared::problem::{OUTCOME_UNKNOWN, Problem, dependency_failed};
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
            post(|s, c, k, p| request(s, c, k, p, SessionState::Paused)),
        )
        .route(
            "/api/realtime/writing/sessions/{session_id}/resume",
            post(|s, c, k, p| request(s, c, k, p, SessionState::ActiveWriting)),
        )
        .route(
            "/api/realtime/writing/sessions/{session_id}/end",
            post(|s, c, k, p| request(s, c, k, p, SessionState::Ended)),
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

/// Publishes `event` (`what` names it in errors): `413` when it is larger than NATS
/// accepts, `503 outcome_unknown` with the attempt's retry id when the ack did not come.
async fn publish_event(
    api: &WritingApi,
    event: Event,
    attempt: &Attempt,
    what: &str,
) -> Result<u64, Problem> {
    let payload = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
    let published = publish_acked(
        &api.app.js,
        Outgoing {
            subject: event.subject(),
            msg_id: event.id.to_string(),
            payload,
        },
    )
    .await
    .map_err(|e| attempt.publish_problem(&e, what))?;
    Ok(published.sequence)
}

/// An event for `session`, by its owner (also when the service role acts for the owner: the
/// tracker applies only the owner's events), stamped with the server's clock.
fn event(session: &Session, event_type: &str, data: Value) -> Event {
    let mut b = Event::builder(Category::Writing, event_type, session.user_id.clone())
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
    key: IdempotencyKey,
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
    let scope = Scope {
        route: "writing.start",
        caller: &caller.user_id,
        target: &document,
    };
    let (api, caller, p, d) = (&api, &caller, &project, &document);
    idempotent_requests::run(&api.app, scope, key, Some(&body), |attempt| async move {
        start_session(api, caller, attempt, p.clone(), d.clone(), goal).await
    })
    .await
}

/// Creates the session: the id is the attempt's derived id, so a retry with the same key
/// names the same session and its `session_started` is deduplicated.
async fn start_session(
    api: &WritingApi,
    caller: &Caller,
    attempt: Attempt,
    project: String,
    document: String,
    goal: Option<u32>,
) -> Result<Response, Problem> {
    let mut redis = api.app.redis.clone();
    let id = attempt.event_id.to_string();
    // A retry of a start whose answer was lost finds its session: it is not created again
    // (that would reset what the tracker applied since), only its start is published again.
    let existing = store::load(&mut redis, &id)
        .await
        .map_err(redis_err)?
        .map(|l| l.session);
    let session = match existing {
        Some(s) => s,
        None => {
            let baseline =
                store::baseline(&mut redis, &caller.user_id, api.config.default_baseline_wpm)
                    .await
                    .map_err(redis_err)?;
            let mut session = Session::new(
                &id,
                &caller.user_id,
                Some(project),
                Some(document),
                goal,
                now_ms(),
                baseline,
            );
            // The writer's zone decides which local day the session's words count for; the
            // tracker learns it from session_started.
            session.time_zone = redis
                .hget(store::preferences_key(&caller.user_id), "timeZone")
                .await
                .map_err(redis_err)?;
            // The projection exists as soon as the answer is sent; the tracker creates the
            // same one from the event (and does, on replay).
            store::save(&mut redis, &session, 0, &api.config, 0, "")
                .await
                .map_err(redis_err)?;
            session
        }
    };
    let mut data = json!({"sessionId": id});
    if let Some(g) = session.goal_words {
        data["goalWords"] = json!(g);
    }
    if let Some(tz) = &session.time_zone {
        data["timeZone"] = json!(tz);
    }
    let mut ev = event(&session, "session_started", data);
    ev.id = attempt.event_id;
    ev.timestamp =
        OffsetDateTime::from_unix_timestamp_nanos(session.started_ms as i128 * 1_000_000)
            .unwrap_or(ev.timestamp);
    publish_event(api, ev, &attempt, "the session start").await?;
    Ok((StatusCode::CREATED, Json(session.metrics(now_ms()))).into_response())
}

async fn keystroke(
    State(api): State<WritingApi>,
    caller: Caller,
    key: IdempotencyKey,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    // The session and whether its end was accepted, in one round trip (keystrokes are the
    // busiest write).
    let (session, ending) = if is_valid_id(&id) {
        store::load_for_input(&mut api.app.redis.clone(), &id)
            .await
            .map_err(redis_err)?
    } else {
        (None, false)
    };
    let session =
        session.ok_or_else(|| Problem::not_found(format!("no writing session {id:?}")))?;
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
    let scope = Scope {
        route: "writing.keystroke",
        caller: &caller.user_id,
        target: &id,
    };
    let (api, session, id, batch) = (&api, &session, &id, &body);
    idempotent_requests::run(&api.app, scope, key, Some(&body), |attempt| async move {
        // After an unknown outcome the batch may be applied and the session ended since;
        // the retry is deduplicated, so it is not refused.
        if session.state == SessionState::Ended && !attempt.after_unknown {
            return Err(Problem::conflict(
                "session_ended",
                format!("session {id:?} has ended"),
            ));
        }
        // Once an end was accepted, the tracker would ignore later input: refuse it here
        // instead of answering 202 for nothing.
        if ending && !attempt.after_unknown {
            return Err(Problem::conflict(
                "session_ended",
                format!("session {id:?} is ending"),
            ));
        }
        let mut data = batch.clone();
        data["sessionId"] = json!(id);
        let mut ev = event(session, "keystroke", data);
        ev.id = attempt.event_id;
        let seq = publish_event(api, ev, &attempt, "the keystroke batch").await?;
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"sessionId": id, "sequence": seq})),
        )
            .into_response())
    })
    .await
}

async fn request(
    State(api): State<WritingApi>,
    caller: Caller,
    key: IdempotencyKey,
    Path(id): Path<String>,
    to: SessionState,
) -> Result<Response, Problem> {
    let session = load(&api, &id).await?;
    owner_only(&caller, &session)?;
    let (verb, route) = match to {
        SessionState::Paused => ("pause", "writing.pause"),
        SessionState::Ended => ("end", "writing.end"),
        _ => ("resume", "writing.resume"),
    };
    let scope = Scope {
        route,
        caller: &caller.user_id,
        target: &id,
    };
    let (api, session, id) = (&api, &session, &id);
    idempotent_requests::run(&api.app, scope, key, None, |attempt| async move {
        transition(api, session, id, to, verb, attempt).await
    })
    .await
}

/// Asks the tracker for a transition (checked against the current state first).
async fn transition(
    api: &WritingApi,
    session: &Session,
    id: &str,
    to: SessionState,
    verb: &str,
    attempt: Attempt,
) -> Result<Response, Problem> {
    let effective = match (session.state, to) {
        (SessionState::Break, SessionState::ActiveWriting) => SessionState::WarmingUp,
        (SessionState::Paused, SessionState::ActiveWriting) => SessionState::ActiveWriting,
        (s, SessionState::ActiveWriting) if s != SessionState::Paused => s,
        (_, t) => t,
    };
    // After an unknown outcome the transition may be applied already; the retry publishes
    // the same event id (deduplicated), and the tracker ignores a transition its state no
    // longer allows.
    if !attempt.after_unknown
        && (!allowed(session.state, effective)
            || (to == SessionState::ActiveWriting
                && !matches!(session.state, SessionState::Paused | SessionState::Break)))
    {
        return Err(Problem::conflict(
            "invalid_transition",
            format!("cannot {verb} a session that is {}", session.state.as_str()),
        ));
    }
    let event_id = attempt.event_id.to_string();
    if to == SessionState::Ended {
        // Ending is final: the second request is refused even before the tracker applied
        // the first. The marker holds the end's event id, so a retry of the same end
        // (same Idempotency-Key) is not "a second request".
        let mut redis = api.app.redis.clone();
        let first: bool = redis::cmd("SET")
            .arg(store::end_requested_key(id))
            .arg(&event_id)
            .arg("NX")
            .arg("EX")
            .arg(48 * 3600)
            .query_async::<Option<String>>(&mut redis)
            .await
            .map_err(redis_err)?
            .is_some();
        if !first {
            let marker: Option<String> = redis
                .get(store::end_requested_key(id))
                .await
                .map_err(redis_err)?;
            if marker.as_deref() != Some(event_id.as_str()) {
                return Err(Problem::conflict(
                    "invalid_transition",
                    format!("session {id:?} is already ending"),
                ));
            }
        }
    }
    let data = json!({"sessionId": id, "from": session.state, "to": to, "reason": "user"});
    let mut ev = event(session, "session_state_changed", data);
    ev.id = attempt.event_id;
    let published = publish_event(api, ev, &attempt, &format!("the {verb} request")).await;
    let seq = match published {
        Ok(seq) => seq,
        Err(problem) => {
            if to == SessionState::Ended && problem.code != OUTCOME_UNKNOWN {
                // Nothing was published: the session is not ending after all.
                let mut redis = api.app.redis.clone();
                let _: Result<i64, _> = redis::Script::new(
                    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                )
                .key(store::end_requested_key(id))
                .arg(&event_id)
                .invoke_async(&mut redis)
                .await;
            }
            return Err(problem);
        }
    };
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
