//! The actions that reach people and models: `email` and `sms` (through the providers the
//! notifications use, [`inkwire_shared::providers`]: SMTP, and SNS), `notification` (a job
//! for the notifications service on `notify.send.{userId}`, so preferences, quiet hours,
//! digests and the inbox apply as to any other notification) and `ai` (an OpenAI-compatible
//! chat-completions endpoint).
//!
//! Repeats after a crash: a notification's id derives from the step and the recipient, so
//! JetStream stores it once; an email or SMS recipient already sent to by an earlier attempt
//! of the step is recorded (`inkwire:wf:sent:{runId}:{stepId}`) and skipped — the window
//! left is between the provider's acceptance and that record.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use inkwire_shared::jetstream::{self, Outgoing};
use inkwire_shared::membership;
use inkwire_shared::providers::{EmailProvider, ProviderConfig, SendError, SnsProvider};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use uuid::Uuid;

use crate::actions::{ActionContext, ActionError, StepScope};

/// The AI endpoint (`INKWIRE_WORKFLOW_AI_BASE_URL`, e.g. `http://127.0.0.1:11434/v1`;
/// `INKWIRE_WORKFLOW_AI_MODEL`; `INKWIRE_WORKFLOW_AI_API_KEY`, never logged).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AiConfig {
    pub base_url: Option<String>,
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

impl std::fmt::Debug for AiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AiConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl AiConfig {
    pub fn from_env() -> anyhow::Result<AiConfig> {
        let get = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let base_url =
            get("INKWIRE_WORKFLOW_AI_BASE_URL").map(|u| u.trim_end_matches('/').to_string());
        if let Some(u) = &base_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            anyhow::bail!("INKWIRE_WORKFLOW_AI_BASE_URL: not an http:// or https:// URL");
        }
        Ok(AiConfig {
            base_url,
            model: get("INKWIRE_WORKFLOW_AI_MODEL").unwrap_or_else(|| "gpt-4o-mini".into()),
            api_key: get("INKWIRE_WORKFLOW_AI_API_KEY"),
            timeout: Duration::from_secs(60),
        })
    }
}

/// The providers, built on first use (SNS's client needs an async start).
#[derive(Clone, Default)]
pub struct LazyProviders {
    cell: Arc<OnceCell<(Option<EmailProvider>, Option<SnsProvider>)>>,
}

impl LazyProviders {
    async fn get(
        &self,
        config: &ProviderConfig,
    ) -> Result<&(Option<EmailProvider>, Option<SnsProvider>), ActionError> {
        self.cell
            .get_or_try_init(|| async {
                let email = match &config.smtp_url {
                    Some(_) => Some(EmailProvider::new(config).map_err(|e| {
                        ActionError::permanent("provider_not_configured", e.to_string())
                    })?),
                    None => None,
                };
                let sns = if config.sns_enabled {
                    Some(SnsProvider::new(config).await)
                } else {
                    None
                };
                Ok((email, sns))
            })
            .await
    }
}

fn send_error(e: SendError) -> ActionError {
    if e.is_transient() {
        ActionError::transient("provider_unavailable", e.message())
    } else {
        ActionError::permanent("provider_refused", e.message())
    }
}

fn text<'a>(input: &'a Value, key: &str) -> Option<&'a str> {
    input
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Recipients already sent to by an earlier attempt of this step.
async fn already_sent(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    to: &str,
) -> Result<bool, ActionError> {
    let mut r = ctx.redis.clone();
    redis::cmd("SISMEMBER")
        .arg(sent_key(scope))
        .arg(to)
        .query_async(&mut r)
        .await
        .map_err(|e| ActionError::transient("redis_unavailable", e.to_string()))
}

async fn record_sent(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    to: &str,
) -> Result<(), ActionError> {
    let mut r = ctx.redis.clone();
    redis::pipe()
        .cmd("SADD")
        .arg(sent_key(scope))
        .arg(to)
        .cmd("EXPIRE")
        .arg(sent_key(scope))
        .arg(7 * 24 * 3600)
        .query_async::<()>(&mut r)
        .await
        .map_err(|e| ActionError::transient("redis_unavailable", e.to_string()))
}

fn sent_key(scope: &StepScope<'_>) -> String {
    format!("{}:sent:{}", crate::store::PREFIX, scope.idempotency_key)
}

