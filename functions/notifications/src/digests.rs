//! Digests: the items waiting for one recipient's digest of one key in one window, the
//! due-queue entry that sends it, and the digest delivery job.
//!
//! A window is named by its start (`digest_schedule::window_start`), so every item and every
//! instance that computes the same due time names the same digest:
//! - items: `inkwire:notify:digest:{userId}:{key}:{windowStartMs}`, a HASH notification id →
//!   item JSON (title, body, createdAt, similarity key). Adding is idempotent per
//!   notification id (`HSETNX`);
//! - the due-queue member `digest:{userId}:{key}:{windowStartMs}` (the digest's job id too),
//!   scheduled at the due time if absent, in the same Lua step as the item is added.
//!
//! Exactly one digest per window: the scheduler closes the window before it builds the job
//! ([`close`]: one Lua step that marks the hash closed and returns its items), so an item
//! arriving later is refused ([`Added::Closed`]; the notifier puts it in the next window)
//! and every build of the window — a second instance after a lease ran out, a retry — reads
//! the same items and publishes the same job id, which JetStream stores once. Two keys have
//! two hashes and two job ids: never merged.
//!
//! The digest's muted count (similar notifications muted on other channels since the last
//! send, see `mute`) is taken once per window and kept in the hash beside the items
//! ([`take_muted_once`]), so a rebuild reports the same number.

use std::time::Duration;

use inkwire_shared::membership::is_valid_id;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::delivery_job::{Content, DeliveryJob, JobKind, digest_job_id};
use crate::model::DeliveryChannel;
use crate::mute;
use crate::templates::RenderedEmail;

/// How long a window's items are kept after its due time (a late rebuild still finds them).
pub const KEEP_AFTER_DUE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Hash fields that are not items (notification ids are UUIDs, never these).
const CLOSED_FIELD: &str = "~closed";
const MUTED_FIELD: &str = "~muted";

/// One recipient's digest of one key in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestWindow {
    /// Checked with `membership::is_valid_id`.
    pub user: String,
    /// A digest key ([`is_valid_key`]).
    pub key: String,
    /// Unix ms: the window's start (`digest_schedule::window_start`).
    pub start_ms: i64,
}

impl DigestWindow {
    /// `inkwire:notify:digest:{userId}:{key}:{windowStartMs}`.
    pub fn items_key(&self) -> String {
        format!(
            "inkwire:notify:digest:{}:{}:{}",
            self.user, self.key, self.start_ms
        )
    }

    /// The due-queue member of the digest: its job id,
    /// `digest:{userId}:{key}:{windowStartMs}`.
    pub fn member(&self) -> String {
        digest_job_id(&self.user, &self.key, self.start_ms)
    }

    /// The window of a due-queue member, every part checked (it comes from Redis, but names
    /// keys and subjects).
    pub fn parse_member(member: &str) -> Option<DigestWindow> {
        let rest = member.strip_prefix("digest:")?;
        let (user, rest) = rest.split_once(':')?;
        let (key, start) = rest.rsplit_once(':')?;
        let start_ms: i64 = start.parse().ok()?;
        (is_valid_id(user) && is_valid_key(key)).then(|| DigestWindow {
            user: user.to_string(),
            key: key.to_string(),
            start_ms,
        })
    }
}

/// A digest key: a category name, `category.groupKey` or `category.#hash`
/// (`routing::digest_key`).
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 140
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'#'))
}

/// One notification waiting in a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DigestItem {
    pub id: Uuid,
    pub title: String,
    pub body: String,
    /// Unix ms.
    pub created_ms: i64,
    /// Its auto-mute similarity key (the digest takes the muted count of each).
    pub similarity_key: String,
}

/// What adding an item did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Added now, or added before (a redelivery) to a window not yet sent.
    Open,
    /// It is in this window already and the window is closed (being sent or sent).
    AlreadySent,
    /// The window was closed before this item came: it belongs in a later one.
    Closed,
}

/// KEYS: items, due queue, the member's lease key. ARGV: id, json, keep seconds, due ms,
/// member. Adds the item and schedules the digest in one step, so that a window closed
/// meanwhile is never scheduled again. Returns added / present / present_closed / closed.
const ADD: &str = r#"
local closed = redis.call('HEXISTS', KEYS[1], '~closed') == 1
local present = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
if closed then
  if present then return 'present_closed' end
  return 'closed'
end
if not present then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
-- As DueQueue::schedule_if_absent: a member queued or claimed already stays as it is.
if redis.call('ZADD', KEYS[2], 'NX', ARGV[4], ARGV[5]) == 1 then
  redis.call('DEL', KEYS[3])
