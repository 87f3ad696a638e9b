//! `GET /api/realtime/events/{category}`: stored events in a time range, oldest first, in
//! pages; and `GET /api/realtime/events/{category}/info`: stream statistics.
//!
//! The range is over the time JetStream stored each event (`[from, to)`), which is what the
//! stream can seek by. A page is read with a short-lived ordered consumer that starts at
//! `from` (or at the cursor) and reads exactly the messages that are pending, so a page never
//! waits for events that do not exist. The cursor is the stream sequence of the next event.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use axum::Json;
use axum::extract::{Path, Query, State};
use futures::StreamExt;
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::events::Category;
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::subjects;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::access::check_firehose;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

fn parse_category(raw: &str) -> Result<Category, Problem> {
    raw.parse().map_err(|_| {
        Problem::not_found(format!(
            "unknown event category {raw:?}; known: {}",
            Category::ALL.map(Category::as_str).join(", ")
        ))
    })
}

/// The validated query string of a range request.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeQuery {
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub event_type: Option<String>,
    pub limit: usize,
    pub cursor: Option<u64>,
}

const KNOWN_PARAMS: [&str; 5] = ["from", "to", "type", "limit", "cursor"];

/// The `limit` parameter: `default` when absent, else a whole number in `1..=max`.
pub fn page_limit(
    params: &HashMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, Problem> {
    match params.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(Problem::bad_request(
                "invalid_parameter",
                format!("limit: {v:?} is not a whole number in 1..={max}"),
            )),
        },
    }
}

