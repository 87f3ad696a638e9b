//! The closer: pushes each bucket once it is closed, from exactly one instance.
//!
//! A bucket `[start, end)` is closed when the clock has passed `end` and every category
//! stream's consumer has applied (acked) every message stored before `end`: the consumer
//! has nothing pending and nothing unacknowledged, or the first message above its ack floor
//! was stored at or after `end` (stored times grow with stream sequences). Both are read
//! from JetStream's consumer state, so the rule holds whichever instance applied the
//! messages, and a message applied but not yet acked (a crash between the script and the
//! ack) holds the bucket until its redelivery was skipped and acked.
//!
//! Every instance ticks every `INKWIRE_ANALYTICS_PUSH_INTERVAL` (100 ms); the one holding
//! the lease `inkwire:analytics:closer` reads the consumers' state only while a bucket is
//! due (once or twice per bucket when the consumers keep up; the others every 5 s, for the
//! ack floors) and pushes the buckets after `inkwire:analytics:pushed`
//! in order: one `metrics_update` frame to `category:analytics` with every changed series,
//! one to `project:{id}` per changed project with that project's series, then
//! [`hooks::on_bucket_closed`], then it records the bucket as pushed. The frames carry ids
//! derived from the bucket and channel, so a bucket pushed again by a new lease holder
//! (the old one failed before recording it) is stored once by the RELAY stream. A bucket
//! without any event is not pushed. On first start the closer begins with the current
//! bucket; buckets that ended more than `INKWIRE_ANALYTICS_PUSH_HORIZON` ago (the workers
//! were down) are skipped.
//! An instance that stops gives the lease up, so the next holder does not wait for it to
//! expire.
//!
//! The clock compared with the stored times is this host's; hosts and the NATS servers are
//! expected to run NTP-synchronised clocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull};
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{AnalyticsConfig, label};
use crate::hooks::{self, Change, ClosedBucket, HookContext, Metric};
use crate::store::{self, CONSUMER};
use crate::worker::{Floors, streams};

pub fn now_ms() -> u64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

pub fn rfc3339(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// One consumer's state, as the closing rule needs it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    floor: u64,
    idle: bool,
}

struct Closer {
    js: jetstream::Context,
    redis: ConnectionManager,
    config: Arc<AnalyticsConfig>,
    floors: Floors,
    instance: String,
    consumers: HashMap<String, PullConsumer>,
    /// The stored time of the message above each stream's ack floor, by sequence.
    stored: HashMap<String, (u64, u64)>,
    /// When the floors were last read (ms).
    floors_read_at: u64,
    /// The bucket (its end) whose hooks failed, and how many times in a row.
    hook_failures: (u64, u32),
}

/// How many times a bucket's hooks are tried before the closer moves on without them.
const HOOK_ATTEMPTS: u32 = 5;

/// How often the floors are refreshed when no bucket needs the consumers' state (ms).
const FLOOR_REFRESH_MS: u64 = 5_000;

const CLAIM: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;
static CLAIM_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLAIM));

static RELEASE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
    )
});

impl Closer {
    /// Every stream's consumer state, read at once (one request per stream, concurrently:
    /// this runs every tick on every instance). `None` for a consumer not there yet.
    async fn progress(&mut self) -> HashMap<String, Option<Progress>> {
        for stream in streams() {
            if self.consumers.contains_key(&stream) {
                continue;
            }
            let Ok(s) = self.js.get_stream(&stream).await else {
                continue;
            };
            if let Ok(c) = s.get_consumer::<pull::Config>(CONSUMER).await {
                self.consumers.insert(stream, c);
            }
        }
        let reads = self.consumers.iter_mut().map(|(stream, c)| async move {
            let p = c.info().await.ok().map(|info| Progress {
                floor: info.ack_floor.stream_sequence,
                idle: info.num_pending == 0 && info.num_ack_pending == 0,
            });
            (stream.clone(), p)
        });
        let read: HashMap<String, Option<Progress>> =
            futures::future::join_all(reads).await.into_iter().collect();
        // A consumer that could not be read (deleted, unreachable) is looked up again.
        self.consumers
            .retain(|stream, _| read.get(stream).is_some_and(Option::is_some));
        streams()
            .into_iter()
            .map(|stream| {
                let p = read.get(&stream).copied().flatten();
                (stream, p)
            })
            .collect()
    }

