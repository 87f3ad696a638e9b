//! Retry-safe HTTP writes: the `Idempotency-Key` header (or a body's `id`), one answer per
//! key, and an event id that is the same for every retry.
//!
//! A client that got no answer, or a `503 outcome_unknown`, cannot tell whether its write
//! took effect; it must be able to send it again without the effect happening twice. Every
//! state-changing route therefore runs its work through [`run`], which
//! - derives the id of what the request publishes from (route, target, caller, key) as a
//!   UUIDv5, so a retry publishes the same `Nats-Msg-Id` and JetStream's duplicate window
//!   drops the second copy even when the first answer was lost;
//! - claims the key in Redis atomically before the work (a concurrent duplicate gets
//!   `409 idempotency_in_progress`), and keeps the first final answer (not a 5xx) for
//!   `INKWIRE_IDEMPOTENCY_TTL`, so a retry after success, even outside the duplicate window,
//!   gets the same answer, marked `Idempotent-Replayed: true`, and changes nothing;
//! - refuses the same key with a different request (route target or body) with
//!   `422 idempotency_key_reused`;
//! - remembers an unknown outcome, so that the retry is let through state checks that the
//!   first attempt's own effect would now fail (`Attempt::after_unknown`).
//!
//! Records live under `inkwire:request:{sha256(route, caller, key)}`: scoped per caller and
//! route, and the client's key never reaches a Redis key as such. A request without a key
//! costs no Redis round trip: it gets a made-up key whose derived event id is used, and a
//! `503 outcome_unknown` names that key as `retryId`, so even such a request can be retried
//! safely.
//!
//! (Not to be confused with `crate::idempotency`, which makes a consumer's effects happen
//! once per JetStream message.)

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::AppState;
use crate::jetstream::PublishFailure;
use crate::problem::{OUTCOME_UNKNOWN, Problem, dependency_failed};

/// The request header that carries the key.
pub const HEADER: &str = "Idempotency-Key";
/// The answer header that marks an answer replayed from the first request with the key.
pub const REPLAYED_HEADER: &str = "Idempotent-Replayed";
/// Longest accepted key.
pub const MAX_KEY_LEN: usize = 255;
/// How long a claim holds at least while its request runs; a process that dies mid-request
/// leaves a claim that expires after this.
const PENDING_TTL: Duration = Duration::from_secs(60);
/// Namespace of the derived event ids.
const NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_0c2e_8d4a_4e57_9a3b_52c1_7e0d_9f44);

/// Is `key` 1-255 printable ASCII characters (space to `~`)?
pub fn is_valid_key(key: &[u8]) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len()) && key.iter().all(|b| (0x20..=0x7e).contains(b))
}

fn invalid_key(detail: &str) -> Problem {
    Problem::bad_request(
        "invalid_idempotency_key",
        format!("header {HEADER} {detail}"),
    )
    .with_extension("header", HEADER)
}

/// The request's `Idempotency-Key` header, validated (at most one, 1-255 printable ASCII
/// characters; else `400 invalid_idempotency_key` naming the header). `None` when absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Problem> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(IdempotencyKey(None));
        };
        if values.next().is_some() {
            return Err(invalid_key("was sent more than once"));
        }
        let bytes = value.as_bytes();
        if !is_valid_key(bytes) {
            // The value is not echoed: it may be long or unprintable.
            return Err(invalid_key(&format!(
                "must be 1-{MAX_KEY_LEN} printable ASCII characters (got {} bytes)",
                bytes.len()
            )));
        }
        let key = std::str::from_utf8(bytes).expect("ASCII").to_string();
        Ok(IdempotencyKey(Some(key)))
    }
}

impl IdempotencyKey {
    /// Merges a body's `id` (already validated by the route's schema) into the key: either
    /// may be sent; both must then be equal.
    pub fn or_body_id(self, body_id: Option<&str>) -> Result<IdempotencyKey, Problem> {
        match (self.0, body_id) {
            (Some(h), Some(b)) if h != b => Err(Problem::bad_request(
                "idempotency_key_mismatch",
                format!(
                    "header {HEADER} and the body's id differ; send one of them, or the same value in both"
                ),
            )),
            (Some(h), _) => Ok(IdempotencyKey(Some(h))),
            (None, b) => Ok(IdempotencyKey(b.map(str::to_string))),
        }
    }
}

