//! The co-editing REST API, for server-side consumers (the EPUB build, backups, analytics):
//!
//! - `GET /api/realtime/collaboration/document/{id}/content`: the plain text of the
//!   document's root text types, JSON;
//! - `GET …/document/{id}/state`: the document as one binary Yjs update (v1,
//!   `application/octet-stream`; `Y.applyUpdate(doc, bytes)` restores it);
//! - `GET …/document/{id}/contributions`: per user, characters inserted and deleted,
//!   words added and deleted, updates and active minutes;
//! - `GET …/project/{projectId}/document/{documentId}/metrics`: contribution and team
//!   analytics with the collaboration efficiency score (`metrics`).
//!
//! Any member of the document's project may read (service and admin callers too). The
//! answers come from the stream (snapshot plus updates), not from a live copy, so the API
//! runs as its own Lambda without the WebSocket side, and what it answers is what every
//! client has been sent or will be.

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::membership::{self, is_valid_id};
use inkwire_shared::problem::{Problem, dependency_failed};
use serde_json::json;
use yrs::{GetString, ReadTxn, StateVector, Transact};

use crate::storage::Store;
use crate::{attribution, metrics};

/// What the handlers share.
#[derive(Clone)]
pub struct DocumentsApi {
    pub app: AppState,
    pub store: Store,
}

impl axum::extract::FromRef<DocumentsApi> for AppState {
    fn from_ref(api: &DocumentsApi) -> AppState {
        api.app.clone()
    }
}

pub const BASE: &str = "/api/realtime/collaboration/document";

pub fn routes(api: DocumentsApi) -> Router {
    Router::new()
        .route(&format!("{BASE}/{{document_id}}/content"), get(content))
        .route(&format!("{BASE}/{{document_id}}/state"), get(state))
        .route(
            &format!("{BASE}/{{document_id}}/contributions"),
            get(contributions),
        )
        .route(
            "/api/realtime/collaboration/project/{project_id}/document/{document_id}/metrics",
            get(metrics),
        )
        .with_state(api)
}

/// The document id of the path, checked, and the caller's right to read it.
async fn readable(
    api: &DocumentsApi,
    caller: &Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<String, Problem> {
    let document = match path {
        Ok(Path(d)) if is_valid_id(&d) => d,
        _ => {
            return Err(Problem::bad_request(
                "invalid_id",
                "the document id must be 1-64 letters, digits, '_' or '-'",
            ));
        }
    };
    let mut redis = api.app.redis.clone();
    let project = membership::project_of_document(&mut redis, &document)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    let Some(project) = project else {
        return Err(if caller.is_privileged() {
            Problem::not_found("no such document")
        } else {
            Problem::forbidden("not a member of this document's project")
        });
    };
    if !caller.is_privileged() {
        membership::role_of(&mut redis, &project, &caller.user_id)
            .await
            .map_err(|e| dependency_failed("redis", e))?
            .ok_or_else(|| Problem::forbidden("not a member of this document's project"))?;
    }
    Ok(document)
}

async fn load(api: &DocumentsApi, document: &str) -> Result<yrs::Doc, Problem> {
    api.store
        .load(document)
        .await
        .map(|l| l.doc)
        .map_err(|e| dependency_failed("nats", e))
}

/// The text of every root that holds text, by name (roots whose kind the server cannot
/// know are read as text; maps and XML fragments give nothing and are left out).
pub fn texts(doc: &yrs::Doc) -> Vec<(String, String)> {
    let txn = doc.transact();
    let mut names: Vec<String> = txn.root_refs().map(|(n, _)| n.to_string()).collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let text = txn.get_text(name.as_str())?.get_string(&txn);
            (!text.is_empty()).then_some((name, text))
        })
        .collect()
}

async fn content(
    State(api): State<DocumentsApi>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let document = match readable(&api, &caller, path).await {
        Ok(d) => d,
        Err(p) => return p.into_response(),
    };
    let doc = match load(&api, &document).await {
        Ok(d) => d,
        Err(p) => return p.into_response(),
    };
    let texts = texts(&doc);
    let joined = texts
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join("\n\n");
    let roots: serde_json::Map<String, serde_json::Value> = texts
        .into_iter()
        .map(|(n, t)| (n, serde_json::Value::String(t)))
        .collect();
    axum::Json(json!({"documentId": document, "text": joined, "roots": roots})).into_response()
}

