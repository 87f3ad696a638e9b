//! Registered definitions: every version of every workflow, immutable once stored.
//!
//! Registering the same version again with the same content is a no-op (a retried request);
//! with different content it is refused — a run keeps the version it started with, and a
//! version that changed under it would make its history unreadable. A new version must be
//! higher than the latest.

use redis::aio::ConnectionManager;

use crate::definition::Definition;
use crate::store;

/// What registering did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Created,
    Unchanged,
    /// That version exists with other content.
    VersionTaken,
    /// The latest version is higher (or equal with other content).
    Stale {
        latest: u32,
    },
    /// The id belongs to another project.
    OtherProject {
        project: String,
    },
}

/// KEYS: def, defs, project defs. ARGV: version, json, id, project, registrant.
const REGISTER: &str = r#"
local existing = redis.call('HGET', KEYS[1], 'v' .. ARGV[1])
if existing then
  if existing == ARGV[2] then return {'unchanged'} end
  return {'taken'}
end
local project = redis.call('HGET', KEYS[1], 'project')
if project and project ~= ARGV[4] then return {'project', project} end
local latest = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0')
if latest >= tonumber(ARGV[1]) then return {'stale', tostring(latest)} end
redis.call('HSET', KEYS[1], 'v' .. ARGV[1], ARGV[2], 'latest', ARGV[1], 'project', ARGV[4],
  'by' .. ARGV[1], ARGV[5])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
return {'created'}
"#;

pub async fn register(
    redis: &mut ConnectionManager,
    definition: &Definition,
    registrant: &str,
) -> anyhow::Result<Registered> {
    static S: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = S.get_or_init(|| redis::Script::new(REGISTER));
    let json = serde_json::to_string(definition)?;
    let answer: Vec<String> = script
        .key(store::definition_key(&definition.id))
        .key(store::definitions_key())
        .key(store::project_definitions_key(&definition.project_id))
        .arg(definition.version)
        .arg(json)
        .arg(&definition.id)
        .arg(&definition.project_id)
        .arg(registrant)
        .invoke_async(redis)
        .await?;
    Ok(match answer.first().map(String::as_str) {
        Some("created") => Registered::Created,
        Some("unchanged") => Registered::Unchanged,
        Some("taken") => Registered::VersionTaken,
        Some("project") => Registered::OtherProject {
            project: answer.get(1).cloned().unwrap_or_default(),
        },
        _ => Registered::Stale {
            latest: answer.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
        },
    })
}

/// One version (`None`: not registered).
pub async fn load(
    redis: &mut ConnectionManager,
    id: &str,
    version: u32,
) -> anyhow::Result<Option<Definition>> {
    let json: Option<String> = redis::cmd("HGET")
        .arg(store::definition_key(id))
        .arg(format!("v{version}"))
        .query_async(redis)
        .await?;
    Ok(match json {
        Some(j) => Some(serde_json::from_str(&j)?),
        None => None,
    })
}

/// The latest version's number and the project the workflow belongs to.
pub async fn latest(
    redis: &mut ConnectionManager,
    id: &str,
) -> anyhow::Result<Option<(u32, String)>> {
    let (latest, project): (Option<u32>, Option<String>) = redis::cmd("HMGET")
        .arg(store::definition_key(id))
        .arg("latest")
        .arg("project")
        .query_async(redis)
        .await?;
    Ok(latest.zip(project))
}

/// Workflow ids: all of them, or a project's.
pub async fn ids(
    redis: &mut ConnectionManager,
    project: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let key = match project {
        Some(p) => store::project_definitions_key(p),
        None => store::definitions_key(),
    };
    let mut ids: Vec<String> = redis::cmd("SMEMBERS").arg(key).query_async(redis).await?;
    ids.sort();
    Ok(ids)
}

/// Who registered a version.
pub async fn registrant(
    redis: &mut ConnectionManager,
    id: &str,
    version: u32,
) -> anyhow::Result<Option<String>> {
    Ok(redis::cmd("HGET")
        .arg(store::definition_key(id))
        .arg(format!("by{version}"))
        .query_async(redis)
        .await?)
}
