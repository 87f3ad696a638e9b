//! The relay as its own long-running process: WebSocket paths, `/metrics`, the relay server
//! API, health routes, and the router (disable with `INKWIRE_ROUTER=off` when another
//! process runs it).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_relay::{Relay, RelayConfig};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let relay_config = RelayConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-relay").await?;
    let addr = app.config.http_addr;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let relay = Relay::new(app.clone(), relay_config.clone(), shutdown.clone());
    relay.start_background().await?;
    let router = (std::env::var("INKWIRE_ROUTER").as_deref() != Ok("off")).then(|| {
        tokio::spawn(inkwire_relay::router::run_router(
            app.js.clone(),
            relay_config.router,
            shutdown.clone(),
        ))
    });
    let served = http::serve(inkwire_relay::app(relay), addr, async move {
        http::shutdown_signal().await;
        // Close every WebSocket with "going away" before the server stops.
        trigger.trigger();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    })
    .await;
    if let Some(r) = router {
        let _ = r.await;
    }
    served
}
