//! Sending: the `Notification` job (one per recipient, carrying final rendered text), checking
//! a send request, deciding who may send to whom, building the jobs and publishing them to
//! `notify.send.{userId}` in the NOTIFY stream. Nothing is delivered here: the notifier
//! consumes the jobs.
//!
//! Notification ids are derived (UUIDv5) from the request's idempotent event id and the
//! recipient, so a retry of a send (same `Idempotency-Key`, or the `retryId` of an unknown
//! outcome) names the same notifications and JetStream drops the copies.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use inkwire_shared::auth::Caller;
use inkwire_shared::jetstream::{Outcome, Outgoing, PartialPublish};
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::schema::{FieldError, schemas};
use inkwire_shared::subjects;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::NotifyConfig;
use crate::model::{DeliveryChannel, Priority};
use crate::templates::{self, RenderedEmail};

/// The request body's schema.
pub const SCHEMA: &str = "api/notification-send-request.json";
/// How long a scheduled send's state is kept after it was due (cancel and the deliveries
/// route read it).
pub const SCHEDULED_KEEP_AFTER_DUE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The push part of a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushPayload {
    pub title: String,
    pub body: String,
    #[serde(default)]
    pub data: Value,
}

/// One recipient's notification: the job on `notify.send.{userId}` and what the inbox keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub id: Uuid,
    pub user_id: String,
    pub category: String,
    pub priority: Priority,
    pub title: String,
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<RenderedEmail>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushPayload>,
    #[serde(default)]
    pub data: Value,
    /// The channels the send was limited to (the routing result is intersected with them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<DeliveryChannel>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub send_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The user id of the caller who sent it.
    pub sender: String,
}

impl Notification {
    /// `notify.send.{userId}`.
    pub fn subject(&self) -> String {
        send_subject(&self.user_id)
    }

    /// `createdAt` in Unix milliseconds (the inbox score).
    pub fn created_ms(&self) -> i64 {
        (self.created_at.unix_timestamp_nanos() / 1_000_000) as i64
    }

    pub fn to_outgoing(&self) -> Outgoing {
        Outgoing {
            subject: self.subject(),
            msg_id: self.id.to_string(),
            payload: Bytes::from(serde_json::to_vec(self).expect("notifications serialize")),
        }
    }
}

/// `notify.send.{userId}` (`user_id` already checked with `membership::is_valid_id`).
pub fn send_subject(user_id: &str) -> String {
    format!("{}.send.{user_id}", subjects::NOTIFY_PREFIX)
}

/// The id of `recipient`'s notification of the send whose idempotent event id is `event_id`.
pub fn notification_id(event_id: Uuid, recipient: &str) -> Uuid {
    Uuid::new_v5(&event_id, recipient.as_bytes())
}

/// What a send says, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub recipients: Vec<String>,
    pub category: String,
    pub priority: Priority,
    pub content: Content,
    pub data: Value,
    pub channels: Option<Vec<DeliveryChannel>>,
    pub send_at: Option<OffsetDateTime>,
    pub group_key: Option<String>,
    pub project_id: Option<String>,
    pub idempotency_key: Option<String>,
}

/// The two forms of content.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Template(String),
    Text { title: String, body: String },
}

fn field(
    pointer: &str,
    rule: &str,
    value: Option<&Value>,
    message: impl Into<String>,
) -> FieldError {
    FieldError::new(pointer, rule, value, message)
}

