//! The analytics worker: one durable consumer (`analytics`) per category stream, and the
//! closer that pushes closed buckets (`closer.rs`).
//!
//! The consumers run on the shared write-behind runner: the messages it hands over are held
//! (nothing is counted in memory), and each flush counts everything held since the last one
//! with one script call (`store::apply_batch`) in a background task, so the next batch is
//! fetched while Redis runs the script (one call in flight per stream keeps the order of the
//! applied set's trims). Each message is acked once the call that counted it returned, so a
//! crash between the script and the acks redelivers messages the script then skips. A failed
//! call naks its messages for a retry (it wrote nothing: the script is atomic).

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
    // Held + two calls in flight + acks on their way: a smaller window stalls deliveries.
    spec.max_ack_pending = Some((config.batch as i64 * 8).max(100));
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
    /// Handed over by the runner and not yet in a call.
    held: Vec<Delivery>,
    /// Calls on their way, oldest first (at most [`IN_FLIGHT`]).
    in_flight: std::collections::VecDeque<Counting>,
}

/// Script calls in flight per stream. Two keep Redis busy: one batch is built and sent while
/// the script of the one before runs. Calls may run in any order: their messages differ,
/// each is atomic, and the floor trims only acknowledged messages.
const IN_FLIGHT: usize = 2;

/// A script call on its way: the sequences it covers, and its answer once in.
struct Counting {
    seqs: Vec<u64>,
    task: tokio::task::JoinHandle<Result<store::BatchOutcome, String>>,
    report: Option<Result<store::BatchOutcome, String>>,
}

impl Counting {
    fn done(&self) -> bool {
        self.report.is_some() || self.task.is_finished()
    }

    /// The outcome of each of its messages (waits for the call if needed).
    async fn outcomes(mut self, stream: &str) -> Vec<(u64, Result<(), HandlerError>)> {
        let report = match self.report.take() {
            Some(r) => r,
            None => joined((&mut self.task).await),
        };
        match report {
            Ok(_) => self.seqs.into_iter().map(|s| (s, Ok(()))).collect(),
            Err(why) => {
                tracing::warn!(stream, %why, "counting failed; retrying");
                self.seqs
                    .into_iter()
                    .map(|s| (s, Err(HandlerError::Retry(why.clone()))))
                    .collect()
            }
        }
    }
}

impl StreamCounter {
    /// Settles the finished calls at the front; with `room`, also waits for the oldest
    /// until fewer than [`IN_FLIGHT`] remain.
    async fn settle_counting(&mut self, room: bool) -> Vec<(u64, Result<(), HandlerError>)> {
        let mut settled = Vec::new();
        while let Some(c) = self.in_flight.front() {
            let full = room && self.in_flight.len() >= IN_FLIGHT;
            if !(c.done() || full) {
                break;
            }
            let c = self.in_flight.pop_front().expect("a front exists");
            settled.extend(c.outcomes(&self.stream).await);
        }
        settled
    }

    /// Starts counting what is held, in the background.
    fn start_counting(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.held);
        let seqs = batch.iter().map(|d| d.stream_sequence).collect();
        let mut redis = self.redis.clone();
        let config = self.config.clone();
        let stream = self.stream.clone();
        let floor = self.floors.get(&stream);
        let task = tokio::spawn(async move {
            store::apply_batch(&mut redis, &config, &stream, floor, &batch)
                .await
                .map_err(|e| format!("redis: {e}"))
        });
        self.in_flight.push_back(Counting {
            seqs,
            task,
            report: None,
        });
    }
}

fn joined(
    r: Result<Result<store::BatchOutcome, String>, tokio::task::JoinError>,
) -> Result<store::BatchOutcome, String> {
    r.unwrap_or_else(|e| Err(format!("the counting task failed: {e}")))
}

impl WriteBehind for StreamCounter {
    async fn apply(&mut self, batch: Vec<Delivery>) -> Vec<Verdict> {
        let verdicts = batch.iter().map(|_| Verdict::Pending).collect();
        self.held.extend(batch);
        verdicts
    }

    async fn flush(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        let settled = self.settle_counting(true).await;
        self.start_counting();
        settled
    }

    async fn written(&mut self) {
        match self.in_flight.iter_mut().find(|c| c.report.is_none()) {
            Some(c) => {
                // Cancel-safe: the task keeps its result until it is awaited again.
                c.report = Some(joined((&mut c.task).await));
            }
            None => std::future::pending().await,
        }
    }

    async fn settle(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        self.settle_counting(false).await
    }

    fn writing(&self) -> usize {
        self.in_flight.iter().map(|c| c.seqs.len()).sum()
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
            held: Vec::new(),
            in_flight: std::collections::VecDeque::new(),
        };
        tasks.push(tokio::spawn(consumer::run_write_behind(
            js.clone(),
            spec(stream, &config),
            FlushPolicy {
                // Counts wait at most this long for a fuller call (the push lag's share).
                interval: Duration::from_millis(50),
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