/// Parses and checks the query parameters; every problem names the parameter.
pub fn parse_range(
    category: Category,
    params: &HashMap<String, String>,
) -> Result<RangeQuery, Problem> {
    inkwire_shared::problem::refuse_unknown_params(params, &KNOWN_PARAMS)?;
    let time = |name: &str| -> Result<Option<OffsetDateTime>, Problem> {
        params
            .get(name)
            .map(|v| {
                OffsetDateTime::parse(v, &Rfc3339).map_err(|e| {
                    Problem::bad_request(
                        "invalid_parameter",
                        format!("{name}: {v:?} is not an RFC 3339 timestamp ({e})"),
                    )
                })
            })
            .transpose()
    };
    let from = time("from")?.unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let to = time("to")?.unwrap_or_else(|| OffsetDateTime::now_utc() + Duration::from_secs(1));
    if from >= to {
        return Err(Problem::bad_request(
            "invalid_parameter",
            "from must be earlier than to",
        ));
    }
    let event_type = match params.get("type") {
        Some(t) if !category.has_type(t) => {
            return Err(Problem::bad_request(
                "invalid_parameter",
                format!(
                    "type: {t:?} is not a {} event type; known: {}",
                    category,
                    category.event_types().join(", ")
                ),
            ));
        }
        t => t.cloned(),
    };
    let limit = page_limit(params, DEFAULT_LIMIT, MAX_LIMIT)?;
    let cursor = match params.get("cursor") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(Problem::bad_request(
                    "invalid_parameter",
                    format!("cursor: {v:?} is not a cursor from a previous page"),
                ));
            }
        },
    };
    Ok(RangeQuery {
        from,
        to,
        event_type,
        limit,
        cursor,
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RangePage {
    pub category: Category,
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub to: OffsetDateTime,
    pub count: usize,
    pub events: Vec<Value>,
    /// Pass as `cursor` (with the same from/to/type) for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

pub async fn range(
    State(state): State<AppState>,
    caller: Caller,
    Path(category): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<RangePage>, Problem> {
    let category = parse_category(&category)?;
    check_firehose(&caller)?;
    let q = parse_range(category, &params)?;
    let page = read_range(&state.js, category, &q)
        .await
        .map_err(|e| dependency_failed("nats", e))?;
    Ok(Json(page))
}

/// Reads one page of `q` from the category's stream.
pub async fn read_range(
    js: &async_nats::jetstream::Context,
    category: Category,
    q: &RangeQuery,
) -> Result<RangePage, async_nats::Error> {
    let filter_subject = match &q.event_type {
        Some(t) => subjects::event_subject(category, t),
        None => subjects::event_stream_subjects(category),
    };
    let start = match q.cursor {
        Some(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        None => DeliverPolicy::ByStartTime { start_time: q.from },
    };
    // One more than a page tells whether there is a next page.
    let stored = read_stream(
        js,
        &subjects::event_stream(category),
        filter_subject,
        start,
        q.limit + 1,
    )
    .await?;
    let mut events = Vec::new();
    let mut next_cursor = None;
    for m in stored {
        if m.published >= q.to {
            break;
        }
        if m.published < q.from {
            continue;
        }
        if events.len() == q.limit {
            next_cursor = Some(m.sequence.to_string());
            break;
        }
        match serde_json::from_slice::<Value>(&m.payload) {
            Ok(v) => events.push(v),
            Err(e) => {
                tracing::warn!(seq = m.sequence, error = %e, "stored event is not JSON; skipped")
            }
        }
    }
    Ok(RangePage {
        category,
        from: q.from,
        to: q.to,
        count: events.len(),
        events,
        next_cursor,
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerSummary {
    pub name: String,
    pub pending: u64,
    pub ack_pending: usize,
    pub redelivered: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSummary {
    pub category: Category,
    pub stream: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_sequence: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_time: Option<OffsetDateTime>,
    pub last_sequence: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_time: Option<OffsetDateTime>,
    pub consumers: Vec<ConsumerSummary>,
}

pub async fn info(
    State(state): State<AppState>,
    caller: Caller,
    Path(category): Path<String>,
) -> Result<Json<StreamSummary>, Problem> {
    let category = parse_category(&category)?;
    check_firehose(&caller)?;
    let summary = stream_summary(&state.js, category)
        .await
        .map_err(|e| dependency_failed("nats", e))?;
    Ok(Json(summary))
}

pub async fn stream_summary(
    js: &async_nats::jetstream::Context,
    category: Category,
) -> Result<StreamSummary, async_nats::Error> {
    let name = subjects::event_stream(category);
    let mut stream = js.get_stream(&name).await?;
    let s = stream.info().await?.state.clone();
    let mut consumers = Vec::new();
    let mut list = stream.consumers();
    while let Some(c) = list.next().await {
        let c = c?;
        consumers.push(ConsumerSummary {
            name: c.name,
            pending: c.num_pending,
            ack_pending: c.num_ack_pending,
            redelivered: c.num_redelivered,
        });
    }
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    // An empty stream reports the zero time; show it as absent.
    let real = |t: OffsetDateTime, seq: u64| (seq > 0 && s.messages > 0).then_some(t);
    Ok(StreamSummary {
        category,
        stream: name,
        messages: s.messages,
        bytes: s.bytes,
        first_sequence: s.first_sequence,
        first_time: real(s.first_timestamp, s.first_sequence),
        last_sequence: s.last_sequence,
        last_time: real(s.last_timestamp, s.last_sequence),
        consumers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_limits() {
        let q = parse_range(Category::Writing, &params(&[])).unwrap();
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert!(parse_range(Category::Writing, &params(&[("limit", "0")])).is_err());
        assert!(parse_range(Category::Writing, &params(&[("limit", "1001")])).is_err());
        assert_eq!(
            parse_range(Category::Writing, &params(&[("limit", "1000")]))
                .unwrap()
                .limit,
            1000
        );
    }

    #[test]
    fn rejects_bad_parameters() {
        let bad = [
            vec![("from", "yesterday")],
            vec![
                ("from", "2026-01-02T00:00:00Z"),
                ("to", "2026-01-01T00:00:00Z"),
            ],
            vec![("type", "cursor_moved")],
            vec![("cursor", "abc")],
            vec![("colour", "red")],
        ];
        for b in bad {
            let e = parse_range(Category::Writing, &params(&b)).unwrap_err();
            assert_eq!(e.status, 400, "{b:?}");
        }
    }
}
