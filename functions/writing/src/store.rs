//! Where writing projections live in Redis.
//!
//! - `inkwire:writing:session:{id}`: the session (JSON), kept a day after it ends;
//! - `inkwire:writing:user:{u}:active`, `inkwire:writing:project:{p}:active`: open sessions;
//! - `inkwire:writing:due`: sorted set of sessions by the time their next time-driven
//!   transition falls due (the scheduler's queue, a `shared::due_queue::DueQueue`), and
//!   `inkwire:writing:due:lease:{id}` while the scheduler holds a lease on a session;
//! - `inkwire:writing:user:{u}:days`, `inkwire:writing:project:{p}:days`: words per day;
//! - `inkwire:writing:user:{u}:baseline`: the writer's baseline WPM;
//! - `inkwire:writing:session:{id}:outbox`: derived events saved with the session and not
//!   yet confirmed published (hash: event id → subject, newline, event JSON).
//!
//! Sessions are saved with an optimistic version check, so two tracker instances can never
//! overwrite each other's update.

use inkwire_shared::due_queue::DueQueue;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use crate::session::Session;
use crate::state_machine::{SessionState, TrackerConfig};

pub const DUE_KEY: &str = "inkwire:writing:due";
/// How long an ended session stays readable.
const ENDED_TTL_SECS: u64 = 24 * 3600;

pub fn session_key(id: &str) -> String {
    format!("inkwire:writing:session:{id}")
}
pub fn user_active_key(user: &str) -> String {
    format!("inkwire:writing:user:{user}:active")
}
pub fn project_active_key(project: &str) -> String {
    format!("inkwire:writing:project:{project}:active")
}
pub fn user_days_key(user: &str) -> String {
    format!("inkwire:writing:user:{user}:days")
}
pub fn project_days_key(project: &str) -> String {
    format!("inkwire:writing:project:{project}:days")
}
pub fn baseline_key(user: &str) -> String {
    format!("inkwire:writing:user:{user}:baseline")
}
/// The writer's preferences (`timeZone`, `dailyGoalWords`): set through the API, not derived
/// from the stream.
pub fn preferences_key(user: &str) -> String {
    format!("inkwire:writing-prefs:{user}")
}
pub fn end_requested_key(id: &str) -> String {
    format!("inkwire:writing:session:{id}:end-requested")
}

/// A stored session, the version it was read at, and the derived events saved with it that
/// were not yet confirmed published (see [`save_cmd`]).
pub struct Loaded {
    pub session: Session,
    pub version: u64,
    pub outbox: Vec<OutboxEvent>,
}

/// A derived event waiting to be published: saved with the session that produced it, so a
/// crash between the save and the publish loses nothing (ids make a repeat a duplicate).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    pub subject: String,
    pub id: String,
    pub payload: String,
}

impl OutboxEvent {
    /// The stored form: subject, a newline, the event (subjects hold no newline).
    fn stored(&self) -> String {
        format!("{}\n{}", self.subject, self.payload)
    }

    fn from_stored(id: String, stored: &str) -> Option<OutboxEvent> {
        let (subject, payload) = stored.split_once('\n')?;
        Some(OutboxEvent {
            subject: subject.to_string(),
            id,
            payload: payload.to_string(),
        })
    }
}

#[derive(serde::Deserialize)]
struct Stamped {
    timestamp: String,
}

pub fn meta_key(id: &str) -> String {
    format!("{}:meta", session_key(id))
}

pub fn outbox_key(id: &str) -> String {
    format!("{}:outbox", session_key(id))
}

pub async fn load(redis: &mut ConnectionManager, id: &str) -> redis::RedisResult<Option<Loaded>> {
    Ok(load_many(redis, &[id]).await?.pop().flatten())
}

