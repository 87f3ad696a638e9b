//! The `relay` process for the tests that kill it with SIGKILL: the same code as the `relay`
//! binary (`inkwire_relay::serve_from_env`), built with the tests so that
//! `CARGO_BIN_EXE_relay-process` names it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inkwire_relay::serve_from_env().await
}
