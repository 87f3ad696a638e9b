//! Announcements that somebody's rights shrank: a member removed from a project or demoted,
//! a document removed from its project, a participant removed from a room. Whoever changes
//! the rights in Redis announces it on core NATS right after; every relay instance listens
//! and re-checks the affected live subscriptions at once, so losing a right takes effect on
//! every instance, not at the next subscribe.

use serde::{Deserialize, Serialize};

/// The core NATS subject every relay instance listens on.
pub const ACCESS_CHANGED_SUBJECT: &str = "inkwire.access.changed";

/// What changed. Ids are valid identifiers (checked before the change was made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum AccessChange {
    /// `user_id`'s membership of `project_id` was removed or its role changed.
    #[serde(rename_all = "camelCase")]
    Member { project_id: String, user_id: String },
    /// `document_id` no longer belongs to `project_id`.
    #[serde(rename_all = "camelCase")]
    Document {
        project_id: String,
        document_id: String,
    },
    /// `user_id` is no longer a participant of `room_id`.
    #[serde(rename_all = "camelCase")]
    RoomParticipant { room_id: String, user_id: String },
}

/// Announces `change` to every relay instance. Call it after the change is stored.
pub async fn announce(
    nats: &async_nats::Client,
    change: &AccessChange,
) -> Result<(), async_nats::Error> {
    let payload = serde_json::to_vec(change)?;
    nats.publish(ACCESS_CHANGED_SUBJECT, payload.into()).await?;
    nats.flush().await?;
    Ok(())
}