pub async fn email(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    let to: Vec<String> = match input.get("to") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    if to.is_empty() || to.len() > 50 {
        return Err(ActionError::permanent(
            "invalid_input",
            "to: 1 to 50 addresses",
        ));
    }
    let subject = text(input, "subject")
        .ok_or_else(|| ActionError::permanent("invalid_input", "subject: required"))?;
    let html = text(input, "html");
    let body = text(input, "text")
        .or(html)
        .ok_or_else(|| ActionError::permanent("invalid_input", "text or html: one is required"))?;
    let (email, _) = ctx.providers.get(&ctx.config.providers).await?;
    let Some(email) = email else {
        return Err(ActionError::permanent(
            "provider_not_configured",
            "no email provider: INKWIRE_SMTP_URL is not set",
        ));
    };
    let mut sent = Vec::new();
    for address in &to {
        if already_sent(ctx, scope, address).await? {
            sent.push(json!({"to": address, "repeated": true}));
            continue;
        }
        let s = email
            .send(address, subject, body, html)
            .await
            .map_err(send_error)?;
        record_sent(ctx, scope, address).await?;
        sent.push(json!({"to": address, "messageId": s.provider_message_id}));
    }
    Ok(json!({"sent": sent}))
}

pub async fn sms(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    let to =
        text(input, "to").ok_or_else(|| ActionError::permanent("invalid_input", "to: required"))?;
    let body = text(input, "text")
        .ok_or_else(|| ActionError::permanent("invalid_input", "text: required"))?;
    let e164 = to
        .strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()));
    if !e164 {
        return Err(ActionError::permanent(
            "invalid_input",
            "to: a phone number in E.164 (+ and 8-15 digits)",
        ));
    }
    let (_, sns) = ctx.providers.get(&ctx.config.providers).await?;
    let Some(sns) = sns else {
        return Err(ActionError::permanent(
            "provider_not_configured",
            "no SMS provider: SNS is off (INKWIRE_SNS_ENABLED / INKWIRE_SNS_ENDPOINT)",
        ));
    };
    if already_sent(ctx, scope, to).await? {
        return Ok(json!({"to": to, "repeated": true}));
    }
    let s = sns.send_sms(to, body).await.map_err(send_error)?;
    record_sent(ctx, scope, to).await?;
    Ok(json!({"to": to, "messageId": s.provider_message_id}))
}

/// One job per recipient on `notify.send.{userId}`, in the notifications' wire format.
pub async fn notification(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    let users: Vec<String> = match (input.get("userId"), input.get("userIds")) {
        (Some(Value::String(u)), None) => vec![u.clone()],
        (None, Some(Value::Array(a))) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    if users.is_empty() || users.len() > 1000 {
        return Err(ActionError::permanent(
            "invalid_input",
            "userId or userIds (1 to 1,000): exactly one",
        ));
    }
    let category = text(input, "category").unwrap_or_default();
    let valid_category = category.len() <= 64
        && category
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase())
        && category
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid_category {
        return Err(ActionError::permanent(
            "invalid_input",
            "category: a category name (a-z, 0-9, _)",
        ));
    }
    let priority = text(input, "priority").unwrap_or("medium");
    if !["critical", "high", "medium", "low"].contains(&priority) {
        return Err(ActionError::permanent(
            "invalid_input",
            "priority: critical, high, medium or low",
        ));
    }
    let title = text(input, "title")
        .ok_or_else(|| ActionError::permanent("invalid_input", "title: required"))?;
    let body = text(input, "body").unwrap_or_default();
    if title.chars().count() > 200 || body.chars().count() > 10_000 {
        return Err(ActionError::permanent(
            "invalid_input",
            "title at most 200, body at most 10,000 characters",
        ));
    }
    // A workflow acts for its project: it notifies that project's members only.
    let mut r = ctx.redis.clone();
    for u in &users {
        if !membership::is_valid_id(u) {
            return Err(ActionError::permanent(
                "invalid_input",
                format!("{u:?} is not a user id"),
            ));
        }
        let role = membership::role_of(&mut r, scope.project, u)
            .await
            .map_err(|e| ActionError::transient("redis_unavailable", e.to_string()))?;
        if role.is_none() {
            return Err(ActionError::permanent(
                "recipient_not_member",
                format!("{u} is not a member of project {}", scope.project),
            ));
        }
    }
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let base = Uuid::new_v5(
        &Uuid::NAMESPACE_OID,
        format!("inkwire-wf-notify/{}", scope.idempotency_key).as_bytes(),
    );
    let mut ids = Vec::new();
    for u in &users {
        let id = Uuid::new_v5(&base, u.as_bytes());
        let job = json!({
            "id": id,
            "userId": u,
            "category": category,
            "priority": priority,
            "title": title,
            "body": body,
            "data": input.get("data").cloned().unwrap_or(json!({})),
            "projectId": scope.project,
            "createdAt": now,
            "sender": "workflows",
        });
        jetstream::publish(
            &ctx.js,
            Outgoing {
                subject: format!("{}.send.{u}", inkwire_shared::subjects::NOTIFY_PREFIX),
                msg_id: id.to_string(),
                payload: Bytes::from(job.to_string()),
            },
        )
        .await
        .map_err(|e| ActionError::transient("nats_unavailable", e.to_string()))?;
        ids.push(json!({"userId": u, "notificationId": id}));
    }
    Ok(json!({"notifications": ids}))
}

