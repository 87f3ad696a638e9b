//! The workflows HTTP API (bearer token on every route, problem+json errors):
//! - `POST /api/workflows/register` — a definition (`schemas/api/workflow-definition.json`);
//!   `201` new, `200` the same version again unchanged, `400` listing every problem with its
//!   JSON pointer, `409` a version that exists with other content or is not above the latest;
//! - `GET /api/workflows?projectId=` — the workflows the caller may read;
//! - `GET /api/workflows/{id}?version=` — a definition (the latest by default);
//! - `GET /api/workflows/templates`, `POST /api/workflows/templates/{name}/install` —
//!   `{projectId, id?, timeZone?, storeUrl?, email?}`: a built-in template registered in a
//!   project ([`crate::installing`]);
//! - `GET /api/workflows/stats?projectId=` — per workflow: runs started, completed, failed,
//!   cancelled and active, the mean duration of completed runs, steps succeeded and failed;
//! - `POST /api/workflows/{id}/execute` — `{input?, version?, idempotencyKey?}` (or an
//!   `Idempotency-Key` header) starts a run: `202 {runId, created}`; the same key answers
//!   the same run;
//! - `GET /api/workflows/{id}/executions?limit=&cursor=` — its runs, newest first;
//! - `GET /api/workflows/executions/{runId}` — a run with every step's status, attempts,
//!   input, output, error and timings;
//! - `POST /api/workflows/executions/{runId}/cancel` — `{compensate?}`;
//! - `POST /api/workflows/executions/{runId}/rerun` — `{version?}`: a failed or cancelled
//!   run again from where it stopped, keeping the outputs of the steps that succeeded.
//!
//! Who: a workflow belongs to its project; members (any role) read it and its runs, owners
//! register, execute and cancel; `service` and `admin` tokens everything. A workflow or run
//! the caller may not read is `404`, like one that does not exist.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::http::JsonBody;
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::problem::{
    Problem, checked_id, clip, dependency_failed, refuse_unknown_params,
};
use inkwire_shared::schema::FieldError;
use serde_json::{Value, json};

use crate::engine::{self, Engine, StartRequest, rfc3339};
use crate::registry::{self, Registered};
use crate::store::{self, status};
use crate::validate::parse_definition;

/// Ids a workflow cannot have: `GET /api/workflows/{id}` would meet these routes.
pub const RESERVED_IDS: [&str; 4] = ["register", "stats", "executions", "templates"];

#[derive(Clone)]
pub struct WorkflowsApi {
    pub app: AppState,
    pub engine: Engine,
}

impl axum::extract::FromRef<WorkflowsApi> for AppState {
    fn from_ref(a: &WorkflowsApi) -> AppState {
        a.app.clone()
    }
}

pub fn routes(api: WorkflowsApi) -> Router {
    Router::new()
        .route("/api/workflows", get(list))
        .route("/api/workflows/register", post(register))
        .route("/api/workflows/stats", get(stats))
        .route("/api/workflows/templates", get(templates))
        .route("/api/workflows/templates/{name}/install", post(install))
        .route("/api/workflows/{id}", get(show))
        .route("/api/workflows/{id}/execute", post(execute))
        .route("/api/workflows/{id}/executions", get(executions))
        .route("/api/workflows/executions/{run}", get(run_view))
        .route("/api/workflows/executions/{run}/cancel", post(cancel))
        .route("/api/workflows/executions/{run}/rerun", post(rerun))
        .with_state(api)
}

fn redis_err(e: impl std::fmt::Display) -> Problem {
    dependency_failed("redis", e)
}

fn not_found(what: &str, id: &str) -> Problem {
    let detail = format!("no {what} {id:?} you may read");
    if what == "workflow" {
        Problem::new(StatusCode::NOT_FOUND, "workflow_not_found", detail)
    } else {
        Problem::new(StatusCode::NOT_FOUND, "execution_not_found", detail)
    }
}

/// The caller's right on a project's workflows: `Some(true)` manage, `Some(false)` read.
async fn right(
    api: &WorkflowsApi,
    caller: &Caller,
    project: &str,
) -> Result<Option<bool>, Problem> {
    if caller.is_privileged() {
        return Ok(Some(true));
    }
    let mut redis = api.app.redis.clone();
    let role = membership::role_of(&mut redis, project, &caller.user_id)
        .await
        .map_err(redis_err)?;
    Ok(role.map(|r| r == ProjectRole::Owner))
}

