//! The analytics keys in Redis, the batched write of a fetched batch, and the reads.
//!
//! - `inkwire:analytics:{resolutionMs}:{bucketStartMs}`: one hash per resolution and bucket,
//!   holding one field per series: `total`, `t:{type}`, `words`, `p:{projectId}:total`,
//!   `p:{projectId}:t:{type}`, `p:{projectId}:words`. The same script adds each event to
//!   its bucket at every resolution (the simplest rollup that stays exact), and sets each
//!   hash to expire its resolution's retention after the bucket ends.
//! - `inkwire:analytics:book:{bookId}`: a book's sales, `d:{dayStartMs}:units`,
//!   `d:{dayStartMs}:revenue` (hundredths) and `p:{projectId}` (how many of its sales events
//!   named that project, which decides who may read them); expires the day retention after
//!   its last sale.
//! - once per message: `shared::idempotency::apply_counts_once` with the high-water mark
//!   `inkwire:hwm:analytics` (field per stream) and the applied set
//!   `inkwire:applied:analytics:{stream}`.
//! - the push: `inkwire:analytics:closer` (the lease of the instance that pushes) and
//!   `inkwire:analytics:pushed` (the end of the last bucket handled).

use std::collections::HashMap;

use inkwire_shared::consumer::Delivery;
use inkwire_shared::idempotency::{Counts, CountsApplied, KeyId, apply_counts_once};
use redis::aio::{ConnectionLike, ConnectionManager};

use crate::config::{AnalyticsConfig, DAY_MS};
use crate::counted;

pub const PREFIX: &str = "inkwire:analytics";
/// The consumer name in the idempotency keys (and the durable consumer's name).
pub const CONSUMER: &str = "analytics";

pub fn bucket_key(resolution_ms: u64, start_ms: u64) -> String {
    format!("{PREFIX}:{resolution_ms}:{start_ms}")
}

pub fn book_key(book: &str) -> String {
    format!("{PREFIX}:book:{book}")
}

pub fn lease_key() -> String {
    format!("{PREFIX}:closer")
}

pub fn pushed_key() -> String {
    format!("{PREFIX}:pushed")
}

/// The field of a series: overall or one project's, all types or one.
pub fn field(project: Option<&str>, event_type: Option<&str>) -> String {
    match (project, event_type) {
        (None, None) => "total".into(),
        (None, Some(t)) => format!("t:{t}"),
        (Some(p), None) => format!("p:{p}:total"),
        (Some(p), Some(t)) => format!("p:{p}:t:{t}"),
    }
}

pub fn words_field(project: Option<&str>) -> String {
    match project {
        None => "words".into(),
        Some(p) => format!("p:{p}:words"),
    }
}

/// What a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub counted: usize,
    /// Messages that count nowhere (module `counted`).
    pub skipped: usize,
    pub applied: CountsApplied,
}

/// Builds the increments of `deliveries` (of one stream, bucketed by the time JetStream
/// stored each message) and applies them with one script call. `floor` is the consumer's
/// last known ack floor (0: unknown).
pub async fn apply_batch(
    redis: &mut ConnectionManager,
    config: &AnalyticsConfig,
    stream: &str,
    floor: u64,
    deliveries: &[Delivery],
) -> redis::RedisResult<BatchOutcome> {
    let resolutions = config.resolutions();
    let day_keep = config.day_retention.as_millis() as u64;
    let mut counts = Counts::new();
    let mut outcome = BatchOutcome::default();
    // The bucket key per resolution of the previous message: a batch is mostly one bucket.
    let mut last: Vec<Option<(u64, KeyId)>> = vec![None; resolutions.len()];
    let mut fields: Vec<(String, i64)> = Vec::with_capacity(6);
    for d in deliveries {
        // Every message is marked applied, counted or not, so the applied set's floor moves.
        counts.message(d.stream_sequence);
        let Some(at) = d.published else {
            outcome.skipped += 1;
            continue;
        };
        let at_ms = (at.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        let c = match counted::read(&d.payload) {
            Ok(c) => c,
            Err(why) => {
                tracing::debug!(stream, seq = d.stream_sequence, %why, "not counted");
                outcome.skipped += 1;
                continue;
            }
        };
        outcome.counted += 1;
        let p = c.project.as_deref();
        let t = Some(c.event_type.as_str());
        fields.clear();
        fields.push((field(None, None), 1));
        fields.push((field(None, t), 1));
        if p.is_some() {
            fields.push((field(p, None), 1));
            fields.push((field(p, t), 1));
        }
        if c.words > 0 {
            fields.push((words_field(None), c.words));
            if p.is_some() {
                fields.push((words_field(p), c.words));
            }
        }
        for (i, &(res, keep)) in resolutions.iter().enumerate() {
            let start = at_ms - at_ms % res;
            let key = match last[i] {
                Some((s, k)) if s == start => k,
                _ => {
                    let k = counts.key(&bucket_key(res, start), start + res + keep);
                    last[i] = Some((start, k));
                    k
                }
            };
            for (f, n) in &fields {
                counts.incr_key(key, f, *n);
            }
        }
        if let Some(sale) = &c.sale {
            let day = at_ms - at_ms % DAY_MS;
            let key = counts.key(&book_key(&sale.book), day + DAY_MS + day_keep);
            counts.incr_key(key, &format!("d:{day}:units"), sale.units);
            counts.incr_key(key, &format!("d:{day}:revenue"), sale.revenue_cents);
            if let Some(p) = p {
                counts.incr_key(key, &format!("p:{p}"), 1);
            }
        }
    }
    outcome.applied = apply_counts_once(redis, CONSUMER, stream, floor, &counts).await?;
    Ok(outcome)
}

/// Reads `field` of each bucket key in one pipeline (one round trip).
pub async fn read_fields(
    redis: &mut ConnectionManager,
    keys: &[String],
    fields: &[String],
) -> redis::RedisResult<Vec<Vec<i64>>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for k in keys {
        pipe.cmd("HMGET").arg(k).arg(fields);
    }
    let rows: Vec<Vec<Option<i64>>> = pipe.query_async(redis).await?;
    Ok(rows
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.unwrap_or(0)).collect())
        .collect())
}

/// Every field of a bucket hash.
pub async fn bucket(
    redis: &mut ConnectionManager,
    resolution_ms: u64,
    start_ms: u64,
) -> redis::RedisResult<HashMap<String, i64>> {
    redis::cmd("HGETALL")
        .arg(bucket_key(resolution_ms, start_ms))
        .query_async(redis)
        .await
}

/// A book's sales hash.
pub async fn book(
    redis: &mut ConnectionManager,
    book: &str,
) -> redis::RedisResult<HashMap<String, i64>> {
    redis::cmd("HGETALL")
        .arg(book_key(book))
        .query_async(redis)
        .await
}

/// Every key the analytics wrote (for a replay).
pub async fn all_keys<C: ConnectionLike>(
    redis: &mut C,
    streams: &[String],
) -> redis::RedisResult<Vec<String>> {
    let mut keys = vec![format!("inkwire:hwm:{CONSUMER}")];
    keys.extend(
        streams
            .iter()
            .map(|s| format!("inkwire:applied:{CONSUMER}:{s}")),
    );
    keys.extend(inkwire_shared::redis_store::scan_keys(redis, &format!("{PREFIX}:*")).await?);
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields() {
        assert_eq!(field(None, None), "total");
        assert_eq!(field(Some("p"), Some("keystroke")), "p:p:t:keystroke");
        assert_eq!(words_field(Some("p")), "p:p:words");
        assert_eq!(bucket_key(5000, 10_000), "inkwire:analytics:5000:10000");
    }
}
