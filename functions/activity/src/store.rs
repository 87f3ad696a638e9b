//! The activity log in Redis. Per user:
//! - `inkwire:activity:log:{userId}` — every entry, and `inkwire:activity:log:{userId}:{type}`
//!   — the entries of one type (so a `type` filter reads only those). Sorted sets with every
//!   score 0, ordered by member: `{atMs:013}.{source}.{seq:020}|{json}`, so the key part
//!   sorts by time and is unique (one stream position), and time ranges, cursors and the
//!   retention trim are `BYLEX` ranges. The JSON holds the type, the time and the project,
//!   document or room id — never text;
//! - `inkwire:activity:days:{userId}:{YYYY-MM-DD}` (a UTC day) — a hash of counts per
//!   `{type}:{quarter-hour of the day}`, for statistics in any time zone (every zone's offset
//!   is a whole number of quarter hours, so a quarter lies in one local hour). Each expires
//!   at the end of its day plus the retention.
//!
//! Shared: the due queue `inkwire:activity:sweep` (user → when their oldest entry leaves the
//! retention), and `shared::idempotency`'s `inkwire:hwm:activity` (hash: source → the highest
//! stream sequence applied) and `inkwire:applied:activity:{source}` (the sequences applied in
//! the last 15 minutes).
//!
//! Writing an entry is one script (`shared::idempotency::apply_once`): the source's mark and
//! applied window are checked and advanced with the write, so a redelivered message changes
//! nothing, even one redelivered after later messages. The same script trims the user's
//! entries older than the retention and queues the user for the sweep, which trims users
//! that stopped writing (any number of instances: leases).

use inkwire_shared::due_queue::{DueQueue, Lease};
use inkwire_shared::idempotency::{Writes, apply_once};
use redis::aio::{ConnectionLike, ConnectionManager};
use serde_json::{Value, json};

use crate::sources::{Activity, Kind};

const PREFIX: &str = "inkwire:activity";
/// A quarter of an hour, the statistics' unit of time.
pub const QUARTER_MS: u64 = 15 * 60 * 1000;
pub const DAY_MS: u64 = 24 * 3600 * 1000;

pub fn log_key(user: &str) -> String {
    format!("{PREFIX}:log:{user}")
}

pub fn type_key(user: &str, kind: Kind) -> String {
    format!("{PREFIX}:log:{user}:{}", kind.as_str())
}

/// The entry logs of `user`: the whole log first, then one per type.
fn log_keys(user: &str) -> Vec<String> {
    std::iter::once(log_key(user))
        .chain(Kind::ALL.iter().map(|k| type_key(user, *k)))
        .collect()
}

pub fn days_key(user: &str, utc_day: &str) -> String {
    format!("{PREFIX}:days:{user}:{utc_day}")
}

pub fn sweep_queue() -> DueQueue {
    DueQueue::new(format!("{PREFIX}:sweep"))
}

/// The 13-digit time that starts every member: lexical order is time order until the year
/// 2286.
pub fn time_part(at_ms: u64) -> String {
    format!("{:013}", at_ms.min(9_999_999_999_999))
}

/// An entry's id (and the key part of its member): `{atMs:013}.{source}.{seq:020}`.
pub fn entry_id(at_ms: u64, source: &str, seq: u64) -> String {
    format!("{}.{source}.{seq:020}", time_part(at_ms))
}

