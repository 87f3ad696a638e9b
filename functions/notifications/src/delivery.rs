//! The delivery worker: the durable consumer of `notify.deliver.>` that sends each
//! [`DeliveryJob`] on its channel and records what happened.
//!
//! For each job: a job whose notifications are all final on its channel is a duplicate and is
//! acknowledged without sending; otherwise the recipient's address is resolved now (the
//! contacts in their preferences, the push devices beside them — so a changed address or a
//! removed device counts, not the one at send time), the provider is called once, and every
//! attempt is written to the delivery log of every notification in the job (`attempts` = the
//! JetStream delivery count). A transient failure is retried by the runner with exponential
//! backoff and jitter ([`DeliverySettings`]); a permanent one is `failed` at once (no retry);
//! the last allowed attempt failing is `failed` with "gave up after N attempts" and the
//! runner's dead-letter copy. `notification.notification_delivered` / `notification_failed`
//! events record the outcome, their ids derived from the job id and the outcome so a
//! redelivery publishes each once.
//!
//! Push goes to every device of the user, one `Publish` per device; the devices already
//! reached by a job are remembered, so a retry for the others does not notify them twice. A
//! device whose endpoint SNS reports disabled or gone is removed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use inkwire_shared::config::parse_duration;
use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Jitter, Shutdown};
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{self, Outgoing};
use inkwire_shared::membership::is_valid_id;
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::api::load_preferences;
use crate::delivery_job::DeliveryJob;
use crate::delivery_log::{self, AttemptInfo};
use crate::model::{DeliveryChannel, DeliveryStatus};
use crate::preferences::Device;
use crate::providers::{Providers, SendError, Sent};

/// The durable consumer's name.
pub const DURABLE: &str = "notify-delivery";
/// `source` of the events this worker publishes.
pub const SOURCE: &str = "notifications-delivery";
/// Longest SMS text (SNS splits longer messages; 1,600 characters is its limit).
pub const MAX_SMS_CHARS: usize = 1_600;
/// How long the set of devices a push job reached is kept (longer than every retry).
pub const PUSHED_KEEP: Duration = Duration::from_secs(2 * 24 * 3600);

/// Retry settings of the delivery consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliverySettings {
    /// Delays before the 2nd, 3rd, … attempt (the last repeats).
    pub backoff: Vec<Duration>,
    /// Attempts before a job is given up (`failed`, and its dead-letter copy).
    pub max_attempts: i64,
    pub jitter: Jitter,
    /// How long one job may take (every device of a push job included).
    pub ack_wait: Duration,
}

impl Default for DeliverySettings {
    /// 2 s, 10 s, 1 min, 5 min, 15 min (then 15 min again), 8 attempts, equal jitter.
    fn default() -> Self {
        DeliverySettings {
            backoff: [2, 10, 60, 300, 900]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_attempts: 8,
            jitter: Jitter::Equal,
            ack_wait: Duration::from_secs(120),
        }
    }
}

