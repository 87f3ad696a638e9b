//! The chat HTTP API (every route behind a bearer token, every error problem+json, every id
//! checked before it reaches a Redis key or a NATS subject):
//! - `POST /api/realtime/chat/rooms` `{name?, participants}` — create (the caller is in it;
//!   an `Idempotency-Key` makes a retry answer the same room); `GET …/rooms` — the caller's
//!   rooms with unread counts and last messages; `GET …/rooms/{id}` — one room;
//! - `POST …/rooms/{id}/participants` `{userId}`, `DELETE …/rooms/{id}/participants/{userId}`
//!   — add (any participant), remove (oneself, the creator, or service/admin); a removal is
//!   announced to every relay instance, which drops the user's `room:` subscriptions at once;
//! - `POST …/rooms/{id}/messages` `{clientMessageId, text}` — send (a retry with the same
//!   client message id answers the same message); `GET …/rooms/{id}/messages?before=&after=
//!   &limit=` — history; `PUT` / `DELETE …/rooms/{id}/messages/{seq}` — edit, tombstone;
//! - `POST …/rooms/{id}/read` `{upTo}` — read receipt; `POST …/rooms/{id}/typing` — typing.
//!
//! A room the caller is not in is answered like one that does not exist (`404`).

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use inkwire_shared::AppState;
use inkwire_shared::access_changes::{self, AccessChange};
use inkwire_shared::auth::Caller;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::http::JsonBody;
use inkwire_shared::idempotent_requests::{self, IdempotencyKey, Scope};
use inkwire_shared::jetstream::{self, Outgoing};
use inkwire_shared::problem::{Problem, clip, dependency_failed};
use inkwire_shared::schema::schemas;
use inkwire_shared::subjects;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::store::{self, Outcome, is_valid_id};
use inkwire_shared::problem::checked_id;
use inkwire_shared::problem::refuse_unknown_params;

/// Default and largest history page.
pub const DEFAULT_PAGE: u64 = 50;
pub const MAX_PAGE: u64 = 100;
/// One typing indicator per user and room per this many milliseconds.
pub const TYPING_INTERVAL_MS: u64 = 1000;
/// Largest number of participants a room is created with.
pub const MAX_PARTICIPANTS: usize = 1000;

#[derive(Clone)]
pub struct ChatApi {
    pub app: AppState,
}

impl axum::extract::FromRef<ChatApi> for AppState {
    fn from_ref(c: &ChatApi) -> AppState {
        c.app.clone()
    }
}

pub fn routes(api: ChatApi) -> Router {
    Router::new()
        .route(
            "/api/realtime/chat/rooms",
            post(create_room).get(list_rooms),
        )
        .route("/api/realtime/chat/rooms/{room}", get(get_room))
        .route(
            "/api/realtime/chat/rooms/{room}/participants",
            post(add_participant),
        )
        .route(
            "/api/realtime/chat/rooms/{room}/participants/{user}",
            delete(remove_participant),
        )
        .route(
            "/api/realtime/chat/rooms/{room}/messages",
            post(send_message).get(history),
        )
        .route(
            "/api/realtime/chat/rooms/{room}/messages/{seq}",
            put(edit_message).delete(delete_message),
        )
        .route("/api/realtime/chat/rooms/{room}/read", post(mark_read))
        .route("/api/realtime/chat/rooms/{room}/typing", post(typing))
        .with_state(api)
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

fn now() -> (OffsetDateTime, String) {
    let t = OffsetDateTime::now_utc();
    let text = t.format(&Rfc3339).expect("RFC 3339 formats");
    (t, text)
}

fn seq_of(raw: &str) -> Result<u64, Problem> {
    raw.parse::<u64>()
        .ok()
        .filter(|s| *s > 0 && raw.len() <= 20 && !raw.starts_with('+'))
        .ok_or_else(|| {
            Problem::bad_request(
                "invalid_id",
                format!(
                    "message sequence {:?} is not a positive number",
                    clip(raw, 64)
                ),
            )
        })
}

fn validate(schema: &str, body: &Value) -> Result<(), Problem> {
    schemas()
        .validate(schema, body)
        .map_err(Problem::validation)
}

fn no_room(room: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "room_not_found",
        format!("no room {:?} that you are a participant of", clip(room, 64)),
    )
}

