//! One loaded document: a task that alone owns its `yrs::Doc`, its awareness states and its
//! connections on this instance, and that everything else talks to through a channel. No
//! transaction is ever held across an `.await`: the task applies, encodes and hands bytes to
//! the connections' queues, and anything slow (JetStream appends, compaction, role checks)
//! happens in other tasks that answer with a command.
//!
//! - Updates from writers are checked here (would they change the document? would it grow
//!   past the limit?), appended to the stream by the connection, and applied and broadcast
//!   only once acknowledged ([`Command::Accepted`]). Updates from read-only users that would
//!   change the document are dropped and answered with the permission-denied message.
//! - The task follows its stream subject with an ordered consumer: updates accepted by other
//!   instances arrive there and are applied and broadcast; its own arrive there too and are
//!   recognised by sequence. Attribution is counted on that path, once, by the instance that
//!   accepted the update (its `Inkwire-Instance` header).
//! - Awareness is relayed to every local connection (the sender included, which keeps its
//!   30-second watchdog fed) and to the other instances over core NATS
//!   (`coedit.awareness.{documentId}`); a connection's states are removed when it leaves.
//! - Compaction runs every `compact_interval` when something changed; with no connection
//!   for `idle_unload`, the document is compacted and unloaded (the task ends).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use inkwire_shared::membership::{self, ProjectRole};
use tokio::sync::{mpsc, oneshot};
use yrs::ClientID;
use yrs::sync::{Awareness, AwarenessUpdate};
use yrs::{Doc, ReadTxn, StateVector, Transact};

use crate::attribution::{LeaveReason, Record};
use crate::protocol::{self, Incoming, Measure};
use crate::storage::{AUTHOR_HEADER, Follower, Loaded};
use crate::{Coedit, DocCell};

pub mod sessions;

/// Header naming the instance that accepted an update or sent an awareness message.
pub const INSTANCE_HEADER: &str = "Inkwire-Instance";

/// Header of an awareness query between instances: a document that just loaded asks the
/// other instances for the states of their connections.
pub const QUERY_HEADER: &str = "Inkwire-Awareness-Query";

/// Core NATS subject of a document's awareness between instances.
pub fn awareness_subject(document: &str) -> String {
    format!("coedit.awareness.{document}")
}

/// What a connection's queue carries.
#[derive(Debug)]
pub enum Out {
    Frame(Bytes),
    /// Close with this code and reason.
    Close(u16, String),
}

/// The verdict on an update.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Append it, then report [`Command::Accepted`].
    Store,
    /// Nothing new: drop it.
    Drop,
    /// From a read-only user and it would change the document (the denial was sent).
    Denied,
    /// The document would grow past its limit.
    TooLarge,
}

/// What the task is told.
pub enum Command {
    Join {
        conn: Conn,
        reply: oneshot::Sender<bool>,
    },
    Leave {
        id: u64,
        reason: LeaveReason,
    },
    Frame {
        id: u64,
        msg: Incoming,
        raw: Bytes,
    },
    Update {
        id: u64,
        update: Bytes,
        reply: oneshot::Sender<Verdict>,
    },
    Accepted {
        sequence: u64,
        update: Bytes,
    },
    /// Re-check the roles of the connections (of one user, or all).
    Recheck {
        user: Option<String>,
    },
    /// Roles found by a re-check: `None` is no access any more.
    Roles(Vec<(u64, Option<ProjectRole>)>),
    Compacted {
        covered: u64,
        ok: bool,
    },
    /// Compact now and answer (tests, shutdown).
    CompactNow(oneshot::Sender<()>),
    /// Presence: REST changes, snapshots, and the answers of background checks.
    Presence(sessions::PresenceCommand),
}

/// A connection as the document sees it.
pub struct Conn {
    pub id: u64,
    pub user: String,
    pub role: ProjectRole,
    pub out: mpsc::Sender<Out>,
}

/// Can `role` change documents?
pub fn writes(role: ProjectRole) -> bool {
    matches!(role, ProjectRole::Owner | ProjectRole::Editor)
}

/// A loaded document as handlers hold it.
#[derive(Clone)]
pub struct DocHandle {
    pub id: Arc<str>,
    pub project: Arc<str>,
    tx: mpsc::Sender<Command>,
    /// Connections admitted (counted before the upgrade, against the per-document limit).
    pub admitted: Arc<AtomicUsize>,
}

