//! The presence side of the document task: the sessions it knows (its own clients' and REST
//! users', and the other instances'), their positions resolved against the live document,
//! conflict prediction on every presence or edit change, coalesced `presence_update` frames
//! to `document:{id}`, and the warnings to `user:{id}` with their
//! `collaboration.conflict_detected` event.
//!
//! - Positions are relative positions; every evaluation resolves them against the current
//!   text, so paragraph indices are right after anyone's insert above.
//! - Warnings are decided at once (not coalesced: they must arrive within 100 ms); a pair is
//!   evaluated by each instance owning one of its sessions, and both dedupe — in memory, then
//!   with one atomic Redis claim per pair and place — so one warning goes out per pair, place
//!   and `conflict_interval`, again sooner only when the severity rises. The place is the
//!   paragraph's stable name (`positions::TextIndex::place`), not its index, which moves.
//! - Only sessions this instance owns are published, stored and expired by it; the others
//!   come over NATS and are dropped when stale or when their instance's heartbeat expired.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::membership::{ProjectRole, is_valid_id};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use yrs::{ClientID, Transact};

use super::{Actor, Command, INSTANCE_HEADER};
use crate::conflicts::{self, Party, Prediction, Severity, Span};
use crate::positions::{Pos, TextIndex};
use crate::presence::{self, Entry, Mode, Source, Viewport, Wire, default_mode, now_ms};

/// What the presence routes ask of a document task.
pub enum PresenceCommand {
    Rest {
        user: String,
        role: ProjectRole,
        request: RestRequest,
        reply: oneshot::Sender<Result<Value, RestError>>,
    },
    /// `{"collaborators": [...], "conflicts": [...]}` as this instance sees them.
    Snapshot { reply: oneshot::Sender<Value> },
    /// Sessions found in Redis when the document loaded.
    Loaded(Vec<Entry>),
    /// Instances whose heartbeat expired.
    DeadInstances(HashSet<String>),
    /// Fresh roles of the users with REST sessions (`None`: no access any more).
    RestRoles(Vec<(String, Option<ProjectRole>)>),
}

/// Which REST route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestKind {
    Presence,
    Cursor,
    Edit,
}

/// A REST presence change, already checked against its schema.
#[derive(Debug, Clone)]
pub struct RestRequest {
    pub kind: RestKind,
    pub offset: Option<u32>,
    pub selection: Option<(u32, u32)>,
    pub viewport: Option<Viewport>,
    pub mode: Option<Mode>,
    pub device: Option<String>,
    pub inserted: u64,
}

/// Why a REST change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestError {
    /// `pointer` names the field; offsets are past the end of the text, or a viewport past
    /// its last paragraph.
    OutOfRange {
        pointer: &'static str,
        value: u32,
        limit: u32,
    },
}

pub(super) struct Session {
    entry: Entry,
    /// Owned by this instance (stored, published and expired here).
    local: bool,
    /// The local connection it came from (Yjs sessions).
    conn: Option<u64>,
    stored_at: Instant,
}

/// Positions resolved at the last evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Resolved {
    cursor: Option<Pos>,
    anchor: Option<Pos>,
}

impl Resolved {
    fn span(&self) -> Option<Span> {
        let head = self.cursor?;
        let anchor = self.anchor.unwrap_or(head);
        Some(Span {
            from: head.offset.min(anchor.offset),
            to: head.offset.max(anchor.offset),
            first: head.paragraph.min(anchor.paragraph),
            last: head.paragraph.max(anchor.paragraph),
        })
    }
}

#[derive(Default)]
pub(super) struct Sessions {
    map: HashMap<String, Session>,
    /// Own sessions whose entry changed: stored, shared and published.
    changed: HashSet<String>,
    /// Own sessions whose resolved position changed (someone edited): published.
    moved: HashSet<String>,
    /// Own sessions due for renewal in Redis and at the other instances.
    touched: HashSet<String>,
    /// Own sessions that ended: (session, user).
    left: Vec<(String, String)>,
    resolved: HashMap<String, Resolved>,
    /// (user, user, place) → last severity warned and when.
    warned: HashMap<(String, String, String), (Severity, Instant)>,
    /// Per user, characters typed recently (for typing velocity).
    typed: HashMap<String, VecDeque<(Instant, u64)>>,
    last_sweep: Option<Instant>,
    last_alive_check: Option<Instant>,
    /// Recent edits (when, author, paragraph if measured) for collision counting.
    recent_edits: VecDeque<(Instant, String, Option<u32>)>,
    /// (user, user, paragraph) → when a collision was last counted.
    collided: HashMap<(String, String, u32), Instant>,
    /// The text as last read for positions, with the document version it was read at:
    /// awareness moves between two edits (most of them) resolve against it without reading
    /// the document again.
    index: Option<(u64, TextIndex)>,
}

