//! Every function of inkwire composed into one process: the events API, the relay (WebSocket
//! paths, metrics, server API) and the router, the writing-session API with its tracker and
//! scheduler, on one address. Used by `inkwire dev`, `inkwire serve`, the benchmarks and the
//! end-to-end tests.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use inkwire_relay::{Relay, RelayConfig};
use inkwire_shared::AppState;
use inkwire_shared::consumer::Shutdown;
use inkwire_writing::api::WritingApi;
use inkwire_writing::state_machine::TrackerConfig;
use inkwire_writing::tracker::Tracker;
use tokio::task::JoinHandle;

/// Settings of the functions that have their own.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub relay: RelayConfig,
    pub writing: TrackerConfig,
}

impl Settings {
    pub fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            relay: RelayConfig::from_env()?,
            writing: TrackerConfig::from_env()?,
        })
    }
}

/// The composed service and its background work.
pub struct Running {
    pub router: Router,
    pub relay: Relay,
    background: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// Builds the router and starts the background parts (relay stats responder, router
/// consumers, writing tracker and scheduler). They stop when `shutdown` is triggered.
pub async fn start(
    state: AppState,
    settings: Settings,
    shutdown: Shutdown,
) -> anyhow::Result<Running> {
    let relay = Relay::new(state.clone(), settings.relay.clone(), shutdown.clone());
    relay.start_background().await?;
    let router_task = tokio::spawn(inkwire_relay::router::run_router(
        state.js.clone(),
        settings.relay.router.clone(),
        shutdown.clone(),
    ));
    let tracker = Tracker::new(
        state.js.clone(),
        state.redis.clone(),
        settings.writing.clone(),
        true,
    );
    let tracker_task = tokio::spawn(inkwire_writing::tracker::run_tracker(
        tracker,
        shutdown.clone(),
    ));
    let scheduler_task = tokio::spawn(inkwire_writing::scheduler::run_scheduler(
        state.js.clone(),
        state.redis.clone(),
        settings.writing.clone(),
        Duration::from_millis(250),
        shutdown,
    ));
    let writing = WritingApi {
        app: state.clone(),
        config: Arc::new(settings.writing),
    };
    let router = inkwire_events::routes()
        .merge(inkwire_shared::http::health_routes())
        .with_state(state)
        .merge(inkwire_relay::routes(relay.clone()))
        .merge(inkwire_writing::api::routes(writing));
    Ok(Running {
        router: inkwire_shared::http::with_fallbacks(router),
        relay,
        background: vec![router_task, tracker_task, scheduler_task],
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