impl DocHandle {
    pub async fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).await.is_ok()
    }

    /// Counts a connection unless the document is full.
    pub fn admit(&self, max: usize) -> bool {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn release(&self) {
        let _ = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
    }
}

struct ConnState {
    user: String,
    role: ProjectRole,
    out: mpsc::Sender<Out>,
    /// Awareness client ids this connection announced.
    clients: HashSet<ClientID>,
}

struct Actor {
    coedit: Coedit,
    id: Arc<str>,
    project: Arc<str>,
    cell: DocCell,
    doc: Doc,
    awareness: Awareness,
    conns: HashMap<u64, ConnState>,
    /// Highest sequence the follower delivered (everything up to it is applied).
    followed: u64,
    /// Sequences above `followed` applied from an acknowledgement, with what they did.
    applied: BTreeSet<u64>,
    measured: HashMap<u64, Measure>,
    /// What the last stored snapshot covers.
    compacted: u64,
    compacting: bool,
    last_compaction: Instant,
    /// Encoded size of the document (exact after load and compaction, estimated between).
    size: usize,
    empty_since: Option<Instant>,
    last_recheck: Instant,
    last_sweep: Instant,
    follower: Follower,
    sessions: sessions::Sessions,
    /// Bumped whenever an update is applied to `doc`: presence reuses the text it read for
    /// positions until the document changes.
    doc_version: u64,
}

