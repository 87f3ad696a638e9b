//! HTTP glue: the JSON body extractor (content type, size limit, syntax), health and
//! readiness routes, the edge every composed router goes through ([`edge`]: problem+json
//! for every error, request-target and header limits, a panic becomes a logged `500`), and
//! `serve`, which runs one axum `Router` on AWS Lambda (when `AWS_LAMBDA_RUNTIME_API` is set)
//! or on a local address.

mod wire;

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};
use tower_http::catch_panic::CatchPanicLayer;

use crate::problem::{Problem, clip};
use crate::state::AppState;

/// A request body that is JSON (by content type and syntax) and within the size limit.
/// Schema validation is the handler's job, because the schema depends on the route.
pub struct JsonBody(pub Value);

impl<S> FromRequest<S> for JsonBody
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let limit = AppState::from_ref(state).config.max_body_bytes;
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim();
        let is_json = essence.eq_ignore_ascii_case("application/json")
            || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "expected Content-Type application/json, got {:?}",
                    if content_type.is_empty() {
                        "(none)"
                    } else {
                        content_type
                    }
                ),
            ));
        }
        let too_large = || {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body exceeds {limit} bytes"),
            )
        };
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > limit
        {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| too_large())?;
        let mut value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Problem::bad_request(
                "malformed_json",
                format!("request body is not valid JSON: {e}"),
            )
        })?;
        // `12.0` is a valid integer to JSON Schema but not to a typed consumer: every body
        // is read with integers spelled as integers (see `schema::canonicalize_numbers`).
        crate::schema::canonicalize_numbers(&mut value);
        Ok(JsonBody(value))
    }
}

/// How long `/readyz` waits for each dependency (they are asked in parallel).
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// `/healthz` (the process is up) and `/readyz` (NATS and Redis answer a real request within
/// [`READY_TIMEOUT`]). Both are public.
pub fn health_routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    AppState: FromRef<S>,
{
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
}

/// Runs `check` with the readiness timeout; `Err` says why the dependency is not ready (the
/// error itself is logged, not shown: it may name hosts).
async fn ready_check<E: std::fmt::Display>(
    what: &str,
    check: impl Future<Output = Result<(), E>>,
) -> Result<(), &'static str> {
    match tokio::time::timeout(READY_TIMEOUT, check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::warn!(dependency = what, error = %e, "readiness check failed");
            Err("unavailable")
        }
        Err(_) => {
            tracing::warn!(dependency = what, "readiness check timed out");
            Err("unavailable (no answer within 1 s)")
        }
    }
}

async fn readyz<S>(State(state): State<S>) -> Response
where
    AppState: FromRef<S>,
{
    let state = AppState::from_ref(&state);
    // Round trips, not the client's idea of its connection: a stopped server keeps the TCP
    // connection open, and the clients only notice after their own, much longer, timeouts.
    let nats = ready_check("nats", jetstream_answers(&state.nats));
    let mut redis = state.redis.clone();
    let redis = ready_check("redis", crate::redis_store::ping(&mut redis));
    let (nats, redis) = tokio::join!(nats, redis);
    let word = |r: &Result<(), &'static str>| match r {
        Ok(()) => "ok",
        Err(why) => why,
    };
    if nats.is_ok() && redis.is_ok() {
        return Json(json!({"status": "ok", "nats": "ok", "redis": "ok"})).into_response();
    }
    let failing: Vec<String> = [("nats", &nats), ("redis", &redis)]
        .into_iter()
        .filter_map(|(name, r)| r.err().map(|why| format!("{name} is {why}")))
        .collect();
    let problem = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        failing.join("; "),
    );
    // A problem's `status` is the HTTP status; each dependency's state is an extension member.
    let mut doc = problem.to_json();
    doc["nats"] = json!(word(&nats));
    doc["redis"] = json!(word(&redis));
    problem_json(StatusCode::SERVICE_UNAVAILABLE, &doc)
}

/// Asks JetStream for the account information: a round trip through the server to JetStream.
/// The reply is only checked for an error member, so that the check does not depend on the
/// client library parsing every field a newer server sends.
async fn jetstream_answers(nats: &async_nats::Client) -> Result<(), String> {
    let reply = nats
        .request("$JS.API.INFO", bytes::Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    let doc: Value = serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    match doc.get("error") {
        None => Ok(()),
        Some(e) => Err(format!("JetStream answered {e}")),
    }
}

fn problem_json(status: StatusCode, doc: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        serde_json::to_vec(doc).unwrap_or_default(),
    )
        .into_response()
}

/// Longest request target (path and query) handled; a longer one gets `414 uri_too_long`.
/// Ids are at most 64 characters, so real requests stay far below.
pub const MAX_URI_BYTES: usize = 16 * 1024;
/// Largest header section handled; a larger one gets `431 headers_too_large`.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How much of a request body a handler left unread is read and dropped before the answer
/// is sent, and for how long at most (see [`request_limits`]).
pub const MAX_DRAIN_BYTES: usize = 16 * 1024 * 1024;
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What every composed router goes through: problem+json fallbacks for unknown routes and
/// wrong methods, any other error answer (axum's own path, query and WebSocket rejections)
/// turned into problem+json, the request-target and header limits, and a handler panic
/// turned into a logged `500 internal_error` (the panic message is never sent).
pub fn edge<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    with_fallbacks(router)
        .layer(axum::middleware::map_response(problem_for_errors))
        .layer(axum::middleware::from_fn(request_limits))
        .layer(CatchPanicLayer::custom(panic_response))
}

