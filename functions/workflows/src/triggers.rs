//! What starts runs besides `POST /api/workflows/{id}/execute`: events and cron schedules.
//!
//! **Events.** Registering a version indexes its event triggers: the workflow's id goes into
//! `inkwire:wf:on:{category}:{type}` (and out of the sets of the version before). A durable
//! consumer per category stream (`workflow-triggers`, delivering only events stored after
//! it was created: a new deployment does not replay a month of history into runs) looks up
//! the workflows of each event's type and starts a run of each whose project is the event's
//! and whose filter holds. The event id is the run's once key, so a redelivered event
//! starts nothing new. A workflow never triggers on an `automation` event about itself
//! (no run loops).
//!
//! **Filters** are conditions on the envelope, all of which must hold: `path` is a dotted
//! path (`data.words`, `projectId`), `op` one of `eq`, `ne`, `gt`, `gte`, `lt`, `lte`
//! (numbers, or strings compared as text), `in` (the value is in a list), `exists`. A path
//! that is absent fails every op but `ne`.
//!
//! **Cron.** Each cron trigger of the latest version is a member `{workflowId}~{index}` of the
//! due queue `inkwire:wf:cron`, due at its next fire time (kept in `inkwire:wf:cron:at`).
//! Every worker claims due members (a lease: one instance fires each), starts the run with
//! the once key `cron-{index}-{fireTime}`, and schedules the next fire time after the later
//! of the fire time and now: a scheduler that was down fires a missed time once, not once
//! per missed occurrence. DST rules: [`crate::cron`].

use std::collections::BTreeSet;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Shutdown};
use inkwire_shared::due_queue::DueQueue;
use inkwire_shared::events::Category;
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use crate::definition::{Definition, FilterCondition, FilterOp, Trigger};
use crate::engine::{self, Engine, StartRequest, now_ms, rfc3339};
use crate::registry;
use crate::store;

/// The durable consumer (one per category stream).
pub const CONSUMER: &str = "workflow-triggers";

pub fn event_index_key(category: &str, event_type: &str) -> String {
    format!("{}:on:{category}:{event_type}", store::PREFIX)
}

pub fn cron_key() -> String {
    format!("{}:cron", store::PREFIX)
}

pub fn cron_at_key() -> String {
    format!("{}:cron:at", store::PREFIX)
}

fn cron_member(workflow: &str, index: usize) -> String {
    format!("{workflow}~{index}")
}