/// Is `id` an entry id (what a cursor carries)? Checked before it reaches a Redis range.
pub fn is_entry_id(id: &str, sources: &[&str]) -> bool {
    let mut parts = id.splitn(3, '.');
    let (Some(t), Some(s), Some(q)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    t.len() == 13
        && t.bytes().all(|b| b.is_ascii_digit())
        && q.len() == 20
        && q.bytes().all(|b| b.is_ascii_digit())
        && sources.contains(&s)
}

/// The UTC date (`YYYY-MM-DD`) of a time, and the quarter hour of that day.
pub fn utc_day_quarter(at_ms: u64) -> (String, u64) {
    let day = at_ms / DAY_MS;
    let date = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(day as i64);
    (
        format!(
            "{:04}-{:02}-{:02}",
            date.year(),
            u8::from(date.month()),
            date.day()
        ),
        (at_ms % DAY_MS) / QUARTER_MS,
    )
}

/// The stored JSON of an entry: ids, type and time only.
fn entry_json(a: &Activity) -> Value {
    let mut v = json!({"type": a.kind.as_str(), "at": a.at_ms});
    for (name, id) in [
        ("projectId", &a.project),
        ("documentId", &a.document),
        ("roomId", &a.room),
    ] {
        if let Some(id) = id {
            v[name] = json!(id);
        }
    }
    v
}

/// KEYS: sweep queue, the user's lease key, the user's logs (the whole log first).
/// ARGV: cutoff (13 digits), lease token, user, retention (ms). Trims, then — if this claim's
/// lease is still live — queues the user again for when the oldest remaining entry expires,
/// or removes them when nothing is left. Returns the entries left, or -1 when the lease was
/// lost (the trim still happened: it is idempotent).
const SWEEP: &str = r#"
for i = 3, #KEYS do
  redis.call('ZREMRANGEBYLEX', KEYS[i], '-', '(' .. ARGV[1])
end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return -1
end
redis.call('DEL', KEYS[2])
local left = redis.call('ZCARD', KEYS[3])
local first = redis.call('ZRANGE', KEYS[3], 0, 0)
if #first == 0 then
  redis.call('ZREM', KEYS[1], ARGV[3])
  return 0
end
local at = tonumber(string.sub(first[1], 1, 13))
redis.call('ZADD', KEYS[1], at + tonumber(ARGV[4]), ARGV[3])
return left
"#;

static SWEEP_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();

/// The consumer name under which `shared::idempotency` keeps the activity log's high-water
/// marks (`inkwire:hwm:activity`, one field per source) and applied windows
/// (`inkwire:applied:activity:{source}`).
pub const CONSUMER: &str = "activity";

/// How long a source remembers the sequences it applied: longer than a message's delivery
/// lifetime (30 s ack wait × 5 deliveries plus the 1 s / 5 s / 30 s / 2 min backoff), so any
/// redelivery is recognised, even one that comes after later messages (a retry).
pub const APPLIED_WINDOW: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Writes `a` (from position `seq` of `source`) once: with `shared::idempotency::apply_once`,
/// so the source's high-water mark and applied window are checked and advanced in the same
/// script as the write. Also trims the user's entries older than `now_ms - retention_ms` and
/// queues the user for the sweep. True if written (false: a redelivery).
pub async fn record(
    redis: &mut ConnectionManager,
    source: &str,
    seq: u64,
    a: &Activity,
    now_ms: u64,
    retention_ms: u64,
) -> redis::RedisResult<bool> {
    let id = entry_id(a.at_ms, source, seq);
    let member = format!("{id}|{}", entry_json(a));
    let (day, quarter) = utc_day_quarter(a.at_ms);
    let day_end_s = (a.at_ms / DAY_MS + 1) * (DAY_MS / 1000);
    let expires_s = day_end_s + retention_ms.div_ceil(1000);
    let cutoff = format!("({}", time_part(now_ms.saturating_sub(retention_ms)));
    let bucket = days_key(&a.user, &day);
    let mut writes = Writes::new()
        .cmd(["ZADD", &log_key(&a.user), "0", &member])
        .cmd(["ZADD", &type_key(&a.user, a.kind), "0", &member]);
    for key in log_keys(&a.user) {
        writes.push(["ZREMRANGEBYLEX", &key, "-", &cutoff]);
    }
    let writes = writes
        .cmd([
            "HINCRBY",
            &bucket,
            &format!("{}:{quarter}", a.kind.as_str()),
            "1",
        ])
        .cmd(["EXPIREAT", &bucket, &expires_s.to_string()])
        .cmd([
            "ZADD",
            sweep_queue().key(),
            "NX",
            &a.at_ms.saturating_add(retention_ms).to_string(),
            &a.user,
        ]);
    apply_once(redis, CONSUMER, source, seq, &writes, APPLIED_WINDOW).await
}

/// Trims the user of `lease` (claimed from [`sweep_queue`]) to the retention and queues them
/// again for their oldest remaining entry. Returns the entries left (-1: lease lost).
pub async fn sweep_one<C: ConnectionLike>(
    redis: &mut C,
    lease: &Lease,
    now_ms: u64,
    retention_ms: u64,
) -> redis::RedisResult<i64> {
    let queue = sweep_queue();
    let mut script = SWEEP_SCRIPT
        .get_or_init(|| redis::Script::new(SWEEP))
        .prepare_invoke();
    script.key(queue.key()).key(queue.lease_key(&lease.member));
    for k in log_keys(&lease.member) {
        script.key(k);
    }
    script
        .arg(time_part(now_ms.saturating_sub(retention_ms)))
        .arg(&lease.token)
        .arg(&lease.member)
        .arg(retention_ms)
        .invoke_async(redis)
        .await
}

/// One entry as the API shows it.
fn view(member: &str) -> Option<Value> {
    let (id, json) = member.split_once('|')?;
    let mut v: Value = serde_json::from_str(json).ok()?;
    let at_ms = v["at"].as_u64()?;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(at_ms as i128 * 1_000_000).ok()?;
    v["at"] = json!(
        at.format(&time::format_description::well_known::Rfc3339)
            .ok()?
    );
    v["id"] = json!(id);
    Some(v)
}

/// A page of a log, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub entries: Vec<Value>,
    /// The id to pass as `cursor` for the next page, when there is one.
    pub next: Option<String>,
}

