//! The notifier: the durable consumer of `notify.send.>` (stream `NOTIFY`, durable
//! `notifier`) that turns each recipient's [`Notification`] into an inbox item and delivery
//! jobs, and the path the scheduler shares with it for scheduled sends.
//!
//! A message is one recipient's notification (`notify.send.{userId}`) or a bulk job
//! (`notify.send.bulk.{eventId}`: the send API's job for several recipients, expanded into
//! each recipient's notification and handled together — the reads, plans, inbox changes,
//! events and pushes of all its recipients in a few round trips instead of a few each).
//!
//! Per message:
//! - a payload that is not a `Notification` (or a bulk job), whose recipient is not a valid
//!   id or is not the subject's, or whose category is not a category name is `Permanent`
//!   (dead-lettered);
//! - `sendAt` in the future: the notification JSON is kept at
//!   `inkwire:notify:scheduled:{id}:job` and `scheduled:{id}` enters the due queue at
//!   `sendAt`; the scheduler runs the path below then (unless it was cancelled);
//! - otherwise (and for a scheduled send that is due): a scheduled send is first flipped
//!   `pending → sent` (cancelled: nothing is delivered, in_app is logged `cancelled`); then
//!   the plan (`plan::plan` over the recipient's preferences, devices and mute state) is taken
//!   once and kept at `inkwire:notify:plan:{id}` ([`PLAN_KEEP`]), so a redelivery acts on the
//!   same decisions (the same hold time, the same digest window, the same mute verdict) —
//!   unless it holds in-app and skips only ([`StoredPlan::needs_keeping`]) —, and each
//!   channel's decision is carried out:
//!   in_app → `inbox::store` and `sent` logged in one round trip, then the push with the
//!   unread count; deliver → the
//!   `DeliveryJob` published (`Nats-Msg-Id` = job id) + `queued`; hold → the job kept at
//!   `inkwire:notify:held:{id}:{channel}` and `held:{id}:{channel}` in the due queue at the
//!   end of the quiet hours + `held_quiet_hours`; digest → the item added to its window
//!   (`digests`) + `digested`; mute → `muted`; skips → `skipped_preference` /
//!   `skipped_no_address` with the reason. `notification.notification_created` is published
//!   (event id: UUIDv5 of the notification id) before in_app is first logged.
//!
//! Every step is idempotent under redelivery: the inbox add is; a channel whose delivery log
//! already shows its step done (the job queued, the hold or digest under way, a final status)
//! is not acted on again; jobs and events dedupe by id in JetStream. Redis down or NATS down
//! is `Retry`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::Context;
use bytes::Bytes;
use futures::future::try_join_all;
use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Shutdown};
use inkwire_shared::due_queue::DueQueue;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish, publish_windowed};
use inkwire_shared::membership::is_valid_id;
use inkwire_shared::subjects;
use jiff::Timestamp;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::api::{load_preferences, preferences_from, read_preferences};
use crate::config::{NotifyConfig, is_valid_category_name};
use crate::delivery_job::DeliveryJob;
use crate::delivery_log::{self, AttemptInfo};
use crate::digests::{self, Added, DigestItem, DigestWindow};
use crate::inbox;
use crate::model::{DeliveryChannel, DeliveryStatus, Priority};
use crate::mute::{self, MuteDecision};
use crate::plan::{self, Decision, PlanInput, Providers};
use crate::preferences::Preferences;
use crate::routing::{RoutingTable, similarity_key};
use crate::send::{self, Notification};

/// The durable consumer's name.
pub const DURABLE: &str = "notifier";
/// `metadata.source` of the events the notifier publishes.
pub const SOURCE: &str = "notifier";
/// The due queue of held jobs, digests and scheduled sends (members `held:{id}:{channel}`,
/// `digest:{userId}:{key}:{windowStartMs}`, `scheduled:{id}`).
pub const DUE_QUEUE: &str = "inkwire:notify:due";
/// How long a notification's plan is kept (longer than any redelivery).
pub const PLAN_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a held job is kept after it was due.
pub const HELD_KEEP_AFTER_DUE: Duration = Duration::from_secs(7 * 24 * 3600);
/// A bulk job is delivered this many recipients at a time, one chunk after another.
pub const BULK_CHUNK: usize = 250;
/// Bulk chunks one notifier delivers at once, whatever the number of bulk jobs in hand: work
/// in flight stays bounded, so jobs finish one after another in a fraction of a second each
/// instead of all together, late (past their ack wait).
const BULK_CHUNKS_AT_ONCE: usize = 4;
/// Messages published at once for a batch of notifications (events, pushes).
const PUBLISH_WINDOW: usize = 256;
/// Default scheduler tick.
pub const DEFAULT_TICK: Duration = Duration::from_millis(250);
/// Notifications one notifier handles at once.
pub const DEFAULT_CONCURRENCY: usize = 128;
/// How long a scheduler instance holds a claimed due-queue entry.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The notifications due queue.
pub fn due_queue() -> DueQueue {
    DueQueue::new(DUE_QUEUE)
}

/// `inkwire:notify:plan:{notificationId}`.
pub fn plan_key(id: Uuid) -> String {
    format!("inkwire:notify:plan:{id}")
}

/// `inkwire:notify:scheduled:{notificationId}:job`: the notification of a scheduled send.
pub fn scheduled_job_key(id: Uuid) -> String {
    format!("{}:job", send::scheduled_key(id))
}

/// `scheduled:{notificationId}`.
pub fn scheduled_member(id: Uuid) -> String {
    format!("scheduled:{id}")
}

