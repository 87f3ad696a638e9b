//! `inkwire replay activity`: rebuilds the activity log from its sources' streams. Every
//! entry is a function of one stream message, so applying every source again, in order,
//! after deleting the log (and the high-water marks) gives what the live consumers built —
//! as far as the streams still hold it: the category streams keep `INKWIRE_EVENT_RETENTION`
//! (30 days by default), `CHAT` everything, but `RELAY` only `INKWIRE_RELAY_RETENTION`, so
//! older notifications-read entries are not rebuilt. Stop the activity workers while
//! replaying.

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_shared::consumer::{Delivery, HandlerError};
use inkwire_shared::jetstream::read_stream;
use redis::aio::ConnectionManager;

use crate::sources::{Clock, sources};
use crate::store;
use crate::worker::{ActivityConfig, apply};

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub messages: u64,
    pub recorded: u64,
    pub skipped: u64,
    pub keys_deleted: u64,
}

/// Deletes the activity log and applies every source's stream again.
pub async fn replay(
    js: &jetstream::Context,
    redis: &ConnectionManager,
    clock: Clock,
    config: &ActivityConfig,
) -> anyhow::Result<ReplayStats> {
    let mut conn = redis.clone();
    let names: Vec<&str> = sources().iter().map(|s| s.name).collect();
    let keys = store::all_keys(&mut conn, &names).await?;
    let mut stats = ReplayStats {
        keys_deleted: keys.len() as u64,
        ..Default::default()
    };
    inkwire_shared::redis_store::delete_keys(&mut conn, &keys).await?;
    for source in sources() {
        let mut next = 1u64;
        loop {
            let page = read_stream(
                js,
                &source.stream,
                source.filter.clone(),
                DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                10_000,
            )
            .await
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", source.stream))?;
            let Some(last) = page.last().map(|m| m.sequence) else {
                break;
            };
            for m in page {
                let d = Delivery {
                    subject: m.subject,
                    payload: m.payload,
                    stream_sequence: m.sequence,
                    deliveries: 1,
                    published: Some(m.published),
                };
                stats.messages += 1;
                match apply(&mut conn, &source, &d, clock, config.retention_ms()).await {
                    Ok(true) => stats.recorded += 1,
                    Ok(false) => stats.skipped += 1,
                    Err(HandlerError::Permanent(why)) | Err(HandlerError::Retry(why)) => {
                        tracing::warn!(source = source.name, seq = d.stream_sequence, %why, "skipped during replay");
                        stats.skipped += 1;
                    }
                }
            }
            next = last + 1;
        }
    }
    Ok(stats)
}
