//! The in-app inbox in Redis, with an unread count that is exact by construction, and the live
//! pushes to `user:{userId}` that follow every change.
//!
//! Per user: `inkwire:notify:inbox:{userId}` (ZSET of notification ids by `createdAt` ms),
//! `inkwire:notify:unread:{userId}` (the unread subset, same scores) and
//! `inkwire:notify:seq:{userId}` (a counter bumped by every change). The notification itself is
//! `inkwire:notify:n:{id}`. Every change (add, mark read, mark all read, delete, trimming to
//! the inbox limit) is one Lua script over these keys, so the unread count (`ZCARD` of the
//! unread set) can never drift from the inbox, whatever runs concurrently, and every change
//! gets its own `version`.
//!
//! After a change the new count and version are pushed to the user's channel
//! (`MessageType::Notification`, data `{"event": …, "unreadCount", "version"}`). Pushes may
//! arrive out of order; a client keeps the frame with the highest `version`. Push ids are
//! deterministic (`notif-new:{id}`, `notif-read:{user}:{version}`,
//! `notif-deleted:{user}:{version}`), so a retried push is stored once. A call that changed
//! nothing (an add of a present id, a mark of a read one) pushes the current state again under
//! the same kind of id: after a push that failed, the retry of the call delivers it.
//!
//! A deleted or trimmed notification leaves a small tombstone (`{"deleted": true, "userId",
//! "sender"}`) for [`TOMBSTONE_TTL`], so that a redelivered add does not bring it back and the
//! deliveries route still knows whose it was.

use std::sync::LazyLock;
use std::time::Duration;

use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use redis::aio::ConnectionManager;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::send::Notification;

/// How long a deleted or trimmed notification's tombstone is kept.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most notifications one `list` call returns.
pub const MAX_PAGE: usize = 100;

pub fn notification_key(id: Uuid) -> String {
    format!("inkwire:notify:n:{id}")
}
/// Prefix of `notification_key`, for the scripts that tombstone trimmed ids.
const NOTIFICATION_PREFIX: &str = "inkwire:notify:n:";
pub fn inbox_key(user: &str) -> String {
    format!("inkwire:notify:inbox:{user}")
}
pub fn unread_key(user: &str) -> String {
    format!("inkwire:notify:unread:{user}")
}
pub fn seq_key(user: &str) -> String {
    format!("inkwire:notify:seq:{user}")
}

/// Why an inbox call failed. The change (if any) is applied when only the push failed; calling
/// again pushes again.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("pushing to the user's channel: {0}")]
    Push(String),
}

/// What `add` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddOutcome {
    /// False when the id was present already (or deleted or trimmed before): nothing changed.
    pub created: bool,
    pub unread_count: u64,
    pub version: u64,
}

/// Lua helper shared by the scripts: replaces `n:{id}` with a tombstone.
const TOMBSTONE_FN: &str = r#"
local function tombstone(key, ttl)
  local cur = redis.call('GET', key)
  if not cur then return end
  local ok, rec = pcall(cjson.decode, cur)
  if not ok or rec.deleted then return end
  redis.call('SET', key, cjson.encode({deleted = true, userId = rec.userId, sender = rec.sender}), 'EX', ttl)
end
"#;

/// KEYS: n:{id}, inbox, unread, seq. ARGV: id, json, score, limit, n-prefix, tombstone ttl.
/// Returns {created, unreadCount, version}.
const ADD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('ZCARD', KEYS[3]), tonumber(redis.call('GET', KEYS[4]) or '0')}
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
    redis.call('ZREM', KEYS[2], old)
    redis.call('ZREM', KEYS[3], old)
    tombstone(ARGV[5] .. old, ARGV[6])
  end
end
local created = 1
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then created = 0 end
local v = redis.call('INCR', KEYS[4])
return {created, redis.call('ZCARD', KEYS[3]), v}
"#;

/// KEYS: inbox, unread, seq. ARGV: id. Returns {-1} when the id is not in the inbox, else
/// {changed, unreadCount, version}.
const MARK_READ: &str = r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {-1, 0, 0} end
local changed = redis.call('ZREM', KEYS[2], ARGV[1])
local v
if changed == 1 then v = redis.call('INCR', KEYS[3]) else v = tonumber(redis.call('GET', KEYS[3]) or '0') end
return {changed, redis.call('ZCARD', KEYS[2]), v}
"#;

/// KEYS: unread, seq. Returns {marked, unreadCount, version}.
const MARK_ALL_READ: &str = r#"
local n = redis.call('ZCARD', KEYS[1])
local v
if n > 0 then
  redis.call('DEL', KEYS[1])
  v = redis.call('INCR', KEYS[2])
