//! Anomaly detection on the minute series: when a minute closes, the event count of that
//! minute — overall, and of every project active in the last hour — is put to the
//! detector ([`crate::anomaly`]), and an anomaly becomes `analytics.anomaly_detected`.
//!
//! The history comes from the rollups, in one pipeline: the last
//! [`crate::anomaly::DetectorConfig::recent`] minute buckets, and for the season the hour
//! buckets at the same hour of the week in each of the last [`SEASON_WEEKS`] weeks (an
//! hour's count / 60 is the expected minute; a whole hour is smooth where one minute of
//! one week is noise). Hour buckets are kept 35 days by default, so four earlier weeks are
//! there once the analytics have run that long; before, the recent minutes decide.
//!
//! The minimum history counts only minutes in which the system recorded any event: a
//! fresh deployment, or one that was down, waits for [`DetectorConfig::min_history`]
//! minutes of real history before it calls anything an anomaly.
//!
//! One event per anomaly episode: after an event, the series is quiet for
//! [`COOLDOWN_MS`] (a spike over five minutes is one anomaly, not five). The event id is
//! derived from the series and the minute, so the closer redoing a bucket after a crash
//! publishes the same event again, which JetStream drops as a duplicate.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{self, Outgoing};
use serde_json::json;
use uuid::Uuid;

use crate::anomaly::{DetectorConfig, History, Point, detect, median};
use crate::config::{HOUR_MS, MINUTE_MS};
use crate::hooks::{ClosedBucket, HookContext};
use crate::store;

/// Earlier weeks the seasonal expectation looks at.
pub const SEASON_WEEKS: u64 = 4;
/// Quiet time of a series after an anomaly event.
pub const COOLDOWN_MS: u64 = 15 * MINUTE_MS;
/// The user id of the events the analytics raise on their own.
pub const ANALYTICS_USER: &str = "analytics";
const WEEK_MS: u64 = 7 * 24 * HOUR_MS;

fn cooldown_key(series: &str) -> String {
    format!("{}:anomaly:{series}", store::PREFIX)
}

/// The series examined: `total` and `p:{id}:total`.
fn is_examined(field: &str) -> bool {
    field == "total" || (field.starts_with("p:") && field.ends_with(":total"))
}

/// Runs the detector for the minute that ends at `bucket.end_ms` (when it ends a minute).
pub async fn on_bucket_closed(ctx: &HookContext, bucket: &ClosedBucket) -> anyhow::Result<()> {
    if !bucket.end_ms.is_multiple_of(MINUTE_MS) {
        return Ok(());
    }
    let config = DetectorConfig::default();
    let minute = bucket.end_ms - MINUTE_MS;
    let mut redis = ctx.redis.clone();
    // The last `recent` minutes and the one that just closed, every field.
    let minutes: Vec<u64> = (0..=config.recent as u64)
        .rev()
        .map(|i| minute - i * MINUTE_MS)
        .collect();
    let mut pipe = redis::pipe();
    for m in &minutes {
        pipe.cmd("HGETALL").arg(store::bucket_key(MINUTE_MS, *m));
    }
    let rows: Vec<BTreeMap<String, i64>> = pipe.query_async(&mut redis).await?;
    let fields: BTreeSet<String> = rows
        .iter()
        .flat_map(|r| r.keys())
        .filter(|f| is_examined(f))
        .cloned()
        .collect();
    if fields.is_empty() {
        return Ok(());
    }
    let fields: Vec<String> = fields.into_iter().collect();
    // The hours the minutes fall in, in each earlier week.
    let hours: BTreeSet<u64> = minutes.iter().map(|m| m - m % HOUR_MS).collect();
    let mut seasonal_keys = Vec::new();
    for h in &hours {
        for w in 1..=SEASON_WEEKS {
            if let Some(at) = h.checked_sub(w * WEEK_MS) {
                seasonal_keys.push((*h, store::bucket_key(HOUR_MS, at)));
            }
        }
    }
    let keys: Vec<String> = seasonal_keys.iter().map(|(_, k)| k.clone()).collect();
    let season_rows = store::read_fields(&mut redis, &keys, &fields).await?;
    // Which earlier weeks exist at all: a week with no hour bucket is before the analytics
    // ran, not a week of zeros.
    let weeks_present: Vec<bool> = {
        let mut pipe = redis::pipe();
        for (_, k) in &seasonal_keys {
            pipe.cmd("EXISTS").arg(k);
        }
        pipe.query_async(&mut redis).await?
    };
    for (fi, field) in fields.iter().enumerate() {
        // Per hour: the earlier weeks' counts of this series, per minute.
        let season_of = |hour: u64| -> Vec<f64> {
            seasonal_keys
                .iter()
                .zip(&season_rows)
                .zip(&weeks_present)
                .filter(|(((h, _), _), present)| *h == hour && **present)
                .map(|((_, row), _)| row[fi] as f64 / 60.0)
                .collect()
        };
        // A minute without its hash had no event at all anywhere: the analytics (or the
        // whole system) were not running, which says nothing about this series. Only
        // minutes with a hash are history; the newest minute always counts.
        let last = minutes.len() - 1;
        let points: Vec<Point> = minutes
            .iter()
            .zip(&rows)
            .enumerate()
            .filter(|(i, (_, row))| *i == last || !row.is_empty())
            .map(|(_, (m, row))| {
                let season = season_of(m - m % HOUR_MS);
                Point {
                    value: row.get(field).copied().unwrap_or(0) as f64,
                    seasonal: (season.len() >= config.min_seasons)
                        .then(|| median(&season))
                        .flatten(),
                }
            })
            .collect();
        let (newest, recent) = points.split_last().expect("minutes is not empty");
        let season = season_of(minute - minute % HOUR_MS);
        let history = History {
            recent,
            same_time_earlier_weeks: &season,
            earlier_weeks: season.len(),
        };
        let Some(found) = detect(newest.value, &history, &config) else {
            continue;
        };
        let cooling: bool = redis::cmd("EXISTS")
            .arg(cooldown_key(field))
            .query_async(&mut redis)
            .await?;
        if cooling {
            continue;
        }
        let project = field
            .strip_prefix("p:")
            .and_then(|r| r.strip_suffix(":total"));
        let mut b = Event::builder(Category::Analytics, "anomaly_detected", ANALYTICS_USER)
            .id(Uuid::new_v5(
                &Uuid::NAMESPACE_OID,
                format!("anomaly/{field}/{minute}").as_bytes(),
            ))
            .source("analytics")
            .data(json!({
                "metric": "events.total",
                "value": found.value,
                "expected": (found.expected * 100.0).round() / 100.0,
                "score": (found.score * 100.0).round() / 100.0,
                "direction": found.direction.as_str(),
                "window": "1m",
                "seasonal": found.seasonal,
            }));
        if let Ok(at) =
            time::OffsetDateTime::from_unix_timestamp_nanos(bucket.end_ms as i128 * 1_000_000)
        {
            b = b.timestamp(at);
        }
        if let Some(p) = project {
            b = b.project(p);
        }
        let event = b.build();
        jetstream::publish(
            &ctx.js,
            Outgoing {
                subject: event.subject(),
                msg_id: event.id.to_string(),
                payload: Bytes::from(serde_json::to_vec(&event)?),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("anomaly event not published: {e}"))?;
        redis::cmd("SET")
            .arg(cooldown_key(field))
            .arg(minute)
            .arg("PX")
            .arg(COOLDOWN_MS)
            .query_async::<()>(&mut redis)
            .await?;
    }
    Ok(())
}
