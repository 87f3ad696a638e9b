//! NATS connection, idempotent stream provisioning and publishing with dedupe ids.
//!
//! Publishing always sets `Nats-Msg-Id` to the event id, so a repeated id within the stream's
//! duplicate window is acknowledged as a duplicate instead of being stored twice. Batches are
//! published with a bounded window of outstanding acks: enough in flight to keep the server
//! busy, never an unbounded pile of futures.
//!
//! A failed publish says what the client may conclude ([`PublishFailure`]): too large (checked
//! against the server's `max_payload` before sending), not stored (never sent, or refused), or
//! unknown (sent, no ack in time: JetStream often stores it anyway, so the answer must not
//! invite a retry that would apply it twice).

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{self, Context, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;

use crate::config::Config;
use crate::events::Category;
use crate::subjects;

/// Connects to NATS with a name that shows up in server monitoring.
pub async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to NATS at {}: {e}",
                crate::config::redact_url(url)
            )
        })?;
    Ok(client)
}

/// A JetStream context for `client`.
pub fn context(client: async_nats::Client) -> Context {
    jetstream::new(client)
}

/// A JetStream context whose publish acks (and API requests) wait at most `timeout`.
pub fn context_with_timeout(client: async_nats::Client, timeout: Duration) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(timeout)
        .build(client)
}