/// A definition checked in full: `400 validation_failed` with every problem's pointer.
fn checked_definition(json: &Value) -> Result<crate::Definition, Problem> {
    parse_definition(json).map_err(|errors| {
        Problem::validation(
            errors
                .into_iter()
                .map(|e| FieldError {
                    pointer: e.path,
                    rule: "workflow".into(),
                    kind: "definition".into(),
                    message: e.message,
                })
                .collect(),
        )
    })
}

async fn register(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let definition = checked_definition(&body)?;
    if RESERVED_IDS.contains(&definition.id.as_str()) {
        return Err(Problem::validation(vec![FieldError {
            pointer: "/id".into(),
            rule: "workflow".into(),
            kind: "string".into(),
            message: format!(
                "{:?} is a word of the API's paths; choose another id",
                definition.id
            ),
        }]));
    }
    store_definition(&api, &caller, definition).await
}

/// Registers a checked definition for `caller` (an owner of its project).
async fn store_definition(
    api: &WorkflowsApi,
    caller: &Caller,
    definition: crate::Definition,
) -> Result<Response, Problem> {
    match right(api, caller, &definition.project_id).await? {
        Some(true) => {}
        Some(false) => {
            return Err(Problem::forbidden(
                "only the project's owners register its workflows",
            ));
        }
        None => {
            return Err(Problem::forbidden(format!(
                "you are not a member of project {}",
                definition.project_id
            )));
        }
    }
    let mut redis = api.app.redis.clone();
    let outcome = registry::register(&mut redis, &definition, &caller.user_id)
        .await
        .map_err(redis_err)?;
    let view = json!({"id": definition.id, "version": definition.version, "projectId": definition.project_id, "definition": definition});
    if matches!(outcome, Registered::Created | Registered::Unchanged) {
        // Unchanged too: a retry after a failure between the two steps indexes it then.
        crate::triggers::index(&mut redis, &definition)
            .await
            .map_err(redis_err)?;
    }
    match outcome {
        Registered::Created => Ok((StatusCode::CREATED, Json(view)).into_response()),
        Registered::Unchanged => Ok((StatusCode::OK, Json(view)).into_response()),
        Registered::VersionTaken => Err(Problem::conflict(
            "version_exists",
            format!(
                "version {} of {} is registered with other content; register version {} instead",
                definition.version,
                definition.id,
                definition.version + 1
            ),
        )),
        Registered::Stale { latest } => Err(Problem::conflict(
            "version_not_newer",
            format!(
                "{} is at version {latest}; a new version must be higher",
                definition.id
            ),
        )
        .with_extension("latestVersion", latest)),
        Registered::OtherProject { .. } => Err(Problem::conflict(
            "workflow_id_taken",
            format!(
                "the workflow id {} is used by another project",
                definition.id
            ),
        )),
    }
}

async fn summary(api: &WorkflowsApi, id: &str) -> Result<Option<Value>, Problem> {
    let mut redis = api.app.redis.clone();
    let Some((latest, _)) = registry::latest(&mut redis, id).await.map_err(redis_err)? else {
        return Ok(None);
    };
    let Some(d) = registry::load(&mut redis, id, latest)
        .await
        .map_err(redis_err)?
    else {
        return Ok(None);
    };
    Ok(Some(json!({
        "id": d.id,
        "latestVersion": latest,
        "projectId": d.project_id,
        "name": d.name,
        "description": d.description,
        "triggers": d.triggers,
        "steps": d.steps.len(),
    })))
}

async fn list(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    let mut out = Vec::new();
    for id in readable_ids(&api, &caller, &params).await? {
        if let Some(s) = summary(&api, &id).await? {
            out.push(s);
        }
    }
    Ok(Json(json!({"workflows": out})))
}