/// A session (without its outbox) and whether its end was requested, in one round trip:
/// what the writing API checks before it accepts input.
pub async fn load_for_input(
    redis: &mut ConnectionManager,
    id: &str,
) -> redis::RedisResult<(Option<Session>, bool)> {
    let (json, ending): (Option<String>, bool) = redis::pipe()
        .get(session_key(id))
        .exists(end_requested_key(id))
        .query_async(redis)
        .await?;
    Ok((json.and_then(|j| serde_json::from_str(&j).ok()), ending))
}

/// Loads several sessions in one round trip (`None` for the ones that do not exist).
pub async fn load_many(
    redis: &mut ConnectionManager,
    ids: &[&str],
) -> redis::RedisResult<Vec<Option<Loaded>>> {
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.get(session_key(id))
            .hget(meta_key(id), "version")
            .hgetall(outbox_key(id));
    }
    type Row = (Option<String>, Option<u64>, Vec<(String, String)>);
    let raw: Vec<Row> = pipe.query_async(redis).await?;
    Ok(raw
        .into_iter()
        .map(|(json, version, outbox)| {
            let session = serde_json::from_str(&json?).ok()?;
            let mut outbox: Vec<OutboxEvent> = outbox
                .into_iter()
                .filter_map(|(id, stored)| OutboxEvent::from_stored(id, &stored))
                .collect();
            // In the order the events happened (UTC RFC 3339 times sort as text).
            outbox.sort_by_cached_key(|e| {
                serde_json::from_str::<Stamped>(&e.payload)
                    .map(|s| s.timestamp)
                    .unwrap_or_default()
            });
            Some(Loaded {
                session,
                version: version.unwrap_or(0),
                outbox,
            })
        })
        .collect())
}

/// Saves `session` if nobody saved it since `version` was read; also maintains the active
/// sets (joined on the first save, left on the end), the due queue, per-day word totals
/// (`ARGV[8]` pairs of day and words) and the outbox (the remaining pairs: event id and
/// stored event, added to what is there).
const SAVE: &str = r#"
local key, meta, due = KEYS[1], KEYS[2], KEYS[3]
local current = tonumber(redis.call('HGET', meta, 'version') or '0')
if current ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', key, ARGV[2])
redis.call('HSET', meta, 'version', current + 1)
local id, ended, due_at = ARGV[3], ARGV[4] == '1', tonumber(ARGV[5])
if ended then
  redis.call('EXPIRE', key, ARGV[6]) redis.call('EXPIRE', meta, ARGV[6])
  redis.call('SREM', KEYS[4], id) if KEYS[5] ~= '' then redis.call('SREM', KEYS[5], id) end
  redis.call('ZREM', due, id) redis.call('DEL', KEYS[9])
else
  if ARGV[7] == '1' then
    redis.call('SADD', KEYS[4], id) if KEYS[5] ~= '' then redis.call('SADD', KEYS[5], id) end
  end
  if due_at > 0 then redis.call('ZADD', due, due_at, id) else redis.call('ZREM', due, id) end
  redis.call('DEL', KEYS[9])
end
local days = tonumber(ARGV[8])
for i = 9, 8 + 2 * days, 2 do
  redis.call('HINCRBY', KEYS[6], ARGV[i], ARGV[i + 1])
  if KEYS[7] ~= '' then redis.call('HINCRBY', KEYS[7], ARGV[i], ARGV[i + 1]) end
end
if #ARGV > 8 + 2 * days then
  redis.call('HSET', KEYS[8], unpack(ARGV, 9 + 2 * days))
  if ended then redis.call('EXPIRE', KEYS[8], ARGV[6]) end
end
return 1
"#;

fn save_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(SAVE))
}

/// Makes sure the save script is loaded (for [`save_cmd`] in pipelines).
pub async fn load_scripts(redis: &mut ConnectionManager) -> redis::RedisResult<()> {
    save_script().load_async(redis).await.map(|_| ())
}

/// Removes published events (by id) from the outbox of session `id`.
pub fn clear_outbox_cmd(id: &str, ids: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("HDEL");
    cmd.arg(outbox_key(id)).arg(ids);
    cmd
}

