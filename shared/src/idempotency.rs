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

/// Counter increments of a batch of messages of one key (a stream), for
/// [`apply_counts_once`]: each message adds to fields of Redis hashes; a message with no
/// increments is still marked applied.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    keys: Vec<String>,
    expire_at_ms: Vec<u64>,
    key_index: std::collections::HashMap<String, usize>,
    // Fields are interned: a batch names a few dozen distinct fields many times over.
    fields: Vec<String>,
    field_index: std::collections::HashMap<String, usize>,
    messages: Vec<(u64, Vec<Increment>)>,
}

/// One increment of a message: (key index, field index, delta).
type Increment = (usize, usize, i64);

/// A counter hash of a [`Counts`] batch, from [`Counts::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyId(usize);

impl Counts {
    pub fn new() -> Counts {
        Counts::default()
    }

    /// Starts the message at stream sequence `seq`; the following [`incr`](Self::incr)s are
    /// its increments.
    pub fn message(&mut self, seq: u64) {
        self.messages.push((seq, Vec::new()));
    }

    /// The hash `key` of this batch, expiring at `expire_at_ms` (Unix ms; the latest one
    /// given for a key wins; 0: no expiry set).
    pub fn key(&mut self, key: &str, expire_at_ms: u64) -> KeyId {
        let index = match self.key_index.get(key) {
            Some(i) => *i,
            None => {
                self.keys.push(key.to_string());
                self.expire_at_ms.push(0);
                self.key_index.insert(key.to_string(), self.keys.len() - 1);
                self.keys.len() - 1
            }
        };
        self.expire_at_ms[index] = self.expire_at_ms[index].max(expire_at_ms);
        KeyId(index)
    }

    /// Adds `delta` to `field` of `key` for the current message.
    pub fn incr_key(&mut self, key: KeyId, field: &str, delta: i64) {
        let f = match self.field_index.get(field) {
            Some(i) => *i,
            None => {
                self.fields.push(field.to_string());
                self.field_index
                    .insert(field.to_string(), self.fields.len() - 1);
                self.fields.len() - 1
            }
        };
        if let Some((_, incs)) = self.messages.last_mut() {
            incs.push((key.0, f, delta));
        }
    }

    /// Adds `delta` to `field` of hash `key` for the current message ([`key`](Self::key)
    /// and [`incr_key`](Self::incr_key) in one).
    pub fn incr(&mut self, key: &str, expire_at_ms: u64, field: &str, delta: i64) {
        let k = self.key(key, expire_at_ms);
        self.incr_key(k, field, delta);
    }

    /// Messages in the batch.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The script's argument: every sequence, the ones expected to be duplicates, and the
    /// increments of the others summed per (key, field).
    fn argument(&self, duplicates: &std::collections::HashSet<String>) -> String {
        let mut sums: std::collections::HashMap<(usize, usize), i64> =
            std::collections::HashMap::new();
        let mut seqs = Vec::with_capacity(self.messages.len());
        for (seq, incs) in &self.messages {
            let s = seq.to_string();
            if !duplicates.contains(&s) {
                for (k, f, d) in incs {
                    *sums.entry((*k, *f)).or_default() += d;
                }
            }
            seqs.push(s);
        }
        let mut incs = Vec::with_capacity(sums.len() * 3);
        for ((k, f), d) in sums {
            if d != 0 {
                incs.push(serde_json::json!(k + 1));
                incs.push(serde_json::json!(self.fields[f]));
                incs.push(serde_json::json!(d));
            }
        }
        let mut expected: Vec<&String> = duplicates.iter().collect();
        expected.sort();
        serde_json::json!({"s": seqs, "d": expected, "i": incs, "x": self.expire_at_ms}).to_string()
    }
}

/// What [`apply_counts_once`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountsApplied {
    /// Messages whose increments were added.
    pub applied: usize,
    /// Messages skipped because they had been applied before (redeliveries).
    pub duplicates: usize,
}

// KEYS: 1 applied set, 2 high-water marks, 3.. the counter hashes (in `Counts` order).
// ARGV: 1 the key's field in the marks, 2 the floor, 3 the batch (`Counts::argument`).
// Duplicates are found with one range read of the applied set; when they are not the ones
// the caller summed without, nothing is written and the real ones are returned.
const APPLY_COUNTS_ONCE: &str = r#"
local applied, hwm = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[3])
local lo, hi = nil, nil
for _, s in ipairs(a.s) do
  local n = tonumber(s)
  if lo == nil or n < lo then lo = n end
  if hi == nil or n > hi then hi = n end
end
if lo == nil then return {'ok', '0', '0'} end
local seen = {}
for _, s in ipairs(redis.call('ZRANGEBYSCORE', applied, string.format('%d', lo), string.format('%d', hi))) do
  seen[s] = true
