//! The tracker: a durable consumer of `events.writing.>` that keeps every session's
//! projection in Redis, emits the derived events (state changes, word_added per batch,
//! paragraph_completed, flow entered/exited, session_ended) and pushes live metrics to the
//! `project:` and `user:` channels (at most once a second per session; transitions at once).
//!
//! It applies the events that *request* something — `session_started`, `keystroke`, and
//! `session_state_changed` from the API (reason `user`) or the scheduler (time-driven) — and
//! ignores the ones it emitted itself (`metadata.source = "tracker"`). The projection is thus
//! a function of the stream alone, which is what makes `inkwire replay writing` exact.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::consumer::{ConsumerSpec, Delivery, HandlerError, Shutdown, run_batched};
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish_windowed};
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
    /// Sessions as this instance last saved them, by id, with their version: a batch then
    /// reads only the versions and fetches just the sessions someone else changed.
    pub cache: SessionCache,
}

/// See [`Tracker::cache`].
pub type SessionCache = Arc<Mutex<HashMap<String, (Session, u64)>>>;

/// Sessions kept in the cache before it is emptied (a bound, not a tuning knob).
const CACHE_LIMIT: usize = 200_000;

impl Tracker {
    pub fn new(
        js: jetstream::Context,
        redis: ConnectionManager,
        config: TrackerConfig,
        emit: bool,
    ) -> Tracker {
        Tracker {
            js,
            redis,
            config,
            emit,
            cache: SessionCache::default(),
        }
    }
}

fn ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

impl Tracker {
    /// Handles one message of `events.writing.>`.
    pub async fn handle(&self, delivery: Delivery) -> Result<(), HandlerError> {
        self.handle_batch(vec![delivery])
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Handles the messages at hand together: one Redis round trip to load every session
    /// they touch, the events applied in memory in stream order, derived events and live
    /// pushes published with a window of acks, and one round trip to save every session
    /// (each with its own version check). Returns one outcome per delivery, in order.
    pub async fn handle_batch(&self, deliveries: Vec<Delivery>) -> Vec<Result<(), HandlerError>> {
        let mut outcomes: Vec<Result<(), HandlerError>> = vec![Ok(()); deliveries.len()];
        // Parse, and group by session in order of first appearance.
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, d) in deliveries.iter().enumerate() {
            let event: Event = match serde_json::from_slice(&d.payload) {
                Ok(e) => e,
                Err(e) => {
                    outcomes[i] = Err(HandlerError::Permanent(format!("not an event: {e}")));
                    continue;
                }
            };
            if event.metadata.source.as_deref() == Some(SOURCE) {
                continue;
            }
            let Some(id) = event
                .data
                .get("sessionId")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                outcomes[i] = Err(HandlerError::Permanent(
                    "writing event without data.sessionId".into(),
                ));
                continue;
            };
            let g = *index.entry(id.clone()).or_insert_with(|| {
                groups.push(Group {
                    id,
                    items: Vec::new(),
                    session: None,
                    version: 0,
                    days: BTreeMap::new(),
                    emitted: Vec::new(),
                    push_at: None,
                    ended_now: false,
                });
                groups.len() - 1
            });
            groups[g].items.push((i, event, d.stream_sequence));
        }
        if groups.is_empty() {
            return outcomes;
        }
        let fail_all =
            |outcomes: &mut Vec<Result<(), HandlerError>>, groups: &[Group], e: String| {
                for g in groups {
                    for (i, _, _) in &g.items {
                        outcomes[*i] = Err(HandlerError::Retry(e.clone()));
                    }
                }
            };
        let mut redis = self.redis.clone();

