//! Rooms in Redis. Every change that must stay consistent with another is one Lua script, so
//! concurrent requests on any number of instances see one order: a send takes the room's
//! next sequence, stores the message, records the client message id and adds one to the
//! unread count of every other participant, all at once; a read receipt moves the reader's
//! position and takes exactly the messages it passed off their count; a tombstone takes the
//! deleted message off the counts of those who had not read it.
//!
//! Keys (room and user ids are checked with `is_valid_id` before they get here):
//! - `inkwire:room:{r}:participants` (set): who is in the room, what the relay checks;
//! - `inkwire:chat:room:{r}:meta` (hash): `name`, `createdBy`, `createdAt`, `seq` (last);
//! - `inkwire:chat:room:{r}:messages` (hash): sequence → the message's current JSON;
//! - `inkwire:chat:room:{r}:ids` (hash): `{sender}:{clientMessageId}` → `{sequence}:{SHA-1 of
//!   the text sent}` (the digest tells a retry from a second message under a reused id);
//! - `inkwire:chat:room:{r}:read` / `:unread` (hashes): user → read position / unread count;
//! - `inkwire:chat:user:{u}:rooms` (set): the rooms of a user.

use redis::Script;
use redis::aio::ConnectionManager;
use serde_json::Value;
use std::sync::LazyLock;

pub use inkwire_shared::membership::is_valid_id;

pub fn participants_key(room: &str) -> String {
    format!("inkwire:room:{room}:participants")
}
pub fn meta_key(room: &str) -> String {
    format!("inkwire:chat:room:{room}:meta")
}
pub fn messages_key(room: &str) -> String {
    format!("inkwire:chat:room:{room}:messages")
}
pub fn ids_key(room: &str) -> String {
    format!("inkwire:chat:room:{room}:ids")
}
pub fn read_key(room: &str) -> String {
    format!("inkwire:chat:room:{room}:read")
}
pub fn unread_key(room: &str) -> String {
    format!("inkwire:chat:room:{room}:unread")
}
pub fn user_rooms_key(user: &str) -> String {
    format!("inkwire:chat:user:{user}:rooms")
}
pub fn typing_key(room: &str, user: &str) -> String {
    format!("inkwire:chat:typing:{room}:{user}")
}

/// What a script answered about the caller's right or the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Done(T),
    /// The caller is not a participant (or the room does not exist).
    NoRoom,
    /// No message with that sequence.
    NoMessage,
    /// The message is somebody else's, or the caller may not remove that participant.
    NotYours,
    /// The message is deleted already (it cannot be edited).
    Deleted,
    /// The client message id was used before for a message with another text.
    IdReused,
}

fn outcome<T>(code: i64, value: T) -> Outcome<T> {
    match code {
        0 => Outcome::NoRoom,
        -1 => Outcome::NoMessage,
        -2 => Outcome::NotYours,
        -3 => Outcome::Deleted,
        -4 => Outcome::IdReused,
        _ => Outcome::Done(value),
    }
}

static SEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0, ''} end
local m = cjson.decode(ARGV[3])
local digest = redis.sha1hex(m['text'])
local existing = redis.call('HGET', KEYS[5], ARGV[2])
if existing then
  local seq, sent = string.match(existing, '^(%d+):?(%x*)$')
  if sent ~= '' and sent ~= digest then return {-4, ''} end
  return {2, redis.call('HGET', KEYS[3], seq)}
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
m['seq'] = seq
local text = cjson.encode(m)
redis.call('HSET', KEYS[3], seq, text)
redis.call('HSET', KEYS[5], ARGV[2], seq .. ':' .. digest)
for _, u in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if u ~= ARGV[1] then redis.call('HINCRBY', KEYS[4], u, 1) end
end
return {1, text}
"#,
    )
});

