//! Rules from domain events: a table saying which event types become notifications, for whom,
//! with which category, priority and text, and the durable consumers that apply it.
//!
//! The defaults are issue 9's ([`default_rules`]); `INKWIRE_NOTIFY_RULES` names a JSON file
//! that replaces the whole table (`{"rules": [...]}`, see [`RuleSpec`]), checked at start with
//! errors that name the rule and the field. Each rule reads its own event type through its
//! own durable consumer (`notify-rules-{category}-{type}`, filtered to the one subject, as
//! nats-server 2.9 allows one filter per consumer), so the flood of writing keystrokes never
//! reaches this code. A new consumer starts with events published from then on: a rules
//! consumer created over a stream holding a month of events must not notify a month late.
//!
//! An event becomes notifications exactly as a send does (`crate::send`): the same request,
//! the same rendering (an inline [`Template`], or a saved one by name), the same ids — UUIDv5
//! of the event id and the recipient — so a redelivered event publishes the same notification
//! ids and JetStream drops the copies. They are published to `notify.send.{userId}` for the
//! notifier.

use std::collections::HashSet;
use std::sync::Arc;

use inkwire_shared::consumer::{self, ConsumerSpec, Delivery, HandlerError, Shutdown};
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream;
use inkwire_shared::membership::{self, ProjectRole, is_valid_id};
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::config::NotifyConfig;
use crate::model::{DeliveryChannel, Priority};
use crate::send::{self, Content, Notification, SendRequest, Texts};
use crate::templates::{self, Template};

/// `sender` of notifications made by rules: not a valid user id, so no user can pose as it.
pub const SENDER: &str = "system:rules";

/// Who a rule notifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// `user`: the event's `userId` (the writer, the actor).
    EventUser,
    /// `projectOwners`: every owner of the event's `projectId` (none without a project).
    ProjectOwners,
    /// `data.<field>`: the user id in the event's data field (`data.otherUserId`).
    DataField(String),
}

impl Recipient {
    pub fn parse(s: &str) -> Result<Recipient, String> {
        match s {
            "user" => Ok(Recipient::EventUser),
            "projectOwners" => Ok(Recipient::ProjectOwners),
            _ => match s.strip_prefix("data.") {
                Some(field)
                    if !field.is_empty()
                        && field.len() <= 64
                        && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    Ok(Recipient::DataField(field.to_string()))
                }
                _ => Err(format!(
                    "{s:?} is not a recipient (user, projectOwners or data.<field>)"
                )),
            },
        }
    }
}

/// A rule as the file spells it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// `category.type` of the event (`writing.flow_state_entered`).
    pub event: String,
    /// The notification's category (one of `INKWIRE_NOTIFY_CATEGORIES`).
    pub category: String,
    pub priority: String,
    /// `user`, `projectOwners`, `data.<field>` (one or more).
    pub recipients: Vec<String>,
    /// The text, as a template rendered with the event's data (and `event`: id, type,
    /// userId, projectId, documentId) …
    #[serde(default)]
    pub template: Option<Template>,
    /// … or the name of a saved template.
    #[serde(default)]
    pub template_name: Option<String>,
    #[serde(default)]
    pub channels: Option<Vec<DeliveryChannel>>,
    #[serde(default)]
    pub group_key: Option<String>,
}

/// The rule file: `{"rules": [...]}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub rules: Vec<RuleSpec>,
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub event_category: Category,
    pub event_type: String,
    pub category: String,
    pub priority: Priority,
    pub recipients: Vec<Recipient>,
    pub content: RuleContent,
    pub channels: Option<Vec<DeliveryChannel>>,
    pub group_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleContent {
    Inline(Template),
    Saved(String),
}

impl Rule {
    /// The durable consumer of this rule's event type.
    pub fn durable(&self) -> String {
        format!(
            "notify-rules-{}-{}",
            self.event_category.as_str(),
            self.event_type
        )
    }

    pub fn subject(&self) -> String {
        subjects::event_subject(self.event_category, &self.event_type)
    }
}

