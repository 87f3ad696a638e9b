//! Who may publish what. Each event type has one rule (`shared::publish_rules`): tracker
//! commands only through the writing API, events that consumers produce for the `service`
//! role only, and project activity for members from a minimum role up. On top of the rule, a
//! user publishes only events with their own `userId`, and only into projects (and documents
//! of projects) they are a member of; the `service` role publishes for anyone. Lookups are
//! cached per request, so a batch of 1,000 events into one project costs one Redis round
//! trip, not 1,000.

use std::collections::HashMap;

use axum::http::StatusCode;
use inkwire_shared::auth::Caller;
use inkwire_shared::events::Category;
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::publish_rules::{self, PublishRule};
use redis::aio::ConnectionManager;

/// The fields of an event that decide who may publish it.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    pub category: Category,
    pub event_type: &'a str,
    pub user_id: &'a str,
    pub project_id: Option<&'a str>,
    pub document_id: Option<&'a str>,
}

/// Membership and document lookups made while checking one request.
#[derive(Default)]
pub struct AccessCache {
    roles: HashMap<String, Option<ProjectRole>>,
    documents: HashMap<String, Option<String>>,
}

impl AccessCache {
    async fn role(
        &mut self,
        redis: &mut ConnectionManager,
        project: &str,
        user: &str,
    ) -> Result<Option<ProjectRole>, Problem> {
        if let Some(r) = self.roles.get(project) {
            return Ok(*r);
        }
        let r = membership::role_of(redis, project, user)
            .await
            .map_err(|e| dependency_failed("redis", e))?;
        self.roles.insert(project.to_string(), r);
        Ok(r)
    }

    async fn document_project(
        &mut self,
        redis: &mut ConnectionManager,
        document: &str,
    ) -> Result<Option<String>, Problem> {
        if let Some(p) = self.documents.get(document) {
            return Ok(p.clone());
        }
        let p = membership::project_of_document(redis, document)
            .await
            .map_err(|e| dependency_failed("redis", e))?;
        self.documents.insert(document.to_string(), p.clone());
        Ok(p)
    }
}

/// Checks that `caller` may publish an event with `scope`; returns the event's project (the
/// one named, or the one its document is registered in), to be stored with the event.
pub async fn check_publish(
    caller: &Caller,
    scope: Scope<'_>,
    cache: &mut AccessCache,
    redis: &mut ConnectionManager,
) -> Result<Option<String>, Problem> {
    let name = format!("{}.{}", scope.category, scope.event_type);
    let rule = publish_rules::rule(scope.category, scope.event_type);
    let service = caller.is_service();
    match rule {
        PublishRule::DomainApi(route) => {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "domain_api_required",
                format!(
                    "{name} cannot be published on the events API (by any role): \
                     the writing API checks who may do it; use {route}"
                ),
            ));
        }
        PublishRule::ServiceOnly if !service => {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "service_role_required",
                format!(
                    "{name} is produced by inkwire's back ends: only the service role may publish it"
                ),
            ));
        }
        _ => {}
    }
    if !service && scope.user_id != caller.user_id {
        return Err(Problem::forbidden(format!(
            "you may only publish events whose userId is your own ({:?}), not {:?}",
            caller.user_id, scope.user_id
        )));
    }
    let mut project = scope.project_id.map(str::to_string);
    if let Some(document) = scope.document_id {
        match cache.document_project(redis, document).await? {
            Some(owner) => {
                if let Some(p) = &project
                    && *p != owner
                {
                    return Err(Problem::unprocessable(
                        "document_project_mismatch",
                        format!("document {document:?} belongs to project {owner:?}, not {p:?}"),
                    ));
                }
                project = Some(owner);
            }
            None if !service => {
                return Err(Problem::forbidden(format!(
                    "document {document:?} is not registered in any project you belong to"
                )));
            }
            None => {}
        }
    }
    if service {
        return Ok(project);
    }
    let PublishRule::Member(min) = rule else {
        unreachable!("other rules were decided above")
    };
    let Some(p) = project else {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "project_role_required",
            format!(
                "{name} is project activity: name its project (projectId, or a documentId \
                 registered in it) in which you have the {} role or higher",
                min.as_str()
            ),
        ));
    };
    match cache.role(redis, &p, &caller.user_id).await? {
        None => Err(Problem::forbidden(format!(
            "you are not a member of project {p:?}"
        ))),
        Some(role) if !publish_rules::role_satisfies(role, min) => Err(Problem::new(
            StatusCode::FORBIDDEN,
            "project_role_required",
            format!(
                "{name} needs the {} role or higher in project {p:?}; yours is {}",
                min.as_str(),
                role.as_str()
            ),
        )),
        Some(_) => Ok(Some(p)),
    }
}

/// Checks that `caller` may manage `project`'s members and documents: its owners, and the
/// service and admin roles.
pub async fn check_owner(
    caller: &Caller,
    project: &str,
    redis: &mut ConnectionManager,
) -> Result<(), Problem> {
    if caller.is_privileged() {
        return Ok(());
    }
    let role = membership::role_of(redis, project, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    if role == Some(ProjectRole::Owner) {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "only owners of project {project:?} (or the service role) may change it"
        )))
    }
}

/// Checks that `caller` may read `project`'s member list: any member, service or admin.
pub async fn check_member(
    caller: &Caller,
    project: &str,
    redis: &mut ConnectionManager,
) -> Result<(), Problem> {
    if caller.is_privileged() {
        return Ok(());
    }
    let role = membership::role_of(redis, project, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    if role.is_some() {
        Ok(())
    } else {
        Err(Problem::forbidden(format!(
            "you are not a member of project {project:?}"
        )))
    }
}

/// Category streams are firehoses: admin and service only.
pub fn check_firehose(caller: &Caller) -> Result<(), Problem> {
    if caller.is_privileged() {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "reading a whole category needs the admin or service role",
        ))
    }
}
