//! The co-editing server as one long-running process (container): the y-websocket endpoint
//! `/ws/docs/{documentId}` and the REST API. Run several behind any load balancer: instances
//! serving the same document follow each other through the `YDOC` stream.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_collaboration::{Coedit, CoeditConfig};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = CoeditConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-coedit").await?;
    let addr = app.config.http_addr;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let coedit = Coedit::start(app, config, shutdown).await?;
    let router = inkwire_collaboration::app(coedit);
    http::serve(router, addr, async move {
        http::shutdown_signal().await;
        trigger.trigger();
    })
    .await
}