/// The streams inkwire needs, as configured.
pub fn desired_streams(config: &Config) -> Vec<stream::Config> {
    let storage = if config.memory_storage {
        stream::StorageType::Memory
    } else {
        stream::StorageType::File
    };
    let mut streams: Vec<stream::Config> = Category::ALL
        .iter()
        .map(|c| stream::Config {
            name: subjects::event_stream(*c),
            description: Some(format!("inkwire {} events", c.as_str())),
            subjects: vec![subjects::event_stream_subjects(*c)],
            retention: stream::RetentionPolicy::Limits,
            max_age: config.event_retention,
            duplicate_window: config.duplicate_window,
            storage,
            num_replicas: config.replicas,
            allow_direct: true,
            ..Default::default()
        })
        .collect();
    streams.push(stream::Config {
        name: crate::channels::RELAY_STREAM.to_string(),
        description: Some(
            "inkwire relay: recent channel messages, republished live with their sequence".into(),
        ),
        subjects: vec![format!("{}.>", crate::channels::RELAY_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        max_age: config.relay_retention,
        max_messages_per_subject: config.relay_history_per_channel,
        duplicate_window: config.duplicate_window.min(config.relay_retention),
        storage,
        num_replicas: config.replicas,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: format!("{}.>", crate::channels::RELAY_PREFIX),
            destination: format!(
                "{}.{}.>",
                crate::channels::LIVE_PREFIX,
                crate::channels::RELAY_PREFIX
            ),
            headers_only: false,
        }),
        ..Default::default()
    });
    // Notification jobs: kept like events (a notifier that was down catches up), deduplicated
    // by notification id (sends) and delivery id (deliveries) like events.
    streams.push(stream::Config {
        name: subjects::NOTIFY_STREAM.to_string(),
        description: Some("inkwire notification jobs: sends and per-channel deliveries".into()),
        subjects: vec![format!("{}.>", subjects::NOTIFY_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        max_age: config.event_retention,
        duplicate_window: config.duplicate_window,
        storage,
        num_replicas: config.replicas,
        allow_direct: true,
        ..Default::default()
    });
    // Co-editing: every accepted Yjs update, and the snapshots compaction writes. No age
    // limit (a document's content lives here); compaction purges what a snapshot covers.
    streams.push(stream::Config {
        name: subjects::YDOC_STREAM.to_string(),
        description: Some(
            "inkwire co-editing: Yjs updates per document, snapshot chunks and heads".into(),
        ),
        subjects: vec![format!("{}.>", subjects::YDOC_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: config.duplicate_window,
        storage,
        num_replicas: config.replicas,
        allow_direct: true,
        ..Default::default()
    });
    // Workflow steps (issue 14): one message per dispatch of a step attempt; the run's state
    // is in Redis, so these are kept only as long as events (a stopped runner catches up).
    streams.push(stream::Config {
        name: subjects::WF_STREAM.to_string(),
        description: Some("inkwire workflow step dispatches".into()),
        subjects: vec![format!("{}.>", subjects::WF_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        max_age: config.event_retention,
        duplicate_window: config.duplicate_window,
        storage,
        num_replicas: config.replicas,
        ..Default::default()
    });
    // Chat (issue 12): a room's messages, edits and tombstones on `chat.{roomId}`. No age
    // limit (the history is kept); deduplicated by room and sequence.
    streams.push(stream::Config {
        name: subjects::CHAT_STREAM.to_string(),
        description: Some("inkwire chat: messages, edits and tombstones per room".into()),
        subjects: vec![format!("{}.>", subjects::CHAT_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: config.duplicate_window,
        storage,
        num_replicas: config.replicas,
        allow_direct: true,
        ..Default::default()
    });
    // User presence (issue 12): relay instances' connection reports and heartbeats. Short
    // retention: a report matters only until the presence worker has applied it.
    streams.push(stream::Config {
        name: subjects::PRESENCE_STREAM.to_string(),
        description: Some("inkwire user presence: relay connection reports and heartbeats".into()),
        subjects: vec![format!("{}.>", subjects::PRESENCE_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        max_age: subjects::PRESENCE_RETENTION,
        duplicate_window: config.duplicate_window.min(subjects::PRESENCE_RETENTION),
        storage,
        num_replicas: config.replicas,
        ..Default::default()
    });
    streams.push(stream::Config {
        name: subjects::DLQ_STREAM.to_string(),
        description: Some("inkwire dead letters: messages consumers gave up on".into()),
        subjects: vec![format!("{}.>", subjects::DLQ_PREFIX)],
        retention: stream::RetentionPolicy::Limits,
        max_age: config.event_retention,
        storage,
        num_replicas: config.replicas,
        ..Default::default()
    });
    streams
}

/// What provisioning did to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provisioned {
    Created,
    Updated,
    Unchanged,
}

/// Creates the streams that are missing and updates those whose managed settings differ.
/// Safe to run from every process on every start.
pub async fn provision(
    js: &Context,
    config: &Config,
) -> anyhow::Result<Vec<(String, Provisioned)>> {
    let mut report = Vec::new();
    for want in desired_streams(config) {
        let name = want.name.clone();
        let outcome = ensure_stream(js, want)
            .await
            .map_err(|e| anyhow::anyhow!("provisioning stream {name}: {e}"))?;
        report.push((name, outcome));
    }
    Ok(report)
}

/// Creates or updates one stream so that its managed settings match `want`.
pub async fn ensure_stream(
    js: &Context,
    want: stream::Config,
) -> Result<Provisioned, async_nats::Error> {
    match js.get_stream(&want.name).await {
        Ok(mut existing) => {
            let have = existing.info().await?.config.clone();
            let same = have.subjects == want.subjects
                && have.max_age == want.max_age
                && have.duplicate_window == want.duplicate_window
                && have.num_replicas == want.num_replicas
                && have.max_messages_per_subject == want.max_messages_per_subject
                && have.republish == want.republish
                && have.allow_direct == want.allow_direct;
            if same {
                return Ok(Provisioned::Unchanged);
            }
            if have.storage != want.storage {
                tracing::warn!(
                    stream = %want.name,
                    "storage type differs from configuration; JetStream cannot change it in place"
                );
            }
            let want = stream::Config {
                storage: have.storage,
                ..want
            };
            js.update_stream(want).await?;
            Ok(Provisioned::Updated)
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            js.create_stream(want).await?;
            Ok(Provisioned::Created)
        }
        Err(e) => Err(e.into()),
    }
}

/// The server's answer to one publish.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    pub stream: String,
    pub sequence: u64,
    pub duplicate: bool,
}

impl From<jetstream::publish::PublishAck> for Published {
    fn from(ack: jetstream::publish::PublishAck) -> Published {
        Published {
            stream: ack.stream,
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        }
    }
}

/// One message to publish with a dedupe id.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
}

/// The header that carries the dedupe id.
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Is `id` safe as a `Nats-Msg-Id` header value? async-nats panics on CR or LF in a header
/// value, and the header block must stay ASCII; 1-255 visible ASCII characters pass.
pub fn is_valid_msg_id(id: &str) -> bool {
    (1..=255).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Bytes `msg` counts against the server's `max_payload`: the payload plus the header block
/// that carries `Nats-Msg-Id` (as async-nats measures it before sending).
pub fn wire_size(msg: &Outgoing) -> usize {
    let header_block = "NATS/1.0\r\n".len()
        + MSG_ID_HEADER.len()
        + ": ".len()
        + msg.msg_id.len()
        + "\r\n".len()
        + "\r\n".len();
    header_block + msg.payload.len()
}

/// Refuses, before anything is sent, a message the server would refuse: larger than its
/// `max_payload` (413 for the client), or with a dedupe id that cannot be a header value.
pub fn check_message(client: &async_nats::Client, msg: &Outgoing) -> Result<(), PublishFailure> {
    if !is_valid_msg_id(&msg.msg_id) {
        return Err(PublishFailure::InvalidId);
    }
    let (size, max) = (wire_size(msg), client.max_payload());
    if size > max {
        return Err(PublishFailure::TooLarge { size, max });
    }
    Ok(())
}

/// Why a publish did not end with an ack, sorted by what the client may conclude.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishFailure {
    /// Larger than the server's `max_payload`; nothing was sent.
    #[error("message of {size} bytes exceeds the NATS server's max_payload of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// The dedupe id cannot be a header value; nothing was sent. Callers validate ids first,
    /// so this is a bug guard, not a client error.
    #[error("message id is not 1-255 visible ASCII characters")]
    InvalidId,
    /// Nothing was stored: the message never left this process, or the server refused it.
    #[error("not stored: {0}")]
    NotStored(String),
    /// The message was sent but no ack came back (timeout, connection lost): it may be
    /// stored. Publishing it again with the same id is deduplicated within the duplicate
    /// window.
    #[error("sent but not acknowledged, it may be stored: {0}")]
    Unknown(String),
}

impl PublishFailure {
    /// May the message be stored?
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, PublishFailure::Unknown(_))
    }
}

/// Classifies an error of `send_publish`: it fails before the message is handed to the
/// connection, so nothing was sent. (Its size was checked before; the server's
/// `max_payload` cannot shrink without a reconnect, which also fails the send.)
fn send_failed(e: jetstream::context::PublishError) -> PublishFailure {
    PublishFailure::NotStored(e.to_string())
}

/// Classifies an error while waiting for the ack: the message was sent.
fn ack_failed(e: jetstream::context::PublishError) -> PublishFailure {
    use jetstream::context::PublishErrorKind as Kind;
    let server_refused = || {
        std::error::Error::source(&e)
            .is_some_and(|s| s.downcast_ref::<jetstream::Error>().is_some())
    };
    match e.kind() {
        // "No responders": no stream listens on the subject, nothing stored it.
        Kind::StreamNotFound | Kind::WrongLastMessageId | Kind::WrongLastSequence => {
            PublishFailure::NotStored(e.to_string())
        }
        // The stream answered with an error (storage full, …): not stored.
        Kind::Other if server_refused() => PublishFailure::NotStored(e.to_string()),
        // No answer in time, the connection dropped the request, or an answer we cannot
        // read: the server may have stored it.
        _ => PublishFailure::Unknown(e.to_string()),
    }
}

/// Sends one message (checked first) and returns the future of its ack.
async fn send(
    js: &Context,
    client: &async_nats::Client,
    msg: Outgoing,
) -> Result<jetstream::context::PublishAckFuture, PublishFailure> {
    check_message(client, &msg)?;
    js.send_publish(
        msg.subject,
        Publish::build().payload(msg.payload).message_id(msg.msg_id),
    )
    .await
    .map_err(send_failed)
}

/// Publishes one message with `Nats-Msg-Id` and waits for the stream's ack (at most the
/// context's timeout, `INKWIRE_PUBLISH_TIMEOUT` in [`crate::AppState`]). The error says
/// whether the message may be stored.
pub async fn publish_acked(js: &Context, msg: Outgoing) -> Result<Published, PublishFailure> {
    let ack = send(js, &js.client(), msg)
        .await?
        .await
        .map_err(ack_failed)?;
    Ok(ack.into())
}

/// [`publish_acked`] for callers that only report errors.
pub async fn publish(js: &Context, msg: Outgoing) -> Result<Published, async_nats::Error> {
    Ok(publish_acked(js, msg).await?)
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the stream.
    Stored(Published),
    /// Sent but not acknowledged: it may be stored.
    Unknown,
    /// Not stored (not sent, or refused by the server).
    NotStored,
}

impl Outcome {
    /// `stored`, `unknown` or `not_stored`, as the API reports it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Stored(_) => "stored",
            Outcome::Unknown => "unknown",
            Outcome::NotStored => "not_stored",
        }
    }
}

/// Publishes `msgs` in order with at most `window` acks outstanding and returns every ack,
/// in input order. At the first failure it stops sending, waits for the acks in flight, and
/// reports what became of each message: stored, unknown (sent, no ack) or not stored.
/// Publishing the unknown and unstored ones again with the same ids is safe.
pub async fn publish_windowed(
    js: &Context,
    msgs: impl IntoIterator<Item = Outgoing>,
    window: usize,
) -> Result<Vec<Published>, PartialPublish> {
    let window = window.max(1);
    let client = js.client();
    let mut outcomes: Vec<Option<Outcome>> = Vec::new();
    let mut first_error: Option<PublishFailure> = None;
    let mut pending = FuturesOrdered::new();
    for msg in msgs {
        let index = outcomes.len();
        outcomes.push(None);
        if first_error.is_none()
            && pending.len() >= window
            && let Some((i, done)) = pending.next().await
        {
            record_ack(&mut outcomes, &mut first_error, i, done);
        }
        if first_error.is_some() {
            outcomes[index] = Some(Outcome::NotStored);
            continue;
        }
        match send(js, &client, msg).await {
            Ok(ack) => pending.push_back(async move { (index, ack.await) }),
            Err(e) => {
                outcomes[index] = Some(Outcome::NotStored);
                first_error = Some(e);
            }
        }
    }
    // Drain what is in flight so the caller knows what became of each message.
    while let Some((i, done)) = pending.next().await {
        record_ack(&mut outcomes, &mut first_error, i, done);
    }
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Outcome::NotStored))
        .collect();
    match first_error {
        None => Ok(outcomes
            .into_iter()
            .filter_map(|o| match o {
                Outcome::Stored(p) => Some(p),
                _ => None,
            })
            .collect()),
        Some(error) => Err(PartialPublish { outcomes, error }),
    }
}

fn record_ack(
    outcomes: &mut [Option<Outcome>],
    first_error: &mut Option<PublishFailure>,
    index: usize,
    done: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) {
    outcomes[index] = Some(match done {
        Ok(ack) => Outcome::Stored(ack.into()),
        Err(e) => {
            let failure = ack_failed(e);
            let outcome = if failure.outcome_unknown() {
                Outcome::Unknown
            } else {
                Outcome::NotStored
            };
            first_error.get_or_insert(failure);
            outcome
        }
    });
}

/// A batch publish that failed part way.
#[derive(Debug, thiserror::Error)]
#[error(
    "publish failed ({} stored, {} unknown, {} not stored): {error}",
    self.count("stored"),
    self.count("unknown"),
    self.count("not_stored")
)]
pub struct PartialPublish {
    /// What became of each message, in input order.
    pub outcomes: Vec<Outcome>,
    /// The first failure.
    pub error: PublishFailure,
}