/// Entries of `key` newer than or at `min_ms` and older than `max_excl_ms`, and older than
/// the entry `cursor` if given, newest first, at most `limit`.
pub async fn page<C: ConnectionLike>(
    redis: &mut C,
    key: &str,
    min_ms: u64,
    max_excl_ms: Option<u64>,
    cursor: Option<&str>,
    limit: usize,
) -> redis::RedisResult<Page> {
    let by_time = max_excl_ms.map(time_part);
    // Both bounds are exclusive key prefixes; the lower one in lexical order wins.
    let max = match (by_time, cursor) {
        (Some(t), Some(c)) => format!("({}", if c < t.as_str() { c } else { t.as_str() }),
        (Some(t), None) => format!("({t}"),
        (None, Some(c)) => format!("({c}"),
        (None, None) => "+".to_string(),
    };
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(max)
        .arg(format!("[{}", time_part(min_ms)))
        .arg("BYLEX")
        .arg("REV")
        .arg("LIMIT")
        .arg(0)
        .arg(limit + 1)
        .query_async(redis)
        .await?;
    let more = members.len() > limit;
    let entries: Vec<Value> = members.iter().take(limit).filter_map(|m| view(m)).collect();
    let next = if more {
        members[limit - 1]
            .split_once('|')
            .map(|(id, _)| id.to_string())
    } else {
        None
    };
    Ok(Page { entries, next })
}

/// Counts of `user` per (type, quarter start in ms) from `from_ms` on (whole UTC days are
/// read; quarters that end before `from_ms` are left out).
pub async fn quarters<C: ConnectionLike>(
    redis: &mut C,
    user: &str,
    from_ms: u64,
    to_ms: u64,
) -> redis::RedisResult<Vec<(Kind, u64, u64)>> {
    let first = from_ms / DAY_MS;
    let last = to_ms / DAY_MS;
    let mut pipe = redis::pipe();
    for day in first..=last {
        pipe.hgetall(days_key(user, &utc_day_quarter(day * DAY_MS).0));
    }
    let days: Vec<std::collections::HashMap<String, u64>> = pipe.query_async(redis).await?;
    let mut out = Vec::new();
    for (day, fields) in (first..=last).zip(days) {
        for (field, count) in fields {
            let Some((kind, q)) = field.rsplit_once(':') else {
                continue;
            };
            let (Some(kind), Ok(q)) = (Kind::parse(kind), q.parse::<u64>()) else {
                continue;
            };
            let start = day * DAY_MS + q * QUARTER_MS;
            if start + QUARTER_MS <= from_ms || start > to_ms {
                continue;
            }
            out.push((kind, start, count));
        }
    }
    Ok(out)
}

/// Every Redis key of the activity log, with the high-water marks and applied windows of
/// `sources` (for `inkwire replay activity`; some may not exist).
pub async fn all_keys<C: ConnectionLike>(
    redis: &mut C,
    sources: &[&str],
) -> redis::RedisResult<Vec<String>> {
    let mut keys = vec![format!("inkwire:hwm:{CONSUMER}")];
    keys.extend(
        sources
            .iter()
            .map(|s| format!("inkwire:applied:{CONSUMER}:{s}")),
    );
    keys.extend(inkwire_shared::redis_store::scan_keys(redis, &format!("{PREFIX}:*")).await?);
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_cursors_are_checked() {
        let a = entry_id(999, "chat", 7);
        let b = entry_id(1000, "chat", 1);
        assert!(a < b);
        assert_eq!(a, "0000000000999.chat.00000000000000000007");
        assert!(is_entry_id(&a, &["chat"]));
        for bad in [
            "",
            "0000000000999.chat",
            "0000000000999.mail.00000000000000000007",
            "000000000099x.chat.00000000000000000007",
            "0000000000999.chat.0000000000000000007",
            "0000000000999.chat.00000000000000000007|x",
        ] {
            assert!(!is_entry_id(bad, &["chat"]), "{bad:?}");
        }
    }

    #[test]
    fn days_and_quarters_are_utc() {
        // 2027-01-15T08:00:00Z, then 23:59 of the same day.
        assert_eq!(
            utc_day_quarter(1_800_000_000_000),
            ("2027-01-15".into(), 32)
        );
        assert_eq!(
            utc_day_quarter(1_800_000_000_000 + 16 * 3_600_000 - 60_000),
            ("2027-01-15".into(), 95)
        );
    }
}