/// Which write a key belongs to.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// A stable name of the route, e.g. `writing.keystroke`. Part of the record key and of
    /// the derived id: never change it for an existing route.
    pub route: &'static str,
    /// The caller's user id (the token's `sub`).
    pub caller: &'a str,
    /// What the write is about (a session id, a channel, `project/user`), already validated.
    pub target: &'a str,
}

/// One run of a write, handed to the work of [`run`].
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The client's key, or one made up for this request.
    pub key: String,
    /// Whether the client sent the key.
    pub from_client: bool,
    /// The id of what this write publishes: the same for every retry with the same key.
    pub event_id: Uuid,
    /// An earlier attempt with this key ended in an unknown outcome: its effect may be
    /// applied already, so checks that this very effect would now fail (a session already
    /// paused or ended) must let it through; publishing again with `event_id` is deduped.
    pub after_unknown: bool,
}

impl Attempt {
    /// The answer when publishing `what` failed: `413`, `503 unavailable`, or `503
    /// outcome_unknown` with this attempt's key as `retryId`.
    pub fn publish_problem(&self, e: &PublishFailure, what: &str) -> Problem {
        crate::jetstream::publish_problem(e, what, &self.key, "as the Idempotency-Key header")
    }
}

/// The derived id of the write (`key` in `scope`).
pub fn event_id(scope: &Scope<'_>, key: &str) -> Uuid {
    let mut name = Vec::new();
    for part in [scope.route, scope.target, scope.caller, key] {
        name.extend_from_slice(part.as_bytes());
        name.push(0);
    }
    Uuid::new_v5(&NAMESPACE, &name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn record_key(scope: &Scope<'_>, key: &str) -> String {
    let mut h = Sha256::new();
    for part in [scope.route, scope.caller, key] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("inkwire:request:{}", hex(&h.finalize()))
}

/// What makes two requests with the same key "the same request": target and body.
fn fingerprint(scope: &Scope<'_>, body: Option<&Value>) -> String {
    let mut h = Sha256::new();
    h.update(scope.target.as_bytes());
    h.update([0]);
    if let Some(body) = body {
        h.update(serde_json::to_vec(body).expect("JSON values serialize"));
    }
    hex(&h.finalize())
}

/// What Redis keeps per key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record {
    /// A request with this key is running.
    Pending { fp: String, token: String },
    /// A request with this key was sent to NATS but not acknowledged.
    Unknown { fp: String },
    /// The first final answer.
    Done {
        fp: String,
        status: u16,
        #[serde(default, rename = "contentType")]
        content_type: Option<String>,
        body: String,
    },
}

/// Sets a pending claim unless a record exists; an `unknown` record of the same request is
/// replaced by the claim (the retry may proceed).
const CLAIM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if not (ok and rec.state == 'unknown' and rec.fp == ARGV[3]) then
    return {'exists', cur}
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if cur then return {'after_unknown', ''} end
return {'claimed', ''}
"#;
static CLAIM_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(CLAIM));

/// Replaces the record (or deletes it when ARGV[2] is empty) if it is still the claim with
/// token ARGV[1], or if there is none (a claim that expired under a slow request).
const SETTLE: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if not (ok and rec.token == ARGV[1]) then return 0 end
end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
return 1
"#;
static SETTLE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(SETTLE));

async fn settle(
    redis: &mut ConnectionManager,
    key: &str,
    token: &str,
    record: Option<&Record>,
    ttl: Duration,
) -> redis::RedisResult<()> {
    let value = record
        .map(|r| serde_json::to_string(r).expect("records serialize"))
        .unwrap_or_default();
    let _: i64 = SETTLE_SCRIPT
        .key(key)
        .arg(token)
        .arg(value)
        .arg(ttl.as_millis() as u64)
        .invoke_async(redis)
        .await?;
    Ok(())
}