impl PartialPublish {
    /// The failure of one message that stood for `items` items (a bulk job for several
    /// recipients): each item has that message's outcome.
    pub fn for_each(self, items: usize) -> PartialPublish {
        let outcome = self.outcomes.first().cloned().unwrap_or(Outcome::NotStored);
        PartialPublish {
            outcomes: vec![outcome; items],
            error: self.error,
        }
    }

    /// How many messages had the outcome named `stored`, `unknown` or `not_stored`.
    pub fn count(&self, outcome: &str) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.as_str() == outcome)
            .count()
    }
}

/// The HTTP answer when publishing a client's write failed. `what` names the write in the
/// detail ("the keystroke batch"); `retry_id` is what a retry must carry for the effect to
/// happen at most once, and `retry_how` says where ("as the Idempotency-Key header").
pub fn publish_problem(
    e: &PublishFailure,
    what: &str,
    retry_id: &str,
    retry_how: &str,
) -> crate::problem::Problem {
    use crate::problem::Problem;
    match e {
        PublishFailure::TooLarge { size, max } => Problem::payload_too_large(format!(
            "{what} makes a {size}-byte message; the NATS server accepts at most {max} bytes; nothing was published"
        )),
        PublishFailure::InvalidId | PublishFailure::NotStored(_) => {
            tracing::error!(error = %e, "publish failed, nothing stored");
            Problem::unavailable(format!(
                "nats is unavailable; {what} was not stored; retry later"
            ))
            .with_retry_after(1)
        }
        PublishFailure::Unknown(_) => {
            tracing::warn!(error = %e, "publish not acknowledged, outcome unknown");
            Problem::outcome_unknown(
                format!(
                    "nats did not acknowledge {what} in time: it may or may not be stored. \
                     Retry with retryId {retry_how}: it takes effect at most once"
                ),
                Some(retry_id),
            )
        }
    }
}

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub sequence: u64,
    pub published: time::OffsetDateTime,
    pub payload: Bytes,
}

