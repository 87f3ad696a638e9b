//! Workflow definitions for inkwire's automation engine (issue 14, item 1): the JSON a project
//! owner registers — triggers (events with filters, cron in an IANA time zone, manual) and a
//! DAG of steps with retries, timeouts, error strategies and compensations — parsed and
//! checked in full before anything runs, so that a bad definition is a `400` listing every
//! problem with its JSON pointer rather than a run that fails at step 7 at 03:00. Besides the
//! checks it holds what the engine needs from a definition without any I/O: the DAG
//! ([`dag::Dag`]: order, dependants, ready steps), input templating ([`template`]) and the
//! next fire time of a cron trigger ([`cron::next_after`]). The six built-in templates live
//! in `templates/*.json` and are available through [`templates`].
//!
//! The engine ([`engine`]) runs them durably: each ready step is a JetStream message on the
//! `WF` stream, each attempt is fenced by a token in the run's Redis hash ([`store`]), a
//! step's result and the release of its dependants are one script, and a watcher resumes
//! whatever a crash left behind. [`actions`] holds the actions with effects, [`registry`]
//! the registered versions, [`api`] the HTTP API under `/api/workflows`.

pub mod actions;
pub mod api;
pub mod config;
pub mod cron;
pub mod dag;
pub mod definition;
pub mod engine;
pub mod installing;
pub mod messaging;
pub mod registry;
pub mod store;
pub mod template;
pub mod triggers;
pub mod validate;

pub use api::{WorkflowsApi, routes};
pub use config::WorkflowsConfig;
pub use dag::Dag;
pub use definition::{Action, Definition, Duration, OnError, Step, Trigger};
pub use engine::{Engine, run_worker};
pub use template::{RenderError, eval_condition, eval_expression, render_input};
pub use validate::{DefinitionError, parse_definition};

/// The built-in workflow templates (issue 14 item 7) as `(name, JSON text)`. They are stored
/// with `"projectId": "template"`; installing one into a project replaces that with the
/// project's id (and may change the time zone of the cron ones).
pub fn templates() -> [(&'static str, &'static str); 6] {
    macro_rules! t {
        ($name:literal) => {
            (
                $name,
                include_str!(concat!("../templates/", $name, ".json")),
            )
        };
    }
    [
        t!("auto-save-backup"),
        t!("book-publication-pipeline"),
        t!("daily-writing-goal-reminder"),
        t!("sales-spike-alert"),
        t!("collaboration-conflict-alert"),
        t!("weekly-analytics-digest"),
    ]
}