else
  v = tonumber(redis.call('GET', KEYS[2]) or '0')
end
return {n, 0, v}
"#;

/// KEYS: inbox, unread, seq, n:{id}. ARGV: id, tombstone ttl. Returns {-1} when the id is not
/// in the inbox, else {wasUnread, unreadCount, version}.
const DELETE: &str = r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {-1, 0, 0} end
redis.call('ZREM', KEYS[1], ARGV[1])
local was_unread = redis.call('ZREM', KEYS[2], ARGV[1])
tombstone(KEYS[4], ARGV[2])
local v = redis.call('INCR', KEYS[3])
return {was_unread, redis.call('ZCARD', KEYS[2]), v}
"#;

/// KEYS: inbox, unread, seq. ARGV: max score ('+inf' or a score), last id ('' for none),
/// limit, unread only ('1'/'0'), n-prefix. Items of the cursor's score whose id is not below
/// the cursor's id were on earlier pages (ties are ordered by id, descending).
/// Returns {unreadCount, version, more, id1, json1, unread1, id2, …}.
const LIST: &str = r#"
local key = KEYS[1]
if ARGV[4] == '1' then key = KEYS[2] end
local max, last, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local picked = {}
local offset = 0
while #picked < limit + 1 do
  local batch = redis.call('ZREVRANGEBYSCORE', key, max, '-inf', 'WITHSCORES', 'LIMIT', offset, limit + 1)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    local seen = last ~= '' and tonumber(score) == tonumber(max) and id >= last
    if not seen and #picked < limit + 1 then table.insert(picked, {id, score}) end
  end
  offset = offset + #batch / 2
end
local out = {redis.call('ZCARD', KEYS[2]), tonumber(redis.call('GET', KEYS[3]) or '0'), 0}
if #picked > limit then out[3] = 1 end
for i = 1, math.min(#picked, limit) do
  local id = picked[i][1]
  table.insert(out, id .. ' ' .. picked[i][2])
  table.insert(out, redis.call('GET', ARGV[5] .. id) or '')
  if redis.call('ZSCORE', KEYS[2], id) then table.insert(out, 1) else table.insert(out, 0) end
end
return out
"#;

// Hashed once: `Script::new` computes the SHA-1 of the source on every call.
static ADD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(ADD));
static MARK_READ_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(MARK_READ));
static MARK_ALL_READ_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(MARK_ALL_READ));
static DELETE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(DELETE));
static LIST_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| script(LIST));

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{TOMBSTONE_FN}{body}"))
}

/// Pushes `data` to `user:{user}`.
async fn push(
    js: &async_nats::jetstream::Context,
    user: &str,
    data: Value,
    msg_id: String,
) -> Result<(), InboxError> {
    channels::publish(
        js,
        &Channel::new(ChannelKind::User, user),
        MessageType::Notification,
        &data,
        msg_id,
    )
    .await
    .map(|_| ())
    .map_err(|e| InboxError::Push(e.to_string()))
}

/// Adds `n` to its recipient's inbox (idempotent by id; trims to `limit`, oldest first) and
/// pushes it with the new count.
pub async fn add(
    redis: &mut ConnectionManager,
    js: &async_nats::jetstream::Context,
    n: &Notification,
    limit: usize,
) -> Result<AddOutcome, InboxError> {
    let outcome = store(redis, n, limit).await?;
    push_added(js, n, outcome).await?;
    Ok(outcome)
}

/// The change of [`add`] without its push, for a caller that sends other commands in the
/// same round trip and pushes with [`push_added`] after.
pub async fn store(
    redis: &mut ConnectionManager,
    n: &Notification,
    limit: usize,
) -> Result<AddOutcome, InboxError> {
    let (created, unread, version): (i64, u64, u64) = ADD_SCRIPT
        .key(notification_key(n.id))
        .key(inbox_key(&n.user_id))
        .key(unread_key(&n.user_id))
        .key(seq_key(&n.user_id))
        .arg(n.id.to_string())
        .arg(serde_json::to_string(n).expect("notifications serialize"))
        .arg(n.created_ms())
        .arg(limit.max(1))
        .arg(NOTIFICATION_PREFIX)
        .arg(TOMBSTONE_TTL.as_secs())
        .invoke_async(redis)
        .await?;
    Ok(AddOutcome {
        created: created == 1,
        unread_count: unread,
        version,
    })
}

