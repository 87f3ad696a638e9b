//! The user-presence HTTP API (every route behind a bearer token, every error
//! problem+json, every id checked before it reaches a Redis key):
//! - `GET /api/realtime/presence/users/{userId}` — status, `lastSeen`, devices; for the
//!   caller themself, a user who shares a project or chat room with the caller, or a
//!   service/admin caller. Anyone else is answered `404 user_not_found`, exactly like a user
//!   who does not exist, so the route does not reveal who exists or is online;
//! - `GET /api/realtime/presence/rooms/{roomId}` — the room's participants online or away now;
//!   for participants (and service/admin) only, `404 room_not_found` otherwise (as chat
//!   answers for rooms one is not in);
//! - `POST /api/realtime/presence/status` `{status: "online" | "away"}` — the client says so;
//!   `409 not_connected` without a live connection. "Invisible" (appearing offline while
//!   connected) is out of scope.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::http::JsonBody;
use inkwire_shared::membership::{self, is_valid_id};
use inkwire_shared::problem::{Problem, clip, dependency_failed};
use inkwire_shared::schema::schemas;
use serde_json::{Value, json};

use crate::config::PresenceConfig;
use crate::store::{self, Op, Status, rfc3339};
use crate::worker::now_ms;
use inkwire_shared::problem::checked_id;

#[derive(Clone)]
pub struct PresenceApi {
    pub app: AppState,
    pub config: PresenceConfig,
}

impl axum::extract::FromRef<PresenceApi> for AppState {
    fn from_ref(p: &PresenceApi) -> AppState {
        p.app.clone()
    }
}

pub fn routes(api: PresenceApi) -> Router {
    Router::new()
        .route("/api/realtime/presence/users/{user}", get(user_presence))
        .route("/api/realtime/presence/rooms/{room}", get(room_presence))
        .route("/api/realtime/presence/status", post(set_status))
        .with_state(api)
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

fn device_json(connection: &str, data: &Value) -> Value {
    json!({
        "connectionId": connection,
        "type": data["device"].get("type"),
        "name": data["device"].get("name"),
        "connectedAt": data["connectedAt"].as_u64().and_then(rfc3339),
    })
}

async fn user_presence(
    State(api): State<PresenceApi>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Json<Value>, Problem> {
    let user = checked_id("user", &user)?;
    let mut redis = api.app.redis.clone();
    if user != caller.user_id
        && !caller.is_privileged()
        && !membership::share_project_or_room(&mut redis, &caller.user_id, user)
            .await
            .map_err(redis_err)?
    {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "user_not_found",
            format!(
                "no user {:?} that you share a project or room with",
                clip(user, 64)
            ),
        ));
    }
    let p = store::read(&mut redis, user, now_ms(), api.config.away_after_ms())
        .await
        .map_err(redis_err)?;
    Ok(Json(json!({
        "userId": user,
        "status": p.status.as_str(),
        "lastSeen": if p.status == Status::Offline { p.last_seen.and_then(rfc3339) } else { None },
        "lastActive": p.last_active.and_then(rfc3339),
        "devices": p.devices.iter().map(|(c, d)| device_json(c, d)).collect::<Vec<_>>(),
    })))
}

async fn room_presence(
    State(api): State<PresenceApi>,
    caller: Caller,
    Path(room): Path<String>,
) -> Result<Json<Value>, Problem> {
    let room = checked_id("room", &room)?;
    let mut redis = api.app.redis.clone();
    let mut participants = membership::room_participants(&mut redis, room)
        .await
        .map_err(redis_err)?;
    if !caller.is_privileged() && !participants.contains(&caller.user_id) {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "room_not_found",
            format!("no room {:?} that you are a participant of", clip(room, 64)),
        ));
    }
    participants.retain(|p| is_valid_id(p));
    participants.sort();
    let statuses = store::statuses(
        &mut redis,
        &participants,
        now_ms(),
        api.config.away_after_ms(),
    )
    .await
    .map_err(redis_err)?;
    let online: Vec<Value> = participants
        .iter()
        .zip(statuses)
        .filter(|(_, s)| *s != Status::Offline)
        .map(|(u, s)| json!({"userId": u, "status": s.as_str()}))
        .collect();
    Ok(Json(json!({
        "roomId": room,
        "participants": participants.len(),
        "online": online,
    })))
}

async fn set_status(
    State(api): State<PresenceApi>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, Problem> {
    schemas()
        .validate("api/presence-status-request.json", &body)
        .map_err(Problem::validation)?;
    let status = body["status"].as_str().expect("schema checked status");
    let user = checked_id("user", &caller.user_id)?;
    let mut redis = api.app.redis.clone();
    let state = store::apply(
        &mut redis,
        user,
        &Op::SetStatus(status),
        now_ms(),
        api.config.away_after_ms(),
    )
    .await
    .map_err(redis_err)?
    .ok_or_else(|| {
        Problem::conflict(
            "not_connected",
            "the status can be set while connected to the relay (no live connection)",
        )
    })?;
    // The idle check is queued while the update is pushed (neither needs the other).
    let mut queue_conn = redis.clone();
    let idle_check = async {
        if state.status == Status::Online {
            inkwire_shared::due_queue::DueQueue::new(store::IDLE_QUEUE)
                .schedule(
                    &mut queue_conn,
                    user,
                    state.last_active + api.config.away_after_ms(),
                )
                .await
                .map_err(redis_err)?;
        }
        Ok::<(), Problem>(())
    };
    // Pushed even when unchanged: a retry after a failed push pushes it then, and the
    // message ids (user, version, channel) keep it from going twice.
    let pushed = async {
        store::push(&api.app.js, &mut redis, user, &state)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "presence status saved, push failed");
                Problem::unavailable(
                    "the status is saved but could not be pushed; send it again to push it",
                )
                .with_retry_after(1)
            })
    };
    tokio::try_join!(idle_check, pushed)?;
    Ok(Json(json!({
        "userId": user,
        "status": state.status.as_str(),
    })))
}
