//! The notifications API as its own binary: on AWS Lambda when `AWS_LAMBDA_RUNTIME_API` is
//! set, otherwise listening on `INKWIRE_HTTP_ADDR`. It only publishes jobs and serves the
//! inbox; the notifier runs separately.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use inkwire_notifications::api::{NotificationsApi, routes};
use inkwire_notifications::config::NotifyConfig;
use inkwire_notifications::providers::{ProviderConfig, Providers};
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let notify = NotifyConfig::from_env()?;
    // The devices routes register push endpoints with SNS.
    let providers = Providers::build(&ProviderConfig::from_env()?).await?;
    let app = AppState::start_from_env("inkwire-notifications-api").await?;
    let addr = app.config.http_addr;
    let cors = inkwire_shared::origins::cors_layer(&app.config.allowed_origins);
    let health = http::health_routes().with_state(app.clone());
    let router = http::edge(
        routes(NotificationsApi {
            app,
            config: Arc::new(notify),
            providers,
        })
        .merge(health),
    )
    .layer(cors);
    http::serve(router, addr, http::shutdown_signal()).await
}