end
local dups, expected, nexp = {}, {}, 0
for _, s in ipairs(a.d) do expected[s] = true; nexp = nexp + 1 end
local fresh = {}
for _, s in ipairs(a.s) do
  if seen[s] then dups[#dups + 1] = s else fresh[#fresh + 1] = s end
end
local same = (#dups == nexp)
if same then for _, s in ipairs(dups) do if not expected[s] then same = false end end end
if not same then
  table.insert(dups, 1, 'dups')
  return dups
end
local i = a.i
for j = 1, #i, 3 do
  redis.call('HINCRBY', KEYS[2 + i[j]], i[j + 1], string.format('%d', i[j + 2]))
end
for k, x in ipairs(a.x) do
  if x > 0 then redis.call('PEXPIREAT', KEYS[2 + k], string.format('%d', x)) end
end
local j = 1
while j <= #fresh do
  local args = {}
  for m = j, math.min(j + 199, #fresh) do
    args[#args + 1] = fresh[m]
    args[#args + 1] = fresh[m]
  end
  redis.call('ZADD', applied, unpack(args))
  j = j + 200
end
if tonumber(ARGV[2]) > 0 then redis.call('ZREMRANGEBYSCORE', applied, '-inf', ARGV[2]) end
redis.call('PEXPIRE', applied, 604800000)
local current = tonumber(redis.call('HGET', hwm, ARGV[1]) or '0')
if hi > current then redis.call('HSET', hwm, ARGV[1], string.format('%d', hi)) end
return {'ok', tostring(#fresh), tostring(#dups)}
"#;
static APPLY_COUNTS_ONCE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(APPLY_COUNTS_ONCE));

/// The batched form of [`apply_once`] for counters: one script call applies the increments
/// of every message of `counts` that was not applied before, summed per (key, field), and
/// marks those messages applied — atomically, so a crash between the call and the acks, or
/// a redelivery that comes after later messages, counts nothing twice.
///
/// The applied set (`inkwire:applied:{consumer}:{key}`) is scored by stream sequence, not
/// by time, and trimmed below `floor`: pass the consumer's ack floor (JetStream never
/// redelivers a message at or below it, so those entries can go), or 0 to trim nothing.
/// This keeps the set at about the consumer's unacknowledged messages however fast the
/// stream runs, where a time window would hold every message of the last minutes. The
/// high-water mark (`inkwire:hwm:{consumer}`, field `key`) is kept as for `apply_once`.
///
/// The caller sums optimistically (no duplicates expected); when the script finds
/// duplicates it writes nothing and names them, and the call is made again without them —
/// two calls only for a batch that holds redeliveries.
pub async fn apply_counts_once(
    redis: &mut ConnectionManager,
    consumer: &str,
    key: &str,
    floor: u64,
    counts: &Counts,
) -> redis::RedisResult<CountsApplied> {
    let mut expected = std::collections::HashSet::new();
    for _ in 0..5 {
        let mut invocation = APPLY_COUNTS_ONCE_SCRIPT.prepare_invoke();
        invocation
            .key(format!("inkwire:applied:{consumer}:{key}"))
            .key(format!("inkwire:hwm:{consumer}"));
        for k in &counts.keys {
            invocation.key(k);
        }
        let reply: Vec<String> = invocation
            .arg(key)
            .arg(floor)
            .arg(counts.argument(&expected))
            .invoke_async(redis)
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => {
                let n = |i: usize| reply.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
                return Ok(CountsApplied {
                    applied: n(1),
                    duplicates: n(2),
                });
            }
            _ => expected = reply.into_iter().skip(1).collect(),
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Client,
        "apply_counts_once: the applied set kept changing under the batch",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_sums_increments_per_key_and_field_without_the_duplicates() {
        let mut c = Counts::new();
        c.message(7);
        c.incr("k1", 100, "total", 1);
        c.incr("k2", 50, "total", 1);
        c.message(8);
        c.incr("k1", 200, "total", 1);
        c.incr("k1", 200, "words", 5);
        c.message(9);
        assert_eq!(c.len(), 3);
        let sums = |dups: &[&str]| {
            let dups = dups.iter().map(|s| s.to_string()).collect();
            let v: serde_json::Value = serde_json::from_str(&c.argument(&dups)).unwrap();
            let mut out = Vec::new();
            for t in v["i"].as_array().unwrap().chunks(3) {
                out.push((
                    t[0].as_u64().unwrap(),
                    t[1].as_str().unwrap().to_string(),
                    t[2].as_i64().unwrap(),
                ));
            }
            out.sort();
            (v, out)
        };
        let (v, all) = sums(&[]);
        assert_eq!(v["s"], serde_json::json!(["7", "8", "9"]));
        // Key indexes are 1-based in the script; the latest expiry of a key wins.
        assert_eq!(v["x"], serde_json::json!([200, 50]));
        assert_eq!(
            all,
            vec![
                (1, "total".into(), 2),
                (1, "words".into(), 5),
                (2, "total".into(), 1)
            ]
        );
        let (v, without_8) = sums(&["8"]);
        assert_eq!(v["d"], serde_json::json!(["8"]));
        assert_eq!(
            without_8,
            vec![(1, "total".into(), 1), (2, "total".into(), 1)]
        );
    }
}