/// The text index of `version`, read again only when the document changed since.
fn index_at<'a, T: yrs::ReadTxn>(
    cache: &'a mut Option<(u64, TextIndex)>,
    version: u64,
    txn: &T,
) -> &'a TextIndex {
    if cache.as_ref().is_none_or(|(v, _)| *v != version) {
        *cache = Some((version, TextIndex::of(txn)));
    }
    &cache.as_ref().expect("just set").1
}

/// Edits by two users in one paragraph within this window are a collision.
pub const COLLISION_WINDOW: Duration = Duration::from_secs(5);

/// The Redis hash of a document's conflict counters (`predicted`, `collisions`,
/// `collisionsAfterWarning`).
pub fn metrics_key(document: &str) -> String {
    format!("inkwire:coedit:{document}:metrics")
}

fn pair_key(document: &str, u1: &str, u2: &str) -> String {
    format!("inkwire:coedit:{document}:warnedpair:{u1}:{u2}")
}

/// Counts a collision once across instances (the first to claim it within the window), and
/// whether the pair had been warned before it.
const COUNT_COLLISION: &str = r#"
if redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('HINCRBY', KEYS[1], 'collisions', 1)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'collisionsAfterWarning', 1)
  end
  return 1
end
return 0
"#;

impl Sessions {
    pub(super) fn has_local(&self) -> bool {
        self.map.values().any(|s| s.local)
    }

    /// Users with a REST session owned here.
    pub(super) fn rest_users(&self) -> Vec<String> {
        self.map
            .values()
            .filter(|s| s.local && s.entry.source == Source::Rest)
            .map(|s| s.entry.user_id.clone())
            .collect()
    }
}

/// The session id of an awareness client.
fn yjs_session(user: &str, client: ClientID) -> String {
    format!("{user}:y{client}")
}

fn rest_session(user: &str) -> String {
    format!("{user}:rest")
}

fn rfc3339(ms: u64) -> Value {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or(Value::Null, Value::String)
}

/// A session as the API and `presence_update` frames show it.
fn view(entry: &Entry, r: &Resolved) -> Value {
    let cursor = r
        .cursor
        .map(|p| json!({"offset": p.offset, "paragraph": p.paragraph}));
    let selection = match (r.cursor, r.anchor) {
        (Some(h), Some(a)) if h.offset != a.offset => json!({
            "anchor": a.offset, "head": h.offset,
            "firstParagraph": a.paragraph.min(h.paragraph),
            "lastParagraph": a.paragraph.max(h.paragraph),
        }),
        _ => Value::Null,
    };
    json!({
        "sessionId": entry.session_id,
        "userId": entry.user_id,
        "role": entry.role.as_str(),
        "source": entry.source,
        "mode": entry.mode,
        "cursor": cursor,
        "selection": selection,
        "viewport": entry.viewport,
        "typingVelocity": entry.typing_velocity,
        "device": entry.device,
        "lastSeen": rfc3339(entry.last_seen),
        "lastEdit": entry.last_edit.map_or(Value::Null, rfc3339),
    })
}

/// Two entries equal but for their last-seen time?
fn same_but_seen(a: &Entry, b: &Entry) -> bool {
    let mut b = b.clone();
    b.last_seen = a.last_seen;
    *a == b
}

/// A warning decided here, to be claimed and sent.
struct Warning {
    users: [(String, u32); 2],
    prediction: Prediction,
    place: String,
}

/// Atomically: warn when nothing was warned for this pair and place within the interval, or
/// when the severity rises; a claimed warning is counted (`predicted`) and marks the pair as
/// warned (for `collisionsAfterWarning`), in the same round trip.
const CLAIM_WARNING: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'predicted', 1)
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
  return 1
end
return 0
"#;

impl Actor {
    fn touch_every(&self) -> Duration {
        (self.coedit.config.presence_ttl / 3).min(Duration::from_secs(60))
    }

    fn new_entry(&self, session: String, user: &str, role: ProjectRole, source: Source) -> Entry {
        Entry {
            session_id: session,
            user_id: user.to_string(),
            role,
            source,
            instance: self.coedit.instance_id.clone(),
            anchor: None,
            head: None,
            viewport: None,
            mode: default_mode(role),
            device: None,
            typing_velocity: self.velocity(user),
            last_seen: now_ms(),
            last_edit: None,
        }
    }

    /// Stores an own session's new entry; `true` when more than its last-seen time changed.
    fn upsert_local(&mut self, entry: Entry, conn: Option<u64>) -> bool {
        let id = entry.session_id.clone();
        let changed = match self.sessions.map.get(&id) {
            Some(s) if s.local => !same_but_seen(&s.entry, &entry),
            _ => true,
        };
        let stored_at = match self.sessions.map.get(&id) {
            Some(s) if s.local && !changed => s.stored_at,
            _ => Instant::now(),
        };
        self.sessions.map.insert(
            id.clone(),
            Session {
                entry,
                local: true,
                conn,
                stored_at,
            },
        );
        if changed {
            self.sessions.changed.insert(id);
        }
        changed
    }