fn inline(title: &str, body: &str) -> Option<Template> {
    Some(Template {
        title: title.into(),
        body: body.into(),
        email: None,
        sms: None,
        push: None,
    })
}

/// Issue 9's rules.
pub fn default_rules() -> Vec<RuleSpec> {
    let rule = |event: &str,
                category: &str,
                priority: &str,
                recipients: &[&str],
                t: Option<Template>,
                group: &str| RuleSpec {
        event: event.into(),
        category: category.into(),
        priority: priority.into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        template: t,
        template_name: None,
        channels: None,
        group_key: Some(group.into()),
    };
    vec![
        rule(
            "writing.flow_state_entered",
            "writing",
            "low",
            &["user"],
            inline(
                "Flow state",
                "You are in flow: {{ wpm | round(1) }} words a minute. Keep going!",
            ),
            "flow_state",
        ),
        rule(
            "publishing.book_published",
            "publishing",
            "medium",
            &["projectOwners"],
            inline(
                "Book published",
                "Book {{ bookId }} is live on {{ platforms | join(', ') }}.",
            ),
            "book_published",
        ),
        rule(
            "collaboration.conflict_detected",
            "collaboration",
            "high",
            &["user", "data.otherUserId"],
            inline(
                "Editing conflict",
                "Two collaborators are editing the same place ({{ reason | replace('_', ' ') }}, {{ severity }} risk).",
            ),
            "conflict",
        ),
        rule(
            "automation.workflow_failed",
            "automation",
            "high",
            &["user"],
            inline(
                "Workflow failed",
                "Workflow {{ workflowId }} failed (run {{ executionId }}): {{ error }}",
            ),
            "workflow_failed",
        ),
        rule(
            "analytics.threshold_crossed",
            "analytics",
            "high",
            &["projectOwners"],
            inline(
                "Threshold crossed",
                "{{ metric }} is {{ direction }} its threshold: {{ value }} (threshold {{ threshold }}).",
            ),
            "threshold",
        ),
        rule(
            "analytics.anomaly_detected",
            "analytics",
            "high",
            &["projectOwners"],
            inline(
                "Anomaly detected",
                "{{ metric }} is {{ value }}, expected about {{ expected }}.",
            ),
            "anomaly",
        ),
    ]
}

