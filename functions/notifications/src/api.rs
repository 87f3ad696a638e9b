//! The notifications HTTP API (every route behind a bearer token, every error problem+json):
//! - `POST /api/realtime/notifications/send` — validate, authorize, render, publish one job
//!   per recipient to NOTIFY (`202`); retry-safe through `shared::idempotent_requests`;
//! - `GET /api/realtime/notifications` (`?unread=true&limit=&cursor=`) and
//!   `GET …/unread-count` — the caller's inbox;
//! - `POST …/{id}/read`, `POST …/read-all`, `DELETE …/{id}` — inbox changes, each pushed live;
//! - `DELETE …/scheduled/{id}` — cancel a scheduled send;
//! - `GET …/{id}/deliveries` — the delivery log;
//! - `PUT` / `GET` / `DELETE …/templates/{name}` — templates (service / admin);
//! - `GET` / `PUT …/preferences` — the caller's preferences (`crate::preferences` validates
//!   them), stored at `inkwire:notify:prefs:{userId}`, shown with the push devices kept beside
//!   them (`inkwire:notify:devices:{userId}`);
//! - `POST …/preferences/devices` and `DELETE …/preferences/devices/{id}` — push devices
//!   (an SNS platform endpoint per token; `crate::devices` keeps them).
//!
//! A notification id that is not the caller's is answered exactly like one that does not
//! exist (`404`), so ids of other users' notifications cannot be probed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::http::JsonBody;
use inkwire_shared::idempotent_requests::{self, IdempotencyKey, Scope};
use inkwire_shared::jetstream;
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::schema::{FieldError, schemas};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::NotifyConfig;
use crate::delivery_log;
use crate::devices::{self, Stored};
use crate::inbox::{self, Cursor, InboxError};
use crate::preferences::{Device, Preferences};
use crate::providers::{Providers, SendError, SnsProvider};
use crate::send::{self, Cancel};
use crate::templates::{self, Template};
use inkwire_shared::problem::refuse_unknown_params;

/// Default page size of the inbox list.
pub const DEFAULT_PAGE: usize = 20;

#[derive(Clone)]
pub struct NotificationsApi {
    pub app: AppState,
    pub config: Arc<NotifyConfig>,
    /// The providers (the devices routes create and delete SNS platform endpoints).
    pub providers: Providers,
}

impl axum::extract::FromRef<NotificationsApi> for AppState {
    fn from_ref(n: &NotificationsApi) -> AppState {
        n.app.clone()
    }
}

pub fn routes(api: NotificationsApi) -> Router {
    Router::new()
        .route("/api/realtime/notifications", get(list))
        .route("/api/realtime/notifications/send", post(send_notification))
        .route(
            "/api/realtime/notifications/unread-count",
            get(unread_count),
        )
        .route("/api/realtime/notifications/read-all", post(read_all))
        .route("/api/realtime/notifications/{id}/read", post(read_one))
        .route("/api/realtime/notifications/{id}", delete(delete_one))
        .route(
            "/api/realtime/notifications/{id}/deliveries",
            get(deliveries),
        )
        .route(
            "/api/realtime/notifications/scheduled/{id}",
            delete(cancel_scheduled),
        )
        .route(
            "/api/realtime/notifications/templates/{name}",
            put(put_template).get(get_template).delete(delete_template),
        )
        .route(
            "/api/realtime/notifications/preferences",
            get(get_preferences).put(put_preferences),
        )
        .route(
            "/api/realtime/notifications/preferences/devices",
            post(register_device),
        )
        .route(
            "/api/realtime/notifications/preferences/devices/{id}",
            delete(delete_device),
        )
        .with_state(api)
}

fn redis_err(e: redis::RedisError) -> Problem {
    dependency_failed("redis", e)
}

fn inbox_err(e: InboxError) -> Problem {
    match e {
        InboxError::Redis(e) => redis_err(e),
        InboxError::Push(e) => {
            tracing::error!(error = %e, "inbox change saved, live push failed");
            Problem::unavailable(
                "the change is saved but the live update could not be pushed; retry the request \
                 (it changes nothing twice) to push it again",
            )
            .with_retry_after(1)
        }
    }
}