/// `inkwire:notify:held:{notificationId}:{channel}`: a job held for quiet hours.
pub fn held_key(id: Uuid, channel: DeliveryChannel) -> String {
    format!("inkwire:notify:held:{id}:{}", channel.as_str())
}

/// `held:{notificationId}:{channel}`.
pub fn held_member(id: Uuid, channel: DeliveryChannel) -> String {
    format!("held:{id}:{}", channel.as_str())
}

/// What the notifier and its scheduler need besides the notification settings.
#[derive(Debug, Clone)]
pub struct NotifierSettings {
    /// Priority → channels (`INKWIRE_NOTIFY_ROUTING`).
    pub routing: RoutingTable,
    /// Which external providers are configured: a channel without one is
    /// `skipped_no_address` (the delivery worker sends with them).
    pub providers: Providers,
    /// How often the scheduler claims due entries (`INKWIRE_NOTIFY_TICK`, 250 ms).
    pub tick: Duration,
    /// How long a claimed entry is held before another instance may take it.
    pub lease: Duration,
    /// Notifications handled at once by one notifier (`INKWIRE_NOTIFY_CONCURRENCY`, 128):
    /// every step is an atomic Redis script or an id-deduplicated publish, so their order
    /// does not matter, and the round trips of many overlap.
    pub concurrency: usize,
}

impl Default for NotifierSettings {
    fn default() -> Self {
        NotifierSettings {
            routing: RoutingTable::default(),
            providers: Providers::NONE,
            tick: DEFAULT_TICK,
            lease: DEFAULT_LEASE,
            concurrency: DEFAULT_CONCURRENCY,
        }
    }
}

impl NotifierSettings {
    pub fn from_env() -> anyhow::Result<NotifierSettings> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the settings through `get`. Providers count as configured exactly as the delivery
    /// worker's [`crate::providers::ProviderConfig`] reads them.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<NotifierSettings> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut s = NotifierSettings {
            routing: match get(crate::routing::ROUTING_ENV) {
                Some(spec) => RoutingTable::parse(&spec)?,
                None => RoutingTable::default(),
            },
            ..NotifierSettings::default()
        };
        // One reading of the provider variables, the delivery worker's own.
        s.providers =
            crate::providers::configured(&crate::providers::ProviderConfig::from_lookup(get)?);
        if let Some(v) = get("INKWIRE_NOTIFY_CONCURRENCY") {
            s.concurrency = v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=4096).contains(n))
                .ok_or_else(|| {
                    anyhow::anyhow!("INKWIRE_NOTIFY_CONCURRENCY: {v:?} is not a number in 1..=4096")
                })?;
        }
        if let Some(v) = get("INKWIRE_NOTIFY_TICK") {
            let d = inkwire_shared::config::parse_duration(&v)
                .map_err(|e| anyhow::anyhow!("INKWIRE_NOTIFY_TICK: {e}"))?;
            if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
                anyhow::bail!("INKWIRE_NOTIFY_TICK: {v:?} is outside 10ms..=60s");
            }
            s.tick = d;
        }
        Ok(s)
    }
}

/// One channel's decision as kept in the stored plan (times in Unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "decision",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum StoredDecision {
    Deliver,
    Hold {
        until_ms: i64,
    },
    Digest {
        key: String,
        due_ms: i64,
        window_start_ms: i64,
    },
    Mute,
    SkipPreference,
    SkipNoAddress {
        reason: String,
    },
}

impl StoredDecision {
    fn of(decision: &Decision, channel: DeliveryChannel) -> StoredDecision {
        match decision {
            Decision::Deliver => StoredDecision::Deliver,
            Decision::Hold { until } => StoredDecision::Hold {
                until_ms: until.as_millisecond(),
            },
            Decision::Digest {
                key,
                due,
                window_start,
            } => StoredDecision::Digest {
                key: key.clone(),
                due_ms: due.as_millisecond(),
                window_start_ms: window_start.as_millisecond(),
            },
            Decision::Mute => StoredDecision::Mute,
            Decision::SkipPreference => StoredDecision::SkipPreference,
            Decision::SkipNoAddress { reason } => StoredDecision::SkipNoAddress {
                reason: reason.message(channel),
            },
        }
    }

    /// The delivery-log status the decision starts with.
    pub fn status(&self) -> DeliveryStatus {
        match self {
            StoredDecision::Deliver => DeliveryStatus::Queued,
            StoredDecision::Hold { .. } => DeliveryStatus::HeldQuietHours,
            StoredDecision::Digest { .. } => DeliveryStatus::Digested,
            StoredDecision::Mute => DeliveryStatus::Muted,
            StoredDecision::SkipPreference => DeliveryStatus::SkippedPreference,
            StoredDecision::SkipNoAddress { .. } => DeliveryStatus::SkippedNoAddress,
        }
    }
}

/// One channel of a stored plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredChannel {
    pub channel: DeliveryChannel,
    #[serde(flatten)]
    pub decision: StoredDecision,
}

/// The decisions taken for one notification, kept at `plan_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredPlan {
    pub channels: Vec<StoredChannel>,
    /// Similar notifications muted before this one, reported by its jobs.
    pub muted_count: u32,
}

