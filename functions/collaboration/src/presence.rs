//! Presence per document, one model for two sources: the awareness states of co-editing
//! clients (a Yjs `cursor: {anchor, head}` of relative positions, plus optional `mode`,
//! `viewport` and `device`) and the REST routes for clients without Yjs. A *session* is one
//! awareness client (`{user}:y{clientId}`) or a user's REST presence (`{user}:rest`); the
//! user and role always come from the authenticated connection or request, never from what
//! a client claims.
//!
//! Where it lives:
//! - the document task on the instance that owns a session holds it and resolves its
//!   positions against the live document (`document::sessions`);
//! - every instance with the document loaded learns the others' sessions over core NATS
//!   (`coedit.presence.{documentId}`), so conflicts between clients of different instances
//!   are seen;
//! - Redis keeps the sessions (`inkwire:coedit:{documentId}:presence`, a hash session →
//!   entry, and `…:presence:seen`, a sorted set by last-seen time) for instances that load
//!   the document later, with an instance heartbeat (`inkwire:coedit:instance:{id}`, a key
//!   with a TTL): the sessions of an instance whose heartbeat expired are removed by the
//!   others, so a crashed instance's presence does not linger.

use std::collections::HashSet;
use std::time::Duration;

use inkwire_shared::membership::ProjectRole;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use yrs::StickyIndex;

use crate::document::writes;

/// What a collaborator is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Editing,
    Viewing,
    Commenting,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "editing" => Some(Mode::Editing),
            "viewing" => Some(Mode::Viewing),
            "commenting" => Some(Mode::Commenting),
            _ => None,
        }
    }
}

/// Where a session comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Yjs,
    Rest,
}

/// First and last visible paragraph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewport {
    pub first: u32,
    pub last: u32,
}

/// One session's presence as stored and shared between instances. Positions are relative
/// positions (Yjs JSON form), resolved by whoever reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub session_id: String,
    pub user_id: String,
    pub role: ProjectRole,
    pub source: Source,
    /// The instance that owns the session (its heartbeat keeps it alive).
    pub instance: String,
    #[serde(default)]
    pub anchor: Option<StickyIndex>,
    #[serde(default)]
    pub head: Option<StickyIndex>,
    #[serde(default)]
    pub viewport: Option<Viewport>,
    pub mode: Mode,
    #[serde(default)]
    pub device: Option<String>,
    /// Characters typed in the last minute.
    #[serde(default)]
    pub typing_velocity: u32,
    /// Unix milliseconds.
    pub last_seen: u64,
    #[serde(default)]
    pub last_edit: Option<u64>,
}

impl Entry {
    /// Can this session be a party to a conflict? A writer in `editing` mode.
    pub fn editing(&self) -> bool {
        writes(self.role) && self.mode == Mode::Editing
    }
}

/// The mode a session of `role` gets when it does not say: writers edit, others view.
pub fn default_mode(role: ProjectRole) -> Mode {
    if writes(role) {
        Mode::Editing
    } else {
        Mode::Viewing
    }
}

/// What an awareness state says about presence. Unknown or malformed fields are ignored
/// (awareness is free-form; other tools put their own fields there).
#[derive(Debug, Default, PartialEq)]
pub struct AwarenessFields {
    pub anchor: Option<StickyIndex>,
    pub head: Option<StickyIndex>,
    pub mode: Option<Mode>,
    pub viewport: Option<Viewport>,
    pub device: Option<String>,
}

pub fn from_awareness(state: &Value) -> AwarenessFields {
    let sticky = |v: Option<&Value>| {
        v.filter(|v| v.is_object())
            .and_then(|v| serde_json::from_value::<StickyIndex>(v.clone()).ok())
    };
    let cursor = state.get("cursor");
    let viewport = state.get("viewport").and_then(|v| {
        let first = u32::try_from(v.get("first")?.as_u64()?).ok()?;
        let last = u32::try_from(v.get("last")?.as_u64()?).ok()?;
        (first <= last).then_some(Viewport { first, last })
    });
    AwarenessFields {
        anchor: sticky(cursor.and_then(|c| c.get("anchor"))),
        head: sticky(cursor.and_then(|c| c.get("head"))),
        mode: state
            .get("mode")
            .and_then(Value::as_str)
            .and_then(Mode::parse),
        viewport,
        device: state
            .get("device")
            .and_then(Value::as_str)
            .filter(|d| !d.is_empty() && d.len() <= 64)
            .map(str::to_string),
    }
}

/// Core NATS subject on which instances share a document's presence.
pub fn presence_subject(document: &str) -> String {
    format!("coedit.presence.{document}")
}

/// What instances tell each other.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Wire {
    Set { entries: Vec<Entry> },
    Remove { sessions: Vec<String> },
}

pub fn presence_key(document: &str) -> String {
    format!("inkwire:coedit:{document}:presence")
}

pub fn seen_key(document: &str) -> String {
    format!("inkwire:coedit:{document}:presence:seen")
}