/// Stores a new message (`message` without `seq`). `Done((true, json))` when stored now,
/// `Done((false, json))` when the client message id was stored before with the same text (a
/// retry: the message as it is now, edits included), `IdReused` when it was stored with
/// another text.
pub async fn send(
    redis: &mut ConnectionManager,
    room: &str,
    sender: &str,
    client_id: &str,
    message: &Value,
) -> redis::RedisResult<Outcome<(bool, Value)>> {
    let (code, text): (i64, String) = SEND
        .key(participants_key(room))
        .key(meta_key(room))
        .key(messages_key(room))
        .key(unread_key(room))
        .key(ids_key(room))
        .arg(sender)
        .arg(format!("{sender}:{client_id}"))
        .arg(message.to_string())
        .invoke_async(redis)
        .await?;
    Ok(outcome(code, (code == 1, parse(&text))))
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

static EDIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0, ''} end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if not cur then return {-1, ''} end
local m = cjson.decode(cur)
if m['senderId'] ~= ARGV[1] then return {-2, ''} end
if m['deleted'] then return {-3, ''} end
m['text'] = ARGV[3]
m['editedAt'] = ARGV[4]
local text = cjson.encode(m)
redis.call('HSET', KEYS[2], ARGV[2], text)
return {1, text}
"#,
    )
});

/// Replaces the text of the caller's own message `seq`.
pub async fn edit(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
    seq: u64,
    text: &str,
    edited_at: &str,
) -> redis::RedisResult<Outcome<Value>> {
    let (code, json): (i64, String) = EDIT
        .key(participants_key(room))
        .key(messages_key(room))
        .arg(user)
        .arg(seq)
        .arg(text)
        .arg(edited_at)
        .invoke_async(redis)
        .await?;
    Ok(outcome(code, parse(&json)))
}

static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0, ''} end
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if not cur then return {-1, ''} end
local m = cjson.decode(cur)
if m['senderId'] ~= ARGV[1] then return {-2, ''} end
if m['deleted'] then return {1, cur} end
m['text'] = nil
m['deleted'] = true
m['deletedAt'] = ARGV[3]
local text = cjson.encode(m)
redis.call('HSET', KEYS[2], ARGV[2], text)
local seq = tonumber(ARGV[2])
for _, u in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if u ~= ARGV[1] then
    local r = tonumber(redis.call('HGET', KEYS[3], u) or '0')
    if r < seq then
      local left = redis.call('HINCRBY', KEYS[4], u, -1)
      if left < 0 then redis.call('HSET', KEYS[4], u, 0) end
    end
  end
end
return {1, text}
"#,
    )
});

/// Replaces the caller's own message `seq` by a tombstone (again: the same tombstone).
pub async fn delete(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
    seq: u64,
    deleted_at: &str,
) -> redis::RedisResult<Outcome<Value>> {
    let (code, json): (i64, String) = DELETE
        .key(participants_key(room))
        .key(messages_key(room))
        .key(read_key(room))
        .key(unread_key(room))
        .arg(user)
        .arg(seq)
        .arg(deleted_at)
        .invoke_async(redis)
        .await?;
    Ok(outcome(code, parse(&json)))
}

static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0, 0, 0, 0} end
local last = tonumber(redis.call('HGET', KEYS[2], 'seq') or '0')
local target = math.min(tonumber(ARGV[2]), last)
local cur = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if target <= cur then
  return {1, cur, tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0'), 0}
end
-- Up to the last message: nothing is left unread, whatever the gap.
if target == last then
  redis.call('HSET', KEYS[4], ARGV[1], last)
  redis.call('HSET', KEYS[5], ARGV[1], 0)
  return {1, last, 0, 1}
end
-- Part of the way: count what the receipt passes, at most ARGV[3] messages per call, so that
-- a receipt over a huge gap never holds Redis for long (the caller calls again).
local up = math.min(target, cur + tonumber(ARGV[3]))
local n = 0
for s = cur + 1, up do
  local t = redis.call('HGET', KEYS[3], s)
  if t then
    local m = cjson.decode(t)
    if m['senderId'] ~= ARGV[1] and not m['deleted'] then n = n + 1 end
  end
end
redis.call('HSET', KEYS[4], ARGV[1], up)
-- Never HINCRBY by -0: Lua's -0 reaches Redis as "-0", which is not an integer to it.
local left = tonumber(redis.call('HGET', KEYS[5], ARGV[1]) or '0')
if n > 0 then left = redis.call('HINCRBY', KEYS[5], ARGV[1], 0 - n) end
if left < 0 then redis.call('HSET', KEYS[5], ARGV[1], 0); left = 0 end
return {1, up, left, 1}
"#,
    )
});

/// Messages one call of the read script walks at most (a few milliseconds of Redis time).
const READ_STEP: u64 = 2_000;

/// A read receipt's result: the reader's position now, the unread count left, and whether
/// the position moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadState {
    pub up_to: u64,
    pub unread: u64,
    pub moved: bool,
}

