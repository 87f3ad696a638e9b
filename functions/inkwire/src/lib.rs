//! Every function of inkwire composed into one process: the events API, the relay (WebSocket
//! paths, metrics, server API) and the router, on one address. Used by `inkwire dev`,
//! `inkwire serve`, the benchmarks and the end-to-end tests.

use axum::Router;
use inkwire_relay::{Relay, RelayConfig};
use inkwire_shared::AppState;
use inkwire_shared::consumer::Shutdown;
use tokio::task::JoinHandle;

/// The composed service and its background work.
pub struct Running {
    pub router: Router,
    pub relay: Relay,
    background: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// Builds the router and starts the background parts (relay stats responder, router
/// consumers). They stop when `shutdown` is triggered.
pub async fn start(
    state: AppState,
    relay_config: RelayConfig,
    shutdown: Shutdown,
) -> anyhow::Result<Running> {
    let relay = Relay::new(state.clone(), relay_config.clone(), shutdown.clone());
    relay.start_background().await?;
    let router_task = tokio::spawn(inkwire_relay::router::run_router(
        state.js.clone(),
        relay_config.router,
        shutdown,
    ));
    let router = inkwire_events::routes()
        .merge(inkwire_shared::http::health_routes())
        .with_state(state)
        .merge(inkwire_relay::routes(relay.clone()));
    Ok(Running {
        router: inkwire_shared::http::with_fallbacks(router),
        relay,
        background: vec![router_task],
    })
}

impl Running {
    /// Waits for the background work to finish after shutdown was triggered.
    pub async fn finished(self) {
        for task in self.background {
            match task.await {
                Ok(Err(e)) => tracing::error!(error = %e, "background task failed"),
                Err(e) if !e.is_cancelled() => {
                    tracing::error!(error = %e, "background task panicked")
                }
                _ => {}
            }
        }
    }
}
