//! `inkwire bench <scenario>`: benchmarks that measure the raw baseline in the same run and
//! report each figure beside it as a ratio, because machines (and especially shared CI
//! machines) are noisy.

mod fanout;
mod histogram;
mod ingest;
mod load_client;
mod report;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Scenario {
    /// Event ingest: bare JetStream publishing (baseline) vs the HTTP publish and batch APIs.
    Ingest(ingest::IngestArgs),
    /// WebSocket fan-out: N clients on one channel; the relay vs a bare broadcast server.
    Fanout(fanout::FanoutArgs),
    /// The client side of `fanout`, run as a separate process (internal).
    #[command(hide = true)]
    FanoutClients(fanout::ClientsArgs),
}

pub async fn run(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Ingest(args) => ingest::run(args).await,
        Scenario::Fanout(args) => fanout::run(args).await,
        Scenario::FanoutClients(args) => fanout::clients(args).await,
    }
}