/// Moves `user`'s read position to `up_to` (capped at the last message; never backwards).
/// Up to the last message is one step; part of the way over a long gap takes one script
/// call per `READ_STEP` messages, each exact on its own (concurrent sends land beyond the
/// position, concurrent deletes see where it is).
pub async fn mark_read(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
    up_to: u64,
) -> redis::RedisResult<Outcome<ReadState>> {
    mark_read_in_steps(redis, room, user, up_to, READ_STEP).await
}

/// `mark_read` walking at most `step` messages per script call (tests use small steps).
pub async fn mark_read_in_steps(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
    up_to: u64,
    step: u64,
) -> redis::RedisResult<Outcome<ReadState>> {
    let step = step.max(1);
    let mut moved_at_all = false;
    loop {
        let (code, up, unread, moved): (i64, u64, u64, i64) = READ
            .key(participants_key(room))
            .key(meta_key(room))
            .key(messages_key(room))
            .key(read_key(room))
            .key(unread_key(room))
            .arg(user)
            .arg(up_to)
            .arg(step)
            .invoke_async(redis)
            .await?;
        moved_at_all |= moved == 1;
        let state = ReadState {
            up_to: up,
            unread,
            moved: moved_at_all,
        };
        // Not there yet only when this call moved (a step short of the target).
        if code != 1 || moved != 1 || up >= up_to {
            return Ok(outcome(code, state));
        }
    }
}

static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HSETNX', KEYS[1], 'createdBy', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'createdAt', ARGV[3], 'seq', 0)
for i = 5, #KEYS do
  local u = ARGV[i]
  redis.call('SADD', KEYS[2], u)
  redis.call('SADD', KEYS[i], ARGV[4])
  redis.call('HSET', KEYS[3], u, 0)
  redis.call('HSET', KEYS[4], u, 0)
end
return 1
"#,
    )
});

/// Creates room `room` (unless it exists: then `Ok(false)`) with `participants`, in one
/// script: a crash never leaves a room that exists without its participants (a retry with
/// the same idempotency key would find it and add nobody).
pub async fn create(
    redis: &mut ConnectionManager,
    room: &str,
    name: &str,
    creator: &str,
    created_at: &str,
    participants: &[String],
) -> redis::RedisResult<bool> {
    let mut script = CREATE.prepare_invoke();
    script
        .key(meta_key(room))
        .key(participants_key(room))
        .key(read_key(room))
        .key(unread_key(room))
        .arg(creator)
        .arg(name)
        .arg(created_at)
        .arg(room);
    for user in participants {
        // From the fifth on, KEYS[n] is the room set of the user ARGV[n].
        script.key(user_rooms_key(user)).arg(user);
    }
    let fresh: i64 = script.invoke_async(redis).await?;
    Ok(fresh == 1)
}

static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if ARGV[3] ~= '1' and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[1], ARGV[2]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[2], redis.call('HGET', KEYS[2], 'seq') or '0')
  redis.call('HSET', KEYS[4], ARGV[2], 0)
  redis.call('SADD', KEYS[5], ARGV[4])
  return 1
end
return 2
"#,
    )
});

/// Adds `user` to `room` (any participant, or a privileged caller, may). `Done(true)` when
/// added now. A new participant starts with everything before read.
pub async fn add(
    redis: &mut ConnectionManager,
    room: &str,
    caller: &str,
    privileged: bool,
    user: &str,
) -> redis::RedisResult<Outcome<bool>> {
    change_participant(&ADD, redis, room, caller, privileged, user).await
}

/// Runs the ADD or REMOVE script: both take the same keys and arguments and answer 1 when
/// the participant changed now.
async fn change_participant(
    script: &Script,
    redis: &mut ConnectionManager,
    room: &str,
    caller: &str,
    privileged: bool,
    user: &str,
) -> redis::RedisResult<Outcome<bool>> {
    let code: i64 = script
        .key(participants_key(room))
        .key(meta_key(room))
        .key(read_key(room))
        .key(unread_key(room))
        .key(user_rooms_key(user))
        .arg(caller)
        .arg(user)
        .arg(if privileged { "1" } else { "0" })
        .arg(room)
        .invoke_async(redis)
        .await?;
    Ok(outcome(code, code == 1))
}

