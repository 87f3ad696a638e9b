//! `inkwire replay writing`: rebuilds every writing projection from the `EVENTS_WRITING`
//! stream. The tracker's state is a function of the stream alone (see `tracker`), so the
//! result equals the live state. Stop the live trackers while replaying.

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_shared::consumer::{Delivery, HandlerError};
use inkwire_shared::events::Category;
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;

use crate::state_machine::TrackerConfig;
use crate::tracker::Tracker;

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub events: u64,
    pub skipped: u64,
    pub keys_deleted: u64,
}

/// The Redis keys that hold writing projections: everything under `inkwire:writing:` except
/// the API's end-request guards (not derived from the stream) and the tracker's outboxes
/// (derived events still to publish: delivery state, which a replay leaves alone).
pub async fn projection_keys(redis: &mut ConnectionManager) -> redis::RedisResult<Vec<String>> {
    let mut keys: Vec<String> = inkwire_shared::redis_store::scan_keys(redis, "inkwire:writing:*")
        .await?
        .into_iter()
        .filter(|k| !k.ends_with(":end-requested") && !k.ends_with(":outbox"))
        .collect();
    keys.sort();
    Ok(keys)
}

/// Deletes the writing projections and applies the whole stream again, in order.
pub async fn replay(
    js: &jetstream::Context,
    redis: &ConnectionManager,
    config: TrackerConfig,
) -> anyhow::Result<ReplayStats> {
    let mut conn = redis.clone();
    let keys = projection_keys(&mut conn).await?;
    let mut stats = ReplayStats {
        keys_deleted: keys.len() as u64,
        ..Default::default()
    };
    inkwire_shared::redis_store::delete_keys(&mut conn, &keys).await?;
    let mut tracker = Tracker::new(js.clone(), redis.clone(), config, false);
    let stream = subjects::event_stream(Category::Writing);
    let mut next = 1u64;
    loop {
        let page = read_stream(
            js,
            &stream,
            subjects::event_stream_subjects(Category::Writing),
            DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            10_000,
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        let Some(last) = page.last().map(|m| m.sequence) else {
            break;
        };
        for chunk in page.chunks(500) {
            let deliveries: Vec<Delivery> = chunk
                .iter()
                .map(|m| Delivery {
                    subject: String::new(),
                    payload: m.payload.clone(),
                    stream_sequence: m.sequence,
                    deliveries: 1,
                    // The stored time, as the live tracker saw it: a replay is exact.
                    published: Some(m.published),
                })
                .collect();
            for (m, outcome) in chunk.iter().zip(tracker.handle_batch(deliveries).await) {
                match outcome {
                    Ok(()) => stats.events += 1,
                    Err(HandlerError::Permanent(reason)) | Err(HandlerError::Retry(reason)) => {
                        tracing::warn!(seq = m.sequence, %reason, "event skipped during replay");
                        stats.skipped += 1;
                    }
                }
            }
        }
        next = last + 1;
    }
    Ok(stats)
}
