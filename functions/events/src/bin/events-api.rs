//! The events API as its own binary: on AWS Lambda when `AWS_LAMBDA_RUNTIME_API` is set,
//! otherwise listening on `INKWIRE_HTTP_ADDR`.

// glibc's malloc was the largest single cost in the ingest profile (JSON values are
// many small allocations); mimalloc roughly halves it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let state = AppState::start_from_env("inkwire-events").await?;
    let addr = state.config.http_addr;
    let cors = inkwire_shared::origins::cors_layer(&state.config.allowed_origins);
    let router = inkwire_events::app(state).layer(cors);
    http::serve(router, addr, http::shutdown_signal()).await
}
