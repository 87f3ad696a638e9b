//! Reading a channel's history from the RELAY stream: for `since` recovery and to fill gaps
//! in the live flow.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use inkwire_shared::channels::RELAY_STREAM;

/// The stream sequence of the newest message on `subject`, or 0 when it has none.
pub async fn last_sequence(
    js: &jetstream::Context,
    subject: &str,
) -> Result<u64, async_nats::Error> {
    let stream = js.get_stream(RELAY_STREAM).await?;
    match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => Ok(m.sequence),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Messages on `subject` with sequence in `(after, up_to]`, oldest first.
pub async fn read_range(
    js: &jetstream::Context,
    subject: &str,
    after: u64,
    up_to: u64,
) -> Result<Vec<(u64, Bytes)>, async_nats::Error> {
    if up_to <= after {
        return Ok(Vec::new());
    }
    let stream = js.get_stream(RELAY_STREAM).await?;
    let mut consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await?;
    let name = consumer.cached_info().name.clone();
    let pending = consumer.info().await?.num_pending as usize;
    let mut out = Vec::new();
    if pending > 0 {
        let mut batch = consumer
            .batch()
            .max_messages(pending)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            let m = m?;
            let seq = m.info()?.stream_sequence;
            if seq > up_to {
                break;
            }
            out.push((seq, m.payload.clone()));
        }
    }
    let _ = stream.delete_consumer(&name).await;
    Ok(out)
}

/// Whether history on `subject` still reaches back to position `since`: the message at
/// `since` is still stored (the stream drops the oldest first, so everything after it is
/// there too). Position 0 ("nothing seen yet") is complete when the stream has never dropped
/// a message of this subject, approximated by the stream never having dropped anything.
pub async fn reaches_back_to(
    js: &jetstream::Context,
    subject: &str,
    since: u64,
) -> Result<bool, async_nats::Error> {
    let mut stream = js.get_stream(RELAY_STREAM).await?;
    if since == 0 {
        return Ok(stream.info().await?.state.first_sequence <= 1);
    }
    match stream.direct_get(since).await {
        Ok(m) => Ok(m.subject.as_str() == subject),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}