impl StoredPlan {
    /// Whether a redelivery must find this plan rather than take it again: it holds a
    /// decision that depends on when it was taken or on what came before (a send or hold on
    /// an external channel, which met the mute window; a digest window; a mute verdict).
    /// A plan of in-app and skips only is taken again from the preferences, and the delivery
    /// log keeps a redelivery from acting twice on a channel, so it is not stored (one
    /// Redis key and command fewer per in-app notification).
    pub fn needs_keeping(&self) -> bool {
        self.channels.iter().any(|c| {
            c.channel != DeliveryChannel::InApp
                && matches!(
                    c.decision,
                    StoredDecision::Deliver
                        | StoredDecision::Hold { .. }
                        | StoredDecision::Digest { .. }
                        | StoredDecision::Mute
                )
        })
    }
}

fn retry(what: &str, e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Retry(format!("{what}: {e}"))
}

fn redis_retry(e: redis::RedisError) -> HandlerError {
    retry("redis", e)
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A notification from a `notify.send.{userId}` message, checked (module doc).
pub fn parse_notification(subject: &str, payload: &[u8]) -> Result<Notification, HandlerError> {
    let n: Notification = serde_json::from_slice(payload)
        .map_err(|e| HandlerError::Permanent(format!("not a notification: {e}")))?;
    if !is_valid_id(&n.user_id) {
        return Err(HandlerError::Permanent(format!(
            "userId {:?} is not a valid id",
            inkwire_shared::problem::clip(&n.user_id, 64)
        )));
    }
    if subject != n.subject() {
        return Err(HandlerError::Permanent(format!(
            "notification for {:?} on subject {subject:?}",
            n.user_id
        )));
    }
    if !is_valid_category_name(&n.category) {
        return Err(HandlerError::Permanent(format!(
            "category {:?} is not a category name",
            inkwire_shared::problem::clip(&n.category, 64)
        )));
    }
    Ok(n)
}

/// What a scheduled send's record said when it came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Deliver it (pending → sent now, or sent before by an earlier attempt, or no record).
    Send,
    /// Cancelled before it was due: nothing is delivered.
    Cancelled,
}

/// KEYS: scheduled record. Returns missing / cancelled / sent (flipping pending → sent).
const RELEASE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 'missing' end
local rec = cjson.decode(cur)
if rec.state == 'cancelled' then return 'cancelled' end
if rec.state == 'pending' then
  rec.state = 'sent'
  redis.call('SET', KEYS[1], cjson.encode(rec), 'KEEPTTL')
end
return 'sent'
"#;
static RELEASE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RELEASE));

/// The notifier (and the scheduler, which shares its delivery path).
#[derive(Clone)]
pub struct Notifier {
    pub js: Context,
    pub redis: ConnectionManager,
    pub config: Arc<NotifyConfig>,
    pub settings: Arc<NotifierSettings>,
    /// Bulk chunks being delivered at once (see [`BULK_CHUNK`]).
    chunks: Arc<tokio::sync::Semaphore>,
}

impl Notifier {
    pub fn new(
        js: Context,
        redis: ConnectionManager,
        config: Arc<NotifyConfig>,
        settings: Arc<NotifierSettings>,
    ) -> Notifier {
        Notifier {
            js,
            redis,
            config,
            settings,
            chunks: Arc::new(tokio::sync::Semaphore::new(BULK_CHUNKS_AT_ONCE)),
        }
    }

    /// The consumer of `notify.send.>`.
    pub fn spec() -> ConsumerSpec {
        let mut spec = ConsumerSpec::new(subjects::NOTIFY_STREAM, DURABLE)
            .filter(format!("{}.send.>", subjects::NOTIFY_PREFIX));
        // Enough buffered to keep `concurrency` handlers busy (the server allows four batches
        // unacknowledged).
        spec.batch = 256;
        spec
    }

    /// Handles one `notify.send.>` message: a recipient's notification or a bulk job
    /// (module doc).
    pub async fn handle(&self, delivery: Delivery) -> Result<(), HandlerError> {
        let notifications = match send::bulk_event_id(&delivery.subject) {
            Some(event_id) => parse_bulk(event_id, &delivery.payload)?,
            None => vec![parse_notification(&delivery.subject, &delivery.payload)?],
        };
        self.handle_all(notifications).await
    }

    /// Schedules the notifications that are not due yet, releases the scheduled ones that
    /// are, and delivers the rest together.
    async fn handle_all(&self, notifications: Vec<Notification>) -> Result<(), HandlerError> {
        let now = OffsetDateTime::now_utc();
        let mut immediate = Vec::with_capacity(notifications.len());
        let mut later = Vec::new();
        let mut due = Vec::new();
        for n in notifications {
            match n.send_at {
                Some(at) if at > now => later.push((n, at)),
                Some(_) => due.push(n),
                None => immediate.push(n),
            }
        }
        try_join_all(later.iter().map(|(n, at)| self.schedule(n, *at, now))).await?;
        let released = try_join_all(due.iter().map(|n| self.release(n))).await?;
        immediate.extend(
            due.into_iter()
                .zip(released)
                .filter(|(_, r)| *r == Release::Send)
                .map(|(n, _)| n),
        );
        if immediate.len() <= 1 {
            return self.deliver_many(&immediate).await;
        }
        for chunk in immediate.chunks(BULK_CHUNK) {
            let _permit = self.chunks.acquire().await.expect("never closed");
            self.deliver_many(chunk).await?;
        }
        Ok(())
    }