end
if present then return 'present' end
return 'added'
"#;
static ADD_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(ADD));

/// Adds `item` to the digest `window`, due at `due_ms`, and schedules the digest (once) in
/// `queue` — again after a redelivery, whose first handling may have stopped in between.
pub async fn add_item(
    redis: &mut ConnectionManager,
    queue: &inkwire_shared::due_queue::DueQueue,
    window: &DigestWindow,
    due_ms: i64,
    now_ms: i64,
    item: &DigestItem,
) -> redis::RedisResult<Added> {
    let keep = Duration::from_millis((due_ms - now_ms).max(0) as u64) + KEEP_AFTER_DUE;
    let member = window.member();
    let outcome: String = ADD_SCRIPT
        .key(window.items_key())
        .key(queue.key())
        .key(queue.lease_key(&member))
        .arg(item.id.to_string())
        .arg(serde_json::to_string(item).expect("digest items serialize"))
        .arg(keep.as_secs().max(1))
        .arg(due_ms.max(0))
        .arg(&member)
        .invoke_async(redis)
        .await?;
    Ok(match outcome.as_str() {
        "added" | "present" => Added::Open,
        "present_closed" => Added::AlreadySent,
        _ => Added::Closed,
    })
}

/// KEYS: items. Marks the window closed; returns every field and value.
const CLOSE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
redis.call('HSET', KEYS[1], '~closed', '1')
return redis.call('HGETALL', KEYS[1])
"#;
static CLOSE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLOSE));

/// Closes the window (module doc) and returns its items, oldest first, and the muted count
/// recorded by an earlier build (if any). An unknown (expired) window has no items.
pub async fn close(
    redis: &mut ConnectionManager,
    window: &DigestWindow,
) -> redis::RedisResult<(Vec<DigestItem>, Option<u32>)> {
    let flat: Vec<String> = CLOSE_SCRIPT
        .key(window.items_key())
        .invoke_async(redis)
        .await?;
    let mut items = Vec::new();
    let mut muted = None;
    for pair in flat.chunks(2) {
        let [field, value] = pair else { continue };
        match field.as_str() {
            CLOSED_FIELD => {}
            MUTED_FIELD => muted = value.parse().ok(),
            _ => match serde_json::from_str::<DigestItem>(value) {
                Ok(item) => items.push(item),
                Err(e) => tracing::error!(error = %e, field, "digest item does not parse; skipped"),
            },
        }
    }
    items.sort_by_key(|i| (i.created_ms, i.id));
    Ok((items, muted))
}

/// KEYS: items, muted counters… ARGV: none. The recorded count, or the sum of the counters
/// (taken and cleared), recorded.
const TAKE_ONCE: &str = r#"
local got = redis.call('HGET', KEYS[1], '~muted')
if got then return tonumber(got) end
local sum = 0
for i = 2, #KEYS do
  sum = sum + tonumber(redis.call('GET', KEYS[i]) or '0')
  redis.call('DEL', KEYS[i])
end
redis.call('HSET', KEYS[1], '~muted', sum)
return sum
"#;
static TAKE_ONCE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(TAKE_ONCE));