/// The ids of the workflows the caller may read, of `projectId` when given (`403` for a
/// project the caller is not a member of).
async fn readable_ids(
    api: &WorkflowsApi,
    caller: &Caller,
    params: &HashMap<String, String>,
) -> Result<Vec<String>, Problem> {
    refuse_unknown_params(params, &["projectId"])?;
    let mut redis = api.app.redis.clone();
    let projects: Vec<Option<String>> = match params.get("projectId") {
        Some(p) => {
            let p = checked_id("project", p)?;
            if right(api, caller, p).await?.is_none() {
                return Err(Problem::forbidden(format!(
                    "you are not a member of project {p}"
                )));
            }
            vec![Some(p.to_string())]
        }
        None if caller.is_privileged() => vec![None],
        None => membership::projects_of(&mut redis, &caller.user_id)
            .await
            .map_err(redis_err)?
            .into_iter()
            .map(Some)
            .collect(),
    };
    let mut ids = Vec::new();
    for p in projects {
        ids.extend(
            registry::ids(&mut redis, p.as_deref())
                .await
                .map_err(redis_err)?,
        );
    }
    Ok(ids)
}

/// The latest (or asked) version, if the caller may read it.
async fn readable(
    api: &WorkflowsApi,
    caller: &Caller,
    id: &str,
    version: Option<u32>,
) -> Result<(crate::Definition, bool), Problem> {
    let mut redis = api.app.redis.clone();
    let Some((latest, project)) = registry::latest(&mut redis, id).await.map_err(redis_err)? else {
        return Err(not_found("workflow", id));
    };
    let Some(manage) = right(api, caller, &project).await? else {
        return Err(not_found("workflow", id));
    };
    let v = version.unwrap_or(latest);
    match registry::load(&mut redis, id, v).await.map_err(redis_err)? {
        Some(d) => Ok((d, manage)),
        None => Err(Problem::not_found(format!(
            "{id} has no version {v} (latest: {latest})"
        ))),
    }
}

fn version_param(params: &HashMap<String, String>) -> Result<Option<u32>, Problem> {
    match params.get("version") {
        None => Ok(None),
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|v| *v >= 1)
            .map(Some)
            .ok_or_else(|| {
                Problem::bad_request(
                    "invalid_parameter",
                    format!("version: {:?} is not a version number", clip(v, 20)),
                )
            }),
    }
}

async fn show(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &["version"])?;
    let id = checked_id("workflow", &id)?;
    let (d, _) = readable(&api, &caller, id, version_param(&params)?).await?;
    Ok(Json(serde_json::to_value(&d).unwrap_or_default()))
}

/// A JSON body, or `{}` when there is none (no content type, or an empty body).
async fn optional_body(
    api: &WorkflowsApi,
    request: axum::extract::Request,
) -> Result<Value, Problem> {
    use axum::extract::FromRequest;
    let headers = request.headers();
    let empty = !headers.contains_key(axum::http::header::CONTENT_TYPE)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .is_some_and(|l| l.as_bytes() == b"0");
    if empty {
        return Ok(json!({}));
    }
    Ok(JsonBody::from_request(request, api).await?.0)
}

async fn execute(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(id): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    let id = checked_id("workflow", &id)?;
    let headers: HeaderMap = request.headers().clone();
    let body = optional_body(&api, request).await?;
    let Some(obj) = body.as_object() else {
        return Err(Problem::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        ));
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !["input", "version", "idempotencyKey"].contains(&k.as_str()))
    {
        return Err(Problem::bad_request(
            "invalid_body",
            format!(
                "unknown field {:?}; known: input, version, idempotencyKey",
                clip(k, 64)
            ),
        ));
    }
    let version = match obj.get("version") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|v| (1..=u32::MAX as u64).contains(v))
                .ok_or_else(|| {
                    Problem::bad_request("invalid_body", "version: must be a version number")
                })? as u32,
        ),
    };
    let key = match (obj.get("idempotencyKey"), headers.get("idempotency-key")) {
        (Some(Value::String(k)), _) => Some(k.clone()),
        (Some(_), _) => {
            return Err(Problem::bad_request(
                "invalid_body",
                "idempotencyKey: must be a string",
            ));
        }
        (None, Some(h)) => Some(
            h.to_str()
                .map_err(|_| {
                    Problem::bad_request("invalid_idempotency_key", "Idempotency-Key: not text")
                })?
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(k) = &key
        && !membership::is_valid_id(k)
    {
        return Err(Problem::bad_request(
            "invalid_idempotency_key",
            "the idempotency key must be 1-64 letters, digits, '_' or '-'",
        ));
    }
    let input = obj.get("input").cloned().unwrap_or_else(|| json!({}));
    if input.to_string().len() > crate::validate::MAX_INPUT_BYTES {
        return Err(Problem::payload_too_large("input: at most 64 KiB"));
    }
    let (d, manage) = readable(&api, &caller, id, version).await?;
    if !manage {
        return Err(Problem::forbidden(
            "only the project's owners run its workflows",
        ));
    }
    let loaded = api
        .engine
        .definition(&d.id, d.version)
        .await
        .map_err(redis_err)?;
    let trigger = json!({"kind": "manual", "input": input, "userId": caller.user_id, "projectId": d.project_id});
    let (run, created) = engine::start_run(
        &api.engine,
        &loaded,
        StartRequest {
            trigger,
            started_by: caller.user_id.clone(),
            once: key,
        },
    )
    .await
    .map_err(redis_err)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"runId": run, "workflowId": d.id, "version": d.version, "created": created})),
    )
        .into_response())
}

