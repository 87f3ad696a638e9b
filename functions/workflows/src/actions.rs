//! The actions a step runs, each on its rendered input, answering the step's output or an
//! [`ActionError`] that says whether another attempt may help.
//!
//! - `http` — a request; the output is `{status, headers, body}` (the body parsed as JSON when
//!   it is JSON). 5xx, 429 and connection failures are retryable, other 4xx are not. Every
//!   request carries `Idempotency-Key: {runId}:{stepId}`, the same on every attempt, so a
//!   receiver that honours it applies a repeated request once. Addresses are checked after
//!   resolution (by the client's resolver, so a name cannot resolve to a public address for
//!   the check and a private one for the request): loopback, private, link-local, and other
//!   non-public addresses are refused unless the host is in `INKWIRE_WORKFLOW_HTTP_ALLOW_HOSTS`
//!   or `INKWIRE_WORKFLOW_HTTP_ALLOW_PRIVATE` is on (`inkwire dev`); inkwire itself
//!   (`INKWIRE_WORKFLOW_SELF_URL`) is always reachable. With `"auth": "inkwire"` a request
//!   to inkwire's own API carries a 5-minute token of the user who registered the workflow
//!   version, so the step has that user's rights at the time of the call, no more.
//! - `redis` — `get`, `set`, `incr`, `hget`, `hset`, `hincrby`, `hgetall`, `del` on keys
//!   inside the project's namespace `inkwire:wf:data:{projectId}:{key}`; no other command.
//!   Applied once per step: the result is stored under the step's key in the same script,
//!   so an attempt repeated after a crash does not increment twice.
//! - `file` — `read`, `write`, `list`, `epub` (an EPUB 3 built with epub-builder from
//!   chapters or one text) inside the project's directory of the sandbox; paths
//!   are relative and `..`-free (checked when the definition is registered and again here,
//!   after rendering), and writes replace the file atomically (a temporary file renamed).
//!
//! `email`, `sms`, `notification` and `ai` are in [`crate::messaging`]; `delay`,
//! `condition` and `loop` steer the run and are the engine's ([`crate::engine`]).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use serde_json::{Map, Value, json};

use crate::config::WorkflowsConfig;

/// Why an action failed.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionError {
    /// Stable code (`http_503`, `timeout`, `address_not_allowed`, ...): what `nonRetryable`
    /// lists match.
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl ActionError {
    pub fn permanent(code: &str, message: impl Into<String>) -> ActionError {
        ActionError {
            code: code.into(),
            message: message.into(),
            retryable: false,
        }
    }

    pub fn transient(code: &str, message: impl Into<String>) -> ActionError {
        ActionError {
            code: code.into(),
            message: message.into(),
            retryable: true,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({"code": self.code, "message": self.message, "retryable": self.retryable})
    }
}

/// What the actions need: clients and settings, shared by every step.
#[derive(Clone)]
pub struct ActionContext {
    pub redis: ConnectionManager,
    pub js: async_nats::jetstream::Context,
    /// The HTTP action's client (its resolver refuses non-public addresses).
    pub http: reqwest::Client,
    /// The AI endpoint's client: the operator configured that address, so it is not checked.
    pub ai_http: reqwest::Client,
    pub providers: crate::messaging::LazyProviders,
    /// Signs the tokens of `"auth": "inkwire"` (none: such steps fail).
    pub jwt: Option<Arc<inkwire_shared::auth::JwtKeys>>,
    pub config: Arc<WorkflowsConfig>,
}

impl ActionContext {
    pub fn new(
        redis: ConnectionManager,
        js: async_nats::jetstream::Context,
        config: Arc<WorkflowsConfig>,
    ) -> ActionContext {
        let http = reqwest::Client::builder()
            .dns_resolver(CheckedResolver {
                allow_private: config.http_allow_private,
                allow_hosts: config.allowed_hosts(),
            })
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client without TLS settings builds");
        ActionContext {
            redis,
            js,
            http,
            ai_http: reqwest::Client::new(),
            providers: Default::default(),
            jwt: None,
            config,
        }
    }
}

/// Where a step runs: its project and the key repeated attempts share.
pub struct StepScope<'a> {
    pub project: &'a str,
    pub idempotency_key: &'a str,
    /// The user who registered the workflow's version: `"auth": "inkwire"` calls inkwire's
    /// own API as that user.
    pub acting_user: Option<&'a str>,
}