/// The window's muted count: taken from the items' similarity keys the first time, the same
/// number on every later call.
pub async fn take_muted_once(
    redis: &mut ConnectionManager,
    window: &DigestWindow,
    items: &[DigestItem],
) -> redis::RedisResult<u32> {
    let mut keys: Vec<String> = items
        .iter()
        .map(|i| mute::muted_key(&window.user, &i.similarity_key))
        .collect();
    keys.sort();
    keys.dedup();
    let script = &*TAKE_ONCE_SCRIPT;
    let mut script = script.prepare_invoke();
    script.key(window.items_key());
    for k in &keys {
        script.key(k);
    }
    let n: i64 = script.invoke_async(redis).await?;
    Ok(u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// `&`, `<`, `>`, `"` and `'` as HTML entities.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "N new notifications: {key}" ("1 new notification: {key}").
pub fn subject(count: usize, key: &str) -> String {
    if count == 1 {
        format!("1 new notification: {key}")
    } else {
        format!("{count} new notifications: {key}")
    }
}

/// The digest email job for `items` (non-empty, oldest first): subject
/// "N new notifications: {key}", a text list (`- title` then the body indented) and the same
/// as an HTML list with every item text escaped; the muted note (see `mute`) when
/// `muted_count` > 0.
pub fn build_job(window: &DigestWindow, items: &[DigestItem], muted_count: u32) -> DeliveryJob {
    let subject = subject(items.len(), &window.key);
    let mut text = format!("{subject}\n");
    let mut html = format!("<h1>{}</h1>\n<ul>\n", escape_html(&subject));
    for item in items {
        text.push_str(&format!("\n- {}\n", item.title));
        for line in item.body.lines() {
            text.push_str(&format!("  {line}\n"));
        }
        html.push_str(&format!(
            "<li><strong>{}</strong><br>{}</li>\n",
            escape_html(&item.title),
            escape_html(&item.body).replace('\n', "<br>")
        ));
    }
    html.push_str("</ul>");
    let mut content = Content {
        title: subject.clone(),
        body: text.trim_end().to_string(),
        email: Some(RenderedEmail {
            subject,
            html,
            text: text.trim_end().to_string(),
        }),
        sms: None,
        push: None,
    };
    mute::annotate(&mut content, muted_count);
    DeliveryJob {
        job_id: window.member(),
        channel: DeliveryChannel::Email,
        user_id: window.user.clone(),
        notification_ids: items.iter().map(|i| i.id).collect(),
        content,
        muted_count,
        kind: JobKind::Digest {
            key: window.key.clone(),
            window_start_ms: window.start_ms,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(i: i64, title: &str, body: &str) -> DigestItem {
        DigestItem {
            id: Uuid::from_u128(i as u128),
            title: title.into(),
            body: body.into(),
            created_ms: 1_000 + i,
            similarity_key: "chat/g".into(),
        }
    }

    fn window(user: &str, key: &str, start_ms: i64) -> DigestWindow {
        DigestWindow {
            user: user.into(),
            key: key.into(),
            start_ms,
        }
    }

    #[test]
    fn members_round_trip_and_are_checked() {
        let w = window("u-1", "collaboration.#00ff", 1_700_000_000_000);
        let m = w.member();
        assert_eq!(m, "digest:u-1:collaboration.#00ff:1700000000000");
        assert_eq!(
            w.items_key(),
            "inkwire:notify:digest:u-1:collaboration.#00ff:1700000000000"
        );
        assert_eq!(DigestWindow::parse_member(&m), Some(w));
        assert_eq!(
            DigestWindow::parse_member("digest:u-1:chat.thread-9:5"),
            Some(window("u-1", "chat.thread-9", 5))
        );
        for bad in [
            "digest:u-1:chat",
            "digest::chat:5",
            "digest:u 1:chat:5",
            "digest:u-1:ch at:5",
            "digest:u-1:chat:x",
            "held:u-1:chat:5",
        ] {
            assert_eq!(DigestWindow::parse_member(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_job_lists_every_item_escaped() {
        let items = [
            item(1, "Ann <b>replied</b>", "a & b\nsecond line"),
            item(2, "Bob's note", "\"quoted\""),
        ];
        let job = build_job(&window("u-1", "chat", 42), &items, 0);
        assert_eq!(job.job_id, "digest:u-1:chat:42");
        assert_eq!(job.channel, DeliveryChannel::Email);
        assert_eq!(job.notification_ids, vec![items[0].id, items[1].id]);
        assert_eq!(
            job.kind,
            JobKind::Digest {
                key: "chat".into(),
                window_start_ms: 42
            }
        );
        let email = job.content.email.as_ref().unwrap();
        assert_eq!(email.subject, "2 new notifications: chat");
        assert_eq!(job.content.title, email.subject);
        assert_eq!(
            email.text,
            "2 new notifications: chat\n\n- Ann <b>replied</b>\n  a & b\n  second line\n\n- Bob's note\n  \"quoted\""
        );
        assert!(email.html.contains(
            "<li><strong>Ann &lt;b&gt;replied&lt;/b&gt;</strong><br>a &amp; b<br>second line</li>"
        ));
        assert!(
            email
                .html
                .contains("<li><strong>Bob&#39;s note</strong><br>&quot;quoted&quot;</li>")
        );
        assert!(!email.html.contains("<b>"));
        assert_eq!(job.muted_count, 0);
        assert_eq!(subject(1, "k"), "1 new notification: k");
    }

    #[test]
    fn the_muted_count_is_said() {
        let job = build_job(&window("u-1", "chat", 42), &[item(1, "t", "b")], 3);
        assert_eq!(job.muted_count, 3);
        let email = job.content.email.unwrap();
        assert!(email.text.ends_with("3 similar notifications were muted"));
        assert!(
            email
                .html
                .ends_with("<p>3 similar notifications were muted</p>")
        );
    }
}
