//! The dead-letter queue API, for the `admin` and `service` roles: list the messages consumers
//! gave up on (`GET /api/realtime/dlq`), replay one to its original subject
//! (`POST /api/realtime/dlq/{seq}/replay`) or discard it (`DELETE /api/realtime/dlq/{seq}`).
//!
//! Dead letters are what `shared::consumer` copied to `dlq.<original subject>` in the `DLQ`
//! stream, with `Inkwire-Dlq-*` headers saying why; `{seq}` is the DLQ stream sequence.
//! Messages are read one by one with the stream's "next message for a subject" lookup, so a
//! page costs no consumer on the server and skips discarded (deleted) sequences.
//!
//! A replay publishes first and removes the dead letter after, so a crash in between leaves
//! the dead letter in place for another try; the publish carries a message id derived from the
//! dead letter, so that retry is a JetStream duplicate, not a second copy. The outcome is also
//! kept in Redis for a day, so a retry after the removal answers the same instead of `404`.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{PublishMessage, StreamMessage};
use async_nats::jetstream::stream::{DeleteMessageErrorKind, LastRawMessageErrorKind};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::subjects::{self, dlq_headers};
use redis::AsyncCommands;
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;
/// How long a replay's outcome is remembered for retries.
const REPLAY_MEMORY: Duration = Duration::from_secs(24 * 3600);
const KNOWN_PARAMS: [&str; 2] = ["limit", "cursor"];

fn check_operator(caller: &Caller) -> Result<(), Problem> {
    if caller.is_privileged() {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "the dead-letter queue is for the admin and service roles",
        ))
    }
}

fn parse_seq(raw: &str) -> Result<u64, Problem> {
    match raw.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Problem::bad_request(
            "invalid_id",
            "a dead letter's sequence is a positive whole number",
        )),
    }
}

fn not_found(seq: u64) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "dead_letter_not_found",
        format!("no dead letter with sequence {seq}"),
    )
}

fn replay_key(seq: u64) -> String {
    format!("inkwire:dlq:replayed:{seq}")
}

