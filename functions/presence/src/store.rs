//! User presence in Redis, and the `presence_update` push.
//!
//! Keys (every id in them checked with `membership::is_valid_id` first):
//! - `inkwire:presence:user:{userId}` (hash): `status` (the last one pushed: `online`,
//!   `away`, `offline`), `lastActive` and `lastSeen` (ms), `manual` (`away` while the
//!   client said so), `version` (counts status changes; the push's message id uses it);
//! - `inkwire:presence:user:{userId}:conns` (hash): connection id → `{"instance",
//!   "connectedAt", "device": {"type", "name"}}`, one field per live connection on any
//!   instance (tabs and devices are separate connections; none replaces another);
//! - `inkwire:presence:instance:{instanceId}:conns` (set of `{userId}:{connectionId}`): what
//!   to sweep when the instance's heartbeat lapses;
//! - `inkwire:presence:closed:{connectionId}` (string, as long as the PRESENCE stream keeps
//!   a report: one hour): a connection that closed, so that a late or redelivered "opened"
//!   cannot bring it back (no report older than that can be delivered);
//! - `inkwire:presence:instance:{instanceId}:swept` (string, 1 day): the instance was swept;
//!   a report from it afterwards triggers a resync;
//! - `inkwire:presence:heartbeats` (hash): instance → time of its last report (ms), the
//!   `lastSeen` of users swept with it;
//! - due queues (`shared::due_queue`): `inkwire:presence:instances` (instance → when its
//!   heartbeat lapses) and `inkwire:presence:idle` (user → when they become idle).
//!
//! Every change of one user's state is one Lua script ([`apply`]) that applies the change,
//! derives the status and, when it differs from the one last pushed, stores it and bumps
//! `version`, so concurrent workers and API calls agree on which change gets pushed.

use std::collections::HashMap;
use std::sync::LazyLock;

use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::jetstream;
use inkwire_shared::membership;
use inkwire_shared::subjects;
use redis::Script;
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub fn user_key(user: &str) -> String {
    format!("inkwire:presence:user:{user}")
}
pub fn conns_key(user: &str) -> String {
    format!("inkwire:presence:user:{user}:conns")
}
pub fn instance_key(instance: &str) -> String {
    format!("inkwire:presence:instance:{instance}:conns")
}
pub fn closed_key(connection: &str) -> String {
    format!("inkwire:presence:closed:{connection}")
}
pub fn swept_key(instance: &str) -> String {
    format!("inkwire:presence:instance:{instance}:swept")
}
pub const HEARTBEATS_KEY: &str = "inkwire:presence:heartbeats";
pub const INSTANCES_QUEUE: &str = "inkwire:presence:instances";
pub const IDLE_QUEUE: &str = "inkwire:presence:idle";

/// A user's presence status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Away,
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Away => "away",
            Status::Offline => "offline",
        }
    }
    fn parse(s: &str) -> Status {
        match s {
            "online" => Status::Online,
            "away" => Status::Away,
            _ => Status::Offline,
        }
    }
}

/// The rule, also spelled in [`APPLY`]: offline without connections; away when the client
/// said so or nothing came from any connection for `away_after_ms`; online otherwise.
pub fn derive(
    connections: usize,
    manual_away: bool,
    last_active: u64,
    now: u64,
    away_after_ms: u64,
) -> Status {
    if connections == 0 {
        Status::Offline
    } else if manual_away || now.saturating_sub(last_active) >= away_after_ms {
        Status::Away
    } else {
        Status::Online
    }
}

/// KEYS: user hash, conns hash, instance set, closed marker.
/// ARGV: op, now, away_after, connection, instance member, connection data, at, manual,
/// closed-marker lifetime (s).
const APPLY: &str = r#"
local user, conns, inst, tomb = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, now, away = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local conn, member, data, at = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local seen = nil
local function bump(t)
  local la = tonumber(redis.call('HGET', user, 'lastActive') or '0')
  if t > la then redis.call('HSET', user, 'lastActive', t) end
end
if op == 'open' then
  if redis.call('EXISTS', tomb) == 0 then
    redis.call('HSET', conns, conn, data)
    redis.call('SADD', inst, member)
    bump(at)
  end
elseif op == 'active' then
  if redis.call('HEXISTS', conns, conn) == 1 then bump(at) end
elseif op == 'close' then
  redis.call('SET', tomb, '1', 'EX', tonumber(ARGV[9]))
  redis.call('HDEL', conns, conn)
  redis.call('SREM', inst, member)
  seen = at
elseif op == 'sweep' then
  redis.call('HDEL', conns, conn)
  redis.call('SREM', inst, member)
  seen = at
elseif op == 'status' then
  if redis.call('HLEN', conns) == 0 then return {-1} end
  if ARGV[8] == 'away' then
    redis.call('HSET', user, 'manual', 'away')
  else
    redis.call('HDEL', user, 'manual')
    -- Saying "I am here" is activity.
    bump(now)
  end