fn no_message(seq: u64) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "message_not_found",
        format!("no message {seq} in this room"),
    )
}

fn refused<T>(o: Outcome<T>, room: &str, seq: u64) -> Result<T, Problem> {
    match o {
        Outcome::Done(v) => Ok(v),
        Outcome::NoRoom => Err(no_room(room)),
        Outcome::NoMessage => Err(no_message(seq)),
        Outcome::NotYours => Err(Problem::forbidden(format!(
            "message {seq} is not yours: only its sender may change it"
        ))),
        Outcome::Deleted => Err(Problem::conflict(
            "message_deleted",
            format!("message {seq} is deleted and cannot be edited"),
        )),
        Outcome::IdReused => Err(Problem::conflict(
            "client_message_id_reused",
            "this clientMessageId was used before for a message with another text; a retry \
             must repeat the text, a new message needs a new id",
        )),
    }
}

async fn participant(api: &ChatApi, room: &str, caller: &Caller) -> Result<(), Problem> {
    let mut redis = api.app.redis.clone();
    if store::is_participant(&mut redis, room, &caller.user_id)
        .await
        .map_err(redis_err)?
    {
        Ok(())
    } else {
        Err(no_room(room))
    }
}

fn saved_not_pushed(e: impl std::fmt::Display) -> Problem {
    tracing::error!(error = %e, "chat change saved, log or live push failed");
    Problem::unavailable(
        "the change is saved but could not be logged or pushed; retry the request (it changes \
         nothing twice) to finish it",
    )
    .with_retry_after(1)
}

/// Appends `record` to the room's log in the CHAT stream (deduplicated by `msg_id`).
async fn log(api: &ChatApi, room: &str, msg_id: String, record: &Value) -> Result<(), Problem> {
    jetstream::publish(
        &api.app.js,
        Outgoing {
            subject: subjects::chat_subject(room),
            msg_id,
            payload: Bytes::from(record.to_string()),
        },
    )
    .await
    .map(|_| ())
    .map_err(saved_not_pushed)
}

/// Pushes `data` to `room:{room}` (deduplicated by `msg_id`).
async fn push(api: &ChatApi, room: &str, msg_id: String, data: &Value) -> Result<(), Problem> {
    channels::publish(
        &api.app.js,
        &Channel::new(ChannelKind::Room, room),
        MessageType::RoomUpdate,
        data,
        msg_id,
    )
    .await
    .map(|_| ())
    .map_err(saved_not_pushed)
}

