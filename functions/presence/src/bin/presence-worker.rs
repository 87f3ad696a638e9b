//! The presence worker as a long-running process (it consumes the relay reports and runs
//! the heartbeat sweeper and idle checks, so it cannot be a Lambda). Run one or several:
//! each is safe alongside the others.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_presence::{PresenceConfig, PresenceWorker, run_worker};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let config = PresenceConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-presence-worker").await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let worker = tokio::spawn(run_worker(
        PresenceWorker {
            js: app.js.clone(),
            nats: app.nats.clone(),
            redis: app.redis.clone(),
            config,
        },
        shutdown,
    ));
    http::shutdown_signal().await;
    trigger.trigger();
    worker.await?
}
