//! The relay's server API:
//! `GET /api/realtime/websocket/stats` (summed over every relay instance, gathered over
//! NATS), `POST /api/realtime/websocket/broadcast` and `POST
//! /api/realtime/websocket/send-to-user`.
//!
//! Both writes are retry-safe (`shared::idempotent_requests`): the body's `id` or the
//! `Idempotency-Key` header makes every retry publish the same message id, and keeps the
//! first answer. The body's `id` is constrained by the schema; it never reaches a NATS
//! header itself (the message id is derived from it).

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use inkwire_shared::auth::Caller;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::http::JsonBody;
use inkwire_shared::idempotent_requests::{self, IdempotencyKey, Scope};
use inkwire_shared::jetstream;
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::schema::schemas;
use serde_json::{Value, json};

use crate::Relay;
use crate::metrics::StatsSnapshot;

/// Subject relay instances answer statistics requests on.
pub const STATS_SUBJECT: &str = "inkwire.relay.stats";

pub fn routes() -> Router<Relay> {
    Router::new()
        .route("/api/realtime/websocket/stats", get(stats))
        .route("/api/realtime/websocket/broadcast", post(broadcast))
        .route("/api/realtime/websocket/send-to-user", post(send_to_user))
}

/// Answers statistics requests with this instance's counters.
pub async fn spawn_stats_responder(relay: Relay) -> anyhow::Result<()> {
    let mut sub = relay.app.nats.subscribe(STATS_SUBJECT).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let snapshot = relay.metrics.snapshot(&relay.instance_id);
                let body = serde_json::to_vec(&snapshot).unwrap_or_default();
                let _ = relay.app.nats.publish(reply, body.into()).await;
            }
        }
    });
    Ok(())
}

/// Asks every relay instance for its counters and sums them. Instances answer within
/// milliseconds; the gathering stops 100 ms after the last answer (at most 1 s).
pub async fn gather_stats(nats: &async_nats::Client) -> Result<StatsSnapshot, async_nats::Error> {
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply(STATS_SUBJECT, inbox, "".into())
        .await?;
    nats.flush().await?;
    let mut total = StatsSnapshot::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut quiet = Duration::from_millis(300);
    loop {
        let wait = quiet.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, sub.next()).await {
            Ok(Some(msg)) => {
                if let Ok(s) = serde_json::from_slice::<StatsSnapshot>(&msg.payload) {
                    total.add(&s);
                }
                quiet = Duration::from_millis(100);
            }
            _ => break,
        }
    }
    total.instance_ids.sort();
    Ok(total)
}

async fn stats(State(relay): State<Relay>, caller: Caller) -> Result<Response, Problem> {
    if !caller.is_privileged() {
        return Err(Problem::forbidden(
            "relay statistics need the admin or service role",
        ));
    }
    let total = gather_stats(&relay.app.nats)
        .await
        .map_err(|e| dependency_failed("nats", e))?;
    Ok(Json(total).into_response())
}

fn message_type(body: &Value) -> MessageType {
    serde_json::from_value(body["type"].clone()).expect("schema checked type")
}

/// The idempotency key: the `Idempotency-Key` header or the body's `id`.
fn request_key(header: IdempotencyKey, body: &Value) -> Result<IdempotencyKey, Problem> {
    header.or_body_id(body.get("id").and_then(Value::as_str))
}

/// May `caller` broadcast to `channel`? Service and admin anywhere; a project's owners on
/// the project's channel and its documents' channels.
async fn may_broadcast(relay: &Relay, caller: &Caller, channel: &Channel) -> Result<bool, Problem> {
    if caller.is_privileged() {
        return Ok(true);
    }
    let mut redis = relay.app.redis.clone();
    let project = match channel.kind {
        ChannelKind::Project => Some(channel.id.clone()),
        ChannelKind::Document => membership::project_of_document(&mut redis, &channel.id)
            .await
            .map_err(|e| dependency_failed("redis", e))?,
        _ => None,
    };
    let Some(project) = project else {
        return Ok(false);
    };
    let role = membership::role_of(&mut redis, &project, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    Ok(role == Some(ProjectRole::Owner))
}

async fn broadcast(
    State(relay): State<Relay>,
    caller: Caller,
    key: IdempotencyKey,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    schemas()
        .validate("api/broadcast-request.json", &body)
        .map_err(Problem::validation)?;
    let name = body["channel"].as_str().expect("schema checked channel");
    let channel = Channel::parse(name).map_err(|e| {
        Problem::validation(vec![inkwire_shared::schema::FieldError::new(
            "/channel",
            "channel",
            Some(&body["channel"]),
            e.to_string(),
        )])
    })?;
    if !may_broadcast(&relay, &caller, &channel).await? {
        return Err(Problem::forbidden(format!(
            "broadcasting to {channel} needs the service or admin role, or ownership of its project"
        )));
    }
    let key = request_key(key, &body)?;
    publish(&relay, &caller, "relay.broadcast", &channel, key, &body).await
}

async fn send_to_user(
    State(relay): State<Relay>,
    caller: Caller,
    key: IdempotencyKey,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    schemas()
        .validate("api/send-to-user-request.json", &body)
        .map_err(Problem::validation)?;
    if !caller.is_privileged() {
        return Err(Problem::forbidden(
            "sending to a user needs the service or admin role",
        ));
    }
    let user = body["userId"].as_str().expect("schema checked userId");
    let key = request_key(key, &body)?;
    let channel = Channel::new(ChannelKind::User, user);
    publish(&relay, &caller, "relay.send_to_user", &channel, key, &body).await
}

/// Publishes the message once per key; `413` when it is larger than NATS accepts, `503
/// outcome_unknown` with the id to retry with when the ack did not come.
async fn publish(
    relay: &Relay,
    caller: &Caller,
    route: &'static str,
    channel: &Channel,
    key: IdempotencyKey,
    body: &Value,
) -> Result<Response, Problem> {
    let target = channel.to_string();
    let scope = Scope {
        route,
        caller: &caller.user_id,
        target: &target,
    };
    idempotent_requests::run(&relay.app, scope, key, Some(body), |attempt| async move {
        let msg = channels::outgoing(
            channel,
            message_type(body),
            &body["data"],
            attempt.event_id.to_string(),
        );
        let published = jetstream::publish_acked(&relay.app.js, msg)
            .await
            .map_err(|e| attempt.publish_problem(&e, "the message"))?;
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "channel": channel.to_string(),
                "id": attempt.key,
                "seq": published.sequence,
                "duplicate": published.duplicate,
            })),
        )
            .into_response())
    })
    .await
}
