//! Who did what to a document: per user and document, characters (Yjs clock units: UTF-16
//! code units of text) inserted and deleted, updates, and active minutes, counted from the
//! updates this instance accepted (measured when applied, attributed to the `Inkwire-Author`
//! header they were stored with). Counted once: only the instance that accepted an update
//! counts it.
//!
//! Edits are aggregated in memory and flushed every `attribution_interval` (a few seconds):
//! the counters go to one Redis hash per document (`inkwire:coedit:{documentId}:contributions`,
//! fields `{userId}:inserted`, `:deleted`, `:updates`, `:minutes`, `:lastMinute`, in one Lua
//! script per user so concurrent instances add up), and one `collaboration.edit_applied`
//! event per user and document goes to JetStream — not one per keystroke.
//! `collaboration.user_joined` / `user_left` are published as connections come and go.
//!
//! What an instance held in memory when it died is not counted (at most one interval); the
//! document content itself is never at risk (it is in the stream before anyone sees it).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use inkwire_shared::consumer::Shutdown;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish_acked};
use inkwire_shared::membership::ProjectRole;
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::protocol::Measure;

/// `source` of the events this module publishes.
pub const SOURCE: &str = "collaboration";

/// Why a connection left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    Closed,
    Timeout,
    Kicked,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Closed => "closed",
            LeaveReason::Timeout => "timeout",
            LeaveReason::Kicked => "kicked",
        }
    }
}

/// What the documents report.
#[derive(Debug)]
pub enum Record {
    Edit {
        document: String,
        project: String,
        user: String,
        measure: Measure,
        at: time::OffsetDateTime,
    },
    Joined {
        document: String,
        project: String,
        user: String,
        client: String,
        role: ProjectRole,
    },
    Left {
        document: String,
        project: String,
        user: String,
        client: String,
        reason: LeaveReason,
    },
}

/// Where documents send their records. Bounded: under overload records are dropped (and
/// logged) rather than held without limit.
#[derive(Clone)]
pub struct Attribution {
    tx: mpsc::Sender<Record>,
}

impl Attribution {
    pub fn record(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            tracing::warn!("attribution queue full; a record was dropped");
        }
    }
}

/// One user's edits on one document since the last flush.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    pub project: String,
    pub inserted: u64,
    pub deleted: u64,
    pub updates: u64,
    pub words_added: u64,
    pub words_deleted: u64,
    /// Unix minutes with at least one update.
    pub minutes: BTreeSet<i64>,
    /// Yjs client ids the user wrote with (who wrote which text).
    pub clients: BTreeSet<u64>,
}

/// Adds an edit to the pending aggregates.
pub fn aggregate(
    pending: &mut HashMap<(String, String), Pending>,
    document: String,
    project: String,
    user: String,
    m: Measure,
    at: time::OffsetDateTime,
) {
    let p = pending.entry((document, user)).or_default();
    p.project = project;
    p.inserted += m.inserted;
    p.deleted += m.deleted;
    p.updates += 1;
    p.words_added += m.words_added;
    p.words_deleted += m.words_deleted;
    p.minutes.insert(at.unix_timestamp().div_euclid(60));
    if let Some(c) = m.client
        && p.clients.len() < 64
    {
        p.clients.insert(c);
    }
}

/// The `collaboration.edit_applied` data of an aggregate over `period`.
pub fn edit_applied_data(p: &Pending, period: Duration) -> serde_json::Value {
    let operation = match (p.inserted > 0, p.deleted > 0) {
        (true, false) => "insert",
        (false, true) => "delete",
        (true, true) => "replace",
        (false, false) => "format",
    };
    json!({
        "operation": operation,
        "length": (p.inserted + p.deleted).min(1_000_000),
        "inserted": p.inserted.min(1_000_000_000),
        "deleted": p.deleted.min(1_000_000_000),
        "updates": p.updates.min(1_000_000_000),
        "periodMs": (period.as_millis() as u64).min(86_400_000),
    })
}

/// Starts the aggregator; it flushes a last time on shutdown.
pub fn start(
    js: async_nats::jetstream::Context,
    redis: ConnectionManager,
    interval: Duration,
    shutdown: Shutdown,
) -> Attribution {
    let (tx, rx) = mpsc::channel(65_536);
    tokio::spawn(run(js, redis, interval, rx, shutdown));
    Attribution { tx }
}

