//! The workflow runner as one long-running process: step workers on the `WF` stream and the
//! watcher. Run several for availability and throughput: they share the durable consumer,
//! attempts are fenced by their tokens, and the watcher's claims keep two instances from
//! examining one run at once.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};
use inkwire_workflows::{Engine, WorkflowsConfig, run_worker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let config = WorkflowsConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-workflows-worker").await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let engine = Engine::new(app.js.clone(), app.redis.clone(), config);
    let worker = tokio::spawn(run_worker(engine, shutdown));
    http::shutdown_signal().await;
    trigger.trigger();
    worker.await??;
    Ok(())
}