    /// Keeps a scheduled send until `at` (module doc).
    async fn schedule(
        &self,
        n: &Notification,
        at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<(), HandlerError> {
        let mut redis = self.redis.clone();
        let keep = (at - now).unsigned_abs() + send::SCHEDULED_KEEP_AFTER_DUE;
        let _: () = redis::cmd("SET")
            .arg(scheduled_job_key(n.id))
            .arg(serde_json::to_string(n).expect("notifications serialize"))
            .arg("EX")
            .arg(keep.as_secs().max(1))
            .query_async(&mut redis)
            .await
            .map_err(redis_retry)?;
        let at_ms = (at.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        due_queue()
            .schedule_if_absent(&mut redis, &scheduled_member(n.id), at_ms)
            .await
            .map_err(redis_retry)?;
        Ok(())
    }

    /// Flips a due scheduled send to `sent` (or finds it cancelled: in_app logged
    /// `cancelled`, nothing delivered).
    pub async fn release(&self, n: &Notification) -> Result<Release, HandlerError> {
        let mut redis = self.redis.clone();
        let state: String = RELEASE_SCRIPT
            .key(send::scheduled_key(n.id))
            .invoke_async(&mut redis)
            .await
            .map_err(redis_retry)?;
        if state == "cancelled" {
            delivery_log::record(
                &mut redis,
                n.id,
                DeliveryChannel::InApp,
                DeliveryStatus::Cancelled,
                &AttemptInfo::default(),
            )
            .await
            .map_err(redis_retry)?;
            return Ok(Release::Cancelled);
        }
        Ok(Release::Send)
    }

    /// A scheduled send that is due: released, then delivered like an immediate one.
    pub async fn release_and_deliver(&self, n: &Notification) -> Result<(), HandlerError> {
        match self.release(n).await? {
            Release::Cancelled => Ok(()),
            Release::Send => self.deliver_now(n).await,
        }
    }

    /// The immediate path (module doc) for one notification.
    pub async fn deliver_now(&self, n: &Notification) -> Result<(), HandlerError> {
        self.deliver_many(std::slice::from_ref(n)).await
    }

    /// The immediate path (module doc) for many notifications at once: what the decisions
    /// need is read for all in one round trip, the new plans kept in one, the
    /// `notification_created` events published together, the inbox changes and their log
    /// entries made in one round trip and the pushes published together; other channels
    /// are acted on per notification. Every step is idempotent, so a failure anywhere
    /// retries the whole message and a redelivery finishes what is missing.
    pub async fn deliver_many(&self, ns: &[Notification]) -> Result<(), HandlerError> {
        if ns.is_empty() {
            return Ok(());
        }
        let mut redis = self.redis.clone();
        // Everything the decisions need: a plan kept by an earlier handling, the delivery
        // log, the recipient's preferences and devices (four answers per notification).
        let mut pipe = redis::pipe();
        for n in ns {
            pipe.cmd("GET")
                .arg(plan_key(n.id))
                .cmd("HGETALL")
                .arg(delivery_log::key(n.id));
            read_preferences(&mut pipe, &n.user_id);
        }
        let answers: Vec<redis::Value> = pipe.query_async(&mut redis).await.map_err(redis_retry)?;
        if answers.len() != ns.len() * 4 {
            return Err(retry(
                "redis",
                format!("{} answers to {} reads", answers.len(), ns.len() * 4),
            ));
        }
        let mut plans: Vec<Option<StoredPlan>> = Vec::with_capacity(ns.len());
        let mut logs: Vec<HashMap<DeliveryChannel, DeliveryStatus>> = Vec::with_capacity(ns.len());
        let mut prefs: Vec<Option<Preferences>> = Vec::with_capacity(ns.len());
        for chunk in answers.chunks(4) {
            let stored: Option<String> = from_value(&chunk[0])?;
            let log: HashMap<String, String> = from_value(&chunk[1])?;
            let plan = stored.and_then(|s| serde_json::from_str::<StoredPlan>(&s).ok());
            prefs.push(if plan.is_none() {
                Some(preferences_from(
                    from_value(&chunk[2])?,
                    from_value(&chunk[3])?,
                ))
            } else {
                None
            });
            plans.push(plan);
            logs.push(logged_statuses(log));
        }
        // Plans for the notifications that have none yet, kept in one round trip.
        let taken = try_join_all(ns.iter().zip(&prefs).map(|(n, p)| async move {
            match p {
                Some(p) => self.take_plan(n, p).await.map(Some),
                None => Ok(None),
            }
        }))
        .await?;
        let mut pipe = redis::pipe();
        let mut keeping = Vec::new();
        for (i, plan) in taken.iter().enumerate() {
            if let Some(plan) = plan.as_ref().filter(|p| p.needs_keeping()) {
                // SET NX … GET: the plan kept first wins (a concurrent handling of the same
                // message).
                pipe.cmd("SET")
                    .arg(plan_key(ns[i].id))
                    .arg(serde_json::to_string(plan).expect("plans serialize"))
                    .arg("NX")
                    .arg("GET")
                    .arg("EX")
                    .arg(PLAN_KEEP.as_secs());
                keeping.push(i);
            }
        }
        if !keeping.is_empty() {
            let previous: Vec<Option<String>> =
                pipe.query_async(&mut redis).await.map_err(redis_retry)?;
            for (i, previous) in keeping.into_iter().zip(previous) {
                let mine = taken[i].clone();
                plans[i] = previous
                    .and_then(|p| serde_json::from_str(&p).ok())
                    .or(mine);
            }
        }
        let plans: Vec<StoredPlan> = plans
            .into_iter()
            .zip(taken)
            .map(|(kept, taken)| kept.or(taken).expect("every notification has a plan"))
            .collect();

        self.in_app_many(&mut redis, ns, &plans, &logs).await?;

        // The other channels, one notification's after another's in order, notifications
        // side by side.
        try_join_all(ns.iter().zip(&plans).zip(&logs).map(|((n, plan), logged)| {
            let mut redis = self.redis.clone();
            async move {
                for c in &plan.channels {
                    if c.channel != DeliveryChannel::InApp {
                        self.act(
                            &mut redis,
                            n,
                            c.channel,
                            &c.decision,
                            logged.get(&c.channel).copied(),
                            plan.muted_count,
                        )
                        .await?;
                    }
                }
                Ok::<(), HandlerError>(())
            }
        }))
        .await?;
        Ok(())
    }

    /// The in-app channel of many notifications: each one's `notification_created` event
    /// goes out before its in_app is first logged (so a redelivery after that, even past
    /// JetStream's duplicate window, does not publish it again); then every inbox change and
    /// its `sent` log entry (or the other decision's entry) in one round trip; then the
    /// pushes with the new unread counts. A redelivery adds again (a no-op that pushes the
    /// current count again), so `sent` may be logged before the push is out.
    async fn in_app_many(
        &self,
        redis: &mut ConnectionManager,
        ns: &[Notification],
        plans: &[StoredPlan],
        logs: &[HashMap<DeliveryChannel, DeliveryStatus>],
    ) -> Result<(), HandlerError> {
        let in_app: Vec<(usize, &StoredDecision, Option<DeliveryStatus>)> = plans
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let c = p
                    .channels
                    .iter()
                    .find(|c| c.channel == DeliveryChannel::InApp)?;
                Some((
                    i,
                    &c.decision,
                    logs[i].get(&DeliveryChannel::InApp).copied(),
                ))
            })
            .collect();
        if in_app.is_empty() {
            return Ok(());
        }
        let events: Vec<Outgoing> = in_app
            .iter()
            .filter(|(_, _, logged)| logged.is_none())
            .map(|(i, _, _)| created_outgoing(&ns[*i]))
            .collect();
        if !events.is_empty() {
            publish_windowed(&self.js, events, PUBLISH_WINDOW)
                .await
                .map_err(|e| retry("publishing notification_created", e))?;
        }
        let mut pipe = redis::pipe();
        // (notification index, index of its inbox answer) of every inbox change.
        let mut adds = Vec::new();
        let mut commands = 0;
        for (i, decision, logged) in &in_app {
            let n = &ns[*i];
            let status = decision.status();
            if **decision == StoredDecision::Deliver {
                pipe.add_command(inbox::store_cmd(n, self.config.inbox_limit));
                adds.push((*i, commands));
                commands += 1;
                let status = DeliveryStatus::Sent;
                if *logged != Some(status) {
                    pipe.add_command(delivery_log::record_cmd(
                        n.id,
                        DeliveryChannel::InApp,
                        status,
                        &AttemptInfo::default(),
                    ));
                    commands += 1;
                }
            } else if *logged != Some(status) {
                pipe.add_command(delivery_log::record_cmd(
                    n.id,
                    DeliveryChannel::InApp,
                    status,
                    &AttemptInfo::default(),
                ));
                commands += 1;
            }
        }
        if commands == 0 {
            return Ok(());
        }
        let answers: Vec<redis::Value> = match pipe.query_async(redis).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis lost its scripts (a restart): loaded, and everything sent again
                // (each command is idempotent).
                inbox::load_scripts(redis).await.map_err(redis_retry)?;
                delivery_log::load_scripts(redis)
                    .await
                    .map_err(redis_retry)?;
                pipe.query_async(redis).await.map_err(redis_retry)?
            }
            other => other.map_err(redis_retry)?,
        };
        let mut pushes = Vec::with_capacity(adds.len());
        for (i, at) in adds {
            let added = answers
                .get(at)
                .ok_or_else(|| retry("redis", "an inbox change was not answered"))
                .and_then(|v| inbox::stored(v).map_err(redis_retry))?;
            pushes.push(inbox::added_push(&ns[i], added));
        }
        publish_windowed(&self.js, pushes, PUBLISH_WINDOW)
            .await
            .map_err(|e| retry("pushing the inbox change", e))?;
        Ok(())
    }

    /// Takes the plan for `n` (preferences, devices, mute state); the caller keeps it.
    async fn take_plan(
        &self,
        n: &Notification,
        prefs: &Preferences,
    ) -> Result<StoredPlan, HandlerError> {
        let mut redis = self.redis.clone();
        let redis = &mut redis;
        let now = Timestamp::now();
        let mut input = self.plan_input(n, prefs, now);
        let mut planned = plan::plan(&input);
        let mut muted_count = 0;
        // Only a notification that would go out on an external channel starts or meets a
        // mute window; critical ones are never muted (and do not mute others).
        let sends = planned.iter().any(|p| {
            p.channel.is_external()
                && matches!(p.decision, Decision::Deliver | Decision::Hold { .. })
        });
        if sends && n.priority != Priority::Critical && prefs.mute_window_seconds > 0 {
            let key = similarity_key(
                &n.category,
                n.group_key.as_deref(),
                n.template.as_deref(),
                &n.title,
            );
            match mute::check_and_record(
                redis,
                n.id,
                &n.user_id,
                &key,
                Duration::from_secs(prefs.mute_window_seconds),
                now.as_millisecond().max(0) as u64,
            )
            .await
            .map_err(redis_retry)?
            {
                MuteDecision::Send { muted_count: c } => muted_count = c,
                MuteDecision::Muted => {
                    input.recently_sent_similar = true;
                    planned = plan::plan(&input);
                }
            }
        }
        let plan = StoredPlan {
            channels: planned
                .iter()
                .map(|p| StoredChannel {
                    channel: p.channel,
                    decision: StoredDecision::of(&p.decision, p.channel),
                })
                .collect(),
            muted_count,
        };
        Ok(plan)
    }

    fn plan_input<'a>(
        &'a self,
        n: &'a Notification,
        prefs: &'a Preferences,
        now: Timestamp,
    ) -> PlanInput<'a> {
        PlanInput {
            priority: n.priority,
            category: &n.category,
            channels: n.channels.as_deref(),
            group_key: n.group_key.as_deref(),
            preferences: prefs,
            has_devices: !prefs.devices.is_empty(),
            providers: self.settings.providers,
            now,
            recently_sent_similar: false,
            routing: &self.settings.routing,
        }
    }

    /// Carries out one external channel's decision unless the delivery log shows it done.
    async fn act(
        &self,
        redis: &mut ConnectionManager,
        n: &Notification,
        channel: DeliveryChannel,
        decision: &StoredDecision,
        logged: Option<DeliveryStatus>,
        muted_count: u32,
    ) -> Result<(), HandlerError> {
        let status = decision.status();
        // The step is done and the channel moved on (queued → sent, held → queued, …): a
        // redelivery changes nothing. The same status means the step may be unfinished; every
        // step below is idempotent, so it is done again.
        let moved_on = logged.is_some_and(|l| l != status);
        debug_assert!(
            channel != DeliveryChannel::InApp,
            "in_app is acted on by in_app_many"
        );
        if moved_on {
            return Ok(());
        }
        match decision {
            StoredDecision::Deliver => {
                if logged.is_none() {
                    self.publish_job(&self.job(n, channel, muted_count)).await?;
                }
            }
            StoredDecision::Hold { until_ms } => {
                let job = self.job(n, channel, muted_count);
                let keep = Duration::from_millis((until_ms - now_ms()).max(0) as u64)
                    + HELD_KEEP_AFTER_DUE;
                let _: () = redis::cmd("SET")
                    .arg(held_key(n.id, channel))
                    .arg(serde_json::to_string(&job).expect("jobs serialize"))
                    .arg("EX")
                    .arg(keep.as_secs().max(1))
                    .query_async(redis)
                    .await
                    .map_err(redis_retry)?;
                due_queue()
                    .schedule_if_absent(
                        redis,
                        &held_member(n.id, channel),
                        (*until_ms).max(0) as u64,
                    )
                    .await
                    .map_err(redis_retry)?;
            }
            StoredDecision::Digest {
                key,
                due_ms,
                window_start_ms,
            } => {
                let window = DigestWindow {
                    user: n.user_id.clone(),
                    key: key.clone(),
                    start_ms: *window_start_ms,
                };
                if !self
                    .add_to_digest(redis, n, channel, window, *due_ms)
                    .await?
                {
                    // No later digest takes it (the preferences changed): sent on its own.
                    self.publish_job(&self.job(n, channel, muted_count)).await?;
                    return self
                        .log(redis, n.id, channel, DeliveryStatus::Queued, None, logged)
                        .await;
                }
            }
            StoredDecision::SkipPreference => {
                let why = format!(
                    "the recipient turned {} off for {}",
                    channel.as_str(),
                    n.category
                );
                return self
                    .log(redis, n.id, channel, status, Some(why), logged)
                    .await;
            }
            StoredDecision::SkipNoAddress { reason } => {
                return self
                    .log(redis, n.id, channel, status, Some(reason.clone()), logged)
                    .await;
            }
            StoredDecision::Mute => {}
        }
        self.log(redis, n.id, channel, status, None, logged).await
    }

    /// Adds `n` to its digest window; when that window was closed already (its digest is
    /// being built), to the next one after it. False when no digest takes it any more.
    async fn add_to_digest(
        &self,
        redis: &mut ConnectionManager,
        n: &Notification,
        channel: DeliveryChannel,
        mut window: DigestWindow,
        mut due_ms: i64,
    ) -> Result<bool, HandlerError> {
        let item = DigestItem {
            id: n.id,
            title: n.title.clone(),
            body: n.body.clone(),
            created_ms: n.created_ms(),
            similarity_key: similarity_key(
                &n.category,
                n.group_key.as_deref(),
                n.template.as_deref(),
                &n.title,
            ),
        };
        let mut prefs: Option<Preferences> = None;
        // A closed window is rare (a clock a little behind another instance's): a few
        // windows on is always open.
        for _ in 0..4 {
            match digests::add_item(redis, &due_queue(), &window, due_ms, now_ms(), &item)
                .await
                .map_err(redis_retry)?
            {
                Added::Open | Added::AlreadySent => return Ok(true),
                Added::Closed => {}
            }
            if prefs.is_none() {
                prefs = Some(
                    load_preferences(redis, &n.user_id)
                        .await
                        .map_err(redis_retry)?,
                );
            }
            let prefs = prefs.as_ref().expect("loaded");
            // The plan as it would be just after the closed window was due: its digest
            // decision names the next window (deterministic, so a redelivery finds the same).
            let at = Timestamp::from_millisecond(due_ms).unwrap_or(Timestamp::MAX);
            let input = self.plan_input(n, prefs, at);
            match plan::plan(&input)
                .into_iter()
                .find(|p| p.channel == channel)
                .map(|p| p.decision)
            {
                Some(Decision::Digest {
                    key,
                    due,
                    window_start,
                }) => {
                    window = DigestWindow {
                        user: n.user_id.clone(),
                        key,
                        start_ms: window_start.as_millisecond(),
                    };
                    due_ms = due.as_millisecond();
                }
                _ => return Ok(false),
            }
        }
        Ok(false)
    }

    /// The single job of `n` on `channel`, saying how many similar ones were muted.
    fn job(&self, n: &Notification, channel: DeliveryChannel, muted_count: u32) -> DeliveryJob {
        let mut job = DeliveryJob::single(n, channel, muted_count);
        mute::annotate(&mut job.content, muted_count);
        job
    }

    /// Publishes a delivery job (deduplicated by its id).
    pub async fn publish_job(&self, job: &DeliveryJob) -> Result<(), HandlerError> {
        publish(&self.js, job.to_outgoing())
            .await
            .map(|_| ())
            .map_err(|e| retry("publishing a delivery job", e))
    }

    /// Records `status` unless the log already shows it (no repeated history entries).
    async fn log(
        &self,
        redis: &mut ConnectionManager,
        id: Uuid,
        channel: DeliveryChannel,
        status: DeliveryStatus,
        error: Option<String>,
        logged: Option<DeliveryStatus>,
    ) -> Result<(), HandlerError> {
        if logged == Some(status) {
            return Ok(());
        }
        delivery_log::record(
            redis,
            id,
            channel,
            status,
            &AttemptInfo {
                error,
                ..AttemptInfo::default()
            },
        )
        .await
        .map(|_| ())
        .map_err(redis_retry)
    }
}