async fn run(
    js: async_nats::jetstream::Context,
    mut redis: ConnectionManager,
    interval: Duration,
    mut rx: mpsc::Receiver<Record>,
    mut shutdown: Shutdown,
) {
    let mut pending: HashMap<(String, String), Pending> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        let mut due = false;
        tokio::select! {
            r = rx.recv() => match r {
                Some(Record::Edit { document, project, user, measure, at }) => {
                    aggregate(&mut pending, document, project, user, measure, at);
                }
                Some(Record::Joined { document, project, user, client, role }) => {
                    let data = json!({"clientId": client, "role": role.as_str()});
                    publish(&js, "user_joined", &user, &project, &document, data).await;
                }
                Some(Record::Left { document, project, user, client, reason }) => {
                    let data = json!({"clientId": client, "reason": reason.as_str()});
                    publish(&js, "user_left", &user, &project, &document, data).await;
                }
                None => stopping = true,
            },
            _ = tick.tick() => due = true,
            _ = shutdown.wait(), if !stopping => stopping = true,
        }
        if !pending.is_empty() && due {
            flush(&js, &mut redis, std::mem::take(&mut pending), interval).await;
        }
        if stopping {
            // Drain what is queued, once.
            while let Ok(Record::Edit {
                document,
                project,
                user,
                measure,
                at,
            }) = rx.try_recv()
            {
                aggregate(&mut pending, document, project, user, measure, at);
            }
            if !pending.is_empty() {
                flush(&js, &mut redis, std::mem::take(&mut pending), interval).await;
            }
            return;
        }
    }
}

/// Adds one aggregate to the document's contribution hash; active minutes count minutes
/// after the last one counted (so two instances reporting the same minute count it once,
/// in the common case). The same minutes are counted per hour and user in the activity hash
/// (`{unixHour}:{user}` → minutes) and, for the team, under the pseudo-user `*` (minutes
/// in which anyone edited), for the metrics route.
const ADD_CONTRIBUTION: &str = r#"
local key, activity, user = KEYS[1], KEYS[2], ARGV[1]
redis.call('HINCRBY', key, user .. ':inserted', ARGV[2])
redis.call('HINCRBY', key, user .. ':deleted', ARGV[3])
redis.call('HINCRBY', key, user .. ':updates', ARGV[4])
redis.call('HINCRBY', key, user .. ':wordsAdded', ARGV[5])
redis.call('HINCRBY', key, user .. ':wordsDeleted', ARGV[6])
local function count(who)
  local last = tonumber(redis.call('HGET', key, who .. ':lastMinute') or '-1')
  local added = 0
  for i = 7, #ARGV do
    local m = tonumber(ARGV[i])
    if m > last then
      added = added + 1
      last = m
      redis.call('HINCRBY', activity, math.floor(m / 60) .. ':' .. who, 1)
    end
  end
  if added > 0 then
    redis.call('HINCRBY', key, who .. ':minutes', added)
    redis.call('HSET', key, who .. ':lastMinute', last)
  end
  return added
end
local added = count(user)
count('*')
return added
"#;

/// The Redis hash of a document's activity per hour: `{unixHour}:{user}` → active minutes.
pub fn activity_key(document: &str) -> String {
    format!("inkwire:coedit:{document}:activity")
}

/// The Redis hash of which user wrote with which Yjs client id.
pub fn clients_key(document: &str) -> String {
    format!("inkwire:coedit:{document}:clients")
}

/// The Redis hash of a document's contributions.
pub fn contributions_key(document: &str) -> String {
    format!("inkwire:coedit:{document}:contributions")
}

async fn flush(
    js: &async_nats::jetstream::Context,
    redis: &mut ConnectionManager,
    pending: HashMap<(String, String), Pending>,
    period: Duration,
) {
    for ((document, user), p) in pending {
        let script = redis::Script::new(ADD_CONTRIBUTION);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(contributions_key(&document))
            .key(activity_key(&document))
            .arg(&user)
            .arg(p.inserted)
            .arg(p.deleted)
            .arg(p.updates)
            .arg(p.words_added)
            .arg(p.words_deleted);
        for m in &p.minutes {
            invocation.arg(*m);
        }
        if let Err(e) = invocation.invoke_async::<i64>(redis).await {
            tracing::warn!(document, error = %e, "contribution counters not stored");
        }
        if !p.clients.is_empty() {
            let mut pipe = redis::pipe();
            for c in &p.clients {
                pipe.hset_nx(clients_key(&document), c, &user).ignore();
            }
            if let Err(e) = pipe.query_async::<()>(redis).await {
                tracing::warn!(document, error = %e, "client authors not stored");
            }
        }
        let data = edit_applied_data(&p, period);
        publish(js, "edit_applied", &user, &p.project, &document, data).await;
    }
}

