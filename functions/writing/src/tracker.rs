//! The tracker: a durable consumer of `events.writing.>` that keeps every session's
//! projection in Redis, emits the derived events (state changes, word_added, paragraph_completed,
//! flow entered/exited, session_ended) and pushes live metrics to the `project:` and `user:`
//! channels (at most once a second per session; transitions at once).
//!
//! It applies the events that *request* something — `session_started`, `keystroke`, and
//! `session_state_changed` from the API (reason `user`) or the scheduler (time-driven) — and
//! acknowledges every other writing event without applying it (the ones it emitted itself,
//! `metadata.source = "tracker"`, and the same types published by a back end). The
//! projection is thus a function of the stream alone, which is what makes `inkwire replay
//! writing` exact. An event time further than `max_clock_skew` from the time JetStream
//! stored the message is replaced by the stored time (see [`Input::trust_clock`]): a
//! publisher's clock does not drive session times, local days or streaks.
//!
//! Write-behind: sessions stay in memory while they are in use; input is applied there and
//! each changed session is saved once per flush (every `flush_interval`, 200 ms by default),
//! with a version check so two instances never overwrite each other. Messages are
//! acknowledged after the save that covers them, so a crash loses nothing: what was not saved
//! is redelivered, and what was saved is recognised (the session remembers the sequences it
//! applied). Derived events are saved with the session (its outbox) and published after the
//! save; `word_added` is summed per session and flush. Live pushes go out as input is
//! applied, so they do not wait for the flush; their once-a-second throttle runs on the
//! clock (a backlog being caught up does not flood watchers), and the last input of a burst
//! that the throttle held back is pushed when its second is over.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::consumer::{
    ConsumerSpec, Delivery, FlushPolicy, HandlerError, Shutdown, Verdict, WriteBehind,
    run_write_behind,
};
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish_windowed};
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::input::Input;
use crate::session::{Emitted, RECENT_SEQS, Reason, Session};
use crate::state_machine::{SessionState, TrackerConfig};
use crate::store::{self, OutboxEvent};

/// Durable consumer name.
pub const DURABLE: &str = "writing-tracker";
/// `metadata.source` of what the tracker publishes.
pub const SOURCE: &str = "tracker";

/// Sessions kept in memory before the unused ones are dropped (a bound, not a tuning knob).
const RESIDENT_LIMIT: usize = 50_000;
/// A session nobody wrote to for this long leaves memory (it is reloaded when needed).
const IDLE_EVICT: Duration = Duration::from_secs(10 * 60);
/// Unsaved messages of one session that make the tracker ask for a flush: half the window of
/// sequences a session remembers, so a redelivery after a crash is always recognised.
const SESSION_PENDING_LIMIT: usize = RECENT_SEQS / 2;
/// Messages pending in all sessions that force a flush.
const MAX_PENDING: usize = 20_000;

/// The tracker: configuration, connections, and the sessions it holds in memory.
pub struct Tracker {
    pub js: jetstream::Context,
    pub redis: ConnectionManager,
    pub config: TrackerConfig,
    /// Off during a replay: the derived events are in the stream already.
    pub emit: bool,
    sessions: HashMap<String, Entry>,
    /// Sessions whose latest input the live throttle held back.
    owed: std::collections::HashSet<String>,
    /// A session has so much unsaved input that it should be flushed now.
    flush_now: bool,
    /// The save started by the last flush.
    in_flight: Option<InFlight>,
    /// Derived events being published (at most one batch at a time).
    publishing: Option<tokio::task::JoinHandle<Published>>,
}

/// A save on its way (see [`Tracker::flush_all`]).
struct InFlight {
    task: tokio::task::JoinHandle<Result<Vec<i64>, String>>,
    /// The task's answer once it is in: one per session (1 saved, 0 version conflict), or
    /// why the save failed.
    report: Option<Result<Vec<i64>, String>>,
    /// The sessions in it, in order, and whether each had just ended.
    ids: Vec<(String, bool)>,
    /// Pending messages it covers.
    messages: usize,
}