/// Reads up to `limit` messages of `stream` on `filter_subject`, starting at `start`, with a
/// short-lived consumer that reads exactly what is pending (so it never waits for messages
/// that do not exist) and is deleted afterwards.
pub async fn read_stream(
    js: &Context,
    stream: &str,
    filter_subject: String,
    start: jetstream::consumer::DeliverPolicy,
    limit: usize,
) -> Result<Vec<Stored>, async_nats::Error> {
    use jetstream::consumer::{AckPolicy, pull};
    let stream = js.get_stream(stream).await?;
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subject,
            deliver_policy: start,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await?;
    let name = consumer.cached_info().name.clone();
    let want = (consumer.info().await?.num_pending as usize).min(limit);
    let mut out = Vec::with_capacity(want);
    if want > 0 {
        let mut batch = consumer
            .batch()
            .max_messages(want)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        while let Some(msg) = batch.next().await {
            let msg = msg?;
            let info = msg.info()?;
            out.push(Stored {
                subject: msg.subject.to_string(),
                sequence: info.stream_sequence,
                published: info.published,
                payload: msg.payload.clone(),
            });
        }
    }
    // Ephemeral consumers also expire on their own; deleting now keeps the server tidy.
    let _ = stream.delete_consumer(&name).await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::context::{PublishError, PublishErrorKind};

    #[test]
    fn ack_failures_say_whether_the_message_may_be_stored() {
        let unknown = |e: PublishError| ack_failed(e).outcome_unknown();
        assert!(unknown(PublishError::new(PublishErrorKind::TimedOut)));
        assert!(unknown(PublishError::new(PublishErrorKind::BrokenPipe)));
        // An answer that cannot be read: the server may have stored it.
        let garbled = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        assert!(unknown(PublishError::with_source(
            PublishErrorKind::Other,
            garbled
        )));
        // No stream listens, or the stream answered with an error: nothing stored.
        assert!(!unknown(PublishError::new(
            PublishErrorKind::StreamNotFound
        )));
        let refused: jetstream::Error = serde_json::from_value(serde_json::json!(
            {"code": 503, "err_code": 10077, "description": "maximum messages exceeded"}
        ))
        .unwrap();
        assert!(!unknown(PublishError::with_source(
            PublishErrorKind::Other,
            refused
        )));
    }

    #[test]
    fn message_ids_must_be_header_safe() {
        assert!(is_valid_msg_id(
            "0191f2a4-5b6c-7d8e-9f00-112233445566:project:p-1"
        ));
        for bad in ["", "a\r\nb", "a b", "\u{0}", "é", &"x".repeat(256)] {
            assert!(!is_valid_msg_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn wire_size_counts_the_header_block() {
        let msg = Outgoing {
            subject: "s".into(),
            msg_id: "abc".into(),
            payload: Bytes::from_static(b"12345"),
        };
        // "NATS/1.0\r\n" + "Nats-Msg-Id: abc\r\n" + "\r\n" + payload
        assert_eq!(wire_size(&msg), 10 + 18 + 2 + 5);
    }
}