async fn executions(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    refuse_unknown_params(&params, &["limit", "cursor"])?;
    let id = checked_id("workflow", &id)?;
    readable(&api, &caller, id, None).await?;
    let limit = match params.get("limit") {
        None => 20,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=100).contains(l))
            .ok_or_else(|| Problem::bad_request("invalid_parameter", "limit: 1 to 100"))?,
    };
    let offset = match params.get("cursor") {
        None => 0,
        Some(c) => c.parse::<usize>().map_err(|_| {
            Problem::bad_request("invalid_parameter", "cursor: not a cursor from this list")
        })?,
    };
    let mut redis = api.app.redis.clone();
    let runs: Vec<String> = redis::cmd("ZREVRANGE")
        .arg(store::runs_key(id))
        .arg(offset)
        .arg(offset + limit)
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    let more = runs.len() > limit;
    let mut out = Vec::new();
    for r in runs.iter().take(limit) {
        if let Some(v) = run_json(&api, r, false).await? {
            out.push(v);
        }
    }
    Ok(Json(json!({
        "executions": out,
        "nextCursor": if more { Some((offset + limit).to_string()) } else { None },
    })))
}

/// A run as the API shows it (`steps` only when `full`).
async fn run_json(api: &WorkflowsApi, run: &str, full: bool) -> Result<Option<Value>, Problem> {
    let mut redis = api.app.redis.clone();
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(store::run_key(run))
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    if fields.is_empty() {
        return Ok(None);
    }
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let parse = |k: &str| {
        fields
            .get(k)
            .and_then(|v| serde_json::from_str::<Value>(v).ok())
    };
    let wf = fields.get("wf").cloned().unwrap_or_default();
    let ver = num("ver").unwrap_or(0) as u32;
    let mut v = json!({
        "runId": run,
        "workflowId": wf,
        "version": ver,
        "projectId": fields.get("project"),
        "status": fields.get("status"),
        "startedBy": fields.get("by"),
        "startedAt": num("started").map(rfc3339),
        "endedAt": num("ended").map(rfc3339),
        "durationMs": num("ended").zip(num("started")).map(|(e, s)| e.saturating_sub(s)),
        "error": parse("error"),
        "rerunOf": fields.get("rerunOf"),
        "automaticRerun": num("auto"),
    });
    if full {
        v["trigger"] = parse("trigger").unwrap_or(Value::Null);
        let loaded = api.engine.definition(&wf, ver).await.map_err(redis_err)?;
        let steps: Vec<Value> = loaded
            .definition
            .steps
            .iter()
            .map(|s| {
                let id = &s.id;
                let t0 = num(&format!("t0:{id}"));
                let t1 = num(&format!("t1:{id}"));
                let status = fields.get(&format!("st:{id}")).cloned().unwrap_or_default();
                let c = format!("{id}~c");
                let compensation = fields.get(&format!("st:{c}")).map(|cs| {
                    json!({
                        "status": cs,
                        "attempts": num(&format!("at:{c}")).unwrap_or(0),
                        "input": parse(&format!("in:{c}")),
                        "output": parse(&format!("out:{c}")),
                        "error": parse(&format!("err:{c}")),
                        "startedAt": num(&format!("t0:{c}")).map(rfc3339),
                        "endedAt": num(&format!("t1:{c}")).map(rfc3339),
                    })
                });
                json!({
                    "compensation": compensation,
                    "id": id,
                    "action": s.action.name(),
                    "dependsOn": s.depends_on,
                    "status": status,
                    "attempts": num(&format!("at:{id}")).unwrap_or(0),
                    "input": parse(&format!("in:{id}")),
                    "output": parse(&format!("out:{id}")),
                    "error": parse(&format!("err:{id}")),
                    "startedAt": t0.map(rfc3339),
                    "endedAt": t1.map(rfc3339),
                    "durationMs": t1.zip(t0).map(|(e, s)| e.saturating_sub(s)),
                    "nextAttemptAt": (status == "ready").then(|| num(&format!("rd:{id}")).map(rfc3339)).flatten(),
                    "waitingUntil": (status == "waiting").then(|| num(&format!("wu:{id}")).map(rfc3339)).flatten(),
                    "log": parse(&format!("log:{id}")).unwrap_or_else(|| json!([])),
                })
            })
            .collect();
        v["steps"] = json!(steps);
    }
    Ok(Some(v))
}