/// Validates a send body (schema, then the rules a schema cannot say); every failing field is
/// named.
pub fn parse(
    body: &Value,
    config: &NotifyConfig,
    now: OffsetDateTime,
) -> Result<SendRequest, Problem> {
    schemas()
        .validate(SCHEMA, body)
        .map_err(Problem::validation)?;
    let mut errors = Vec::new();
    let recipients: Vec<String> = match (body.get("userId"), body.get("userIds")) {
        (Some(one), None) => vec![one.as_str().expect("schema").to_string()],
        (None, Some(many)) => many
            .as_array()
            .expect("schema")
            .iter()
            .map(|v| v.as_str().expect("schema").to_string())
            .collect(),
        (Some(_), Some(_)) => {
            errors.push(field(
                "/userIds",
                "oneRecipientForm",
                body.get("userIds"),
                "send either userId or userIds, not both",
            ));
            Vec::new()
        }
        (None, None) => {
            errors.push(field(
                "/userId",
                "required",
                None,
                "userId (one recipient) or userIds (1-1000) is required",
            ));
            Vec::new()
        }
    };
    if recipients.len() > config.max_recipients {
        errors.push(field(
            "/userIds",
            "maxItems",
            body.get("userIds"),
            format!("at most {} recipients per send", config.max_recipients),
        ));
    }
    let category = body["category"].as_str().expect("schema").to_string();
    if !config.is_known_category(&category) {
        errors.push(field(
            "/category",
            "knownCategory",
            body.get("category"),
            format!(
                "unknown category {category:?}; known: {}",
                config.categories.join(", ")
            ),
        ));
    }
    let priority =
        Priority::parse(body["priority"].as_str().expect("schema")).expect("schema enum");
    let has_text = body.get("title").is_some() || body.get("body").is_some();
    let content = match (body.get("template"), has_text) {
        (Some(t), false) => Some(Content::Template(t.as_str().expect("schema").to_string())),
        (None, true) => match (body.get("title"), body.get("body")) {
            (Some(t), Some(b)) => Some(Content::Text {
                title: t.as_str().expect("schema").to_string(),
                body: b.as_str().expect("schema").to_string(),
            }),
            (None, _) => {
                errors.push(field(
                    "/title",
                    "required",
                    None,
                    "title is required with body",
                ));
                None
            }
            (_, None) => {
                errors.push(field(
                    "/body",
                    "required",
                    None,
                    "body is required with title",
                ));
                None
            }
        },
        (Some(_), true) => {
            errors.push(field(
                "/template",
                "oneContentForm",
                body.get("template"),
                "send either template (+ data) or title + body, not both",
            ));
            None
        }
        (None, false) => {
            errors.push(field(
                "/template",
                "required",
                None,
                "template (+ data) or title + body is required",
            ));
            None
        }
    };
    // The schema checked the format with the same parser.
    let send_at = body
        .get("sendAt")
        .and_then(Value::as_str)
        .map(|text| inkwire_shared::schema::parse_date_time(text).expect("schema"));
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    if let Some(at) = send_at {
        if at <= now {
            return Err(Problem::bad_request(
                "send_at_in_past",
                format!(
                    "sendAt {} is not in the future (server time {})",
                    body["sendAt"].as_str().unwrap_or_default(),
                    rfc3339(now)
                ),
            ));
        }
        if (at - now).unsigned_abs() > config.max_send_horizon {
            return Err(Problem::bad_request(
                "send_at_too_far",
                format!(
                    "sendAt may be at most {} days ahead",
                    config.max_send_horizon.as_secs() / 86_400
                ),
            ));
        }
    }
    let str_of = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_string);
    Ok(SendRequest {
        recipients,
        category,
        priority,
        content: content.expect("checked"),
        data: body.get("data").cloned().unwrap_or_else(|| json!({})),
        channels: body.get("channels").map(|c| {
            c.as_array()
                .expect("schema")
                .iter()
                .map(|v| DeliveryChannel::parse(v.as_str().expect("schema")).expect("schema enum"))
                .collect()
        }),
        send_at,
        group_key: str_of("groupKey"),
        project_id: str_of("projectId"),
        idempotency_key: str_of("idempotencyKey"),
    })
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("times format")
}

