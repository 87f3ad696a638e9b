//! The `coedit` process for the tests that kill it with SIGKILL: the same code as the
//! `coedit` binary (`inkwire_collaboration::serve_from_env`), built with the tests so that
//! `CARGO_BIN_EXE_coedit-process` names it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    inkwire_collaboration::serve_from_env().await
}