/// The run's project, if the caller may read it (`Some(manage)`).
async fn run_right(api: &WorkflowsApi, caller: &Caller, run: &str) -> Result<bool, Problem> {
    let mut redis = api.app.redis.clone();
    let project: Option<String> = redis::cmd("HGET")
        .arg(store::run_key(run))
        .arg("project")
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    let Some(project) = project else {
        return Err(not_found("execution", run));
    };
    right(api, caller, &project)
        .await?
        .ok_or_else(|| not_found("execution", run))
}

async fn run_view(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(run): Path<String>,
) -> Result<Json<Value>, Problem> {
    let run = checked_id("execution", &run)?;
    run_right(&api, &caller, run).await?;
    run_json(&api, run, true)
        .await?
        .map(Json)
        .ok_or_else(|| not_found("execution", run))
}

async fn cancel(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(run): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    let run = checked_id("execution", &run)?;
    let body = optional_body(&api, request).await?;
    let compensate = match body.as_object() {
        Some(o) if o.keys().all(|k| k == "compensate") => match o.get("compensate") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(Problem::bad_request(
                    "invalid_body",
                    "compensate: must be true or false",
                ));
            }
        },
        _ => {
            return Err(Problem::bad_request(
                "invalid_body",
                "the body is {} or {\"compensate\": true}",
            ));
        }
    };
    if !run_right(&api, &caller, run).await? {
        return Err(Problem::forbidden(
            "only the project's owners cancel its runs",
        ));
    }
    let before = engine::cancel(&api.engine, run, &caller.user_id, compensate)
        .await
        .map_err(redis_err)?;
    if before != status::RUNNING {
        return Err(Problem::conflict(
            "execution_ended",
            format!("the run has already ended ({before})"),
        )
        .with_extension("status", before));
    }
    let view = run_json(&api, run, true).await?;
    Ok((StatusCode::OK, Json(view.unwrap_or(Value::Null))).into_response())
}

async fn rerun(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(run): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    let run = checked_id("execution", &run)?;
    let body = optional_body(&api, request).await?;
    let version = match body.as_object() {
        Some(o) if o.keys().all(|k| k == "version") => match o.get("version") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|v| (1..=u32::MAX as u64).contains(v))
                    .ok_or_else(|| {
                        Problem::bad_request("invalid_body", "version: must be a version number")
                    })? as u32,
            ),
        },
        _ => {
            return Err(Problem::bad_request(
                "invalid_body",
                "the body is {} or {\"version\": n}",
            ));
        }
    };
    if !run_right(&api, &caller, run).await? {
        return Err(Problem::forbidden(
            "only the project's owners rerun its runs",
        ));
    }
    let outcome = engine::rerun(&api.engine, run, version, &caller.user_id, 0)
        .await
        .map_err(redis_err)?;
    match outcome {
        Ok((new_run, version)) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"runId": new_run, "rerunOf": run, "version": version})),
        )
            .into_response()),
        Err(engine::RerunRefused::Missing) => Err(not_found("execution", run)),
        Err(engine::RerunRefused::NotEnded(status)) => Err(Problem::conflict(
            "execution_not_rerunnable",
            format!("only failed or cancelled runs are rerun; this one is {status}"),
        )
        .with_extension("status", status)),
        Err(engine::RerunRefused::NothingToRerun) => Err(Problem::conflict(
            "nothing_to_rerun",
            "every step of the run succeeded or was skipped",
        )),
        Err(engine::RerunRefused::NoVersion(v)) => Err(Problem::not_found(format!(
            "the workflow has no version {v}"
        ))),
    }
}