        // Load: the versions of every session in one round trip, then only the sessions
        // that are not in the cache at that version in a second one.
        let mut pipe = redis::pipe();
        for g in &groups {
            pipe.hget(format!("{}:meta", store::session_key(&g.id)), "version");
        }
        let versions: Vec<Option<u64>> = match pipe.query_async(&mut redis).await {
            Ok(v) => v,
            Err(e) => {
                fail_all(&mut outcomes, &groups, e.to_string());
                return outcomes;
            }
        };
        let mut missing = Vec::new();
        {
            let cache = self.cache.lock().expect("session cache lock");
            for (gi, (g, v)) in groups.iter_mut().zip(versions).enumerate() {
                g.version = v.unwrap_or(0);
                match cache.get(&g.id) {
                    Some((s, cv)) if v == Some(*cv) => g.session = Some(s.clone()),
                    _ if v.is_some() => missing.push(gi),
                    _ => {}
                }
            }
        }
        if !missing.is_empty() {
            let mut pipe = redis::pipe();
            for gi in &missing {
                let id = &groups[*gi].id;
                pipe.get(store::session_key(id))
                    .hget(format!("{}:meta", store::session_key(id)), "version");
            }
            let loaded: Vec<Option<String>> = match pipe.query_async(&mut redis).await {
                Ok(v) => v,
                Err(e) => {
                    fail_all(&mut outcomes, &groups, e.to_string());
                    return outcomes;
                }
            };
            for (gi, pair) in missing.into_iter().zip(loaded.chunks(2)) {
                let g = &mut groups[gi];
                g.session = pair[0]
                    .as_deref()
                    .and_then(|j| serde_json::from_str(j).ok());
                g.version = pair[1].as_deref().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }

        // Apply in memory.
        for g in groups.iter_mut() {
            for (i, event, seq) in std::mem::take(&mut g.items) {
                let at = ms(event.timestamp);
                if g.session.is_none() {
                    if event.event_type != "session_started" {
                        // Only session_started creates a session; a retry finds it if it
                        // is merely late.
                        outcomes[i] = Err(HandlerError::Retry(format!("unknown session {}", g.id)));
                        g.items.push((i, event, seq));
                        continue;
                    }
                    let baseline = match store::baseline(
                        &mut redis,
                        &event.user_id,
                        self.config.default_baseline_wpm,
                    )
                    .await
                    {
                        Ok(b) => b,
                        Err(e) => {
                            outcomes[i] = Err(HandlerError::Retry(e.to_string()));
                            g.items.push((i, event, seq));
                            continue;
                        }
                    };
                    let goal = event
                        .data
                        .get("goalWords")
                        .and_then(Value::as_u64)
                        .map(|g| g as u32);
                    let mut s = Session::new(
                        &g.id,
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
                    g.session = Some(s);
                }
                let session = g.session.as_mut().expect("created above");
                // Only the owner's events move a session: the events API lets anyone publish
                // their own events, and a foreign sessionId must not reach someone else's.
                if event.user_id != session.user_id {
                    tracing::warn!(session = %g.id, user = %event.user_id, "event for another user's session ignored");
                    g.items.push((i, event, seq));
                    continue;
                }
                if session.first_time(seq) {
                    let words_before = session.net_words();
                    let emitted = match event.event_type.as_str() {
                        "keystroke" => session.apply_batch(batch_of(&event.data, at), &self.config),
                        "session_state_changed" => {
                            requested(&self.config, session, &event.data, at)
                        }
                        _ => Vec::new(),
                    };
                    let delta = session.net_words() as i64 - words_before as i64;
                    if delta != 0 {
                        *g.days
                            .entry(crate::days::local_day(at, session.time_zone.as_deref()))
                            .or_default() += delta;
                    }
                    let transition = emitted.iter().any(Emitted::is_transition);
                    if transition
                        || at.saturating_sub(session.last_push_ms)
                            >= self.config.live_interval.as_millis() as u64
                    {
                        session.last_push_ms = at;
                        g.push_at = Some((at, seq));
                    }
                    g.ended_now |= emitted.iter().any(|e| matches!(e, Emitted::Ended { .. }));
                    for (k, e) in emitted.into_iter().enumerate() {
                        g.emitted.push((event.clone(), seq, k, e));
                    }
                }
                g.items.push((i, event, seq));
            }
        }

        // Derived events first: if saving fails, the retry re-emits the same ids.
        if self.emit {
            let out: Vec<Outgoing> = groups
                .iter()
                .filter_map(|g| g.session.as_ref().map(|s| (g, s)))
                .flat_map(|(g, s)| {
                    g.emitted
                        .iter()
                        .map(move |(cause, seq, k, e)| derived_event(s, cause, *seq, *k, e))
                })
                .collect();
            if !out.is_empty()
                && let Err(e) = publish_windowed(&self.js, out, 512).await
            {
                fail_all(&mut outcomes, &groups, e.to_string());
                return outcomes;
            }
        }

        // Save every session in one round trip.
        let saved: Vec<(usize, i64)> = {
            if let Err(e) = store::load_scripts(&mut redis).await {
                fail_all(&mut outcomes, &groups, e.to_string());
                return outcomes;
            }
            let mut pipe = redis::pipe();
            let mut which = Vec::new();
            for (gi, g) in groups.iter().enumerate() {
                if let Some(s) = &g.session {
                    pipe.add_command(store::save_cmd(s, g.version, &self.config, &g.days));
                    which.push(gi);
                }
            }
            match pipe.query_async::<Vec<i64>>(&mut redis).await {
                Ok(r) => which.into_iter().zip(r).collect(),
                Err(e) => {
                    fail_all(&mut outcomes, &groups, e.to_string());
                    return outcomes;
                }
            }
        };
        let mut pushes = Vec::new();
        for (gi, ok) in saved {
            let g = &groups[gi];
            let session = g.session.as_ref().expect("saved sessions exist");
            if ok == 1 {
                let mut cache = self.cache.lock().expect("session cache lock");
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(g.id.clone(), (session.clone(), g.version + 1));
            } else {
                self.cache.lock().expect("session cache lock").remove(&g.id);
            }
            if ok != 1 {
                // Another instance saved this session meanwhile: apply again from its state.
                for (i, _, _) in &g.items {
                    if outcomes[*i].is_ok() {
                        outcomes[*i] = Err(HandlerError::Retry(format!(
                            "session {}: concurrent update",
                            g.id
                        )));
                    }
                }
                continue;
            }
            if g.ended_now && session.active_ms >= 60_000 {
                let wpm = session.net_words() as f64 / (session.active_ms as f64 / 60_000.0);
                if let Err(e) = store::update_baseline(
                    &mut redis,
                    &session.user_id,
                    wpm,
                    self.config.default_baseline_wpm,
                )
                .await
                {
                    tracing::warn!(error = %e, "baseline update failed");
                }
            }
            if self.emit
                && let Some((at, seq)) = g.push_at
            {
                let transitions: Vec<&Emitted> = g
                    .emitted
                    .iter()
                    .map(|(_, _, _, e)| e)
                    .filter(|e| e.is_transition())
                    .collect();
                pushes.extend(live_messages(session, &transitions, at, seq));
            }
        }
        // Live metrics are best effort (the projection is saved): sent in the background so
        // the next batch does not wait for their acks.
        if !pushes.is_empty() {
            let js = self.js.clone();
            tokio::spawn(async move {
                if let Err(e) = publish_windowed(&js, pushes, 512).await {
                    tracing::warn!(error = %e, "live metrics push failed");
                }
            });
        }
        outcomes
    }
}

/// The work of one session within a batch.
struct Group {
    id: String,
    items: Vec<(usize, Event, u64)>,
    session: Option<Session>,
    version: u64,
    days: BTreeMap<String, i64>,
    emitted: Vec<(Event, u64, usize, Emitted)>,
    push_at: Option<(u64, u64)>,
    ended_now: bool,
}

/// A `session_state_changed` request from the API or the scheduler.
fn requested(config: &TrackerConfig, session: &mut Session, data: &Value, at: u64) -> Vec<Emitted> {
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
            || session.due_transition(at, config).map(|(t, _, _)| t) != Some(to)
        {
            return Vec::new();
        }
    }
    session
        .apply_request(to, reason, at, config)
        .unwrap_or_default()
}