pub(crate) async fn publish(
    js: &async_nats::jetstream::Context,
    event_type: &str,
    user: &str,
    project: &str,
    document: &str,
    data: serde_json::Value,
) {
    let event = Event::builder(Category::Collaboration, event_type, user)
        .project(project)
        .document(document)
        .data(data)
        .source(SOURCE)
        .build();
    let payload = Bytes::from(serde_json::to_vec(&event).expect("events serialize"));
    let msg = Outgoing {
        subject: event.subject(),
        msg_id: event.id.to_string(),
        payload,
    };
    if let Err(e) = publish_acked(js, msg).await {
        tracing::warn!(event_type, document, error = %e, "collaboration event not published");
    }
}

/// One contributor of a document, as the REST API answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Contribution {
    pub user_id: String,
    pub inserted: u64,
    pub deleted: u64,
    pub updates: u64,
    pub words_added: u64,
    pub words_deleted: u64,
    pub active_minutes: u64,
}

/// Reads a document's contributions, sorted by user id.
pub async fn contributions(
    redis: &mut ConnectionManager,
    document: &str,
) -> redis::RedisResult<Vec<Contribution>> {
    let all: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(contributions_key(document))
        .query_async(redis)
        .await?;
    Ok(parse_contributions(all))
}

/// Minutes in which anyone edited the document.
pub async fn team_minutes(
    redis: &mut ConnectionManager,
    document: &str,
) -> redis::RedisResult<u64> {
    let v: Option<i64> = redis::cmd("HGET")
        .arg(contributions_key(document))
        .arg("*:minutes")
        .query_async(redis)
        .await?;
    Ok(v.unwrap_or(0).max(0) as u64)
}

fn parse_contributions(all: HashMap<String, i64>) -> Vec<Contribution> {
    let mut by_user: std::collections::BTreeMap<String, Contribution> = Default::default();
    for (field, value) in all {
        let Some((user, what)) = field.rsplit_once(':') else {
            continue;
        };
        // The team's minutes, not a user.
        if user == "*" {
            continue;
        }
        let c = by_user
            .entry(user.to_string())
            .or_insert_with(|| Contribution {
                user_id: user.to_string(),
                ..Default::default()
            });
        let v = value.max(0) as u64;
        match what {
            "inserted" => c.inserted = v,
            "deleted" => c.deleted = v,
            "updates" => c.updates = v,
            "minutes" => c.active_minutes = v,
            "wordsAdded" => c.words_added = v,
            "wordsDeleted" => c.words_deleted = v,
            _ => {}
        }
    }
    by_user.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use inkwire_shared::schema::schemas;

    #[test]
    fn aggregates_per_user_and_document() {
        let mut pending = HashMap::new();
        let t0 = time::OffsetDateTime::from_unix_timestamp(600).unwrap();
        for (user, ins, del, secs) in [
            ("a", 3, 0, 0),
            ("a", 0, 2, 30),
            ("b", 1, 0, 0),
            ("a", 1, 0, 70),
        ] {
            aggregate(
                &mut pending,
                "d".into(),
                "p".into(),
                user.into(),
                Measure {
                    inserted: ins,
                    deleted: del,
                    ..Default::default()
                },
                t0 + time::Duration::seconds(secs),
            );
        }
        let a = &pending[&("d".to_string(), "a".to_string())];
        assert_eq!((a.inserted, a.deleted, a.updates), (4, 2, 3));
        assert_eq!(a.minutes.len(), 2);
        let data = edit_applied_data(a, Duration::from_secs(5));
        assert_eq!(data["operation"], "replace");
        assert_eq!(data["length"], 6);
    }

    #[test]
    fn events_fit_their_schemas() {
        let p = Pending {
            project: "p".into(),
            inserted: 5,
            updates: 5,
            ..Default::default()
        };
        for (t, data) in [
            (
                "edit_applied",
                edit_applied_data(&p, Duration::from_secs(5)),
            ),
            (
                "user_joined",
                json!({"clientId": "abc-1", "role": "editor"}),
            ),
            (
                "user_left",
                json!({"clientId": "abc-1", "reason": "kicked"}),
            ),
        ] {
            let event = Event::builder(Category::Collaboration, t, "u-1")
                .project("p")
                .document("d")
                .data(data)
                .source(SOURCE)
                .build();
            let value = serde_json::to_value(&event).unwrap();
            schemas()
                .validate_event(&value)
                .unwrap_or_else(|e| panic!("{t}: {e:?}"));
        }
    }

    #[test]
    fn contributions_parse_by_user() {
        let all: HashMap<String, i64> = [
            ("alice:inserted", 10),
            ("alice:deleted", 2),
            ("alice:updates", 7),
            ("alice:minutes", 1),
            ("alice:lastMinute", 29_000_000),
            ("bob:inserted", 1),
            ("*:minutes", 3),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let c = parse_contributions(all);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].user_id, "alice");
        assert_eq!(c[0].active_minutes, 1);
        assert_eq!(c[1].inserted, 1);
    }
}
