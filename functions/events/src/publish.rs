//! `POST /api/realtime/events/publish` and `POST /api/realtime/events/batch`.
//!
//! A batch is validated and authorized as a whole before anything is published: one bad item
//! gets a 400 listing every bad index and field, and nothing is stored. Then the events are
//! published in order with a window of outstanding acks, and the answer comes after every ack.
//!
//! What is stored is what every consumer can apply: integers are spelled as integers, the
//! `timestamp` is one the consumers' parser reads, normalized to UTC (`Z`) and within a
//! window around the server's clock (a client's clock must not drive server state), and an
//! event that names only its document carries the document's project too.
//!
//! An event larger than the NATS server accepts is `413` before anything is published (for a
//! batch: naming the index, nothing published). When NATS fails, the `503` says what is
//! known: `unavailable` when nothing was stored, `outcome_unknown` when an event was sent but
//! not acknowledged (it may be stored; publishing it again with the same id is deduplicated),
//! and for a batch the outcome of every item.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::config::Config;
use inkwire_shared::events::Category;
use inkwire_shared::http::JsonBody;
use inkwire_shared::jetstream::{self, Outcome, Outgoing, PartialPublish, Published};
use inkwire_shared::problem::{ItemErrors, Problem};
use inkwire_shared::schema::{FieldError, parse_date_time, schemas};
use inkwire_shared::subjects;
use serde::Serialize;
use serde_json::{Value, json};
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use uuid::Uuid;

use crate::access::{AccessCache, Scope, check_publish};

/// An event that passed validation, ready to publish.
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    pub subject: String,
    pub value: Value,
}

