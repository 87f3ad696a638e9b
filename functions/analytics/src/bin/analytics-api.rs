//! The analytics API as its own binary: on AWS Lambda when `AWS_LAMBDA_RUNTIME_API` is set,
//! otherwise listening on `INKWIRE_HTTP_ADDR`. The counters are built by `analytics-worker`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use inkwire_analytics::{AnalyticsApi, AnalyticsConfig, routes};
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let config = Arc::new(AnalyticsConfig::from_env()?);
    let app = AppState::start_from_env("inkwire-analytics-api").await?;
    let addr = app.config.http_addr;
    let cors = inkwire_shared::origins::cors_layer(&app.config.allowed_origins);
    let health = http::health_routes().with_state(app.clone());
    let router = http::edge(routes(AnalyticsApi { app, config }).merge(health)).layer(cors);
    http::serve(router, addr, http::shutdown_signal()).await
}
