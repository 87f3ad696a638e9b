//! The activity worker as one long-running process: a durable consumer per source and the
//! retention sweep. Run several for availability: each source's consumer is shared (every
//! message is applied once through `shared::idempotency::apply_once`, whichever instance gets
//! it) and the sweep's leases keep instances from trimming the same user at once.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_activity::{ActivityConfig, run_worker};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let config = ActivityConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-activity-worker").await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let worker = tokio::spawn(run_worker(
        app.js.clone(),
        app.redis.clone(),
        (*app.config).clone(),
        config,
        shutdown,
    ));
    http::shutdown_signal().await;
    trigger.trigger();
    worker.await??;
    Ok(())
}
