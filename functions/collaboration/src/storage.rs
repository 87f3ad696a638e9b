//! Where a document's content lives: the `YDOC` JetStream stream, nothing else.
//!
//! - `ydoc.u.{documentId}`: every accepted Yjs update (v1), in order, with its author's user
//!   id in the `Inkwire-Author` header and a `Nats-Msg-Id` so that a retried append is stored
//!   once. An update is appended and acknowledged before any client sees it.
//! - `ydoc.c.{documentId}`: snapshot chunks (the merged state, split below the server's
//!   `max_payload`).
//! - `ydoc.h.{documentId}`: snapshot heads, JSON: the stream sequence the snapshot covers
//!   (every update up to it is in the snapshot) and the sequences of its chunks.
//!
//! **Why snapshots live in JetStream too** (rather than in Redis or an object store): a
//! snapshot replaces updates that compaction purges, so it must be exactly as durable and as
//! replicated as the updates themselves — Redis holds rebuildable projections in this design
//! and may run without persistence; and a head is written with
//! `Nats-Expected-Last-Subject-Sequence`, a compare-and-set, so two instances compacting the
//! same document at once cannot regress it (the loser's chunks are deleted). The object store
//! would give neither the compare-and-set nor the single stream to provision.
//!
//! **Loading** = the latest head, its chunks, then the updates after the sequence it covers,
//! read by an ordered consumer that the loaded document keeps to follow the subject (that is
//! how instances see each other's updates). Any failure is an error — never an empty
//! document — and the connection is refused.
//!
//! **Compaction** writes a new head, then purges one generation behind: the updates the
//! *previous* head covered, the previous head's older chunks, heads but the last two. A
//! loader that read the previous head, or an instance following the subject a little behind,
//! still finds every update it needs; a loader that raced two compactions sees the head move
//! and starts over.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::context::Context;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use futures::StreamExt;
use inkwire_shared::membership::is_valid_id;
use inkwire_shared::subjects::{YDOC_PREFIX, YDOC_STREAM};
use serde::{Deserialize, Serialize};
use yrs::updates::decoder::Decode;
use yrs::{Doc, ReadTxn, StateVector, Transact, Update};

/// The header that names an update's author (a user id).
pub const AUTHOR_HEADER: &str = "Inkwire-Author";

/// How many times a load starts over when a compaction moved the head under it.
const LOAD_ATTEMPTS: usize = 5;

/// What went wrong talking to the stream.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid document id")]
    InvalidId,
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("stored snapshot of {0} is unreadable: {1}")]
    Corrupt(String, String),
    #[error("the snapshot of {0} kept moving while loading")]
    Unstable(String),
}

fn js_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::JetStream(e.to_string())
}

/// `ydoc.u.{id}`: the updates of a document.
pub fn update_subject(document: &str) -> String {
    format!("{YDOC_PREFIX}.u.{document}")
}
fn chunk_subject(document: &str) -> String {
    format!("{YDOC_PREFIX}.c.{document}")
}
fn head_subject(document: &str) -> String {
    format!("{YDOC_PREFIX}.h.{document}")
}

/// A snapshot head.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Head {
    /// Every update with a stream sequence up to this one is in the snapshot.
    pub covered: u64,
    /// Stream sequences of the chunks, in order.
    pub chunks: Vec<u64>,
    /// Bytes of the snapshot.
    pub size: u64,
    /// What the previous head covered (purged once this head is written).
    #[serde(default)]
    pub previous_covered: u64,
    /// The previous head's first chunk (older chunks are purged).
    #[serde(default)]
    pub previous_first_chunk: u64,
}

/// A head as stored: its own sequence on the head subject.
#[derive(Debug, Clone, Default)]
pub struct StoredHead {
    pub sequence: u64,
    pub head: Head,
}

/// One update read from the stream.
#[derive(Debug, Clone)]
pub struct StoredUpdate {
    pub sequence: u64,
    pub author: Option<String>,
    pub update: Bytes,
}

impl StoredUpdate {
    fn from_message(msg: &async_nats::jetstream::Message) -> Option<StoredUpdate> {
        let info = msg.info().ok()?;
        Some(StoredUpdate {
            sequence: info.stream_sequence,
            author: author_of(msg.headers.as_ref()),
            update: msg.payload.clone(),
        })
    }
}

fn author_of(headers: Option<&HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get(AUTHOR_HEADER))
        .map(|v| v.as_str().to_string())
}

/// The follower of a document's update subject.
pub type Follower = async_nats::jetstream::consumer::pull::Ordered;

/// A document as loaded: its state, what it covers, and the follower positioned after it.
pub struct Loaded {
    pub doc: Doc,
    /// The head the load started from.
    pub head: Option<StoredHead>,
    /// The last update sequence applied (or the head's covered sequence).
    pub sequence: u64,
    /// Bytes of the encoded state after the load.
    pub size: usize,
    /// Updates read after the snapshot (for attribution replay).
    pub updates: Vec<StoredUpdate>,
    pub follower: Follower,
}