/// The value at a dotted path of `v`.
fn at_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, part| match v {
        Value::Object(m) => m.get(part),
        Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Whether one condition holds for `event`.
pub fn condition_holds(event: &Value, c: &FilterCondition) -> bool {
    let found = at_path(event, &c.path).filter(|v| !v.is_null());
    let want = c.value.as_ref().unwrap_or(&Value::Null);
    use std::cmp::Ordering::*;
    match (c.op, found) {
        (FilterOp::Exists, f) => f.is_some(),
        (FilterOp::Ne, None) => true,
        (_, None) => false,
        (FilterOp::Eq, Some(v)) => v == want || compare(v, want) == Some(Equal),
        (FilterOp::Ne, Some(v)) => !(v == want || compare(v, want) == Some(Equal)),
        (FilterOp::Gt, Some(v)) => compare(v, want) == Some(Greater),
        (FilterOp::Gte, Some(v)) => matches!(compare(v, want), Some(Greater | Equal)),
        (FilterOp::Lt, Some(v)) => compare(v, want) == Some(Less),
        (FilterOp::Lte, Some(v)) => matches!(compare(v, want), Some(Less | Equal)),
        (FilterOp::In, Some(v)) => want.as_array().is_some_and(|list| list.contains(v)),
    }
}

/// Whether `event` (an envelope) starts a run of `definition` through one of its triggers.
pub fn event_matches(definition: &Definition, event: &Value) -> bool {
    if event.get("projectId").and_then(Value::as_str) != Some(definition.project_id.as_str()) {
        return false;
    }
    if event["category"] == "automation" && event["data"]["workflowId"] == definition.id.as_str() {
        return false;
    }
    definition.triggers.iter().any(|t| match t {
        Trigger::Event {
            category,
            event_type,
            filter,
        } => {
            event["category"] == category.as_str()
                && event["type"] == event_type.as_str()
                && filter.iter().all(|c| condition_holds(event, c))
        }
        _ => false,
    })
}

/// The index sets of a definition's event triggers.
pub fn event_index_keys(definition: &Definition) -> BTreeSet<String> {
    definition
        .triggers
        .iter()
        .filter_map(|t| match t {
            Trigger::Event {
                category,
                event_type,
                ..
            } => Some(event_index_key(category, event_type)),
            _ => None,
        })
        .collect()
}

/// KEYS: the definition hash. ARGV: workflow id, version, then the new index sets.
/// Moves the id from the sets of the version indexed before to the new ones, unless a
/// higher version is indexed already (registrations racing).
const INDEX: &str = r#"
local indexed = tonumber(redis.call('HGET', KEYS[1], 'indexed') or '0')
if indexed > tonumber(ARGV[2]) then return 0 end
local old = redis.call('HGET', KEYS[1], 'onsets') or ''
for k in string.gmatch(old, '[^,]+') do redis.call('SREM', k, ARGV[1]) end
local new = {}
for i = 3, #ARGV do
  redis.call('SADD', ARGV[i], ARGV[1])
  table.insert(new, ARGV[i])
end
redis.call('HSET', KEYS[1], 'onsets', table.concat(new, ','), 'indexed', ARGV[2])
return 1
"#;

/// Indexes a newly registered (latest) version's triggers: its event triggers, and its cron
/// triggers in the due queue (cron triggers of the version before that it no longer has are
/// removed).
pub async fn index(redis: &mut ConnectionManager, definition: &Definition) -> anyhow::Result<()> {
    static S: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let mut invocation = S.get_or_init(|| redis::Script::new(INDEX)).prepare_invoke();
    invocation
        .key(store::definition_key(&definition.id))
        .arg(&definition.id)
        .arg(definition.version);
    for k in event_index_keys(definition) {
        invocation.arg(k);
    }
    let indexed: i64 = invocation.invoke_async(redis).await?;
    if indexed == 0 {
        return Ok(());
    }
    let queue = DueQueue::new(cron_key());
    let now = now_ms();
    let mut kept = BTreeSet::new();
    for (i, t) in definition.triggers.iter().enumerate() {
        if let Trigger::Cron {
            schedule,
            time_zone,
        } = t
        {
            let next = next_fire(schedule, time_zone, now)?;
            let member = cron_member(&definition.id, i);
            redis::cmd("HSET")
                .arg(cron_at_key())
                .arg(&member)
                .arg(next)
                .query_async::<()>(redis)
                .await?;
            queue.schedule(redis, &member, next).await?;
            kept.insert(i);
        }
    }
    for i in 0..crate::validate::MAX_TRIGGERS {
        if !kept.contains(&i) {
            let member = cron_member(&definition.id, i);
            if queue.cancel(redis, &member).await? {
                redis::cmd("HDEL")
                    .arg(cron_at_key())
                    .arg(&member)
                    .query_async::<()>(redis)
                    .await?;
            }
        }
    }
    Ok(())
}

/// The first fire time strictly after `after_ms`.
pub fn next_fire(schedule: &str, time_zone: &str, after_ms: u64) -> anyhow::Result<u64> {
    let after = jiff::Timestamp::from_millisecond(after_ms as i64)?;
    let next = crate::cron::next_after(schedule, time_zone, after).map_err(anyhow::Error::msg)?;
    Ok(next.as_millisecond().max(0) as u64)
}

/// The consumer of one category stream.
pub fn spec(stream: &str) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(stream, CONSUMER);
    spec.deliver_policy = DeliverPolicy::New;
    spec.batch = 50;
    spec
}

