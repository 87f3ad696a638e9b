//! Where activity comes from: one row per source (a stream and a subject filter, read in
//! order by its own durable consumer), and how a message of that source becomes an
//! [`Activity`] — a user id, a type, a time and the ids of the project, document or room,
//! never text or other personal data.
//!
//! Adding a source is one row in [`sources`]. Workflow runs are read from the
//! `EVENTS_AUTOMATION` category stream (`workflow_started` / `_completed` / `_failed`, the
//! envelope's `userId` being whoever the run acts for); a dedicated workflow-engine stream,
//! when one exists, is another row.

use inkwire_shared::channels::{self, Channel, ChannelKind};
use inkwire_shared::consumer::Delivery;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::membership::is_valid_id;
use inkwire_shared::subjects;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// What a user did, as the log and the statistics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    WritingSessionStarted,
    WritingSessionEnded,
    Edit,
    Comment,
    ChatMessage,
    NotificationsRead,
    WorkflowStarted,
    WorkflowCompleted,
    WorkflowFailed,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::WritingSessionStarted,
        Kind::WritingSessionEnded,
        Kind::Edit,
        Kind::Comment,
        Kind::ChatMessage,
        Kind::NotificationsRead,
        Kind::WorkflowStarted,
        Kind::WorkflowCompleted,
        Kind::WorkflowFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WritingSessionStarted => "writing_session_started",
            Kind::WritingSessionEnded => "writing_session_ended",
            Kind::Edit => "edit",
            Kind::Comment => "comment",
            Kind::ChatMessage => "chat_message",
            Kind::NotificationsRead => "notifications_read",
            Kind::WorkflowStarted => "workflow_started",
            Kind::WorkflowCompleted => "workflow_completed",
            Kind::WorkflowFailed => "workflow_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The names of every kind, for error messages.
    pub fn names() -> String {
        Kind::ALL.map(Kind::as_str).join(", ")
    }
}

/// One entry of a user's log. Ids only: nothing a message, comment or notification said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub user: String,
    pub kind: Kind,
    /// When it happened (ms since the epoch).
    pub at_ms: u64,
    pub project: Option<String>,
    pub document: Option<String>,
    pub room: Option<String>,
}

/// What a source made of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    Record(Activity),
    /// Not activity (another event type, a chat edit, a push that is not a read).
    Skip,
    /// Malformed: dead-lettered.
    Bad(String),
}

/// How far an event's own time may be from the time JetStream stored it before the stored
/// time is used instead (`INKWIRE_MAX_EVENT_AGE` back, `INKWIRE_MAX_CLOCK_SKEW` ahead: what
/// the events API accepts). A publisher's clock does not move activity between days.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub max_age_ms: u64,
    pub max_skew_ms: u64,
}

/// A source of activity.
#[derive(Debug, Clone)]
pub struct Source {
    /// Short name: the durable consumer is `activity-{name}`, the high-water mark and entry
    /// ids use it. Letters, digits and '-' only.
    pub name: &'static str,
    pub stream: String,
    pub filter: String,
    pub read: fn(&Delivery, Clock) -> Read,
}

/// Every source, one row each.
pub fn sources() -> Vec<Source> {
    let event = |c: Category, t: &str| subjects::event_subject(c, t);
    vec![
        Source {
            name: "writing-started",
            stream: subjects::event_stream(Category::Writing),
            filter: event(Category::Writing, "session_started"),
            read: |d, c| envelope(d, c, |_| Some(Kind::WritingSessionStarted)),
        },
        Source {
            name: "writing-ended",
            stream: subjects::event_stream(Category::Writing),
            filter: event(Category::Writing, "session_ended"),
            read: |d, c| envelope(d, c, |_| Some(Kind::WritingSessionEnded)),
        },
        Source {
            name: "edits",
            stream: subjects::event_stream(Category::Collaboration),
            filter: event(Category::Collaboration, "edit_applied"),
            read: |d, c| envelope(d, c, |_| Some(Kind::Edit)),
        },
        Source {
            name: "comments",
            stream: subjects::event_stream(Category::Collaboration),
            filter: event(Category::Collaboration, "comment_added"),
            read: |d, c| envelope(d, c, |_| Some(Kind::Comment)),
        },
        Source {
            name: "chat",
            stream: subjects::CHAT_STREAM.to_string(),
            filter: format!("{}.>", subjects::CHAT_PREFIX),
            read: chat_message,
        },
        Source {
            name: "notifications-read",
            stream: channels::RELAY_STREAM.to_string(),
            filter: format!(
                "{}.{}.*",
                channels::RELAY_PREFIX,
                ChannelKind::User.as_str()
            ),
            read: notifications_read,
        },
        Source {
            name: "workflows",
            stream: subjects::event_stream(Category::Automation),
            filter: format!("{}.{}.>", subjects::EVENTS_PREFIX, Category::Automation),
            read: |d, c| {
                envelope(d, c, |t| match t {
                    "workflow_started" => Some(Kind::WorkflowStarted),
                    "workflow_completed" => Some(Kind::WorkflowCompleted),
                    "workflow_failed" => Some(Kind::WorkflowFailed),
                    _ => None,
                })
            },
        },
    ]
}

