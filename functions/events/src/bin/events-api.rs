//! The events API as its own binary: on AWS Lambda when `AWS_LAMBDA_RUNTIME_API` is set,
//! otherwise listening on `INKWIRE_HTTP_ADDR`.

// glibc's malloc was the largest single cost in the ingest profile (JSON values are
// many small allocations); mimalloc roughly halves it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_shared::{AppState, config::Config, http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let config = Config::from_env()?;
    let addr = config.http_addr;
    let state = AppState::connect(config, "inkwire-events").await?;
    http::serve(inkwire_events::app(state), addr, http::shutdown_signal()).await
}
