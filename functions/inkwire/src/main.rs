//! The `inkwire` command: `dev` runs everything locally (starting nats-server and
//! redis-server itself), `serve` runs every function in one process against configured
//! servers, `token` signs development tokens, `bench` measures against a raw baseline.

// glibc's malloc was the largest single cost in the ingest profile (JSON values are
// many small allocations); mimalloc roughly halves it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod dev;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use inkwire_shared::auth::{GlobalRole, JwtKeys};
use inkwire_shared::config::{Config, parse_duration};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http, telemetry};

#[derive(Parser)]
#[command(
    name = "inkwire",
    version,
    about = "Real-time tracking and automation back end for writing and publishing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything locally: starts nats-server and redis-server (unless NATS_URL /
    /// REDIS_URL are set), provisions streams and serves every function on one address.
    Dev {
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Where the child servers keep their data.
        #[arg(long, default_value = ".inkwire")]
        data_dir: std::path::PathBuf,
    },
    /// Serve every function in one process against NATS_URL and REDIS_URL (production).
    Serve {
        /// Overrides INKWIRE_HTTP_ADDR.
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Print a signed token for the configured secret (INKWIRE_JWT_SECRET).
    Token {
        #[arg(long)]
        user: String,
        /// Global role: service or admin (repeatable).
        #[arg(long)]
        role: Vec<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Rebuild projections from the streams (stop the live consumers first).
    Replay {
        /// What to rebuild: `writing`.
        target: String,
    },
    /// Benchmarks that report the raw baseline from the same run beside each figure.
    Bench {
        #[command(subcommand)]
        scenario: bench::Scenario,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev { addr, data_dir } => {
            telemetry::init();
            dev::run(addr, &data_dir).await
        }
        Command::Serve { addr } => {
            telemetry::init();
            let config = Config::from_env()?;
            let addr = addr.unwrap_or(config.http_addr);
            let state = AppState::connect(config, "inkwire").await?;
            let (trigger, shutdown) = ShutdownTrigger::new();
            let running = inkwire::start(state, inkwire::Settings::from_env()?, shutdown).await?;
            let served = http::serve(running.router.clone(), addr, async move {
                http::shutdown_signal().await;
                // WebSockets get "going away" before the HTTP server stops.
                trigger.trigger();
                tokio::time::sleep(Duration::from_millis(300)).await;
            })
            .await;
            running.finished().await;
            served
        }
        Command::Token { user, role, ttl } => {
            let config = Config::from_env()?;
            let roles = role
                .iter()
                .map(|r| r.parse::<GlobalRole>().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if !inkwire_shared::membership::is_valid_id(&user) {
                anyhow::bail!("--user must be 1-64 characters of letters, digits, '_' or '-'");
            }
            let ttl: Duration = parse_duration(&ttl)
                .map_err(anyhow::Error::msg)
                .context("--ttl")?;
            println!(
                "{}",
                JwtKeys::hs256(&config.jwt_secret).issue(&user, &roles, ttl)
            );
            Ok(())
        }
        Command::Bench { scenario } => bench::run(scenario).await,
        Command::Replay { target } => {
            telemetry::init();
            anyhow::ensure!(
                target == "writing",
                "unknown replay target {target:?} (known: writing)"
            );
            let config = Config::from_env()?;
            let state = AppState::connect(config, "inkwire-replay").await?;
            let writing = inkwire_writing::state_machine::TrackerConfig::from_env()?;
            let stats = inkwire_writing::replay::replay(&state.js, &state.redis, writing).await?;
            println!(
                "replayed {} events ({} skipped) after deleting {} projection keys",
                stats.events, stats.skipped, stats.keys_deleted
            );
            Ok(())
        }
    }
}
