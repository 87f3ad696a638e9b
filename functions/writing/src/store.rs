//! Where writing projections live in Redis.
//!
//! - `inkwire:writing:session:{id}`: the session (JSON), kept a day after it ends;
//! - `inkwire:writing:user:{u}:active`, `inkwire:writing:project:{p}:active`: open sessions;
//! - `inkwire:writing:due`: sorted set of sessions by the time their next time-driven
//!   transition falls due (the scheduler's queue);
//! - `inkwire:writing:user:{u}:days`, `inkwire:writing:project:{p}:days`: words per day;
//! - `inkwire:writing:user:{u}:baseline`: the writer's baseline WPM.
//!
//! Sessions are saved with an optimistic version check, so two tracker instances can never
//! overwrite each other's update.

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

/// A stored session and the version it was read at.
pub struct Loaded {
    pub session: Session,
    pub version: u64,
}

pub async fn load(redis: &mut ConnectionManager, id: &str) -> redis::RedisResult<Option<Loaded>> {
    let (json, version): (Option<String>, Option<u64>) = redis::pipe()
        .get(session_key(id))
        .hget(format!("{}:meta", session_key(id)), "version")
        .query_async(redis)
        .await?;
    Ok(json
        .and_then(|j| serde_json::from_str(&j).ok())
        .map(|session| Loaded {
            session,
            version: version.unwrap_or(0),
        }))
}

/// Saves `session` if nobody saved it since `version` was read; also maintains the active
/// sets, the due queue, and per-day word totals (a JSON object `{day: words}`).
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
  redis.call('ZREM', due, id)
else
  redis.call('SADD', KEYS[4], id) if KEYS[5] ~= '' then redis.call('SADD', KEYS[5], id) end
  if due_at > 0 then redis.call('ZADD', due, due_at, id) else redis.call('ZREM', due, id) end
end
for day, words in pairs(cjson.decode(ARGV[7])) do
  if words ~= 0 then
    redis.call('HINCRBY', KEYS[6], day, words)
    if KEYS[7] ~= '' then redis.call('HINCRBY', KEYS[7], day, words) end
  end
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

/// The save as one command (EVALSHA; call [`load_scripts`] first), answering 1 when saved and
/// 0 on a version conflict.
pub fn save_cmd(
    session: &Session,
    version: u64,
    cfg: &TrackerConfig,
    day_words: &std::collections::BTreeMap<String, i64>,
) -> redis::Cmd {
    let key = session_key(&session.id);
    let project = session.project_id.as_deref();
    let due_at = session.next_due(cfg).map_or(0, |(at, _, _)| at);
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(save_script().get_hash())
        .arg(7)
        .arg(&key)
        .arg(format!("{key}:meta"))
        .arg(DUE_KEY)
        .arg(user_active_key(&session.user_id))
        .arg(project.map(project_active_key).unwrap_or_default())
        .arg(user_days_key(&session.user_id))
        .arg(project.map(project_days_key).unwrap_or_default())
        .arg(version)
        .arg(serde_json::to_string(session).expect("sessions serialize"))
        .arg(&session.id)
        .arg(if session.state == SessionState::Ended {
            "1"
        } else {
            "0"
        })
        .arg(due_at)
        .arg(ENDED_TTL_SECS)
        .arg(serde_json::to_string(day_words).expect("maps serialize"));
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
    let saved: i64 = save_cmd(session, version, cfg, &days)
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

/// Claims up to `limit` sessions whose next transition is due at `now_ms`: their score is
/// pushed `lease_ms` ahead, so another scheduler instance does not take them meanwhile and
/// a crashed one's claims come back.
const CLAIM_DUE: &str = r#"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[3], id) end
return ids
"#;

pub async fn claim_due(
    redis: &mut ConnectionManager,
    now_ms: u64,
    limit: usize,
    lease_ms: u64,
) -> redis::RedisResult<Vec<String>> {
    redis::Script::new(CLAIM_DUE)
        .key(DUE_KEY)
        .arg(now_ms)
        .arg(limit)
        .arg(now_ms + lease_ms)
        .invoke_async(redis)
        .await
}