pub fn instance_key(instance: &str) -> String {
    format!("inkwire:coedit:instance:{instance}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Stores sessions; the keys expire when nobody renews any session of the document.
pub async fn store(
    redis: &mut ConnectionManager,
    document: &str,
    entries: &[Entry],
    ttl: Duration,
) -> redis::RedisResult<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let (pk, sk) = (presence_key(document), seen_key(document));
    let mut pipe = redis::pipe();
    for e in entries {
        let json = serde_json::to_string(e).expect("entries serialize");
        pipe.hset(&pk, &e.session_id, json).ignore();
        pipe.zadd(&sk, &e.session_id, e.last_seen).ignore();
    }
    let ms = (ttl.as_millis() as i64).saturating_mul(2);
    pipe.pexpire(&pk, ms).ignore().pexpire(&sk, ms).ignore();
    pipe.query_async(redis).await
}

/// Removes sessions; answers which of them were still stored (so that of several instances
/// noticing a dead one, one announces each departure).
pub async fn remove(
    redis: &mut ConnectionManager,
    document: &str,
    sessions: &[String],
) -> redis::RedisResult<Vec<bool>> {
    if sessions.is_empty() {
        return Ok(Vec::new());
    }
    let (pk, sk) = (presence_key(document), seen_key(document));
    let mut pipe = redis::pipe();
    for s in sessions {
        pipe.hdel(&pk, s);
        pipe.zrem(&sk, s).ignore();
    }
    let removed: Vec<i64> = pipe.query_async(redis).await?;
    Ok(removed.into_iter().map(|n| n > 0).collect())
}

/// The stored sessions of a document that are fresh (seen within `ttl`) and whose instance
/// is alive; stale ones are deleted on the way.
pub async fn load(
    redis: &mut ConnectionManager,
    document: &str,
    ttl: Duration,
) -> redis::RedisResult<Vec<Entry>> {
    let (pk, sk) = (presence_key(document), seen_key(document));
    let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
    let stale: Vec<String> = redis
        .zrangebyscore(&sk, "-inf", format!("({cutoff}"))
        .await?;
    if !stale.is_empty() {
        remove(redis, document, &stale).await?;
    }
    let all: Vec<(String, String)> = redis.hgetall(&pk).await?;
    let entries: Vec<Entry> = all
        .into_iter()
        .filter_map(|(_, json)| serde_json::from_str::<Entry>(&json).ok())
        .filter(|e| e.last_seen >= cutoff)
        .collect();
    let instances: Vec<String> = entries
        .iter()
        .map(|e| e.instance.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let alive = alive(redis, &instances).await?;
    let (live, dead): (Vec<Entry>, Vec<Entry>) = entries
        .into_iter()
        .partition(|e| alive.contains(&e.instance));
    if !dead.is_empty() {
        let sessions: Vec<String> = dead.into_iter().map(|e| e.session_id).collect();
        remove(redis, document, &sessions).await?;
    }
    Ok(live)
}

/// Renews this instance's heartbeat.
pub async fn heartbeat(
    redis: &mut ConnectionManager,
    instance: &str,
    ttl: Duration,
) -> redis::RedisResult<()> {
    redis
        .pset_ex(instance_key(instance), 1, ttl.as_millis() as u64)
        .await
}

/// Which of `instances` have a live heartbeat.
pub async fn alive(
    redis: &mut ConnectionManager,
    instances: &[String],
) -> redis::RedisResult<HashSet<String>> {
    if instances.is_empty() {
        return Ok(HashSet::new());
    }
    let mut pipe = redis::pipe();
    for i in instances {
        pipe.exists(instance_key(i));
    }
    let found: Vec<bool> = pipe.query_async(redis).await?;
    Ok(instances
        .iter()
        .zip(found)
        .filter(|(_, f)| *f)
        .map(|(i, _)| i.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn awareness_fields_from_a_yjs_state() {
        let state = json!({
            "user": {"name": "Ann"},
            "cursor": {
                "anchor": {"type": null, "tname": null, "item": {"client": 7, "clock": 3}, "assoc": 0},
                "head": {"type": null, "tname": "content", "item": null, "assoc": 0}
            },
            "mode": "commenting",
            "viewport": {"first": 2, "last": 9},
            "device": "ipad"
        });
        let f = from_awareness(&state);
        assert!(f.anchor.is_some() && f.head.is_some());
        assert_eq!(f.mode, Some(Mode::Commenting));
        assert_eq!(f.viewport, Some(Viewport { first: 2, last: 9 }));
        assert_eq!(f.device.as_deref(), Some("ipad"));
        let junk = from_awareness(
            &json!({"cursor": {"anchor": 5, "head": "x"}, "mode": "dancing",
            "viewport": {"first": 9, "last": 2}}),
        );
        assert_eq!(junk, AwarenessFields::default());
    }

    #[test]
    fn entries_round_trip() {
        let e = Entry {
            session_id: "a:rest".into(),
            user_id: "a".into(),
            role: ProjectRole::Editor,
            source: Source::Rest,
            instance: "i1".into(),
            anchor: serde_json::from_value(json!({"item": {"client": 1, "clock": 2}, "assoc": 0}))
                .ok(),
            head: None,
            viewport: None,
            mode: Mode::Editing,
            device: None,
            typing_velocity: 12,
            last_seen: 5,
            last_edit: None,
        };
        let back: Entry = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert_eq!(back, e);
        assert!(e.editing());
    }
}
