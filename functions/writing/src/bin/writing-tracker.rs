//! The writing tracker and its scheduler as one long-running process. Run several for
//! availability: the durable consumer shares the work and saves are version-checked; the
//! scheduler's leases keep instances from doubling transitions.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};
use inkwire_writing::state_machine::TrackerConfig;
use inkwire_writing::tracker::{Tracker, run_tracker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let writing = TrackerConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-writing-tracker").await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let tracker = Tracker::new(app.js.clone(), app.redis.clone(), writing.clone(), true);
    let tracker_task = tokio::spawn(run_tracker(tracker, shutdown.clone()));
    let scheduler_task = tokio::spawn(inkwire_writing::scheduler::run_scheduler(
        app.js.clone(),
        app.redis.clone(),
        writing,
        Duration::from_millis(250),
        shutdown,
    ));
    http::shutdown_signal().await;
    trigger.trigger();
    tracker_task.await??;
    scheduler_task.await??;
    Ok(())
}