/// Adds problem+json answers for unknown routes and wrong methods (part of [`edge`]).
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .fallback(|req: Request<Body>| async move {
            Problem::not_found(format!(
                "no route for {} {}",
                req.method(),
                req.uri().path()
            ))
        })
        .method_not_allowed_fallback(|req: Request<Body>| async move {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
}

/// The request-target and header limits; and the rest of a request body the handler did not
/// read (a route that takes none, a request refused before its body was looked at) is read
/// and dropped before the answer goes out. Otherwise hyper closes the connection with the
/// body still unread, the kernel resets it, and the client often loses the answer.
async fn request_limits(req: Request, next: Next) -> Response {
    let refused = over_limits(&req);
    // A request without a body (most reads) has nothing to drain: no wrapping, no timer.
    if axum::body::HttpBody::size_hint(req.body()).exact() == Some(0) {
        return match refused {
            Some(problem) => problem.into_response(),
            None => next.run(req).await,
        };
    }
    let (parts, body) = req.into_parts();
    let shared = Arc::new(Mutex::new(body.into_data_stream()));
    let for_handler = shared.clone();
    let body = Body::from_stream(futures::stream::poll_fn(move |cx| {
        lock(&for_handler).poll_next_unpin(cx)
    }));
    let mut res = match refused {
        Some(problem) => problem.into_response(),
        None => next.run(Request::from_parts(parts, body)).await,
    };
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let mut left = MAX_DRAIN_BYTES;
        loop {
            match futures::future::poll_fn(|cx| lock(&shared).poll_next_unpin(cx)).await {
                None => return true,
                Some(Ok(chunk)) if chunk.len() <= left => left -= chunk.len(),
                Some(_) => return false,
            }
        }
    })
    .await;
    if drained != Ok(true) {
        // Too much left (or a broken body): at least say the connection ends here.
        res.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    res
}

fn over_limits(req: &Request) -> Option<Problem> {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return Some(Problem::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is {target} bytes; at most {MAX_URI_BYTES} are accepted"),
        ));
    }
    let headers = header_bytes(req.headers());
    if headers > MAX_HEADER_BYTES {
        return Some(Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!("the headers are {headers} bytes; at most {MAX_HEADER_BYTES} are accepted"),
        ));
    }
    None
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding it; a poisoned lock still guards a usable stream.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn header_bytes(headers: &HeaderMap) -> usize {
    // Name, ": ", value and CRLF, as on the wire.
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"))
}

/// Turns an error answer that is not problem+json yet (axum's extractor rejections are
/// plain text) into one, keeping its status and headers.
async fn problem_for_errors(res: Response) -> Response {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) || is_problem(res.headers()) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    // axum's rejection texts are short; anything longer is cut off, not read whole.
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let mut out = problem_for_status(status, text.trim()).into_response();
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in parts.headers.iter() {
        if !out.headers().contains_key(name) {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The problem for an error answer of `status` whose plain-text body was `text`.
pub fn problem_for_status(status: StatusCode, text: &str) -> Problem {
    let code = match status.as_u16() {
        400 if text.starts_with("Invalid URL") || text.starts_with("Wrong number of path") => {
            "invalid_path"
        }
        400 if text.starts_with("Failed to deserialize query string") => "invalid_query",
        400 if text.starts_with("Failed to parse the request body as JSON") => "malformed_json",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => "conflict",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "unprocessable",
        426 => "upgrade_required",
        429 => "too_many_requests",
        431 => "headers_too_large",
        500 => "internal_error",
        503 => "unavailable",
        _ if status.is_client_error() => "client_error",
        _ => "server_error",
    };
    // A server error's text may describe internals; a client error's says what was wrong.
    let detail = if status.is_server_error() || text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text.to_string()
    };
    Problem::new(status, code, detail)
}

/// The answer when a handler panicked: logged with the panic message, which the client never
/// sees (it may contain anything).
fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let message = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("(not a string)");
    tracing::error!(panic = %clip(message, 1000), "a request handler panicked; answered 500");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the server failed while handling this request; the failure was logged",
    )
    .into_response()
}

/// Runs `router` on Lambda when `AWS_LAMBDA_RUNTIME_API` is set, otherwise on `addr` until
/// `shutdown` completes (in-flight requests are allowed to finish).
pub async fn serve(
    router: Router,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() {
        tracing::info!("running on AWS Lambda");
        return lambda_http::run(router)
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "listening");
    serve_on(listener, router, shutdown).await
}

/// Serves `router` on an already bound listener (tests bind port 0 first).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    // Small JSON answers must not wait for Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    // hyper answers requests it cannot parse (a request target over 64 KiB, headers over its
    // buffer, broken syntax) itself, with an empty body; the wire layer makes those answers
    // problem+json too.
    axum::serve(wire::ProblemListener(listener), router)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
