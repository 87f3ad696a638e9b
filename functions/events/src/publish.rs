//! `POST /api/realtime/events/publish` and `POST /api/realtime/events/batch`.
//!
//! A batch is validated and authorized as a whole before anything is published: one bad item
//! gets a 400 listing every bad index and field, and nothing is stored. Then the events are
//! published in order with a window of outstanding acks, and the answer comes after every ack.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::events::Category;
use inkwire_shared::http::JsonBody;
use inkwire_shared::jetstream::{self, Outgoing, Published};
use inkwire_shared::problem::{ItemErrors, Problem, dependency_failed};
use inkwire_shared::schema::{FieldError, schemas};
use inkwire_shared::subjects;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::access::{AccessCache, Scope, check_publish};

/// An event that passed validation, ready to publish.
pub struct Prepared {
    pub id: String,
    pub subject: String,
    pub value: Value,
}

impl Prepared {
    fn scope(&self) -> Scope<'_> {
        Scope {
            user_id: self.value["userId"].as_str().unwrap_or_default(),
            project_id: self.value.get("projectId").and_then(Value::as_str),
            document_id: self.value.get("documentId").and_then(Value::as_str),
        }
    }

    fn into_outgoing(self) -> Outgoing {
        Outgoing {
            subject: self.subject,
            msg_id: self.id,
            payload: Bytes::from(serde_json::to_vec(&self.value).expect("JSON value serializes")),
        }
    }
}

/// Validates one envelope and fills in `id` and `timestamp` when they are missing.
pub fn prepare(mut value: Value) -> Result<Prepared, Vec<FieldError>> {
    schemas().validate_event(&value)?;
    let obj = value
        .as_object_mut()
        .expect("envelope schema requires an object");
    let id = match obj.get("id").and_then(Value::as_str) {
        // Normalise the spelling so that the same UUID always dedupes.
        Some(id) => Uuid::parse_str(id)
            .map_err(|e| {
                vec![FieldError::new(
                    "/id",
                    "format",
                    obj.get("id"),
                    format!("not a UUID: {e}"),
                )]
            })?
            .to_string(),
        None => Uuid::now_v7().to_string(),
    };
    obj.insert("id".into(), Value::String(id.clone()));
    if !obj.contains_key("timestamp") {
        let now = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .expect("RFC 3339 formats");
        obj.insert("timestamp".into(), Value::String(now));
    }
    let category: Category = obj["category"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("validated");
    let subject = subjects::event_subject(category, obj["type"].as_str().expect("validated"));
    Ok(Prepared { id, subject, value })
}

/// The answer for one published event.
#[derive(Debug, Serialize)]
pub struct PublishResult {
    pub id: String,
    pub stream: String,
    pub sequence: u64,
    pub duplicate: bool,
}

fn result(id: String, p: Published) -> PublishResult {
    PublishResult {
        id,
        stream: p.stream,
        sequence: p.sequence,
        duplicate: p.duplicate,
    }
}

pub async fn publish_one(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let prepared = prepare(body).map_err(Problem::validation)?;
    let mut redis = state.redis.clone();
    check_publish(
        &caller,
        prepared.scope(),
        &mut AccessCache::default(),
        &mut redis,
    )
    .await?;
    let id = prepared.id.clone();
    let published = jetstream::publish(&state.js, prepared.into_outgoing())
        .await
        .map_err(|e| dependency_failed("nats", e))?;
    Ok((StatusCode::ACCEPTED, Json(result(id, published))).into_response())
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    pub published: usize,
    pub duplicates: usize,
    pub results: Vec<PublishResult>,
}

pub async fn publish_batch(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    schemas()
        .validate("api/batch-request.json", &body)
        .map_err(Problem::validation)?;
    let Value::Object(mut body) = body else {
        unreachable!("schema requires an object")
    };
    let Some(Value::Array(items)) = body.remove("events") else {
        unreachable!("schema requires events")
    };

    let mut prepared = Vec::with_capacity(items.len());
    let mut invalid = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match prepare(item) {
            Ok(p) => prepared.push(p),
            Err(errors) => invalid.push(ItemErrors { index, errors }),
        }
    }
    if !invalid.is_empty() {
        return Err(Problem::invalid_items(invalid));
    }

    let mut redis = state.redis.clone();
    let mut cache = AccessCache::default();
    for (index, p) in prepared.iter().enumerate() {
        if let Err(mut problem) = check_publish(&caller, p.scope(), &mut cache, &mut redis).await {
            if problem.status < 500 {
                problem.detail =
                    format!("events[{index}]: {}; nothing was published", problem.detail);
            }
            return Err(problem);
        }
    }

    let ids: Vec<String> = prepared.iter().map(|p| p.id.clone()).collect();
    let acks = jetstream::publish_windowed(
        &state.js,
        prepared.into_iter().map(Prepared::into_outgoing),
        state.config.publish_window,
    )
    .await
    .map_err(|e| {
        dependency_failed(
            "nats",
            format!(
                "{e}; the first {} event(s) were stored, republishing the batch is safe",
                e.stored.len()
            ),
        )
    })?;
    let duplicates = acks.iter().filter(|a| a.duplicate).count();
    let results: Vec<PublishResult> = ids
        .into_iter()
        .zip(acks)
        .map(|(id, p)| result(id, p))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchResult {
            published: results.len() - duplicates,
            duplicates,
            results,
        }),
    )
        .into_response())
}
