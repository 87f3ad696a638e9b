//! The workflow runner as one long-running process: step workers on the `WF` stream and the
//! watcher, with `/healthz` and `/readyz` on `INKWIRE_HTTP_ADDR`. Run several for
//! availability and throughput: they share the durable consumer, attempts are fenced by
//! their tokens, and the watcher's claims keep two instances from examining one run at once.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    inkwire_workflows::engine::worker_from_env().await
}