async fn state(
    State(api): State<DocumentsApi>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let document = match readable(&api, &caller, path).await {
        Ok(d) => d,
        Err(p) => return p.into_response(),
    };
    let doc = match load(&api, &document).await {
        Ok(d) => d,
        Err(p) => return p.into_response(),
    };
    let bytes = doc
        .transact()
        .encode_state_as_update_v1(&StateVector::default());
    ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
}

async fn contributions(
    State(api): State<DocumentsApi>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let document = match readable(&api, &caller, path).await {
        Ok(d) => d,
        Err(p) => return p.into_response(),
    };
    let mut redis = api.app.redis.clone();
    match attribution::contributions(&mut redis, &document).await {
        Ok(c) => axum::Json(json!({"documentId": document, "contributors": c})).into_response(),
        Err(e) => dependency_failed("redis", e).into_response(),
    }
}

async fn metrics(
    State(api): State<DocumentsApi>,
    caller: Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    match metrics_of(&api, &caller, path).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(p) => p.into_response(),
    }
}

async fn metrics_of(
    api: &DocumentsApi,
    caller: &Caller,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<serde_json::Value, Problem> {
    let (project, document) = match path {
        Ok(Path((p, d))) if is_valid_id(&p) && is_valid_id(&d) => (p, d),
        _ => {
            return Err(Problem::bad_request(
                "invalid_id",
                "project and document ids must be 1-64 letters, digits, '_' or '-'",
            ));
        }
    };
    let mut redis = api.app.redis.clone();
    let redis_err = |e| dependency_failed("redis", e);
    if !caller.is_privileged() {
        membership::role_of(&mut redis, &project, &caller.user_id)
            .await
            .map_err(redis_err)?
            .ok_or_else(|| Problem::forbidden("not a member of this project"))?;
    }
    let owner = membership::project_of_document(&mut redis, &document)
        .await
        .map_err(redis_err)?;
    if owner.as_deref() != Some(project.as_str()) {
        return Err(Problem::new(
            axum::http::StatusCode::NOT_FOUND,
            "document_not_found",
            "the document is not registered in this project",
        ));
    }
    let contributors = attribution::contributions(&mut redis, &document)
        .await
        .map_err(redis_err)?;
    let team_minutes = attribution::team_minutes(&mut redis, &document)
        .await
        .map_err(redis_err)?;
    let (clients, activity, counters): (
        std::collections::HashMap<u64, String>,
        std::collections::HashMap<String, u64>,
        std::collections::HashMap<String, u64>,
    ) = redis::pipe()
        .hgetall(attribution::clients_key(&document))
        .hgetall(attribution::activity_key(&document))
        .hgetall(crate::document::sessions::metrics_key(&document))
        .query_async(&mut redis)
        .await
        .map_err(redis_err)?;
    let doc = load(api, &document).await?;
    let mut text_by_user: std::collections::BTreeMap<String, u64> = Default::default();
    for (client, n) in metrics::text_by_client(&doc) {
        let user = clients
            .get(&client)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        *text_by_user.entry(user).or_default() += n;
    }
    let activity = activity
        .into_iter()
        .filter_map(|(k, v)| {
            let (hour, user) = k.split_once(':')?;
            Some(((hour.parse::<i64>().ok()?, user.to_string()), v))
        })
        .collect();
    let counter = |name: &str| counters.get(name).copied().unwrap_or(0);
    let inputs = metrics::Inputs {
        contributors,
        text_by_user,
        team_minutes,
        activity,
        conflicts: metrics::ConflictCounts {
            predicted: counter("predicted"),
            collisions: counter("collisions"),
            collisions_after_warning: counter("collisionsAfterWarning"),
        },
    };
    Ok(metrics::report(&project, &document, &inputs))
}
