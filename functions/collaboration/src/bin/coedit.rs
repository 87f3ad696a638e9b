//! The co-editing server as one long-running process (container): the y-websocket endpoint
//! `/ws/docs/{documentId}` and the REST API. Run several behind any load balancer: instances
//! serving the same document follow each other through the `YDOC` stream.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    inkwire_collaboration::serve_from_env().await
}