/// A notification id from the path; anything that is not a UUID names no notification.
fn notification_id(raw: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(raw)
        .ok()
        .filter(|_| raw.len() == 36)
        .ok_or_else(|| no_notification(raw))
}

fn no_notification(raw: &str) -> Problem {
    Problem::not_found(format!(
        "no notification {:?}",
        inkwire_shared::problem::clip(raw, 64)
    ))
}

fn privileged(caller: &Caller, what: &str) -> Result<(), Problem> {
    if caller.is_privileged() {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "{what} needs the service or admin role"
        )))
    }
}

async fn send_notification(
    State(api): State<NotificationsApi>,
    caller: Caller,
    key: IdempotencyKey,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let now = OffsetDateTime::now_utc();
    let req = send::parse(&body, &api.config, now)?;
    let key = key.or_body_id(req.idempotency_key.as_deref())?;
    let mut redis = api.app.redis.clone();
    send::authorize(&mut redis, &caller, &req).await?;
    // Rendered before the key is claimed: a missing template or variable claims nothing.
    let texts = send::texts(&mut redis, &req).await?;
    let scope = Scope {
        route: "notifications.send",
        caller: &caller.user_id,
        target: "send",
    };
    let (api, req, texts, caller) = (&api, &req, &texts, &caller);
    let outcome =
        idempotent_requests::run(&api.app, scope, key, Some(&body), |attempt| async move {
            let notifications = send::build(req, texts, &caller.user_id, attempt.event_id, now);
            // One recipient: its own subject (a recipient's sends are handled in order).
            // Several: one bulk job, accepted or refused as a whole.
            let (outgoing, what) = match notifications.as_slice() {
                [n] => (
                    n.to_outgoing(),
                    format!("the notification for {:?}", n.user_id),
                ),
                _ => (
                    send::BulkJob::new(req, texts, &caller.user_id, attempt.event_id, now)
                        .to_outgoing(),
                    format!("the bulk job for {} recipients", notifications.len()),
                ),
            };
            // The job fits in a NATS message, or nothing is published.
            let client = api.app.js.client();
            if let Err(e) = jetstream::check_message(&client, &outgoing) {
                return Err(attempt.publish_problem(&e, &what));
            }
            let mut redis = api.app.redis.clone();
            if req.send_at.is_some() {
                send::record_scheduled(&mut redis, &notifications, now)
                    .await
                    .map_err(redis_err)?;
            }
            jetstream::publish_windowed(&api.app.js, vec![outgoing], 1)
                .await
                .map_err(|e| {
                    send::partial_failure(
                        &notifications,
                        e.for_each(notifications.len()),
                        &attempt.key,
                    )
                })?;
            let list: Vec<Value> = notifications
                .iter()
                .map(|n| json!({"userId": n.user_id, "id": n.id}))
                .collect();
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"notifications": list, "scheduled": req.send_at.is_some()})),
            )
                .into_response())
        })
        .await;
    // Issue 9: the same key with a different body is a conflict on this route.
    outcome.map_err(|mut p| {
        if p.code == "idempotency_key_reused" {
            p.status = StatusCode::CONFLICT.as_u16();
        }
        p
    })
}