fn input_str<'a>(input: &'a Value, key: &str) -> Result<&'a str, ActionError> {
    input
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ActionError::permanent("invalid_input", format!("`{key}` must be a string")))
}

/// Text for a value that is written somewhere: strings as they are, anything else as JSON.
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// ---- http ----

/// Is `ip` an address on the public internet?
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64/10, carrier-grade NAT
                || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18/15, benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80) // link local
        }
    }
}

/// Resolves names and refuses non-public addresses (unless allowed).
struct CheckedResolver {
    allow_private: bool,
    allow_hosts: Vec<String>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let open = self.allow_private || self.allow_hosts.contains(&host);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| open || is_public(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(format!("{host} resolves to no address this action may reach").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

async fn http(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    let url_text = input_str(input, "url")?;
    let url = reqwest::Url::parse(url_text)
        .map_err(|e| ActionError::permanent("invalid_input", format!("url: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ActionError::permanent(
            "invalid_input",
            "url: must be http:// or https://",
        ));
    }
    // Literal addresses skip the resolver: check them here.
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    if let Some(ip) = literal
        && !is_public(ip)
        && !ctx.config.http_allow_private
        && !ctx.config.allowed_hosts().contains(&host)
    {
        return Err(ActionError::permanent(
            "address_not_allowed",
            format!("{ip} is not a public address"),
        ));
    }
    let method = input.get("method").and_then(Value::as_str).unwrap_or("GET");
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .map_err(|_| ActionError::permanent("invalid_input", "method: not an HTTP method"))?;
    let mut req = ctx
        .http
        .request(method, url)
        .header("idempotency-key", scope.idempotency_key);
    match input.get("auth").and_then(Value::as_str) {
        None => {}
        Some("inkwire") => {
            // Only to inkwire itself: the token never leaves for a third party.
            let (Some(jwt), Some(base), Some(user)) =
                (&ctx.jwt, &ctx.config.self_url, scope.acting_user)
            else {
                return Err(ActionError::permanent(
                    "auth_not_available",
                    "auth inkwire: this engine has no signing key or INKWIRE_WORKFLOW_SELF_URL",
                ));
            };
            if !(url_text == base.as_str() || url_text.starts_with(&format!("{base}/"))) {
                return Err(ActionError::permanent(
                    "auth_not_available",
                    format!("auth inkwire: only for URLs under {base}"),
                ));
            }
            let token = jwt.issue(user, &[], Duration::from_secs(300));
            req = req.bearer_auth(token);
        }
        Some(other) => {
            return Err(ActionError::permanent(
                "invalid_input",
                format!("auth: {other:?} is not \"inkwire\""),
            ));
        }
    }
    if let Some(headers) = input.get("headers").and_then(Value::as_object) {
        for (k, v) in headers {
            req = req.header(k.as_str(), as_text(v));
        }
    }
    if let Some(body) = input.get("body") {
        req = match body {
            Value::String(s) => req.body(s.clone()),
            other => req.json(other),
        };
    }
    let resp = req.send().await.map_err(|e| {
        let text = e.to_string();
        if text.contains("may reach") || format!("{e:?}").contains("may reach") {
            ActionError::permanent("address_not_allowed", text)
        } else if e.is_builder() {
            ActionError::permanent("invalid_input", text)
        } else {
            ActionError::transient("http_unreachable", text)
        }
    })?;
    let status = resp.status().as_u16();
    let mut headers = Map::new();
    for (k, v) in resp.headers() {
        if let Ok(v) = v.to_str() {
            headers.insert(k.as_str().to_string(), json!(v));
        }
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| ActionError::transient("http_unreachable", e.to_string()))?;
    if bytes.len() > MAX_BODY {
        return Err(ActionError::permanent(
            "response_too_large",
            format!(
                "the response body has {} bytes (at most {MAX_BODY})",
                bytes.len()
            ),
        ));
    }
    let body = serde_json::from_slice::<Value>(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    if status >= 400 {
        let code = format!("http_{status}");
        let message = format!("{status} from {url_text}");
        return Err(if status >= 500 || status == 429 || status == 408 {
            ActionError::transient(&code, message)
        } else {
            ActionError::permanent(&code, message)
        });
    }
    Ok(json!({"status": status, "headers": headers, "body": body}))
}

/// The largest response body kept as a step's output.
pub const MAX_BODY: usize = 1024 * 1024;

// ---- redis ----

fn data_key(project: &str, key: &str) -> Result<String, ActionError> {
    if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
        return Err(ActionError::permanent(
            "invalid_input",
            "key: 1-200 characters, no control characters",
        ));
    }
    Ok(format!("{}:data:{project}:{key}", crate::store::PREFIX))
}

/// One redis operation applied at most once per step: the result is kept under the step's
/// idempotency key (for a week) in the same script, so an attempt repeated after a crash
/// answers the first attempt's result instead of incrementing again.
/// KEYS: the data key, the applied marker. ARGV: op, field, value, by, ttl seconds (0: none).
const REDIS_OP: &str = r#"
local done = redis.call('GET', KEYS[2])
if done then return done end
local op = ARGV[1]
local out
if op == 'get' then
  local v = redis.call('GET', KEYS[1])
  out = {value = v or cjson.null}
elseif op == 'set' then
  if tonumber(ARGV[5]) > 0 then
    redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
  else
    redis.call('SET', KEYS[1], ARGV[3])
  end
  out = {ok = true}
elseif op == 'incr' then
  out = {value = redis.call('INCRBY', KEYS[1], ARGV[4])}
elseif op == 'hget' then
  local v = redis.call('HGET', KEYS[1], ARGV[2])
  out = {value = v or cjson.null}
elseif op == 'hset' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  out = {ok = true}
elseif op == 'hincrby' then
  out = {value = redis.call('HINCRBY', KEYS[1], ARGV[2], ARGV[4])}
elseif op == 'hgetall' then
  local all = redis.call('HGETALL', KEYS[1])
  local m = {}
  for i = 1, #all, 2 do m[all[i]] = all[i + 1] end
  if #all == 0 then out = {value = cjson.decode('{}')} else out = {value = m} end
elseif op == 'del' then
  out = {deleted = redis.call('DEL', KEYS[1])}
else
  return redis.error_reply('unknown op')
end
local text = cjson.encode(out)
redis.call('SET', KEYS[2], text, 'EX', 604800)
return text
"#;

async fn redis_op(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let op = input_str(input, "op")?;
    const OPS: [&str; 8] = [
        "get", "set", "incr", "hget", "hset", "hincrby", "hgetall", "del",
    ];
    if !OPS.contains(&op) {
        return Err(ActionError::permanent(
            "invalid_input",
            format!("op: {op:?} is not one of {}", OPS.join(", ")),
        ));
    }
    let key = data_key(scope.project, input_str(input, "key")?)?;
    let field = if matches!(op, "hget" | "hset" | "hincrby") {
        input_str(input, "field")?.to_string()
    } else {
        String::new()
    };
    let value = if matches!(op, "set" | "hset") {
        input
            .get("value")
            .map(as_text)
            .ok_or_else(|| ActionError::permanent("invalid_input", "`value` is required"))?
    } else {
        String::new()
    };
    let by = match input.get("by") {
        None => 1,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| ActionError::permanent("invalid_input", "`by` must be an integer"))?,
    };
    let ttl = input.get("ttlSeconds").and_then(Value::as_u64).unwrap_or(0);
    let marker = format!("{}:applied:{}", crate::store::PREFIX, scope.idempotency_key);
    let mut r = ctx.redis.clone();
    let text: String = SCRIPT
        .get_or_init(|| redis::Script::new(REDIS_OP))
        .key(&key)
        .key(&marker)
        .arg(op)
        .arg(field)
        .arg(value)
        .arg(by)
        .arg(ttl)
        .invoke_async(&mut r)
        .await
        .map_err(|e| {
            if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
                || e.to_string().contains("WRONGTYPE")
            {
                ActionError::permanent("redis_error", e.to_string())
            } else {
                ActionError::transient("redis_unavailable", e.to_string())
            }
        })?;
    serde_json::from_str(&text)
        .map_err(|e| ActionError::permanent("redis_error", format!("unreadable result: {e}")))
}

// ---- file ----

/// The project's directory in the sandbox joined with a checked relative path.
fn sandbox_path(ctx: &ActionContext, project: &str, path: &str) -> Result<PathBuf, ActionError> {
    crate::validate::sandboxed_path(path)
        .map_err(|e| ActionError::permanent("invalid_path", format!("path: {e}")))?;
    if path.len() > 512 {
        return Err(ActionError::permanent(
            "invalid_path",
            "path: at most 512 bytes",
        ));
    }
    Ok(ctx.config.files_dir.join(project).join(path))
}

async fn file(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    let op = input_str(input, "op")?;
    let path_text = input_str(input, "path")?;
    let path = sandbox_path(ctx, scope.project, path_text)?;
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ActionError::permanent("not_found", format!("{path_text}: not found"))
        }
        _ => ActionError::transient("io_error", format!("{path_text}: {e}")),
    };
    match op {
        "read" => {
            let bytes = tokio::fs::read(&path).await.map_err(io)?;
            if bytes.len() > MAX_BODY {
                return Err(ActionError::permanent(
                    "file_too_large",
                    format!("{path_text}: more than {MAX_BODY} bytes"),
                ));
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let json = serde_json::from_str::<Value>(&text).ok();
            Ok(json!({"path": path_text, "content": text, "json": json, "bytes": bytes.len()}))
        }
        "write" => {
            let content = input
                .get("content")
                .map(as_text)
                .ok_or_else(|| ActionError::permanent("invalid_input", "`content` is required"))?;
            if content.len() > MAX_BODY * 8 {
                return Err(ActionError::permanent(
                    "file_too_large",
                    "content: more than 8 MiB",
                ));
            }
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await.map_err(io)?;
            }
            // Atomic replace: a crash mid-write leaves the old file or the new one.
            let tmp =
                path.with_extension(format!("tmp-{}", scope.idempotency_key.replace(':', "-")));
            tokio::fs::write(&tmp, content.as_bytes())
                .await
                .map_err(io)?;
            tokio::fs::rename(&tmp, &path).await.map_err(io)?;
            Ok(json!({"path": path_text, "bytes": content.len()}))
        }
        "epub" => epub(ctx, scope, input, &path, path_text).await,
        "list" => {
            let mut entries = Vec::new();
            let mut dir = match tokio::fs::read_dir(&path).await {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(json!({"path": path_text, "entries": []}));
                }
                Err(e) => return Err(io(e)),
            };
            while let Some(e) = dir.next_entry().await.map_err(io)? {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains(".tmp-") {
                    continue;
                }
                let is_dir = e.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
                entries.push(json!({"name": name, "dir": is_dir}));
                if entries.len() >= 1000 {
                    break;
                }
            }
            entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
            Ok(json!({"path": path_text, "entries": entries}))
        }
        other => Err(ActionError::permanent(
            "invalid_input",
            format!("op: {other:?} is not one of read, write, list, epub"),
        )),
    }
}

