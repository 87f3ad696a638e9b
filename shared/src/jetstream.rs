//! NATS connection, idempotent stream provisioning and publishing with dedupe ids.
//!
//! Publishing always sets `Nats-Msg-Id` to the event id, so a repeated id within the stream's
//! duplicate window is acknowledged as a duplicate instead of being stored twice. Batches are
//! published with a bounded window of outstanding acks: enough in flight to keep the server
//! busy, never an unbounded pile of futures.

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

/// One message to publish with a dedupe id.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: String,
    pub payload: Bytes,
}

/// Publishes one message with `Nats-Msg-Id` and waits for the stream's ack.
pub async fn publish(js: &Context, msg: Outgoing) -> Result<Published, async_nats::Error> {
    let ack = js
        .send_publish(
            msg.subject,
            Publish::build().payload(msg.payload).message_id(msg.msg_id),
        )
        .await?
        .await?;
    Ok(Published {
        stream: ack.stream,
        sequence: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// Publishes `msgs` in order with at most `window` acks outstanding and returns every ack,
/// in input order. Stops at the first failure: the messages before it are stored, the ones
/// after it were not sent (publishing them again with the same ids is safe).
pub async fn publish_windowed(
    js: &Context,
    msgs: impl IntoIterator<Item = Outgoing>,
    window: usize,
) -> Result<Vec<Published>, PartialPublish> {
    let window = window.max(1);
    let mut acks = Vec::new();
    let mut pending = FuturesOrdered::new();
    for msg in msgs {
        if pending.len() >= window
            && let Some(done) = pending.next().await
        {
            push_ack(&mut acks, done)?;
        }
        let sent = js
            .send_publish(
                msg.subject,
                Publish::build().payload(msg.payload).message_id(msg.msg_id),
            )
            .await;
        match sent {
            Ok(fut) => pending.push_back(fut.into_future()),
            Err(e) => {
                // Drain what is in flight so the caller knows exactly what was stored.
                while let Some(done) = pending.next().await {
                    push_ack(&mut acks, done)?;
                }
                return Err(PartialPublish {
                    stored: acks,
                    error: e.to_string(),
                });
            }
        }
    }
    while let Some(done) = pending.next().await {
        push_ack(&mut acks, done)?;
    }
    Ok(acks)
}

fn push_ack(
    acks: &mut Vec<Published>,
    done: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<(), PartialPublish> {
    match done {
        Ok(ack) => {
            acks.push(Published {
                stream: ack.stream,
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            });
            Ok(())
        }
        Err(e) => Err(PartialPublish {
            stored: std::mem::take(acks),
            error: e.to_string(),
        }),
    }
}

/// A batch publish that failed part way.
#[derive(Debug, thiserror::Error)]
#[error("publish failed after {} acknowledged message(s): {error}", stored.len())]
pub struct PartialPublish {
    /// Acks of the messages known to be stored, in input order.
    pub stored: Vec<Published>,
    pub error: String,
}

/// A message read back from a stream.
#[derive(Debug, Clone)]
pub struct Stored {
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