/// Checks rules against the known event types and notification categories; every problem is
/// reported as `rules[i].field: message`.
pub fn check(specs: &[RuleSpec], config: &NotifyConfig) -> Result<Vec<Rule>, Vec<String>> {
    let mut errors = Vec::new();
    let mut rules = Vec::new();
    let mut seen = HashSet::new();
    for (i, spec) in specs.iter().enumerate() {
        let mut err = |field: &str, msg: String| errors.push(format!("rules[{i}].{field}: {msg}"));
        let event = spec
            .event
            .split_once('.')
            .and_then(|(c, t)| Some((c.parse::<Category>().ok()?, t)))
            .filter(|(c, t)| c.has_type(t));
        if event.is_none() {
            err(
                "event",
                format!(
                    "{:?} is not a known event type (category.type, e.g. writing.flow_state_entered)",
                    spec.event
                ),
            );
        } else if !seen.insert(spec.event.clone()) {
            err(
                "event",
                format!(
                    "{:?} has a rule already (one rule per event type)",
                    spec.event
                ),
            );
        }
        if !config.is_known_category(&spec.category) {
            err(
                "category",
                format!(
                    "{:?} is not a notification category ({})",
                    spec.category,
                    config.categories.join(", ")
                ),
            );
        }
        let priority = Priority::parse(&spec.priority);
        if priority.is_none() {
            err(
                "priority",
                format!("{:?} is not critical, high, medium or low", spec.priority),
            );
        }
        let mut recipients = Vec::new();
        if spec.recipients.is_empty() {
            err("recipients", "names no one".into());
        }
        for (j, r) in spec.recipients.iter().enumerate() {
            match Recipient::parse(r) {
                Ok(r) => recipients.push(r),
                Err(m) => err(&format!("recipients[{j}]"), m),
            }
        }
        let content = match (&spec.template, &spec.template_name) {
            (Some(t), None) => match t.check() {
                Ok(()) => Some(RuleContent::Inline(t.clone())),
                Err(e) => {
                    err("template", e.to_string());
                    None
                }
            },
            (None, Some(name)) if templates::is_valid_name(name) => {
                Some(RuleContent::Saved(name.clone()))
            }
            (None, Some(name)) => {
                err("templateName", format!("{name:?} is not a template name"));
                None
            }
            _ => {
                err(
                    "template",
                    "give exactly one of template (inline) and templateName (saved)".into(),
                );
                None
            }
        };
        if let Some(g) = &spec.group_key
            && !is_valid_id(g)
        {
            err(
                "groupKey",
                format!("{g:?} breaks the identifier rule (1-64 of A-Z a-z 0-9 _ -)"),
            );
        }
        if let (Some((event_category, event_type)), Some(priority), Some(content)) =
            (event, priority, content)
        {
            rules.push(Rule {
                event_category,
                event_type: event_type.to_string(),
                category: spec.category.clone(),
                priority,
                recipients,
                content,
                channels: spec.channels.clone(),
                group_key: spec.group_key.clone(),
            });
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// The rule table: the defaults, or the file `INKWIRE_NOTIFY_RULES` names.
pub fn from_env(config: &NotifyConfig) -> anyhow::Result<Vec<Rule>> {
    match std::env::var("INKWIRE_NOTIFY_RULES") {
        Ok(path) if !path.trim().is_empty() => {
            let text = std::fs::read_to_string(path.trim())
                .map_err(|e| anyhow::anyhow!("INKWIRE_NOTIFY_RULES: cannot read {path:?}: {e}"))?;
            parse_file(&text, config)
                .map_err(|e| anyhow::anyhow!("INKWIRE_NOTIFY_RULES ({path}): {e}"))
        }
        _ => Ok(check(&default_rules(), config).expect("the default rules are valid")),
    }
}

/// Parses and checks a rule file.
pub fn parse_file(text: &str, config: &NotifyConfig) -> Result<Vec<Rule>, String> {
    let file: RuleFile = serde_json::from_str(text).map_err(|e| format!("not a rule file: {e}"))?;
    check(&file.rules, config).map_err(|errors| errors.join("; "))
}

/// What a rule's templates see: the event's data, plus `event` (id, type, userId, projectId,
/// documentId). The notification's `data` is the same object.
pub fn template_data(event: &Event) -> Value {
    let mut data = match &event.data {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let mut envelope = json!({
        "id": event.id,
        "type": format!("{}.{}", event.category.as_str(), event.event_type),
        "userId": event.user_id,
    });
    if let Some(p) = &event.project_id {
        envelope["projectId"] = json!(p);
    }
    if let Some(d) = &event.document_id {
        envelope["documentId"] = json!(d);
    }
    data.insert("event".into(), envelope);
    Value::Object(data)
}

fn permanent(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Permanent(e.to_string())
}

fn redis_retry(e: redis::RedisError) -> HandlerError {
    HandlerError::Retry(format!("redis: {e}"))
}

/// The recipients of `rule` for `event`, in rule order, each once.
pub async fn recipients(
    redis: &mut ConnectionManager,
    rule: &Rule,
    event: &Event,
) -> Result<Vec<String>, HandlerError> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |user: &str| {
        if is_valid_id(user) && !out.iter().any(|u| u == user) {
            out.push(user.to_string());
        }
    };
    for r in &rule.recipients {
        match r {
            Recipient::EventUser => add(&event.user_id),
            Recipient::DataField(field) => {
                if let Some(user) = event.data.get(field).and_then(Value::as_str) {
                    add(user);
                }
            }
            Recipient::ProjectOwners => {
                let Some(project) = event.project_id.as_deref().filter(|p| is_valid_id(p)) else {
                    continue;
                };
                let members = membership::members(redis, project)
                    .await
                    .map_err(redis_retry)?;
                for (user, role) in members {
                    if role == ProjectRole::Owner {
                        add(&user);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// The notifications `rule` makes of `event` (built like a send's, ids from the event id).
pub async fn notifications(
    redis: &mut ConnectionManager,
    rule: &Rule,
    event: &Event,
    created_at: OffsetDateTime,
) -> Result<Vec<Notification>, HandlerError> {
    let users = recipients(redis, rule, event).await?;
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let data = template_data(event);
    let req = SendRequest {
        recipients: users,
        category: rule.category.clone(),
        priority: rule.priority,
        content: match &rule.content {
            RuleContent::Saved(name) => Content::Template(name.clone()),
            // Rendered below; the request only needs a content form.
            RuleContent::Inline(t) => Content::Text {
                title: t.title.clone(),
                body: t.body.clone(),
            },
        },
        data: data.clone(),
        channels: rule.channels.clone(),
        send_at: None,
        group_key: rule.group_key.clone(),
        project_id: event.project_id.clone(),
        idempotency_key: None,
    };
    // A template that cannot render this event never will: dead-lettered with the reason.
    let texts = match &rule.content {
        RuleContent::Saved(_) => send::texts(redis, &req).await.map_err(|p| {
            if p.status >= 500 {
                HandlerError::Retry(p.detail.clone())
            } else {
                permanent(format!("{}: {}", p.code, p.detail))
            }
        })?,
        RuleContent::Inline(t) => {
            let r = t.render(&data).map_err(permanent)?;
            Texts {
                title: r.title,
                body: r.body,
                email: r.email,
                sms: r.sms,
                push: r.push,
                template: None,
            }
        }
    };
    Ok(send::build(&req, &texts, SENDER, event.id, created_at))
}

/// Applies the rules to delivered events (cheap to clone).
#[derive(Clone)]
pub struct RulesWorker {
    pub js: async_nats::jetstream::Context,
    pub redis: ConnectionManager,
    pub rules: Arc<Vec<Rule>>,
}

impl RulesWorker {
    /// Handles one event for the rule at `index`.
    pub async fn handle(&self, index: usize, d: Delivery) -> Result<(), HandlerError> {
        let rule = &self.rules[index];
        let event: Event = serde_json::from_slice(&d.payload)
            .map_err(|e| permanent(format!("not an event: {e}")))?;
        if event.category != rule.event_category || event.event_type != rule.event_type {
            return Ok(());
        }
        let mut redis = self.redis.clone();
        // The time JetStream stored the event: the same on every redelivery.
        let created_at = d.published.unwrap_or_else(OffsetDateTime::now_utc);
        let notifications = notifications(&mut redis, rule, &event, created_at).await?;
        for n in &notifications {
            jetstream::publish(&self.js, n.to_outgoing())
                .await
                .map_err(|e| HandlerError::Retry(format!("publishing a notification: {e}")))?;
        }
        tracing::debug!(event = %event.id, count = notifications.len(), "rule applied");
        Ok(())
    }
}

/// The consumer of one rule: its event type only, from events published after it was made.
pub fn spec(rule: &Rule) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(subjects::event_stream(rule.event_category), rule.durable())
        .filter(rule.subject());
    spec.deliver_policy = async_nats::jetstream::consumer::DeliverPolicy::New;
    spec.batch = 20;
    spec
}

/// Runs one consumer per rule until `shutdown`.
pub async fn run_rules(worker: RulesWorker, shutdown: Shutdown) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for (index, rule) in worker.rules.iter().enumerate() {
        let spec = spec(rule);
        let w = worker.clone();
        tasks.push(tokio::spawn(consumer::run(
            worker.js.clone(),
            spec,
            move |d| {
                let w = w.clone();
                async move { w.handle(index, d).await }
            },
            shutdown.clone(),
        )));
    }
    for task in tasks {
        let stats = task.await??;
        tracing::info!(?stats, "rules consumer stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> NotifyConfig {
        NotifyConfig::default()
    }

    #[test]
    fn the_defaults_are_valid_and_cover_the_issue() {
        let rules = check(&default_rules(), &config()).unwrap();
        let by: Vec<(String, Priority)> = rules
            .iter()
            .map(|r| (format!("{}.{}", r.event_category, r.event_type), r.priority))
            .collect();
        assert_eq!(
            by,
            [
                ("writing.flow_state_entered".to_string(), Priority::Low),
                ("publishing.book_published".into(), Priority::Medium),
                ("collaboration.conflict_detected".into(), Priority::High),
                ("automation.workflow_failed".into(), Priority::High),
                ("analytics.threshold_crossed".into(), Priority::High),
                ("analytics.anomaly_detected".into(), Priority::High),
            ]
        );
        assert_eq!(
            rules[2].recipients,
            [
                Recipient::EventUser,
                Recipient::DataField("otherUserId".into())
            ]
        );
        assert_eq!(
            rules[0].durable(),
            "notify-rules-writing-flow_state_entered"
        );
        assert_eq!(rules[0].subject(), "events.writing.flow_state_entered");
    }

    #[test]
    fn default_templates_render_each_schema_example() {
        // Every default renders with the example of its event's schema (required fields).
        for rule in check(&default_rules(), &config()).unwrap() {
            let path = format!("events/{}/{}.json", rule.event_category, rule.event_type);
            let schema: Value = serde_json::from_str(
                inkwire_shared::schema::SCHEMA_FILES
                    .iter()
                    .find(|(p, _)| *p == path)
                    .unwrap()
                    .1,
            )
            .unwrap();
            let example = schema["examples"][0].clone();
            let event = Event::builder(rule.event_category, &rule.event_type, "u-1")
                .project("p-1")
                .data(example)
                .build();
            let RuleContent::Inline(t) = &rule.content else {
                panic!("defaults are inline")
            };
            let r = t.render(&template_data(&event)).unwrap();
            assert!(!r.title.is_empty() && !r.body.contains("{{"), "{}", r.body);
        }
    }

    #[test]
    fn a_rule_file_replaces_the_table_and_bad_rules_are_named() {
        let rules = parse_file(
            r#"{"rules": [{"event": "system.service_started", "category": "system",
                "priority": "critical", "recipients": ["user"],
                "template": {"title": "Started", "body": "{{ event.userId }}"}}]}"#,
            &config(),
        )
        .unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].priority, Priority::Critical);
        assert_eq!(parse_file(r#"{"rules": []}"#, &config()).unwrap(), vec![]);

        let err = parse_file(
            r#"{"rules": [
              {"event": "writing.nope", "category": "poetry", "priority": "urgent",
               "recipients": ["everyone"], "template": {"title": "{{", "body": ""}},
              {"event": "writing.flow_state_entered", "category": "writing", "priority": "low",
               "recipients": [], "templateName": "a b", "groupKey": "a.b"},
              {"event": "writing.flow_state_entered", "category": "writing", "priority": "low",
               "recipients": ["user"]}
            ]}"#,
            &config(),
        )
        .unwrap_err();
        for needle in [
            "rules[0].event",
            "rules[0].category",
            "rules[0].priority",
            "rules[0].recipients[0]",
            "rules[0].template",
            "rules[1].recipients: names no one",
            "rules[1].templateName",
            "rules[1].groupKey",
            "rules[2].event",
            "rules[2].template: give exactly one",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
        let err = parse_file(r#"{"rules": [], "extra": 1}"#, &config()).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        assert!(parse_file("[", &config()).is_err());
    }

    #[test]
    fn recipients_parse() {
        assert_eq!(Recipient::parse("user"), Ok(Recipient::EventUser));
        assert_eq!(
            Recipient::parse("projectOwners"),
            Ok(Recipient::ProjectOwners)
        );
        assert_eq!(
            Recipient::parse("data.otherUserId"),
            Ok(Recipient::DataField("otherUserId".into()))
        );
        for bad in ["data.", "data.a.b", "owners", ""] {
            assert!(Recipient::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn template_data_has_the_envelope() {
        let event = Event::builder(Category::Collaboration, "conflict_detected", "u-1")
            .project("p-1")
            .data(json!({"otherUserId": "u-2"}))
            .build();
        let d = template_data(&event);
        assert_eq!(d["otherUserId"], "u-2");
        assert_eq!(d["event"]["type"], "collaboration.conflict_detected");
        assert_eq!(d["event"]["projectId"], "p-1");
    }
}
