//! Relay channels (`user:{id}`, `project:{id}`, `document:{id}`, `category:{name}`,
//! `room:{id}`), their subjects, and publishing a message to one.
//!
//! A channel `project:p1` is stored on subject `rt.project.p1` of the `RELAY` stream, which
//! republishes every message to `live.rt.project.p1` with its stream sequence in the
//! `Nats-Sequence` header. That sequence is the message's position: what a client passes as
//! `since` to recover what it missed. Any function may publish to a channel; the relay
//! delivers it to the entitled subscribers.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::events::Category;
use crate::jetstream::{Outgoing, Published};
use crate::membership::is_valid_id;

/// What kind of audience a channel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    User,
    Project,
    Document,
    Category,
    Room,
}

impl ChannelKind {
    pub const ALL: [ChannelKind; 5] = [
        ChannelKind::User,
        ChannelKind::Project,
        ChannelKind::Document,
        ChannelKind::Category,
        ChannelKind::Room,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::User => "user",
            ChannelKind::Project => "project",
            ChannelKind::Document => "document",
            ChannelKind::Category => "category",
            ChannelKind::Room => "room",
        }
    }
}

/// A parsed, valid channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Channel {
    pub kind: ChannelKind,
    pub id: String,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel must look like kind:id, e.g. project:p-1")]
    Syntax,
    #[error("unknown channel kind {0:?}; known: user, project, document, category, room")]
    UnknownKind(String),
    #[error("channel id {0:?} must be 1-64 characters of letters, digits, '_' or '-'")]
    BadId(String),
    #[error("unknown event category {0:?}")]
    UnknownCategory(String),
}

impl Channel {
    pub fn new(kind: ChannelKind, id: impl Into<String>) -> Channel {
        Channel {
            kind,
            id: id.into(),
        }
    }

    pub fn parse(name: &str) -> Result<Channel, ChannelError> {
        let (kind, id) = name.split_once(':').ok_or(ChannelError::Syntax)?;
        let kind = ChannelKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| ChannelError::UnknownKind(kind.to_string()))?;
        if !is_valid_id(id) {
            return Err(ChannelError::BadId(id.to_string()));
        }
        if kind == ChannelKind::Category && id.parse::<Category>().is_err() {
            return Err(ChannelError::UnknownCategory(id.to_string()));
        }
        Ok(Channel::new(kind, id))
    }

    /// `rt.project.p1`: the subject the RELAY stream stores it on.
    pub fn subject(&self) -> String {
        format!("{}.{}.{}", RELAY_PREFIX, self.kind.as_str(), self.id)
    }

    /// `live.rt.project.p1`: where the stream republishes it for relay instances.
    pub fn live_subject(&self) -> String {
        format!("{LIVE_PREFIX}.{}", self.subject())
    }

    /// The channel a `rt.<kind>.<id>` subject belongs to.
    pub fn from_subject(subject: &str) -> Option<Channel> {
        let rest = subject
            .strip_prefix(LIVE_PREFIX)
            .and_then(|s| s.strip_prefix('.'))
            .unwrap_or(subject);
        let rest = rest.strip_prefix(RELAY_PREFIX)?.strip_prefix('.')?;
        let (kind, id) = rest.split_once('.')?;
        Channel::parse(&format!("{kind}:{id}")).ok()
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.id)
    }
}

/// Stream that keeps recent channel messages for recovery.
pub const RELAY_STREAM: &str = "RELAY";
/// Subject prefix of stored channel messages.
pub const RELAY_PREFIX: &str = "rt";
/// Prefix the stream republishes to.
pub const LIVE_PREFIX: &str = "live";

/// The kinds of message a client can receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    System,
    UserMessage,
    DocumentUpdate,
    PresenceUpdate,
    RoomUpdate,
    Notification,
    Error,
    /// A closed analytics bucket's changed series (`functions/analytics`).
    MetricsUpdate,
    /// A workflow run's or step's progress (`functions/workflows`).
    WorkflowUpdate,
}

impl MessageType {
    pub const ALL: [MessageType; 9] = [
        MessageType::System,
        MessageType::UserMessage,
        MessageType::DocumentUpdate,
        MessageType::PresenceUpdate,
        MessageType::RoomUpdate,
        MessageType::Notification,
        MessageType::Error,
        MessageType::MetricsUpdate,
        MessageType::WorkflowUpdate,
    ];
}

/// The payload stored in the RELAY stream: `{"type", "data", "ts"}`. The relay adds
/// `op`, `channel` and `seq` when it delivers it.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelMessage<'a> {
    #[serde(rename = "type")]
    pub message_type: MessageType,
    pub data: &'a Value,
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
}

/// The message to publish to `channel` (for batched publishing with
/// [`crate::jetstream::publish_windowed`]).
pub fn outgoing(
    channel: &Channel,
    message_type: MessageType,
    data: &Value,
    msg_id: String,
) -> Outgoing {
    let payload = serde_json::to_vec(&ChannelMessage {
        message_type,
        data,
        ts: OffsetDateTime::now_utc(),
    })
    .expect("channel messages serialize");
    Outgoing {
        subject: channel.subject(),
        msg_id,
        payload: Bytes::from(payload),
    }
}

/// Publishes a message to `channel`. `msg_id` makes the publish idempotent (the same id is
/// stored once within the duplicate window).
pub async fn publish(
    js: &async_nats::jetstream::Context,
    channel: &Channel,
    message_type: MessageType,
    data: &Value,
    msg_id: String,
) -> Result<Published, async_nats::Error> {
    let payload = serde_json::to_vec(&ChannelMessage {
        message_type,
        data,
        ts: OffsetDateTime::now_utc(),
    })?;
    crate::jetstream::publish(
        js,
        Outgoing {
            subject: channel.subject(),
            msg_id,
            payload: Bytes::from(payload),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_subjects() {
        let c = Channel::parse("project:p-1").unwrap();
        assert_eq!(c.subject(), "rt.project.p-1");
        assert_eq!(c.live_subject(), "live.rt.project.p-1");
        assert_eq!(
            Channel::from_subject("live.rt.project.p-1"),
            Some(c.clone())
        );
        assert_eq!(Channel::from_subject("rt.project.p-1"), Some(c));
        assert_eq!(Channel::parse("project"), Err(ChannelError::Syntax));
        assert!(matches!(
            Channel::parse("planet:x"),
            Err(ChannelError::UnknownKind(_))
        ));
        assert!(matches!(
            Channel::parse("user:a.b"),
            Err(ChannelError::BadId(_))
        ));
        assert!(matches!(
            Channel::parse("user:*"),
            Err(ChannelError::BadId(_))
        ));
        assert!(matches!(
            Channel::parse("category:poetry"),
            Err(ChannelError::UnknownCategory(_))
        ));
        assert!(Channel::parse("category:writing").is_ok());
    }
}