/// `base` followed by one JSON pointer token (RFC 6901: `~` is written `~0`, `/` is `~1`).
pub(crate) fn pointer(base: &str, token: &str) -> String {
    format!("{base}/{}", token.replace('~', "~0").replace('/', "~1"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{edit, valid};
    use serde_json::{Value, json};

    fn schema() -> jsonschema::Validator {
        let text = include_str!("../../../schemas/api/workflow-definition.json");
        let schema: Value = serde_json::from_str(text).expect("schema is JSON");
        jsonschema::draft202012::options()
            .build(&schema)
            .expect("schema compiles")
    }

    fn template_definitions() -> Vec<(&'static str, Value)> {
        templates()
            .into_iter()
            .map(|(name, text)| (name, serde_json::from_str(text).expect(name)))
            .collect()
    }

    #[test]
    fn the_six_templates_are_valid_and_fit_the_schema() {
        let schema = schema();
        for (name, def) in template_definitions() {
            let parsed = parse_definition(&def).unwrap_or_else(|e| panic!("{name}: {e:#?}"));
            assert_eq!(
                (parsed.id.as_str(), parsed.project_id.as_str()),
                (name, "template")
            );
            assert!(Dag::new(&parsed).is_ok(), "{name}");
            if let Err(e) = schema.validate(&def) {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn the_schema_accepts_what_parses_and_refuses_bad_shapes() {
        let schema = schema();
        let text = include_str!("../../../schemas/api/workflow-definition.json");
        let examples: Value = serde_json::from_str(text).expect("JSON");
        for example in examples["examples"].as_array().expect("examples") {
            assert!(schema.is_valid(example));
            assert!(parse_definition(example).is_ok());
        }
        assert!(
            schema.is_valid(&valid()),
            "{:?}",
            schema.validate(&valid()).err()
        );
        #[rustfmt::skip]
        let bad: [(&str, Option<Value>); 10] = [
            ("/steps", None),
            ("/owner", Some(json!("me"))),
            ("/steps/0/action", Some(json!("ftp"))),
            ("/triggers/0/type", Some(json!("webhook"))),
            ("/triggers/1/schedule", None),
            ("/triggers/0/filter/0/value", Some(json!("100"))),
            ("/steps/0/input/url", None),
            ("/steps/0/retry", Some(json!({"maxAttempts": 21}))),
            ("/steps/0/timeout", Some(json!("1h30m"))),
            ("/steps/6/input/text", None),
        ];
        for (at, value) in bad {
            let mut v = valid();
            edit(&mut v, at, value);
            assert!(!schema.is_valid(&v), "the schema accepts {at}");
            assert!(
                parse_definition(&v).is_err(),
                "parse_definition accepts {at}"
            );
        }
    }

    #[test]
    fn templates_render_against_sample_runs() {
        let defs: std::collections::HashMap<_, _> = template_definitions().into_iter().collect();
        let step = |name: &str, id: &str| {
            let steps = defs[name]["steps"].as_array().expect("steps");
            steps.iter().find(|s| s["id"] == id).expect(id)["input"].clone()
        };
        let members = json!({"status": 200, "body": {"members": [{"userId": "u-1", "role": "owner"}, {"userId": "u-2", "role": "editor"}]}});
        let ctx = json!({
            "trigger": {"projectId": "p-1", "userId": "u-1", "documentId": "d-1",
                        "data": {"bookId": "b-1", "platform": "kdp", "units": 30, "words": 7, "totalWords": 203, "otherUserId": "u-2", "reason": "same_paragraph"}},
            "steps": {
                "members": {"output": members},
                "baseline": {"output": {"status": 200, "body": {"baseline": {"unitsPerDay": 12.25}}}},
                "today": {"output": {"status": 200, "body": {"today": {"words": 120}}}},
                "figures": {"output": {"status": 200, "body": {"points": [{"start": "2026-03-02T00:00:00Z", "count": 4}]}}},
                "content": {"output": {"status": 200, "body": {"text": "It was a dark night."}}},
            },
        });
        let cond =
            |name: &str, id: &str| eval_condition(step(name, id)["if"].as_str().expect("if"), &ctx);
        assert_eq!(cond("auto-save-backup", "crossed_100"), Ok(true));
        assert_eq!(cond("sales-spike-alert", "spike"), Ok(true));
        assert_eq!(cond("daily-writing-goal-reminder", "goal_unmet"), Ok(true));
        assert_eq!(cond("book-publication-pipeline", "valid"), Ok(false));
        let alert = render_input(&step("sales-spike-alert", "alert"), &ctx).expect("alert");
        assert_eq!(alert["userIds"], json!(["u-1", "u-2"]));
        assert_eq!(
            alert["body"],
            "30 units against a 7-day baseline of 12.3 a day."
        );
        let remind =
            render_input(&step("daily-writing-goal-reminder", "remind"), &ctx).expect("remind");
        assert_eq!(remind["title"], "380 words to go today");
        let snapshot = render_input(&step("auto-save-backup", "snapshot"), &ctx).expect("snapshot");
        assert_eq!(snapshot["path"], "backups/d-1/200-words.json");
        assert_eq!(snapshot["content"], json!({"text": "It was a dark night."}));
        let conflict =
            render_input(&step("collaboration-conflict-alert", "alert"), &ctx).expect("alert");
        assert_eq!(
            conflict["body"],
            "u-1 and u-2 are editing the same paragraph."
        );
        let metadata = render_input(&step("book-publication-pipeline", "metadata"), &ctx);
        assert_eq!(
            metadata.expect("metadata")["messages"][1]["content"],
            "It was a dark night."
        );
        let digest =
            render_input(&step("weekly-analytics-digest", "digest"), &ctx).expect("digest");
        assert_eq!(
            digest["text"],
            "Events per day, last 7 days:\n2026-03-02T00:00:00Z: 4\n"
        );
    }
}
