//! Auto-mute state in Redis: per recipient and similarity key, "a similar notification was
//! sent at T" (expiring with the recipient's mute window) and how many similar ones were
//! muted since the last one sent. The check and the record are one Lua step, so of two
//! similar notifications handled at the same moment exactly one is sent.
//!
//! Keys (the similarity key is free text — a group key, a template name or a title hash —
//! so it enters key names only as its SHA-256, hex):
//! - `inkwire:notify:mute:{userId}:{sha256(similarityKey)}` — the time of the last one sent,
//!   in ms; expires after the mute window;
//! - `inkwire:notify:mute:{userId}:{sha256(similarityKey)}:muted` — similar ones muted since
//!   that send ([`COUNT_KEEP`] after the last change). The next one sent after the window
//!   takes the count (its delivery job carries it as `mutedCount`), and so does a digest
//!   holding an item of that key ([`take_muted`]), whichever comes first;
//! - `inkwire:notify:mutedecision:{notificationId}` — the decision taken for one notification
//!   (`muted`, or `send:{count}`), kept [`DECISION_KEEP`], so that a redelivered notification
//!   gets the same answer instead of being muted by its own earlier send.
//!
//! What the recipient reads ([`annotate`]): a job with `mutedCount` N > 0 says
//! "N similar notifications were muted" ("1 similar notification was muted" for one) — a
//! paragraph after the body: `"\n\n" + note` appended to `body`, to the email's `text`, and
//! `"<p>" + note + "</p>"` to its `html`; `"\n" + note` appended to the SMS text and to the
//! push body. A channel part that is absent falls back to `body`, which carries it too.

use std::time::Duration;

use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::delivery_job::Content;

/// How long a muted count waits for the next one sent (or a digest) to report it.
pub const COUNT_KEEP: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the decision for one notification is kept (longer than any redelivery).
pub const DECISION_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// The SHA-256 of a similarity key, hex.
pub fn hash(similarity_key: &str) -> String {
    Sha256::digest(similarity_key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `inkwire:notify:mute:{userId}:{hash}` (`user` already checked).
pub fn state_key(user: &str, similarity_key: &str) -> String {
    format!("inkwire:notify:mute:{user}:{}", hash(similarity_key))
}

/// `inkwire:notify:mute:{userId}:{hash}:muted`.
pub fn muted_key(user: &str, similarity_key: &str) -> String {
    format!("{}:muted", state_key(user, similarity_key))
}

/// `inkwire:notify:mutedecision:{notificationId}`.
pub fn decision_key(id: Uuid) -> String {
    format!("inkwire:notify:mutedecision:{id}")
}

/// What the mute check decided for one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuteDecision {
    /// Send it; it reports `muted_count` similar ones muted before it.
    Send { muted_count: u32 },
    /// A similar one was sent within the window: do not send it on external channels.
    Muted,
}

/// KEYS: decision, state, muted. ARGV: now ms, window ms, count keep s, decision keep s.
/// Returns `muted` or `send:{count}`.
const CHECK_AND_RECORD: &str = r#"
local d = redis.call('GET', KEYS[1])
if d then return d end
local out
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  out = 'muted'
else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  local c = redis.call('GET', KEYS[3]) or '0'
  redis.call('DEL', KEYS[3])
  out = 'send:' .. c
end
redis.call('SET', KEYS[1], out, 'EX', ARGV[4])
return out
"#;

static CHECK_AND_RECORD_SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();

fn parse_decision(raw: &str) -> Option<MuteDecision> {
    match raw {
        "muted" => Some(MuteDecision::Muted),
        _ => raw
            .strip_prefix("send:")
            .and_then(|c| c.parse().ok())
            .map(|muted_count| MuteDecision::Send { muted_count }),
    }
}

/// Decides, once per notification `id`, whether `user`'s notification of `similarity_key`
/// is sent or muted (`window` > 0), and records it: a send starts a new window and takes the
/// muted count; a mute adds one to it. A second call for the same `id` answers the first
/// decision and changes nothing.
pub async fn check_and_record(
    redis: &mut ConnectionManager,
    id: Uuid,
    user: &str,
    similarity_key: &str,
    window: Duration,
    now_ms: u64,
) -> redis::RedisResult<MuteDecision> {
    let raw: String = CHECK_AND_RECORD_SCRIPT
        .get_or_init(|| redis::Script::new(CHECK_AND_RECORD))
        .key(decision_key(id))
        .key(state_key(user, similarity_key))
        .key(muted_key(user, similarity_key))
        .arg(now_ms)
        .arg(window.as_millis().max(1) as u64)
        .arg(COUNT_KEEP.as_secs())
        .arg(DECISION_KEEP.as_secs())
        .invoke_async(redis)
        .await?;
    parse_decision(&raw).ok_or_else(|| {
        redis::RedisError::from((redis::ErrorKind::Parse, "mute decision does not parse", raw))
    })
}

/// KEYS: muted counters. Returns their sum and deletes them.
const TAKE: &str = r#"
local sum = 0
for _, k in ipairs(KEYS) do
  sum = sum + tonumber(redis.call('GET', k) or '0')
  redis.call('DEL', k)
end
return sum
"#;
static TAKE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TAKE));