/// Per session, the ids of the derived events a publish task published.
type Published = Vec<(String, Vec<String>)>;

/// A save task's answer, a panicked or cancelled task counting as a failed save.
fn joined(r: Result<Result<Vec<i64>, String>, tokio::task::JoinError>) -> Result<Vec<i64>, String> {
    r.unwrap_or_else(|e| Err(format!("save task failed: {e}")))
}

/// Runs one save pipeline.
async fn save(mut redis: ConnectionManager, pipe: redis::Pipeline) -> Result<Vec<i64>, String> {
    store::load_scripts(&mut redis)
        .await
        .map_err(|e| e.to_string())?;
    pipe.query_async(&mut redis)
        .await
        .map_err(|e| e.to_string())
}

/// Publishes saved derived events, then removes exactly those from the outboxes stored in
/// Redis. Returns, per session, the ids published (none if publishing failed: they stay
/// saved, for a later flush; their ids make a repeat a duplicate).
async fn publish(
    mut redis: ConnectionManager,
    js: jetstream::Context,
    outboxes: Vec<(String, Vec<OutboxEvent>)>,
) -> Published {
    let out: Vec<Outgoing> = outboxes
        .iter()
        .flat_map(|(_, o)| o.iter())
        .map(|o| Outgoing {
            subject: o.subject.clone(),
            msg_id: o.id.clone(),
            payload: Bytes::from(o.payload.clone()),
        })
        .collect();
    if let Err(e) = publish_windowed(&js, out, 512).await {
        tracing::warn!(error = %e, "derived events not published yet; will retry");
        return Vec::new();
    }
    let published: Vec<(String, Vec<String>)> = outboxes
        .into_iter()
        .map(|(id, o)| (id, o.into_iter().map(|e| e.id).collect()))
        .collect();
    let mut pipe = redis::pipe();
    for (id, ids) in &published {
        pipe.add_command(store::clear_outbox_cmd(id, ids)).ignore();
    }
    if let Err(e) = pipe.query_async::<()>(&mut redis).await {
        // Harmless: a later load publishes them again, as duplicates.
        tracing::warn!(error = %e, "clearing outboxes failed");
    }
    published
}

/// A session in memory and what happened to it since it was last saved.
struct Entry {
    session: Session,
    /// The stored version this state builds on.
    version: u64,
    /// Applied since the last save, in order (sequence and payload), to re-apply after a
    /// concurrent update and to acknowledge after the save.
    pending: Vec<(u64, Bytes)>,
    /// Applied and in the save that is in flight (acknowledged when it is done).
    saving: Vec<(u64, Bytes)>,
    /// Net words per local day since the last save.
    days: BTreeMap<String, i64>,
    /// Derived events since the last save, with their cause.
    emitted: Vec<(Cause, u64, usize, Emitted)>,
    /// Saved derived events not yet confirmed published.
    outbox: Vec<OutboxEvent>,
    /// Derived events in the save in flight (they join `outbox` when it is saved).
    saving_outbox: Vec<OutboxEvent>,
    /// The session ended since the last save (the writer's baseline is then updated).
    ended_now: bool,
    touched: Instant,
    /// When live metrics were last pushed, and the time and sequence of the latest input.
    last_push: Option<Instant>,
    latest: (u64, u64),
}

impl Entry {
    fn new(session: Session, version: u64, outbox: Vec<OutboxEvent>) -> Entry {
        Entry {
            session,
            version,
            pending: Vec::new(),
            saving: Vec::new(),
            days: BTreeMap::new(),
            emitted: Vec::new(),
            outbox,
            saving_outbox: Vec::new(),
            ended_now: false,
            touched: Instant::now(),
            last_push: None,
            latest: (0, 0),
        }
    }