/// Starts the runs one event triggers.
pub async fn on_event(engine: &Engine, delivery: Delivery) -> Result<(), HandlerError> {
    let event: Value = match serde_json::from_slice(&delivery.payload) {
        Ok(v) => v,
        Err(_) => return Ok(()), // not an envelope: the events API never stores one
    };
    let (Some(category), Some(event_type), Some(id)) = (
        event.get("category").and_then(Value::as_str),
        event.get("type").and_then(Value::as_str),
        event.get("id").and_then(Value::as_str),
    ) else {
        return Ok(());
    };
    if !inkwire_shared::membership::is_valid_id(category)
        || !inkwire_shared::membership::is_valid_id(event_type)
        || !inkwire_shared::membership::is_valid_id(id)
    {
        return Ok(());
    }
    let retry = |e: anyhow::Error| HandlerError::Retry(e.to_string());
    let mut redis = engine.redis.clone();
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(event_index_key(category, event_type))
        .query_async(&mut redis)
        .await
        .map_err(|e| HandlerError::Retry(e.to_string()))?;
    for wf in ids {
        let Some((latest, _)) = registry::latest(&mut redis, &wf).await.map_err(retry)? else {
            continue;
        };
        let loaded = engine.definition(&wf, latest).await.map_err(retry)?;
        if !event_matches(&loaded.definition, &event) {
            continue;
        }
        let mut trigger = event.clone();
        trigger["kind"] = json!("event");
        engine::start_run(
            engine,
            &loaded,
            StartRequest {
                trigger,
                started_by: event["userId"].as_str().unwrap_or("events").to_string(),
                once: Some(format!("ev-{id}")),
            },
        )
        .await
        .map_err(retry)?;
    }
    Ok(())
}