    /// When the message after `floor` was stored (ms), if it exists.
    async fn stored_after(&mut self, stream: &str, floor: u64) -> Option<u64> {
        if let Some((seq, at)) = self.stored.get(stream)
            && *seq == floor + 1
        {
            return Some(*at);
        }
        let s = self.js.get_stream(stream).await.ok()?;
        let m = s.get_raw_message(floor + 1).await.ok()?;
        let at = (m.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        self.stored.insert(stream.to_string(), (floor + 1, at));
        Some(at)
    }

    /// Gives the lease up if this instance holds it.
    async fn release(&mut self) -> redis::RedisResult<()> {
        RELEASE_SCRIPT
            .key(store::lease_key())
            .arg(&self.instance)
            .invoke_async::<i64>(&mut self.redis)
            .await
            .map(|_| ())
    }

    async fn claim(&mut self) -> redis::RedisResult<bool> {
        let ttl = (self.config.push_interval.as_millis() as u64 * 20).max(2000);
        let claimed: i64 = CLAIM_SCRIPT
            .key(store::lease_key())
            .arg(&self.instance)
            .arg(ttl)
            .invoke_async(&mut self.redis)
            .await?;
        Ok(claimed == 1)
    }

    /// Reads the consumers' state and raises the floors with it.
    async fn read_progress(&mut self, now: u64) -> HashMap<String, Option<Progress>> {
        let progress = self.progress().await;
        for (stream, p) in &progress {
            if let Some(p) = p {
                self.floors.raise(stream, p.floor);
            }
        }
        self.floors_read_at = now;
        progress
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        let now = now_ms();
        if !self.claim().await? {
            // Not pushing: the consumers' state is only needed for the floors.
            if now >= self.floors_read_at + FLOOR_REFRESH_MS {
                self.read_progress(now).await;
            }
            return Ok(());
        }
        let b = self.config.bucket_ms();
        let pushed: Option<u64> = redis::cmd("GET")
            .arg(store::pushed_key())
            .query_async(&mut self.redis)
            .await?;
        let Some(mut last) = pushed else {
            redis::cmd("SET")
                .arg(store::pushed_key())
                .arg(now - now % b)
                .arg("NX")
                .query_async::<()>(&mut self.redis)
                .await?;
            return Ok(());
        };
        let horizon = self.config.push_horizon.as_millis() as u64;
        // Read once a bucket is due, not every tick: polling consumer info many times a
        // second stalled a busy pull consumer on nats-server 2.9 (see the notify bench).
        let mut progress = None;
        for _ in 0..100 {
            let end = last + b;
            if end > now {
                break;
            }
            if end + horizon < now {
                let from = now - horizon;
                last = from - from % b;
                self.record(last).await?;
                continue;
            }
            let p = match progress.take() {
                Some(p) => p,
                None => self.read_progress(now).await,
            };
            let closed = self.closed(end, &p).await;
            progress = Some(p);
            if !closed {
                break;
            }
            self.push(last, end).await?;
            self.record(end).await?;
            last = end;
        }
        if progress.is_none() && now >= self.floors_read_at + FLOOR_REFRESH_MS {
            self.read_progress(now).await;
        }
        Ok(())
    }

    async fn record(&mut self, end: u64) -> redis::RedisResult<()> {
        redis::cmd("SET")
            .arg(store::pushed_key())
            .arg(end)
            .query_async(&mut self.redis)
            .await
    }

    /// The closing rule (module doc), on consumer states read after `end`.
    async fn closed(&mut self, end: u64, progress: &HashMap<String, Option<Progress>>) -> bool {
        for (stream, p) in progress {
            let Some(p) = p else { return false };
            if p.idle {
                continue;
            }
            match self.stored_after(stream, p.floor).await {
                Some(at) if at >= end => {}
                _ => return false,
            }
        }
        true
    }

    async fn push(&mut self, start: u64, end: u64) -> anyhow::Result<()> {
        let b = self.config.bucket_ms();
        let fields = store::bucket(&mut self.redis, b, start).await?;
        let bucket = closed_bucket(start, end, b, &fields);
        // A bucket without events has no frames (nothing changed), but the hooks still see
        // it: thresholds and anomalies are also about values that fell to nothing.
        let frames = if fields.is_empty() {
            Vec::new()
        } else {
            frames(&bucket)
        };
        let publishes = frames.iter().map(|(channel, data)| {
            let id = format!("analytics:{start}:{b}:{channel}");
            channels::publish(&self.js, channel, MessageType::MetricsUpdate, data, id)
        });
        for (r, (channel, _)) in futures::future::join_all(publishes)
            .await
            .into_iter()
            .zip(&frames)
        {
            r.map_err(|e| anyhow::anyhow!("publishing to {channel}: {e}"))?;
        }
        let ctx = HookContext {
            js: self.js.clone(),
            redis: self.redis.clone(),
            config: self.config.clone(),
        };
        // A failed hook (Redis or JetStream busy) keeps the bucket unrecorded, so the next
        // tick runs the hooks again — they are idempotent (a threshold's transition is a
        // compare-and-set, an anomaly's event id is derived from its minute). A hook that
        // keeps failing must not stop the metric stream: after `HOOK_ATTEMPTS` the bucket
        // is recorded without it, loudly.
        if let Err(e) = hooks::on_bucket_closed(&ctx, &bucket).await {
            let attempts = if self.hook_failures.0 == end {
                self.hook_failures.1 + 1
            } else {
                1
            };
            self.hook_failures = (end, attempts);
            if attempts < HOOK_ATTEMPTS {
                tracing::warn!(error = %e, start, attempts, "analytics bucket hook failed; retrying");
                return Err(e.context("analytics bucket hook"));
            }
            tracing::error!(error = %e, start, attempts, "analytics bucket hook failed; giving up on this bucket");
        }
        Ok(())
    }
}

/// A bucket hash as the hook sees it.
pub fn closed_bucket(
    start: u64,
    end: u64,
    resolution: u64,
    fields: &HashMap<String, i64>,
) -> ClosedBucket {
    let mut changes: Vec<Change> = fields
        .iter()
        .filter(|(_, v)| **v != 0)
        .filter_map(|(f, v)| {
            hooks::parse_field(f).map(|(project, metric)| Change {
                project,
                metric,
                value: *v,
            })
        })
        .collect();
    changes.sort_by(|a, b| (&a.project, &a.metric).cmp(&(&b.project, &b.metric)));
    ClosedBucket {
        start_ms: start,
        end_ms: end,
        resolution_ms: resolution,
        changes,
    }
}

fn figures<'a>(changes: impl Iterator<Item = &'a Change>) -> Map<String, Value> {
    let mut out = Map::new();
    let mut by_type = Map::new();
    for c in changes {
        match &c.metric {
            Metric::Total => {
                out.insert("total".into(), json!(c.value));
            }
            Metric::Words => {
                out.insert("words".into(), json!(c.value));
            }
            Metric::Type(t) => {
                by_type.insert(t.clone(), json!(c.value));
            }
        }
    }
    out.insert("byType".into(), Value::Object(by_type));
    out
}

