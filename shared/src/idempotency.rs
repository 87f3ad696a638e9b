//! Makes a consumer's Redis writes happen once per message, even when JetStream redelivers it
//! (a crash between the writes and the ack, an ack lost on the wire).
//!
//! For each key (a session, a user, ...) inkwire keeps, in one Lua script and so atomically with
//! the handler's own writes:
//! - the high-water mark: the highest stream sequence applied for that key (hash
//!   `inkwire:hwm:{consumer}`), which is also the projection's position;
//! - the applied window: the sequences applied recently (sorted set
//!   `inkwire:applied:{consumer}:{key}`, scored by apply time).
//!
//! A message is a duplicate when its sequence is in the window. A plain high-water-mark test
//! (`seq <= hwm`) would be wrong here, because a message that was nak'ed with a delay is
//! redelivered after later messages of the same key were applied; it must still be applied
//! once. The window only has to outlive a message's delivery lifetime (`ack_wait` ×
//! `max_deliver` plus the backoff delays), so entries older than `window` are trimmed.

use std::time::Duration;

use redis::aio::ConnectionManager;

/// Redis commands a handler wants applied exactly once, in order.
#[derive(Debug, Clone, Default)]
pub struct Writes {
    commands: Vec<Vec<String>>,
}

impl Writes {
    pub fn new() -> Writes {
        Writes::default()
    }

    /// Adds one command, e.g. `writes.cmd(["HINCRBY", "k", "words", "3"])`.
    pub fn cmd<I, S>(mut self, parts: I) -> Writes
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.commands
            .push(parts.into_iter().map(Into::into).collect());
        self
    }

    pub fn push<I, S>(&mut self, parts: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.commands
            .push(parts.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

const APPLY_ONCE: &str = r#"
local applied, hwm = KEYS[1], KEYS[2]
local key, seq, now, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', applied, ARGV[2]) then return 0 end
for _, c in ipairs(cjson.decode(ARGV[5])) do redis.call(unpack(c)) end
redis.call('ZADD', applied, now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', applied, '-inf', now - window)
redis.call('PEXPIRE', applied, window)
local current = tonumber(redis.call('HGET', hwm, key) or '0')
if seq > current then redis.call('HSET', hwm, key, ARGV[2]) end
return 1
"#;
static APPLY_ONCE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPLY_ONCE));

/// Applies `writes` for the message at stream sequence `seq` of `key`, unless it was applied
/// already. Returns whether the writes were applied.
pub async fn apply_once(
    redis: &mut ConnectionManager,
    consumer: &str,
    key: &str,
    seq: u64,
    writes: &Writes,
    window: Duration,
) -> redis::RedisResult<bool> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let commands = serde_json::to_string(&writes.commands).expect("strings serialize");
    let applied: i64 = APPLY_ONCE_SCRIPT
        .key(format!("inkwire:applied:{consumer}:{key}"))
        .key(format!("inkwire:hwm:{consumer}"))
        .arg(key)
        .arg(seq)
        .arg(now)
        .arg(window.as_millis() as u64)
        .arg(commands)
        .invoke_async(redis)
        .await?;
    Ok(applied == 1)
}

/// The highest stream sequence applied for `key` by `consumer` (0 if none).
pub async fn high_water_mark(
    redis: &mut ConnectionManager,
    consumer: &str,
    key: &str,
) -> redis::RedisResult<u64> {
    let v: Option<u64> = redis::cmd("HGET")
        .arg(format!("inkwire:hwm:{consumer}"))
        .arg(key)
        .query_async(redis)
        .await?;
    Ok(v.unwrap_or(0))
}
