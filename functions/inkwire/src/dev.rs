//! `inkwire dev`: one command for a working local system.
//!
//! Uses `NATS_URL` / `REDIS_URL` when set; otherwise starts `nats-server` (JetStream, data in
//! `<data-dir>/nats`) and `redis-server` (append-only file in `<data-dir>/redis`) as child
//! processes on free ports. Ctrl-C or SIGTERM stops the HTTP server, then the children.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use inkwire_shared::auth::GlobalRole;
use inkwire_shared::config::Config;
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::local_servers::{LocalServers, Persistence};
use inkwire_shared::{AppState, http};

pub async fn run(addr: SocketAddr, data_dir: &Path) -> anyhow::Result<()> {
    let mut config = Config::from_env()?;
    config.http_addr = addr;
    let external =
        std::env::var_os("NATS_URL").is_some() && std::env::var_os("REDIS_URL").is_some();
    let servers = if external {
        None
    } else {
        let servers = LocalServers::start(data_dir, Persistence::Keep).await?;
        if std::env::var_os("NATS_URL").is_none() {
            config.nats_url = servers.nats_url.clone();
        }
        if std::env::var_os("REDIS_URL").is_none() {
            config.redis_url = servers.redis_url.clone();
        }
        Some(servers)
    };
    let state = match AppState::connect(config.clone(), "inkwire-dev").await {
        Ok(s) => s,
        Err(e) => {
            if let Some(s) = servers {
                s.stop().await;
            }
            return Err(e);
        }
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            if let Some(s) = servers {
                s.stop().await;
            }
            anyhow::bail!("cannot listen on {addr}: {e} (pick another with --addr)");
        }
    };
    let day = Duration::from_secs(24 * 3600);
    let service_token = state.jwt.issue("dev-service", &[GlobalRole::Service], day);
    let user_token = state.jwt.issue("dev-user", &[], day);
    let origin = |s: &str| match &servers {
        Some(_) => format!("{s} (child process, data in {})", data_dir.display()),
        None => s.to_string(),
    };
    println!("inkwire dev is running");
    println!(
        "  API        http://{addr}/api/realtime/events/publish  (and the routes in README.md)"
    );
    println!(
        "  relay      ws://{addr}/ws/collaboration  (also /ws/analytics, /ws/notifications, /ws/presence)"
    );
    println!(
        "  writing    http://{addr}/api/realtime/writing/sessions/start  (tracker and scheduler run here too)"
    );
    println!("  health     http://{addr}/healthz   readiness http://{addr}/readyz");
    println!(
        "  NATS       {}",
        origin(&inkwire_shared::config::redact_url(&config.nats_url))
    );
    println!(
        "  Redis      {}",
        origin(&inkwire_shared::config::redact_url(&config.redis_url))
    );
    println!("  service token (24 h): {service_token}");
    println!("  user token for dev-user (24 h): {user_token}");
    println!("Press Ctrl-C to stop.");

    let (trigger, shutdown) = ShutdownTrigger::new();
    let running = match inkwire::start(state, inkwire::Settings::from_env()?, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(s) = servers {
                s.stop().await;
            }
            return Err(e);
        }
    };
    let served = http::serve_on(listener, running.router.clone(), async move {
        http::shutdown_signal().await;
        println!("stopping...");
        // WebSockets get "going away" before the HTTP server stops.
        trigger.trigger();
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
    running.finished().await;
    if let Some(s) = servers {
        s.stop().await;
    }
    println!("stopped");
    served
}
