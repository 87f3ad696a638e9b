//! The workflows API as its own binary: on AWS Lambda when `AWS_LAMBDA_RUNTIME_API` is set,
//! otherwise listening on `INKWIRE_HTTP_ADDR`. Steps run in `workflows-worker`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_shared::{AppState, http};
use inkwire_workflows::{Engine, WorkflowsApi, WorkflowsConfig, routes};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let config = WorkflowsConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-workflows-api").await?;
    let addr = app.config.http_addr;
    let cors = inkwire_shared::origins::cors_layer(&app.config.allowed_origins);
    let health = http::health_routes().with_state(app.clone());
    let engine = Engine::new(app.js.clone(), app.redis.clone(), config);
    let router = http::edge(routes(WorkflowsApi { app, engine }).merge(health)).layer(cors);
    http::serve(router, addr, http::shutdown_signal()).await
}