/// A chat completion: `{prompt}` (one user message, an optional `system`) or `{messages}`;
/// `model`, `temperature`, `maxTokens` optional; `responseFormat: "json"` asks for a JSON
/// object and parses it into `json`. The output is `{text, model, usage, json?}`.
pub async fn ai(ctx: &ActionContext, input: &Value) -> Result<Value, ActionError> {
    let ai = &ctx.config.ai;
    let Some(base) = &ai.base_url else {
        return Err(ActionError::permanent(
            "provider_not_configured",
            "no AI endpoint: INKWIRE_WORKFLOW_AI_BASE_URL is not set",
        ));
    };
    let messages = match (input.get("messages"), text(input, "prompt")) {
        (Some(Value::Array(m)), _) => Value::Array(m.clone()),
        (_, Some(p)) => {
            let mut m = Vec::new();
            if let Some(s) = text(input, "system") {
                m.push(json!({"role": "system", "content": s}));
            }
            m.push(json!({"role": "user", "content": p}));
            Value::Array(m)
        }
        _ => {
            return Err(ActionError::permanent(
                "invalid_input",
                "prompt or messages: one is required",
            ));
        }
    };
    let mut body = json!({
        "model": text(input, "model").unwrap_or(&ai.model),
        "messages": messages,
    });
    if let Some(t) = input.get("temperature").and_then(Value::as_f64) {
        body["temperature"] = json!(t);
    }
    if let Some(n) = input.get("maxTokens").and_then(Value::as_u64) {
        body["max_tokens"] = json!(n);
    }
    let want_json = input.get("responseFormat").and_then(Value::as_str) == Some("json");
    if want_json {
        body["response_format"] = json!({"type": "json_object"});
    }
    let mut req = ctx
        .ai_http
        .post(format!("{base}/chat/completions"))
        .json(&body)
        .timeout(ai.timeout);
    if let Some(k) = &ai.api_key {
        req = req.bearer_auth(k);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| ActionError::transient("ai_unreachable", e.to_string()))?;
    let status = resp.status().as_u16();
    let answer: Value = resp
        .json()
        .await
        .map_err(|e| ActionError::transient("ai_bad_answer", e.to_string()))?;
    if status >= 400 {
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let code = format!("ai_{status}");
        return Err(if status >= 500 || status == 429 {
            ActionError::transient(&code, message)
        } else {
            ActionError::permanent(&code, message)
        });
    }
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(|| ActionError::permanent("ai_bad_answer", "no choices[0].message.content"))?;
    let mut out = json!({"text": text, "model": answer["model"], "usage": answer["usage"]});
    if want_json {
        // The answer parsed (a model asked for JSON may still wrap it in a code fence).
        let trimmed = text
            .trim()
            .trim_start_matches("```json")
            .trim_start_matches("```")
            .trim_end_matches("```")
            .trim();
        out["json"] = serde_json::from_str::<Value>(trimmed).map_err(|e| {
            ActionError::transient("ai_bad_answer", format!("asked for JSON, got text ({e})"))
        })?;
    }
    Ok(out)
}