/// The YDOC stream.
#[derive(Clone)]
pub struct Store {
    js: Context,
    stream: Stream,
}

impl Store {
    pub async fn open(js: &Context) -> Result<Store, StorageError> {
        let stream = js.get_stream(YDOC_STREAM).await.map_err(js_err)?;
        Ok(Store {
            js: js.clone(),
            stream,
        })
    }

    /// Appends `update` by `author`; returns its stream sequence once JetStream acknowledged
    /// it. `msg_id` makes a retried append land once.
    pub async fn append(
        &self,
        document: &str,
        author: &str,
        instance: &str,
        msg_id: &str,
        update: Bytes,
    ) -> Result<u64, StorageError> {
        if !is_valid_id(document) {
            return Err(StorageError::InvalidId);
        }
        let mut last = None;
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            let msg = PublishMessage::build()
                .payload(update.clone())
                .message_id(msg_id)
                .header(AUTHOR_HEADER, author)
                .header(crate::document::INSTANCE_HEADER, instance);
            match self.js.send_publish(update_subject(document), msg).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => return Ok(ack.sequence),
                    Err(e) => last = Some(js_err(e)),
                },
                Err(e) => last = Some(js_err(e)),
            }
        }
        Err(last.expect("three attempts"))
    }

    /// The latest snapshot head of `document`, if any.
    pub async fn head(&self, document: &str) -> Result<Option<StoredHead>, StorageError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&head_subject(document))
            .await
        {
            Ok(msg) => {
                let head: Head = serde_json::from_slice(&msg.payload)
                    .map_err(|e| StorageError::Corrupt(document.into(), e.to_string()))?;
                Ok(Some(StoredHead {
                    sequence: msg.sequence,
                    head,
                }))
            }
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                Ok(None)
            }
            Err(e) => Err(js_err(e)),
        }
    }

    /// The snapshot bytes of `head`; `None` when a chunk is gone (a later compaction purged
    /// it: start over).
    async fn snapshot(&self, head: &Head) -> Result<Option<Vec<u8>>, StorageError> {
        let mut out = Vec::with_capacity(head.size as usize);
        for seq in &head.chunks {
            match self.stream.get_raw_message(*seq).await {
                Ok(msg) => out.extend_from_slice(&msg.payload),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(js_err(e)),
            }
        }
        Ok(Some(out))
    }

    /// Loads `document`: latest snapshot plus the updates after it. Never an empty document
    /// in place of stored state: every failure is an error.
    pub async fn load(&self, document: &str) -> Result<Loaded, StorageError> {
        if !is_valid_id(document) {
            return Err(StorageError::InvalidId);
        }
        for _ in 0..LOAD_ATTEMPTS {
            let head = self.head(document).await?;
            let doc = Doc::new();
            let covered = head.as_ref().map_or(0, |h| h.head.covered);
            if let Some(h) = &head {
                let Some(state) = self.snapshot(&h.head).await? else {
                    continue;
                };
                let update = Update::decode_v1(&state)
                    .map_err(|e| StorageError::Corrupt(document.into(), e.to_string()))?;
                doc.transact_mut()
                    .apply_update(update)
                    .map_err(|e| StorageError::Corrupt(document.into(), e.to_string()))?;
            }
            let (follower, updates) = self.read_after(document, covered).await?;
            let mut sequence = covered;
            for u in &updates {
                sequence = sequence.max(u.sequence);
                apply_stored(&doc, document, u);
            }
            // A compaction that moved the head meanwhile may have purged updates between
            // the head we read and what the consumer delivered: start over.
            let now = self.head(document).await?;
            if now.as_ref().map(|h| h.sequence) != head.as_ref().map(|h| h.sequence)
                && now.as_ref().map(|h| h.head.previous_covered) > Some(covered)
            {
                continue;
            }
            let size = doc
                .transact()
                .encode_state_as_update_v1(&StateVector::default())
                .len();
            return Ok(Loaded {
                doc,
                head,
                sequence,
                size,
                updates,
                follower,
            });
        }
        Err(StorageError::Unstable(document.into()))
    }

    /// An ordered consumer of the updates after `covered`, and every update it has now.
    async fn read_after(
        &self,
        document: &str,
        covered: u64,
    ) -> Result<(Follower, Vec<StoredUpdate>), StorageError> {
        let deliver_policy = if covered == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: covered + 1,
            }
        };
        let mut consumer = self
            .stream
            .create_consumer(OrderedConfig {
                filter_subject: update_subject(document),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        let pending = consumer.info().await.map_err(js_err)?.num_pending;
        let mut follower = consumer.messages().await.map_err(js_err)?;
        let mut updates = Vec::new();
        if pending > 0 {
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(10), follower.next())
                    .await
                    .map_err(|_| StorageError::JetStream("reading updates timed out".into()))?
                    .ok_or_else(|| StorageError::JetStream("update stream ended".into()))?
                    .map_err(js_err)?;
                let info = msg.info().map_err(js_err)?;
                let left = info.pending;
                if let Some(u) = StoredUpdate::from_message(&msg) {
                    updates.push(u);
                }
                if left == 0 {
                    break;
                }
            }
        }
        Ok((follower, updates))
    }

    /// Stores `state` (the merged document, covering every update up to `covered`) as the
    /// new snapshot, unless the stored one already covers as much; then purges one
    /// generation behind. Returns the new head, or `None` when nothing was written.
    pub async fn compact(
        &self,
        document: &str,
        state: &[u8],
        covered: u64,
    ) -> Result<Option<StoredHead>, StorageError> {
        if !is_valid_id(document) {
            return Err(StorageError::InvalidId);
        }
        let current = self.head(document).await?;
        if current.as_ref().is_some_and(|h| h.head.covered >= covered) {
            return Ok(None);
        }
        let chunk = (self.js.client().max_payload().saturating_sub(4096)).clamp(1024, 256 * 1024);
        let mut chunks = Vec::new();
        for part in state.chunks(chunk) {
            let ack = self
                .js
                .publish(chunk_subject(document), Bytes::copy_from_slice(part))
                .await
                .map_err(js_err)?
                .await
                .map_err(js_err)?;
            chunks.push(ack.sequence);
        }
        let head = Head {
            covered,
            chunks: chunks.clone(),
            size: state.len() as u64,
            previous_covered: current.as_ref().map_or(0, |h| h.head.covered),
            previous_first_chunk: current
                .as_ref()
                .and_then(|h| h.head.chunks.first().copied())
                .unwrap_or(0),
        };
        let msg = PublishMessage::build()
            .payload(serde_json::to_vec(&head).expect("head serializes").into())
            .expected_last_subject_sequence(current.as_ref().map_or(0, |h| h.sequence));
        let stored = match self.js.send_publish(head_subject(document), msg).await {
            Ok(ack) => ack.await,
            Err(e) => return Err(js_err(e)),
        };
        let sequence = match stored {
            Ok(ack) => ack.sequence,
            Err(e) => {
                // Lost the compare-and-set to another instance (or failed): our chunks are
                // nobody's.
                for seq in chunks {
                    let _ = self.stream.delete_message(seq).await;
                }
                tracing::debug!(document, error = %e, "snapshot head not written");
                return Ok(None);
            }
        };
        if head.previous_covered > 0 {
            self.stream
                .purge()
                .filter(update_subject(document))
                .sequence(head.previous_covered + 1)
                .await
                .map_err(js_err)?;
        }
        if head.previous_first_chunk > 0 {
            self.stream
                .purge()
                .filter(chunk_subject(document))
                .sequence(head.previous_first_chunk)
                .await
                .map_err(js_err)?;
        }
        self.stream
            .purge()
            .filter(head_subject(document))
            .keep(2)
            .await
            .map_err(js_err)?;
        Ok(Some(StoredHead { sequence, head }))
    }

    /// Messages of `document`'s update subject still in the stream.
    pub async fn update_count(&self, document: &str) -> Result<u64, StorageError> {
        let mut consumer = self
            .stream
            .create_consumer(OrderedConfig {
                filter_subject: update_subject(document),
                ..Default::default()
            })
            .await
            .map_err(js_err)?;
        Ok(consumer.info().await.map_err(js_err)?.num_pending)
    }
}