impl DeliverySettings {
    pub fn from_env() -> anyhow::Result<DeliverySettings> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// `INKWIRE_NOTIFY_RETRY_BACKOFF` (comma-separated durations, e.g. `2s,10s,1m,5m,15m`),
    /// `INKWIRE_NOTIFY_RETRY_MAX_ATTEMPTS` (1-100), `INKWIRE_NOTIFY_RETRY_JITTER`
    /// (`equal`, `full` or `none`).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<DeliverySettings> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let mut s = DeliverySettings::default();
        if let Some(raw) = get("INKWIRE_NOTIFY_RETRY_BACKOFF") {
            let mut delays = Vec::new();
            for part in raw.split(',').map(str::trim) {
                let d = parse_duration(part)
                    .map_err(|e| anyhow::anyhow!("INKWIRE_NOTIFY_RETRY_BACKOFF: {part:?}: {e}"))?;
                if d.is_zero() || d > Duration::from_secs(24 * 3600) {
                    anyhow::bail!("INKWIRE_NOTIFY_RETRY_BACKOFF: {part:?} is outside 1ms..=24h");
                }
                delays.push(d);
            }
            s.backoff = delays;
        }
        if let Some(raw) = get("INKWIRE_NOTIFY_RETRY_MAX_ATTEMPTS") {
            s.max_attempts = match raw.trim().parse::<i64>() {
                Ok(n) if (1..=100).contains(&n) => n,
                _ => anyhow::bail!(
                    "INKWIRE_NOTIFY_RETRY_MAX_ATTEMPTS: {raw:?} is not a whole number in 1..=100"
                ),
            };
        }
        if let Some(raw) = get("INKWIRE_NOTIFY_RETRY_JITTER") {
            s.jitter = Jitter::parse(&raw).ok_or_else(|| {
                anyhow::anyhow!("INKWIRE_NOTIFY_RETRY_JITTER: {raw:?} is not equal, full or none")
            })?;
        }
        Ok(s)
    }

    /// The consumer of `notify.deliver.>` with these retries.
    pub fn spec(&self) -> ConsumerSpec {
        let mut spec = ConsumerSpec::new(subjects::NOTIFY_STREAM, DURABLE)
            .filter(format!("{}.deliver.>", subjects::NOTIFY_PREFIX));
        spec.backoff = self.backoff.clone();
        spec.max_deliver = self.max_attempts;
        spec.jitter = self.jitter;
        spec.ack_wait = self.ack_wait;
        // Each job is a network call or a few: small batches keep ack_wait clocks honest.
        spec.batch = 10;
        spec
    }
}

/// The delivery worker (cheap to clone: the handler runs on a clone).
#[derive(Clone)]
pub struct DeliveryWorker {
    pub js: async_nats::jetstream::Context,
    pub redis: ConnectionManager,
    pub providers: Providers,
    pub settings: Arc<DeliverySettings>,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent {
        provider_message_id: Option<String>,
    },
    /// No address, or no provider: nothing to try.
    NoAddress(String),
    Permanent(String),
    Transient(String),
}

fn redis_retry(e: redis::RedisError) -> HandlerError {
    HandlerError::Retry(format!("redis: {e}"))
}

/// Parses and checks a job: the subject it came on must be its own, its user id a valid id.
pub fn parse_job(subject: &str, payload: &[u8]) -> Result<DeliveryJob, HandlerError> {
    let job: DeliveryJob = serde_json::from_slice(payload)
        .map_err(|e| HandlerError::Permanent(format!("not a delivery job: {e}")))?;
    if !is_valid_id(&job.user_id) {
        return Err(HandlerError::Permanent(format!(
            "delivery job for an invalid user id {:?}",
            inkwire_shared::problem::clip(&job.user_id, 64)
        )));
    }
    if !job.channel.is_external() {
        return Err(HandlerError::Permanent(
            "in_app is not delivered by the delivery worker".into(),
        ));
    }
    if job.notification_ids.is_empty() {
        return Err(HandlerError::Permanent(
            "delivery job names no notification".into(),
        ));
    }
    if job.subject() != subject {
        return Err(HandlerError::Permanent(format!(
            "delivery job for {} arrived on {subject}",
            job.subject()
        )));
    }
    if !jetstream::is_valid_msg_id(&job.job_id) {
        return Err(HandlerError::Permanent(
            "delivery job id is not valid".into(),
        ));
    }
    Ok(job)
}

/// `text` cut to at most `max` characters (an ellipsis marks the cut).
pub fn clip_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The SMS text of a job: its own SMS part, else "title: body", at most 1,600 characters.
pub fn sms_text(job: &DeliveryJob) -> String {
    let c = &job.content;
    let text = match &c.sms {
        Some(sms) if !sms.trim().is_empty() => sms.clone(),
        _ if c.body.trim().is_empty() => c.title.clone(),
        _ => format!("{}: {}", c.title, c.body),
    };
    clip_chars(&text, MAX_SMS_CHARS)
}