static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local self = ARGV[1] == ARGV[2]
if ARGV[3] ~= '1' and not self then
  if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
  if redis.call('HGET', KEYS[2], 'createdBy') ~= ARGV[1] then return -2 end
end
local removed = redis.call('SREM', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('SREM', KEYS[5], ARGV[4])
if removed == 1 then return 1 end
return 2
"#,
    )
});

/// Removes `user` from `room`: the caller themselves (leaving), the room's creator, or a
/// privileged caller. `Done(true)` when removed now; leaving twice is not an error.
pub async fn remove(
    redis: &mut ConnectionManager,
    room: &str,
    caller: &str,
    privileged: bool,
    user: &str,
) -> redis::RedisResult<Outcome<bool>> {
    change_participant(&REMOVE, redis, room, caller, privileged, user).await
}

/// Is `user` a participant of `room`?
pub async fn is_participant(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
) -> redis::RedisResult<bool> {
    redis::cmd("SISMEMBER")
        .arg(participants_key(room))
        .arg(user)
        .query_async(redis)
        .await
}

/// The room's name, creator, creation time, last sequence and participants (sorted).
pub async fn room(redis: &mut ConnectionManager, room: &str) -> redis::RedisResult<Value> {
    let (meta, mut participants): (std::collections::HashMap<String, String>, Vec<String>) =
        redis::pipe()
            .hgetall(meta_key(room))
            .smembers(participants_key(room))
            .query_async(redis)
            .await?;
    participants.sort();
    Ok(serde_json::json!({
        "id": room,
        "name": meta.get("name"),
        "createdBy": meta.get("createdBy"),
        "createdAt": meta.get("createdAt"),
        "lastSeq": meta.get("seq").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
        "participants": participants,
    }))
}

/// The caller's rooms with their unread counts and last messages, most recent first.
pub async fn my_rooms(redis: &mut ConnectionManager, user: &str) -> redis::RedisResult<Vec<Value>> {
    let rooms: Vec<String> = redis::cmd("SMEMBERS")
        .arg(user_rooms_key(user))
        .query_async(redis)
        .await?;
    let mut out = Vec::new();
    for room in rooms.iter().filter(|r| is_valid_id(r)) {
        let (member, meta, unread): (bool, std::collections::HashMap<String, String>, Option<u64>) =
            redis::pipe()
                .sismember(participants_key(room), user)
                .hgetall(meta_key(room))
                .hget(unread_key(room), user)
                .query_async(redis)
                .await?;
        if !member {
            continue;
        }
        let last_seq = meta
            .get("seq")
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let last: Option<String> = if last_seq > 0 {
            redis::cmd("HGET")
                .arg(messages_key(room))
                .arg(last_seq)
                .query_async(redis)
                .await?
        } else {
            None
        };
        out.push(serde_json::json!({
            "id": room,
            "name": meta.get("name"),
            "unread": unread.unwrap_or(0),
            "lastSeq": last_seq,
            "lastMessage": last.as_deref().map(parse),
        }));
    }
    out.sort_by_key(|r| std::cmp::Reverse(r["lastSeq"].as_u64().unwrap_or(0)));
    Ok(out)
}

/// The last sequence of `room`.
pub async fn last_seq(redis: &mut ConnectionManager, room: &str) -> redis::RedisResult<u64> {
    let seq: Option<u64> = redis::cmd("HGET")
        .arg(meta_key(room))
        .arg("seq")
        .query_async(redis)
        .await?;
    Ok(seq.unwrap_or(0))
}

/// The messages with sequences `seqs` (in that order; missing ones skipped).
pub async fn messages(
    redis: &mut ConnectionManager,
    room: &str,
    seqs: &[u64],
) -> redis::RedisResult<Vec<Value>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    let texts: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(messages_key(room))
        .arg(seqs)
        .query_async(redis)
        .await?;
    Ok(texts.into_iter().flatten().map(|t| parse(&t)).collect())
}

/// Claims the typing slot of `user` in `room` for `ms` milliseconds; `false` when taken.
pub async fn claim_typing(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
    ms: u64,
) -> redis::RedisResult<bool> {
    let set: Option<String> = redis::cmd("SET")
        .arg(typing_key(room, user))
        .arg(1)
        .arg("PX")
        .arg(ms)
        .arg("NX")
        .query_async(redis)
        .await?;
    Ok(set.is_some())
}
