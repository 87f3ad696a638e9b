//! The events API as its own binary: on AWS Lambda when `AWS_LAMBDA_RUNTIME_API` is set,
//! otherwise listening on `INKWIRE_HTTP_ADDR`.

use inkwire_shared::{AppState, config::Config, http, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let config = Config::from_env()?;
    let addr = config.http_addr;
    let state = AppState::connect(config, "inkwire-events").await?;
    http::serve(inkwire_events::app(state), addr, http::shutdown_signal()).await
}