/// Who may send: `service` / `admin` to anyone; anyone to themselves; a project owner to
/// members of `projectId` (required then; every recipient must be a member). A caller who
/// names a project must belong to it.
pub async fn authorize(
    redis: &mut ConnectionManager,
    caller: &Caller,
    req: &SendRequest,
) -> Result<(), Problem> {
    if caller.is_privileged() {
        return Ok(());
    }
    let only_self = req.recipients.iter().all(|r| *r == caller.user_id);
    let Some(project) = &req.project_id else {
        if only_self {
            return Ok(());
        }
        return Err(Problem::forbidden(
            "sending to other users needs projectId: a project you own, whose members they are",
        ));
    };
    let role = membership::role_of(redis, project, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    match role {
        None => {
            return Err(Problem::forbidden(format!(
                "you are not a member of project {project:?}"
            )));
        }
        Some(_) if only_self => return Ok(()),
        Some(ProjectRole::Owner) => {}
        Some(_) => {
            return Err(Problem::forbidden(format!(
                "sending to other members of project {project:?} needs the owner role"
            )));
        }
    }
    let members: HashSet<String> = membership::members(redis, project)
        .await
        .map_err(|e| dependency_failed("redis", e))?
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    if let Some(outsider) = req.recipients.iter().find(|r| !members.contains(*r)) {
        return Err(Problem::forbidden(format!(
            "recipient {outsider:?} is not a member of project {project:?}"
        ))
        .with_extension("userId", outsider.as_str()));
    }
    Ok(())
}

/// The title, body and channel texts of a send (rendering its template once).
pub struct Texts {
    pub title: String,
    pub body: String,
    pub email: Option<RenderedEmail>,
    pub sms: Option<String>,
    pub push: Option<(String, String)>,
    pub template: Option<String>,
}

/// Renders the send's template (404 when unknown) or takes its title and body.
pub async fn texts(redis: &mut ConnectionManager, req: &SendRequest) -> Result<Texts, Problem> {
    match &req.content {
        Content::Text { title, body } => Ok(Texts {
            title: title.clone(),
            body: body.clone(),
            email: None,
            sms: None,
            push: None,
            template: None,
        }),
        Content::Template(name) => {
            let template = templates::load(redis, name)
                .await
                .map_err(|e| dependency_failed("redis", e))?
                .ok_or_else(|| {
                    Problem::unprocessable(
                        "unknown_template",
                        format!("no notification template {name:?} is saved"),
                    )
                })?;
            let r = template.render(&req.data)?;
            Ok(Texts {
                title: r.title,
                body: r.body,
                email: r.email,
                sms: r.sms,
                push: r.push,
                template: Some(name.clone()),
            })
        }
    }
}

/// One notification per recipient.
pub fn build(
    req: &SendRequest,
    texts: &Texts,
    sender: &str,
    event_id: Uuid,
    now: OffsetDateTime,
) -> Vec<Notification> {
    let common = common(req, texts, sender, now);
    req.recipients
        .iter()
        .map(|user| for_recipient(&common, event_id, user))
        .collect()
}

/// What every recipient's notification of a send shares (id nil, `userId` empty).
fn common(req: &SendRequest, texts: &Texts, sender: &str, now: OffsetDateTime) -> Notification {
    Notification {
        id: Uuid::nil(),
        user_id: String::new(),
        category: req.category.clone(),
        priority: req.priority,
        title: texts.title.clone(),
        body: texts.body.clone(),
        email: texts.email.clone(),
        sms: texts.sms.clone(),
        push: texts.push.as_ref().map(|(title, body)| PushPayload {
            title: title.clone(),
            body: body.clone(),
            data: Value::Null,
        }),
        data: req.data.clone(),
        channels: req.channels.clone(),
        group_key: req.group_key.clone(),
        template: texts.template.clone(),
        project_id: req.project_id.clone(),
        send_at: req.send_at,
        created_at: now,
        sender: sender.to_string(),
    }
}

/// `recipient`'s notification of the send `event_id` whose shared part is `common`.
fn for_recipient(common: &Notification, event_id: Uuid, recipient: &str) -> Notification {
    let id = notification_id(event_id, recipient);
    let mut n = common.clone();
    n.id = id;
    n.user_id = recipient.to_string();
    if let Some(push) = &mut n.push {
        push.data = json!({"notificationId": id, "category": n.category});
    }
    n
}

/// A send to several recipients as one job on `notify.send.bulk.{eventId}`: one stored
/// message instead of one per recipient, so a bulk send is accepted or refused as a whole
/// (never half published) and the notifier handles its recipients together. The notifier
/// expands it into exactly the notifications [`build`] makes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BulkJob {
    pub event_id: Uuid,
    pub recipients: Vec<String>,
    /// What every recipient's notification shares (id nil, `userId` empty).
    pub common: Notification,
}

/// The token after `notify.send.` that marks a bulk job (`notify.send.bulk.{eventId}` has
/// four tokens; a recipient's subject `notify.send.{userId}` has three, so no user id can
/// collide with it).
pub const BULK_TOKEN: &str = "bulk";

impl BulkJob {
    pub fn new(
        req: &SendRequest,
        texts: &Texts,
        sender: &str,
        event_id: Uuid,
        now: OffsetDateTime,
    ) -> BulkJob {
        BulkJob {
            event_id,
            recipients: req.recipients.clone(),
            common: common(req, texts, sender, now),
        }
    }

    /// `notify.send.bulk.{eventId}`.
    pub fn subject(&self) -> String {
        bulk_subject(self.event_id)
    }

    /// Every recipient's notification, in the order of `recipients`.
    pub fn notifications(&self) -> Vec<Notification> {
        self.recipients
            .iter()
            .map(|user| for_recipient(&self.common, self.event_id, user))
            .collect()
    }

