//! Client sessions in Redis. Every write is one Lua script, so the version check, the write,
//! the per-user cap and the new expiry happen in one step whatever runs at the same time on
//! any number of instances: of two writes with the same `If-Match`, exactly one matches.
//! Times come from Redis (`TIME`), so instances with different clocks agree on expiry.
//!
//! Keys (user and session ids are checked with `is_valid_id` before they get here; the
//! session id is namespaced by its user, so another user's id is simply not there):
//! - `inkwire:client-session:{user}:s:{id}` (hash): `version`, `state` and `prefs` (JSON
//!   texts), `created` and `updated` (Unix ms), `unpushed` (`1` while a preference change
//!   has not been confirmed pushed to `user:{user}`); `PEXPIRE` the TTL at every read and
//!   write;
//! - `inkwire:client-session:{user}:index` (sorted set): session id → its expiry (Unix ms),
//!   for listing and for the per-user cap; entries past their expiry are dropped by the next
//!   write, and the set itself expires with the user's last session.

use std::sync::LazyLock;

use redis::Script;
use redis::aio::ConnectionManager;

pub use inkwire_shared::membership::is_valid_id;

pub fn session_key(user: &str, id: &str) -> String {
    format!("inkwire:client-session:{user}:s:{id}")
}
pub fn index_key(user: &str) -> String {
    format!("inkwire:client-session:{user}:index")
}

/// One stored session, as the scripts answer it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub version: u64,
    /// JSON text of the state.
    pub state: String,
    /// JSON text of the preferences (an object).
    pub prefs: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub expires_ms: i64,
    /// A preference change of this session has not been confirmed pushed yet.
    pub unpushed: bool,
}

/// The `If-Match` a write carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// No `If-Match`: the write applies to whatever version is stored (or creates).
    None,
    /// `If-Match: *`: the session must exist.
    Exists,
    /// `If-Match: "3", "4"`: the stored version must be one of these.
    Versions(Vec<u64>),
}

impl Precondition {
    /// The script's form: '' (none), '*' (exists), or `,3,4,` (a list to search).
    fn arg(&self) -> String {
        match self {
            Precondition::None => String::new(),
            Precondition::Exists => "*".into(),
            Precondition::Versions(v) => {
                let mut s = String::from(",");
                for n in v {
                    s.push_str(&n.to_string());
                    s.push(',');
                }
                s
            }
        }
    }
}

/// What a write asks for.
#[derive(Debug, Clone)]
pub struct Write<'a> {
    /// New state text, or keep the stored one (`null` on create).
    pub state: Option<&'a str>,
    /// New preferences text, or keep the stored ones (`{}` on create).
    pub prefs: Option<&'a str>,
    pub if_match: Precondition,
    /// `If-None-Match: *`: only create.
    pub create_only: bool,
    pub ttl_ms: u64,
    pub max_sessions: usize,
    pub max_bytes: usize,
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Stored: the session now, and whether it was created. `session.unpushed` says whether
    /// its preferences are to be pushed (changed now, or a failed push before).
    Done { session: Stored, created: bool },
    /// `If-None-Match: *` but the session exists (its version).
    Exists(u64),
    /// `If-Match` but there is no such session.
    Missing,
    /// `If-Match` names other versions than the stored one.
    Stale(u64),
    /// Creating it would exceed the per-user cap.
    TooMany,
    /// The stored session would be this many bytes, more than allowed.
    TooLarge(usize),
}

static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local cur = redis.call('HMGET', KEYS[1], 'version', 'state', 'prefs', 'created', 'unpushed')
local version = tonumber(cur[1])
if ARGV[6] == '1' and version then return {-1, version} end
if ARGV[5] ~= '' then
  if not version then return {-2, 0} end
  if ARGV[5] ~= '*' and not string.find(ARGV[5], ',' .. version .. ',', 1, true) then
    return {-3, version}
  end
