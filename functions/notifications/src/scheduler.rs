//! The notification scheduler: one ticker (every `NotifierSettings::tick`, 250 ms by default)
//! that claims the due entries of the notifications due queue (`inkwire:notify:due`,
//! `shared::due_queue`, leases of `NotifierSettings::lease`) and acts on each:
//! - `scheduled:{id}`: the kept notification of a scheduled send — cancelled: nothing (in_app
//!   logged `cancelled`); otherwise the record is flipped to `sent` (the cancel route answers
//!   `409` from then on) and the notifier's immediate path runs;
//! - `held:{id}:{channel}`: the job held for quiet hours is published (its job id dedupes)
//!   and logged `queued`;
//! - `digest:{userId}:{key}:{windowStartMs}`: the window is closed, its digest job built from
//!   the stored items (with the muted count) and published, each item logged `queued`.
//!
//! An entry is marked done only after its work succeeded; on an error it stays claimed until
//! its lease ends and is then taken again (by any instance). Several instances are safe: a
//! lease keeps an entry to one of them, and each action is idempotent (same job ids, the
//! closed digest window reads the same items) should a lease run out mid-way.
//!
//! Due times are scores in Unix ms. For tests (and operators) the documented way to make an
//! entry due earlier is `DueQueue::schedule(member, now)` on [`crate::notifier::due_queue`]:
//! the scheduler then acts on it at the next tick exactly as at its time.

use std::time::Duration;

use futures::StreamExt;
use inkwire_shared::consumer::{HandlerError, Shutdown};
use inkwire_shared::due_queue::Lease;
use redis::aio::ConnectionManager;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::delivery_job::DeliveryJob;
use crate::delivery_log::{self, AttemptInfo};
use crate::digests::{self, DigestWindow};
use crate::model::{DeliveryChannel, DeliveryStatus};
use crate::notifier::{Notifier, due_queue, held_key, scheduled_job_key};
use crate::send::Notification;

/// Entries claimed per round of a tick.
pub const CLAIM_BATCH: usize = 200;
/// Entries handled at the same time by one instance.
pub const CONCURRENCY: usize = 16;

fn now_ms() -> u64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

/// What a due-queue member names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Scheduled(Uuid),
    Held(Uuid, DeliveryChannel),
    Digest(DigestWindow),
}

fn uuid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s).ok().filter(|_| s.len() == 36)
}

impl Entry {
    pub fn parse(member: &str) -> Option<Entry> {
        if let Some(id) = member.strip_prefix("scheduled:") {
            return uuid(id).map(Entry::Scheduled);
        }
        if let Some(rest) = member.strip_prefix("held:") {
            let (id, channel) = rest.split_once(':')?;
            let channel = DeliveryChannel::parse(channel).filter(|c| c.is_external())?;
            return uuid(id).map(|id| Entry::Held(id, channel));
        }
        DigestWindow::parse_member(member).map(Entry::Digest)
    }
}

fn failed(e: HandlerError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// One pass: claims every due entry (in rounds of [`CLAIM_BATCH`]) and acts on it; returns
/// how many were done.
pub async fn tick(notifier: &Notifier) -> anyhow::Result<usize> {
    let mut redis = notifier.redis.clone();
    let lease_ms = notifier.settings.lease.as_millis() as u64;
    let mut done = 0;
    loop {
        let leases = due_queue()
            .claim(&mut redis, now_ms(), CLAIM_BATCH, lease_ms)
            .await?;
        let claimed = leases.len();
        let finished: Vec<bool> = futures::stream::iter(leases)
            .map(|lease| handle(notifier, lease))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        done += finished.into_iter().filter(|ok| *ok).count();
        if claimed < CLAIM_BATCH {
            return Ok(done);
        }
    }
}

/// Acts on one claimed entry; marks it done on success. False when it failed (it is taken
/// again when its lease ends).
async fn handle(notifier: &Notifier, lease: Lease) -> bool {
    let mut redis = notifier.redis.clone();
    let outcome = match Entry::parse(&lease.member) {
        Some(Entry::Scheduled(id)) => scheduled(notifier, &mut redis, id).await,
        Some(Entry::Held(id, channel)) => held(notifier, &mut redis, id, channel).await,
        Some(Entry::Digest(window)) => digest(notifier, &mut redis, &window).await,
        None => {
            tracing::error!(member = %lease.member, "unknown due-queue entry; dropped");
            Ok(())
        }
    };
    if let Err(e) = outcome {
        tracing::warn!(member = %lease.member, error = %e, "due entry failed; retried when its lease ends");
        return false;
    }
    match due_queue().done(&mut redis, &lease).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(member = %lease.member, error = %e, "marking a due entry done failed");
            false
        }
    }
}

