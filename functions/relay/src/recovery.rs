//! Reading a channel's history from the RELAY stream: for `since` recovery and to fill gaps
//! in the live flow.

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::{self, stream::DirectGetErrorKind};
use bytes::Bytes;
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
    let stored = inkwire_shared::jetstream::read_stream(
        js,
        RELAY_STREAM,
        subject.to_string(),
        DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        },
        usize::MAX,
    )
    .await?;
    Ok(stored
        .into_iter()
        .take_while(|m| m.sequence <= up_to)
        .map(|m| (m.sequence, m.payload))
        .collect())
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
