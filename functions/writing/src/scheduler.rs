//! Time-driven transitions (pause, break, automatic end, expiry) happen on time even when no
//! further input arrives: a ticker claims the sessions whose next transition is due (a lease
//! in the `inkwire:writing:due` sorted set, safe with several instances) and publishes a
//! `session_state_changed` request for each; the tracker applies it like any other event, so
//! a replay reproduces it.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use inkwire_shared::consumer::Shutdown;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish};
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde_json::json;
use time::OffsetDateTime;

use crate::state_machine::TrackerConfig;
use crate::store;

/// `metadata.source` of scheduler requests.
pub const SOURCE: &str = "scheduler";

fn now_ms() -> u64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64
}

/// One pass: publishes the due transitions; returns how many.
pub async fn tick(
    js: &jetstream::Context,
    redis: &mut ConnectionManager,
    cfg: &TrackerConfig,
) -> anyhow::Result<usize> {
    let now = now_ms();
    let leases = store::due_queue().claim(redis, now, 500, 10_000).await?;
    let mut published = 0;
    for id in leases.into_iter().map(|l| l.member) {
        let Some(loaded) = store::load(redis, &id).await? else {
            continue;
        };
        let s = loaded.session;
        let Some((to, reason, at)) = s.due_transition(now, cfg) else {
            continue;
        };
        let at_time = OffsetDateTime::from_unix_timestamp_nanos(at as i128 * 1_000_000)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        // The id names the transition, so every instance (and every retry) asks only once.
        let msg_id = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!(
                "{id}:{}:{}:{}",
                s.state.as_str(),
                to.as_str(),
                s.state_since_ms
            )
            .as_bytes(),
        );
        let mut b = Event::builder(
            Category::Writing,
            "session_state_changed",
            s.user_id.clone(),
        )
        .id(msg_id)
        .timestamp(at_time)
        .source(SOURCE)
        .data(json!({"sessionId": id, "from": s.state, "to": to, "reason": reason}));
        if let Some(p) = &s.project_id {
            b = b.project(p.clone());
        }
        if let Some(d) = &s.document_id {
            b = b.document(d.clone());
        }
        let event = b.build();
        publish(
            js,
            Outgoing {
                subject: subjects::event_subject(Category::Writing, "session_state_changed"),
                msg_id: msg_id.to_string(),
                payload: Bytes::from(serde_json::to_vec(&event)?),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        published += 1;
    }
    Ok(published)
}

/// Ticks every `interval` until `shutdown`.
pub async fn run_scheduler(
    js: jetstream::Context,
    mut redis: ConnectionManager,
    cfg: TrackerConfig,
    interval: Duration,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(e) = tick(&js, &mut redis, &cfg).await {
                    tracing::warn!(error = %e, "scheduler tick failed");
                }
            }
            _ = shutdown.wait() => return Ok(()),
        }
    }
}