end
local n = redis.call('HLEN', conns)
local status
if n == 0 then
  status = 'offline'
  redis.call('HDEL', user, 'manual')
elseif redis.call('HGET', user, 'manual') == 'away' then
  status = 'away'
elseif now - tonumber(redis.call('HGET', user, 'lastActive') or '0') >= away then
  status = 'away'
else
  status = 'online'
end
local changed = 0
if (redis.call('HGET', user, 'status') or 'offline') ~= status then
  changed = 1
  redis.call('HSET', user, 'status', status)
  if status == 'offline' then redis.call('HSET', user, 'lastSeen', seen or now) end
  redis.call('HINCRBY', user, 'version', 1)
end
return {changed, status, redis.call('HGET', user, 'lastSeen') or '0',
  redis.call('HGET', user, 'lastActive') or '0', redis.call('HGET', user, 'version') or '0', n}
"#;

static APPLY_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(APPLY));

/// A change to one user's presence.
#[derive(Debug, Clone)]
pub enum Op<'a> {
    Open {
        instance: &'a str,
        connection: &'a str,
        data: String,
        at_ms: u64,
    },
    Active {
        connection: &'a str,
        at_ms: u64,
    },
    Close {
        instance: &'a str,
        connection: &'a str,
        at_ms: u64,
    },
    /// A connection of an instance whose heartbeat lapsed; `at_ms` is its last report.
    Sweep {
        instance: &'a str,
        connection: &'a str,
        at_ms: u64,
    },
    /// The client says `online` or `away`.
    SetStatus(&'a str),
    /// Only derive (idle time passed).
    Check,
}

/// A user's state after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The status differs from the one last pushed (and is now stored as pushed).
    pub changed: bool,
    pub status: Status,
    pub last_seen: Option<u64>,
    pub last_active: u64,
    pub version: u64,
    pub connections: u64,
}

/// Applies `op` to `user` (a valid id; so must be the connection and instance ids). `None`
/// for [`Op::SetStatus`] while the user has no connection.
pub async fn apply(
    redis: &mut ConnectionManager,
    user: &str,
    op: &Op<'_>,
    now_ms: u64,
    away_after_ms: u64,
) -> redis::RedisResult<Option<State>> {
    let (name, instance, connection, data, at, manual) = match op {
        Op::Open {
            instance,
            connection,
            data,
            at_ms,
        } => ("open", *instance, *connection, data.as_str(), *at_ms, ""),
        Op::Active { connection, at_ms } => ("active", "", *connection, "", *at_ms, ""),
        Op::Close {
            instance,
            connection,
            at_ms,
        } => ("close", *instance, *connection, "", *at_ms, ""),
        Op::Sweep {
            instance,
            connection,
            at_ms,
        } => ("sweep", *instance, *connection, "", *at_ms, ""),
        Op::SetStatus(s) => ("status", "", "", "", 0, *s),
        Op::Check => ("check", "", "", "", 0, ""),
    };
    // Unused keys point at the user's own hash, so every key of the call is a real one.
    let inst = if instance.is_empty() {
        user_key(user)
    } else {
        instance_key(instance)
    };
    let tomb = if connection.is_empty() {
        user_key(user)
    } else {
        closed_key(connection)
    };
    let out: Vec<redis::Value> = APPLY_SCRIPT
        .key(user_key(user))
        .key(conns_key(user))
        .key(inst)
        .key(tomb)
        .arg(name)
        .arg(now_ms)
        .arg(away_after_ms)
        .arg(connection)
        .arg(format!("{user}:{connection}"))
        .arg(data)
        .arg(at)
        .arg(manual)
        .arg(subjects::PRESENCE_RETENTION.as_secs())
        .invoke_async(redis)
        .await?;
    if out.len() < 6 {
        return Ok(None);
    }
    let text = |v: &redis::Value| -> String {
        match v {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            redis::Value::Int(i) => i.to_string(),
            redis::Value::SimpleString(s) => s.clone(),
            _ => String::new(),
        }
    };
    let num = |v: &redis::Value| text(v).parse::<u64>().unwrap_or(0);
    let last_seen = num(&out[2]);
    Ok(Some(State {
        changed: num(&out[0]) == 1,
        status: Status::parse(&text(&out[1])),
        last_seen: (last_seen > 0).then_some(last_seen),
        last_active: num(&out[3]),
        version: num(&out[4]),
        connections: num(&out[5]),
    }))
}

/// RFC 3339 of a time in ms since the epoch.
pub fn rfc3339(ms: u64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
}

