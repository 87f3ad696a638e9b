//! Project membership and document registration, stored in Redis.
//!
//! A project's members are one hash (`inkwire:project:{p}:members`, user → role); a user's
//! projects one set (`inkwire:user:{u}:projects`), kept in step so the relay can list a user's
//! channels. A document belongs to exactly one project (`inkwire:document:{d}:project`); a
//! project's documents are one set (`inkwire:project:{p}:documents`) and their titles one hash
//! (`inkwire:project:{p}:titles`, document → title).
//!
//! A project exists while it has members, and it always has an owner: the first member must be
//! an owner, the last owner can be neither removed nor demoted, and documents can only be
//! registered in a project that exists. Every such rule is decided inside one Lua script, so
//! concurrent changes cannot slip between a check and a write.

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// A role inside one project, from most to least powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectRole {
    Owner,
    Editor,
    Reviewer,
    Reader,
}

impl ProjectRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectRole::Owner => "owner",
            ProjectRole::Editor => "editor",
            ProjectRole::Reviewer => "reviewer",
            ProjectRole::Reader => "reader",
        }
    }
}

impl std::str::FromStr for ProjectRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(ProjectRole::Owner),
            "editor" => Ok(ProjectRole::Editor),
            "reviewer" => Ok(ProjectRole::Reviewer),
            "reader" => Ok(ProjectRole::Reader),
            _ => Err(format!("unknown project role {s:?}")),
        }
    }
}

/// Ids become NATS subject tokens and Redis key parts, so they are restricted to
/// 1–64 characters of `[A-Za-z0-9_-]` (the same rule as the schemas' identifier pattern).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn members_key(project: &str) -> String {
    format!("inkwire:project:{project}:members")
}
fn user_projects_key(user: &str) -> String {
    format!("inkwire:user:{user}:projects")
}
fn document_key(document: &str) -> String {
    format!("inkwire:document:{document}:project")
}
fn project_documents_key(project: &str) -> String {
    format!("inkwire:project:{project}:documents")
}
fn project_titles_key(project: &str) -> String {
    format!("inkwire:project:{project}:titles")
}

/// The role of `user` in `project`, if any.
pub async fn role_of(
    redis: &mut ConnectionManager,
    project: &str,
    user: &str,
) -> redis::RedisResult<Option<ProjectRole>> {
    let role: Option<String> = redis.hget(members_key(project), user).await?;
    Ok(role.and_then(|r| r.parse().ok()))
}

/// All members of `project`, sorted by user id.
pub async fn members(
    redis: &mut ConnectionManager,
    project: &str,
) -> redis::RedisResult<Vec<(String, ProjectRole)>> {
    let all: Vec<(String, String)> = redis.hgetall(members_key(project)).await?;
    let mut out: Vec<(String, ProjectRole)> = all
        .into_iter()
        .filter_map(|(u, r)| r.parse().ok().map(|r| (u, r)))
        .collect();
    out.sort();
    Ok(out)
}

/// The projects `user` belongs to.
pub async fn projects_of(
    redis: &mut ConnectionManager,
    user: &str,
) -> redis::RedisResult<Vec<String>> {
    redis.smembers(user_projects_key(user)).await
}

/// What a membership change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    Applied,
    /// Refused: the change would leave the project without an owner.
    LastOwner,
    /// Removal of someone who was not a member.
    NotMember,
    /// Refused: a project without an owner (one that does not exist yet) gets an owner first.
    NeedsOwner,
}

/// Sets (`Some(role)`) or removes (`None`) a member, atomically refusing any change that would
/// leave a project without an owner: demoting or removing its last owner, or adding a
/// non-owner to a project that has none (which is how a project would otherwise be created
/// ownerless). Removing a non-owner is always allowed.
const SET_MEMBER: &str = r#"
local members, projects = KEYS[1], KEYS[2]
local user, role = ARGV[1], ARGV[2]
local current = redis.call('HGET', members, user)
if role == '' and not current then return 'not_member' end
if role ~= 'owner' then
  local owners = 0
  for _, r in ipairs(redis.call('HVALS', members)) do
    if r == 'owner' then owners = owners + 1 end
  end
  if current == 'owner' then
    if owners <= 1 then return 'last_owner' end
  elseif role ~= '' and owners == 0 then
    return 'needs_owner'
  end
end
if role == '' then
  redis.call('HDEL', members, user)
  redis.call('SREM', projects, ARGV[3])
else
  redis.call('HSET', members, user, role)
  redis.call('SADD', projects, ARGV[3])
end
return 'ok'
"#;
static SET_MEMBER_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SET_MEMBER));

