//! The analytics worker: one durable consumer (`analytics`) per category stream, and the
//! closer that pushes closed buckets (`closer.rs`).
//!
//! The consumers run on the shared write-behind runner only for its batching: every message
//! already fetched (up to `INKWIRE_ANALYTICS_BATCH`) is applied with one script call
//! (`store::apply_batch`) and acked once that call returned, so a crash between the script
//! and the acks redelivers messages the script then skips. Nothing is held between batches.
//! A failed call naks the whole batch for a retry (it wrote nothing: the script is atomic).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use inkwire_shared::consumer::{
    self, ConsumerSpec, Delivery, FlushPolicy, HandlerError, Shutdown, Verdict, WriteBehind,
};
use inkwire_shared::events::Category;
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;

use crate::closer;
use crate::config::AnalyticsConfig;
use crate::store::{self, CONSUMER};

/// Each stream's last known ack floor: messages at or below it are never redelivered, so
/// the applied set is trimmed there (`shared::idempotency::apply_counts_once`). Kept up to
/// date by the closer, which reads the consumers' state anyway.
#[derive(Debug, Clone, Default)]
pub struct Floors(Arc<HashMap<String, AtomicU64>>);

impl Floors {
    pub fn new(streams: &[String]) -> Floors {
        Floors(Arc::new(
            streams
                .iter()
                .map(|s| (s.clone(), AtomicU64::new(0)))
                .collect(),
        ))
    }

    pub fn get(&self, stream: &str) -> u64 {
        self.0
            .get(stream)
            .map(|f| f.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn raise(&self, stream: &str, floor: u64) {
        if let Some(f) = self.0.get(stream) {
            f.fetch_max(floor, Ordering::Relaxed);
        }
    }
}

/// Every category stream, in `Category::ALL` order.
pub fn streams() -> Vec<String> {
    Category::ALL
        .iter()
        .map(|c| subjects::event_stream(*c))
        .collect()
}

/// The consumer of one stream.
pub fn spec(stream: &str, config: &AnalyticsConfig) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(stream, CONSUMER);
    spec.batch = config.batch;
    spec.max_ack_pending = Some((config.batch as i64 * 4).max(100));
    // A count given up on is a count lost: retry a batch Redis refused for hours (1 s, 5 s,
    // 30 s, then every 2 min) before the runner dead-letters it.
    spec.max_deliver = MAX_DELIVER;
    spec
}

/// Deliveries of a message before it is dead-lettered (about three hours of retries).
pub const MAX_DELIVER: i64 = 100;

/// One stream's batches (see the module doc).
struct StreamCounter {
    redis: ConnectionManager,
    config: Arc<AnalyticsConfig>,
    stream: String,
    floors: Floors,
}

impl WriteBehind for StreamCounter {
    async fn apply(&mut self, batch: Vec<Delivery>) -> Vec<Verdict> {
        let floor = self.floors.get(&self.stream);
        match store::apply_batch(&mut self.redis, &self.config, &self.stream, floor, &batch).await {
            Ok(_) => batch.iter().map(|_| Verdict::Done).collect(),
            Err(e) => {
                let why = format!("redis: {e}");
                batch
                    .iter()
                    .map(|_| Verdict::Failed(HandlerError::Retry(why.clone())))
                    .collect()
            }
        }
    }

    async fn flush(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        Vec::new()
    }

    async fn written(&mut self) {
        std::future::pending::<()>().await
    }

    async fn settle(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        Vec::new()
    }
}

/// Runs the consumers of every category stream and the closer until `shutdown`.
pub async fn run_worker(
    js: jetstream::Context,
    redis: ConnectionManager,
    config: AnalyticsConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    run(js, redis, config, shutdown, true).await
}

/// [`run_worker`], optionally without the closer (tests that run consumers of their own).
pub async fn run(
    js: jetstream::Context,
    redis: ConnectionManager,
    config: AnalyticsConfig,
    shutdown: Shutdown,
    with_closer: bool,
) -> anyhow::Result<()> {
    config.check().map_err(|e| anyhow::anyhow!(e))?;
    let config = Arc::new(config);
    let names = streams();
    let floors = Floors::new(&names);
    let mut tasks = Vec::new();
    for stream in &names {
        let counter = StreamCounter {
            redis: redis.clone(),
            config: config.clone(),
            stream: stream.clone(),
            floors: floors.clone(),
        };
        tasks.push(tokio::spawn(consumer::run_write_behind(
            js.clone(),
            spec(stream, &config),
            FlushPolicy {
                interval: Duration::from_secs(1),
                max_pending: config.batch,
            },
            counter,
            shutdown.clone(),
        )));
    }
    let closer = with_closer.then(|| {
        tokio::spawn(closer::run_closer(
            js.clone(),
            redis.clone(),
            config.clone(),
            floors.clone(),
            shutdown.clone(),
        ))
    });
    for task in tasks {
        let stats = task.await??;
        tracing::info!(?stats, "analytics consumer stopped");
    }
    if let Some(closer) = closer {
        closer.await??;
    }
    Ok(())
}
