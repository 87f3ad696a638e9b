//! The delivery job: what the notifier (or the scheduler, for held items and digests) asks the
//! delivery worker to send on one external channel, published on
//! `notify.deliver.{channel}.{userId}`. The job carries the final text, so the delivery worker
//! only resolves the recipient's address and calls the provider.
//!
//! Its `job_id` is the JetStream message id: `{notificationId}:{channel}` for one
//! notification, `digest:{userId}:{key}:{windowStartMs}` for a digest. JetStream stores a job
//! once within its duplicate window, and the delivery log's final status stops any later
//! duplicate, so every instance and every retry asks for one delivery.

use bytes::Bytes;
use inkwire_shared::jetstream::Outgoing;
use inkwire_shared::subjects;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::DeliveryChannel;
use crate::send::{Notification, PushPayload};
use crate::templates::RenderedEmail;

/// What is sent, per channel; a channel's part falls back to `title` / `body` when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Content {
    pub title: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<RenderedEmail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushPayload>,
}

impl Content {
    /// The content of one notification.
    pub fn of(n: &Notification) -> Content {
        Content {
            title: n.title.clone(),
            body: n.body.clone(),
            email: n.email.clone(),
            sms: n.sms.clone(),
            push: n.push.clone(),
        }
    }
}

/// One notification, or a digest of several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "type"
)]
pub enum JobKind {
    Single,
    Digest {
        key: String,
        /// Unix milliseconds: the start of the digest's window (part of its id).
        window_start_ms: i64,
    },
}

/// One delivery on one external channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryJob {
    pub job_id: String,
    pub channel: DeliveryChannel,
    pub user_id: String,
    /// Whose delivery-log records this job settles (one, or every item of a digest).
    pub notification_ids: Vec<Uuid>,
    pub content: Content,
    /// Similar notifications muted since the last one sent (0: none); the message says so.
    #[serde(default)]
    pub muted_count: u32,
    pub kind: JobKind,
}

/// `{notificationId}:{channel}`.
pub fn single_job_id(notification_id: Uuid, channel: DeliveryChannel) -> String {
    format!("{notification_id}:{}", channel.as_str())
}

/// `digest:{userId}:{key}:{windowStartMs}` (the key is a category name or a group key, both
/// checked id syntax).
pub fn digest_job_id(user_id: &str, key: &str, window_start_ms: i64) -> String {
    format!("digest:{user_id}:{key}:{window_start_ms}")
}

/// `notify.deliver.{channel}.{userId}` (`user_id` already checked).
pub fn deliver_subject(channel: DeliveryChannel, user_id: &str) -> String {
    format!(
        "{}.deliver.{}.{user_id}",
        subjects::NOTIFY_PREFIX,
        channel.as_str()
    )
}

impl DeliveryJob {
    /// The job for one notification on `channel`.
    pub fn single(n: &Notification, channel: DeliveryChannel, muted_count: u32) -> DeliveryJob {
        DeliveryJob {
            job_id: single_job_id(n.id, channel),
            channel,
            user_id: n.user_id.clone(),
            notification_ids: vec![n.id],
            content: Content::of(n),
            muted_count,
            kind: JobKind::Single,
        }
    }

    pub fn subject(&self) -> String {
        deliver_subject(self.channel, &self.user_id)
    }

    pub fn to_outgoing(&self) -> Outgoing {
        Outgoing {
            subject: self.subject(),
            msg_id: self.job_id.clone(),
            payload: Bytes::from(serde_json::to_vec(self).expect("delivery jobs serialize")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_subjects() {
        let id = Uuid::nil();
        assert_eq!(
            single_job_id(id, DeliveryChannel::Email),
            "00000000-0000-0000-0000-000000000000:email"
        );
        assert_eq!(
            deliver_subject(DeliveryChannel::Push, "u-1"),
            "notify.deliver.push.u-1"
        );
        assert_eq!(
            digest_job_id("u-1", "collaboration", 1_700_000_000_000),
            "digest:u-1:collaboration:1700000000000"
        );
    }

    #[test]
    fn round_trips() {
        let job = DeliveryJob {
            job_id: "digest:u-1:k:5".into(),
            channel: DeliveryChannel::Email,
            user_id: "u-1".into(),
            notification_ids: vec![Uuid::nil()],
            content: Content {
                title: "t".into(),
                body: "b".into(),
                email: None,
                sms: None,
                push: None,
            },
            muted_count: 2,
            kind: JobKind::Digest {
                key: "k".into(),
                window_start_ms: 5,
            },
        };
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["kind"]["type"], "digest");
        assert_eq!(v["kind"]["windowStartMs"], 5);
        assert_eq!(serde_json::from_value::<DeliveryJob>(v).unwrap(), job);
    }
}