end
if not version and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return {-4, 0} end
local state = cur[2] or 'null'
local prefs = cur[3] or '{}'
local before = prefs
if ARGV[7] == '1' then state = ARGV[8] end
if ARGV[9] == '1' then prefs = ARGV[10] end
local size = string.len(state) + string.len(prefs)
if size > tonumber(ARGV[4]) then return {-5, size} end
local nv = (version or 0) + 1
local created = cur[4] or string.format('%d', now)
local unpushed = cur[5] or ''
if prefs ~= before then unpushed = '1' end
redis.call('HSET', KEYS[1], 'version', nv, 'state', state, 'prefs', prefs, 'created', created,
  'updated', string.format('%d', now), 'unpushed', unpushed)
local ttl = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl)
local fresh = 0
if not version then fresh = 1 end
return {1, nv, state, prefs, created, string.format('%d', now), string.format('%d', now + ttl),
  fresh, unpushed}
"#,
    )
});

fn num(v: &redis::Value) -> i64 {
    match v {
        redis::Value::Int(n) => *n,
        redis::Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(n) => n.to_string(),
        _ => String::new(),
    }
}

/// Creates or replaces the session `id` of `user` (see [`Write`]).
pub async fn put(
    redis: &mut ConnectionManager,
    user: &str,
    id: &str,
    w: &Write<'_>,
) -> redis::RedisResult<Written> {
    let reply: Vec<redis::Value> = PUT
        .key(session_key(user, id))
        .key(index_key(user))
        .arg(id)
        .arg(w.ttl_ms)
        .arg(w.max_sessions)
        .arg(w.max_bytes)
        .arg(w.if_match.arg())
        .arg(if w.create_only { "1" } else { "0" })
        .arg(if w.state.is_some() { "1" } else { "0" })
        .arg(w.state.unwrap_or(""))
        .arg(if w.prefs.is_some() { "1" } else { "0" })
        .arg(w.prefs.unwrap_or(""))
        .invoke_async(redis)
        .await?;
    let code = reply.first().map(num).unwrap_or(0);
    let second = reply.get(1).map(num).unwrap_or(0);
    Ok(match code {
        -1 => Written::Exists(second as u64),
        -2 => Written::Missing,
        -3 => Written::Stale(second as u64),
        -4 => Written::TooMany,
        -5 => Written::TooLarge(second as usize),
        _ => {
            let at = |i: usize| reply.get(i).cloned().unwrap_or(redis::Value::Nil);
            Written::Done {
                session: Stored {
                    version: second as u64,
                    state: text(&at(2)),
                    prefs: text(&at(3)),
                    created_ms: num(&at(4)),
                    updated_ms: num(&at(5)),
                    expires_ms: num(&at(6)),
                    unpushed: text(&at(8)) == "1",
                },
                created: num(&at(7)) == 1,
            }
        }
    })
}

static GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.call('HMGET', KEYS[1], 'version', 'state', 'prefs', 'created', 'updated', 'unpushed')
if not cur[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, cur[1], cur[2], cur[3], cur[4], cur[5], string.format('%d', now + ttl), cur[6] or ''}
"#,
    )
});

/// Reads the session and extends its expiry (a read is a use). `None`: no such session.
pub async fn get(
    redis: &mut ConnectionManager,
    user: &str,
    id: &str,
    ttl_ms: u64,
) -> redis::RedisResult<Option<Stored>> {
    let reply: Vec<redis::Value> = GET
        .key(session_key(user, id))
        .key(index_key(user))
        .arg(id)
        .arg(ttl_ms)
        .invoke_async(redis)
        .await?;
    if reply.first().map(num) != Some(1) {
        return Ok(None);
    }
    let at = |i: usize| reply.get(i).cloned().unwrap_or(redis::Value::Nil);
    Ok(Some(Stored {
        version: num(&at(1)) as u64,
        state: text(&at(2)),
        prefs: text(&at(3)),
        created_ms: num(&at(4)),
        updated_ms: num(&at(5)),
        expires_ms: num(&at(6)),
        unpushed: text(&at(7)) == "1",
    }))
}

