//! The presence worker: applies relay reports, sweeps instances whose heartbeat lapsed, and
//! turns idle users away. Safe to run on several instances at once.
//!
//! - Reports (`presence.report.{instanceId}`, stream PRESENCE) are read by one durable
//!   consumer with `consumer::run_concurrent`: one instance's reports in order, different
//!   instances' in parallel. Every report reschedules its instance in the
//!   `inkwire:presence:instances` due queue at `now + ttl`: the report is the heartbeat.
//!   Applying a report twice changes nothing (connections are fields, closed ones are
//!   marked), and a redelivered report pushes the current state again under the same
//!   message ids, so a push that failed the first time is not lost and none goes twice.
//! - The sweeper claims lapsed instances from that queue with a lease (`shared::due_queue`,
//!   so two workers never sweep the same instance at once, and a worker that dies mid-sweep
//!   leaves it to the next) and takes each of their connections offline; a user with a
//!   connection on a live instance keeps it and stays online. An instance that reports again
//!   after being swept (it was only late) is asked to resync.
//! - Idle checks: every change that leaves a user online schedules the user in
//!   `inkwire:presence:idle` at `lastActive + away_after`; when due, the status is derived
//!   again and an away user is pushed.

use std::collections::BTreeSet;
use std::time::Duration;

use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Shutdown};
use inkwire_shared::due_queue::DueQueue;
use inkwire_shared::membership::is_valid_id;
use inkwire_shared::subjects;
use inkwire_shared::user_presence::Report;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::config::PresenceConfig;
use crate::store::{self, Op, State, Status};

/// The durable consumer of the PRESENCE stream.
pub const DURABLE: &str = "presence-worker";
/// Claimed instances and idle users per sweep.
const CLAIM_BATCH: usize = 50;
/// How long a claim holds (a sweep of one instance is far shorter).
const LEASE_MS: u64 = 30_000;

#[derive(Clone)]
pub struct PresenceWorker {
    pub js: async_nats::jetstream::Context,
    pub nats: async_nats::Client,
    pub redis: ConnectionManager,
    pub config: PresenceConfig,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn retry(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Retry(e.to_string())
}

impl PresenceWorker {
    fn spec() -> ConsumerSpec {
        let mut spec = ConsumerSpec::new(subjects::PRESENCE_STREAM, DURABLE)
            .filter(format!("{}.report.>", subjects::PRESENCE_PREFIX));
        // Presence is about now: retry soon, and not for long.
        spec.backoff = vec![Duration::from_millis(200), Duration::from_secs(1)];
        spec.max_deliver = 10;
        spec.ack_wait = Duration::from_secs(10);
        spec
    }

    /// Pushes `state` when it changed (or always, on a redelivery: the first push may have
    /// failed; message ids make a second one a no-op), and schedules the idle check of an
    /// online user.
    async fn after(
        &self,
        user: &str,
        state: &State,
        redelivered: bool,
    ) -> Result<(), HandlerError> {
        let mut redis = self.redis.clone();
        if state.status == Status::Online {
            DueQueue::new(store::IDLE_QUEUE)
                .schedule(
                    &mut redis,
                    user,
                    state.last_active + self.config.away_after_ms(),
                )
                .await
                .map_err(retry)?;
        }
        if state.changed || redelivered {
            store::push(&self.js, &mut redis, user, state)
                .await
                .map_err(retry)?;
        }
        Ok(())
    }

    async fn op(&self, user: &str, op: Op<'_>, redelivered: bool) -> Result<(), HandlerError> {
        let mut redis = self.redis.clone();
        if let Some(state) =
            store::apply(&mut redis, user, &op, now_ms(), self.config.away_after_ms())
                .await
                .map_err(retry)?
        {
            self.after(user, &state, redelivered).await?;
        }
        Ok(())
    }

