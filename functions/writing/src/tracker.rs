//! The tracker: a durable consumer of `events.writing.>` that keeps every session's
//! projection in Redis, emits the derived events (state changes, word_added per batch,
//! paragraph_completed, flow entered/exited, session_ended) and pushes live metrics to the
//! `project:` and `user:` channels (at most once a second per session; transitions at once).
//!
//! It applies the events that *request* something — `session_started`, `keystroke`, and
//! `session_state_changed` from the API (reason `user`) or the scheduler (time-driven) — and
//! ignores the ones it emitted itself (`metadata.source = "tracker"`). The projection is thus
//! a function of the stream alone, which is what makes `inkwire replay writing` exact.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::consumer::{ConsumerSpec, Delivery, HandlerError, Shutdown, run};
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish};
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::session::{Batch, Emitted, Reason, Session};
use crate::state_machine::{SessionState, TrackerConfig};
use crate::store;

/// Durable consumer name.
pub const DURABLE: &str = "writing-tracker";
/// `metadata.source` of what the tracker publishes.
pub const SOURCE: &str = "tracker";

/// What the tracker needs.
#[derive(Clone)]
pub struct Tracker {
    pub js: jetstream::Context,
    pub redis: ConnectionManager,
    pub config: TrackerConfig,
    /// Off during a replay: the derived events are in the stream already.
    pub emit: bool,
}

fn ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

fn retry(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Retry(e.to_string())
}

