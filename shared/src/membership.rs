//! Project membership and document registration, stored in Redis.
//!
//! A project's members are one hash (`inkwire:project:{p}:members`, user → role); a user's
//! projects one set (`inkwire:user:{u}:projects`), kept in step so the relay can list a user's
//! channels. A document belongs to exactly one project (`inkwire:document:{d}:project`).

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
}

/// Sets (`Some(role)`) or removes (`None`) a member, atomically refusing any change that would
/// leave a project that has owners without one.
const SET_MEMBER: &str = r#"
local members, projects = KEYS[1], KEYS[2]
local user, role = ARGV[1], ARGV[2]
local current = redis.call('HGET', members, user)
if role == '' and not current then return 'not_member' end
if current == 'owner' and role ~= 'owner' then
  local owners = 0
  for _, r in ipairs(redis.call('HVALS', members)) do
    if r == 'owner' then owners = owners + 1 end
  end
  if owners <= 1 then return 'last_owner' end
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

pub async fn set_member(
    redis: &mut ConnectionManager,
    project: &str,
    user: &str,
    role: Option<ProjectRole>,
) -> redis::RedisResult<MembershipChange> {
    let outcome: String = redis::Script::new(SET_MEMBER)
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

/// Registers `document` in `project`. Returns the project it already belonged to if that is a
/// different one (documents never move silently).
const REGISTER_DOCUMENT: &str = r#"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return current end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return ''
"#;

pub async fn register_document(
    redis: &mut ConnectionManager,
    project: &str,
    document: &str,
) -> redis::RedisResult<Result<(), String>> {
    let other: String = redis::Script::new(REGISTER_DOCUMENT)
        .key(document_key(document))
        .key(project_documents_key(project))
        .arg(project)
        .arg(document)
        .invoke_async(redis)
        .await?;
    Ok(if other.is_empty() { Ok(()) } else { Err(other) })
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