/// Starts the task of a loaded document and returns its handle.
pub fn spawn(coedit: Coedit, id: &str, project: &str, loaded: Loaded, cell: DocCell) -> DocHandle {
    let (tx, rx) = mpsc::channel(1024);
    let handle = DocHandle {
        id: id.into(),
        project: project.into(),
        tx,
        admitted: Arc::new(AtomicUsize::new(0)),
    };
    let covered = loaded.head.as_ref().map_or(0, |h| h.head.covered);
    let actor = Actor {
        coedit,
        id: handle.id.clone(),
        project: handle.project.clone(),
        cell,
        doc: loaded.doc,
        awareness: Awareness::new(Doc::new()),
        conns: HashMap::new(),
        followed: loaded.sequence,
        applied: BTreeSet::new(),
        measured: HashMap::new(),
        compacted: covered,
        compacting: false,
        last_compaction: Instant::now(),
        size: loaded.size,
        empty_since: Some(Instant::now()),
        last_recheck: Instant::now(),
        last_sweep: Instant::now(),
        follower: loaded.follower,
        sessions: sessions::Sessions::default(),
        doc_version: 0,
    };
    tokio::spawn(actor.run(rx));
    handle
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut awareness_sub = match self
            .coedit
            .app
            .nats
            .subscribe(awareness_subject(&self.id))
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(document = %self.id, error = %e, "awareness across instances unavailable");
                None
            }
        };
        if awareness_sub.is_some() {
            self.query_remote_awareness();
        }
        // Presence: follow the other instances' changes first, then read what Redis holds,
        // so nothing announced in between is missed.
        let mut presence_sub = match self
            .coedit
            .app
            .nats
            .subscribe(crate::presence::presence_subject(&self.id))
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(document = %self.id, error = %e, "presence across instances unavailable");
                None
            }
        };
        // Inline, before any command: a snapshot asked right after loading must see them.
        let mut redis = self.coedit.app.redis.clone();
        let ttl = self.coedit.config.presence_ttl;
        match tokio::time::timeout(
            Duration::from_secs(2),
            crate::presence::load(&mut redis, &self.id, ttl),
        )
        .await
        {
            Ok(Ok(entries)) => {
                self.presence_command(sessions::PresenceCommand::Loaded(entries));
            }
            Ok(Err(e)) => {
                tracing::warn!(document = %self.id, error = %e, "stored presence not read")
            }
            Err(_) => tracing::warn!(document = %self.id, "reading stored presence timed out"),
        }
        let mut presence_tick = tokio::time::interval(self.coedit.config.presence_interval);
        presence_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tick_every = (self.coedit.config.idle_unload / 4)
            .min(self.coedit.config.compact_interval / 2)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.coedit.shutdown.clone();
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                msg = self.follower.next() => match msg {
                    Some(Ok(msg)) => self.followed_message(&msg),
                    Some(Err(e)) => tracing::warn!(document = %self.id, error = %e, "following the update subject"),
                    None => {
                        tracing::warn!(document = %self.id, "update follower ended; unloading");
                        break;
                    }
                },
                msg = async {
                    match awareness_sub.as_mut() {
                        Some(s) => s.next().await,
                        None => futures::future::pending().await,
                    }
                } => if let Some(msg) = msg {
                    self.remote_awareness(&msg);
                },
                msg = async {
                    match presence_sub.as_mut() {
                        Some(s) => s.next().await,
                        None => futures::future::pending().await,
                    }
                } => if let Some(msg) = msg {
                    self.remote_presence(&msg);
                },
                _ = presence_tick.tick() => self.presence_tick(),
                _ = tick.tick() => {
                    if self.tick() {
                        break;
                    }
                }
                _ = shutdown.wait() => break,
            }
        }
        // Unload: leave the registry first (new connections load afresh), then compact.
        self.coedit.forget(&self.id, &self.cell);
        rx.close();
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                Command::Join { reply, .. } => {
                    let _ = reply.send(false);
                }
                Command::Accepted { sequence, update } => self.accepted(sequence, &update),
                Command::CompactNow(reply) => {
                    let _ = reply.send(());
                }
                _ => {}
            }
        }
        for (_, conn) in self.conns.drain() {
            let _ = conn
                .out
                .try_send(Out::Close(1012, "document unloaded; reconnect".into()));
        }
        self.presence_unload();
        if self.followed > self.compacted {
            let state = self.state();
            if let Err(e) = self
                .coedit
                .store
                .compact(&self.id, &state, self.followed)
                .await
            {
                tracing::warn!(document = %self.id, error = %e, "compaction on unload failed; the updates stay in the stream");
            }
        }
        tracing::debug!(document = %self.id, "unloaded");
    }

    fn state(&self) -> Vec<u8> {
        self.doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    /// Periodic work; `true` when the document should unload.
    fn tick(&mut self) -> bool {
        let config = self.coedit.config.clone();
        if self.conns.is_empty()
            && !self.sessions.has_local()
            && self
                .empty_since
                .is_some_and(|t| t.elapsed() >= config.idle_unload)
        {
            return true;
        }
        if !self.compacting
            && self.followed > self.compacted
            && self.last_compaction.elapsed() >= config.compact_interval
        {
            self.start_compaction(None);
        }
        if self.last_recheck.elapsed() >= config.recheck_interval && !self.conns.is_empty() {
            self.recheck(None);
        }
        if self.last_sweep.elapsed() >= Duration::from_secs(10) {
            self.sweep_awareness();
        }
        // Measurements of our own updates are claimed within moments by the follower.
        if self.measured.len() > 10_000 {
            let followed = self.followed;
            self.measured.retain(|s, _| *s > followed);
        }
        false
    }

    /// Forgets awareness states of other instances' clients that were not renewed for a
    /// minute (clients renew every 15 s; an instance that died never sent their removal),
    /// and drops removal tombstones once there are many, so the map stays bounded.
    fn sweep_awareness(&mut self) {
        self.last_sweep = Instant::now();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let local: HashSet<ClientID> = self
            .conns
            .values()
            .flat_map(|c| c.clients.iter().copied())
            .collect();
        let mut tombstones = 0;
        let mut stale = Vec::new();
        for (id, state) in self.awareness.iter() {
            if state.data.is_none() {
                tombstones += 1;
            } else if !local.contains(&id) && now.saturating_sub(state.last_updated) > 60_000 {
                stale.push(id);
            }
        }
        for id in stale {
            self.awareness.remove_state(id);
            tombstones += 1;
        }
        if tombstones > 1000 {
            let mut fresh = Awareness::new(Doc::new());
            if let Ok(update) = self.awareness.update() {
                let _ = fresh.apply_update(update);
            }
            self.awareness = fresh;
        }
    }

    fn start_compaction(&mut self, done: Option<oneshot::Sender<()>>) {
        self.compacting = true;
        self.last_compaction = Instant::now();
        let state = self.state();
        self.size = state.len();
        let covered = self.followed;
        let store = self.coedit.store.clone();
        let id = self.id.clone();
        let me = self.coedit.clone();
        tokio::spawn(async move {
            let ok = match store.compact(&id, &state, covered).await {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(document = %id, error = %e, "compaction failed; retried later");
                    false
                }
            };
            if let Some(h) = me.handle_of(&id) {
                h.send(Command::Compacted { covered, ok }).await;
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        });
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Join { conn, reply } => self.join(conn, reply),
            Command::Leave { id, reason } => self.leave(id, reason),
            Command::Frame { id, msg, raw } => self.frame(id, msg, raw),
            Command::Update { id, update, reply } => {
                let verdict = self.verdict(id, &update);
                let _ = reply.send(verdict);
            }
            Command::Accepted { sequence, update } => self.accepted(sequence, &update),
            Command::Recheck { user } => self.recheck(user),
            Command::Roles(roles) => self.roles(roles),
            Command::Compacted { covered, ok } => {
                self.compacting = false;
                if ok {
                    self.compacted = self.compacted.max(covered);
                }
            }
            Command::Presence(cmd) => self.presence_command(cmd),
            Command::CompactNow(reply) => {
                if self.compacting || self.followed <= self.compacted {
                    let _ = reply.send(());
                } else {
                    self.start_compaction(Some(reply));
                }
            }
        }
    }

    fn send(&mut self, id: u64, frame: Bytes) {
        let full = match self.conns.get(&id) {
            Some(c) => c.out.try_send(Out::Frame(frame)).is_err(),
            None => false,
        };
        if full {
            self.too_slow(id);
        }
    }

    fn broadcast(&mut self, frame: Bytes) {
        let mut slow = Vec::new();
        for (id, c) in &self.conns {
            if c.out.try_send(Out::Frame(frame.clone())).is_err() {
                slow.push(*id);
            }
        }
        for id in slow {
            self.too_slow(id);
        }
    }

    fn too_slow(&mut self, id: u64) {
        // Dropping the queue's sender ends the connection's writer, which closes it.
        tracing::debug!(document = %self.id, connection = id, "send queue full; closing");
        self.leave(id, LeaveReason::Closed);
    }

    fn join(&mut self, conn: Conn, reply: oneshot::Sender<bool>) {
        let step1 = protocol::sync_step1(&self.doc);
        let aw = protocol::awareness_all(&self.awareness);
        let record = Record::Joined {
            document: self.id.to_string(),
            project: self.project.to_string(),
            user: conn.user.clone(),
            client: format!("{}-{}", self.coedit.instance_id, conn.id),
            role: conn.role,
        };
        self.conns.insert(
            conn.id,
            ConnState {
                user: conn.user,
                role: conn.role,
                out: conn.out,
                clients: HashSet::new(),
            },
        );
        self.empty_since = None;
        let _ = reply.send(true);
        // One message per frame: step 1, then the awareness states.
        self.send(conn.id, step1.into());
        if let Some(aw) = aw {
            self.send(conn.id, aw.into());
        }
        self.coedit.attribution.record(record);
    }

    fn leave(&mut self, id: u64, reason: LeaveReason) {
        self.connection_presence_gone(id);
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        if !conn.clients.is_empty() {
            for c in &conn.clients {
                self.awareness.remove_state(*c);
            }
            if let Ok(update) = self
                .awareness
                .update_with_clients(conn.clients.iter().copied())
            {
                let frame: Bytes = protocol::awareness(update).into();
                self.broadcast(frame.clone());
                self.publish_awareness(frame);
            }
        }
        if self.conns.is_empty() {
            self.empty_since = Some(Instant::now());
        }
        self.coedit.attribution.record(Record::Left {
            document: self.id.to_string(),
            project: self.project.to_string(),
            user: conn.user,
            client: format!("{}-{id}", self.coedit.instance_id),
            reason,
        });
    }

    fn frame(&mut self, id: u64, msg: Incoming, raw: Bytes) {
        match msg {
            Incoming::SyncStep1(sv) => {
                let step2 = protocol::sync_step2(&self.doc, &sv);
                self.send(id, step2.into());
            }
            Incoming::Awareness(update) => self.local_awareness(id, update, raw),
            Incoming::QueryAwareness => {
                let frame = protocol::awareness_all(&self.awareness)
                    .unwrap_or_else(|| protocol::KEEPALIVE.to_vec());
                self.send(id, frame.into());
            }
            Incoming::Update(_) | Incoming::Auth => {}
        }
    }

    fn local_awareness(&mut self, id: u64, update: AwarenessUpdate, raw: Bytes) {
        if !self.conns.contains_key(&id) {
            return;
        }
        // y-websocket sends on every awareness change, its peers' included, so a connection
        // echoes the states the server relayed to it. Only a state newer than the one known
        // is the connection's own: the first connection to send a client's fresh state owns
        // that client (for removal on leave, and for presence, which must not put one
        // user's cursor under another user's name).
        let mut own: Vec<(ClientID, String)> = Vec::new();
        for (client, entry) in &update.clients {
            let fresh = self
                .awareness
                .meta(*client)
                .is_none_or(|(clock, _)| entry.clock > clock);
            if !fresh {
                continue;
            }
            let owner = self
                .conns
                .iter()
                .find(|(_, c)| c.clients.contains(client))
                .map(|(cid, _)| *cid);
            if owner.is_some_and(|o| o != id) {
                continue;
            }
            let conn = self.conns.get_mut(&id).expect("checked above");
            if &*entry.json == "null" {
                conn.clients.remove(client);
            } else if conn.clients.len() < 64 {
                conn.clients.insert(*client);
            } else {
                continue;
            }
            own.push((*client, entry.json.to_string()));
        }
        if let Err(e) = self.awareness.apply_update(update) {
            tracing::debug!(document = %self.id, error = %e, "awareness update not applied");
        }
        self.broadcast(raw.clone());
        self.publish_awareness(raw);
        if !own.is_empty() {
            self.awareness_presence(id, &own);
        }
    }

    fn publish_awareness(&self, frame: Bytes) {
        let nats = self.coedit.app.nats.clone();
        let subject = awareness_subject(&self.id);
        let mut headers = HeaderMap::new();
        headers.insert(INSTANCE_HEADER, self.coedit.instance_id.as_str());
        tokio::spawn(async move {
            let _ = nats.publish_with_headers(subject, headers, frame).await;
        });
    }

    fn query_remote_awareness(&self) {
        let nats = self.coedit.app.nats.clone();
        let subject = awareness_subject(&self.id);
        let mut headers = HeaderMap::new();
        headers.insert(INSTANCE_HEADER, self.coedit.instance_id.as_str());
        headers.insert(QUERY_HEADER, "1");
        tokio::spawn(async move {
            let _ = nats
                .publish_with_headers(subject, headers, Bytes::new())
                .await;
        });
    }

    fn remote_awareness(&mut self, msg: &async_nats::Message) {
        let from = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(INSTANCE_HEADER))
            .map(|v| v.as_str().to_string());
        if from.as_deref() == Some(self.coedit.instance_id.as_str()) {
            return;
        }
        if msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(QUERY_HEADER).is_some())
        {
            // Another instance loaded the document: tell it our connections' states.
            let ours: Vec<ClientID> = self
                .conns
                .values()
                .flat_map(|c| c.clients.iter().copied())
                .collect();
            if !ours.is_empty()
                && let Ok(update) = self.awareness.update_with_clients(ours)
            {
                self.publish_awareness(protocol::awareness(update).into());
            }
            return;
        }
        let Ok(Incoming::Awareness(update)) = protocol::decode_frame(&msg.payload) else {
            return;
        };
        if self.awareness.apply_update(update).is_ok() {
            self.broadcast(msg.payload.clone());
        }
    }

    fn verdict(&mut self, id: u64, update: &[u8]) -> Verdict {
        let Some(conn) = self.conns.get(&id) else {
            return Verdict::Drop;
        };
        let writer = writes(conn.role);
        if !protocol::would_change(&self.doc, update) {
            return Verdict::Drop;
        }
        if !writer {
            self.send(
                id,
                protocol::permission_denied("read-only: your role cannot change this document")
                    .into(),
            );
            return Verdict::Denied;
        }
        if self.size + update.len() > self.coedit.config.max_document_bytes {
            return Verdict::TooLarge;
        }
        Verdict::Store
    }

    /// An update this instance appended (acknowledged at `sequence`).
    fn accepted(&mut self, sequence: u64, update: &[u8]) {
        if sequence <= self.followed || self.applied.contains(&sequence) {
            return;
        }
        match protocol::apply_measured(&self.doc, update) {
            Ok(m) => {
                self.doc_version += 1;
                self.applied.insert(sequence);
                self.measured.insert(sequence, m);
                self.size += update.len();
                self.broadcast(protocol::update(update).into());
                self.document_changed(None, 0);
            }
            Err(e) => {
                tracing::warn!(document = %self.id, sequence, error = %e, "stored update does not apply");
            }
        }
    }

    /// An update from the stream subject (any instance's, ours included).
    fn followed_message(&mut self, msg: &async_nats::jetstream::Message) {
        let Ok(info) = msg.info() else {
            return;
        };
        let sequence = info.stream_sequence;
        if sequence <= self.followed {
            return;
        }
        self.followed = sequence;
        let headers = msg.headers.as_ref();
        let ours = headers
            .and_then(|h| h.get(INSTANCE_HEADER))
            .is_some_and(|v| v.as_str() == self.coedit.instance_id);
        let author = headers
            .and_then(|h| h.get(AUTHOR_HEADER))
            .map(|v| v.as_str().to_string());
        // Words count only where the update was accepted, and the paragraph of another
        // instance's update only matters when someone else edited here just before (a
        // collision): otherwise the text is not read.
        let text = ours
            || author
                .as_deref()
                .is_some_and(|a| self.other_author_recently(a));
        let measure = if self.applied.remove(&sequence) {
            self.measured.remove(&sequence)
        } else {
            match protocol::apply_measured_with(&self.doc, &msg.payload, text) {
                Ok(m) => {
                    self.doc_version += 1;
                    self.size += msg.payload.len();
                    self.broadcast(protocol::update(&msg.payload).into());
                    Some(m)
                }
                Err(e) => {
                    tracing::warn!(document = %self.id, sequence, error = %e, "stored update does not apply; skipped");
                    None
                }
            }
        };
        // Anything below the follower's position is applied.
        while let Some(&s) = self.applied.first() {
            if s > self.followed {
                break;
            }
            self.applied.remove(&s);
            self.measured.remove(&s);
        }
        if let (Some(author), Some(m)) = (author.as_deref(), measure.as_ref()) {
            self.edit_for_collisions(author, m.paragraph, ours);
            self.document_changed(Some(author), m.inserted);
        }
        if let (true, Some(author), Some(m)) = (ours, author, measure) {
            self.coedit.attribution.record(Record::Edit {
                document: self.id.to_string(),
                project: self.project.to_string(),
                user: author,
                measure: m,
                at: time::OffsetDateTime::now_utc(),
            });
        }
    }

    fn recheck(&mut self, user: Option<String>) {
        self.last_recheck = Instant::now();
        let targets: Vec<(u64, String)> = self
            .conns
            .iter()
            .filter(|(_, c)| user.as_ref().is_none_or(|u| *u == c.user))
            .map(|(id, c)| (*id, c.user.clone()))
            .collect();
        let rest_users: Vec<String> = self
            .sessions
            .rest_users()
            .into_iter()
            .filter(|u| user.as_ref().is_none_or(|x| x == u))
            .collect();
        if targets.is_empty() && rest_users.is_empty() {
            return;
        }
        let mut redis = self.coedit.app.redis.clone();
        let me = self.coedit.clone();
        let id = self.id.clone();
        let project = self.project.clone();
        tokio::spawn(async move {
            let checked = tokio::time::timeout(Duration::from_secs(5), async {
                let now_in = membership::project_of_document(&mut redis, &id).await?;
                let mut roles = Vec::new();
                for (conn, user) in targets {
                    let role = if now_in.as_deref() == Some(&*project) {
                        membership::role_of(&mut redis, &project, &user).await?
                    } else {
                        None
                    };
                    roles.push((conn, role));
                }
                let mut rest = Vec::new();
                for user in rest_users {
                    let role = if now_in.as_deref() == Some(&*project) {
                        membership::role_of(&mut redis, &project, &user).await?
                    } else {
                        None
                    };
                    rest.push((user, role));
                }
                Ok::<_, redis::RedisError>((roles, rest))
            })
            .await;
            match checked {
                Ok(Ok((roles, rest))) => {
                    if let Some(h) = me.handle_of(&id) {
                        h.send(Command::Roles(roles)).await;
                        if !rest.is_empty() {
                            h.send(Command::Presence(sessions::PresenceCommand::RestRoles(
                                rest,
                            )))
                            .await;
                        }
                    }
                }
                // A failed check keeps the connections until the next one.
                Ok(Err(e)) => tracing::warn!(document = %id, error = %e, "role re-check failed"),
                Err(_) => tracing::warn!(document = %id, "role re-check timed out"),
            }
        });
    }

    fn roles(&mut self, roles: Vec<(u64, Option<ProjectRole>)>) {
        for (id, role) in roles {
            match role {
                Some(role) => {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.role = role;
                    }
                    self.connection_role(id, role);
                }
                None => {
                    if let Some(c) = self.conns.get(&id) {
                        // 44xx: y-websocket 3.1 stops reconnecting.
                        let _ = c.out.try_send(Out::Close(
                            4403,
                            "access to this document was revoked".into(),
                        ));
                    }
                    self.leave(id, LeaveReason::Kicked);
                }
            }
        }
    }
}