/// The frames of a closed bucket: `category:analytics` with every series, `project:{id}`
/// with that project's.
pub fn frames(bucket: &ClosedBucket) -> Vec<(Channel, Value)> {
    let head = |m: &mut Map<String, Value>| {
        m.insert("kind".into(), json!("metrics"));
        m.insert("resolution".into(), json!(label(bucket.resolution_ms)));
        m.insert("start".into(), json!(rfc3339(bucket.start_ms)));
        m.insert("end".into(), json!(rfc3339(bucket.end_ms)));
    };
    let mut projects: BTreeMap<&str, Vec<&Change>> = BTreeMap::new();
    for c in &bucket.changes {
        if let Some(p) = &c.project {
            projects.entry(p.as_str()).or_default().push(c);
        }
    }
    let mut all = Map::new();
    head(&mut all);
    all.extend(figures(
        bucket.changes.iter().filter(|c| c.project.is_none()),
    ));
    let mut per_project = Map::new();
    let mut out = Vec::new();
    for (p, changes) in &projects {
        let f = figures(changes.iter().copied());
        per_project.insert(p.to_string(), Value::Object(f.clone()));
        let mut m = Map::new();
        head(&mut m);
        m.insert("projectId".into(), json!(p));
        m.extend(f);
        out.push((Channel::new(ChannelKind::Project, *p), Value::Object(m)));
    }
    all.insert("projects".into(), Value::Object(per_project));
    out.insert(
        0,
        (
            Channel::new(ChannelKind::Category, "analytics"),
            Value::Object(all),
        ),
    );
    out
}

/// Ticks until `shutdown` (module doc).
pub async fn run_closer(
    js: jetstream::Context,
    redis: ConnectionManager,
    config: Arc<AnalyticsConfig>,
    floors: Floors,
    mut shutdown: inkwire_shared::consumer::Shutdown,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(config.push_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closer = Closer {
        js,
        redis,
        config,
        floors,
        instance: uuid::Uuid::new_v4().simple().to_string(),
        consumers: HashMap::new(),
        stored: HashMap::new(),
        floors_read_at: 0,
        hook_failures: (0, 0),
    };
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(e) = closer.tick().await {
                    tracing::warn!(error = %e, "analytics closer tick failed");
                }
            }
            _ = shutdown.wait() => {
                // Hand the lease over at once: a restarted or other instance pushes the next
                // bucket on time instead of after the lease's expiry.
                let _ = closer.release().await;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_frames_carry_only_their_project() {
        let fields: HashMap<String, i64> = [
            ("total", 3),
            ("t:word_added", 3),
            ("words", 9),
            ("p:a:total", 2),
            ("p:a:t:word_added", 2),
            ("p:a:words", 5),
            ("p:b:total", 1),
            ("p:b:t:word_added", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bucket = closed_bucket(0, 5000, 5000, &fields);
        let frames = frames(&bucket);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].0.to_string(), "category:analytics");
        assert_eq!(frames[0].1["total"], 3);
        assert_eq!(frames[0].1["projects"]["a"]["words"], 5);
        assert_eq!(frames[1].0.to_string(), "project:a");
        assert_eq!(frames[1].1["byType"]["word_added"], 2);
        assert!(frames[1].1.get("projects").is_none());
        assert_eq!(frames[2].1["projectId"], "b");
        assert!(frames[2].1.get("words").is_none());
    }
}
