//! The analytics worker as one long-running process: the consumers of every category stream
//! and the closer that pushes closed buckets. Run several for availability and throughput:
//! they share each stream's durable consumer (every message is applied once by the batched
//! script), and the closer's lease lets one of them push each bucket.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_analytics::{AnalyticsConfig, run_worker};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let config = AnalyticsConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-analytics-worker").await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let worker = tokio::spawn(run_worker(
        app.js.clone(),
        app.redis.clone(),
        config,
        shutdown,
    ));
    http::shutdown_signal().await;
    trigger.trigger();
    worker.await??;
    Ok(())
}