async fn list(
    State(api): State<NotificationsApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, Problem> {
    refuse_unknown_params(&params, &["unread", "limit", "cursor"])?;
    let unread_only = match params.get("unread").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(Problem::bad_request(
                "invalid_parameter",
                format!(
                    "unread: {:?} is not true or false",
                    inkwire_shared::problem::clip(other, 64)
                ),
            ));
        }
    };
    let limit = match params.get("limit") {
        None => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=inbox::MAX_PAGE).contains(&n) => n,
            _ => {
                return Err(Problem::bad_request(
                    "invalid_parameter",
                    format!(
                        "limit: {:?} is not a whole number in 1..={}",
                        inkwire_shared::problem::clip(v, 64),
                        inbox::MAX_PAGE
                    ),
                ));
            }
        },
    };
    let cursor = match params.get("cursor") {
        None => None,
        Some(c) => Some(Cursor::decode(c).ok_or_else(|| {
            Problem::bad_request(
                "invalid_parameter",
                "cursor: not a cursor this API gave out (pass nextCursor as it is)",
            )
        })?),
    };
    let mut redis = api.app.redis.clone();
    let page = inbox::list(&mut redis, &caller.user_id, unread_only, limit, cursor)
        .await
        .map_err(redis_err)?;
    let mut out = json!({
        "notifications": page.notifications,
        "unreadCount": page.unread_count,
        "version": page.version,
    });
    if let Some(c) = page.next_cursor {
        out["nextCursor"] = json!(c.encode());
    }
    Ok(Json(out).into_response())
}

async fn unread_count(
    State(api): State<NotificationsApi>,
    caller: Caller,
) -> Result<Response, Problem> {
    let mut redis = api.app.redis.clone();
    let (count, version) = inbox::unread_count(&mut redis, &caller.user_id)
        .await
        .map_err(redis_err)?;
    Ok(Json(json!({"unreadCount": count, "version": version})).into_response())
}

async fn read_one(
    State(api): State<NotificationsApi>,
    caller: Caller,
    key: IdempotencyKey,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let id = notification_id(&raw)?;
    let target = id.to_string();
    let scope = Scope {
        route: "notifications.read",
        caller: &caller.user_id,
        target: &target,
    };
    let (api, caller) = (&api, &caller);
    idempotent_requests::run(&api.app, scope, key, None, |_| async move {
        let mut redis = api.app.redis.clone();
        let (unread, version, changed) =
            inbox::mark_read(&mut redis, &api.app.js, &caller.user_id, id)
                .await
                .map_err(inbox_err)?
                .ok_or_else(|| no_notification(&raw))?;
        Ok(Json(json!({"id": id, "read": true, "changed": changed,
            "unreadCount": unread, "version": version}))
        .into_response())
    })
    .await
}

async fn read_all(
    State(api): State<NotificationsApi>,
    caller: Caller,
    key: IdempotencyKey,
) -> Result<Response, Problem> {
    let scope = Scope {
        route: "notifications.read_all",
        caller: &caller.user_id,
        target: &caller.user_id,
    };
    let (api, caller) = (&api, &caller);
    idempotent_requests::run(&api.app, scope, key, None, |_| async move {
        let mut redis = api.app.redis.clone();
        let (marked, unread, version) =
            inbox::mark_all_read(&mut redis, &api.app.js, &caller.user_id)
                .await
                .map_err(inbox_err)?;
        Ok(
            Json(json!({"marked": marked, "unreadCount": unread, "version": version}))
                .into_response(),
        )
    })
    .await
}

async fn delete_one(
    State(api): State<NotificationsApi>,
    caller: Caller,
    key: IdempotencyKey,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let id = notification_id(&raw)?;
    let target = id.to_string();
    let scope = Scope {
        route: "notifications.delete",
        caller: &caller.user_id,
        target: &target,
    };
    let (api, caller) = (&api, &caller);
    idempotent_requests::run(&api.app, scope, key, None, |_| async move {
        let mut redis = api.app.redis.clone();
        let (unread, version) = inbox::delete(&mut redis, &api.app.js, &caller.user_id, id)
            .await
            .map_err(inbox_err)?
            .ok_or_else(|| no_notification(&raw))?;
        Ok(
            Json(json!({"id": id, "deleted": true, "unreadCount": unread, "version": version}))
                .into_response(),
        )
    })
    .await
}

