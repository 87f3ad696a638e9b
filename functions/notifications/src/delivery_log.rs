//! The delivery log: per notification, one record per channel
//! (`inkwire:notify:deliveries:{notificationId}`, a HASH channel → JSON) with its status,
//! attempts, provider message id, last error, times and a short history.
//!
//! The notifier and the delivery workers write it with [`record`]; the deliveries route reads
//! it with [`read`]. A final status (`sent`, `failed`, `muted`, …) is never replaced — the
//! check and the write are one Lua script — so a late or duplicate delivery cannot turn `sent`
//! back into `queued`.

use std::time::Duration;

use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{DeliveryChannel, DeliveryStatus};

/// History entries kept per channel (the oldest are dropped).
pub const HISTORY_CAP: usize = 20;
/// How long a delivery log is kept after its last change.
pub const KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest error text kept, in characters.
pub const MAX_ERROR_CHARS: usize = 1_000;

pub fn key(notification_id: Uuid) -> String {
    format!("inkwire:notify:deliveries:{notification_id}")
}

/// What one attempt reports besides its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptInfo {
    /// Attempts made so far (`None` keeps the recorded number).
    pub attempts: Option<u32>,
    pub provider_message_id: Option<String>,
    pub error: Option<String>,
}

/// One entry of a record's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub status: DeliveryStatus,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One channel's record, as stored and as the deliveries route shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRecord {
    pub channel: DeliveryChannel,
    pub status: DeliveryStatus,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub queued_at: String,
    pub updated_at: String,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

/// KEYS: deliveries:{id}. ARGV: channel, status, now, attempts ('' keeps), provider id ('' keeps),
/// error ('' none), history cap, final statuses (',a,b,'), keep seconds.
/// Returns {applied, record json}.
const RECORD: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local rec
if cur then
  rec = cjson.decode(cur)
  if string.find(ARGV[8], ',' .. rec.status .. ',', 1, true) then return {0, cur} end
else
  rec = {channel = ARGV[1], attempts = 0, queuedAt = ARGV[3], history = {}}
end
rec.status = ARGV[2]
rec.updatedAt = ARGV[3]
if ARGV[4] ~= '' then rec.attempts = tonumber(ARGV[4]) end
if ARGV[5] ~= '' then rec.providerMessageId = ARGV[5] end
local entry = {status = ARGV[2], at = ARGV[3]}
if ARGV[6] ~= '' then
  rec.error = ARGV[6]
  entry.error = ARGV[6]
else
  rec.error = nil
end
local history = rec.history
if type(history) ~= 'table' then history = {} end
table.insert(history, entry)
while #history > tonumber(ARGV[7]) do table.remove(history, 1) end
rec.history = history
local out = cjson.encode(rec)
redis.call('HSET', KEYS[1], ARGV[1], out)
redis.call('EXPIRE', KEYS[1], ARGV[9])
return {1, out}
"#;
static RECORD_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RECORD));

fn final_statuses() -> String {
    use DeliveryStatus::*;
    let all = [
        Queued,
        HeldQuietHours,
        Digested,
        Muted,
        SkippedPreference,
        SkippedNoAddress,
        Sent,
        Failed,
        Cancelled,
    ];
    let names: Vec<&str> = all
        .into_iter()
        .filter(|s| s.is_final())
        .map(DeliveryStatus::as_str)
        .collect();
    format!(",{},", names.join(","))
}

/// Records `status` for `channel` of notification `id`. Returns whether it was applied (false:
/// the channel already has a final status, which stays) and the record as it now is.
pub async fn record(
    redis: &mut ConnectionManager,
    id: Uuid,
    channel: DeliveryChannel,
    status: DeliveryStatus,
    info: &AttemptInfo,
) -> redis::RedisResult<(bool, DeliveryRecord)> {
    let mut invocation = RECORD_SCRIPT.key(key(id));
    for arg in record_args(channel, status, info) {
        invocation.arg(arg);
    }
    let (applied, json): (i64, String) = invocation.invoke_async(redis).await?;
    let record = parse_record(&json).ok_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::Parse, "delivery record does not parse"))
    })?;
    Ok((applied == 1, record))
}

/// The arguments of the record script.
fn record_args(
    channel: DeliveryChannel,
    status: DeliveryStatus,
    info: &AttemptInfo,
) -> Vec<String> {
    let now = crate::send::rfc3339(OffsetDateTime::now_utc());
    let error: String = info
        .error
        .as_deref()
        .map(|e| inkwire_shared::problem::clip(e, MAX_ERROR_CHARS).into_owned())
        .unwrap_or_default();
    vec![
        channel.as_str().to_string(),
        status.as_str().to_string(),
        now,
        info.attempts.map(|a| a.to_string()).unwrap_or_default(),
        info.provider_message_id.clone().unwrap_or_default(),
        error,
        HISTORY_CAP.to_string(),
        final_statuses(),
        KEEP.as_secs().to_string(),
    ]
}

/// [`record`] as one command of a pipeline (`EVALSHA`: the caller loads [`load_scripts`]
/// and sends again when Redis answers `NOSCRIPT`); its answer is not needed.
pub fn record_cmd(
    id: Uuid,
    channel: DeliveryChannel,
    status: DeliveryStatus,
    info: &AttemptInfo,
) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(RECORD_SCRIPT.get_hash()).arg(1).arg(key(id));
    for arg in record_args(channel, status, info) {
        cmd.arg(arg);
    }
    cmd
}

/// Loads the script [`record_cmd`] names.
pub async fn load_scripts(redis: &mut ConnectionManager) -> redis::RedisResult<()> {
    RECORD_SCRIPT.load_async(redis).await.map(|_| ())
}

/// Lua's cjson writes an empty array as `{}`; every record has at least one history entry,
/// but read defensively.
fn parse_record(json: &str) -> Option<DeliveryRecord> {
    let mut v: serde_json::Value = serde_json::from_str(json).ok()?;
    if v.get("history")
        .is_some_and(|h| h.as_object().is_some_and(|o| o.is_empty()))
    {
        v["history"] = serde_json::json!([]);
    }
    serde_json::from_value(v).ok()
}

/// Every channel's record of notification `id`, in channel order (in_app, email, sms, push).
pub async fn read(
    redis: &mut ConnectionManager,
    id: Uuid,
) -> redis::RedisResult<Vec<DeliveryRecord>> {
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key(id))
        .query_async(redis)
        .await?;
    let mut out: Vec<DeliveryRecord> = all
        .iter()
        .filter_map(|(_, json)| parse_record(json))
        .collect();
    out.sort_by_key(|r| r.channel);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_statuses_are_listed_for_the_script() {
        let f = final_statuses();
        for s in [
            "sent",
            "failed",
            "muted",
            "cancelled",
            "skipped_preference",
            "skipped_no_address",
        ] {
            assert!(f.contains(&format!(",{s},")), "{f}");
        }
        for s in ["queued", "held_quiet_hours", "digested"] {
            assert!(!f.contains(&format!(",{s},")), "{f}");
        }
    }

    #[test]
    fn records_parse_with_an_empty_history_object() {
        let r = parse_record(
            r#"{"channel":"email","status":"queued","attempts":0,"queuedAt":"t","updatedAt":"t","history":{}}"#,
        )
        .unwrap();
        assert!(r.history.is_empty());
        assert_eq!(r.channel, DeliveryChannel::Email);
    }
}