/// Takes (reads and clears) the muted counts of `user`'s similarity keys, summed. Callers
/// that must not take twice record the result (a digest keeps it with its items).
pub async fn take_muted(
    redis: &mut ConnectionManager,
    user: &str,
    similarity_keys: &[String],
) -> redis::RedisResult<u32> {
    if similarity_keys.is_empty() {
        return Ok(0);
    }
    let script = &*TAKE_SCRIPT;
    let mut script = script.prepare_invoke();
    for k in similarity_keys {
        script.key(muted_key(user, k));
    }
    let sum: i64 = script.invoke_async(redis).await?;
    Ok(u32::try_from(sum.max(0)).unwrap_or(u32::MAX))
}

/// "N similar notifications were muted".
pub fn note(muted_count: u32) -> String {
    if muted_count == 1 {
        "1 similar notification was muted".to_string()
    } else {
        format!("{muted_count} similar notifications were muted")
    }
}

/// Adds the muted note to every part of `content` (module doc); nothing when `muted_count`
/// is 0.
pub fn annotate(content: &mut Content, muted_count: u32) {
    if muted_count == 0 {
        return;
    }
    let note = note(muted_count);
    content.body = format!("{}\n\n{note}", content.body);
    if let Some(email) = &mut content.email {
        email.text = format!("{}\n\n{note}", email.text);
        email.html = format!("{}<p>{note}</p>", email.html);
    }
    if let Some(sms) = &mut content.sms {
        *sms = format!("{sms}\n{note}");
    }
    if let Some(push) = &mut content.push {
        push.body = format!("{}\n{note}", push.body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::send::PushPayload;
    use crate::templates::RenderedEmail;

    #[test]
    fn keys_hash_the_similarity_key() {
        let k = state_key("u-1", "chat/h:abc def");
        assert!(k.starts_with("inkwire:notify:mute:u-1:"));
        let h = k.rsplit(':').next().unwrap();
        assert_eq!(h.len(), 64);
        assert!(h.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(state_key("u-1", "a"), state_key("u-1", "b"));
        assert_eq!(
            muted_key("u-1", "a"),
            format!("{}:muted", state_key("u-1", "a"))
        );
    }

    #[test]
    fn decisions_parse() {
        assert_eq!(parse_decision("muted"), Some(MuteDecision::Muted));
        assert_eq!(
            parse_decision("send:3"),
            Some(MuteDecision::Send { muted_count: 3 })
        );
        assert_eq!(parse_decision("send:x"), None);
        assert_eq!(parse_decision(""), None);
    }

    #[test]
    fn the_note_is_in_every_part() {
        let mut c = Content {
            title: "T".into(),
            body: "B".into(),
            email: Some(RenderedEmail {
                subject: "S".into(),
                html: "<p>H</p>".into(),
                text: "X".into(),
            }),
            sms: Some("M".into()),
            push: Some(PushPayload {
                title: "PT".into(),
                body: "PB".into(),
                data: serde_json::json!({}),
            }),
        };
        let plain = c.clone();
        annotate(&mut c, 0);
        assert_eq!(c, plain);
        annotate(&mut c, 2);
        assert_eq!(c.body, "B\n\n2 similar notifications were muted");
        let email = c.email.as_ref().unwrap();
        assert_eq!(email.text, "X\n\n2 similar notifications were muted");
        assert_eq!(
            email.html,
            "<p>H</p><p>2 similar notifications were muted</p>"
        );
        assert_eq!(email.subject, "S");
        assert_eq!(
            c.sms.as_deref(),
            Some("M\n2 similar notifications were muted")
        );
        assert_eq!(
            c.push.as_ref().unwrap().body,
            "PB\n2 similar notifications were muted"
        );
        assert_eq!(note(1), "1 similar notification was muted");
    }
}