async fn scheduled(
    notifier: &Notifier,
    redis: &mut ConnectionManager,
    id: Uuid,
) -> anyhow::Result<()> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(scheduled_job_key(id))
        .query_async(redis)
        .await?;
    // Gone: delivered before and cleaned up (this entry came back with a redelivery).
    let Some(raw) = raw else { return Ok(()) };
    let n: Notification = match serde_json::from_str(&raw) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(%id, error = %e, "kept scheduled notification does not parse; dropped");
            return Ok(());
        }
    };
    notifier.release_and_deliver(&n).await.map_err(failed)?;
    let _: () = redis::cmd("DEL")
        .arg(scheduled_job_key(id))
        .query_async(redis)
        .await?;
    Ok(())
}

async fn held(
    notifier: &Notifier,
    redis: &mut ConnectionManager,
    id: Uuid,
    channel: DeliveryChannel,
) -> anyhow::Result<()> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(held_key(id, channel))
        .query_async(redis)
        .await?;
    let Some(raw) = raw else { return Ok(()) };
    let job: DeliveryJob = match serde_json::from_str(&raw) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(%id, error = %e, "held job does not parse; dropped");
            return Ok(());
        }
    };
    notifier.publish_job(&job).await.map_err(failed)?;
    queued(redis, &job).await?;
    let _: () = redis::cmd("DEL")
        .arg(held_key(id, channel))
        .query_async(redis)
        .await?;
    Ok(())
}

async fn digest(
    notifier: &Notifier,
    redis: &mut ConnectionManager,
    window: &DigestWindow,
) -> anyhow::Result<()> {
    let (items, _) = digests::close(redis, window).await?;
    if items.is_empty() {
        return Ok(());
    }
    let muted = digests::take_muted_once(redis, window, &items).await?;
    let job = digests::build_job(window, &items, muted);
    notifier.publish_job(&job).await.map_err(failed)?;
    queued(redis, &job).await
}

/// Logs `queued` for every notification of a published job (a final status stays).
async fn queued(redis: &mut ConnectionManager, job: &DeliveryJob) -> anyhow::Result<()> {
    for id in &job.notification_ids {
        delivery_log::record(
            redis,
            *id,
            job.channel,
            DeliveryStatus::Queued,
            &AttemptInfo::default(),
        )
        .await?;
    }
    Ok(())
}

/// Ticks every `NotifierSettings::tick` until `shutdown`.
pub async fn run_scheduler(notifier: Notifier, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(notifier.settings.tick.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(e) = tick(&notifier).await {
                    tracing::warn!(error = %e, "notification scheduler tick failed");
                }
            }
            _ = shutdown.wait() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse() {
        let id = Uuid::now_v7();
        assert_eq!(
            Entry::parse(&format!("scheduled:{id}")),
            Some(Entry::Scheduled(id))
        );
        assert_eq!(
            Entry::parse(&format!("held:{id}:email")),
            Some(Entry::Held(id, DeliveryChannel::Email))
        );
        assert_eq!(
            Entry::parse("digest:u-1:chat:5"),
            Some(Entry::Digest(DigestWindow {
                user: "u-1".into(),
                key: "chat".into(),
                start_ms: 5
            }))
        );
        for bad in [
            "scheduled:nope".to_string(),
            format!("held:{id}:in_app"),
            format!("held:{id}:fax"),
            format!("held:{id}"),
            format!("scheduled:{}", id.simple()),
            "other:1".to_string(),
        ] {
            assert_eq!(Entry::parse(&bad), None, "{bad}");
        }
    }
}
