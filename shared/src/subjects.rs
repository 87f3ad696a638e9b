//! Subject and stream names: the single place where they are spelled.
//!
//! Domain events live in one stream per category (`EVENTS_WRITING` holds
//! `events.writing.>`), dead letters in `DLQ` (`dlq.>`). The relay's `RELAY` stream
//! (`rt.>`) is added by the relay issue; notification jobs live in `NOTIFY` (`notify.>`);
//! co-editing updates and snapshots in `YDOC` (`ydoc.>`).

use crate::events::Category;

/// Prefix of every domain event subject.
pub const EVENTS_PREFIX: &str = "events";
/// Stream that keeps a copy of every message a consumer gave up on.
pub const DLQ_STREAM: &str = "DLQ";
/// Prefix of dead-letter subjects: `dlq.<original subject>`.
pub const DLQ_PREFIX: &str = "dlq";
/// Stream of notification jobs: sends (`notify.send.{userId}`) and deliveries
/// (`notify.deliver.{channel}.{userId}`).
pub const NOTIFY_STREAM: &str = "NOTIFY";
/// Prefix of notification job subjects.
pub const NOTIFY_PREFIX: &str = "notify";

/// Stream of co-editing state (issue 10): Yjs updates (`ydoc.u.{documentId}`), snapshot
/// chunks (`ydoc.c.{documentId}`) and snapshot heads (`ydoc.h.{documentId}`). Kept without an
/// age limit: compaction, not expiry, bounds it.
pub const YDOC_STREAM: &str = "YDOC";
/// Prefix of the YDOC stream's subjects.
pub const YDOC_PREFIX: &str = "ydoc";

/// Workflow step dispatches (`functions/workflows`): `wf.step.{runId}.{stepId}`.
pub const WF_STREAM: &str = "WF";
/// The prefix of the workflow stream's subjects.
pub const WF_PREFIX: &str = "wf";

/// Stream of chat rooms (issue 12): every message, edit and tombstone of a room on
/// `chat.{roomId}` (room ids are checked before they reach a subject). No age limit: a room's
/// history lives here.
pub const CHAT_STREAM: &str = "CHAT";
/// Prefix of the CHAT stream's subjects.
pub const CHAT_PREFIX: &str = "chat";

/// `chat.{roomId}`: the subject of a room's log. `room` must be a valid id.
pub fn chat_subject(room: &str) -> String {
    format!("{CHAT_PREFIX}.{room}")
}

/// Stream of user-presence reports (issue 12): each relay instance publishes what happened
/// to its connections (opened, active, closed) and its heartbeat on
/// `presence.report.{instanceId}`; the presence worker applies them in order per instance.
/// Kept briefly (`PRESENCE_RETENTION`): a report is only worth reading while the worker is
/// catching up.
pub const PRESENCE_STREAM: &str = "PRESENCE";
/// Prefix of the PRESENCE stream's subjects.
pub const PRESENCE_PREFIX: &str = "presence";
/// How long the PRESENCE stream keeps a report.
pub const PRESENCE_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// `presence.report.{instanceId}`: one relay instance's reports. `instance` must be a valid id.
pub fn presence_report_subject(instance: &str) -> String {
    format!("{PRESENCE_PREFIX}.report.{instance}")
}

/// `inkwire.presence.resync.{instanceId}` (core NATS, not stored): the presence worker asks
/// an instance whose connections it swept (its heartbeat had lapsed) to report all its live
/// connections again.
pub fn presence_resync_subject(instance: &str) -> String {
    format!("inkwire.presence.resync.{instance}")
}

/// Headers set on dead-letter copies.
pub mod dlq_headers {
    pub const REASON: &str = "Inkwire-Dlq-Reason";
    pub const STREAM: &str = "Inkwire-Dlq-Stream";
    pub const SEQUENCE: &str = "Inkwire-Dlq-Sequence";
    pub const CONSUMER: &str = "Inkwire-Dlq-Consumer";
    pub const DELIVERIES: &str = "Inkwire-Dlq-Deliveries";
    pub const SUBJECT: &str = "Inkwire-Dlq-Subject";
}

/// `EVENTS_WRITING` for `writing`.
pub fn event_stream(category: Category) -> String {
    format!("EVENTS_{}", category.as_str().to_ascii_uppercase())
}

/// `events.writing.>`: everything a category stream holds.
pub fn event_stream_subjects(category: Category) -> String {
    format!("{EVENTS_PREFIX}.{}.>", category.as_str())
}

/// `events.writing.keystroke`.
pub fn event_subject(category: Category, event_type: &str) -> String {
    format!("{EVENTS_PREFIX}.{}.{event_type}", category.as_str())
}

/// `dlq.events.writing.keystroke`.
pub fn dlq_subject(original: &str) -> String {
    format!("{DLQ_PREFIX}.{original}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(event_stream(Category::Writing), "EVENTS_WRITING");
        assert_eq!(
            event_stream_subjects(Category::Publishing),
            "events.publishing.>"
        );
        assert_eq!(
            event_subject(Category::Writing, "keystroke"),
            "events.writing.keystroke"
        );
        assert_eq!(dlq_subject("events.system.x"), "dlq.events.system.x");
    }
}