impl Tracker {
    /// Handles one message of `events.writing.>`.
    pub async fn handle(&self, delivery: Delivery) -> Result<(), HandlerError> {
        let event: Event = serde_json::from_slice(&delivery.payload)
            .map_err(|e| HandlerError::Permanent(format!("not an event: {e}")))?;
        if event.metadata.source.as_deref() == Some(SOURCE) {
            return Ok(());
        }
        let Some(session_id) = event
            .data
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return Err(HandlerError::Permanent(
                "writing event without data.sessionId".into(),
            ));
        };
        // Optimistic concurrency: on a version conflict, reload and apply again.
        for _ in 0..5 {
            if self
                .apply(&event, &session_id, delivery.stream_sequence)
                .await?
            {
                return Ok(());
            }
        }
        Err(HandlerError::Retry(format!(
            "session {session_id}: too many concurrent updates"
        )))
    }

    /// Applies one event; false on a version conflict.
    async fn apply(&self, event: &Event, session_id: &str, seq: u64) -> Result<bool, HandlerError> {
        let mut redis = self.redis.clone();
        let at = ms(event.timestamp);
        let loaded = store::load(&mut redis, session_id).await.map_err(retry)?;
        let (mut session, version) = match (loaded, event.event_type.as_str()) {
            (Some(l), _) => (l.session, l.version),
            (None, "session_started") => {
                let baseline =
                    store::baseline(&mut redis, &event.user_id, self.config.default_baseline_wpm)
                        .await
                        .map_err(retry)?;
                let goal = event
                    .data
                    .get("goalWords")
                    .and_then(Value::as_u64)
                    .map(|g| g as u32);
                let mut s = Session::new(
                    session_id,
                    &event.user_id,
                    event.project_id.clone(),
                    event.document_id.clone(),
                    goal,
                    at,
                    baseline,
                );
                s.time_zone = event
                    .data
                    .get("timeZone")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                (s, 0)
            }
            // Only session_started creates a session; anything else for an unknown one is
            // either not ours or arrived first (a retry will find it).
            (None, "keystroke" | "session_state_changed") => {
                return Err(HandlerError::Retry(format!("unknown session {session_id}")));
            }
            (None, _) => return Ok(true),
        };
        if !session.first_time(seq) {
            return Ok(true);
        }
        let words_before = session.net_words();
        let emitted = match event.event_type.as_str() {
            "session_started" => Vec::new(),
            "keystroke" => session.apply_batch(batch_of(&event.data, at), &self.config),
            "session_state_changed" => self.requested(&mut session, &event.data, at),
            _ => Vec::new(),
        };
        let words_delta = session.net_words() as i64 - words_before as i64;
        let transition = emitted.iter().any(Emitted::is_transition);
        let push = transition
            || at.saturating_sub(session.last_push_ms)
                >= self.config.live_interval.as_millis() as u64;
        if push {
            session.last_push_ms = at;
        }
        if self.emit {
            self.publish_emitted(event, &session, seq, &emitted).await?;
        }
        if !store::save(
            &mut redis,
            &session,
            version,
            &self.config,
            words_delta,
            &crate::days::local_day(at, session.time_zone.as_deref()),
        )
        .await
        .map_err(retry)?
        {
            return Ok(false);
        }
        if session.state == SessionState::Ended
            && emitted.iter().any(|e| matches!(e, Emitted::Ended { .. }))
        {
            let minutes = session.active_ms as f64 / 60_000.0;
            if minutes >= 1.0 {
                let wpm = session.net_words() as f64 / minutes;
                store::update_baseline(
                    &mut redis,
                    &session.user_id,
                    wpm,
                    self.config.default_baseline_wpm,
                )
                .await
                .map_err(retry)?;
            }
        }
        if self.emit && push {
            self.push_live(&session, &emitted, at, seq).await;
        }
        Ok(true)
    }

    /// A `session_state_changed` request from the API or the scheduler.
    fn requested(&self, session: &mut Session, data: &Value, at: u64) -> Vec<Emitted> {
        let Some(to) = data
            .get("to")
            .and_then(Value::as_str)
            .and_then(SessionState::parse)
        else {
            return Vec::new();
        };
        let reason: Reason = data
            .get("reason")
            .cloned()
            .and_then(|r| serde_json::from_value(r).ok())
            .unwrap_or(Reason::User);
        // A time-driven request names the state it was computed for; if input arrived in
        // between, it no longer applies.
        if reason != Reason::User {
            let from = data
                .get("from")
                .and_then(Value::as_str)
                .and_then(SessionState::parse);
            if from != Some(session.state)
                || session.due_transition(at, &self.config).map(|(t, _, _)| t) != Some(to)
            {
                return Vec::new();
            }
        }
        session
            .apply_request(to, reason, at, &self.config)
            .unwrap_or_default()
    }

    async fn publish_emitted(
        &self,
        cause: &Event,
        session: &Session,
        seq: u64,
        emitted: &[Emitted],
    ) -> Result<(), HandlerError> {
        for (i, e) in emitted.iter().enumerate() {
            let (event_type, data) = e.to_event(&session.id);
            let mut b = Event::builder(Category::Writing, event_type, session.user_id.clone())
                .data(data)
                .timestamp(cause.timestamp)
                .source(SOURCE)
                .causation(cause.id.to_string());
            if let Some(c) = &cause.metadata.correlation_id {
                b = b.correlation(c.clone());
            }
            if let Some(p) = &session.project_id {
                b = b.project(p.clone());
            }
            if let Some(d) = &session.document_id {
                b = b.document(d.clone());
            }
            // Deterministic ids: a retried message re-emits the same ids, stored once.
            let id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("{}:{seq}:{i}", session.id).as_bytes(),
            );
            let event = b.id(id).build();
            let subject = subjects::event_subject(Category::Writing, event_type);
            let payload = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
            publish(
                &self.js,
                Outgoing {
                    subject,
                    msg_id: id.to_string(),
                    payload,
                },
            )
            .await
            .map_err(retry)?;
        }
        Ok(())
    }

    /// Live metrics (and the transitions that just happened) to the session's project and
    /// user channels. Best effort: the projection is already saved.
    async fn push_live(&self, session: &Session, emitted: &[Emitted], at: u64, seq: u64) {
        let transitions: Vec<Value> = emitted
            .iter()
            .filter(|e| e.is_transition())
            .map(|e| {
                let (t, d) = e.to_event(&session.id);
                json!({"type": t, "data": d})
            })
            .collect();
        let data = json!({"kind": "writing.metrics", "metrics": session.metrics(at), "transitions": transitions});
        let mut targets = vec![Channel::new(ChannelKind::User, session.user_id.clone())];
        if let Some(p) = &session.project_id {
            targets.push(Channel::new(ChannelKind::Project, p.clone()));
        }
        for channel in targets {
            let id = format!("writing:{}:{seq}:{channel}", session.id);
            if let Err(e) =
                channels::publish(&self.js, &channel, MessageType::DocumentUpdate, &data, id).await
            {
                tracing::warn!(error = %e, %channel, "live metrics push failed");
            }
        }
    }
}

fn batch_of(data: &Value, at_ms: u64) -> Batch {
    let n = |k: &str| {
        data.get(k)
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(u32::MAX as u64) as u32
    };
    let b = |k: &str| data.get(k).and_then(Value::as_bool).unwrap_or(false);
    Batch {
        at_ms,
        keys: n("keys"),
        chars_added: n("charsAdded"),
        chars_deleted: n("charsDeleted"),
        words_added: n("wordsAdded"),
        words_deleted: n("wordsDeleted"),
        paragraph_boundary: b("paragraphBoundary"),
        pasted: b("pasted"),
    }
}

/// Runs the tracker until `shutdown`.
pub async fn run_tracker(tracker: Tracker, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut spec = ConsumerSpec::new(subjects::event_stream(Category::Writing), DURABLE);
    spec.backoff = vec![
        Duration::from_millis(200),
        Duration::from_secs(1),
        Duration::from_secs(5),
        Duration::from_secs(30),
    ];
    spec.batch = 200;
    let js = tracker.js.clone();
    run(
        js,
        spec,
        move |d| {
            let t = tracker.clone();
            async move { t.handle(d).await }
        },
        shutdown,
    )
    .await?;
    Ok(())
}