    /// Applies one report: heartbeat, opened, active, closed.
    pub async fn handle(&self, delivery: Delivery) -> Result<(), HandlerError> {
        let report: Report = serde_json::from_slice(&delivery.payload)
            .map_err(|e| HandlerError::Permanent(format!("not a presence report: {e}")))?;
        let instance = report.instance.as_str();
        if !is_valid_id(instance) || delivery.subject != subjects::presence_report_subject(instance)
        {
            return Err(HandlerError::Permanent(
                "the report's instance id is invalid or not its subject's".into(),
            ));
        }
        let redelivered = delivery.deliveries > 1;
        let mut redis = self.redis.clone();
        let now = now_ms();
        // The heartbeat first: a report from a swept instance asks it to resync.
        let swept: bool = redis
            .exists(store::swept_key(instance))
            .await
            .map_err(retry)?;
        let _: () = redis
            .hset(store::HEARTBEATS_KEY, instance, report.at_ms)
            .await
            .map_err(retry)?;
        DueQueue::new(store::INSTANCES_QUEUE)
            .schedule(
                &mut redis,
                instance,
                now + self.config.ttl.as_millis() as u64,
            )
            .await
            .map_err(retry)?;
        if swept {
            if report.resync {
                let _: () = redis.del(store::swept_key(instance)).await.map_err(retry)?;
            } else {
                // Asked again with every report until the resync comes (a core NATS request
                // can be lost); the relay sends one resync per request at most.
                let _ = self
                    .nats
                    .publish(subjects::presence_resync_subject(instance), "".into())
                    .await;
            }
        }
        let valid = |user: &str, connection: &str| {
            is_valid_id(user)
                && is_valid_id(connection)
                && connection.starts_with(instance)
                && connection.as_bytes().get(instance.len()) == Some(&b'-')
        };
        for o in &report.opened {
            if !valid(&o.user, &o.connection) || !o.device.is_valid() {
                tracing::warn!(connection = %o.connection, "presence: invalid opened entry skipped");
                continue;
            }
            let data = serde_json::json!({
                "instance": instance,
                "connectedAt": o.at_ms,
                "device": o.device,
            })
            .to_string();
            let op = Op::Open {
                instance,
                connection: &o.connection,
                data,
                at_ms: o.at_ms,
            };
            self.op(&o.user, op, redelivered).await?;
        }
        // Activity per user once (several tabs active in one interval are one touch).
        let mut active = BTreeSet::new();
        for a in &report.active {
            if valid(&a.user, &a.connection) && active.insert(a.user.as_str()) {
                let op = Op::Active {
                    connection: &a.connection,
                    at_ms: report.at_ms,
                };
                self.op(&a.user, op, redelivered).await?;
            }
        }
        for c in &report.closed {
            if !valid(&c.user, &c.connection) {
                continue;
            }
            let op = Op::Close {
                instance,
                connection: &c.connection,
                at_ms: c.at_ms,
            };
            self.op(&c.user, op, redelivered).await?;
        }
        Ok(())
    }

    /// Takes the connections of every instance whose heartbeat lapsed offline.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let mut redis = self.redis.clone();
        let queue = DueQueue::new(store::INSTANCES_QUEUE);
        let leases = queue
            .claim(&mut redis, now_ms(), CLAIM_BATCH, LEASE_MS)
            .await?;
        let mut swept = 0;
        for lease in leases {
            let instance = lease.member.as_str();
            if !is_valid_id(instance) {
                queue.done(&mut redis, &lease).await?;
                continue;
            }
            let last: Option<u64> = redis.hget(store::HEARTBEATS_KEY, instance).await?;
            let at_ms = last.unwrap_or_else(now_ms);
            let _: () = redis
                .set_ex(store::swept_key(instance), "1", 86_400)
                .await?;
            let members: Vec<String> = redis.smembers(store::instance_key(instance)).await?;
            tracing::info!(
                instance,
                connections = members.len(),
                "presence: sweeping a lapsed relay instance"
            );
            for member in &members {
                let Some((user, connection)) = member.split_once(':') else {
                    continue;
                };
                if !is_valid_id(user) || !is_valid_id(connection) {
                    continue;
                }
                let op = Op::Sweep {
                    instance,
                    connection,
                    at_ms,
                };
                self.op(user, op, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            // Only while the claim holds: a report that came meanwhile rescheduled the
            // instance (it lives), and that schedule stays.
            if queue.done(&mut redis, &lease).await? {
                let _: () = redis.hdel(store::HEARTBEATS_KEY, instance).await?;
            }
            swept += 1;
        }
        Ok(swept)
    }

    /// Derives the status of users whose idle time is up, pushing those who became away.
    pub async fn idle_checks(&self) -> anyhow::Result<usize> {
        let mut redis = self.redis.clone();
        let queue = DueQueue::new(store::IDLE_QUEUE);
        let leases = queue
            .claim(&mut redis, now_ms(), CLAIM_BATCH, LEASE_MS)
            .await?;
        let n = leases.len();
        for lease in leases {
            if is_valid_id(&lease.member) {
                // Done first: the check may schedule the user again (still online).
                queue.done(&mut redis, &lease).await?;
                self.op(&lease.member, Op::Check, false)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            } else {
                queue.done(&mut redis, &lease).await?;
            }
        }
        Ok(n)
    }
}

/// Runs the report consumer, the sweeper and the idle checks until `shutdown`.
pub async fn run_worker(worker: PresenceWorker, shutdown: Shutdown) -> anyhow::Result<()> {
    let ticker = {
        let worker = worker.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(worker.config.tick);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => return,
                }
                if let Err(e) = worker.sweep().await {
                    tracing::warn!(error = %e, "presence sweep failed; retrying next tick");
                }
                if let Err(e) = worker.idle_checks().await {
                    tracing::warn!(error = %e, "presence idle checks failed; retrying next tick");
                }
            }
        })
    };
    let w = worker.clone();
    let consumed = consumer::run_concurrent(
        worker.js.clone(),
        PresenceWorker::spec(),
        move |d| {
            let w = w.clone();
            async move { w.handle(d).await }
        },
        8,
        shutdown,
    )
    .await;
    let _ = ticker.await;
    consumed.map(|_| ())
}