/// The largest EPUB whose bytes are also in the step's output (base64), for an upload step.
pub const MAX_INLINE_EPUB: usize = 4 * 1024 * 1024;

/// `<p>` paragraphs of `text` (blank lines separate them), escaped.
fn xhtml_chapter(title: &str, text: &str) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let paragraphs: String = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| format!("<p>{}</p>\n", esc(p).replace('\n', "<br/>")))
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" xmlns:epub=\"http://www.idpf.org/2007/ops\">\n<head><title>{t}</title></head>\n<body>\n<h1>{t}</h1>\n{paragraphs}</body>\n</html>\n",
        t = esc(title)
    )
}

/// `file` with `op: "epub"`: an EPUB 3 built with epub-builder from `chapters`
/// (`[{title, content}]`) or one `content`, with `title`, `author` and `language` (`en`),
/// written atomically at `path` (which must end in `.epub`). The output has the file's
/// `path`, `bytes`, `chapters`, and its bytes in `base64` up to 4 MiB (for an upload step).
async fn epub(
    ctx: &ActionContext,
    scope: &StepScope<'_>,
    input: &Value,
    path: &std::path::Path,
    path_text: &str,
) -> Result<Value, ActionError> {
    let _ = ctx;
    if !path_text.ends_with(".epub") {
        return Err(ActionError::permanent(
            "invalid_path",
            "path: must end with .epub",
        ));
    }
    let title = input_str(input, "title")?.to_string();
    let author = input
        .get("author")
        .and_then(Value::as_str)
        .map(str::to_string);
    let language = input
        .get("language")
        .and_then(Value::as_str)
        .unwrap_or("en")
        .to_string();
    let chapters: Vec<(String, String)> = match (input.get("chapters"), input.get("content")) {
        (Some(Value::Array(list)), _) => list
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    c["title"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("Chapter {}", i + 1)),
                    c.get("content").map(as_text).unwrap_or_default(),
                )
            })
            .collect(),
        (_, Some(content)) => vec![(title.clone(), as_text(content))],
        _ => {
            return Err(ActionError::permanent(
                "invalid_input",
                "chapters or content: one is required",
            ));
        }
    };
    if chapters.is_empty() || chapters.len() > 500 {
        return Err(ActionError::permanent(
            "invalid_input",
            "chapters: 1 to 500",
        ));
    }
    let count = chapters.len();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        use epub_builder::{EpubBuilder, EpubContent, EpubVersion, ReferenceType, ZipLibrary};
        let e = |e: epub_builder::Error| e.to_string();
        let mut b = EpubBuilder::new(ZipLibrary::new().map_err(e)?).map_err(e)?;
        b.epub_version(EpubVersion::V30);
        b.set_title(title.clone());
        b.set_languages(vec![language]);
        if let Some(a) = author {
            b.add_author(a);
        }
        b.inline_toc();
        for (i, (t, text)) in chapters.iter().enumerate() {
            let page = xhtml_chapter(t, text);
            b.add_content(
                EpubContent::new(format!("chapter_{}.xhtml", i + 1), page.as_bytes())
                    .title(t.clone())
                    .reftype(ReferenceType::Text),
            )
            .map_err(e)?;
        }
        let mut out = Vec::new();
        b.generate(&mut out).map_err(e)?;
        Ok(out)
    })
    .await
    .map_err(|e| ActionError::transient("epub_failed", e.to_string()))?
    .map_err(|e| ActionError::permanent("epub_failed", e))?;
    let io = |e: std::io::Error| ActionError::transient("io_error", format!("{path_text}: {e}"));
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", scope.idempotency_key.replace(':', "-")));
    tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
    tokio::fs::rename(&tmp, path).await.map_err(io)?;
    let mut out = json!({"path": path_text, "bytes": bytes.len(), "chapters": count, "mediaType": "application/epub+zip"});
    if bytes.len() <= MAX_INLINE_EPUB {
        use base64::Engine as _;
        out["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&bytes));
    }
    Ok(out)
}

/// Runs an action with an effect (everything but `delay`, `condition` and `loop`).
pub async fn run(
    ctx: &ActionContext,
    action: crate::Action,
    scope: &StepScope<'_>,
    input: &Value,
) -> Result<Value, ActionError> {
    use crate::Action;
    match action {
        Action::Http => http(ctx, scope, input).await,
        Action::Redis => redis_op(ctx, scope, input).await,
        Action::File => file(ctx, scope, input).await,
        Action::Email => crate::messaging::email(ctx, scope, input).await,
        Action::Sms => crate::messaging::sms(ctx, scope, input).await,
        Action::Notification => crate::messaging::notification(ctx, scope, input).await,
        Action::Ai => crate::messaging::ai(ctx, input).await,
        other => Err(ActionError::permanent(
            "action_unavailable",
            format!(
                "the {} action is not available in this version of the engine",
                other.name()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn data_keys_are_namespaced_and_checked() {
        assert_eq!(
            data_key("p-1", "seen:a").unwrap(),
            "inkwire:wf:data:p-1:seen:a"
        );
        assert!(data_key("p-1", "").is_err());
        assert!(data_key("p-1", "a\nb").is_err());
    }
}
