//! A due queue in Redis: members (ids) scheduled at a time, claimed with a lease when due, by
//! any number of scheduler instances. The pattern every time-driven job uses (writing
//! transitions, held notifications, digests, scheduled sends): no sleeping task, nothing lost
//! when an instance dies.
//!
//! Layout: a sorted set `{key}` (member → due time in ms, or the end of its lease while it is
//! claimed) and, per claimed member, a string `{key}:lease:{member}` holding the claim's
//! token, expiring with the lease. Members become parts of key names: they must be ids
//! checked by the caller (`membership::is_valid_id`, UUIDs).
//!
//! Guarantees:
//! - [`DueQueue::claim`] is one Lua script: it takes members due at `now` and pushes their
//!   score to `now + lease`, so two claimers never get the same member while a lease runs.
//! - A holder that crashes or stalls loses nothing: when its lease ends the member is due
//!   again and the next claim takes it (with a new token). Delivery is therefore at least
//!   once; handlers must be idempotent (job ids that dedupe, versioned writes).
//! - [`DueQueue::done`] removes the member only while *this* claim's lease is live: the lease
//!   key still holds its token. After the lease ended — whether or not another instance has
//!   re-claimed the member — or after the member was rescheduled or cancelled, `done` is a
//!   no-op and answers false, so a slow holder can never remove the new holder's claim or a
//!   newer schedule. (It follows that work finished after the lease ended is done again by
//!   the next claimer: keep leases well above the handling time.)
//! - [`DueQueue::schedule`] (re)sets the due time and ends any lease on the member (its
//!   holder's `done` becomes a no-op); [`DueQueue::schedule_if_absent`] adds only a member
//!   not already queued or claimed; [`DueQueue::cancel`] removes it and its lease.
//!
//! Times are the callers' clocks in ms (scores) and Redis's clock for the lease keys'
//! expiry; with clocks a little apart the worst case is a member claimed again slightly early
//! or late, never two live leases on one member (a re-claim overwrites the token).

use redis::aio::ConnectionLike;

/// A claim on one member, needed to mark it done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub member: String,
    /// Unique to the claim that produced this lease.
    pub token: String,
    /// When the lease ends (caller's clock, ms): the member's score while claimed.
    pub until_ms: u64,
}

/// A due queue under one sorted-set key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueQueue {
    key: String,
}

const CLAIM: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], ARGV[3], id)
  redis.call('SET', KEYS[1] .. ':lease:' .. id, ARGV[4], 'PX', ARGV[5])
end
return ids
"#;

const DONE: &str = r#"
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"#;

const SCHEDULE_IF_ABSENT: &str = r#"
if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2]) == 1 then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"#;

fn script(cell: &'static std::sync::OnceLock<redis::Script>, code: &str) -> &'static redis::Script {
    cell.get_or_init(|| redis::Script::new(code))
}

static CLAIM_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static DONE_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
static SCHEDULE_IF_ABSENT_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();

impl DueQueue {
    pub fn new(key: impl Into<String>) -> Self {
        DueQueue { key: key.into() }
    }

    /// The sorted set's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key holding the token of `member`'s live lease (scripts that reschedule members
    /// directly delete it, as [`DueQueue::schedule`] does).
    pub fn lease_key(&self, member: &str) -> String {
        format!("{}:lease:{member}", self.key)
    }

    /// Schedules `member` at `due_ms` (replacing its due time, ending any lease on it).
    pub async fn schedule<C: ConnectionLike>(
        &self,
        redis: &mut C,
        member: &str,
        due_ms: u64,
    ) -> redis::RedisResult<()> {
        redis::pipe()
            .atomic()
            .zadd(&self.key, member, due_ms)
            .ignore()
            .del(self.lease_key(member))
            .ignore()
            .query_async(redis)
            .await
    }

    /// Schedules `member` at `due_ms` unless it is already queued or claimed; true if added.
    pub async fn schedule_if_absent<C: ConnectionLike>(
        &self,
        redis: &mut C,
        member: &str,
        due_ms: u64,
    ) -> redis::RedisResult<bool> {
        let added: i64 = script(&SCHEDULE_IF_ABSENT_SCRIPT, SCHEDULE_IF_ABSENT)
            .key(&self.key)
            .key(self.lease_key(member))
            .arg(due_ms)
            .arg(member)
            .invoke_async(redis)
            .await?;
        Ok(added == 1)
    }

    /// Claims up to `limit` members due at `now_ms` for `lease_ms` (at least 1 ms).
    pub async fn claim<C: ConnectionLike>(
        &self,
        redis: &mut C,
        now_ms: u64,
        limit: usize,
        lease_ms: u64,
    ) -> redis::RedisResult<Vec<Lease>> {
        let lease_ms = lease_ms.max(1);
        let until_ms = now_ms.saturating_add(lease_ms);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let members: Vec<String> = script(&CLAIM_SCRIPT, CLAIM)
            .key(&self.key)
            .arg(now_ms)
            .arg(limit)
            .arg(until_ms)
            .arg(&token)
            .arg(lease_ms)
            .invoke_async(redis)
            .await?;
        Ok(members
            .into_iter()
            .map(|member| Lease {
                member,
                token: token.clone(),
                until_ms,
            })
            .collect())
    }

    /// Removes the member of `lease` if that lease is still live (module doc); true if
    /// removed.
    pub async fn done<C: ConnectionLike>(
        &self,
        redis: &mut C,
        lease: &Lease,
    ) -> redis::RedisResult<bool> {
        let removed: i64 = script(&DONE_SCRIPT, DONE)
            .key(&self.key)
            .key(self.lease_key(&lease.member))
            .arg(&lease.member)
            .arg(&lease.token)
            .invoke_async(redis)
            .await?;
        Ok(removed == 1)
    }

    /// Removes `member` whatever its state (a claimed one's holder then cannot mark it done);
    /// true if it was queued.
    pub async fn cancel<C: ConnectionLike>(
        &self,
        redis: &mut C,
        member: &str,
    ) -> redis::RedisResult<bool> {
        let (removed,): (i64,) = redis::pipe()
            .atomic()
            .zrem(&self.key, member)
            .del(self.lease_key(member))
            .ignore()
            .query_async(redis)
            .await?;
        Ok(removed == 1)
    }

    /// The member's score: its due time, or its lease's end while claimed.
    pub async fn score<C: ConnectionLike>(
        &self,
        redis: &mut C,
        member: &str,
    ) -> redis::RedisResult<Option<u64>> {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&self.key)
            .arg(member)
            .query_async(redis)
            .await?;
        Ok(score.map(|s| s as u64))
    }
}