async fn cancel_scheduled(
    State(api): State<NotificationsApi>,
    caller: Caller,
    key: IdempotencyKey,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let id = Uuid::parse_str(&raw)
        .ok()
        .filter(|_| raw.len() == 36)
        .ok_or_else(|| no_scheduled(&raw))?;
    let target = id.to_string();
    let scope = Scope {
        route: "notifications.cancel",
        caller: &caller.user_id,
        target: &target,
    };
    let (api, caller) = (&api, &caller);
    idempotent_requests::run(&api.app, scope, key, None, |_| async move {
        let mut redis = api.app.redis.clone();
        match send::cancel(&mut redis, id, caller)
            .await
            .map_err(redis_err)?
        {
            // Cancelling twice is answered like the first time: the send stays cancelled.
            Cancel::Cancelled | Cancel::AlreadyCancelled => {
                Ok(Json(json!({"id": id, "state": "cancelled"})).into_response())
            }
            Cancel::AlreadySent => Err(Problem::conflict(
                "scheduled_already_sent",
                format!("scheduled notification {id} was sent already; it cannot be cancelled"),
            )),
            Cancel::NotFound => Err(no_scheduled(&raw)),
        }
    })
    .await
}

fn no_scheduled(raw: &str) -> Problem {
    Problem::not_found(format!(
        "no scheduled notification {:?}",
        inkwire_shared::problem::clip(raw, 64)
    ))
}

async fn deliveries(
    State(api): State<NotificationsApi>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let id = notification_id(&raw)?;
    let mut redis = api.app.redis.clone();
    // Who it belongs to: the stored notification (or its tombstone), else a scheduled send.
    let parties = match inbox::parties(&mut redis, id).await.map_err(redis_err)? {
        Some(p) => Some((p.user_id, p.sender)),
        None => send::scheduled(&mut redis, id)
            .await
            .map_err(redis_err)?
            .map(|s| (s.user_id, s.sender)),
    };
    let entitled = caller.is_privileged()
        || parties
            .as_ref()
            .is_some_and(|(user, sender)| *user == caller.user_id || *sender == caller.user_id);
    if !entitled {
        return Err(no_notification(&raw));
    }
    let records = delivery_log::read(&mut redis, id)
        .await
        .map_err(redis_err)?;
    if parties.is_none() && records.is_empty() {
        return Err(no_notification(&raw));
    }
    Ok(Json(json!({"notificationId": id, "deliveries": records})).into_response())
}

fn template_name(name: &str) -> Result<(), Problem> {
    if templates::is_valid_name(name) {
        Ok(())
    } else {
        Err(Problem::bad_request(
            "invalid_id",
            format!(
                "template name {:?} must be 1-64 characters of a-z, 0-9, '_', '.' or '-', starting with a letter or digit",
                inkwire_shared::problem::clip(name, 64)
            ),
        ))
    }
}

fn no_template(name: &str) -> Problem {
    Problem::not_found(format!("no notification template {name:?}"))
}

async fn put_template(
    State(api): State<NotificationsApi>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    privileged(&caller, "saving a template")?;
    template_name(&name)?;
    schemas()
        .validate("api/notification-template.json", &body)
        .map_err(Problem::validation)?;
    let template: Template = serde_json::from_value(body.clone()).map_err(|e| {
        Problem::validation(vec![FieldError::new(
            "",
            "template",
            Some(&body),
            e.to_string(),
        )])
    })?;
    template.check()?;
    let mut redis = api.app.redis.clone();
    let replaced = templates::save(&mut redis, &name, &template)
        .await
        .map_err(redis_err)?;
    let status = if replaced {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(json!({"name": name, "template": template}))).into_response())
}

async fn get_template(
    State(api): State<NotificationsApi>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    privileged(&caller, "reading a template")?;
    template_name(&name)?;
    let mut redis = api.app.redis.clone();
    let template = templates::load(&mut redis, &name)
        .await
        .map_err(redis_err)?
        .ok_or_else(|| no_template(&name))?;
    Ok(Json(json!({"name": name, "template": template})).into_response())
}

async fn delete_template(
    State(api): State<NotificationsApi>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    privileged(&caller, "deleting a template")?;
    template_name(&name)?;
    let mut redis = api.app.redis.clone();
    if templates::delete(&mut redis, &name)
        .await
        .map_err(redis_err)?
    {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(no_template(&name))
    }
}

/// `inkwire:notify:prefs:{userId}`: the preferences document (JSON).
pub fn preferences_key(user: &str) -> String {
    format!("inkwire:notify:prefs:{user}")
}

