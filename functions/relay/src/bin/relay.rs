//! The relay as its own long-running process: WebSocket paths, `/metrics`, the relay server
//! API, health routes, user-presence reports, and the router (disable with
//! `INKWIRE_ROUTER=off` when another process runs it). The code is
//! `inkwire_relay::serve_from_env`, shared with the tests' `relay-process`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    inkwire_relay::serve_from_env().await
}