/// `notification.notification_created` for `n` as a message, its id derived from the
/// notification id so that a redelivery publishes the same event (stored once).
fn created_outgoing(n: &Notification) -> Outgoing {
    let event = created_event(n);
    Outgoing {
        subject: event.subject(),
        msg_id: event.id.to_string(),
        payload: Bytes::from(serde_json::to_vec(&event).expect("events serialize")),
    }
}

/// One answer of a pipeline, typed.
fn from_value<T: redis::FromRedisValue>(v: &redis::Value) -> Result<T, HandlerError> {
    T::from_redis_value_ref(v).map_err(|e| retry("redis answer", e))
}

/// The status of each channel in a delivery log read with `HGETALL`.
fn logged_statuses(log: HashMap<String, String>) -> HashMap<DeliveryChannel, DeliveryStatus> {
    #[derive(Deserialize)]
    struct StatusOnly {
        status: DeliveryStatus,
    }
    log.into_iter()
        .filter_map(|(channel, json)| {
            let status = serde_json::from_str::<StatusOnly>(&json).ok()?.status;
            Some((DeliveryChannel::parse(&channel)?, status))
        })
        .collect()
}

/// The notifications of a bulk job on `notify.send.bulk.{eventId}`, checked like single
/// ones: a job that is not a bulk job of this subject, has no or too many recipients, a
/// recipient that is not an id, or a category that is not a category name is `Permanent`
/// (dead-lettered whole: the API never publishes one).
pub fn parse_bulk(event_id: Uuid, payload: &[u8]) -> Result<Vec<Notification>, HandlerError> {
    let job: send::BulkJob = serde_json::from_slice(payload)
        .map_err(|e| HandlerError::Permanent(format!("not a bulk job: {e}")))?;
    if job.event_id != event_id {
        return Err(HandlerError::Permanent(format!(
            "bulk job of event {} on the subject of {event_id}",
            job.event_id
        )));
    }
    if job.recipients.is_empty() || job.recipients.len() > crate::config::MAX_RECIPIENTS {
        return Err(HandlerError::Permanent(format!(
            "a bulk job has 1 to {} recipients, not {}",
            crate::config::MAX_RECIPIENTS,
            job.recipients.len()
        )));
    }
    if let Some(bad) = job.recipients.iter().find(|u| !is_valid_id(u)) {
        return Err(HandlerError::Permanent(format!(
            "recipient {:?} is not a valid id",
            inkwire_shared::problem::clip(bad, 64)
        )));
    }
    if !is_valid_category_name(&job.common.category) {
        return Err(HandlerError::Permanent(format!(
            "category {:?} is not a category name",
            inkwire_shared::problem::clip(&job.common.category, 64)
        )));
    }
    Ok(job.notifications())
}