static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local version = tonumber(redis.call('HGET', KEYS[1], 'version'))
if not version then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0, 0}
end
if ARGV[2] ~= '' and ARGV[2] ~= '*' and not string.find(ARGV[2], ',' .. version .. ',', 1, true) then
  return {-3, version}
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {1, version}
"#,
    )
});

/// How a delete ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// Deleted; the version it had.
    Done(u64),
    Missing,
    /// `If-Match` names other versions than the stored one.
    Stale(u64),
}

/// Deletes the session when `if_match` holds.
pub async fn delete(
    redis: &mut ConnectionManager,
    user: &str,
    id: &str,
    if_match: &Precondition,
) -> redis::RedisResult<Deleted> {
    let (code, version): (i64, u64) = DELETE
        .key(session_key(user, id))
        .key(index_key(user))
        .arg(id)
        .arg(if_match.arg())
        .invoke_async(redis)
        .await?;
    Ok(match code {
        1 => Deleted::Done(version),
        -3 => Deleted::Stale(version),
        _ => Deleted::Missing,
    })
}

static CLEAR_UNPUSHED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('HGET', KEYS[1], 'prefs') == ARGV[1] then redis.call('HSET', KEYS[1], 'unpushed', '') end
return 1
"#,
    )
});

/// The preferences `prefs` were pushed: clear the flag, unless they changed meanwhile (then
/// the flag stays for that change, which its own write pushes, or the next read).
pub async fn mark_pushed(
    redis: &mut ConnectionManager,
    user: &str,
    id: &str,
    prefs: &str,
) -> redis::RedisResult<()> {
    let _: i64 = CLEAR_UNPUSHED
        .key(session_key(user, id))
        .arg(prefs)
        .invoke_async(redis)
        .await?;
    Ok(())
}

/// A session in the list: no state (it may be large; read one session for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: String,
    pub version: u64,
    pub prefs: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub expires_ms: i64,
}

/// `version`, `prefs`, `created`, `updated` of one session (all `None` once it expired).
type Row = (Option<u64>, Option<String>, Option<i64>, Option<i64>);

/// The user's live sessions, most recently used first. A listing is not a use: it extends
/// nothing (a page looking for a session to resume must not keep every old one alive).
pub async fn list(redis: &mut ConnectionManager, user: &str) -> redis::RedisResult<Vec<Listed>> {
    let entries: Vec<(String, i64)> = redis::cmd("ZRANGE")
        .arg(index_key(user))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(redis)
        .await?;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (id, _) in &entries {
        pipe.cmd("HMGET")
            .arg(session_key(user, id))
            .arg("version")
            .arg("prefs")
            .arg("created")
            .arg("updated");
    }
    let rows: Vec<Row> = pipe.query_async(redis).await?;
    let mut out: Vec<Listed> = entries
        .into_iter()
        .zip(rows)
        // An entry whose hash expired (not pruned yet) is not listed.
        .filter_map(|((id, expires_ms), (version, prefs, created, updated))| {
            Some(Listed {
                id,
                version: version?,
                prefs: prefs.unwrap_or_else(|| "{}".into()),
                created_ms: created.unwrap_or(0),
                updated_ms: updated.unwrap_or(0),
                expires_ms,
            })
        })
        .collect();
    out.sort_by(|a, b| b.expires_ms.cmp(&a.expires_ms).then(a.id.cmp(&b.id)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditions_as_script_arguments() {
        assert_eq!(Precondition::None.arg(), "");
        assert_eq!(Precondition::Exists.arg(), "*");
        assert_eq!(Precondition::Versions(vec![3, 14]).arg(), ",3,14,");
        // `,1,` is not found in `,14,`: versions are matched whole.
        assert!(!Precondition::Versions(vec![14]).arg().contains(",1,"));
    }

    #[test]
    fn keys_cannot_collide() {
        // A session named "index" is not the index.
        assert_ne!(session_key("u", "index"), index_key("u"));
    }
}
