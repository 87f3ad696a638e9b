//! The presence REST routes, for clients without Yjs (and for reading presence):
//!
//! - `POST /api/realtime/collaboration/presence` — mode, cursor or selection, viewport,
//!   device (any member; `editing` only for owners and editors);
//! - `POST …/cursor` — cursor (and selection) moves;
//! - `POST …/edit` — "I am typing here" (owners and editors): cursor, typing velocity, last
//!   edit; it does not change the text (that goes through co-editing);
//! - `GET …/document/{id}/collaborators` and `GET …/document/{id}/conflicts`.
//!
//! Offsets are UTF-16 code units of the document's text and are checked against the live
//! document (`422 position_out_of_range` past the end); the server keeps them as Yjs relative
//! positions, so a REST client's position follows other people's edits like a Yjs cursor
//! and REST clients get the same conflict warnings. The routes need the live document, so
//! they are served by the co-editing instances (they load the document like a connection
//! would). Membership is checked in Redis on every request: losing a right takes effect at
//! once.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRef, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::http::JsonBody;
use inkwire_shared::membership::{self, ProjectRole, is_valid_id};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::schema::schemas;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::Coedit;
use crate::document::sessions::{PresenceCommand, RestError, RestKind, RestRequest};
use crate::document::{Command, writes};
use crate::presence::{Mode, Viewport};

impl FromRef<Coedit> for AppState {
    fn from_ref(c: &Coedit) -> AppState {
        c.app.clone()
    }
}

pub const BASE: &str = "/api/realtime/collaboration";

pub fn routes(coedit: Coedit) -> Router {
    Router::new()
        .route(&format!("{BASE}/presence"), post(presence))
        .route(&format!("{BASE}/cursor"), post(cursor))
        .route(&format!("{BASE}/edit"), post(edit))
        .route(
            &format!("{BASE}/document/{{document_id}}/collaborators"),
            get(collaborators),
        )
        .route(
            &format!("{BASE}/document/{{document_id}}/conflicts"),
            get(conflicts),
        )
        .with_state(coedit)
}

const NOT_MEMBER: &str = "not a member of this document's project";

/// The document's project and the caller's role in it. A document no project has is
/// refused like one of another project (`403`), so ids cannot be probed; privileged callers
/// (read only) get `404` and no role.
async fn access(
    coedit: &Coedit,
    caller: &Caller,
    document: &str,
) -> Result<(String, Option<ProjectRole>), Problem> {
    let mut redis = coedit.app.redis.clone();
    let project = membership::project_of_document(&mut redis, document)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    let Some(project) = project else {
        return Err(if caller.is_privileged() {
            Problem::not_found("no such document")
        } else {
            Problem::forbidden(NOT_MEMBER)
        });
    };
    let role = membership::role_of(&mut redis, &project, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    if role.is_none() && !caller.is_privileged() {
        return Err(Problem::forbidden(NOT_MEMBER));
    }
    Ok((project, role))
}

/// Sends `make(reply)` to the loaded document (loading it), once more if it was unloading.
async fn ask<T>(
    coedit: &Coedit,
    document: &str,
    project: &str,
    make: impl Fn(oneshot::Sender<T>) -> PresenceCommand,
) -> Result<T, Problem> {
    for _ in 0..2 {
        let handle = coedit
            .document(document, project)
            .await
            .map_err(|e| dependency_failed("nats", e))?;
        let (tx, rx) = oneshot::channel();
        if handle.send(Command::Presence(make(tx))).await
            && let Ok(answer) = rx.await
        {
            return Ok(answer);
        }
    }
    Err(Problem::unavailable("the document is unloading; retry"))
}

fn u32_of(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

async fn change(
    coedit: Coedit,
    caller: Caller,
    body: Value,
    kind: RestKind,
) -> Result<Response, Problem> {
    let schema = match kind {
        RestKind::Presence => "api/collaboration-presence-request.json",
        RestKind::Cursor => "api/collaboration-cursor-request.json",
        RestKind::Edit => "api/collaboration-edit-request.json",
    };
    schemas()
        .validate(schema, &body)
        .map_err(Problem::validation)?;
    let document = body["documentId"].as_str().expect("schema").to_string();
    let (project, role) = access(&coedit, &caller, &document).await?;
    // Presence is a member's own: service and admin callers have none to set.
    let role = role.ok_or_else(|| Problem::forbidden(NOT_MEMBER))?;
    let mode = body["mode"].as_str().and_then(Mode::parse);
    if !writes(role) && (kind == RestKind::Edit || mode == Some(Mode::Editing)) {
        return Err(Problem::forbidden(format!(
            "a {} cannot edit this document",
            role.as_str()
        )));
    }
    let viewport = body.get("viewport").map(|v| Viewport {
        first: u32_of(&v["first"]).expect("schema"),
        last: u32_of(&v["last"]).expect("schema"),
    });
    if let Some(v) = viewport
        && v.first > v.last
    {
        return Err(Problem::validation(vec![
            inkwire_shared::schema::FieldError::new(
                "/viewport/first",
                "viewport",
                body.pointer("/viewport/first"),
                "the first visible paragraph is after the last",
            ),
        ]));
    }
    let request = RestRequest {
        kind,
        offset: u32_of(&body["offset"]),
        selection: body.get("selection").map(|s| {
            (
                u32_of(&s["anchor"]).expect("schema"),
                u32_of(&s["head"]).expect("schema"),
            )
        }),
        viewport,
        mode,
        device: body["device"].as_str().map(str::to_string),
        inserted: body["inserted"].as_u64().unwrap_or(0),
    };
    let user = caller.user_id.clone();
    let answer = ask(&coedit, &document, &project, |reply| {
        PresenceCommand::Rest {
            user: user.clone(),
            role,
            request: request.clone(),
            reply,
        }
    })
    .await?;
    match answer {
        Ok(view) => Ok(Json(json!({"documentId": document, "presence": view})).into_response()),
        Err(RestError::OutOfRange {
            pointer,
            value,
            limit,
        }) => Err(Problem::unprocessable(
            "position_out_of_range",
            format!("{pointer}: {value} is past the end of the document ({limit})"),
        )
        .with_extension("pointer", pointer)
        .with_extension("limit", limit)),
    }
}

async fn presence(
    State(coedit): State<Coedit>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    change(coedit, caller, body, RestKind::Presence).await
}

async fn cursor(
    State(coedit): State<Coedit>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    change(coedit, caller, body, RestKind::Cursor).await
}

async fn edit(
    State(coedit): State<Coedit>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    change(coedit, caller, body, RestKind::Edit).await
}

async fn snapshot(
    coedit: &Coedit,
    caller: &Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<(String, Value), Problem> {
    let document = match path {
        Ok(Path(d)) if is_valid_id(&d) => d,
        _ => {
            return Err(Problem::bad_request(
                "invalid_id",
                "the document id must be 1-64 letters, digits, '_' or '-'",
            ));
        }
    };
    let (project, _) = access(coedit, caller, &document).await?;
    let snap = ask(coedit, &document, &project, |reply| {
        PresenceCommand::Snapshot { reply }
    })
    .await?;
    Ok((document, snap))
}

async fn collaborators(
    State(coedit): State<Coedit>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let (document, snap) = snapshot(&coedit, &caller, path).await?;
    Ok(
        Json(json!({"documentId": document, "collaborators": snap["collaborators"]}))
            .into_response(),
    )
}

async fn conflicts(
    State(coedit): State<Coedit>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let (document, snap) = snapshot(&coedit, &caller, path).await?;
    Ok(Json(json!({"documentId": document, "conflicts": snap["conflicts"]})).into_response())
}