/// [`store`] as one command of a pipeline (`EVALSHA`: the caller loads [`load_scripts`] and
/// sends again when Redis answers `NOSCRIPT`); its answer is read with [`stored`].
pub fn store_cmd(n: &Notification, limit: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(ADD_SCRIPT.get_hash())
        .arg(4)
        .arg(notification_key(n.id))
        .arg(inbox_key(&n.user_id))
        .arg(unread_key(&n.user_id))
        .arg(seq_key(&n.user_id))
        .arg(n.id.to_string())
        .arg(serde_json::to_string(n).expect("notifications serialize"))
        .arg(n.created_ms())
        .arg(limit.max(1))
        .arg(NOTIFICATION_PREFIX)
        .arg(TOMBSTONE_TTL.as_secs());
    cmd
}

/// The answer to one [`store_cmd`].
pub fn stored(v: &redis::Value) -> redis::RedisResult<AddOutcome> {
    let (created, unread, version): (i64, u64, u64) =
        redis::FromRedisValue::from_redis_value_ref(v)?;
    Ok(AddOutcome {
        created: created == 1,
        unread_count: unread,
        version,
    })
}

/// Loads the script [`store_cmd`] names (after a `NOSCRIPT`: Redis restarted or flushed
/// its script cache).
pub async fn load_scripts(redis: &mut ConnectionManager) -> redis::RedisResult<()> {
    ADD_SCRIPT.load_async(redis).await.map(|_| ())
}

/// The push of [`push_added`] as a message to publish with others.
pub fn added_push(n: &Notification, outcome: AddOutcome) -> inkwire_shared::jetstream::Outgoing {
    channels::outgoing(
        &Channel::new(ChannelKind::User, &n.user_id),
        MessageType::Notification,
        &added_data(n, outcome),
        format!("notif-new:{}", n.id),
    )
}

fn added_data(n: &Notification, outcome: AddOutcome) -> Value {
    let mut item = serde_json::to_value(n).expect("notifications serialize");
    item["read"] = json!(false);
    json!({"event": "notification", "notification": item,
        "unreadCount": outcome.unread_count, "version": outcome.version})
}

/// Pushes `n` to its recipient's channel with the count and version [`store`] answered.
pub async fn push_added(
    js: &async_nats::jetstream::Context,
    n: &Notification,
    outcome: AddOutcome,
) -> Result<(), InboxError> {
    push(
        js,
        &n.user_id,
        added_data(n, outcome),
        format!("notif-new:{}", n.id),
    )
    .await
}

/// Marks `id` read in `user`'s inbox: `None` when the id is not in that inbox, else
/// `(unread_count, version, changed)`.
pub async fn mark_read(
    redis: &mut ConnectionManager,
    js: &async_nats::jetstream::Context,
    user: &str,
    id: Uuid,
) -> Result<Option<(u64, u64, bool)>, InboxError> {
    let (changed, unread, version): (i64, u64, u64) = MARK_READ_SCRIPT
        .key(inbox_key(user))
        .key(unread_key(user))
        .key(seq_key(user))
        .arg(id.to_string())
        .invoke_async(redis)
        .await?;
    if changed < 0 {
        return Ok(None);
    }
    push(
        js,
        user,
        json!({"event": "notifications_read", "ids": [id], "unreadCount": unread, "version": version}),
        format!("notif-read:{user}:{version}"),
    )
    .await?;
    Ok(Some((unread, version, changed == 1)))
}

/// Marks every notification of `user` read: `(ids_marked_count, unread_count, version)`.
pub async fn mark_all_read(
    redis: &mut ConnectionManager,
    js: &async_nats::jetstream::Context,
    user: &str,
) -> Result<(u64, u64, u64), InboxError> {
    let (marked, unread, version): (u64, u64, u64) = MARK_ALL_READ_SCRIPT
        .key(unread_key(user))
        .key(seq_key(user))
        .invoke_async(redis)
        .await?;
    push(
        js,
        user,
        json!({"event": "notifications_read", "all": true, "unreadCount": unread, "version": version}),
        format!("notif-read:{user}:{version}"),
    )
    .await?;
    Ok((marked, unread, version))
}

/// Deletes `id` from `user`'s inbox: `None` when it is not there, else `(unread_count,
/// version)`.
pub async fn delete(
    redis: &mut ConnectionManager,
    js: &async_nats::jetstream::Context,
    user: &str,
    id: Uuid,
) -> Result<Option<(u64, u64)>, InboxError> {
    let (found, unread, version): (i64, u64, u64) = DELETE_SCRIPT
        .key(inbox_key(user))
        .key(unread_key(user))
        .key(seq_key(user))
        .key(notification_key(id))
        .arg(id.to_string())
        .arg(TOMBSTONE_TTL.as_secs())
        .invoke_async(redis)
        .await?;
    if found < 0 {
        return Ok(None);
    }
    push(
        js,
        user,
        json!({"event": "notification_deleted", "id": id, "unreadCount": unread, "version": version}),
        format!("notif-deleted:{user}:{version}"),
    )
    .await?;
    Ok(Some((unread, version)))
}