    /// Its unsaved messages as failures to retry (the entry is being dropped, so their
    /// redeliveries apply them again on what is stored).
    fn fail_unsaved(self, why: &str) -> Vec<(u64, Result<(), HandlerError>)> {
        let id = self.session.id;
        self.saving
            .into_iter()
            .chain(self.pending)
            .map(|(seq, _)| {
                (
                    seq,
                    Err(HandlerError::Retry(format!("session {id}: {why}"))),
                )
            })
            .collect()
    }
}

/// What a derived event needs of the event that caused it.
#[derive(Debug, Clone)]
struct Cause {
    id: uuid::Uuid,
    timestamp: OffsetDateTime,
    correlation: Option<String>,
}

/// What applying one event did.
enum Step {
    Applied,
    /// Seen before (a redelivery) or not this session's owner: nothing to do.
    Ignored,
}

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
            sessions: HashMap::new(),
            owed: Default::default(),
            flush_now: false,
            in_flight: None,
            publishing: None,
        }
    }

    /// Applies one message and saves at once (tests and tools).
    pub async fn handle(&mut self, delivery: Delivery) -> Result<(), HandlerError> {
        self.handle_batch(vec![delivery])
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Applies the messages and saves at once; one outcome per delivery, in order.
    pub async fn handle_batch(
        &mut self,
        deliveries: Vec<Delivery>,
    ) -> Vec<Result<(), HandlerError>> {
        let seqs: Vec<u64> = deliveries.iter().map(|d| d.stream_sequence).collect();
        let verdicts = self.apply_all(deliveries).await;
        let mut flushed: HashMap<u64, Result<(), HandlerError>> = HashMap::new();
        // One flush starts the save, the next settles it (a third saves again what a
        // concurrent update made to apply again).
        for _ in 0..4 {
            flushed.extend(self.flush_all().await);
            if self.in_flight.is_none() {
                break;
            }
        }
        seqs.into_iter()
            .zip(verdicts)
            .map(|(seq, v)| match v {
                Verdict::Done => Ok(()),
                Verdict::Failed(e) => Err(e),
                Verdict::Pending => flushed.get(&seq).cloned().unwrap_or_else(|| {
                    Err(HandlerError::Retry(
                        "not saved yet (concurrent update)".into(),
                    ))
                }),
            })
            .collect()
    }

    /// Applies the deliveries in memory: loads the sessions that are not resident in one
    /// round trip, then applies in stream order and sends the live pushes that are due.
    async fn apply_all(&mut self, deliveries: Vec<Delivery>) -> Vec<Verdict> {
        let mut verdicts: Vec<Verdict> = Vec::with_capacity(deliveries.len());
        let mut parsed: Vec<Option<(Input, u64, Bytes)>> = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let mut event: Input = match serde_json::from_slice(&d.payload) {
                Ok(e) => e,
                Err(e) => {
                    verdicts.push(Verdict::Failed(HandlerError::Permanent(format!(
                        "not an event: {e}"
                    ))));
                    parsed.push(None);
                    continue;
                }
            };
            // Only commands move a session; the events the tracker (or a back end) produces
            // are facts for others to read, whoever published them, and need no session.
            if event.metadata.source.as_deref() == Some(SOURCE) || !event.is_command() {
                verdicts.push(Verdict::Done);
                parsed.push(None);
                continue;
            }
            if let Some(stored) = d.published {
                event.trust_clock(stored, self.config.max_clock_skew);
            }
            if event.session_id().is_none() {
                verdicts.push(Verdict::Failed(HandlerError::Permanent(
                    "writing event without data.sessionId".into(),
                )));
                parsed.push(None);
                continue;
            }
            verdicts.push(Verdict::Pending);
            parsed.push(Some((event, d.stream_sequence, d.payload)));
        }
        // Sessions not in memory are loaded in one round trip. Resident ones are used as
        // they are: a save finds out (by version) if another instance changed one meanwhile.
        let missing: Vec<String> = {
            let mut seen = std::collections::HashSet::new();
            parsed
                .iter()
                .flatten()
                .filter_map(|(e, _, _)| e.session_id())
                .filter(|id| !self.sessions.contains_key(*id) && seen.insert(*id))
                .map(str::to_string)
                .collect()
        };
        if let Err(e) = self.load(&missing).await {
            for (v, p) in verdicts.iter_mut().zip(&parsed) {
                if p.is_some() {
                    *v = Verdict::Failed(HandlerError::Retry(e.to_string()));
                }
            }
            return verdicts;
        }

        // Apply in stream order; note which sessions want a live push.
        let mut pushes: HashMap<String, Vec<Emitted>> = HashMap::new();
        for (v, p) in verdicts.iter_mut().zip(parsed) {
            let Some((event, seq, payload)) = p else {
                continue;
            };
            let id = event.session_id().expect("checked above").to_string();
            if !self.sessions.contains_key(&id) {
                if event.event_type != "session_started" {
                    // Only session_started creates a session; a retry finds it if it is
                    // merely late.
                    *v = Verdict::Failed(HandlerError::Retry(format!("unknown session {id}")));
                    continue;
                }
                match self.create(&id, &event).await {
                    Ok(entry) => {
                        self.sessions.insert(id.clone(), entry);
                    }
                    Err(e) => {
                        *v = Verdict::Failed(HandlerError::Retry(e.to_string()));
                        continue;
                    }
                }
            }
            let entry = self.sessions.get_mut(&id).expect("resident");
            if entry.pending.len() >= RECENT_SEQS {
                // A flood into one session: wait for a flush (see SESSION_PENDING_LIMIT).
                *v = Verdict::Failed(HandlerError::Retry(format!(
                    "session {id}: too much unsaved input"
                )));
                self.flush_now = true;
                continue;
            }
            let emitted_before = entry.emitted.len();
            match apply_event(&self.config, entry, seq, &event) {
                Step::Applied => {
                    entry.pending.push((seq, payload));
                    self.flush_now |= entry.pending.len() >= SESSION_PENDING_LIMIT;
                    entry.latest = (event.at_ms(), seq);
                    let transitions: Vec<Emitted> = entry.emitted[emitted_before..]
                        .iter()
                        .map(|(_, _, _, e)| e)
                        .filter(|e| e.is_transition())
                        .cloned()
                        .collect();
                    let throttled = entry
                        .last_push
                        .is_some_and(|t| t.elapsed() < self.config.live_interval);
                    if !transitions.is_empty() || !throttled || pushes.contains_key(&id) {
                        pushes.entry(id).or_default().extend(transitions);
                    } else {
                        self.owed.insert(id);
                    }
                }
                Step::Ignored => *v = Verdict::Done,
            }
        }
        if !pushes.is_empty() {
            self.push_live(pushes);
        }
        verdicts
    }

    /// Sends live metrics (with the transitions that just happened) for these sessions, in
    /// the background: they are best effort, and the projection is what counts. Sessions
    /// that share a channel share a message (a project with many writers gets one frame per
    /// batch, not one per writer).
    fn push_live(&mut self, pushes: HashMap<String, Vec<Emitted>>) {
        let now = Instant::now();
        let mut by_channel: HashMap<Channel, Vec<Value>> = HashMap::new();
        for (id, transitions) in pushes {
            self.owed.remove(&id);
            if let Some(entry) = self.sessions.get_mut(&id) {
                entry.last_push = Some(now);
                if !self.emit {
                    // A replay: nobody is watching.
                    continue;
                }
                let (at, _) = entry.latest;
                let s = &entry.session;
                let item = live_item(s, &transitions, at);
                if let Some(p) = &s.project_id {
                    let project = Channel::new(ChannelKind::Project, p.clone());
                    by_channel.entry(project).or_default().push(item.clone());
                }
                let user = Channel::new(ChannelKind::User, s.user_id.clone());
                by_channel.entry(user).or_default().push(item);
            }
        }
        if !self.emit || by_channel.is_empty() {
            return;
        }
        let out = live_messages(by_channel);
        let js = self.js.clone();
        tokio::spawn(async move {
            if let Err(e) = publish_windowed(&js, out, 512).await {
                tracing::warn!(error = %e, "live metrics push failed");
            }
        });
    }

    /// Pushes the held-back live metrics whose second is over.
    fn push_owed(&mut self) {
        let interval = self.config.live_interval;
        let mut ready = HashMap::new();
        self.owed.retain(|id| {
            let Some(entry) = self.sessions.get(id) else {
                return false;
            };
            if entry.last_push.is_none_or(|t| t.elapsed() >= interval) {
                ready.insert(id.clone(), Vec::new());
                false
            } else {
                true
            }
        });
        if !ready.is_empty() {
            self.push_live(ready);
        }
    }

    /// Loads `ids` from Redis in one round trip; a session already in memory is replaced by
    /// the stored state with its unsaved input applied again (after a concurrent update).
    /// Returns the unsaved messages of sessions that are no longer stored at all.
    async fn load(
        &mut self,
        ids: &[String],
    ) -> redis::RedisResult<Vec<(u64, Result<(), HandlerError>)>> {
        let mut lost = Vec::new();
        if ids.is_empty() {
            return Ok(lost);
        }
        let mut redis = self.redis.clone();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let loaded = store::load_many(&mut redis, &refs).await?;
        for (id, l) in ids.iter().zip(loaded) {
            let old = self.sessions.remove(id);
            match (l, old) {
                (Some(l), old) => {
                    let mut entry = Entry::new(l.session, l.version, l.outbox);
                    if let Some(old) = old {
                        let unsaved = old.saving.into_iter().chain(old.pending).collect();
                        self.reapply(&mut entry, unsaved);
                    }
                    self.sessions.insert(id.clone(), entry);
                }
                (None, Some(old)) => lost.extend(old.fail_unsaved("it is no longer stored")),
                (None, None) => {}
            }
        }
        Ok(lost)
    }

    /// Applies unsaved input again on a newer stored state (what another instance saved).
    fn reapply(&self, entry: &mut Entry, pending: Vec<(u64, Bytes)>) {
        for (seq, payload) in pending {
            // Still pending either way: it is acknowledged after this entry's next save.
            if let Ok(event) = serde_json::from_slice::<Input>(&payload) {
                apply_event(&self.config, entry, seq, &event);
            }
            entry.pending.push((seq, payload));
        }
    }

    /// A new session from its `session_started` event.
    async fn create(&self, id: &str, event: &Input) -> redis::RedisResult<Entry> {
        let mut redis = self.redis.clone();
        let baseline =
            store::baseline(&mut redis, &event.user_id, self.config.default_baseline_wpm).await?;
        let mut s = Session::new(
            id,
            &event.user_id,
            event.project_id.clone(),
            event.document_id.clone(),
            event.data.goal_words,
            event.at_ms(),
            baseline,
        );
        s.time_zone = event.data.time_zone.clone();
        Ok(Entry::new(s, 0, Vec::new()))
    }

    /// Settles the save in flight (if any) and starts the next one with everything applied
    /// since; drops sessions that are no longer needed in memory. Returns the outcome of
    /// every message it settled. Saves overlap with applying new input: the one started here
    /// is settled when it is written ([`WriteBehind::written`]) or by the next flush.
    async fn flush_all(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        let results = self.settle_all().await;
        self.start_save();
        self.flush_now = false;
        self.push_owed();
        self.evict();
        results
    }

    /// Settles the save in flight and takes in what the last publish did; starts publishing
    /// the saved derived events.
    async fn settle_all(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        let results = self.finish_save().await;
        self.finish_publish().await;
        self.start_publish();
        results
    }

    /// Starts saving every changed session in one pipeline, in the background.
    fn start_save(&mut self) {
        let dirty: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, e)| !e.pending.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        if dirty.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(dirty.len());
        let mut messages = 0;
        for id in dirty {
            let e = self
                .sessions
                .get_mut(&id)
                .expect("dirty sessions are resident");
            // This flush's derived events are saved with the session (its outbox).
            e.saving_outbox = if self.emit {
                derived_events(&e.session, &e.emitted)
            } else {
                Vec::new()
            };
            e.emitted.clear();
            pipe.add_command(store::save_cmd(
                &e.session,
                e.version,
                &self.config,
                &e.days,
                &e.saving_outbox,
            ));
            e.days.clear();
            e.saving = std::mem::take(&mut e.pending);
            messages += e.saving.len();
            ids.push((id, std::mem::take(&mut e.ended_now)));
        }
        let task = tokio::spawn(save(self.redis.clone(), pipe));
        self.in_flight = Some(InFlight {
            task,
            report: None,
            ids,
            messages,
        });
    }

    /// Waits for the save in flight; acknowledges what it saved, takes another instance's
    /// state for the sessions it changed meanwhile (their input is applied again and saved
    /// by the next flush), and forgets everything if the save failed.
    async fn finish_save(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        let Some(mut flight) = self.in_flight.take() else {
            return Vec::new();
        };
        let report = match flight.report.take() {
            Some(r) => r,
            None => joined((&mut flight.task).await),
        };
        let saved = match report {
            Ok(saved) => saved,
            Err(why) => {
                // Nothing is known to be saved: forget the unsaved state, so that the
                // redeliveries apply again on what is stored.
                let ids: Vec<String> = flight.ids.into_iter().map(|(id, _)| id).collect();
                return self.forget(&ids, &why);
            }
        };
        let mut results = Vec::new();
        let mut conflicts = Vec::new();
        let mut redis = self.redis.clone();
        for ((id, ended), ok) in flight.ids.into_iter().zip(saved) {
            let Some(e) = self.sessions.get_mut(&id) else {
                continue;
            };
            if ok != 1 {
                conflicts.push(id);
                continue;
            }
            e.version += 1;
            let saved_outbox = std::mem::take(&mut e.saving_outbox);
            e.outbox.extend(saved_outbox);
            results.extend(e.saving.drain(..).map(|(seq, _)| (seq, Ok(()))));
            if ended && e.session.active_ms >= 60_000 {
                let s = &e.session;
                let wpm = s.net_words() as f64 / (s.active_ms as f64 / 60_000.0);
                let default = self.config.default_baseline_wpm;
                if let Err(err) = store::update_baseline(&mut redis, &s.user_id, wpm, default).await
                {
                    tracing::warn!(error = %err, "baseline update failed");
                }
            }
        }
        match self.load(&conflicts).await {
            Ok(lost) => results.extend(lost),
            Err(e) => results.extend(self.forget(&conflicts, &e.to_string())),
        }
        results
    }

    /// Takes in the result of a finished publish: those events leave the outboxes.
    async fn finish_publish(&mut self) {
        let finished = self.publishing.as_ref().is_some_and(|t| t.is_finished());
        if !finished {
            return;
        }
        let Some(task) = self.publishing.take() else {
            return;
        };
        for (id, ids) in task.await.unwrap_or_default() {
            if let Some(e) = self.sessions.get_mut(&id) {
                e.outbox.retain(|o| !ids.contains(&o.id));
            }
        }
    }

    /// Starts publishing the saved derived events, unless a publish is still under way.
    fn start_publish(&mut self) {
        if !self.emit || self.publishing.is_some() {
            return;
        }
        let outboxes: Vec<(String, Vec<OutboxEvent>)> = self
            .sessions
            .iter()
            .filter(|(_, e)| !e.outbox.is_empty())
            .map(|(id, e)| (id.clone(), e.outbox.clone()))
            .collect();
        if outboxes.is_empty() {
            return;
        }
        self.publishing = Some(tokio::spawn(publish(
            self.redis.clone(),
            self.js.clone(),
            outboxes,
        )));
    }

    /// Drops sessions from memory; their unsaved messages fail (to be redelivered).
    fn forget(&mut self, ids: &[String], why: &str) -> Vec<(u64, Result<(), HandlerError>)> {
        let mut out = Vec::new();
        for id in ids {
            if let Some(e) = self.sessions.remove(id) {
                out.extend(e.fail_unsaved(why));
            }
        }
        out
    }

    /// Drops clean sessions that ended or sat unused, and all clean ones past the limit.
    fn evict(&mut self) {
        let full = self.sessions.len() > RESIDENT_LIMIT;
        let owed = &self.owed;
        self.sessions.retain(|id, e| {
            let clean = e.pending.is_empty()
                && e.saving.is_empty()
                && e.outbox.is_empty()
                && e.saving_outbox.is_empty()
                && !owed.contains(id);
            !(clean
                && (full
                    || e.session.state == SessionState::Ended
                    || e.touched.elapsed() >= IDLE_EVICT))
        });
    }
}

