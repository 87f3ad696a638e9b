//! Who may publish each event type on the events API: one table, one rule per type.
//!
//! A domain action must obey the same rule whatever path it arrives by. Events that a domain
//! API guards (the writing tracker's commands) are therefore refused on the generic events
//! API for every caller, with an error naming the route to use; events that inkwire's
//! consumers *produce* (derived writing events, analytics, automation, system, notification) may only be
//! published by back ends (`service`); the rest are ordinary project activity, open to
//! project members from a minimum role up. The README's "Who may publish" table is this
//! table (a unit test keeps the two in step).

use crate::events::Category;
use crate::membership::ProjectRole;

/// The rule for publishing one event type on `/api/realtime/events/*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishRule {
    /// A domain API owns this action: refused on the events API for every caller, the
    /// service role included (`403 domain_api_required`). The route is named in the error.
    DomainApi(&'static str),
    /// Produced by inkwire's consumers or by back ends: the `service` role only
    /// (`403 service_role_required`).
    ServiceOnly,
    /// Project activity: members of the event's project with at least this role (roles are
    /// ordered owner < editor < reviewer < reader, so `Reader` means any member); the event
    /// must name a project (`projectId`, or a registered `documentId`). The service role may
    /// publish it for anyone.
    Member(ProjectRole),
}

use PublishRule::{DomainApi, Member, ServiceOnly};

/// Route of the writing API that accepts keystroke batches.
pub const KEYSTROKE_ROUTE: &str = "POST /api/realtime/writing/sessions/{sessionId}/keystroke";
/// Route of the writing API that starts sessions.
pub const START_ROUTE: &str = "POST /api/realtime/writing/sessions/start";
/// Routes of the writing API that request a state change.
pub const STATE_ROUTE: &str =
    "POST /api/realtime/writing/sessions/{sessionId}/pause, /resume or /end";

/// Every event type and its rule.
pub const RULES: &[(Category, &str, PublishRule)] = &[
    (Category::Writing, "session_started", DomainApi(START_ROUTE)),
    (Category::Writing, "keystroke", DomainApi(KEYSTROKE_ROUTE)),
    (
        Category::Writing,
        "session_state_changed",
        DomainApi(STATE_ROUTE),
    ),
    (Category::Writing, "word_added", ServiceOnly),
    (Category::Writing, "paragraph_completed", ServiceOnly),
    (Category::Writing, "session_ended", ServiceOnly),
    (Category::Writing, "flow_state_entered", ServiceOnly),
    (Category::Writing, "flow_state_exited", ServiceOnly),
    (
        Category::Collaboration,
        "user_joined",
        Member(ProjectRole::Reader),
    ),
    (
        Category::Collaboration,
        "user_left",
        Member(ProjectRole::Reader),
    ),
    (
        Category::Collaboration,
        "cursor_moved",
        Member(ProjectRole::Reader),
    ),
    (
        Category::Collaboration,
        "comment_added",
        Member(ProjectRole::Reviewer),
    ),
    (
        Category::Collaboration,
        "edit_applied",
        Member(ProjectRole::Editor),
    ),
    (Category::Collaboration, "conflict_detected", ServiceOnly),
    (
        Category::Publishing,
        "status_changed",
        Member(ProjectRole::Editor),
    ),
    (
        Category::Publishing,
        "upload_started",
        Member(ProjectRole::Editor),
    ),
    (
        Category::Publishing,
        "book_published",
        Member(ProjectRole::Editor),
    ),
    (
        Category::Publishing,
        "review_completed",
        Member(ProjectRole::Reviewer),
    ),
    (Category::Publishing, "sales_updated", ServiceOnly),
    (Category::Analytics, "metric_updated", ServiceOnly),
    (Category::Analytics, "threshold_crossed", ServiceOnly),
    (Category::Analytics, "threshold_resolved", ServiceOnly),
    (Category::Analytics, "anomaly_detected", ServiceOnly),
    (Category::Automation, "workflow_started", ServiceOnly),
    (Category::Automation, "action_executed", ServiceOnly),
    (Category::Automation, "workflow_completed", ServiceOnly),
    (Category::Automation, "workflow_failed", ServiceOnly),
    (Category::System, "service_started", ServiceOnly),
    (Category::System, "service_stopped", ServiceOnly),
    (Category::Notification, "notification_created", ServiceOnly),
    (
        Category::Notification,
        "notification_delivered",
        ServiceOnly,
    ),
    (Category::Notification, "notification_failed", ServiceOnly),
];

/// The rule for `category`/`event_type`. A type missing from the table (which the unit
/// tests rule out) is service-only: closed by default.
pub fn rule(category: Category, event_type: &str) -> PublishRule {
    RULES
        .iter()
        .find(|(c, t, _)| *c == category && *t == event_type)
        .map_or(ServiceOnly, |(_, _, r)| *r)
}

/// Whether a member with `role` satisfies a minimum of `min` (owner satisfies everything).
pub fn role_satisfies(role: ProjectRole, min: ProjectRole) -> bool {
    role <= min
}

impl PublishRule {
    /// The README's wording of the rule.
    pub fn describe(self) -> String {
        match self {
            DomainApi(route) => format!("nobody: use `{route}`"),
            ServiceOnly => "`service` only".to_string(),
            Member(ProjectRole::Reader) => "any project member; `service`".to_string(),
            Member(ProjectRole::Owner) => "project owners; `service`".to_string(),
            Member(r) => format!("project {}s and above; `service`", r.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_exactly_one_rule() {
        for c in Category::ALL {
            for t in c.event_types() {
                let n = RULES
                    .iter()
                    .filter(|(rc, rt, _)| *rc == c && rt == t)
                    .count();
                assert_eq!(n, 1, "{c}.{t} has {n} rules");
            }
        }
        assert_eq!(RULES.len(), 32);
    }

    #[test]
    fn tracker_commands_go_through_the_writing_api() {
        for t in ["session_started", "keystroke", "session_state_changed"] {
            assert!(matches!(rule(Category::Writing, t), DomainApi(_)), "{t}");
        }
    }

    #[test]
    fn roles_are_ordered_from_owner_to_reader() {
        assert!(role_satisfies(ProjectRole::Owner, ProjectRole::Editor));
        assert!(role_satisfies(ProjectRole::Editor, ProjectRole::Editor));
        assert!(!role_satisfies(ProjectRole::Reviewer, ProjectRole::Editor));
        assert!(role_satisfies(ProjectRole::Reader, ProjectRole::Reader));
        assert!(!role_satisfies(ProjectRole::Reader, ProjectRole::Reviewer));
    }

    /// The README's table says exactly what this table says.
    #[test]
    fn the_readme_table_is_this_table() {
        let readme = include_str!("../../README.md");
        for (c, t, r) in RULES {
            let row = format!("| `{c}.{t}` | {} |", r.describe());
            assert!(readme.contains(&row), "README lacks the row {row}");
        }
    }
}