/// Runs the event trigger consumers (one per category stream) until `shutdown`.
pub async fn run_event_triggers(engine: Engine, shutdown: Shutdown) -> anyhow::Result<()> {
    let tasks: Vec<_> = Category::ALL
        .iter()
        .map(|c| {
            let e = engine.clone();
            let js: Context = engine.js.clone();
            let spec = spec(&subjects::event_stream(*c));
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                consumer::run(
                    js,
                    spec,
                    move |d| {
                        let e = e.clone();
                        async move { on_event(&e, d).await }
                    },
                    shutdown,
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Fires the cron triggers that are due (one pass).
pub async fn fire_due(engine: &Engine) -> anyhow::Result<usize> {
    let queue = DueQueue::new(cron_key());
    let mut redis = engine.redis.clone();
    let now = now_ms();
    let claimed = queue.claim(&mut redis, now, 100, 60_000).await?;
    let n = claimed.len();
    for lease in claimed {
        let Some((wf, index)) = lease
            .member
            .split_once('~')
            .and_then(|(w, i)| Some((w.to_string(), i.parse::<usize>().ok()?)))
        else {
            queue.cancel(&mut redis, &lease.member).await?;
            continue;
        };
        let at: Option<u64> = redis::cmd("HGET")
            .arg(cron_at_key())
            .arg(&lease.member)
            .query_async(&mut redis)
            .await?;
        let latest = registry::latest(&mut redis, &wf).await?;
        let trigger = match latest {
            Some((v, _)) => {
                let loaded = engine.definition(&wf, v).await?;
                match loaded.definition.triggers.get(index) {
                    Some(Trigger::Cron {
                        schedule,
                        time_zone,
                    }) => Some((loaded.clone(), schedule.clone(), time_zone.clone())),
                    _ => None,
                }
            }
            None => None,
        };
        let Some((loaded, schedule, time_zone)) = trigger else {
            queue.cancel(&mut redis, &lease.member).await?;
            continue;
        };
        let at = at.unwrap_or(now);
        engine::start_run(
            engine,
            &loaded,
            StartRequest {
                trigger: json!({"kind": "cron", "schedule": schedule, "timeZone": time_zone,
                    "scheduledAt": rfc3339(at), "projectId": loaded.definition.project_id}),
                started_by: "scheduler".into(),
                once: Some(format!("cron-{index}-{at}")),
            },
        )
        .await?;
        let next = next_fire(&schedule, &time_zone, at.max(now))?;
        redis::cmd("HSET")
            .arg(cron_at_key())
            .arg(&lease.member)
            .arg(next)
            .query_async::<()>(&mut redis)
            .await?;
        queue.schedule(&mut redis, &lease.member, next).await?;
    }
    Ok(n)
}

/// The cron loop (every 250 ms; also starts the automatic reruns) until `shutdown`.
pub async fn run_cron(engine: Engine, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(std::time::Duration::from_millis(250));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.wait() => return Ok(()),
        }
        if let Err(e) = fire_due(&engine).await {
            tracing::warn!(error = %e, "workflow cron pass failed");
        }
        if let Err(e) = engine::fire_reruns(&engine).await {
            tracing::warn!(error = %e, "workflow automatic reruns failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(path: &str, op: FilterOp, value: Value) -> FilterCondition {
        FilterCondition {
            path: path.into(),
            op,
            value: Some(value),
        }
    }

    #[test]
    fn filters_compare_numbers_strings_lists_and_presence() {
        let e = json!({"projectId": "p", "data": {"words": 120, "to": "review", "tags": ["a"]}});
        assert!(condition_holds(
            &e,
            &cond("data.words", FilterOp::Gte, json!(100))
        ));
        assert!(condition_holds(
            &e,
            &cond("data.words", FilterOp::Gte, json!(120.0))
        ));
        assert!(!condition_holds(
            &e,
            &cond("data.words", FilterOp::Gt, json!(120))
        ));
        assert!(condition_holds(
            &e,
            &cond("data.words", FilterOp::Lt, json!(121))
        ));
        assert!(condition_holds(
            &e,
            &cond("data.to", FilterOp::Eq, json!("review"))
        ));
        assert!(condition_holds(
            &e,
            &cond("data.to", FilterOp::In, json!(["draft", "review"]))
        ));
        assert!(!condition_holds(
            &e,
            &cond("data.to", FilterOp::In, json!("review"))
        ));
        assert!(condition_holds(
            &e,
            &cond("data.tags.0", FilterOp::Eq, json!("a"))
        ));
        // Absent: only `ne` holds; strings and numbers do not compare.
        assert!(!condition_holds(
            &e,
            &cond("data.nope", FilterOp::Lt, json!(1))
        ));
        assert!(condition_holds(
            &e,
            &cond("data.nope", FilterOp::Ne, json!(1))
        ));
        assert!(!condition_holds(
            &e,
            &cond("data.to", FilterOp::Gt, json!(1))
        ));
        let exists = FilterCondition {
            path: "data.words".into(),
            op: FilterOp::Exists,
            value: None,
        };
        assert!(condition_holds(&e, &exists));
    }

    #[test]
    fn events_of_other_projects_and_own_events_never_trigger() {
        let def = crate::parse_definition(&json!({
            "id": "w", "version": 1, "projectId": "p",
            "triggers": [
                {"type": "event", "category": "writing", "eventType": "word_added",
                 "filter": [{"path": "data.words", "op": "gte", "value": 100}]},
                {"type": "event", "category": "automation", "eventType": "workflow_failed"}
            ],
            "steps": [{"id": "a", "action": "delay", "input": {"duration": "1s"}}]
        }))
        .unwrap();
        let e = |p: &str, words: u64| json!({"category": "writing", "type": "word_added", "projectId": p, "data": {"words": words}});
        assert!(event_matches(&def, &e("p", 100)));
        assert!(!event_matches(&def, &e("p", 99)));
        assert!(!event_matches(&def, &e("q", 100)));
        let failed = |wf: &str| json!({"category": "automation", "type": "workflow_failed", "projectId": "p", "data": {"workflowId": wf}});
        assert!(event_matches(&def, &failed("other")));
        assert!(!event_matches(&def, &failed("w")));
    }
}