/// `inkwire:notify:devices:{userId}`: HASH device id → device JSON.
pub fn devices_key(user: &str) -> String {
    format!("inkwire:notify:devices:{user}")
}

/// `user`'s preferences (the defaults when none were saved), with their push devices.
pub async fn load_preferences(
    redis: &mut ConnectionManager,
    user: &str,
) -> redis::RedisResult<Preferences> {
    let mut pipe = redis::pipe();
    read_preferences(&mut pipe, user);
    let (raw, devices): (Option<String>, Vec<(String, String)>) = pipe.query_async(redis).await?;
    Ok(preferences_from(raw, devices))
}

/// Adds the two reads of `user`'s preferences (the document, then the devices) to `pipe`, for
/// a caller that reads them with other keys in one round trip; [`preferences_from`] makes the
/// preferences of what they answered.
pub fn read_preferences(pipe: &mut redis::Pipeline, user: &str) {
    pipe.cmd("GET")
        .arg(preferences_key(user))
        .cmd("HGETALL")
        .arg(devices_key(user));
}

/// The preferences from the answers to [`read_preferences`] (defaults when none are stored).
pub fn preferences_from(raw: Option<String>, devices: Vec<(String, String)>) -> Preferences {
    let mut prefs = match raw {
        // Only `put_preferences` writes the key, with a document `Preferences::parse` accepted.
        Some(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
            tracing::error!(error = %e, "stored preferences do not parse; defaults used");
            Preferences::default()
        }),
        None => Preferences::default(),
    };
    let mut devices: Vec<Device> = devices
        .iter()
        .filter_map(|(_, json)| serde_json::from_str(json).ok())
        .collect();
    devices.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    prefs.devices = devices;
    prefs
}

async fn get_preferences(
    State(api): State<NotificationsApi>,
    caller: Caller,
) -> Result<Response, Problem> {
    let mut redis = api.app.redis.clone();
    let prefs = load_preferences(&mut redis, &caller.user_id)
        .await
        .map_err(redis_err)?;
    Ok(Json(prefs.with_all_categories(&api.config.categories)).into_response())
}

/// Replaces the caller's preferences (missing fields take the defaults); every failing field
/// is listed in `400 invalid_preferences`.
async fn put_preferences(
    State(api): State<NotificationsApi>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let mut prefs = Preferences::parse(body, &api.config.categories).map_err(|errors| {
        let mut p = Problem::bad_request(
            "invalid_preferences",
            format!(
                "{} field(s) invalid: {}",
                errors.len(),
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        );
        p.errors = errors.iter().map(|e| e.to_schema_error()).collect();
        p
    })?;
    // Devices are managed by their own routes, never through this document.
    prefs.devices.clear();
    let json = serde_json::to_string(&prefs).expect("preferences serialize");
    let mut redis = api.app.redis.clone();
    let _: () = redis::cmd("SET")
        .arg(preferences_key(&caller.user_id))
        .arg(json)
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    get_preferences(State(api), caller).await
}

/// The SNS provider with a platform application, or `503 provider_not_configured`.
fn push_provider(api: &NotificationsApi) -> Result<(&SnsProvider, &str), Problem> {
    let not_configured = |why: &str| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "provider_not_configured",
            format!("push devices cannot be registered on this server: {why}"),
        )
    };
    let sns = api.providers.sns.as_deref().ok_or_else(|| {
        not_configured("SNS is not configured (INKWIRE_SNS_PLATFORM_APPLICATION_ARN is not set)")
    })?;
    let app = sns.platform_application_arn().ok_or_else(|| {
        not_configured(
            "no SNS platform application (INKWIRE_SNS_PLATFORM_APPLICATION_ARN is not set)",
        )
    })?;
    Ok((sns, app))
}

fn sns_problem(e: SendError, what: &str) -> Problem {
    match e {
        SendError::Transient(m) => dependency_failed("sns", m),
        SendError::Permanent(m) => Problem::unprocessable(
            "device_rejected",
            format!(
                "SNS refused {what}: {}",
                inkwire_shared::problem::clip(&m, 300)
            ),
        ),
    }
}

