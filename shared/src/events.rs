//! The event envelope, the seven categories and their event types, and builders.
//!
//! Every event that enters inkwire has the same envelope (SPEC §1); its `data` is checked
//! against the schema of its category and type (see `schema`). This module holds the typed
//! view that Rust code builds and reads.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// An event category; each has its own stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Writing,
    Collaboration,
    Publishing,
    Analytics,
    Automation,
    System,
    /// Notifications accepted, delivered and failed (issue 9).
    Notification,
}

impl Category {
    pub const ALL: [Category; 7] = [
        Category::Writing,
        Category::Collaboration,
        Category::Publishing,
        Category::Analytics,
        Category::Automation,
        Category::System,
        Category::Notification,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Writing => "writing",
            Category::Collaboration => "collaboration",
            Category::Publishing => "publishing",
            Category::Analytics => "analytics",
            Category::Automation => "automation",
            Category::System => "system",
            Category::Notification => "notification",
        }
    }

    /// The event types that belong to this category.
    pub fn event_types(self) -> &'static [&'static str] {
        match self {
            Category::Writing => &[
                "keystroke",
                "word_added",
                "paragraph_completed",
                "session_started",
                "session_ended",
                "flow_state_entered",
                "flow_state_exited",
                "session_state_changed",
            ],
            Category::Collaboration => &[
                "user_joined",
                "user_left",
                "cursor_moved",
                "edit_applied",
                "comment_added",
                "conflict_detected",
            ],
            Category::Publishing => &[
                "status_changed",
                "upload_started",
                "review_completed",
                "book_published",
                "sales_updated",
            ],
            Category::Analytics => &[
                "metric_updated",
                "threshold_crossed",
                "threshold_resolved",
                "anomaly_detected",
            ],
            Category::Automation => &[
                "workflow_started",
                "action_executed",
                "workflow_completed",
                "workflow_failed",
            ],
            Category::System => &["service_started", "service_stopped"],
            Category::Notification => &[
                "notification_created",
                "notification_delivered",
                "notification_failed",
            ],
        }
    }

    pub fn has_type(self, event_type: &str) -> bool {
        self.event_types().contains(&event_type)
    }

    /// The category an event type belongs to, if any (types are unique across categories).
    pub fn of_type(event_type: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.has_type(event_type))
    }
}

impl std::str::FromStr for Category {
    type Err = UnknownCategory;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCategory(s.to_string()))
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown event category {0:?}")]
pub struct UnknownCategory(pub String);

/// Where an event came from and how it relates to others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

/// The envelope as stored in JetStream: `id` and `timestamp` are always present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: Uuid,
    pub category: Category,
    #[serde(rename = "type")]
    pub event_type: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub data: Value,
    #[serde(default, skip_serializing_if = "is_default_metadata")]
    pub metadata: Metadata,
}

fn is_default_metadata(m: &Metadata) -> bool {
    *m == Metadata::default()
}

impl Event {
    /// Starts an event of `category`/`event_type` by `user_id`, with a fresh time-ordered id
    /// and the current time.
    pub fn builder(
        category: Category,
        event_type: &str,
        user_id: impl Into<String>,
    ) -> EventBuilder {
        EventBuilder {
            event: Event {
                id: Uuid::now_v7(),
                category,
                event_type: event_type.to_string(),
                user_id: user_id.into(),
                project_id: None,
                document_id: None,
                timestamp: OffsetDateTime::now_utc(),
                data: Value::Object(Default::default()),
                metadata: Metadata::default(),
            },
        }
    }

    /// The subject the event is published on.
    pub fn subject(&self) -> String {
        crate::subjects::event_subject(self.category, &self.event_type)
    }
}

/// Builds an [`Event`]; see [`Event::builder`].
#[derive(Debug, Clone)]
pub struct EventBuilder {
    event: Event,
}

impl EventBuilder {
    pub fn id(mut self, id: Uuid) -> Self {
        self.event.id = id;
        self
    }
    pub fn project(mut self, project_id: impl Into<String>) -> Self {
        self.event.project_id = Some(project_id.into());
        self
    }
    pub fn document(mut self, document_id: impl Into<String>) -> Self {
        self.event.document_id = Some(document_id.into());
        self
    }
    pub fn timestamp(mut self, at: OffsetDateTime) -> Self {
        self.event.timestamp = at;
        self
    }
    pub fn data(mut self, data: Value) -> Self {
        self.event.data = data;
        self
    }
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.event.metadata.source = Some(source.into());
        self
    }
    pub fn correlation(mut self, correlation_id: impl Into<String>) -> Self {
        self.event.metadata.correlation_id = Some(correlation_id.into());
        self
    }
    pub fn causation(mut self, causation_id: impl Into<String>) -> Self {
        self.event.metadata.causation_id = Some(causation_id.into());
        self
    }
    pub fn build(self) -> Event {
        self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_two_types_unique_across_categories() {
        let all: Vec<&str> = Category::ALL
            .iter()
            .flat_map(|c| c.event_types().iter().copied())
            .collect();
        assert_eq!(all.len(), 32);
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len());
        for t in all {
            assert!(Category::of_type(t).unwrap().has_type(t));
        }
    }

    #[test]
    fn envelope_serializes_in_camel_case() {
        let e = Event::builder(Category::Writing, "word_added", "u-1")
            .project("p-1")
            .data(serde_json::json!({"sessionId": "s", "words": 2}))
            .correlation("c-1")
            .build();
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "word_added");
        assert_eq!(v["userId"], "u-1");
        assert_eq!(v["projectId"], "p-1");
        assert_eq!(v["metadata"]["correlationId"], "c-1");
        assert!(v.get("documentId").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