    pub fn to_outgoing(&self) -> Outgoing {
        Outgoing {
            subject: self.subject(),
            msg_id: format!("bulk:{}", self.event_id),
            payload: Bytes::from(serde_json::to_vec(self).expect("bulk jobs serialize")),
        }
    }
}

/// `notify.send.bulk.{eventId}`.
pub fn bulk_subject(event_id: Uuid) -> String {
    format!("{}.send.{BULK_TOKEN}.{event_id}", subjects::NOTIFY_PREFIX)
}

/// The event id of a bulk job's subject, `None` for any other subject.
pub fn bulk_event_id(subject: &str) -> Option<Uuid> {
    let rest = subject
        .strip_prefix(subjects::NOTIFY_PREFIX)?
        .strip_prefix(".send.")?
        .strip_prefix(BULK_TOKEN)?
        .strip_prefix('.')?;
    Uuid::parse_str(rest).ok()
}

/// The notifications of one stored `notify.send.>` message: a bulk job's recipients, or the
/// one notification of a recipient's subject (for readers of the stream, such as tests and
/// tools; the notifier checks each).
pub fn notifications_of(subject: &str, payload: &[u8]) -> Result<Vec<Notification>, String> {
    if bulk_event_id(subject).is_some() {
        let job: BulkJob = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        Ok(job.notifications())
    } else {
        let n: Notification = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        Ok(vec![n])
    }
}

/// `inkwire:notify:scheduled:{notificationId}`.
pub fn scheduled_key(id: Uuid) -> String {
    format!("inkwire:notify:scheduled:{id}")
}

/// A scheduled send's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scheduled {
    /// `pending`, `cancelled` or `sent`.
    pub state: String,
    pub sender: String,
    pub user_id: String,
    pub send_at: String,
}

/// Records every scheduled notification as pending before it is published. A record that
/// exists already (a retry of the same send) is kept: a cancel in between stays a cancel.
pub async fn record_scheduled(
    redis: &mut ConnectionManager,
    notifications: &[Notification],
    now: OffsetDateTime,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for n in notifications {
        let Some(at) = n.send_at else { continue };
        let record = Scheduled {
            state: "pending".into(),
            sender: n.sender.clone(),
            user_id: n.user_id.clone(),
            send_at: rfc3339(at),
        };
        let ttl = (at - now).unsigned_abs() + SCHEDULED_KEEP_AFTER_DUE;
        pipe.cmd("SET")
            .arg(scheduled_key(n.id))
            .arg(serde_json::to_string(&record).expect("records serialize"))
            .arg("NX")
            .arg("EX")
            .arg(ttl.as_secs().max(1))
            .ignore();
    }
    pipe.query_async::<()>(redis).await
}

/// What cancelling a scheduled send found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// It was pending and is cancelled now.
    Cancelled,
    /// It was cancelled before.
    AlreadyCancelled,
    /// It went out already.
    AlreadySent,
    /// No such scheduled send, or not the caller's.
    NotFound,
}

/// Pending → cancelled, atomically (the scheduler flips pending → sent with the same kind of
/// check, so exactly one of the two wins). Only the sender, or a privileged caller, may.
const CANCEL: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 'not_found' end
local rec = cjson.decode(cur)
if ARGV[2] ~= '1' and rec.sender ~= ARGV[1] then return 'not_found' end
if rec.state == 'cancelled' then return 'already_cancelled' end
if rec.state ~= 'pending' then return 'already_sent' end
rec.state = 'cancelled'
redis.call('SET', KEYS[1], cjson.encode(rec), 'KEEPTTL')
return 'cancelled'
"#;
static CANCEL_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CANCEL));

pub async fn cancel(
    redis: &mut ConnectionManager,
    id: Uuid,
    caller: &Caller,
) -> redis::RedisResult<Cancel> {
    let outcome: String = CANCEL_SCRIPT
        .key(scheduled_key(id))
        .arg(&caller.user_id)
        .arg(if caller.is_privileged() { "1" } else { "0" })
        .invoke_async(redis)
        .await?;
    Ok(match outcome.as_str() {
        "cancelled" => Cancel::Cancelled,
        "already_cancelled" => Cancel::AlreadyCancelled,
        "already_sent" => Cancel::AlreadySent,
        _ => Cancel::NotFound,
    })
}

