//! The `inkwire` command: `dev` runs everything locally (starting nats-server and
//! redis-server itself), `serve` runs every function in one process against configured
//! servers, `token` signs development tokens, `watch` prints what relay channels carry,
//! `bench` measures against a raw baseline.

// glibc's malloc was the largest single cost in the ingest profile (JSON values are
// many small allocations); mimalloc roughly halves it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod dev;
mod watch;

use std::net::{SocketAddr, ToSocketAddrs};
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
        /// host:port; a name such as localhost is resolved (IPv4 preferred).
        #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_addr)]
        addr: SocketAddr,
        /// Where the child servers keep their data.
        #[arg(long, default_value = ".inkwire")]
        data_dir: std::path::PathBuf,
    },
    /// Serve every function in one process against NATS_URL and REDIS_URL (production).
    Serve {
        /// Overrides INKWIRE_HTTP_ADDR; a name such as localhost is resolved.
        #[arg(long, value_parser = parse_addr)]
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
    /// Subscribe to relay channels (e.g. user:alice, project:p-1) and print every frame as
    /// one JSON line.
    Watch {
        /// The server (http://, https://, ws:// or wss://); a URL with a path is used as is.
        #[arg(long, env = "INKWIRE_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// The bearer token.
        #[arg(long, env = "INKWIRE_TOKEN", hide_env_values = true)]
        token: String,
        /// The relay path when --url has none: collaboration, analytics, notifications or
        /// presence.
        #[arg(long, default_value = "analytics")]
        path: String,
        /// Stop after this many `message` frames.
        #[arg(long)]
        count: Option<usize>,
        #[arg(required = true, num_args = 1..)]
        channels: Vec<String>,
    },
    /// Rebuild projections from the streams (stop the live consumers first).
    Replay {
        /// What to rebuild: `writing` (the session projections), `coedit` (each co-edited
        /// document from its snapshot and updates, printed as one JSON line per document), or
        /// `activity` (every user's activity log from its source streams), or `analytics`
        /// (every counter, rollup and book's sales from the category streams).
        target: String,
        /// With `coedit`: only these documents (default: every document in the stream).
        documents: Vec<String>,
    },
    /// Benchmarks that report the raw baseline from the same run beside each figure.
    Bench {
        #[command(subcommand)]
        scenario: bench::Scenario,
    },
}

/// `host:port`, resolving names: `localhost:8080` works as well as `127.0.0.1:8080`. IPv4 is
/// preferred because `localhost` often resolves to `::1` first while browsers and curl try
/// both.
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?} is not host:port ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Dev { .. }) && std::env::var_os("INKWIRE_ENV").is_none() {
        // `inkwire dev` is development by definition; saying so is what lets it use the
        // built-in secret (`serve` refuses it otherwise). An explicit INKWIRE_ENV is kept.
        // SAFETY: no other thread exists yet; the runtime is built below.
        unsafe { std::env::set_var("INKWIRE_ENV", "development") };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev { addr, data_dir } => {
            telemetry::init();
            dev::run(addr, &data_dir).await
        }
        Command::Serve { addr } => {
            telemetry::init();
            let config = Config::from_env()?;
            config.check_serving_secret()?;
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
        Command::Bench { scenario } => {
            // Logs only when asked for: the rows on stdout are the output.
            if std::env::var_os("RUST_LOG").is_some() {
                telemetry::init();
            }
            bench::run(scenario).await
        }
        Command::Watch {
            url,
            token,
            path,
            count,
            channels,
        } => {
            watch::run(watch::WatchArgs {
                url,
                token,
                path,
                count,
                channels,
            })
            .await
        }
        Command::Replay { target, documents } => {
            telemetry::init();
            anyhow::ensure!(
                ["writing", "coedit", "activity", "analytics"].contains(&target.as_str()),
                "unknown replay target {target:?} (known: writing, coedit, activity, analytics)"
            );
            if target == "analytics" {
                anyhow::ensure!(
                    documents.is_empty(),
                    "replay analytics rebuilds every counter; it takes no ids"
                );
                let config = Config::from_env()?;
                let analytics = inkwire_analytics::AnalyticsConfig::from_env()?;
                let state = AppState::connect(config, "inkwire-replay").await?;
                let stats =
                    inkwire_analytics::replay::replay(&state.js, &state.redis, &analytics).await?;
                println!(
                    "replayed {} messages ({} counted, {} skipped) after deleting {} analytics keys",
                    stats.messages, stats.counted, stats.skipped, stats.keys_deleted
                );
                return Ok(());
            }
            if target == "activity" {
                anyhow::ensure!(
                    documents.is_empty(),
                    "replay activity rebuilds every user's log; it takes no ids"
                );
                let config = Config::from_env()?;
                let clock = inkwire_activity::worker::clock(&config);
                let activity = inkwire_activity::ActivityConfig::from_env()?;
                let state = AppState::connect(config, "inkwire-replay").await?;
                let stats =
                    inkwire_activity::replay::replay(&state.js, &state.redis, clock, &activity)
                        .await?;
                println!(
                    "replayed {} messages ({} recorded, {} skipped) after deleting {} activity keys",
                    stats.messages, stats.recorded, stats.skipped, stats.keys_deleted
                );
                return Ok(());
            }
            if target == "coedit" {
                let config = Config::from_env()?;
                let state = AppState::connect(config, "inkwire-replay").await?;
                return replay_coedit(&state, documents).await;
            }
            anyhow::ensure!(
                documents.is_empty(),
                "replay writing rebuilds every session; it takes no document ids"
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

/// `inkwire replay coedit`: every document (or the ones named) rebuilt from the `YDOC` stream
/// alone, printed as `{"documentId", "stateBytes", "roots": {name: text}}` lines — what a live instance
/// serves once it has caught up, for checks and backups.
async fn replay_coedit(state: &AppState, documents: Vec<String>) -> anyhow::Result<()> {
    use yrs::{ReadTxn, StateVector, Transact};
    if let Some(bad) = documents
        .iter()
        .find(|d| !inkwire_shared::membership::is_valid_id(d))
    {
        anyhow::bail!("{bad:?} is not a document id");
    }
    let documents = if documents.is_empty() {
        inkwire_collaboration::storage::documents(&state.js).await?
    } else {
        documents
    };
    for id in documents {
        let doc = inkwire_collaboration::storage::rebuild(&state.js, &id).await?;
        let bytes = doc
            .transact()
            .encode_state_as_update_v1(&StateVector::default())
            .len();
        let roots: serde_json::Map<String, serde_json::Value> =
            inkwire_collaboration::api::texts(&doc)
                .into_iter()
                .map(|(name, text)| (name, serde_json::Value::String(text)))
                .collect();
        println!(
            "{}",
            serde_json::json!({"documentId": id, "stateBytes": bytes, "roots": roots})
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_may_be_names() {
        assert_eq!(
            parse_addr("127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        let local = parse_addr("localhost:8080").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8080, "{local}");
        assert!(parse_addr("localhost").is_err());
        assert!(parse_addr("no such host.invalid:80").is_err());
    }
}