pub async fn set_member(
    redis: &mut ConnectionManager,
    project: &str,
    user: &str,
    role: Option<ProjectRole>,
) -> redis::RedisResult<MembershipChange> {
    let outcome: String = SET_MEMBER_SCRIPT
        .key(members_key(project))
        .key(user_projects_key(user))
        .arg(user)
        .arg(role.map_or("", ProjectRole::as_str))
        .arg(project)
        .invoke_async(redis)
        .await?;
    Ok(match outcome.as_str() {
        "last_owner" => MembershipChange::LastOwner,
        "not_member" => MembershipChange::NotMember,
        "needs_owner" => MembershipChange::NeedsOwner,
        _ => MembershipChange::Applied,
    })
}

/// The project a document is registered in.
pub async fn project_of_document(
    redis: &mut ConnectionManager,
    document: &str,
) -> redis::RedisResult<Option<String>> {
    redis.get(document_key(document)).await
}

/// Why a document was not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentRefusal {
    /// The project has no members: it does not exist.
    ProjectNotFound,
    /// The project has members but no owner (only data written before owners were enforced).
    ProjectNeedsOwner,
    /// The document is registered in this other project (documents never move silently).
    InOtherProject(String),
}

/// Registers a document in a project that exists and has an owner; sets its title when one is
/// given (an absent title keeps the stored one). Answers `ok` and the stored title (empty:
/// none), or the refusal.
const REGISTER_DOCUMENT: &str = r#"
local document, documents, members, titles = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local project, id, title, set_title = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local roles = redis.call('HVALS', members)
if #roles == 0 then return {'project_not_found', ''} end
local owned = false
for _, r in ipairs(roles) do
  if r == 'owner' then owned = true break end
end
if not owned then return {'project_needs_owner', ''} end
local current = redis.call('GET', document)
if current and current ~= project then return {'other', current} end
redis.call('SET', document, project)
redis.call('SADD', documents, id)
if set_title == '1' then redis.call('HSET', titles, id, title) end
return {'ok', redis.call('HGET', titles, id) or ''}
"#;
static REGISTER_DOCUMENT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(REGISTER_DOCUMENT));

/// Registers `document` in `project` without touching its title.
pub async fn register_document(
    redis: &mut ConnectionManager,
    project: &str,
    document: &str,
) -> redis::RedisResult<Result<(), DocumentRefusal>> {
    Ok(register_document_titled(redis, project, document, None)
        .await?
        .map(|_| ()))
}

/// Registers `document` in `project`, storing `title` when given. Returns the stored title.
pub async fn register_document_titled(
    redis: &mut ConnectionManager,
    project: &str,
    document: &str,
    title: Option<&str>,
) -> redis::RedisResult<Result<Option<String>, DocumentRefusal>> {
    let (outcome, value): (String, String) = REGISTER_DOCUMENT_SCRIPT
        .key(document_key(document))
        .key(project_documents_key(project))
        .key(members_key(project))
        .key(project_titles_key(project))
        .arg(project)
        .arg(document)
        .arg(title.unwrap_or(""))
        .arg(if title.is_some() { "1" } else { "0" })
        .invoke_async(redis)
        .await?;
    Ok(match outcome.as_str() {
        "ok" => Ok((!value.is_empty()).then_some(value)),
        "project_not_found" => Err(DocumentRefusal::ProjectNotFound),
        "project_needs_owner" => Err(DocumentRefusal::ProjectNeedsOwner),
        _ => Err(DocumentRefusal::InOtherProject(value)),
    })
}

/// Removes `document` from `project` (its registration and title). `false` when it was not
/// registered there.
const UNREGISTER_DOCUMENT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
"#;
static UNREGISTER_DOCUMENT_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(UNREGISTER_DOCUMENT));

pub async fn unregister_document(
    redis: &mut ConnectionManager,
    project: &str,
    document: &str,
) -> redis::RedisResult<bool> {
    let removed: i64 = UNREGISTER_DOCUMENT_SCRIPT
        .key(document_key(document))
        .key(project_documents_key(project))
        .key(project_titles_key(project))
        .arg(project)
        .arg(document)
        .invoke_async(redis)
        .await?;
    Ok(removed == 1)
}

/// The projects `user` belongs to with their role there, sorted by project id. Set entries
/// whose membership is gone are skipped.
pub async fn projects_with_roles(
    redis: &mut ConnectionManager,
    user: &str,
) -> redis::RedisResult<Vec<(String, ProjectRole)>> {
    let mut projects = projects_of(redis, user).await?;
    if projects.is_empty() {
        return Ok(Vec::new());
    }
    projects.sort();
    let mut pipe = redis::pipe();
    for p in &projects {
        pipe.hget(members_key(p), user);
    }
    let roles: Vec<Option<String>> = pipe.query_async(redis).await?;
    Ok(projects
        .into_iter()
        .zip(roles)
        .filter_map(|(p, r)| r.and_then(|r| r.parse().ok()).map(|r| (p, r)))
        .collect())
}