fn ms(t: OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

/// `claimed` if it is within the clock window around the stored time, else the stored time.
fn trusted(claimed: Option<OffsetDateTime>, d: &Delivery, clock: Clock) -> u64 {
    let stored = d.published.map(ms);
    match (claimed.map(ms), stored) {
        (Some(c), Some(s)) => {
            if c.saturating_add(clock.max_age_ms) < s || c > s.saturating_add(clock.max_skew_ms) {
                s
            } else {
                c
            }
        }
        (Some(c), None) => c,
        (None, Some(s)) => s,
        (None, None) => ms(OffsetDateTime::now_utc()),
    }
}

/// An id worth keeping: valid ones only (they become parts of keys and answers).
fn kept_id(id: Option<&str>) -> Option<String> {
    id.filter(|i| is_valid_id(i)).map(str::to_string)
}

/// A domain event (the shared envelope): its `userId`, `projectId`, `documentId` and time.
/// `data` is never looked at, so a comment's text cannot reach the log.
fn envelope(d: &Delivery, clock: Clock, kind: impl Fn(&str) -> Option<Kind>) -> Read {
    let event: Event = match serde_json::from_slice(&d.payload) {
        Ok(e) => e,
        Err(e) => return Read::Bad(format!("not an event: {e}")),
    };
    let Some(kind) = kind(&event.event_type) else {
        return Read::Skip;
    };
    if !is_valid_id(&event.user_id) {
        // Ids become parts of keys; an event by nobody we can name is not anyone's activity.
        return Read::Skip;
    }
    Read::Record(Activity {
        at_ms: trusted(Some(event.timestamp), d, clock),
        user: event.user_id,
        kind,
        project: kept_id(event.project_id.as_deref()),
        document: kept_id(event.document_id.as_deref()),
        room: None,
    })
}

fn rfc3339(v: &Value) -> Option<OffsetDateTime> {
    v.as_str()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
}

/// A record of the `CHAT` stream: a new message counts for its sender (edits and tombstones
/// are not new activity). The text is not read.
fn chat_message(d: &Delivery, clock: Clock) -> Read {
    let record: Value = match serde_json::from_slice(&d.payload) {
        Ok(v) => v,
        Err(e) => return Read::Bad(format!("not a chat record: {e}")),
    };
    if record["kind"] != "message" {
        return Read::Skip;
    }
    let m = &record["message"];
    let Some(user) = kept_id(m["senderId"].as_str()) else {
        return Read::Skip;
    };
    Read::Record(Activity {
        user,
        kind: Kind::ChatMessage,
        at_ms: trusted(rfc3339(&m["sentAt"]), d, clock),
        project: None,
        document: None,
        room: kept_id(m["roomId"].as_str()),
    })
}

/// A push to `user:{id}` in the `RELAY` stream: the inbox's `notifications_read` (one per
/// inbox version, so a repeated mark is one push). Which notifications were read is not kept.
fn notifications_read(d: &Delivery, clock: Clock) -> Read {
    let Some(channel) = Channel::from_subject(&d.subject) else {
        return Read::Skip;
    };
    if channel.kind != ChannelKind::User {
        return Read::Skip;
    }
    let msg: Value = match serde_json::from_slice(&d.payload) {
        Ok(v) => v,
        Err(e) => return Read::Bad(format!("not a channel message: {e}")),
    };
    if msg["type"] != "notification" || msg["data"]["event"] != "notifications_read" {
        return Read::Skip;
    }
    Read::Record(Activity {
        user: channel.id,
        kind: Kind::NotificationsRead,
        at_ms: trusted(rfc3339(&msg["ts"]), d, clock),
        project: None,
        document: None,
        room: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const CLOCK: Clock = Clock {
        max_age_ms: 24 * 3600 * 1000,
        max_skew_ms: 300_000,
    };

    fn delivery(subject: &str, payload: Value) -> Delivery {
        Delivery {
            subject: subject.into(),
            payload: Bytes::from(payload.to_string()),
            stream_sequence: 1,
            deliveries: 1,
            published: Some(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()),
        }
    }

    fn source(name: &str) -> Source {
        sources().into_iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn names_are_unique_and_safe() {
        let all = sources();
        let mut names: Vec<&str> = all.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for n in names {
            assert!(
                n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{n}"
            );
        }
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
    }

    #[test]
    fn comments_keep_ids_and_time_but_never_text() {
        let d = delivery(
            "events.collaboration.comment_added",
            serde_json::json!({"id": "0191f2a4-5b6c-7d8e-9f00-112233445566", "category": "collaboration",
                "type": "comment_added", "userId": "u-1", "projectId": "p-1", "documentId": "bad.id",
                "timestamp": "2027-01-15T08:00:00Z", "data": {"commentId": "c", "text": "SECRET"}}),
        );
        let Read::Record(a) = (source("comments").read)(&d, CLOCK) else {
            panic!("not recorded");
        };
        assert_eq!(a.kind, Kind::Comment);
        assert_eq!(a.project.as_deref(), Some("p-1"));
        assert_eq!(a.document, None, "an invalid id is dropped");
        assert_eq!(a.at_ms, 1_800_000_000_000);
        assert!(!format!("{a:?}").contains("SECRET"));
    }

    #[test]
    fn event_times_outside_the_window_are_replaced_by_the_stored_time() {
        let stored = 1_800_000_000_000u64;
        let at = |ts: &str| {
            let d = delivery(
                "events.writing.session_started",
                serde_json::json!({"id": "0191f2a4-5b6c-7d8e-9f00-112233445566", "category": "writing",
                    "type": "session_started", "userId": "u-1", "timestamp": ts, "data": {"sessionId": "s"}}),
            );
            match (source("writing-started").read)(&d, CLOCK) {
                Read::Record(a) => a.at_ms,
                other => panic!("{other:?}"),
            }
        };
        // 1_800_000_000 s is 2027-01-15T08:00:00Z.
        assert_eq!(at("2027-01-15T02:00:00Z"), stored - 6 * 3_600_000);
        assert_eq!(at("2027-01-10T08:00:00Z"), stored, "older than max age");
        assert_eq!(
            at("2027-01-15T09:00:00Z"),
            stored,
            "ahead by more than the skew"
        );
    }

    #[test]
    fn chat_edits_and_other_pushes_are_not_activity() {
        let chat = source("chat");
        let msg = |kind: &str| {
            delivery(
                "chat.r-1",
                serde_json::json!({"kind": kind, "message": {"roomId": "r-1", "senderId": "u-2",
                    "text": "hello", "sentAt": "2027-01-15T07:59:00Z", "seq": 1}}),
            )
        };
        match (chat.read)(&msg("message"), CLOCK) {
            Read::Record(a) => {
                assert_eq!(
                    (a.user.as_str(), a.kind, a.room.as_deref()),
                    ("u-2", Kind::ChatMessage, Some("r-1"))
                );
                assert_eq!(a.at_ms, 1_800_000_000_000 - 60_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((chat.read)(&msg("edit"), CLOCK), Read::Skip);
        let reads = source("notifications-read");
        let push = |event: &str| {
            delivery(
                "rt.user.u-3",
                serde_json::json!({"type": "notification", "data": {"event": event, "ids": []},
                    "ts": "2027-01-15T08:00:00Z"}),
            )
        };
        assert!(
            matches!((reads.read)(&push("notifications_read"), CLOCK), Read::Record(a) if a.user == "u-3")
        );
        assert_eq!((reads.read)(&push("notification_new"), CLOCK), Read::Skip);
        assert!(matches!(
            (reads.read)(&delivery("rt.user.u-3", Value::Null), CLOCK),
            Read::Skip
        ));
        assert!(matches!(
            (source("workflows").read)(
                &delivery("events.automation.x", serde_json::json!("x")),
                CLOCK
            ),
            Read::Bad(_)
        ));
    }
}