/// Registers a push device: `{token, platform, deviceId?}` → an SNS platform endpoint for the
/// token, kept with the caller's devices. `201` with a new device; the same token again is
/// the same device (`200`).
async fn register_device(
    State(api): State<NotificationsApi>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    schemas()
        .validate("api/notification-device-request.json", &body)
        .map_err(Problem::validation)?;
    let token = body["token"].as_str().expect("schema");
    let platform = body["platform"].as_str().expect("schema");
    if !devices::is_valid_token(token) {
        return Err(Problem::validation(vec![FieldError::new(
            "/token",
            "deviceToken",
            None,
            format!(
                "a device token is 1-{} visible ASCII characters",
                devices::MAX_TOKEN_CHARS
            ),
        )]));
    }
    let (sns, app) = push_provider(&api)?;
    let app_platform = devices::application_platform(app).unwrap_or_default();
    if !devices::platform_matches(platform, app_platform) {
        let accepted: Vec<&str> = devices::PLATFORMS
            .iter()
            .filter(|(_, s)| s.eq_ignore_ascii_case(app_platform))
            .map(|(p, _)| *p)
            .collect();
        return Err(Problem::unprocessable(
            "unsupported_platform",
            format!(
                "this server's platform application is {app_platform}: it registers {} devices, not {platform}",
                accepted.join(" / ")
            ),
        ));
    }
    let id = match body.get("deviceId").and_then(Value::as_str) {
        Some(id) => id.to_string(),
        None => devices::derived_device_id(platform, token),
    };
    let mut redis = api.app.redis.clone();
    let mine = devices::list(&mut redis, &caller.user_id)
        .await
        .map_err(redis_err)?;
    let replacing = mine.iter().find(|d| d.id == id).cloned();
    if replacing.is_none() && mine.len() >= devices::MAX_DEVICES {
        return Err(Problem::conflict(
            "too_many_devices",
            format!(
                "at most {} push devices per user; delete one first",
                devices::MAX_DEVICES
            ),
        ));
    }
    let endpoint = sns
        .create_platform_endpoint(token, &caller.user_id)
        .await
        .map_err(|e| sns_problem(e, "the device token"))?;
    // The client's device id now names another token (a rotated token): the old endpoint goes.
    if let Some(old) = replacing.filter(|d| d.endpoint_arn != endpoint) {
        if let Err(e) = sns.delete_endpoint(&old.endpoint_arn).await {
            tracing::warn!(error = %e, "deleting a replaced endpoint failed");
        }
        devices::forget(&mut redis, &caller.user_id, &old)
            .await
            .map_err(redis_err)?;
    }
    let stored = devices::store(&mut redis, &caller.user_id, &id, platform, &endpoint)
        .await
        .map_err(redis_err)?;
    Ok(match stored {
        Stored::Created(d) => (StatusCode::CREATED, Json(devices::to_json(&d))).into_response(),
        Stored::Existing(d) => (StatusCode::OK, Json(devices::to_json(&d))).into_response(),
    })
}

/// Unregisters one of the caller's devices: its SNS endpoint is deleted, then the device.
async fn delete_device(
    State(api): State<NotificationsApi>,
    caller: Caller,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let no_device = || {
        Problem::not_found(format!(
            "no push device {:?}",
            inkwire_shared::problem::clip(&raw, 64)
        ))
    };
    if !inkwire_shared::membership::is_valid_id(&raw) {
        return Err(no_device());
    }
    let mut redis = api.app.redis.clone();
    let device = devices::get(&mut redis, &caller.user_id, &raw)
        .await
        .map_err(redis_err)?
        .ok_or_else(no_device)?;
    let (sns, _) = push_provider(&api)?;
    sns.delete_endpoint(&device.endpoint_arn)
        .await
        .map_err(|e| sns_problem(e, "deleting the endpoint"))?;
    devices::forget(&mut redis, &caller.user_id, &device)
        .await
        .map_err(redis_err)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
