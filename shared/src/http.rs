//! HTTP glue: the JSON body extractor (content type, size limit, syntax), health and
//! readiness routes, problem+json fallbacks, and `serve`, which runs one axum `Router` on AWS
//! Lambda (when `AWS_LAMBDA_RUNTIME_API` is set) or on a local address.

use std::future::Future;
use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::{Value, json};

use crate::problem::Problem;
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
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Problem::bad_request(
                "malformed_json",
                format!("request body is not valid JSON: {e}"),
            )
        })?;
        Ok(JsonBody(value))
    }
}

/// `/healthz` (the process is up) and `/readyz` (NATS and Redis answer). Both are public.
pub fn health_routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    AppState: FromRef<S>,
{
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
}

async fn readyz<S>(State(state): State<S>) -> impl IntoResponse
where
    AppState: FromRef<S>,
{
    let state = AppState::from_ref(&state);
    let nats_ok = matches!(
        state.nats.connection_state(),
        async_nats::connection::State::Connected
    ) && state.nats.flush().await.is_ok();
    let mut redis = state.redis.clone();
    let redis_ok = crate::redis_store::ping(&mut redis).await.is_ok();
    let status = if nats_ok && redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    (
        status,
        Json(
            json!({"status": word(nats_ok && redis_ok), "nats": word(nats_ok), "redis": word(redis_ok)}),
        ),
    )
}

/// Adds problem+json answers for unknown routes and wrong methods.
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
    axum::serve(listener, router)
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
