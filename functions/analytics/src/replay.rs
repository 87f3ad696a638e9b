//! `inkwire replay analytics`: rebuilds every counter from the category streams. Each count
//! is a function of stream messages and the times JetStream stored them, so deleting the
//! analytics keys (with the marks that apply each message once) and applying every stream
//! again, in order and in the live consumer's batches, gives the same figures — as far as
//! the streams still hold them (`INKWIRE_EVENT_RETENTION`, 30 days by default); buckets
//! whose retention has passed expire again at once. Stop the analytics workers first.

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_shared::consumer::Delivery;
use inkwire_shared::jetstream::read_stream;
use redis::aio::ConnectionManager;

use crate::config::AnalyticsConfig;
use crate::store;
use crate::worker::streams;

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayStats {
    pub messages: u64,
    pub counted: u64,
    pub skipped: u64,
    pub keys_deleted: u64,
}

/// Deletes the analytics keys and applies every category stream again.
pub async fn replay(
    js: &jetstream::Context,
    redis: &ConnectionManager,
    config: &AnalyticsConfig,
) -> anyhow::Result<ReplayStats> {
    let mut conn = redis.clone();
    let names = streams();
    let keys = store::all_keys(&mut conn, &names).await?;
    let mut stats = ReplayStats {
        keys_deleted: keys.len() as u64,
        ..Default::default()
    };
    inkwire_shared::redis_store::delete_keys(&mut conn, &keys).await?;
    for stream in &names {
        let mut next = 1u64;
        loop {
            let page = read_stream(
                js,
                stream,
                String::new(),
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
            let deliveries: Vec<Delivery> = page
                .into_iter()
                .map(|m| Delivery {
                    subject: m.subject,
                    payload: m.payload,
                    stream_sequence: m.sequence,
                    deliveries: 1,
                    published: Some(m.published),
                })
                .collect();
            for batch in deliveries.chunks(config.batch.max(1)) {
                let outcome = store::apply_batch(&mut conn, config, stream, 0, batch).await?;
                stats.messages += batch.len() as u64;
                stats.counted += outcome.counted as u64;
                stats.skipped += outcome.skipped as u64;
            }
            next = last + 1;
        }
    }
    Ok(stats)
}