/// A user's presence as read now (status derived with the current time).
#[derive(Debug, Clone)]
pub struct Presence {
    pub status: Status,
    pub last_seen: Option<u64>,
    pub last_active: Option<u64>,
    /// Connection id → stored connection data.
    pub devices: Vec<(String, Value)>,
}

pub async fn read(
    redis: &mut ConnectionManager,
    user: &str,
    now_ms: u64,
    away_after_ms: u64,
) -> redis::RedisResult<Presence> {
    let (fields, conns): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
        .hgetall(user_key(user))
        .hgetall(conns_key(user))
        .query_async(redis)
        .await?;
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let last_active = num("lastActive");
    let status = derive(
        conns.len(),
        fields.get("manual").map(String::as_str) == Some("away"),
        last_active.unwrap_or(0),
        now_ms,
        away_after_ms,
    );
    let mut devices: Vec<(String, Value)> = conns
        .into_iter()
        .map(|(c, d)| (c, serde_json::from_str(&d).unwrap_or(Value::Null)))
        .collect();
    devices.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Presence {
        status,
        last_seen: num("lastSeen"),
        last_active,
        devices,
    })
}

/// The statuses of `users` now, in one round trip.
pub async fn statuses(
    redis: &mut ConnectionManager,
    users: &[String],
    now_ms: u64,
    away_after_ms: u64,
) -> redis::RedisResult<Vec<Status>> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for u in users {
        pipe.hlen(conns_key(u))
            .hget(user_key(u), "manual")
            .hget(user_key(u), "lastActive");
    }
    let raw: Vec<(usize, Option<String>, Option<u64>)> = {
        let flat: Vec<redis::Value> = pipe.query_async(redis).await?;
        flat.chunks(3)
            .map(|c| {
                let n: usize = redis::from_redis_value(c[0].clone()).unwrap_or(0);
                let m: Option<String> = redis::from_redis_value(c[1].clone()).unwrap_or(None);
                let a: Option<u64> = redis::from_redis_value(c[2].clone()).unwrap_or(None);
                (n, m, a)
            })
            .collect()
    };
    Ok(raw
        .into_iter()
        .map(|(n, m, a)| {
            derive(
                n,
                m.as_deref() == Some("away"),
                a.unwrap_or(0),
                now_ms,
                away_after_ms,
            )
        })
        .collect())
}

/// The `data` of a `presence_update` for `user` (`scope: "user"` tells it from the
/// per-document presence of co-editing, which uses the same message type).
pub fn update_data(user: &str, state: &State) -> Value {
    json!({
        "scope": "user",
        "userId": user,
        "status": state.status.as_str(),
        "lastSeen": state.last_seen.and_then(rfc3339),
        "version": state.version,
    })
}

/// Pushes `user`'s state as a `presence_update` to the channel of every project and chat
/// room the user is in: exactly those who share one with the user may subscribe to those
/// (the relay checks, and drops a subscription when the right goes). Deduplicated by
/// user, version and channel, so pushing the same state again (a redelivered report) sends
/// nothing twice.
pub async fn push(
    js: &async_nats::jetstream::Context,
    redis: &mut ConnectionManager,
    user: &str,
    state: &State,
) -> anyhow::Result<()> {
    // Both lookups at once: one round trip of waiting instead of two.
    let mut other = redis.clone();
    let (projects, rooms) = tokio::try_join!(
        membership::projects_of(redis, user),
        membership::rooms_of(&mut other, user)
    )?;
    let data = update_data(user, state);
    let msgs: Vec<_> = projects
        .iter()
        .filter(|p| membership::is_valid_id(p))
        .map(|p| Channel::new(ChannelKind::Project, p.clone()))
        .chain(
            rooms
                .into_iter()
                .map(|r| Channel::new(ChannelKind::Room, r)),
        )
        .map(|channel| {
            let msg_id = format!(
                "presence-{user}-{}-{}-{}",
                state.version,
                channel.kind.as_str(),
                channel.id
            );
            channels::outgoing(&channel, MessageType::PresenceUpdate, &data, msg_id)
        })
        .collect();
    if msgs.is_empty() {
        return Ok(());
    }
    jetstream::publish_windowed(js, msgs, 64)
        .await
        .map_err(|e| anyhow::anyhow!("presence_update not published: {}", e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_rule() {
        assert_eq!(derive(0, true, 100, 100, 10), Status::Offline);
        assert_eq!(derive(1, false, 100, 105, 10), Status::Online);
        assert_eq!(derive(1, false, 100, 110, 10), Status::Away);
        assert_eq!(derive(2, true, 100, 100, 10), Status::Away);
        // A clock behind the last activity is not idle.
        assert_eq!(derive(1, false, 200, 100, 10), Status::Online);
    }

    #[test]
    fn times_format() {
        assert_eq!(rfc3339(0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            rfc3339(1_700_000_000_123).as_deref(),
            Some("2023-11-14T22:13:20.123Z")
        );
    }
}