async fn create_room(
    State(api): State<ChatApi>,
    caller: Caller,
    key: IdempotencyKey,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    validate("api/chat-room-request.json", &body)?;
    let mut participants: Vec<String> = body["participants"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    if !is_valid_id(&caller.user_id) {
        return Err(Problem::forbidden(
            "your user id cannot take part in a room",
        ));
    }
    if !participants.contains(&caller.user_id) {
        participants.push(caller.user_id.clone());
    }
    if participants.len() > MAX_PARTICIPANTS {
        return Err(Problem::bad_request(
            "too_many_participants",
            format!("a room is created with at most {MAX_PARTICIPANTS} participants"),
        ));
    }
    let name = body["name"].as_str().unwrap_or("").to_string();
    // A key makes the room id derived: a retry finds the room it created.
    let room = match &key.0 {
        Some(k) => idempotent_requests::event_id(
            &Scope {
                route: "chat.rooms.create",
                caller: &caller.user_id,
                target: "rooms",
            },
            k,
        )
        .simple()
        .to_string(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    let (_, created_at) = now();
    let mut redis = api.app.redis.clone();
    let fresh = store::create(
        &mut redis,
        &room,
        &name,
        &caller.user_id,
        &created_at,
        &participants,
    )
    .await
    .map_err(redis_err)?;
    let view = store::room(&mut redis, &room).await.map_err(redis_err)?;
    let mut response = (
        if fresh {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(view),
    )
        .into_response();
    if !fresh {
        response.headers_mut().insert(
            idempotent_requests::REPLAYED_HEADER,
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

async fn list_rooms(State(api): State<ChatApi>, caller: Caller) -> Result<Json<Value>, Problem> {
    if !is_valid_id(&caller.user_id) {
        return Ok(Json(json!({"rooms": []})));
    }
    let mut redis = api.app.redis.clone();
    let rooms = store::my_rooms(&mut redis, &caller.user_id)
        .await
        .map_err(redis_err)?;
    Ok(Json(json!({"rooms": rooms})))
}

async fn get_room(
    State(api): State<ChatApi>,
    caller: Caller,
    Path(room): Path<String>,
) -> Result<Json<Value>, Problem> {
    let room = checked_id("room", &room)?;
    participant(&api, room, &caller).await?;
    let mut redis = api.app.redis.clone();
    let mut view = store::room(&mut redis, room).await.map_err(redis_err)?;
    let unread: Option<u64> = redis::cmd("HGET")
        .arg(store::unread_key(room))
        .arg(&caller.user_id)
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    view["unread"] = json!(unread.unwrap_or(0));
    Ok(Json(view))
}

async fn add_participant(
    State(api): State<ChatApi>,
    caller: Caller,
    Path(room): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, Problem> {
    let room = checked_id("room", &room)?;
    validate("api/chat-participant-request.json", &body)?;
    let user = body["userId"].as_str().unwrap_or_default();
    let mut redis = api.app.redis.clone();
    let added = store::add(
        &mut redis,
        room,
        &caller.user_id,
        caller.is_privileged(),
        user,
    )
    .await
    .map_err(redis_err)?;
    let added = refused(added, room, 0)?;
    push(
        &api,
        room,
        format!("chat-{room}-add-{user}-{}", store::last_seq(&mut redis, room).await.map_err(redis_err)?),
        &json!({"event": "participant_added", "roomId": room, "userId": user, "by": caller.user_id}),
    )
    .await?;
    Ok(Json(
        json!({"roomId": room, "userId": user, "added": added}),
    ))
}

async fn remove_participant(
    State(api): State<ChatApi>,
    caller: Caller,
    Path((room, user)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    let room = checked_id("room", &room)?;
    let user = checked_id("user", &user)?;
    let mut redis = api.app.redis.clone();
    let removed = store::remove(
        &mut redis,
        room,
        &caller.user_id,
        caller.is_privileged(),
        user,
    )
    .await
    .map_err(redis_err)?;
    let removed = match removed {
        Outcome::NotYours => {
            return Err(Problem::forbidden(
                "only the room's creator (or the participant themselves) may remove a participant",
            ));
        }
        other => refused(other, room, 0)?,
    };
    // Every relay instance drops the user's live `room:` subscriptions now.
    access_changes::announce(
        &api.app.nats,
        &AccessChange::RoomParticipant {
            room_id: room.to_string(),
            user_id: user.to_string(),
        },
    )
    .await
    .map_err(saved_not_pushed)?;
    if removed {
        let seq = store::last_seq(&mut redis, room).await.map_err(redis_err)?;
        push(
            &api,
            room,
            format!("chat-{room}-remove-{user}-{seq}"),
            &json!({"event": "participant_removed", "roomId": room, "userId": user, "by": caller.user_id}),
        )
        .await?;
    }
    Ok(Json(
        json!({"roomId": room, "userId": user, "removed": removed}),
    ))
}

async fn send_message(
    State(api): State<ChatApi>,
    caller: Caller,
    Path(room): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let room = checked_id("room", &room)?;
    validate("api/chat-message-request.json", &body)?;
    let client_id = body["clientMessageId"].as_str().unwrap_or_default();
    let text = body["text"].as_str().unwrap_or_default();
    let (_, sent_at) = now();
    let message = json!({
        "roomId": room,
        "senderId": caller.user_id,
        "clientMessageId": client_id,
        "text": text,
        "sentAt": sent_at,
    });
    let mut redis = api.app.redis.clone();
    let outcome = store::send(&mut redis, room, &caller.user_id, client_id, &message)
        .await
        .map_err(redis_err)?;
    let (fresh, message) = refused(outcome, room, 0)?;
    let seq = message["seq"].as_u64().unwrap_or(0);
    // The log and the push are deduplicated: a retry completes what a failure left undone.
    // They go to different streams and neither waits for the other (the message is stored
    // in Redis already; readers order by `seq`), so both are in flight at once.
    let log_entry = json!({"kind": "message", "message": message});
    let frame = json!({"event": "message_new", "roomId": room, "message": message});
    tokio::try_join!(
        log(&api, room, format!("chat-{room}-{seq}-m"), &log_entry),
        push(&api, room, format!("chat-{room}-{seq}-new"), &frame),
    )?;
    let mut response = (
        if fresh {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(json!({"message": message})),
    )
        .into_response();
    if !fresh {
        response.headers_mut().insert(
            idempotent_requests::REPLAYED_HEADER,
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

fn number(params: &HashMap<String, String>, name: &str, max: u64) -> Result<Option<u64>, Problem> {
    match params.get(name) {
        None => Ok(None),
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= max && !v.starts_with('+') => Ok(Some(n)),
            _ => Err(Problem::bad_request(
                "invalid_parameter",
                format!("{name}: {:?} is not a number from 0 to {max}", clip(v, 64)),
            )),
        },
    }
}

/// History: newest first (from the last message, or `before` a sequence), or oldest first
/// `after` a sequence. `nextCursor` is what to pass as the same parameter for the next page.
async fn history(
    State(api): State<ChatApi>,
    caller: Caller,
    Path(room): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    let room = checked_id("room", &room)?;
    refuse_unknown_params(&params, &["before", "after", "limit"])?;
    let before = number(&params, "before", u64::MAX / 2)?;
    let after = number(&params, "after", u64::MAX / 2)?;
    let limit = number(&params, "limit", MAX_PAGE)?.unwrap_or(DEFAULT_PAGE);
    if limit == 0 {
        return Err(Problem::bad_request(
            "invalid_parameter",
            format!("limit: must be from 1 to {MAX_PAGE}"),
        ));
    }
    if before.is_some() && after.is_some() {
        return Err(Problem::bad_request(
            "invalid_parameter",
            "before and after: send one of them, not both",
        ));
    }
    participant(&api, room, &caller).await?;
    let mut redis = api.app.redis.clone();
    let last = store::last_seq(&mut redis, room).await.map_err(redis_err)?;
    let (seqs, next): (Vec<u64>, Option<u64>) = match after {
        Some(a) => {
            let seqs: Vec<u64> = (a.saturating_add(1)..=last).take(limit as usize).collect();
            let next = seqs.last().copied().filter(|s| *s < last);
            (seqs, next)
        }
        None => {
            let top = before.map_or(last, |b| b.saturating_sub(1).min(last));
            let seqs: Vec<u64> = (1..=top).rev().take(limit as usize).collect();
            let next = seqs.last().copied().filter(|s| *s > 1);
            (seqs, next)
        }
    };
    let messages = store::messages(&mut redis, room, &seqs)
        .await
        .map_err(redis_err)?;
    Ok(Json(json!({
        "messages": messages,
        "lastSeq": last,
        "nextCursor": next,
        "direction": if after.is_some() { "forward" } else { "backward" },
    })))
}

fn path_room_seq(room: &str, seq: &str) -> Result<u64, Problem> {
    checked_id("room", room)?;
    seq_of(seq)
}

async fn edit_message(
    State(api): State<ChatApi>,
    caller: Caller,
    Path((room, seq)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, Problem> {
    let seq = path_room_seq(&room, &seq)?;
    validate("api/chat-edit-request.json", &body)?;
    let text = body["text"].as_str().unwrap_or_default();
    let (t, edited_at) = now();
    let mut redis = api.app.redis.clone();
    let outcome = store::edit(&mut redis, &room, &caller.user_id, seq, text, &edited_at)
        .await
        .map_err(redis_err)?;
    let message = refused(outcome, &room, seq)?;
    let stamp = t.unix_timestamp_nanos();
    log(
        &api,
        &room,
        format!("chat-{room}-{seq}-e-{stamp}"),
        &json!({"kind": "edit", "message": message}),
    )
    .await?;
    push(
        &api,
        &room,
        format!("chat-{room}-{seq}-e-{stamp}"),
        &json!({"event": "message_edited", "roomId": room, "message": message}),
    )
    .await?;
    Ok(Json(json!({"message": message})))
}

async fn delete_message(
    State(api): State<ChatApi>,
    caller: Caller,
    Path((room, seq)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    let seq = path_room_seq(&room, &seq)?;
    let (_, deleted_at) = now();
    let mut redis = api.app.redis.clone();
    let outcome = store::delete(&mut redis, &room, &caller.user_id, seq, &deleted_at)
        .await
        .map_err(redis_err)?;
    let message = refused(outcome, &room, seq)?;
    log(
        &api,
        &room,
        format!("chat-{room}-{seq}-d"),
        &json!({"kind": "tombstone", "message": message}),
    )
    .await?;
    push(
        &api,
        &room,
        format!("chat-{room}-{seq}-d"),
        &json!({"event": "message_deleted", "roomId": room, "message": message}),
    )
    .await?;
    Ok(Json(json!({"message": message})))
}

async fn mark_read(
    State(api): State<ChatApi>,
    caller: Caller,
    Path(room): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, Problem> {
    let room = checked_id("room", &room)?;
    validate("api/chat-read-request.json", &body)?;
    let up_to = body["upTo"].as_u64().unwrap_or(0);
    let mut redis = api.app.redis.clone();
    let state = store::mark_read(&mut redis, room, &caller.user_id, up_to)
        .await
        .map_err(redis_err)?;
    let state = refused(state, room, 0)?;
    if state.up_to > 0 {
        // Pushed again on a retry (deduplicated): a failed push is finished by retrying.
        push(
            &api,
            room,
            format!("chat-{room}-read-{}-{}", caller.user_id, state.up_to),
            &json!({"event": "messages_read", "roomId": room, "userId": caller.user_id, "upTo": state.up_to}),
        )
        .await?;
    }
    Ok(Json(json!({
        "roomId": room,
        "upTo": state.up_to,
        "unread": state.unread,
    })))
}

async fn typing(
    State(api): State<ChatApi>,
    caller: Caller,
    Path(room): Path<String>,
) -> Result<Response, Problem> {
    let room = checked_id("room", &room)?;
    participant(&api, room, &caller).await?;
    let mut redis = api.app.redis.clone();
    if !store::claim_typing(&mut redis, room, &caller.user_id, TYPING_INTERVAL_MS)
        .await
        .map_err(redis_err)?
    {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "typing_rate_limited",
            format!("one typing indicator per room per {TYPING_INTERVAL_MS} ms"),
        )
        .with_retry_after(1));
    }
    push(
        &api,
        room,
        format!("chat-{room}-typing-{}", uuid::Uuid::new_v4().simple()),
        &json!({"event": "typing", "roomId": room, "userId": caller.user_id}),
    )
    .await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_sequences_are_checked_before_use() {
        assert!(checked_id("room", "r-1").is_ok());
        for bad in ["", "a.b", "a*", "a>b", "a b", &"x".repeat(65)] {
            assert_eq!(
                checked_id("room", bad).unwrap_err().code,
                "invalid_id",
                "{bad:?}"
            );
        }
        assert_eq!(seq_of("42").unwrap(), 42);
        for bad in ["0", "-1", "+1", "x", "1.5", "99999999999999999999999"] {
            assert_eq!(seq_of(bad).unwrap_err().code, "invalid_id", "{bad:?}");
        }
    }

    #[test]
    fn history_numbers_are_bounded() {
        let mut p = HashMap::new();
        p.insert("limit".to_string(), "101".to_string());
        assert!(number(&p, "limit", MAX_PAGE).is_err());
        p.insert("limit".to_string(), "100".to_string());
        assert_eq!(number(&p, "limit", MAX_PAGE).unwrap(), Some(100));
        assert!(refuse_unknown_params(&p, &["limit"]).is_ok());
        p.insert("page".to_string(), "1".to_string());
        assert_eq!(
            refuse_unknown_params(&p, &["limit"]).unwrap_err().code,
            "unknown_parameter"
        );
    }
}