/// Members (sorted by user id) and the number of documents of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectSummary {
    pub members: Vec<(String, ProjectRole)>,
    pub documents: u64,
}

/// The project's summary; `None` when it has no members (it does not exist).
pub async fn project_summary(
    redis: &mut ConnectionManager,
    project: &str,
) -> redis::RedisResult<Option<ProjectSummary>> {
    let (all, documents): (Vec<(String, String)>, u64) = redis::pipe()
        .hgetall(members_key(project))
        .scard(project_documents_key(project))
        .query_async(redis)
        .await?;
    if all.is_empty() {
        return Ok(None);
    }
    let mut members: Vec<(String, ProjectRole)> = all
        .into_iter()
        .filter_map(|(u, r)| r.parse().ok().map(|r| (u, r)))
        .collect();
    members.sort();
    Ok(Some(ProjectSummary { members, documents }))
}

/// The documents of `project` with their titles, sorted by document id.
pub async fn documents(
    redis: &mut ConnectionManager,
    project: &str,
) -> redis::RedisResult<Vec<(String, Option<String>)>> {
    let (ids, titles): (Vec<String>, std::collections::HashMap<String, String>) = redis::pipe()
        .smembers(project_documents_key(project))
        .hgetall(project_titles_key(project))
        .query_async(redis)
        .await?;
    let mut out: Vec<(String, Option<String>)> = ids
        .into_iter()
        .map(|d| {
            let title = titles.get(&d).cloned();
            (d, title)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// `Some(title)` when `document` is registered in `project` (the title itself is optional).
pub async fn document_in_project(
    redis: &mut ConnectionManager,
    project: &str,
    document: &str,
) -> redis::RedisResult<Option<Option<String>>> {
    let (owner, title): (Option<String>, Option<String>) = redis::pipe()
        .get(document_key(document))
        .hget(project_titles_key(project), document)
        .query_async(redis)
        .await?;
    Ok((owner.as_deref() == Some(project)).then_some(title))
}

/// The Redis set of a chat room's participants (written by the chat function, read by the
/// relay's `room:` check and by user presence).
pub fn room_participants_key(room: &str) -> String {
    format!("inkwire:room:{room}:participants")
}
/// The Redis set of the rooms a user was added to (written by the chat function; may still
/// name a room the user has left, so every use checks the room's participants).
fn user_rooms_key(user: &str) -> String {
    format!("inkwire:chat:user:{user}:rooms")
}

/// The participants of chat room `room`.
pub async fn room_participants(
    redis: &mut ConnectionManager,
    room: &str,
) -> redis::RedisResult<Vec<String>> {
    redis.smembers(room_participants_key(room)).await
}

/// Is `user` a participant of chat room `room`?
pub async fn is_room_participant(
    redis: &mut ConnectionManager,
    room: &str,
    user: &str,
) -> redis::RedisResult<bool> {
    redis.sismember(room_participants_key(room), user).await
}

/// The chat rooms `user` is a participant of now (valid ids only).
pub async fn rooms_of(
    redis: &mut ConnectionManager,
    user: &str,
) -> redis::RedisResult<Vec<String>> {
    let listed: Vec<String> = redis.smembers(user_rooms_key(user)).await?;
    let listed: Vec<String> = listed.into_iter().filter(|r| is_valid_id(r)).collect();
    if listed.is_empty() {
        return Ok(listed);
    }
    let mut pipe = redis::pipe();
    for room in &listed {
        pipe.sismember(room_participants_key(room), user);
    }
    let member: Vec<bool> = pipe.query_async(redis).await?;
    Ok(listed
        .into_iter()
        .zip(member)
        .filter_map(|(r, m)| m.then_some(r))
        .collect())
}

/// Do `a` and `b` share a project or a chat room?
pub async fn share_project_or_room(
    redis: &mut ConnectionManager,
    a: &str,
    b: &str,
) -> redis::RedisResult<bool> {
    let common: Vec<String> = redis
        .sinter(&[user_projects_key(a), user_projects_key(b)])
        .await?;
    if !common.is_empty() {
        return Ok(true);
    }
    let rooms = rooms_of(redis, a).await?;
    if rooms.is_empty() {
        return Ok(false);
    }
    let mut pipe = redis::pipe();
    for room in &rooms {
        pipe.sismember(room_participants_key(room), b);
    }
    let member: Vec<bool> = pipe.query_async(redis).await?;
    Ok(member.into_iter().any(|m| m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("user_1-A"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a.b"));
        assert!(!is_valid_id("a*"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn roles_order_by_power() {
        assert!(ProjectRole::Owner < ProjectRole::Reader);
        assert_eq!(
            "editor".parse::<ProjectRole>().unwrap(),
            ProjectRole::Editor
        );
    }
}