/// The `notification_created` event of `n` (module doc).
pub fn created_event(n: &Notification) -> Event {
    let mut b = Event::builder(Category::Notification, "notification_created", &n.user_id)
        .id(Uuid::new_v5(&n.id, b"notification_created"))
        .timestamp(n.created_at)
        .source(SOURCE)
        .data(json!({
            "notificationId": n.id,
            "category": n.category,
            "priority": n.priority,
        }));
    if let Some(p) = &n.project_id {
        b = b.project(p.clone());
    }
    b.build()
}

/// Runs the notifier's consumer until `shutdown`.
pub async fn run_notifier(notifier: Notifier, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = notifier.js.clone();
    let concurrency = notifier.settings.concurrency;
    let stats = consumer::run_concurrent(
        js,
        Notifier::spec(),
        move |d| {
            let notifier = notifier.clone();
            async move { notifier.handle(d).await }
        },
        concurrency,
        shutdown,
    )
    .await?;
    tracing::info!(?stats, "notifier stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plans_with_external_decisions_are_kept() {
        let plan = |channels: Vec<(DeliveryChannel, StoredDecision)>| StoredPlan {
            channels: channels
                .into_iter()
                .map(|(channel, decision)| StoredChannel { channel, decision })
                .collect(),
            muted_count: 0,
        };
        use DeliveryChannel::*;
        let skip = StoredDecision::SkipNoAddress {
            reason: "no address".into(),
        };
        assert!(!plan(vec![(InApp, StoredDecision::Deliver)]).needs_keeping());
        assert!(
            !plan(vec![
                (InApp, StoredDecision::Deliver),
                (Email, skip.clone()),
                (Push, StoredDecision::SkipPreference)
            ])
            .needs_keeping()
        );
        for decision in [
            StoredDecision::Deliver,
            StoredDecision::Hold { until_ms: 1 },
            StoredDecision::Digest {
                key: "k".into(),
                due_ms: 2,
                window_start_ms: 1,
            },
            StoredDecision::Mute,
        ] {
            assert!(plan(vec![(InApp, StoredDecision::Deliver), (Sms, decision)]).needs_keeping());
        }
    }
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn settings_from_the_environment() {
        let s = NotifierSettings::from_lookup(lookup(&[])).unwrap();
        assert_eq!(s.providers, Providers::NONE);
        assert_eq!(s.tick, DEFAULT_TICK);
        assert_eq!(s.routing, RoutingTable::default());
        let s = NotifierSettings::from_lookup(lookup(&[
            ("INKWIRE_SMTP_URL", "smtp://127.0.0.1:2525"),
            ("INKWIRE_SNS_ENDPOINT", "http://127.0.0.1:5000"),
            ("INKWIRE_NOTIFY_TICK", "100ms"),
            ("INKWIRE_NOTIFY_ROUTING", "medium=in_app+email"),
        ]))
        .unwrap();
        assert_eq!(s.providers, Providers::ALL);
        assert_eq!(s.tick, Duration::from_millis(100));
        assert_eq!(
            s.routing.channels(Priority::Medium).len(),
            2,
            "{:?}",
            s.routing
        );
        let s = NotifierSettings::from_lookup(lookup(&[
            ("INKWIRE_SNS_ENDPOINT", "http://127.0.0.1:5000"),
            ("INKWIRE_SNS_ENABLED", "false"),
            ("INKWIRE_SMTP_URL", " "),
        ]))
        .unwrap();
        assert_eq!(s.providers, Providers::NONE);
        for (k, v) in [
            ("INKWIRE_NOTIFY_TICK", "1ms"),
            ("INKWIRE_NOTIFY_TICK", "soon"),
            ("INKWIRE_SNS_ENABLED", "maybe"),
            ("INKWIRE_NOTIFY_ROUTING", "medium=email"),
        ] {
            assert!(
                NotifierSettings::from_lookup(lookup(&[(k, v)])).is_err(),
                "{k}={v}"
            );
        }
    }

    fn note() -> Notification {
        serde_json::from_value(json!({
            "id": "0191f2a4-5b6c-5d8e-9f00-112233445566", "userId": "u-1",
            "category": "chat", "priority": "high", "title": "t", "body": "b",
            "createdAt": "2026-11-22T12:00:00Z", "sender": "svc"
        }))
        .unwrap()
    }

    #[test]
    fn malformed_notifications_are_permanent() {
        let good = serde_json::to_vec(&note()).unwrap();
        assert!(parse_notification("notify.send.u-1", &good).is_ok());
        let permanent = |subject: &str, payload: &[u8]| {
            matches!(
                parse_notification(subject, payload),
                Err(HandlerError::Permanent(_))
            )
        };
        assert!(permanent("notify.send.u-1", b"{"));
        assert!(permanent("notify.send.u-1", b"{\"id\": 1}"));
        assert!(permanent("notify.send.u-2", &good));
        let mut bad = note();
        bad.user_id = "u 1".into();
        assert!(permanent(
            "notify.send.u 1",
            &serde_json::to_vec(&bad).unwrap()
        ));
        let mut bad = note();
        bad.category = "Chat!".into();
        assert!(permanent(
            "notify.send.u-1",
            &serde_json::to_vec(&bad).unwrap()
        ));
    }

    #[test]
    fn plans_round_trip() {
        let plan = StoredPlan {
            channels: vec![
                StoredChannel {
                    channel: DeliveryChannel::InApp,
                    decision: StoredDecision::Deliver,
                },
                StoredChannel {
                    channel: DeliveryChannel::Email,
                    decision: StoredDecision::Digest {
                        key: "chat.g".into(),
                        due_ms: 5,
                        window_start_ms: 1,
                    },
                },
                StoredChannel {
                    channel: DeliveryChannel::Push,
                    decision: StoredDecision::Hold { until_ms: 9 },
                },
                StoredChannel {
                    channel: DeliveryChannel::Sms,
                    decision: StoredDecision::SkipNoAddress {
                        reason: "no phone".into(),
                    },
                },
            ],
            muted_count: 2,
        };
        let v = serde_json::to_value(&plan).unwrap();
        assert_eq!(v["channels"][1]["decision"], "digest");
        assert_eq!(v["channels"][1]["windowStartMs"], 1);
        assert_eq!(v["channels"][2]["untilMs"], 9);
        assert_eq!(serde_json::from_value::<StoredPlan>(v).unwrap(), plan);
    }

    #[test]
    fn the_created_event_is_derived_from_the_notification() {
        let n = note();
        let a = created_event(&n);
        assert_eq!(a.id, created_event(&n).id);
        assert_ne!(a.id, n.id);
        assert_eq!(a.subject(), "events.notification.notification_created");
        assert_eq!(a.user_id, "u-1");
        assert_eq!(
            a.data,
            json!({"notificationId": n.id, "category": "chat", "priority": "high"})
        );
        let checked =
            inkwire_shared::schema::schemas().validate_event(&serde_json::to_value(&a).unwrap());
        assert!(checked.is_ok(), "{checked:?}");
    }
}