async fn stats(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, Problem> {
    let ids = readable_ids(&api, &caller, &params).await?;
    let mut redis = api.app.redis.clone();
    let mut out = Vec::new();
    let mut totals: HashMap<&str, u64> = HashMap::new();
    for id in ids {
        let c: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(store::stats_key(&id))
            .query_async(&mut redis)
            .await
            .map_err(redis_err)?;
        let n = |k: &str| c.get(k).copied().unwrap_or(0);
        let ended = n("completed") + n("failed") + n("cancelled");
        for k in [
            "started",
            "completed",
            "failed",
            "cancelled",
            "stepsSucceeded",
            "stepsFailed",
        ] {
            *totals.entry(k).or_default() += n(k);
        }
        out.push(json!({
                "workflowId": id,
                "started": n("started"),
                "completed": n("completed"),
                "failed": n("failed"),
                "cancelled": n("cancelled"),
                "active": n("started").saturating_sub(ended),
                "meanDurationMs": (n("completed") > 0).then(|| n("completedDurationMs") / n("completed")),
                "stepsSucceeded": n("stepsSucceeded"),
                "stepsFailed": n("stepsFailed"),
            }));
    }
    Ok(Json(json!({"workflows": out, "totals": totals})))
}

async fn templates(State(_api): State<WorkflowsApi>, _caller: Caller) -> Json<Value> {
    Json(json!({"templates": crate::installing::catalogue()}))
}

async fn install(
    State(api): State<WorkflowsApi>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    let name = checked_id("template", &name)?;
    let Some(obj) = body.as_object() else {
        return Err(Problem::bad_request(
            "invalid_body",
            "the body must be a JSON object",
        ));
    };
    const KNOWN: [&str; 5] = ["projectId", "id", "timeZone", "storeUrl", "email"];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(Problem::bad_request(
            "invalid_body",
            format!(
                "unknown field {:?}; known: {}",
                clip(k, 64),
                KNOWN.join(", ")
            ),
        ));
    }
    let text = |k: &str| -> Result<Option<String>, Problem> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 512 => Ok(Some(s.clone())),
            Some(_) => Err(Problem::bad_request(
                "invalid_body",
                format!("{k}: must be a string of 1-512 characters"),
            )),
        }
    };
    let project = text("projectId")?
        .ok_or_else(|| Problem::bad_request("invalid_body", "projectId: required"))?;
    checked_id("project", &project)?;
    let id = text("id")?;
    // The next version when the project installed it before.
    let mut redis = api.app.redis.clone();
    let default_id = format!("{project}-{name}");
    let version = match registry::latest(&mut redis, id.as_deref().unwrap_or(&default_id))
        .await
        .map_err(redis_err)?
    {
        Some((latest, _)) => latest + 1,
        None => 1,
    };
    let params = crate::installing::InstallParams {
        project,
        id,
        version,
        self_url: api.engine.config.self_url.clone(),
        store_url: text("storeUrl")?,
        email: text("email")?,
        time_zone: text("timeZone")?,
    };
    let json = crate::installing::instantiate(name, &params).map_err(|e| {
        if e.field == "name" {
            Problem::new(StatusCode::NOT_FOUND, "template_not_found", e.message)
        } else {
            Problem::validation(vec![FieldError {
                pointer: format!("/{}", e.field),
                rule: "template".into(),
                kind: "string".into(),
                message: e.message,
            }])
        }
    })?;
    let definition = checked_definition(&json)?;
    store_definition(&api, &caller, definition).await
}