/// The push payload of a job (`{"title", "body", "data"}`): its own push part, else title and
/// body, with the notification id(s) in `data` for the app.
pub fn push_payload(job: &DeliveryJob) -> Value {
    let c = &job.content;
    let (title, body, data) = match &c.push {
        Some(p) => (p.title.clone(), p.body.clone(), p.data.clone()),
        None => (c.title.clone(), c.body.clone(), Value::Null),
    };
    let mut data = match data {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    if let [one] = job.notification_ids.as_slice() {
        data.entry("notificationId").or_insert(json!(one));
    } else {
        data.entry("notificationIds")
            .or_insert(json!(job.notification_ids));
    }
    json!({"title": title, "body": body, "data": data})
}

/// `inkwire:notify:pushed:{sha256(jobId)}`: the devices a push job reached (a SET).
pub fn pushed_key(job_id: &str) -> String {
    let digest = Sha256::digest(job_id.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("inkwire:notify:pushed:{hex}")
}

/// Whether an SNS error says the endpoint is disabled or no longer exists.
fn endpoint_gone(error: &str) -> bool {
    error.contains("EndpointDisabled") || error.contains("NotFound")
}

/// The id of an outcome event of notification `id` for job `job_id`: the same job and
/// outcome give the same id, so a redelivery's event is a JetStream duplicate.
pub fn event_id(id: Uuid, job_id: &str, outcome: &str) -> Uuid {
    Uuid::new_v5(&id, format!("{job_id}:{outcome}").as_bytes())
}

/// The `notification_delivered` / `notification_failed` events of a job's final outcome.
pub fn outcome_events(
    job: &DeliveryJob,
    status: DeliveryStatus,
    attempts: u32,
    provider_message_id: Option<&str>,
    error: Option<&str>,
) -> Vec<Event> {
    let attempts = attempts.clamp(1, 1000);
    job.notification_ids
        .iter()
        .filter_map(|id| {
            let (event_type, data) = match status {
                DeliveryStatus::Sent => {
                    let mut data = json!({"notificationId": id,
                        "channel": job.channel.as_str(), "attempts": attempts});
                    if let Some(p) = provider_message_id.filter(|p| !p.is_empty()) {
                        data["providerMessageId"] = json!(inkwire_shared::problem::clip(p, 256));
                    }
                    ("notification_delivered", data)
                }
                DeliveryStatus::Failed => {
                    let error = error.filter(|e| !e.is_empty()).unwrap_or("failed");
                    (
                        "notification_failed",
                        json!({"notificationId": id, "channel": job.channel.as_str(),
                            "error": inkwire_shared::problem::clip(error, 1000),
                            "attempts": attempts}),
                    )
                }
                _ => return None,
            };
            Some(
                Event::builder(Category::Notification, event_type, &job.user_id)
                    .id(event_id(*id, &job.job_id, event_type))
                    .source(SOURCE)
                    .data(data)
                    .build(),
            )
        })
        .collect()
}

impl DeliveryWorker {
    pub fn new(
        js: async_nats::jetstream::Context,
        redis: ConnectionManager,
        providers: Providers,
        settings: Arc<DeliverySettings>,
    ) -> DeliveryWorker {
        DeliveryWorker {
            js,
            redis,
            providers,
            settings,
        }
    }

    /// Handles one delivered job (the consumer's handler).
    pub async fn handle(&self, d: Delivery) -> Result<(), HandlerError> {
        let job = parse_job(&d.subject, &d.payload)?;
        let attempts = d.deliveries.max(1) as u32;
        let mut redis = self.redis.clone();
        if let Some(records) = self.finished(&mut redis, &job).await? {
            // A duplicate (or a redelivery after the log was written but before the events
            // were acknowledged): publish the final events again (stored once by their ids).
            tracing::debug!(job = %job.job_id, "delivery job already final; not sent again");
            for (status, attempts, provider_id, error) in records {
                self.publish_events(
                    &job,
                    status,
                    attempts,
                    provider_id.as_deref(),
                    error.as_deref(),
                )
                .await?;
            }
            return Ok(());
        }
        let outcome = self.attempt(&mut redis, &job).await?;
        let last = d.deliveries >= self.settings.max_attempts;
        match outcome {
            Outcome::Sent {
                provider_message_id,
            } => {
                self.record(
                    &mut redis,
                    &job,
                    DeliveryStatus::Sent,
                    Some(attempts),
                    provider_message_id.clone(),
                    None,
                )
                .await?;
                self.publish_events(
                    &job,
                    DeliveryStatus::Sent,
                    attempts,
                    provider_message_id.as_deref(),
                    None,
                )
                .await
            }
            Outcome::NoAddress(reason) => {
                self.record(
                    &mut redis,
                    &job,
                    DeliveryStatus::SkippedNoAddress,
                    None,
                    None,
                    Some(reason),
                )
                .await
            }
            Outcome::Permanent(error) => {
                self.record(
                    &mut redis,
                    &job,
                    DeliveryStatus::Failed,
                    Some(attempts),
                    None,
                    Some(error.clone()),
                )
                .await?;
                self.publish_events(&job, DeliveryStatus::Failed, attempts, None, Some(&error))
                    .await
            }
            Outcome::Transient(error) if last => {
                let error = format!("gave up after {attempts} attempts: {error}");
                self.record(
                    &mut redis,
                    &job,
                    DeliveryStatus::Failed,
                    Some(attempts),
                    None,
                    Some(error.clone()),
                )
                .await?;
                self.publish_events(&job, DeliveryStatus::Failed, attempts, None, Some(&error))
                    .await?;
                // The runner copies the job to the dead-letter stream with this reason.
                Err(HandlerError::Retry(error))
            }
            Outcome::Transient(error) => {
                // Still queued: the log shows the attempt and why it will be tried again.
                self.record(
                    &mut redis,
                    &job,
                    DeliveryStatus::Queued,
                    Some(attempts),
                    None,
                    Some(error.clone()),
                )
                .await?;
                Err(HandlerError::Retry(error))
            }
        }
    }

    /// `Some(final records)` when every notification of the job is final on its channel.
    async fn finished(
        &self,
        redis: &mut ConnectionManager,
        job: &DeliveryJob,
    ) -> Result<Option<Vec<(DeliveryStatus, u32, Option<String>, Option<String>)>>, HandlerError>
    {
        let mut pipe = redis::pipe();
        for id in &job.notification_ids {
            pipe.cmd("HGET")
                .arg(delivery_log::key(*id))
                .arg(job.channel.as_str());
        }
        let raw: Vec<Option<String>> = pipe.query_async(redis).await.map_err(redis_retry)?;
        let mut finals = Vec::new();
        for r in raw {
            let Some(record) = r.and_then(|json| serde_json::from_str::<Value>(&json).ok()) else {
                return Ok(None);
            };
            let status = record["status"]
                .as_str()
                .and_then(|s| serde_json::from_value::<DeliveryStatus>(json!(s)).ok());
            match status {
                Some(s) if s.is_final() => finals.push((
                    s,
                    record["attempts"].as_u64().unwrap_or(1) as u32,
                    record["providerMessageId"].as_str().map(str::to_string),
                    record["error"].as_str().map(str::to_string),
                )),
                _ => return Ok(None),
            }
        }
        Ok(Some(finals))
    }

    /// Writes `status` to the log of every notification of the job.
    async fn record(
        &self,
        redis: &mut ConnectionManager,
        job: &DeliveryJob,
        status: DeliveryStatus,
        attempts: Option<u32>,
        provider_message_id: Option<String>,
        error: Option<String>,
    ) -> Result<(), HandlerError> {
        let info = AttemptInfo {
            attempts,
            provider_message_id,
            error,
        };
        for id in &job.notification_ids {
            delivery_log::record(redis, *id, job.channel, status, &info)
                .await
                .map_err(redis_retry)?;
        }
        Ok(())
    }

    async fn publish_events(
        &self,
        job: &DeliveryJob,
        status: DeliveryStatus,
        attempts: u32,
        provider_message_id: Option<&str>,
        error: Option<&str>,
    ) -> Result<(), HandlerError> {
        for event in outcome_events(job, status, attempts, provider_message_id, error) {
            let msg = Outgoing {
                subject: event.subject(),
                msg_id: event.id.to_string(),
                payload: Bytes::from(serde_json::to_vec(&event).expect("events serialize")),
            };
            jetstream::publish(&self.js, msg).await.map_err(|e| {
                HandlerError::Retry(format!("publishing {}: {e}", event.event_type))
            })?;
        }
        Ok(())
    }

    /// Resolves the address and calls the provider once.
    async fn attempt(
        &self,
        redis: &mut ConnectionManager,
        job: &DeliveryJob,
    ) -> Result<Outcome, HandlerError> {
        if let Some(reason) = self.providers.skip_reason(job.channel) {
            return Ok(Outcome::NoAddress(reason.to_string()));
        }
        let prefs = load_preferences(redis, &job.user_id)
            .await
            .map_err(redis_retry)?;
        let c = &job.content;
        let sent = match job.channel {
            DeliveryChannel::InApp => unreachable!("checked in parse_job"),
            DeliveryChannel::Email => {
                let Some(to) = prefs.contacts.email.as_deref() else {
                    return Ok(Outcome::NoAddress(
                        "no email address in the recipient's contacts".into(),
                    ));
                };
                let email = self.providers.email.as_ref().expect("checked");
                match &c.email {
                    Some(e) => email.send(to, &e.subject, &e.text, Some(&e.html)).await,
                    None => email.send(to, &c.title, &c.body, None).await,
                }
            }
            DeliveryChannel::Sms => {
                let Some(phone) = prefs.contacts.phone.as_deref() else {
                    return Ok(Outcome::NoAddress(
                        "no phone number in the recipient's contacts".into(),
                    ));
                };
                let sns = self.providers.sns.as_ref().expect("checked");
                sns.send_sms(phone, &sms_text(job)).await
            }
            DeliveryChannel::Push => {
                if prefs.devices.is_empty() {
                    return Ok(Outcome::NoAddress(
                        "no push device registered for the recipient".into(),
                    ));
                }
                return self.push(redis, job, &prefs.devices).await;
            }
        };
        Ok(match sent {
            Ok(Sent {
                provider_message_id,
            }) => Outcome::Sent {
                provider_message_id,
            },
            Err(SendError::Permanent(e)) => Outcome::Permanent(e),
            Err(SendError::Transient(e)) => Outcome::Transient(e),
        })
    }

    /// One `Publish` per device not yet reached by this job. Sent when at least one device got
    /// it and none is left to retry; transient while a device may still be reached; failed
    /// when no device could be.
    async fn push(
        &self,
        redis: &mut ConnectionManager,
        job: &DeliveryJob,
        devices: &[Device],
    ) -> Result<Outcome, HandlerError> {
        let sns = self.providers.sns.as_ref().expect("checked");
        let pushed_key = pushed_key(&job.job_id);
        let already: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&pushed_key)
            .query_async(redis)
            .await
            .map_err(redis_retry)?;
        let payload = push_payload(job);
        let mut message_ids = Vec::new();
        let mut reached = !already.is_empty();
        let mut transient = Vec::new();
        let mut permanent = Vec::new();
        for device in devices {
            if already.contains(&device.id) {
                continue;
            }
            match sns.send_push(&device.endpoint_arn, &payload).await {
                Ok(sent) => {
                    reached = true;
                    message_ids.extend(sent.provider_message_id);
                    let _: () = redis::pipe()
                        .cmd("SADD")
                        .arg(&pushed_key)
                        .arg(&device.id)
                        .ignore()
                        .cmd("EXPIRE")
                        .arg(&pushed_key)
                        .arg(PUSHED_KEEP.as_secs())
                        .ignore()
                        .query_async(redis)
                        .await
                        .map_err(redis_retry)?;
                }
                Err(SendError::Permanent(e)) if endpoint_gone(&e) => {
                    tracing::info!(user = %job.user_id, device = %device.id, error = %e,
                        "push endpoint disabled or gone; device removed");
                    crate::devices::forget(redis, &job.user_id, device)
                        .await
                        .map_err(redis_retry)?;
                    // A disabled endpoint still exists in SNS: delete it (best effort; the
                    // device is gone from inkwire either way).
                    if let Err(err) = sns.delete_endpoint(&device.endpoint_arn).await {
                        tracing::warn!(error = %err, "deleting a disabled endpoint failed");
                    }
                    permanent.push(format!("device {}: {e} (device removed)", device.id));
                }
                Err(SendError::Permanent(e)) => {
                    permanent.push(format!("device {}: {e}", device.id))
                }
                Err(SendError::Transient(e)) => {
                    transient.push(format!("device {}: {e}", device.id))
                }
            }
        }
        if !transient.is_empty() {
            return Ok(Outcome::Transient(transient.join("; ")));
        }
        if reached {
            let id = (!message_ids.is_empty()).then(|| message_ids.join(","));
            return Ok(Outcome::Sent {
                provider_message_id: id,
            });
        }
        Ok(Outcome::Permanent(if permanent.is_empty() {
            "no push device left to send to".into()
        } else {
            permanent.join("; ")
        }))
    }
}

/// Runs the delivery consumer until `shutdown`.
pub async fn run_delivery(worker: DeliveryWorker, shutdown: Shutdown) -> anyhow::Result<()> {
    let js = worker.js.clone();
    let spec = worker.settings.spec();
    let stats = consumer::run(
        js,
        spec,
        move |d| {
            let worker = worker.clone();
            async move { worker.handle(d).await }
        },
        shutdown,
    )
    .await?;
    tracing::info!(?stats, "delivery worker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery_job::{Content, JobKind};
    use crate::send::PushPayload;
    use std::collections::HashMap;

    fn job(channel: DeliveryChannel) -> DeliveryJob {
        let id = Uuid::nil();
        DeliveryJob {
            job_id: crate::delivery_job::single_job_id(id, channel),
            channel,
            user_id: "u-1".into(),
            notification_ids: vec![id],
            content: Content {
                title: "Chapter 3".into(),
                body: "approved".into(),
                email: None,
                sms: None,
                push: None,
            },
            muted_count: 0,
            kind: JobKind::Single,
        }
    }

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn settings_default_and_from_the_environment() {
        let d = DeliverySettings::from_lookup(lookup(&[])).unwrap();
        assert_eq!(d, DeliverySettings::default());
        assert_eq!(d.backoff.len(), 5);
        assert_eq!(d.max_attempts, 8);
        let spec = d.spec();
        assert_eq!(spec.filter_subject, "notify.deliver.>");
        assert_eq!(spec.max_deliver, 8);
        assert_eq!(spec.jitter, Jitter::Equal);
        let s = DeliverySettings::from_lookup(lookup(&[
            ("INKWIRE_NOTIFY_RETRY_BACKOFF", "100ms, 1s"),
            ("INKWIRE_NOTIFY_RETRY_MAX_ATTEMPTS", "3"),
            ("INKWIRE_NOTIFY_RETRY_JITTER", "full"),
        ]))
        .unwrap();
        assert_eq!(
            s.backoff,
            [Duration::from_millis(100), Duration::from_secs(1)]
        );
        assert_eq!(s.max_attempts, 3);
        assert_eq!(s.jitter, Jitter::Full);
        for (k, v) in [
            ("INKWIRE_NOTIFY_RETRY_BACKOFF", "2s,,5s"),
            ("INKWIRE_NOTIFY_RETRY_BACKOFF", "0s"),
            ("INKWIRE_NOTIFY_RETRY_BACKOFF", "2 days"),
            ("INKWIRE_NOTIFY_RETRY_MAX_ATTEMPTS", "0"),
            ("INKWIRE_NOTIFY_RETRY_MAX_ATTEMPTS", "many"),
            ("INKWIRE_NOTIFY_RETRY_JITTER", "some"),
        ] {
            let err = DeliverySettings::from_lookup(lookup(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(k), "{k}={v}: {err}");
        }
    }

    #[test]
    fn jobs_are_checked_against_their_subject() {
        let j = job(DeliveryChannel::Email);
        let payload = serde_json::to_vec(&j).unwrap();
        assert_eq!(parse_job("notify.deliver.email.u-1", &payload).unwrap(), j);
        for subject in ["notify.deliver.sms.u-1", "notify.deliver.email.u-2"] {
            assert!(matches!(
                parse_job(subject, &payload),
                Err(HandlerError::Permanent(_))
            ));
        }
        assert!(matches!(
            parse_job("notify.deliver.email.u-1", b"{"),
            Err(HandlerError::Permanent(_))
        ));
        let mut bad = j.clone();
        bad.user_id = "u.1".into();
        let payload = serde_json::to_vec(&bad).unwrap();
        assert!(parse_job("notify.deliver.email.u.1", &payload).is_err());
        let mut in_app = j.clone();
        in_app.channel = DeliveryChannel::InApp;
        let payload = serde_json::to_vec(&in_app).unwrap();
        assert!(parse_job("notify.deliver.in_app.u-1", &payload).is_err());
        let mut none = j;
        none.notification_ids.clear();
        let payload = serde_json::to_vec(&none).unwrap();
        assert!(parse_job("notify.deliver.email.u-1", &payload).is_err());
    }

    #[test]
    fn sms_text_falls_back_and_is_clipped() {
        let mut j = job(DeliveryChannel::Sms);
        assert_eq!(sms_text(&j), "Chapter 3: approved");
        j.content.body = " ".into();
        assert_eq!(sms_text(&j), "Chapter 3");
        j.content.sms = Some("Own text".into());
        assert_eq!(sms_text(&j), "Own text");
        j.content.sms = Some("é".repeat(2_000));
        let t = sms_text(&j);
        assert_eq!(t.chars().count(), MAX_SMS_CHARS);
        assert!(t.ends_with('…'));
    }

    #[test]
    fn push_payload_carries_the_notification_id() {
        let mut j = job(DeliveryChannel::Push);
        let p = push_payload(&j);
        assert_eq!(p["title"], "Chapter 3");
        assert_eq!(p["data"]["notificationId"], json!(Uuid::nil()));
        j.content.push = Some(PushPayload {
            title: "T".into(),
            body: "B".into(),
            data: json!({"deepLink": "/d/3"}),
        });
        j.notification_ids.push(Uuid::max());
        let p = push_payload(&j);
        assert_eq!(p["body"], "B");
        assert_eq!(p["data"]["deepLink"], "/d/3");
        assert_eq!(p["data"]["notificationIds"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn outcome_events_are_schema_valid_with_stable_ids() {
        let mut j = job(DeliveryChannel::Email);
        j.notification_ids.push(Uuid::max());
        let sent = outcome_events(&j, DeliveryStatus::Sent, 2, Some("<m@x>"), None);
        assert_eq!(sent.len(), 2);
        let again = outcome_events(&j, DeliveryStatus::Sent, 3, Some("<m@x>"), None);
        assert_eq!(
            sent[0].id, again[0].id,
            "the id depends on job and outcome only"
        );
        let failed = outcome_events(&j, DeliveryStatus::Failed, 0, None, Some(&"x".repeat(5000)));
        assert_ne!(failed[0].id, sent[0].id);
        for e in sent.iter().chain(&failed) {
            let v = serde_json::to_value(e).unwrap();
            inkwire_shared::schema::schemas()
                .validate_event(&v)
                .unwrap_or_else(|errs| panic!("{v}: {errs:?}"));
        }
        assert_eq!(failed[0].data["attempts"], 1);
        assert!(outcome_events(&j, DeliveryStatus::Queued, 1, None, None).is_empty());
    }

    #[test]
    fn pushed_keys_hash_the_job_id() {
        let a = pushed_key("00000000-0000-0000-0000-000000000000:push");
        assert!(a.starts_with("inkwire:notify:pushed:") && a.len() == 22 + 32);
        assert_ne!(a, pushed_key("digest:u-1:k:1"));
        assert!(endpoint_gone("SNS Publish: EndpointDisabled (HTTP 400): x"));
        assert!(!endpoint_gone("SNS Publish: InvalidParameter (HTTP 400)"));
    }
}