    /// Awareness states a local connection sent (`json` is each client's state, `null` when
    /// it left).
    pub(super) fn awareness_presence(&mut self, conn_id: u64, states: &[(ClientID, String)]) {
        let Some((user, role)) = self.conns.get(&conn_id).map(|c| (c.user.clone(), c.role)) else {
            return;
        };
        let mut focus = Vec::new();
        for (client, json) in states {
            let session = yjs_session(&user, *client);
            if json == "null" {
                self.remove_local(&session);
                continue;
            }
            let Ok(state) = serde_json::from_str::<Value>(json) else {
                continue;
            };
            let fields = presence::from_awareness(&state);
            let mut entry = match self.sessions.map.get(&session) {
                Some(s) => s.entry.clone(),
                None => self.new_entry(session.clone(), &user, role, Source::Yjs),
            };
            entry.role = role;
            entry.anchor = fields.anchor;
            entry.head = fields.head;
            entry.viewport = fields.viewport;
            entry.device = fields.device;
            entry.mode = match fields.mode {
                // A reader cannot claim to edit.
                Some(Mode::Editing) if !super::writes(role) => Mode::Viewing,
                Some(m) => m,
                None => default_mode(role),
            };
            entry.last_seen = now_ms();
            if self.upsert_local(entry, Some(conn_id)) {
                focus.push(session);
            }
        }
        if !focus.is_empty() {
            self.evaluate(Some(&focus));
        }
    }

    /// A local connection left: its sessions end.
    pub(super) fn connection_presence_gone(&mut self, conn_id: u64) {
        let gone: Vec<String> = self
            .sessions
            .map
            .iter()
            .filter(|(_, s)| s.local && s.conn == Some(conn_id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove_local(&id);
        }
    }

    /// A local connection's role changed.
    pub(super) fn connection_role(&mut self, conn_id: u64, role: ProjectRole) {
        let ids: Vec<String> = self
            .sessions
            .map
            .iter()
            .filter(|(_, s)| s.local && s.conn == Some(conn_id) && s.entry.role != role)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            if let Some(s) = self.sessions.map.get_mut(id) {
                s.entry.role = role;
                if !super::writes(role) && s.entry.mode == Mode::Editing {
                    s.entry.mode = Mode::Viewing;
                }
                self.sessions.changed.insert(id.clone());
            }
        }
    }

    fn remove_local(&mut self, session: &str) {
        if let Some(s) = self.sessions.map.remove(session) {
            self.sessions.resolved.remove(session);
            self.sessions.changed.remove(session);
            self.sessions.moved.remove(session);
            self.sessions.touched.remove(session);
            if s.local {
                self.sessions
                    .left
                    .push((session.to_string(), s.entry.user_id));
            }
        }
    }

    fn velocity(&self, user: &str) -> u32 {
        let cutoff = Instant::now() - Duration::from_secs(60);
        self.sessions.typed.get(user).map_or(0, |q| {
            q.iter()
                .filter(|(t, _)| *t >= cutoff)
                .map(|(_, n)| *n)
                .sum::<u64>()
                .min(u32::MAX as u64) as u32
        })
    }