/// The scheduled state of `id`, if it was a scheduled send.
pub async fn scheduled(
    redis: &mut ConnectionManager,
    id: Uuid,
) -> redis::RedisResult<Option<Scheduled>> {
    let raw: Option<String> = redis::cmd("GET")
        .arg(scheduled_key(id))
        .query_async(redis)
        .await?;
    Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
}

/// The `503` of a send that failed part way, with every recipient's outcome (`items`:
/// userId, id, `stored` / `unknown` / `not_stored`).
pub fn partial_failure(
    notifications: &[Notification],
    e: PartialPublish,
    retry_id: &str,
) -> Problem {
    let items: Vec<Value> = notifications
        .iter()
        .zip(&e.outcomes)
        .map(|(n, outcome)| {
            let mut item = json!({"userId": n.user_id, "id": n.id, "outcome": outcome.as_str()});
            if let Outcome::Stored(p) = outcome {
                item["sequence"] = json!(p.sequence);
            }
            item
        })
        .collect();
    let (stored, unknown, not_stored) =
        (e.count("stored"), e.count("unknown"), e.count("not_stored"));
    let summary = format!(
        "{stored} notification(s) stored, {unknown} unknown (sent, not acknowledged), {not_stored} not stored; see items"
    );
    let problem = if unknown > 0 {
        tracing::warn!(error = %e, "send not fully acknowledged");
        Problem::outcome_unknown(
            format!(
                "nats did not acknowledge every notification in time: {summary}. Retry with \
                 retryId as the Idempotency-Key header: what is stored already is deduplicated"
            ),
            Some(retry_id),
        )
    } else {
        tracing::error!(error = %e, "send publish failed");
        Problem::unavailable(format!(
            "nats is unavailable: {summary}. Retry with retryId as the Idempotency-Key header: \
             what is stored already is deduplicated"
        ))
        .with_extension("retryId", retry_id)
        .with_retry_after(1)
    };
    problem.with_extension("items", items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse(
            "2026-11-22T12:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    }

    fn parse_ok(body: Value) -> SendRequest {
        parse(&body, &NotifyConfig::default(), now()).unwrap()
    }

    fn parse_err(body: Value) -> Problem {
        parse(&body, &NotifyConfig::default(), now()).unwrap_err()
    }

    #[test]
    fn both_forms_parse() {
        let r = parse_ok(
            json!({"userId": "u-1", "category": "chat", "priority": "high",
            "title": "Hi", "body": "there", "channels": ["email", "in_app"],
            "sendAt": "2026-11-23T08:00:00+01:00", "groupKey": "thread-9", "projectId": "p-1"}),
        );
        assert_eq!(r.recipients, ["u-1"]);
        assert_eq!(r.priority, Priority::High);
        assert_eq!(
            r.content,
            Content::Text {
                title: "Hi".into(),
                body: "there".into()
            }
        );
        assert_eq!(
            r.channels,
            Some(vec![DeliveryChannel::Email, DeliveryChannel::InApp])
        );
        assert_eq!(
            r.send_at.unwrap().unix_timestamp(),
            now().unix_timestamp() + 19 * 3600
        );
        let r = parse_ok(
            json!({"userIds": ["a", "b"], "category": "system", "priority": "low",
            "template": "welcome", "data": {"name": "Ada"}}),
        );
        assert_eq!(r.recipients, ["a", "b"]);
        assert_eq!(r.content, Content::Template("welcome".into()));
        assert_eq!(r.data, json!({"name": "Ada"}));
    }

    #[test]
    fn bad_sends_name_the_field() {
        let cases = [
            (
                json!({"userId": "u", "category": "chat", "priority": "urgent", "title": "t", "body": "b"}),
                "/priority",
            ),
            (
                json!({"userId": "u", "category": "poetry", "priority": "low", "title": "t", "body": "b"}),
                "/category",
            ),
            (
                json!({"userId": "u", "userIds": ["v"], "category": "chat", "priority": "low", "title": "t", "body": "b"}),
                "/userIds",
            ),
            (
                json!({"category": "chat", "priority": "low", "title": "t", "body": "b"}),
                "/userId",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low", "template": "x", "title": "t", "body": "b"}),
                "/template",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low"}),
                "/template",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low", "title": "t"}),
                "/body",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low", "title": "x".repeat(201), "body": "b"}),
                "/title",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low", "title": "t", "body": "b", "channels": ["fax"]}),
                "/channels/0",
            ),
            (
                json!({"userId": "a.b", "category": "chat", "priority": "low", "title": "t", "body": "b"}),
                "/userId",
            ),
            (
                json!({"userIds": ["a", "a"], "category": "chat", "priority": "low", "title": "t", "body": "b"}),
                "/userIds",
            ),
            (
                json!({"userIds": [], "category": "chat", "priority": "low", "title": "t", "body": "b"}),
                "/userIds",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low", "title": "t", "body": "b", "sendAt": "tomorrow"}),
                "/sendAt",
            ),
            (
                json!({"userId": "u", "category": "chat", "priority": "low", "title": "t", "body": "b", "extra": 1}),
                "/extra",
            ),
        ];
        for (body, pointer) in cases {
            let p = parse_err(body.clone());
            assert_eq!(p.code, "validation_failed", "{body}: {p}");
            assert!(
                p.errors.iter().any(|e| e.pointer == pointer),
                "{body}: {:?}",
                p.errors
            );
        }
        let many: Vec<String> = (0..1001).map(|i| format!("u-{i}")).collect();
        let p = parse_err(
            json!({"userIds": many, "category": "chat", "priority": "low", "title": "t", "body": "b"}),
        );
        assert_eq!(p.errors[0].pointer, "/userIds");
    }

    #[test]
    fn send_at_must_be_ahead_and_within_the_horizon() {
        let body = |at: &str| json!({"userId": "u", "category": "chat", "priority": "low", "title": "t", "body": "b", "sendAt": at});
        assert_eq!(
            parse_err(body("2026-11-22T11:59:59Z")).code,
            "send_at_in_past"
        );
        assert_eq!(
            parse_err(body("2026-11-22T12:00:00Z")).code,
            "send_at_in_past"
        );
        assert_eq!(
            parse_err(body("2027-11-23T12:00:00Z")).code,
            "send_at_too_far"
        );
        parse_ok(body("2027-11-22T12:00:00Z"));
    }

    #[test]
    fn ids_are_derived_per_recipient() {
        let e = Uuid::now_v7();
        assert_eq!(notification_id(e, "a"), notification_id(e, "a"));
        assert_ne!(notification_id(e, "a"), notification_id(e, "b"));
        assert_ne!(
            notification_id(e, "a"),
            notification_id(Uuid::now_v7(), "a")
        );
    }

    #[test]
    fn the_job_is_camel_case_and_round_trips() {
        let req = parse_ok(
            json!({"userIds": ["a", "b"], "category": "chat", "priority": "high",
            "title": "Hi", "body": "there", "groupKey": "g"}),
        );
        let texts = Texts {
            title: "Hi".into(),
            body: "there".into(),
            email: None,
            sms: None,
            push: Some(("P".into(), "Q".into())),
            template: None,
        };
        let ns = build(&req, &texts, "svc", Uuid::now_v7(), now());
        assert_eq!(ns.len(), 2);
        let v = serde_json::to_value(&ns[1]).unwrap();
        assert_eq!(v["userId"], "b");
        assert_eq!(v["groupKey"], "g");
        assert_eq!(v["createdAt"], "2026-11-22T12:00:00Z");
        assert_eq!(v["push"]["data"]["notificationId"], json!(ns[1].id));
        assert!(v.get("sendAt").is_none() && v.get("email").is_none());
        let back: Notification = serde_json::from_value(v).unwrap();
        assert_eq!(back, ns[1]);
        assert_eq!(ns[0].subject(), "notify.send.a");

        // The bulk job of the same send expands into exactly these notifications.
        let event = Uuid::now_v7();
        let job = BulkJob::new(&req, &texts, "svc", event, now());
        let out = job.to_outgoing();
        assert_eq!(out.subject, format!("notify.send.bulk.{event}"));
        assert_eq!(bulk_event_id(&out.subject), Some(event));
        assert_eq!(
            notifications_of(&out.subject, &out.payload).unwrap(),
            build(&req, &texts, "svc", event, now())
        );
    }

    #[test]
    fn only_bulk_subjects_name_an_event() {
        let e = Uuid::now_v7();
        assert_eq!(bulk_event_id(&format!("notify.send.bulk.{e}")), Some(e));
        for other in [
            "notify.send.bulk".to_string(),
            "notify.send.bulky".to_string(),
            "notify.send.bulk.not-a-uuid".to_string(),
            format!("notify.send.bulk.{e}.x"),
            format!("notify.deliver.bulk.{e}"),
            "notify.send.u-1".to_string(),
        ] {
            assert_eq!(bulk_event_id(&other), None, "{other}");
        }
    }
}