/// Where a page starts: after the item with this score and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub score: i64,
    pub id: Uuid,
}

impl Cursor {
    /// `{score}_{id}`: opaque to clients.
    pub fn encode(&self) -> String {
        format!("{}_{}", self.score, self.id)
    }

    pub fn decode(text: &str) -> Option<Cursor> {
        let (score, id) = text.split_once('_')?;
        let score: i64 = score.parse().ok()?;
        if score < 0 {
            return None;
        }
        Some(Cursor {
            score,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// One page of an inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Each notification's JSON with `read` added, newest first.
    pub notifications: Vec<Value>,
    pub unread_count: u64,
    pub version: u64,
    pub next_cursor: Option<Cursor>,
}

/// `user`'s notifications, newest first, `limit` (1..=[`MAX_PAGE`]) after `cursor`. The
/// cursor is stable: items added since do not shift later pages.
pub async fn list(
    redis: &mut ConnectionManager,
    user: &str,
    unread_only: bool,
    limit: usize,
    cursor: Option<Cursor>,
) -> redis::RedisResult<Page> {
    let limit = limit.clamp(1, MAX_PAGE);
    let (max, last) = match cursor {
        Some(c) => (c.score.to_string(), c.id.to_string()),
        None => ("+inf".to_string(), String::new()),
    };
    let raw: Vec<redis::Value> = LIST_SCRIPT
        .key(inbox_key(user))
        .key(unread_key(user))
        .key(seq_key(user))
        .arg(max)
        .arg(last)
        .arg(limit)
        .arg(if unread_only { "1" } else { "0" })
        .arg(NOTIFICATION_PREFIX)
        .invoke_async(redis)
        .await?;
    let int = |v: &redis::Value| -> u64 { redis::from_redis_value::<u64>(v.clone()).unwrap_or(0) };
    let unread_count = raw.first().map_or(0, int);
    let version = raw.get(1).map_or(0, int);
    let more = raw.get(2).map_or(0, int) == 1;
    let mut notifications = Vec::new();
    let mut last_item = None;
    for item in raw.get(3..).unwrap_or_default().chunks(3) {
        let [key, json, unread] = item else { break };
        let key: String = redis::from_redis_value(key.clone())?;
        let json: String = redis::from_redis_value(json.clone())?;
        let (id, score) = key.split_once(' ').unwrap_or((&key, "0"));
        let (Ok(id), Ok(score)) = (Uuid::parse_str(id), score.parse::<f64>()) else {
            continue;
        };
        let score = score as i64;
        last_item = Some(Cursor { score, id });
        // Only `add` writes the notification before its id enters the inbox.
        let Ok(mut value) = serde_json::from_str::<Value>(&json) else {
            continue;
        };
        value["read"] = json!(int(unread) == 0);
        notifications.push(value);
    }
    Ok(Page {
        notifications,
        unread_count,
        version,
        next_cursor: if more { last_item } else { None },
    })
}

/// `(unread_count, version)` of `user`.
pub async fn unread_count(
    redis: &mut ConnectionManager,
    user: &str,
) -> redis::RedisResult<(u64, u64)> {
    let (count, version): (u64, Option<u64>) = redis::pipe()
        .atomic()
        .cmd("ZCARD")
        .arg(unread_key(user))
        .cmd("GET")
        .arg(seq_key(user))
        .query_async(redis)
        .await?;
    Ok((count, version.unwrap_or(0)))
}

/// Who a stored notification (or its tombstone) belongs to and who sent it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Parties {
    pub user_id: String,
    pub sender: String,
}

/// The recipient and sender of notification `id`, while it (or its tombstone) is stored.
pub async fn parties(
    redis: &mut ConnectionManager,
    id: Uuid,
) -> redis::RedisResult<Option<Parties>> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(notification_key(id))
        .query_async(redis)
        .await?;
    Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_junk() {
        let c = Cursor {
            score: 1_732_278_000_000,
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            "_",
            "1_",
            "x_0191f2a4-5b6c-7d8e-9f00-112233445566",
            "-1_0191f2a4-5b6c-7d8e-9f00-112233445566",
            "1_nope",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad:?}");
        }
    }
}
