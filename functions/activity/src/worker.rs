//! The activity worker: one durable consumer per source (shared's consumer runner) and the
//! retention sweep.
//!
//! A message is applied once: `store::record` goes through `shared::idempotency::apply_once`
//! (the source's high-water mark and window of applied sequences, checked and advanced in
//! the same script as the write), so a redelivery after a crash between the write and the
//! ack, or a retry that comes after later messages, changes nothing.
//!
//! The sweep is a ticker that claims due users from the `inkwire:activity:sweep` due queue
//! (leases, so several instances share the work and a dead one loses nothing) and trims each;
//! no task sleeps per user.

use std::time::Duration;

use async_nats::jetstream;
use inkwire_shared::config::{Config, ConfigError, parse_duration};
use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Shutdown};
use redis::aio::ConnectionManager;
use time::OffsetDateTime;

use crate::sources::{Clock, Read, Source, sources};
use crate::store;

/// The activity log's settings.
#[derive(Debug, Clone)]
pub struct ActivityConfig {
    /// How long entries are kept (`INKWIRE_ACTIVITY_RETENTION`, 30 days).
    pub retention: Duration,
    /// How often the sweep looks for users to trim (`INKWIRE_ACTIVITY_SWEEP_INTERVAL`, 1 min).
    pub sweep_interval: Duration,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        ActivityConfig {
            retention: Duration::from_secs(30 * 24 * 3600),
            sweep_interval: Duration::from_secs(60),
        }
    }
}

impl ActivityConfig {
    pub fn from_env() -> Result<ActivityConfig, ConfigError> {
        let mut c = ActivityConfig::default();
        let durations: [(&'static str, &mut Duration); 2] = [
            ("INKWIRE_ACTIVITY_RETENTION", &mut c.retention),
            ("INKWIRE_ACTIVITY_SWEEP_INTERVAL", &mut c.sweep_interval),
        ];
        for (name, slot) in durations {
            if let Ok(v) = std::env::var(name) {
                *slot = parse_duration(&v).map_err(|problem| ConfigError { name, problem })?;
                if slot.is_zero() {
                    return Err(ConfigError {
                        name,
                        problem: "must be more than zero".into(),
                    });
                }
            }
        }
        Ok(c)
    }

    pub fn retention_ms(&self) -> u64 {
        self.retention.as_millis() as u64
    }
}

pub fn now_ms() -> u64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

/// The clock window of the shared configuration (what the events API accepts).
pub fn clock(config: &Config) -> Clock {
    Clock {
        max_age_ms: config.max_event_age.as_millis() as u64,
        max_skew_ms: config.max_clock_skew.as_millis() as u64,
    }
}

/// Durable consumer name of a source.
pub fn durable(source: &Source) -> String {
    format!("activity-{}", source.name)
}

/// Applies one message of `source`: records it (once), skips what is not activity or is
/// older than the retention, dead-letters what is malformed, retries when Redis fails.
pub async fn apply(
    redis: &mut ConnectionManager,
    source: &Source,
    d: &Delivery,
    clock: Clock,
    retention_ms: u64,
) -> Result<bool, HandlerError> {
    let activity = match (source.read)(d, clock) {
        Read::Record(a) => a,
        Read::Skip => return Ok(false),
        Read::Bad(why) => return Err(HandlerError::Permanent(why)),
    };
    let now = now_ms();
    if activity.at_ms.saturating_add(retention_ms) < now {
        return Ok(false);
    }
    store::record(
        redis,
        source.name,
        d.stream_sequence,
        &activity,
        now,
        retention_ms,
    )
    .await
    .map_err(|e| HandlerError::Retry(format!("redis: {e}")))
}

/// The consumer of one source: in stream order, one message at a time (module doc).
pub fn spec(source: &Source) -> ConsumerSpec {
    let mut spec =
        ConsumerSpec::new(source.stream.clone(), durable(source)).filter(source.filter.clone());
    spec.batch = 1;
    spec.max_ack_pending = Some(1);
    spec
}

/// Runs every source's consumer and the sweep until `shutdown`.
pub async fn run_worker(
    js: jetstream::Context,
    redis: ConnectionManager,
    shared: Config,
    config: ActivityConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let clock = clock(&shared);
    let retention_ms = config.retention_ms();
    let mut tasks = Vec::new();
    for source in sources() {
        let spec = spec(&source);
        let redis = redis.clone();
        tasks.push(tokio::spawn(consumer::run(
            js.clone(),
            spec,
            move |d| {
                let (source, mut redis) = (source.clone(), redis.clone());
                async move {
                    apply(&mut redis, &source, &d, clock, retention_ms)
                        .await
                        .map(|_| ())
                }
            },
            shutdown.clone(),
        )));
    }
    let sweeper = tokio::spawn(run_sweep(redis, config, shutdown));
    for task in tasks {
        let stats = task.await??;
        tracing::info!(?stats, "activity consumer stopped");
    }
    sweeper.await??;
    Ok(())
}

/// One sweep pass: trims every user that is due; returns how many were trimmed.
pub async fn sweep(
    redis: &mut ConnectionManager,
    config: &ActivityConfig,
) -> anyhow::Result<usize> {
    let now = now_ms();
    let leases = store::sweep_queue().claim(redis, now, 500, 60_000).await?;
    for lease in &leases {
        store::sweep_one(redis, lease, now, config.retention_ms()).await?;
    }
    Ok(leases.len())
}

/// Sweeps every `sweep_interval` until `shutdown`.
pub async fn run_sweep(
    mut redis: ConnectionManager,
    config: ActivityConfig,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(config.sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(e) = sweep(&mut redis, &config).await {
                    tracing::warn!(error = %e, "activity sweep failed");
                }
            }
            _ = shutdown.wait() => return Ok(()),
        }
    }
}