/// A derived event, with an id that a retry reproduces (so it is stored once).
fn derived_event(session: &Session, cause: &Event, seq: u64, k: usize, e: &Emitted) -> Outgoing {
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
    let id = uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("{}:{seq}:{k}", session.id).as_bytes(),
    );
    let event = b.id(id).build();
    Outgoing {
        subject: subjects::event_subject(Category::Writing, event_type),
        msg_id: id.to_string(),
        payload: Bytes::from(serde_json::to_vec(&event).expect("events serialize")),
    }
}

/// Live metrics (and the transitions that just happened) for the session's user and project
/// channels.
fn live_messages(session: &Session, transitions: &[&Emitted], at: u64, seq: u64) -> Vec<Outgoing> {
    let transitions: Vec<Value> = transitions
        .iter()
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
    targets
        .into_iter()
        .map(|channel| {
            let id = format!("writing:{}:{seq}:{channel}", session.id);
            channels::outgoing(&channel, MessageType::DocumentUpdate, &data, id)
        })
        .collect()
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
    // Up to this many messages are handled together (and buffered locally).
    spec.batch = 1000;
    let js = tracker.js.clone();
    run_batched(
        js,
        spec,
        move |batch| {
            let t = tracker.clone();
            async move { t.handle_batch(batch).await }
        },
        shutdown,
    )
    .await?;
    Ok(())
}
