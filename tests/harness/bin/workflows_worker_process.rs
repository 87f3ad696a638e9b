//! The `workflows-worker` process for the tests that kill it with SIGKILL: the same code as
//! the `workflows-worker` binary, built with the tests so that
//! `CARGO_BIN_EXE_workflows-worker-process` names it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inkwire_workflows::engine::worker_from_env().await
}
