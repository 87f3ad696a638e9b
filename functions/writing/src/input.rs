//! What the tracker reads of a writing event: a typed view of the envelope and of the `data`
//! fields it uses. Parsing straight into this is cheaper than into a generic [`Event`] with a
//! JSON `data` tree, and the tracker parses every keystroke batch.
//!
//! Events reach the stream validated against their schemas (API and events API), so the
//! types here are the schemas' types; anything else fails to parse and is dead-lettered.
//! The schemas bound every integer the tracker reads to `u32`, and the edge spells integers
//! as integers; a property test (`tests/edge_rules.rs`) checks that every event the edge
//! accepts parses here.
//!
//! [`Event`]: inkwire_shared::events::Event

use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::session::{Batch, Reason};
use crate::state_machine::SessionState;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Input {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub user_id: String,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub document_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    #[serde(default)]
    pub data: InputData,
    #[serde(default)]
    pub metadata: InputMetadata,
}

/// The `data` fields of `session_started`, `keystroke` and `session_state_changed`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputData {
    pub session_id: Option<String>,
    // session_started
    pub goal_words: Option<u32>,
    pub time_zone: Option<String>,
    // keystroke
    #[serde(default)]
    pub keys: u32,
    #[serde(default)]
    pub chars_added: u32,
    #[serde(default)]
    pub chars_deleted: u32,
    #[serde(default)]
    pub words_added: u32,
    #[serde(default)]
    pub words_deleted: u32,
    #[serde(default)]
    pub paragraph_boundary: bool,
    #[serde(default)]
    pub pasted: bool,
    // session_state_changed
    pub to: Option<String>,
    pub from: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InputMetadata {
    pub source: Option<String>,
    pub correlation_id: Option<String>,
}

/// The event types the tracker applies (requests); every other writing event is a fact it
/// produced, or a back end did, and it leaves them alone.
pub const COMMANDS: [&str; 3] = ["session_started", "keystroke", "session_state_changed"];

impl Input {
    pub fn is_command(&self) -> bool {
        COMMANDS.contains(&self.event_type.as_str())
    }

    /// Replaces the event's time by `stored` (when JetStream stored it) if the two are more
    /// than `skew` apart. The writing API stamps events with the server's clock; this keeps
    /// anything else that reaches the stream (a publisher on NATS with a wrong clock) from
    /// moving session times, local days and streaks. The scheduler's requests are the
    /// exception for the past: they carry the time a transition became due, computed from
    /// the session's own times, which is legitimately old when the scheduler runs late (and
    /// `requested` applies one only if it is exactly the transition due at that time).
    pub fn trust_clock(&mut self, stored: OffsetDateTime, skew: std::time::Duration) {
        let ahead = self.timestamp - stored;
        let scheduled = self.metadata.source.as_deref() == Some(crate::scheduler::SOURCE)
            && self.event_type == "session_state_changed";
        if ahead > skew || (-ahead > skew && !scheduled) {
            tracing::warn!(id = %self.id, timestamp = %self.timestamp, %stored, "event time far from the stored time; using the stored time");
            self.timestamp = stored;
        }
    }

    pub fn session_id(&self) -> Option<&str> {
        self.data.session_id.as_deref()
    }

    /// Milliseconds since the epoch (the event's time, which drives the session).
    pub fn at_ms(&self) -> u64 {
        (self.timestamp.unix_timestamp_nanos() / 1_000_000).max(0) as u64
    }

    pub fn batch(&self) -> Batch {
        let d = &self.data;
        Batch {
            at_ms: self.at_ms(),
            keys: d.keys,
            chars_added: d.chars_added,
            chars_deleted: d.chars_deleted,
            words_added: d.words_added,
            words_deleted: d.words_deleted,
            paragraph_boundary: d.paragraph_boundary,
            pasted: d.pasted,
        }
    }

    /// The requested state of a `session_state_changed` (`None` if it names none we know).
    pub fn to_state(&self) -> Option<SessionState> {
        self.data.to.as_deref().and_then(SessionState::parse)
    }

    pub fn from_state(&self) -> Option<SessionState> {
        self.data.from.as_deref().and_then(SessionState::parse)
    }

    /// Why the change was requested; a request without a reason is the user's.
    pub fn reason(&self) -> Reason {
        match self.data.reason.as_deref() {
            Some("input") => Reason::Input,
            Some("inactivity") => Reason::Inactivity,
            Some("expired") => Reason::Expired,
            Some("flow") => Reason::Flow,
            _ => Reason::User,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inkwire_shared::events::{Category, Event};
    use serde_json::json;

    #[test]
    fn reads_what_the_builder_writes() {
        let e = Event::builder(Category::Writing, "keystroke", "u-1")
            .project("p-1")
            .correlation("c-1")
            .data(
                json!({"sessionId": "s-1", "keys": 12, "charsAdded": 10, "charsDeleted": 2,
                         "wordsAdded": 2, "paragraphBoundary": true}),
            )
            .build();
        let i: Input = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(i.id, e.id);
        assert_eq!(i.session_id(), Some("s-1"));
        assert_eq!(i.project_id.as_deref(), Some("p-1"));
        assert_eq!(i.metadata.correlation_id.as_deref(), Some("c-1"));
        let b = i.batch();
        assert_eq!(
            (b.keys, b.chars_added, b.chars_deleted, b.words_added),
            (12, 10, 2, 2)
        );
        assert!(b.paragraph_boundary && !b.pasted);
    }

    #[test]
    fn reasons_and_states() {
        let e = Event::builder(Category::Writing, "session_state_changed", "u-1")
            .data(json!({"sessionId": "s-1", "from": "paused", "to": "break", "reason": "inactivity"}))
            .build();
        let i: Input = serde_json::from_slice(&serde_json::to_vec(&e).unwrap()).unwrap();
        assert_eq!(i.to_state(), Some(SessionState::Break));
        assert_eq!(i.from_state(), Some(SessionState::Paused));
        assert_eq!(i.reason(), Reason::Inactivity);
    }

    #[test]
    fn a_far_off_event_time_gives_way_to_the_stored_time() {
        let skew = std::time::Duration::from_secs(300);
        let stored = OffsetDateTime::now_utc();
        let input = |at: OffsetDateTime, source: &str| {
            let e = Event::builder(Category::Writing, "session_state_changed", "u-1")
                .timestamp(at)
                .source(source)
                .data(json!({"sessionId": "s-1", "to": "paused", "reason": "inactivity"}))
                .build();
            serde_json::from_slice::<Input>(&serde_json::to_vec(&e).unwrap()).unwrap()
        };
        let hour = time::Duration::hours(1);
        for (at, source, kept) in [
            (stored + time::Duration::minutes(4), "api", true),
            (stored + hour, "api", false),
            (stored - hour, "api", false),
            // The scheduler asks late for what was due earlier; never for the future.
            (stored - hour, crate::scheduler::SOURCE, true),
            (stored + hour, crate::scheduler::SOURCE, false),
        ] {
            let mut i = input(at, source);
            i.trust_clock(stored, skew);
            let expected = if kept { at } else { stored };
            assert_eq!(i.timestamp, expected, "{source} at {at}");
        }
    }
}
