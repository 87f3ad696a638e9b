//! Projects, their members and documents: `GET /api/projects` (the caller's projects),
//! `GET /api/projects/{projectId}` (a summary), `PUT`/`DELETE
//! /api/projects/{projectId}/members/{userId}`, `GET /api/projects/{projectId}/members`,
//! `GET /api/projects/{projectId}/documents` and `GET`/`PUT`/`DELETE
//! /api/projects/{projectId}/documents/{documentId}`.
//!
//! Owners of the project and the service/admin roles may change it; any member may read it.
//! A project exists while it has members and always has an owner (enforced in
//! `shared::membership`), so "not found" means "no members". Member changes accept an
//! `Idempotency-Key` (`shared::idempotent_requests`): a retried `DELETE` gets its first `204`
//! again instead of a `404`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use inkwire_shared::AppState;
use inkwire_shared::access_changes::{self, AccessChange};
use inkwire_shared::auth::Caller;
use inkwire_shared::http::JsonBody;
use inkwire_shared::idempotent_requests::{self, IdempotencyKey, Scope};
use inkwire_shared::membership::{
    self, DocumentRefusal, MembershipChange, ProjectRole, is_valid_id,
};
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

/// The checks every member-only read starts with (the project id, then the caller's
/// membership), answering the Redis connection to read with.
async fn member_read(
    state: &AppState,
    caller: &Caller,
    project: &str,
) -> Result<redis::aio::ConnectionManager, Problem> {
    check_id("projectId", project)?;
    let mut redis = state.redis.clone();
    crate::access::check_member(caller, project, &mut redis).await?;
    Ok(redis)
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Response, Problem> {
    let mut redis = member_read(&state, &caller, &project).await?;
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
    key: IdempotencyKey,
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
    let target = format!("{project}/{user}");
    let scope = Scope {
        route: "members.put",
        caller: &caller.user_id,
        target: &target,
    };
    let (state, project, user) = (&state, &project, &user);
    idempotent_requests::run(state, scope, key, Some(&body), |_| async move {
        match membership::set_member(&mut redis, project, user, Some(role))
            .await
            .map_err(|e| dependency_failed("redis", e))?
        {
            MembershipChange::LastOwner => Err(last_owner(project)),
            MembershipChange::NeedsOwner => Err(needs_owner(project)),
            _ => {
                announce_member_change(state, project, user).await;
                Ok(
                    Json(json!({"projectId": project, "userId": user, "role": role}))
                        .into_response(),
                )
            }
        }
    })
    .await
}

pub async fn delete_member(
    State(state): State<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    Path((project, user)): Path<(String, String)>,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    check_id("userId", &user)?;
    let mut redis = state.redis.clone();
    crate::access::check_owner(&caller, &project, &mut redis).await?;
    let target = format!("{project}/{user}");
    let scope = Scope {
        route: "members.delete",
        caller: &caller.user_id,
        target: &target,
    };
    let (state, project, user) = (&state, &project, &user);
    idempotent_requests::run(state, scope, key, None, |_| async move {
        match membership::set_member(&mut redis, project, user, None)
            .await
            .map_err(|e| dependency_failed("redis", e))?
        {
            MembershipChange::LastOwner | MembershipChange::NeedsOwner => Err(last_owner(project)),
            MembershipChange::NotMember => Err(Problem::not_found(format!(
                "{user:?} is not a member of project {project:?}"
            ))),
            MembershipChange::Applied => {
                announce_member_change(state, project, user).await;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
        }
    })
    .await
}

/// Tells every relay instance to re-check `user`'s live subscriptions to `project`'s
/// channels.
async fn announce_member_change(state: &AppState, project: &str, user: &str) {
    announce(
        state,
        AccessChange::Member {
            project_id: project.to_string(),
            user_id: user.to_string(),
        },
    )
    .await;
}

/// Announces a change of rights to every relay instance. The change is stored already; if
/// NATS is down the relays' periodic re-check catches up, so a failed announcement is
/// logged, not returned.
async fn announce(state: &AppState, change: AccessChange) {
    if let Err(e) = access_changes::announce(&state.nats, &change).await {
        tracing::warn!(error = %e, ?change, "change of rights not announced to relays");
    }
}

fn last_owner(project: &str) -> Problem {
    Problem::conflict(
        "last_owner",
        format!("project {project:?} would be left without an owner; add another owner first"),
    )
}

fn needs_owner(project: &str) -> Problem {
    Problem::conflict(
        "project_needs_owner",
        format!(
            "project {project:?} has no owner: its first member must be an owner (role \"owner\")"
        ),
    )
}

fn project_not_found(project: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "project_not_found",
        format!(
            "project {project:?} does not exist (a project is created by adding its first owner)"
        ),
    )
}

fn document_not_found(project: &str, document: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "document_not_found",
        format!("document {document:?} is not registered in project {project:?}"),
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
    let title = body.get("title").and_then(|t| t.as_str());
    let mut redis = state.redis.clone();
    crate::access::check_owner(&caller, &project, &mut redis).await?;
    match membership::register_document_titled(&mut redis, &project, &document, title)
        .await
        .map_err(|e| dependency_failed("redis", e))?
    {
        Ok(title) => Ok(Json(
            json!({"projectId": project, "documentId": document, "title": title}),
        )
        .into_response()),
        Err(DocumentRefusal::ProjectNotFound) => Err(project_not_found(&project)),
        Err(DocumentRefusal::ProjectNeedsOwner) => Err(needs_owner(&project)),
        Err(DocumentRefusal::InOtherProject(other)) => Err(Problem::conflict(
            "document_in_other_project",
            format!("document {document:?} is already registered in project {other:?}"),
        )),
    }
}

/// `GET /api/projects`: the projects the caller is a member of, with their role.
pub async fn my_projects(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, Problem> {
    let mut redis = state.redis.clone();
    let projects = membership::projects_with_roles(&mut redis, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    let projects: Vec<_> = projects
        .into_iter()
        .map(|(project, role)| json!({"projectId": project, "role": role}))
        .collect();
    Ok(Json(json!({"userId": caller.user_id, "projects": projects})).into_response())
}

/// `GET /api/projects/{projectId}`: the caller's role, the owners, member and document
/// counts.
pub async fn project(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    let mut redis = state.redis.clone();
    // Members only: a non-member learns nothing, not even whether the project exists.
    crate::access::check_member(&caller, &project, &mut redis).await?;
    let summary = membership::project_summary(&mut redis, &project)
        .await
        .map_err(|e| dependency_failed("redis", e))?
        .ok_or_else(|| project_not_found(&project))?;
    let role = summary
        .members
        .iter()
        .find(|(user, _)| *user == caller.user_id)
        .map(|(_, role)| *role);
    let owners: Vec<&str> = summary
        .members
        .iter()
        .filter(|(_, role)| *role == ProjectRole::Owner)
        .map(|(user, _)| user.as_str())
        .collect();
    Ok(Json(json!({
        "projectId": project,
        "role": role,
        "owners": owners,
        "memberCount": summary.members.len(),
        "documentCount": summary.documents,
    }))
    .into_response())
}

/// `GET /api/projects/{projectId}/documents`: every registered document with its title.
pub async fn list_documents(
    State(state): State<AppState>,
    caller: Caller,
    Path(project): Path<String>,
) -> Result<Response, Problem> {
    let mut redis = member_read(&state, &caller, &project).await?;
    let documents = membership::documents(&mut redis, &project)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    let documents: Vec<_> = documents
        .into_iter()
        .map(|(document, title)| json!({"documentId": document, "title": title}))
        .collect();
    Ok(Json(json!({"projectId": project, "documents": documents})).into_response())
}

/// `GET /api/projects/{projectId}/documents/{documentId}`.
pub async fn get_document(
    State(state): State<AppState>,
    caller: Caller,
    Path((project, document)): Path<(String, String)>,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    check_id("documentId", &document)?;
    let mut redis = state.redis.clone();
    crate::access::check_member(&caller, &project, &mut redis).await?;
    let title = membership::document_in_project(&mut redis, &project, &document)
        .await
        .map_err(|e| dependency_failed("redis", e))?
        .ok_or_else(|| document_not_found(&project, &document))?;
    Ok(Json(json!({"projectId": project, "documentId": document, "title": title})).into_response())
}

/// `DELETE /api/projects/{projectId}/documents/{documentId}`: unregisters the document and
/// tells the relays, which drop live `document:` subscriptions that relied on it.
pub async fn delete_document(
    State(state): State<AppState>,
    caller: Caller,
    key: IdempotencyKey,
    Path((project, document)): Path<(String, String)>,
) -> Result<Response, Problem> {
    check_id("projectId", &project)?;
    check_id("documentId", &document)?;
    let mut redis = state.redis.clone();
    crate::access::check_owner(&caller, &project, &mut redis).await?;
    let target = format!("{project}/{document}");
    let scope = Scope {
        route: "documents.delete",
        caller: &caller.user_id,
        target: &target,
    };
    let (state, project, document) = (&state, &project, &document);
    // With an Idempotency-Key a retried removal gets its first 204 again, not a 404.
    idempotent_requests::run(state, scope, key, None, |_| async move {
        let removed = membership::unregister_document(&mut redis, project, document)
            .await
            .map_err(|e| dependency_failed("redis", e))?;
        if !removed {
            return Err(document_not_found(project, document));
        }
        announce(
            state,
            AccessChange::Document {
                project_id: project.clone(),
                document_id: document.clone(),
            },
        )
        .await;
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}
