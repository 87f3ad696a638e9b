//! The co-editing REST API as its own binary (content, state, contributions): on AWS
//! Lambda when `AWS_LAMBDA_RUNTIME_API` is set, otherwise listening on `INKWIRE_HTTP_ADDR`.
//! The WebSocket endpoint needs a long-running process (`coedit`, or `inkwire serve`).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_collaboration::api::{DocumentsApi, routes};
use inkwire_collaboration::storage::Store;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let app = AppState::start_from_env("inkwire-collaboration-api").await?;
    let addr = app.config.http_addr;
    let store = Store::open(&app.js).await?;
    let cors = inkwire_shared::origins::cors_layer(&app.config.allowed_origins);
    let health = http::health_routes().with_state(app.clone());
    let router = http::edge(routes(DocumentsApi { app, store }).merge(health)).layer(cors);
    http::serve(router, addr, http::shutdown_signal()).await
}
