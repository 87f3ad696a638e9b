//! Project membership and document registration:
//! `PUT`/`DELETE /api/projects/{projectId}/members/{userId}`,
//! `GET /api/projects/{projectId}/members` and
//! `PUT /api/projects/{projectId}/documents/{documentId}`.
//!
//! Owners of the project and the service/admin roles may change it; any member may list it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use inkwire_shared::AppState;
use inkwire_shared::auth::Caller;
use inkwire_shared::http::JsonBody;
use inkwire_shared::membership::{self, MembershipChange, ProjectRole, is_valid_id};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::schema::schemas;
use serde_json::json;

fn check_id(what: &str, id: &str) -> Result<(), Problem> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(Problem::bad_request(
            "invalid_id",
            format!("{what} {id:?} must be 1-64 characters of letters, digits, '_' or '-'"),
        ))
    }
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    let mut redis = state.redis.clone();
    crate::access::check_member(&caller, &project, &mut redis).await?;
    let members = membership::members(&mut redis, &project)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    let members: Vec<_> = members
        .into_iter()
        .map(|(user, role)| json!({"userId": user, "role": role}))
        .collect();
    Ok(Json(json!({"projectId": project, "members": members})).into_response())
}

pub async fn put_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    check_id("userId", &user)?;
    schemas()
        .validate("api/member-request.json", &body)
        .map_err(Problem::validation)?;
    let role: ProjectRole = body["role"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("schema checked role");
    let mut redis = state.redis.clone();
    crate::access::check_owner(&caller, &project, &mut redis).await?;
    match membership::set_member(&mut redis, &project, &user, Some(role))
        .await
        .map_err(|e| dependency_failed("redis", e))?
    {
        MembershipChange::LastOwner => Err(last_owner(&project)),
        _ => Ok(Json(json!({"projectId": project, "userId": user, "role": role})).into_response()),
    }
}

pub async fn delete_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, user)): Path<(String, String)>,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    check_id("userId", &user)?;
    let mut redis = state.redis.clone();
    crate::access::check_owner(&caller, &project, &mut redis).await?;
    match membership::set_member(&mut redis, &project, &user, None)
        .await
        .map_err(|e| dependency_failed("redis", e))?
    {
        MembershipChange::LastOwner => Err(last_owner(&project)),
        MembershipChange::NotMember => Err(Problem::not_found(format!(
            "{user:?} is not a member of project {project:?}"
        ))),
        MembershipChange::Applied => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

fn last_owner(project: &str) -> Problem {
    Problem::conflict(
        "last_owner",
        format!("project {project:?} would be left without an owner; add another owner first"),
    )
}

pub async fn put_document(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, document)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    check_id("documentId", &document)?;
    schemas()
        .validate("api/document-request.json", &body)
        .map_err(Problem::validation)?;
    let mut redis = state.redis.clone();
    crate::access::check_owner(&caller, &project, &mut redis).await?;
    match membership::register_document(&mut redis, &project, &document)
        .await
        .map_err(|e| dependency_failed("redis", e))?
    {
        Ok(()) => Ok(Json(json!({"projectId": project, "documentId": document})).into_response()),
        Err(other) => Err(Problem::conflict(
            "document_in_other_project",
            format!("document {document:?} is already registered in project {other:?}"),
        )),
    }
}