/// The original subject of a dead letter: its subject without the `dlq.` prefix.
fn original_subject(m: &StreamMessage) -> Option<&str> {
    m.subject
        .as_str()
        .strip_prefix(subjects::DLQ_PREFIX)?
        .strip_prefix('.')
        .filter(|s| !s.is_empty())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

/// One dead letter as the API shows it.
fn describe(m: &StreamMessage) -> Value {
    let h = &m.headers;
    let number = |name: &str| header(h, name).and_then(|v| v.parse::<u64>().ok());
    let mut out = json!({
        "sequence": m.sequence,
        "subject": original_subject(m),
        "stream": header(h, dlq_headers::STREAM),
        "streamSequence": number(dlq_headers::SEQUENCE),
        "consumer": header(h, dlq_headers::CONSUMER),
        "reason": header(h, dlq_headers::REASON),
        "deliveries": number(dlq_headers::DELIVERIES),
        "time": m.time.format(&Rfc3339).ok(),
    });
    // Events are JSON; anything else is shown in base64 rather than mangled.
    match serde_json::from_slice::<Value>(&m.payload) {
        Ok(v) => out["payload"] = v,
        Err(_) => {
            out["payloadBase64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&m.payload))
        }
    }
    out
}

/// The next dead letter at or after `seq`, if any.
async fn next_from(
    stream: &async_nats::jetstream::stream::Stream,
    seq: u64,
) -> Result<Option<StreamMessage>, Problem> {
    match stream
        .get_first_raw_message_by_subject(format!("{}.>", subjects::DLQ_PREFIX), seq)
        .await
    {
        Ok(m) => Ok(Some(m)),
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(None),
        Err(e) => Err(dependency_failed("nats", e)),
    }
}

async fn dlq_stream(state: &AppState) -> Result<async_nats::jetstream::stream::Stream, Problem> {
    state
        .js
        .get_stream(subjects::DLQ_STREAM)
        .await
        .map_err(|e| dependency_failed("nats", e))
}

/// `GET /api/realtime/dlq?limit=&cursor=`: oldest first.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    check_operator(&caller)?;
    inkwire_shared::problem::refuse_unknown_params(&params, &KNOWN_PARAMS)?;
    let limit = crate::query::page_limit(&params, DEFAULT_LIMIT, MAX_LIMIT)?;
    let cursor = match params.get("cursor") {
        None => 1,
        Some(v) => v.parse::<u64>().map_err(|_| {
            Problem::bad_request(
                "invalid_parameter",
                "cursor must be the nextCursor of a previous page",
            )
        })?,
    };
    let mut stream = dlq_stream(&state).await?;
    let mut letters = Vec::new();
    let mut next_cursor = None;
    let mut seq = cursor.max(1);
    while let Some(m) = next_from(&stream, seq).await? {
        if letters.len() == limit {
            next_cursor = Some(m.sequence.to_string());
            break;
        }
        letters.push(describe(&m));
        seq = m.sequence + 1;
    }
    // Counted after the page is read: a letter that arrives meanwhile is then both listed and
    // counted, never listed with a total that does not include it.
    let total = stream
        .info()
        .await
        .map_err(|e| dependency_failed("nats", e))?
        .state
        .messages;
    let mut body = json!({"total": total, "count": letters.len(), "deadLetters": letters});
    if let Some(c) = next_cursor {
        body["nextCursor"] = json!(c);
    }
    Ok(Json(body).into_response())
}

/// `POST /api/realtime/dlq/{seq}/replay`.
pub async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    Path(seq): Path<String>,
) -> Result<Response, Problem> {
    check_operator(&caller)?;
    let seq = parse_seq(&seq)?;
    let stream = dlq_stream(&state).await?;
    let mut redis = state.redis.clone();
    let letter = match stream.get_raw_message(seq).await {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => {
            // Replayed already (a retry after the removal)?
            let done: Option<String> = redis
                .get(replay_key(seq))
                .await
                .map_err(|e| dependency_failed("redis", e))?;
            return match done.and_then(|d| serde_json::from_str::<Value>(&d).ok()) {
                Some(outcome) => Ok(Json(outcome).into_response()),
                None => Err(not_found(seq)),
            };
        }
        Err(e) => return Err(dependency_failed("nats", e)),
    };
    let Some(subject) = original_subject(&letter).map(str::to_string) else {
        return Err(not_replayable(seq, "it has no original subject"));
    };
    if subject == subjects::DLQ_PREFIX || subject.starts_with(&format!("{}.", subjects::DLQ_PREFIX))
    {
        return Err(not_replayable(
            seq,
            "its original subject is a dead-letter subject",
        ));
    }
    // The dead letter's own id names the failed delivery (`<stream>:<seq>:<consumer>`); the
    // replay's id is derived from it, so replaying it twice stores one copy.
    let id = match header(&letter.headers, "Nats-Msg-Id") {
        Some(id) => format!("dlq-replay:{id}"),
        None => format!("dlq-replay:{}:{seq}", subjects::DLQ_STREAM),
    };
    let ack = state
        .js
        .send_publish(
            subject.clone(),
            PublishMessage::build()
                .payload(letter.payload.clone())
                .message_id(id),
        )
        .await
        .map_err(|e| dependency_failed("nats", e))?
        .await;
    let ack = match ack {
        Ok(ack) => ack,
        Err(e) if matches!(e.kind(), PublishErrorKind::StreamNotFound) => {
            return Err(not_replayable(
                seq,
                &format!("no stream stores its subject {subject:?} any more"),
            ));
        }
        Err(e) => return Err(dependency_failed("nats", e)),
    };
    let outcome = json!({
        "sequence": seq,
        "subject": subject,
        "stream": ack.stream,
        "replayedSequence": ack.sequence,
        "duplicate": ack.duplicate,
    });
    let _: () = redis
        .set_ex(
            replay_key(seq),
            outcome.to_string(),
            REPLAY_MEMORY.as_secs(),
        )
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    delete(&stream, seq).await?;
    Ok(Json(outcome).into_response())
}

fn not_replayable(seq: u64, why: &str) -> Problem {
    Problem::conflict(
        "dead_letter_not_replayable",
        format!("dead letter {seq} cannot be replayed: {why}"),
    )
}

/// Deletes `seq` from the DLQ stream; `false` when it was not there.
async fn delete(stream: &async_nats::jetstream::stream::Stream, seq: u64) -> Result<bool, Problem> {
    match stream.delete_message(seq).await {
        Ok(deleted) => Ok(deleted),
        Err(e) => match e.kind() {
            // Servers answer a missing sequence with either code, depending on the version.
            DeleteMessageErrorKind::JetStream(js)
                if [ErrorCode::NO_MESSAGE_FOUND, ErrorCode::SEQUENCE_NOT_FOUND]
                    .contains(&js.error_code()) =>
            {
                Ok(false)
            }
            // Older servers (2.9) refuse to delete from an empty stream with a generic error:
            // ask whether the message is there before calling it a failure.
            DeleteMessageErrorKind::JetStream(_) => match stream.get_raw_message(seq).await {
                Err(g) if matches!(g.kind(), LastRawMessageErrorKind::NoMessageFound) => Ok(false),
                _ => Err(dependency_failed("nats", e)),
            },
            _ => Err(dependency_failed("nats", e)),
        },
    }
}

/// `DELETE /api/realtime/dlq/{seq}`: discards a dead letter.
pub async fn discard(
    State(state): State<AppState>,
    caller: Caller,
    Path(seq): Path<String>,
) -> Result<Response, Problem> {
    check_operator(&caller)?;
    let seq = parse_seq(&seq)?;
    let stream = dlq_stream(&state).await?;
    if delete(&stream, seq).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(not_found(seq))
    }
}