    /// `user` typed `inserted` characters (an update they authored, or a REST edit).
    fn typed(&mut self, user: &str, inserted: u64) {
        let now = Instant::now();
        let q = self.sessions.typed.entry(user.to_string()).or_default();
        q.push_back((now, inserted));
        while q
            .front()
            .is_some_and(|(t, _)| now - *t > Duration::from_secs(60))
        {
            q.pop_front();
        }
        if q.len() > 10_000 {
            q.pop_front();
        }
        let velocity = self.velocity(user);
        let at = now_ms();
        let ids: Vec<String> = self
            .sessions
            .map
            .iter()
            .filter(|(_, s)| s.local && s.entry.user_id == user)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(s) = self.sessions.map.get_mut(&id) {
                s.entry.typing_velocity = velocity;
                s.entry.last_edit = Some(at);
                self.sessions.changed.insert(id);
            }
        }
    }

    /// Did another user than `author` edit within [`COLLISION_WINDOW`]?
    pub(super) fn other_author_recently(&self, author: &str) -> bool {
        let now = Instant::now();
        self.sessions
            .recent_edits
            .iter()
            .rev()
            .take_while(|(t, _, _)| now - *t <= COLLISION_WINDOW)
            .any(|(_, u, _)| u != author)
    }

    /// An edit by `author` in `paragraph` was applied (every instance sees every edit); the
    /// instance that accepted it (`ours`) counts a collision when another user edited the
    /// same paragraph within [`COLLISION_WINDOW`].
    pub(super) fn edit_for_collisions(&mut self, author: &str, paragraph: Option<u32>, ours: bool) {
        let now = Instant::now();
        let q = &mut self.sessions.recent_edits;
        while q
            .front()
            .is_some_and(|(t, _, _)| now - *t > COLLISION_WINDOW)
        {
            q.pop_front();
        }
        let others: Vec<String> = q
            .iter()
            .filter(|(_, u, p)| paragraph.is_some() && *p == paragraph && u != author)
            .map(|(_, u, _)| u.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if q.len() < 10_000 {
            q.push_back((now, author.to_string(), paragraph));
        }
        let Some(paragraph) = paragraph.filter(|_| ours && !others.is_empty()) else {
            return;
        };
        self.sessions
            .collided
            .retain(|_, t| now - *t <= COLLISION_WINDOW);
        for other in others {
            let (u1, u2) = if author < other.as_str() {
                (author.to_string(), other)
            } else {
                (other, author.to_string())
            };
            let key = (u1.clone(), u2.clone(), paragraph);
            if self.sessions.collided.contains_key(&key) {
                continue;
            }
            self.sessions.collided.insert(key, now);
            let mut redis = self.coedit.app.redis.clone();
            let document = self.id.to_string();
            tokio::spawn(async move {
                let r: redis::RedisResult<i64> = redis::Script::new(COUNT_COLLISION)
                    .key(metrics_key(&document))
                    .key(pair_key(&document, &u1, &u2))
                    .key(format!(
                        "inkwire:coedit:{document}:collision:{u1}:{u2}:{paragraph}"
                    ))
                    .arg(COLLISION_WINDOW.as_millis() as u64)
                    .invoke_async(&mut redis)
                    .await;
                if let Err(e) = r {
                    tracing::warn!(document, error = %e, "collision not counted");
                }
            });
        }
    }

    /// The document changed (an update was applied): positions moved, typing counted, and
    /// every pair is evaluated again.
    pub(super) fn document_changed(&mut self, author: Option<&str>, inserted: u64) {
        if self.sessions.map.is_empty() {
            return;
        }
        if let Some(author) = author
            && inserted > 0
        {
            self.typed(author, inserted);
        }
        self.evaluate(None);
    }

    /// Resolves every session, notes own sessions that moved, and warns about the pairs
    /// that involve `focus` (every pair when `None`) and one of this instance's sessions.
    fn evaluate(&mut self, focus: Option<&[String]>) {
        let mut warnings = Vec::new();
        {
            let txn = self.doc.transact();
            let ix = index_at(&mut self.sessions.index, self.doc_version, &txn);
            let mut parties: Vec<(&String, &Session, Span)> = Vec::new();
            for (id, s) in &self.sessions.map {
                let r = Resolved {
                    cursor: s.entry.head.as_ref().and_then(|h| ix.resolve(&txn, h)),
                    anchor: s.entry.anchor.as_ref().and_then(|a| ix.resolve(&txn, a)),
                };
                if self.sessions.resolved.get(id) != Some(&r) {
                    self.sessions.resolved.insert(id.clone(), r);
                    if s.local {
                        self.sessions.moved.insert(id.clone());
                    }
                }
                if s.entry.editing()
                    && let Some(span) = r.span()
                {
                    parties.push((id, s, span));
                }
            }
            let focused = |id: &String| focus.is_none_or(|f| f.contains(id));
            for i in 0..parties.len() {
                for j in i + 1..parties.len() {
                    let (ia, a, sa) = parties[i];
                    let (ib, b, sb) = parties[j];
                    if !(a.local || b.local) || !(focused(ia) || focused(ib)) {
                        continue;
                    }
                    let pa = Party {
                        user: &a.entry.user_id,
                        editing: true,
                        span: sa,
                    };
                    let pb = Party {
                        user: &b.entry.user_id,
                        editing: true,
                        span: sb,
                    };
                    if let Some(p) = conflicts::predict(&pa, &pb) {
                        // The mover first: the event is recorded as theirs.
                        let mut users = [
                            (a.entry.user_id.clone(), sa.first),
                            (b.entry.user_id.clone(), sb.first),
                        ];
                        if focus.is_some() && !focused(ia) {
                            users.swap(0, 1);
                        }
                        warnings.push(Warning {
                            users,
                            prediction: p,
                            place: ix.place(&txn, p.paragraph),
                        });
                    }
                }
            }
        }
        let interval = self.coedit.config.conflict_interval;
        for w in warnings {
            let (u1, u2) = if w.users[0].0 < w.users[1].0 {
                (&w.users[0].0, &w.users[1].0)
            } else {
                (&w.users[1].0, &w.users[0].0)
            };
            let key = (u1.clone(), u2.clone(), w.place.clone());
            if let Some((sev, at)) = self.sessions.warned.get(&key)
                && w.prediction.severity <= *sev
                && at.elapsed() < interval
            {
                continue;
            }
            self.sessions
                .warned
                .insert(key, (w.prediction.severity, Instant::now()));
            self.send_warning(w);
        }
    }

    fn send_warning(&self, w: Warning) {
        let mut redis = self.coedit.app.redis.clone();
        let js = self.coedit.app.js.clone();
        let document = self.id.to_string();
        let project = self.project.to_string();
        let interval = self.coedit.config.conflict_interval;
        tokio::spawn(async move {
            let (u1, u2) = if w.users[0].0 < w.users[1].0 {
                (&w.users[0].0, &w.users[1].0)
            } else {
                (&w.users[1].0, &w.users[0].0)
            };
            let key = format!("inkwire:coedit:{document}:warned:{u1}:{u2}:{}", w.place);
            let claimed: redis::RedisResult<i64> = redis::Script::new(CLAIM_WARNING)
                .key(key)
                .key(metrics_key(&document))
                .key(pair_key(&document, u1, u2))
                .arg(w.prediction.severity.rank())
                .arg(interval.as_millis() as u64)
                .invoke_async(&mut redis)
                .await;
            match claimed {
                Ok(1) => {}
                Ok(_) => return,
                // Better a warning twice than none.
                Err(e) => {
                    tracing::warn!(document, error = %e, "conflict claim failed; warning anyway")
                }
            }
            let at = rfc3339(now_ms());
            let p = w.prediction;
            let frames = [(0usize, 1usize), (1, 0)].map(|(me, other)| {
                let data = json!({
                    "kind": "conflict_warning",
                    "documentId": document,
                    "projectId": project,
                    "otherUserId": w.users[other].0,
                    "severity": p.severity,
                    "reason": p.reason,
                    "paragraph": p.paragraph,
                    "yourParagraph": w.users[me].1,
                    "otherParagraph": w.users[other].1,
                    "suggestion": conflicts::suggestion(&p, &w.users[other].0),
                    "detectedAt": at,
                });
                (Channel::new(ChannelKind::User, w.users[me].0.clone()), data)
            });
            let sends = frames.iter().map(|(channel, data)| {
                channels::publish(
                    &js,
                    channel,
                    MessageType::PresenceUpdate,
                    data,
                    uuid::Uuid::new_v4().to_string(),
                )
            });
            for r in futures::future::join_all(sends).await {
                if let Err(e) = r {
                    tracing::warn!(document, error = %e, "conflict warning not published");
                }
            }
            crate::attribution::publish(
                &js,
                "conflict_detected",
                &w.users[0].0,
                &project,
                &document,
                json!({
                    "otherUserId": w.users[1].0,
                    "severity": p.severity,
                    "reason": p.reason,
                    "paragraph": p.paragraph,
                }),
            )
            .await;
        });
    }

    pub(super) fn presence_command(&mut self, cmd: PresenceCommand) {
        match cmd {
            PresenceCommand::Rest {
                user,
                role,
                request,
                reply,
            } => {
                let answer = self.rest(&user, role, request);
                let _ = reply.send(answer);
            }
            PresenceCommand::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            PresenceCommand::Loaded(entries) => {
                let any = !entries.is_empty();
                for e in entries {
                    if e.instance == self.coedit.instance_id
                        || self.sessions.map.contains_key(&e.session_id)
                    {
                        continue;
                    }
                    self.remote_entry(e);
                }
                if any {
                    self.evaluate(None);
                }
            }
            PresenceCommand::DeadInstances(dead) => {
                let gone: Vec<(String, String)> = self
                    .sessions
                    .map
                    .iter()
                    .filter(|(_, s)| !s.local && dead.contains(&s.entry.instance))
                    .map(|(id, s)| (id.clone(), s.entry.user_id.clone()))
                    .collect();
                for (id, _) in &gone {
                    self.sessions.map.remove(id);
                    self.sessions.resolved.remove(id);
                }
                self.remove_stored(gone, true);
            }
            PresenceCommand::RestRoles(roles) => {
                for (user, role) in roles {
                    let id = rest_session(&user);
                    match role {
                        None => self.remove_local(&id),
                        Some(role) => {
                            if let Some(s) = self.sessions.map.get_mut(&id)
                                && s.local
                                && s.entry.role != role
                            {
                                s.entry.role = role;
                                if !super::writes(role) && s.entry.mode == Mode::Editing {
                                    s.entry.mode = Mode::Viewing;
                                }
                                self.sessions.changed.insert(id);
                            }
                        }
                    }
                }
                self.evaluate(None);
            }
        }
    }

    fn remote_entry(&mut self, e: Entry) {
        // Ids reach Redis keys and relay subjects: only well-formed ones, whatever another
        // instance or a stored entry says.
        if !is_valid_id(&e.user_id)
            || !is_valid_id(&e.instance)
            || !e.session_id.starts_with(&format!("{}:", e.user_id))
            || e.session_id.len() > 100
        {
            return;
        }
        let id = e.session_id.clone();
        self.sessions.changed.remove(&id);
        self.sessions.touched.remove(&id);
        self.sessions.moved.remove(&id);
        self.sessions.map.insert(
            id,
            Session {
                entry: e,
                local: false,
                conn: None,
                stored_at: Instant::now(),
            },
        );
    }

    /// Sessions announced by another instance.
    pub(super) fn remote_presence(&mut self, msg: &async_nats::Message) {
        let from = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(INSTANCE_HEADER))
            .map(|v| v.as_str().to_string());
        if from.as_deref() == Some(self.coedit.instance_id.as_str()) {
            return;
        }
        let Ok(wire) = serde_json::from_slice::<Wire>(&msg.payload) else {
            return;
        };
        match wire {
            Wire::Set { entries } => {
                let mut focus = Vec::new();
                for e in entries {
                    if e.instance == self.coedit.instance_id {
                        continue;
                    }
                    // The newest entry wins (last seen, then instance id): a REST user whose
                    // requests now reach another instance is owned there from here on, and
                    // an older entry arriving late (an instance's flush crossing the other's)
                    // changes nothing — if it is ours, we say so again.
                    if let Some(s) = self.sessions.map.get(&e.session_id)
                        && (e.last_seen, &e.instance) <= (s.entry.last_seen, &s.entry.instance)
                    {
                        if s.local {
                            self.sessions.changed.insert(e.session_id.clone());
                        }
                        continue;
                    }
                    let unchanged = self
                        .sessions
                        .map
                        .get(&e.session_id)
                        .is_some_and(|s| same_but_seen(&s.entry, &e));
                    if !unchanged {
                        focus.push(e.session_id.clone());
                    }
                    self.remote_entry(e);
                }
                if !focus.is_empty() {
                    self.evaluate(Some(&focus));
                }
            }
            Wire::Remove { sessions } => {
                for id in sessions {
                    if self.sessions.map.get(&id).is_some_and(|s| !s.local) {
                        self.sessions.map.remove(&id);
                        self.sessions.resolved.remove(&id);
                    }
                }
            }
        }
    }

    fn rest(
        &mut self,
        user: &str,
        role: ProjectRole,
        req: RestRequest,
    ) -> Result<Value, RestError> {
        let session = rest_session(user);
        let mut entry = match self.sessions.map.get(&session) {
            Some(s) => s.entry.clone(),
            None => self.new_entry(session.clone(), user, role, Source::Rest),
        };
        {
            let txn = self.doc.transact();
            let ix = index_at(&mut self.sessions.index, self.doc_version, &txn);
            let out = |pointer: &'static str, value: u32, limit: u32| RestError::OutOfRange {
                pointer,
                value,
                limit,
            };
            let sticky = |pointer: &'static str, offset: u32| {
                ix.sticky_at(&txn, offset)
                    .map_err(|e| out(pointer, e.offset, e.length))
            };
            if let Some((anchor, head)) = req.selection {
                let a = sticky("/selection/anchor", anchor)?;
                let h = sticky("/selection/head", head)?;
                if let Some(offset) = req.offset {
                    sticky("/offset", offset)?;
                }
                entry.anchor = Some(a);
                entry.head = Some(h);
            } else if let Some(offset) = req.offset {
                let s = sticky("/offset", offset)?;
                entry.anchor = Some(s.clone());
                entry.head = Some(s);
            }
            if let Some(v) = req.viewport {
                if v.last >= ix.paragraphs() {
                    return Err(out("/viewport/last", v.last, ix.paragraphs() - 1));
                }
                entry.viewport = Some(v);
            }
        }
        entry.role = role;
        if let Some(m) = req.mode {
            entry.mode = m;
        } else if req.kind == RestKind::Edit {
            entry.mode = Mode::Editing;
        }
        if let Some(d) = req.device {
            entry.device = Some(d);
        }
        entry.instance = self.coedit.instance_id.clone();
        entry.last_seen = now_ms();
        self.upsert_local(entry, None);
        // Answered and evaluated even when nothing changed: a REST client's renewal.
        self.sessions.changed.insert(session.clone());
        if req.kind == RestKind::Edit {
            self.typed(user, req.inserted);
        }
        self.evaluate(Some(std::slice::from_ref(&session)));
        let s = &self.sessions.map[&session];
        let r = self
            .sessions
            .resolved
            .get(&session)
            .copied()
            .unwrap_or_default();
        Ok(view(&s.entry, &r))
    }

    /// Every session and every current conflict, resolved now.
    fn snapshot(&mut self) -> Value {
        self.evaluate_resolution_only();
        let mut list: Vec<(&String, &Session)> = self.sessions.map.iter().collect();
        list.sort_by(|a, b| a.0.cmp(b.0));
        let resolved = |id: &String| self.sessions.resolved.get(id).copied().unwrap_or_default();
        let collaborators: Vec<Value> = list
            .iter()
            .map(|(id, s)| view(&s.entry, &resolved(id)))
            .collect();
        let parties: Vec<(&Session, Span)> = list
            .iter()
            .filter(|(_, s)| s.entry.editing())
            .filter_map(|(id, s)| resolved(id).span().map(|sp| (*s, sp)))
            .collect();
        let mut best: HashMap<(String, String), Prediction> = HashMap::new();
        for i in 0..parties.len() {
            for j in i + 1..parties.len() {
                let (a, sa) = parties[i];
                let (b, sb) = parties[j];
                let p = conflicts::predict(
                    &Party {
                        user: &a.entry.user_id,
                        editing: true,
                        span: sa,
                    },
                    &Party {
                        user: &b.entry.user_id,
                        editing: true,
                        span: sb,
                    },
                );
                if let Some(p) = p {
                    let mut pair = [a.entry.user_id.clone(), b.entry.user_id.clone()];
                    pair.sort();
                    let [x, y] = pair;
                    let slot = best.entry((x, y)).or_insert(p);
                    if p.severity > slot.severity {
                        *slot = p;
                    }
                }
            }
        }
        let mut conflicts: Vec<Value> = best
            .into_iter()
            .map(|((a, b), p)| {
                json!({"userIds": [a, b], "severity": p.severity, "reason": p.reason,
                    "paragraph": p.paragraph})
            })
            .collect();
        conflicts.sort_by_key(|c| c["userIds"].to_string());
        json!({"collaborators": collaborators, "conflicts": conflicts})
    }

    fn evaluate_resolution_only(&mut self) {
        let txn = self.doc.transact();
        let ix = index_at(&mut self.sessions.index, self.doc_version, &txn);
        for (id, s) in &self.sessions.map {
            let r = Resolved {
                cursor: s.entry.head.as_ref().and_then(|h| ix.resolve(&txn, h)),
                anchor: s.entry.anchor.as_ref().and_then(|a| ix.resolve(&txn, a)),
            };
            if self.sessions.resolved.get(id) != Some(&r) {
                self.sessions.resolved.insert(id.clone(), r);
                if s.local {
                    self.sessions.moved.insert(id.clone());
                }
            }
        }
    }

    /// Removes sessions from Redis; with `announce`, publishes the departures this call
    /// actually removed (several instances may notice the same dead one).
    fn remove_stored(&self, gone: Vec<(String, String)>, announce: bool) {
        if gone.is_empty() {
            return;
        }
        let mut redis = self.coedit.app.redis.clone();
        let js = self.coedit.app.js.clone();
        let document = self.id.to_string();
        tokio::spawn(async move {
            let ids: Vec<String> = gone.iter().map(|(s, _)| s.clone()).collect();
            let removed = match presence::remove(&mut redis, &document, &ids).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(document, error = %e, "presence not removed from Redis");
                    return;
                }
            };
            if !announce {
                return;
            }
            let left: Vec<Value> = gone
                .iter()
                .zip(removed)
                .filter(|(_, r)| *r)
                .map(|((s, u), _)| json!({"sessionId": s, "userId": u}))
                .collect();
            if left.is_empty() {
                return;
            }
            publish_update(&js, &document, Vec::new(), left).await;
        });
    }

    /// Periodic presence work: expiry, renewals, the dead-instance check, and the coalesced
    /// `presence_update` with the Redis and NATS writes that go with it.
    pub(super) fn presence_tick(&mut self) {
        let config = self.coedit.config.clone();
        let now = Instant::now();
        if self
            .sessions
            .last_sweep
            .is_none_or(|t| now - t >= Duration::from_secs(1).min(config.presence_ttl / 4))
        {
            self.sessions.last_sweep = Some(now);
            let cutoff = now_ms().saturating_sub(config.presence_ttl.as_millis() as u64);
            let stale: Vec<(String, bool)> = self
                .sessions
                .map
                .iter()
                .filter(|(_, s)| s.entry.last_seen < cutoff)
                .map(|(id, s)| (id.clone(), s.local))
                .collect();
            for (id, local) in stale {
                if local {
                    self.remove_local(&id);
                } else {
                    self.sessions.map.remove(&id);
                    self.sessions.resolved.remove(&id);
                }
            }
            let touch = self.touch_every();
            let due: Vec<String> = self
                .sessions
                .map
                .iter()
                .filter(|(_, s)| s.local && now - s.stored_at >= touch)
                .map(|(id, _)| id.clone())
                .collect();
            self.sessions.touched.extend(due);
            self.sessions
                .warned
                .retain(|_, (_, at)| at.elapsed() < config.conflict_interval);
            let minute = Duration::from_secs(60);
            self.sessions
                .typed
                .retain(|_, q| q.back().is_some_and(|(t, _)| now - *t <= minute));
        }
        if self
            .sessions
            .last_alive_check
            .is_none_or(|t| now - t >= config.instance_ttl / 2)
        {
            self.sessions.last_alive_check = Some(now);
            self.check_instances();
        }
        self.flush_presence();
    }

    fn check_instances(&self) {
        let instances: Vec<String> = self
            .sessions
            .map
            .values()
            .filter(|s| !s.local)
            .map(|s| s.entry.instance.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if instances.is_empty() {
            return;
        }
        let mut redis = self.coedit.app.redis.clone();
        let me = self.coedit.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            let Ok(alive) = presence::alive(&mut redis, &instances).await else {
                return;
            };
            let dead: HashSet<String> = instances
                .into_iter()
                .filter(|i| !alive.contains(i))
                .collect();
            if !dead.is_empty()
                && let Some(h) = me.handle_of(&id)
            {
                h.send(Command::Presence(PresenceCommand::DeadInstances(dead)))
                    .await;
            }
        });
    }

    fn flush_presence(&mut self) {
        let s = &mut self.sessions;
        if s.changed.is_empty() && s.moved.is_empty() && s.touched.is_empty() && s.left.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut publish: Vec<Value> = Vec::new();
        let mut store: Vec<Entry> = Vec::new();
        let changed = std::mem::take(&mut s.changed);
        let moved = std::mem::take(&mut s.moved);
        let touched = std::mem::take(&mut s.touched);
        let left = std::mem::take(&mut s.left);
        let mut ids: Vec<&String> = changed.union(&moved).collect();
        ids.sort();
        for id in ids {
            if let Some(sess) = s.map.get(id).filter(|x| x.local) {
                let r = s.resolved.get(id).copied().unwrap_or_default();
                publish.push(view(&sess.entry, &r));
            }
        }
        for id in changed.union(&touched) {
            if let Some(sess) = s.map.get_mut(id).filter(|x| x.local) {
                sess.stored_at = now;
                store.push(sess.entry.clone());
            }
        }
        let left_sessions: Vec<String> = left.iter().map(|(s, _)| s.clone()).collect();
        let left_view: Vec<Value> = left
            .iter()
            .map(|(s, u)| json!({"sessionId": s, "userId": u}))
            .collect();
        let mut redis = self.coedit.app.redis.clone();
        let js = self.coedit.app.js.clone();
        let nats = self.coedit.app.nats.clone();
        let document = self.id.to_string();
        let instance = self.coedit.instance_id.clone();
        let ttl = self.coedit.config.presence_ttl;
        tokio::spawn(async move {
            let subject = presence::presence_subject(&document);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(INSTANCE_HEADER, instance.as_str());
            if !store.is_empty() {
                let wire = Wire::Set {
                    entries: store.clone(),
                };
                let payload = Bytes::from(serde_json::to_vec(&wire).expect("wire serializes"));
                let _ = nats
                    .publish_with_headers(subject.clone(), headers.clone(), payload)
                    .await;
                if let Err(e) = presence::store(&mut redis, &document, &store, ttl).await {
                    tracing::warn!(document, error = %e, "presence not stored in Redis");
                }
            }
            if !left_sessions.is_empty() {
                let wire = Wire::Remove {
                    sessions: left_sessions.clone(),
                };
                let payload = Bytes::from(serde_json::to_vec(&wire).expect("wire serializes"));
                let _ = nats.publish_with_headers(subject, headers, payload).await;
                if let Err(e) = presence::remove(&mut redis, &document, &left_sessions).await {
                    tracing::warn!(document, error = %e, "presence not removed from Redis");
                }
            }
            if !publish.is_empty() || !left_view.is_empty() {
                publish_update(&js, &document, publish, left_view).await;
            }
        });
    }

    /// The document unloads: its own sessions end now (their clients were closed).
    pub(super) fn presence_unload(&mut self) {
        let own: Vec<String> = self
            .sessions
            .map
            .iter()
            .filter(|(_, s)| s.local)
            .map(|(id, _)| id.clone())
            .collect();
        for id in own {
            self.remove_local(&id);
        }
        self.flush_presence();
    }
}

async fn publish_update(
    js: &async_nats::jetstream::Context,
    document: &str,
    collaborators: Vec<Value>,
    left: Vec<Value>,
) {
    let data = json!({
        "kind": "presence",
        "documentId": document,
        "collaborators": collaborators,
        "left": left,
    });
    let channel = Channel::new(ChannelKind::Document, document.to_string());
    if let Err(e) = channels::publish(
        js,
        &channel,
        MessageType::PresenceUpdate,
        &data,
        uuid::Uuid::new_v4().to_string(),
    )
    .await
    {
        tracing::warn!(document, error = %e, "presence_update not published");
    }
}