/// The save as one command (EVALSHA; call [`load_scripts`] first), answering 1 when saved and
/// 0 on a version conflict. `outbox` holds the derived events new in this save.
pub fn save_cmd(
    session: &Session,
    version: u64,
    cfg: &TrackerConfig,
    day_words: &std::collections::BTreeMap<String, i64>,
    outbox: &[OutboxEvent],
) -> redis::Cmd {
    let key = session_key(&session.id);
    let project = session.project_id.as_deref();
    let due_at = session.next_due(cfg).map_or(0, |(at, _, _)| at);
    let days: Vec<(&String, &i64)> = day_words.iter().filter(|(_, w)| **w != 0).collect();
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(save_script().get_hash())
        .arg(9)
        .arg(&key)
        .arg(meta_key(&session.id))
        .arg(DUE_KEY)
        .arg(user_active_key(&session.user_id))
        .arg(project.map(project_active_key).unwrap_or_default())
        .arg(user_days_key(&session.user_id))
        .arg(project.map(project_days_key).unwrap_or_default())
        .arg(outbox_key(&session.id))
        .arg(due_queue().lease_key(&session.id))
        .arg(version)
        .arg(serde_json::to_vec(session).expect("sessions serialize"))
        .arg(&session.id)
        .arg(if session.state == SessionState::Ended {
            "1"
        } else {
            "0"
        })
        .arg(due_at)
        .arg(ENDED_TTL_SECS)
        // The active sets are joined once, on the first save.
        .arg(if version == 0 { "1" } else { "0" })
        .arg(days.len());
    for (day, words) in days {
        cmd.arg(day).arg(*words);
    }
    for e in outbox {
        cmd.arg(&e.id).arg(e.stored());
    }
    cmd
}

/// Saves a session; false when another writer got there first (reload and retry).
pub async fn save(
    redis: &mut ConnectionManager,
    session: &Session,
    version: u64,
    cfg: &TrackerConfig,
    words_delta: i64,
    day: &str,
) -> redis::RedisResult<bool> {
    load_scripts(redis).await?;
    let mut days = std::collections::BTreeMap::new();
    if words_delta != 0 {
        days.insert(day.to_string(), words_delta);
    }
    let saved: i64 = save_cmd(session, version, cfg, &days, &[])
        .query_async(redis)
        .await?;
    Ok(saved == 1)
}

pub async fn baseline(
    redis: &mut ConnectionManager,
    user: &str,
    default: f64,
) -> redis::RedisResult<f64> {
    let v: Option<f64> = redis.get(baseline_key(user)).await?;
    Ok(v.filter(|b| b.is_finite() && *b > 0.0).unwrap_or(default))
}

/// Moves the writer's baseline toward this session's average WPM (exponential average).
pub async fn update_baseline(
    redis: &mut ConnectionManager,
    user: &str,
    session_wpm: f64,
    default: f64,
) -> redis::RedisResult<()> {
    if !(session_wpm.is_finite() && session_wpm > 0.0) {
        return Ok(());
    }
    let current = baseline(redis, user, default).await?;
    let next = current * 0.7 + session_wpm * 0.3;
    redis.set::<_, _, ()>(baseline_key(user), next).await
}

/// Active session ids of a user or project.
pub async fn active(
    redis: &mut ConnectionManager,
    set_key: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut ids: Vec<String> = redis.smembers(set_key).await?;
    ids.sort();
    Ok(ids)
}

/// The scheduler's queue: sessions by the time their next transition falls due, claimed with
/// a lease so that several scheduler instances never ask twice at once and a crashed one's
/// claims come back. The save script writes the same sorted set directly (a save reschedules
/// the session and ends any lease on it, as [`DueQueue::schedule`] does).
pub fn due_queue() -> DueQueue {
    DueQueue::new(DUE_KEY)
}