/// Applies a stored update to `doc`; one that does not apply is logged and skipped (it was
/// checked to decode before it was stored, so this is not expected).
pub fn apply_stored(doc: &Doc, document: &str, u: &StoredUpdate) -> bool {
    match Update::decode_v1(&u.update) {
        Ok(update) => match doc.transact_mut().apply_update(update) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(document, sequence = u.sequence, error = %e, "stored update does not apply; skipped");
                false
            }
        },
        Err(e) => {
            tracing::warn!(document, sequence = u.sequence, error = %e, "stored update does not decode; skipped");
            false
        }
    }
}

/// Every document the stream holds updates or a snapshot of, sorted.
pub async fn documents(js: &Context) -> Result<Vec<String>, StorageError> {
    use futures::TryStreamExt;
    let stream = js.get_stream(YDOC_STREAM).await.map_err(js_err)?;
    let mut ids = std::collections::BTreeSet::new();
    for kind in ["u", "h"] {
        let mut subjects = stream
            .info_with_subjects(format!("{YDOC_PREFIX}.{kind}.*"))
            .await
            .map_err(js_err)?;
        while let Some((subject, _)) = subjects.try_next().await.map_err(js_err)? {
            if let Some(id) = subject.rsplit('.').next().filter(|id| is_valid_id(id)) {
                ids.insert(id.to_string());
            }
        }
    }
    Ok(ids.into_iter().collect())
}

/// The document rebuilt from the stream alone (snapshot plus updates), for `inkwire replay
/// coedit` and the REST API: equal to what every live instance serves once it has caught up.
pub async fn rebuild(js: &Context, document: &str) -> Result<Doc, StorageError> {
    let store = Store::open(js).await?;
    Ok(store.load(document).await?.doc)
}