/// Releases a claim whose request was dropped (client gone, panic) so that a retry does not
/// wait for the claim to expire.
struct ClaimGuard {
    redis: ConnectionManager,
    key: String,
    token: String,
    /// What to leave behind when dropped: the unknown record of an earlier attempt.
    leave: Option<Record>,
    ttl: Duration,
    armed: bool,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut redis = self.redis.clone();
        let (key, token, leave, ttl) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
            self.leave.take(),
            self.ttl,
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = settle(&mut redis, &key, &token, leave.as_ref(), ttl).await;
            });
        }
    }
}

/// Runs `work` once per key: see the module documentation. `body` is the request body (the
/// part of the request besides the target that must be equal for a retry), `None` for
/// routes without one. Validate and authorize before calling this (a refused request claims
/// nothing); put the checks of the current state inside `work` (their answer is kept).
pub async fn run<F, Fut>(
    state: &AppState,
    scope: Scope<'_>,
    key: IdempotencyKey,
    body: Option<&Value>,
    work: F,
) -> Result<Response, Problem>
where
    F: FnOnce(Attempt) -> Fut,
    Fut: Future<Output = Result<Response, Problem>>,
{
    let ttl = state.config.idempotency_ttl;
    // A claim must outlive the request holding it, which may wait for a publish ack.
    let pending_ttl = PENDING_TTL.max(state.config.publish_timeout * 3);
    let Some(client_key) = key.0 else {
        // No key: nothing to claim. A made-up key still gives a retry id that works.
        let key = Uuid::now_v7().to_string();
        let attempt = Attempt {
            event_id: event_id(&scope, &key),
            key,
            from_client: false,
            after_unknown: false,
        };
        let record = record_key(&scope, &attempt.key);
        let outcome = work(attempt).await;
        if matches!(&outcome, Err(p) if p.code == OUTCOME_UNKNOWN) {
            // Only now is the request's fingerprint needed (hashing every keyless request's
            // body would cost the common case for the rare one).
            let fp = fingerprint(&scope, body);
            let mut redis = state.redis.clone();
            if let Err(e) =
                settle(&mut redis, &record, "", Some(&Record::Unknown { fp }), ttl).await
            {
                tracing::warn!(error = %e, "unknown outcome not recorded");
            }
        }
        return outcome;
    };

    let fp = fingerprint(&scope, body);
    let record = record_key(&scope, &client_key);
    let token = Uuid::new_v4().to_string();
    let pending = Record::Pending {
        fp: fp.clone(),
        token: token.clone(),
    };
    let mut redis = state.redis.clone();
    let (claim, current): (String, String) = CLAIM_SCRIPT
        .key(&record)
        .arg(serde_json::to_string(&pending).expect("records serialize"))
        .arg(pending_ttl.as_millis() as u64)
        .arg(&fp)
        .invoke_async(&mut redis)
        .await
        .map_err(|e| dependency_failed("redis", e))?;
    if claim == "exists" {
        return match serde_json::from_str::<Record>(&current) {
            Ok(Record::Done {
                fp: first,
                status,
                content_type,
                body,
            }) if first == fp => Ok(replay(status, content_type, body)),
            Ok(Record::Pending { fp: first, .. }) if first == fp => Err(Problem::conflict(
                "idempotency_in_progress",
                format!("a request with this {HEADER} is still running; retry shortly"),
            )
            .with_retry_after(1)),
            Ok(_) => Err(Problem::unprocessable(
                "idempotency_key_reused",
                format!(
                    "this {HEADER} was used for a different request (another target or body); use a new key"
                ),
            )),
            Err(e) => Err(dependency_failed(
                "redis",
                format!("bad idempotency record: {e}"),
            )),
        };
    }
    let after_unknown = claim == "after_unknown";
    let mut guard = ClaimGuard {
        redis: redis.clone(),
        key: record.clone(),
        token: token.clone(),
        leave: after_unknown.then(|| Record::Unknown { fp: fp.clone() }),
        ttl,
        armed: true,
    };
    let attempt = Attempt {
        event_id: event_id(&scope, &client_key),
        key: client_key,
        from_client: true,
        after_unknown,
    };
    let outcome = work(attempt).await;

    let unknown = matches!(&outcome, Err(p) if p.code == OUTCOME_UNKNOWN);
    let server_error = match &outcome {
        Ok(r) => r.status().is_server_error(),
        Err(p) => p.status >= 500,
    };
    guard.armed = false;
    if server_error {
        // Not an answer to keep: the retry must run again. An unknown outcome (now or
        // before) is remembered so the retry passes the state checks.
        let leave = (unknown || after_unknown).then_some(Record::Unknown { fp });
        if let Err(e) = settle(&mut redis, &record, &token, leave.as_ref(), ttl).await {
            tracing::warn!(error = %e, "idempotency claim not released; it expires on its own");
        }
        return outcome;
    }
    let response = outcome.unwrap_or_else(IntoResponse::into_response);
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let done = Record::Done {
        fp,
        status: parts.status.as_u16(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: String::from_utf8_lossy(&bytes).into_owned(),
    };
    if let Err(e) = settle(&mut redis, &record, &token, Some(&done), ttl).await {
        // The effect happened; a retry is still deduped by the event id within the
        // duplicate window.
        tracing::warn!(error = %e, "first answer not kept for retries");
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// The kept answer, marked as replayed.
fn replay(status: u16, content_type: Option<String>, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut res = (status, body).into_response();
    res.headers_mut().remove(header::CONTENT_TYPE);
    if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        res.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    res.headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_printable_ascii_up_to_255() {
        assert!(is_valid_key(b"a"));
        assert!(is_valid_key(b"order 42 / retry ~1"));
        assert!(is_valid_key(&[b'k'; 255]));
        assert!(!is_valid_key(b""));
        assert!(!is_valid_key(&[b'k'; 256]));
        assert!(!is_valid_key(b"a\tb"));
        assert!(!is_valid_key(b"a\x7fb"));
        assert!(!is_valid_key("é".as_bytes()));
    }

    #[test]
    fn derived_ids_depend_on_every_part() {
        let scope = Scope {
            route: "writing.keystroke",
            caller: "u-1",
            target: "s-1",
        };
        let id = event_id(&scope, "k");
        assert_eq!(id, event_id(&scope, "k"));
        assert_ne!(id, event_id(&scope, "k2"));
        assert_ne!(
            id,
            event_id(
                &Scope {
                    caller: "u-2",
                    ..scope
                },
                "k"
            )
        );
        assert_ne!(
            id,
            event_id(
                &Scope {
                    target: "s-2",
                    ..scope
                },
                "k"
            )
        );
        assert_ne!(
            id,
            event_id(
                &Scope {
                    route: "writing.pause",
                    ..scope
                },
                "k"
            )
        );
        // Parts are separated: ("ab", "c") is not ("a", "bc").
        assert_ne!(
            event_id(
                &Scope {
                    target: "ab",
                    caller: "c",
                    ..scope
                },
                "k"
            ),
            event_id(
                &Scope {
                    target: "a",
                    caller: "bc",
                    ..scope
                },
                "k"
            )
        );
    }

    #[test]
    fn record_keys_hide_the_key_and_ignore_the_target() {
        let scope = Scope {
            route: "relay.broadcast",
            caller: "svc",
            target: "project:p-1",
        };
        let k = record_key(&scope, "secret\r\nkey");
        assert!(k.starts_with("inkwire:request:"));
        assert!(!k.contains("secret"));
        assert_eq!(
            k,
            record_key(
                &Scope {
                    target: "x",
                    ..scope
                },
                "secret\r\nkey"
            )
        );
        assert_ne!(
            k,
            record_key(
                &Scope {
                    caller: "other",
                    ..scope
                },
                "secret\r\nkey"
            )
        );
    }

    #[test]
    fn body_id_and_header_merge() {
        let none = IdempotencyKey(None);
        assert_eq!(none.clone().or_body_id(None).unwrap(), none);
        assert_eq!(
            none.or_body_id(Some("b")).unwrap(),
            IdempotencyKey(Some("b".into()))
        );
        let h = IdempotencyKey(Some("h".into()));
        assert_eq!(h.clone().or_body_id(Some("h")).unwrap(), h);
        assert_eq!(h.clone().or_body_id(None).unwrap(), h);
        assert_eq!(
            h.or_body_id(Some("b")).unwrap_err().code,
            "idempotency_key_mismatch"
        );
    }
}