impl Prepared {
    fn scope(&self) -> Scope<'_> {
        Scope {
            category: self.value["category"]
                .as_str()
                .and_then(|c| c.parse().ok())
                .expect("validated"),
            event_type: self.value["type"].as_str().expect("validated"),
            user_id: self.value["userId"].as_str().unwrap_or_default(),
            project_id: self.value.get("projectId").and_then(Value::as_str),
            document_id: self.value.get("documentId").and_then(Value::as_str),
        }
    }

    /// Stores the project the event's document belongs to, when only the document was named
    /// (so that the event also reaches the project's channels and queries).
    fn set_project(&mut self, project: Option<String>) {
        if let (Some(p), Some(obj)) = (project, self.value.as_object_mut())
            && !obj.contains_key("projectId")
        {
            obj.insert("projectId".into(), Value::String(p));
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

/// The `rule` of the field error for a `timestamp` outside the [`ClockWindow`].
pub const TIMESTAMP_RANGE: &str = "timestampRange";

/// The event times the edge accepts: from `max_age` before the server's clock to
/// `max_skew` after it (`INKWIRE_MAX_EVENT_AGE`, `INKWIRE_MAX_CLOCK_SKEW`).
#[derive(Debug, Clone, Copy)]
pub struct ClockWindow {
    pub now: OffsetDateTime,
    pub max_skew: Duration,
    pub max_age: Duration,
}

impl ClockWindow {
    /// The window around the server's clock now.
    pub fn now(config: &Config) -> ClockWindow {
        ClockWindow {
            now: OffsetDateTime::now_utc(),
            max_skew: config.max_clock_skew,
            max_age: config.max_event_age,
        }
    }

    fn check(&self, at: OffsetDateTime) -> Result<(), String> {
        let ahead = at - self.now;
        let (what, limit) = if ahead > self.max_skew {
            ("ahead of", self.max_skew)
        } else if -ahead > self.max_age {
            ("behind", self.max_age)
        } else {
            return Ok(());
        };
        Err(format!(
            "timestamp is {what} the server's clock by more than {}: events must be from \
             {} before to {} after the server's time ({})",
            span(limit),
            span(self.max_age),
            span(self.max_skew),
            self.now.format(&Rfc3339).unwrap_or_default()
        ))
    }
}

/// A duration as the configuration spells it (`5m`, `24h`).
fn span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if d.subsec_millis() != 0 || s == 0 => format!("{}ms", d.as_millis()),
        _ if s.is_multiple_of(86_400) && s >= 2 * 86_400 => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Validates one envelope and makes it what the consumers apply: `id` normalized (or
/// generated), `timestamp` checked against `window` and normalized to UTC (or set to the
/// server's time when missing). Its integers are canonical already: [`JsonBody`] spells them
/// as integers for every request body (`schema::canonicalize_numbers`).
pub fn prepare(mut value: Value, window: &ClockWindow) -> Result<Prepared, Vec<FieldError>> {
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
    let at = match obj.get("timestamp").and_then(Value::as_str) {
        None => window.now,
        Some(text) => {
            let bad = |message: String, rule: &str| {
                vec![FieldError::new(
                    "/timestamp",
                    rule,
                    obj.get("timestamp"),
                    message,
                )]
            };
            // The schema check has parsed it already; this cannot fail.
            let at = parse_date_time(text).map_err(|e| bad(e.to_string(), "format"))?;
            window.check(at).map_err(|m| bad(m, TIMESTAMP_RANGE))?;
            at
        }
    };
    let normalized = at
        .checked_to_offset(UtcOffset::UTC)
        .and_then(|t| t.format(&Rfc3339).ok())
        .expect("a time within the window formats");
    obj.insert("timestamp".into(), Value::String(normalized));
    let category: Category = obj["category"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("validated");
    let subject = subjects::event_subject(category, obj["type"].as_str().expect("validated"));
    Ok(Prepared { id, subject, value })
}

/// The problem for an envelope `prepare` refused: `timestamp_out_of_range` when the time
/// is the only thing wrong, `validation_failed` otherwise.
fn refused(errors: Vec<FieldError>) -> Problem {
    clock_code(Problem::validation(errors))
}

/// The problem for the items of a batch `prepare` refused, coded like [`refused`].
fn refused_items(items: Vec<ItemErrors>) -> Problem {
    clock_code(Problem::invalid_items(items))
}

/// A validation problem whose every field error is about the clock window is
/// `timestamp_out_of_range`.
fn clock_code(mut problem: Problem) -> Problem {
    let errors = problem
        .errors
        .iter()
        .chain(problem.invalid_items.iter().flat_map(|i| &i.errors));
    if errors.clone().next().is_some() && errors.into_iter().all(|e| e.rule == TIMESTAMP_RANGE) {
        problem.code = "timestamp_out_of_range";
    }
    problem
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
    let mut prepared = prepare(body, &ClockWindow::now(&state.config)).map_err(refused)?;
    let mut redis = state.redis.clone();
    let project = check_publish(
        &caller,
        prepared.scope(),
        &mut AccessCache::default(),
        &mut redis,
    )
    .await?;
    prepared.set_project(project);
    let id = prepared.id.clone();
    let published = jetstream::publish_acked(&state.js, prepared.into_outgoing())
        .await
        .map_err(|e| jetstream::publish_problem(&e, "the event", &id, "as the event's id"))?;
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

    let window = ClockWindow::now(&state.config);
    let mut prepared = Vec::with_capacity(items.len());
    let mut invalid = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match prepare(item, &window) {
            Ok(p) => prepared.push(p),
            Err(errors) => invalid.push(ItemErrors { index, errors }),
        }
    }
    if !invalid.is_empty() {
        return Err(refused_items(invalid));
    }

    let mut redis = state.redis.clone();
    let mut cache = AccessCache::default();
    for (index, p) in prepared.iter_mut().enumerate() {
        match check_publish(&caller, p.scope(), &mut cache, &mut redis).await {
            Ok(project) => p.set_project(project),
            Err(mut problem) => {
                if problem.status < 500 {
                    problem.detail =
                        format!("events[{index}]: {}; nothing was published", problem.detail);
                }
                return Err(problem);
            }
        }
    }

    let ids: Vec<String> = prepared.iter().map(|p| p.id.clone()).collect();
    let outgoing: Vec<Outgoing> = prepared.into_iter().map(Prepared::into_outgoing).collect();
    // Every item fits in a NATS message, or nothing is published.
    let client = state.js.client();
    for (index, msg) in outgoing.iter().enumerate() {
        if let Err(e) = jetstream::check_message(&client, msg) {
            return Err(jetstream::publish_problem(
                &e,
                &format!("events[{index}]"),
                &ids[index],
                "as the event's id",
            )
            .with_extension("index", index));
        }
    }
    let acks = jetstream::publish_windowed(&state.js, outgoing, state.config.publish_window)
        .await
        .map_err(|e| batch_failed(&ids, e))?;
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

/// The `503` of a batch that failed part way, with the outcome of every item (`items`:
/// index, id, `stored` with its sequence, `unknown` or `not_stored`).
fn batch_failed(ids: &[String], e: PartialPublish) -> Problem {
    let items: Vec<Value> = ids
        .iter()
        .zip(&e.outcomes)
        .enumerate()
        .map(|(index, (id, outcome))| {
            let mut item = json!({"index": index, "id": id, "outcome": outcome.as_str()});
            if let Outcome::Stored(p) = outcome {
                item["stream"] = json!(p.stream);
                item["sequence"] = json!(p.sequence);
            }
            item
        })
        .collect();
    let (stored, unknown, not_stored) =
        (e.count("stored"), e.count("unknown"), e.count("not_stored"));
    let summary = format!(
        "{stored} event(s) stored, {unknown} unknown (sent, not acknowledged), {not_stored} not stored; see items"
    );
    let problem = if unknown > 0 {
        tracing::warn!(error = %e, "batch publish not fully acknowledged");
        Problem::outcome_unknown(
            format!(
                "nats did not acknowledge every event in time: {summary}. Publish the unknown and \
                 unstored ones again with the same ids (or the whole batch): what is stored \
                 already is deduplicated"
            ),
            None,
        )
    } else {
        tracing::error!(error = %e, "batch publish failed");
        Problem::unavailable(format!(
            "nats is unavailable: {summary}. Publish the unstored ones again with the same ids (or the whole batch)"
        ))
        .with_retry_after(1)
    };
    problem.with_extension("items", items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> ClockWindow {
        ClockWindow {
            now: OffsetDateTime::parse("2026-11-22T12:00:00Z", &Rfc3339).unwrap(),
            max_skew: Duration::from_secs(300),
            max_age: Duration::from_secs(86_400),
        }
    }

    /// An envelope as `JsonBody` hands it over (integers canonical).
    fn event(timestamp: &str) -> Value {
        let mut v = json!({"category": "writing", "type": "word_added", "userId": "u",
            "timestamp": timestamp, "data": {"sessionId": "s", "words": 2.0}});
        inkwire_shared::schema::canonicalize_numbers(&mut v);
        v
    }

    #[test]
    fn stores_integers_and_utc_times() {
        let p = prepare(event("2026-11-22t13:30:00.5+01:30"), &window()).unwrap();
        assert_eq!(p.value["timestamp"], "2026-11-22T12:00:00.5Z");
        assert!(p.value["data"]["words"].is_u64());
    }

    #[test]
    fn refuses_times_outside_the_window() {
        for t in ["2026-11-22T12:05:01Z", "2026-11-21T11:59:59Z"] {
            let errs = prepare(event(t), &window()).unwrap_err();
            assert_eq!(errs[0].rule, TIMESTAMP_RANGE, "{t}");
            assert!(
                errs[0].message.contains("24h before to 5m after"),
                "{errs:?}"
            );
        }
        assert!(prepare(event("2026-11-22T12:05:00Z"), &window()).is_ok());
        assert!(prepare(event("2026-11-21T12:00:00Z"), &window()).is_ok());
    }

    #[test]
    fn spans_read_like_the_configuration() {
        assert_eq!(span(Duration::from_secs(300)), "5m");
        assert_eq!(span(Duration::from_secs(86_400)), "24h");
        assert_eq!(span(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(span(Duration::from_secs(7200)), "2h");
        assert_eq!(span(Duration::from_secs(90)), "90s");
        assert_eq!(span(Duration::from_millis(1500)), "1500ms");
    }
}