impl WriteBehind for Tracker {
    async fn apply(&mut self, batch: Vec<Delivery>) -> Vec<Verdict> {
        self.apply_all(batch).await
    }
    async fn flush(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        self.flush_all().await
    }
    async fn written(&mut self) {
        match self.in_flight.as_mut() {
            Some(f) if f.report.is_none() => {
                // Cancel-safe: the task keeps its result until it is awaited again.
                f.report = Some(joined((&mut f.task).await));
            }
            _ => std::future::pending().await,
        }
    }
    async fn settle(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        self.settle_all().await
    }
    fn wants_flush(&self) -> bool {
        self.flush_now
    }
    fn writing(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |f| f.messages)
    }
    fn next_flush(&self) -> Option<Duration> {
        // Held-back live pushes, and derived events still to publish, are sent by flushes
        // (not more often than every 10 ms).
        let floor = Duration::from_millis(10);
        let owed = (!self.owed.is_empty()).then_some(self.config.live_interval.max(floor));
        let unpublished = (self.emit && self.sessions.values().any(|e| !e.outbox.is_empty()))
            .then_some(self.config.flush_interval.max(floor));
        match (owed, unpublished) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Applies one event to a resident session.
fn apply_event(config: &TrackerConfig, entry: &mut Entry, seq: u64, event: &Input) -> Step {
    let session = &mut entry.session;
    // Only the owner's events move a session: the events API lets anyone publish their own
    // events, and a foreign sessionId must not reach someone else's.
    if event.user_id != session.user_id {
        tracing::warn!(session = %session.id, user = %event.user_id, "event for another user's session ignored");
        return Step::Ignored;
    }
    if !session.first_time(seq) {
        return Step::Ignored;
    }
    entry.touched = Instant::now();
    let at = event.at_ms();
    let words_before = session.net_words();
    let emitted = match event.event_type.as_str() {
        "keystroke" => session.apply_batch(event.batch(), config),
        "session_state_changed" => requested(config, session, event, at),
        _ => Vec::new(),
    };
    let delta = session.net_words() as i64 - words_before as i64;
    if delta != 0 {
        *entry
            .days
            .entry(crate::days::local_day(at, session.time_zone.as_deref()))
            .or_default() += delta;
    }
    entry.ended_now |= emitted.iter().any(|e| matches!(e, Emitted::Ended { .. }));
    let cause = Cause {
        id: event.id,
        timestamp: event.timestamp,
        correlation: event.metadata.correlation_id.clone(),
    };
    for (k, e) in emitted.into_iter().enumerate() {
        entry.emitted.push((cause.clone(), seq, k, e));
    }
    Step::Applied
}

/// A `session_state_changed` request from the API or the scheduler.
fn requested(
    config: &TrackerConfig,
    session: &mut Session,
    event: &Input,
    at: u64,
) -> Vec<Emitted> {
    let Some(to) = event.to_state() else {
        return Vec::new();
    };
    let reason = event.reason();
    // A time-driven request names the state it was computed for; if input arrived in
    // between, it no longer applies.
    if reason != Reason::User
        && (event.from_state() != Some(session.state)
            || session.due_transition(at, config).map(|(t, _, _)| t) != Some(to))
    {
        return Vec::new();
    }
    session
        .apply_request(to, reason, at, config)
        .unwrap_or_default()
}

/// The derived events of one flush, in order, each with an id that a retry reproduces (so it
/// is stored once). Consecutive `word_added` are summed into one (with `batches`, how many
/// keystroke batches it covers), which keeps the stream from growing by one event per batch.
fn derived_events(session: &Session, emitted: &[(Cause, u64, usize, Emitted)]) -> Vec<OutboxEvent> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < emitted.len() {
        let (cause, seq, k, e) = &emitted[i];
        let (event_type, mut data) = e.to_event(&session.id);
        let mut last = (cause, *seq, *k);
        if let Emitted::WordAdded { .. } = e {
            let mut words = 0u64;
            let mut total = 0u64;
            let mut batches = 0u32;
            while let Some((
                c,
                s,
                k,
                Emitted::WordAdded {
                    words: w,
                    total_words,
                },
            )) = emitted.get(i)
            {
                words += *w as u64;
                total = *total_words;
                batches += 1;
                last = (c, *s, *k);
                i += 1;
            }
            data = json!({"sessionId": session.id, "words": words, "totalWords": total, "batches": batches});
        } else {
            i += 1;
        }
        let (cause, seq, k) = last;
        let mut b = Event::builder(Category::Writing, event_type, session.user_id.clone())
            .data(data)
            .timestamp(cause.timestamp)
            .source(SOURCE)
            .causation(cause.id.to_string());
        if let Some(c) = &cause.correlation {
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
        out.push(OutboxEvent {
            subject: subjects::event_subject(Category::Writing, event_type),
            id: id.to_string(),
            payload: serde_json::to_string(&event).expect("events serialize"),
        });
    }
    out
}

/// One session's live entry: its metrics and the transitions that just happened.
fn live_item(session: &Session, transitions: &[Emitted], at: u64) -> Value {
    let transitions: Vec<Value> = transitions
        .iter()
        .map(|e| {
            let (t, d) = e.to_event(&session.id);
            json!({"type": t, "data": d})
        })
        .collect();
    json!({"metrics": session.metrics(at), "transitions": transitions})
}

/// Sessions per live message (keeps frames well under the NATS payload limit).
const LIVE_SESSIONS_PER_MESSAGE: usize = 100;

/// The live messages for each channel: `data = {"kind": "writing.metrics", "sessions": [..]}`.
fn live_messages(by_channel: HashMap<Channel, Vec<Value>>) -> Vec<Outgoing> {
    let mut out = Vec::new();
    for (channel, items) in by_channel {
        for chunk in items.chunks(LIVE_SESSIONS_PER_MESSAGE) {
            let data = json!({"kind": "writing.metrics", "sessions": chunk});
            let id = format!("writing:{channel}:{}", uuid::Uuid::now_v7());
            out.push(channels::outgoing(
                &channel,
                MessageType::DocumentUpdate,
                &data,
                id,
            ));
        }
    }
    out
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
    // Messages per pull; a flush's worth (and more) may be unacknowledged at once.
    spec.batch = 8000;
    // Unacknowledged at once: up to a flush's worth being written, another being applied, and
    // the batches in hand; a lower limit would stall delivery while a save is under way.
    spec.max_ack_pending = Some((2 * MAX_PENDING + 4 * spec.batch) as i64);
    let policy = FlushPolicy {
        interval: tracker.config.flush_interval,
        max_pending: MAX_PENDING,
    };
    let js = tracker.js.clone();
    run_write_behind(js, spec, policy, tracker, shutdown).await?;
    Ok(())
}
