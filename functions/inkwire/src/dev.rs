//! `inkwire dev`: one command for a working local system.
//!
//! Uses `NATS_URL` / `REDIS_URL` when set; otherwise starts `nats-server` (JetStream, data in
//! `<data-dir>/nats`) and `redis-server` (append-only file in `<data-dir>/redis`) as child
//! processes on free ports. Ctrl-C or SIGTERM stops the HTTP server, then the children.
//!
//! Everything that can fail for a reason the user can fix is checked before a server starts:
//! the data directory is locked (two `inkwire dev` on one directory would run two servers on
//! the same files and lose data), and the HTTP address is bound (a port clash is reported at
//! once, not after the servers started). `main` sets `INKWIRE_ENV=development` for this
//! command, which is what allows the built-in development secret.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use inkwire_shared::auth::GlobalRole;
use inkwire_shared::config::Config;
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::local_servers::{LocalServers, Persistence};
use inkwire_shared::{AppState, http};

/// The lock file inside the data directory.
pub const LOCK_FILE: &str = "inkwire-dev.lock";

/// Locks `data_dir` for this process (an advisory `flock`, released when the process ends,
/// however it ends, so a crash leaves no stale lock). Fails at once if another process holds it.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let path = data_dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `inkwire dev` is already running with the data directory {} (it holds {}); \
             stop it first, or give this one its own directory with --data-dir",
            data_dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

pub async fn run(addr: SocketAddr, data_dir: &Path) -> anyhow::Result<()> {
    let mut config = Config::from_env()?;
    // Pages of local development servers may call the API and open sockets, besides any
    // origins listed in INKWIRE_ALLOWED_ORIGINS (its own origin is always allowed).
    config
        .allowed_origins
        .extend(inkwire_shared::origins::AllowedOrigins::local_development());
    // The development secret is fine here, and other defaults may depend on knowing this.
    config.environment = inkwire_shared::config::Environment::Development;
    let external =
        std::env::var_os("NATS_URL").is_some() && std::env::var_os("REDIS_URL").is_some();
    // Held until the function returns, after the children stopped.
    let _lock = if external {
        None
    } else {
        Some(lock_data_dir(data_dir)?)
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (pick another with --addr)"))?;
    let addr = listener.local_addr()?;
    config.http_addr = addr;
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
    let day = Duration::from_secs(24 * 3600);
    let service_token = state.jwt.issue("dev-service", &[GlobalRole::Service], day);
    let user_token = state.jwt.issue("dev-user", &[], day);

    let (trigger, shutdown) = ShutdownTrigger::new();
    let settings = match inkwire::Settings::from_env() {
        Ok(mut s) => {
            // Local development calls local services: the workflow HTTP action may reach
            // loopback and private addresses here (never by default in `serve`), and files
            // written by workflows stay with the dev data.
            if std::env::var_os("INKWIRE_WORKFLOW_HTTP_ALLOW_PRIVATE").is_none() {
                s.workflows.http_allow_private = true;
            }
            if std::env::var_os("INKWIRE_WORKFLOW_FILES_DIR").is_none() {
                s.workflows.files_dir = data_dir.join("workflow-files");
            }
            s
        }
        Err(e) => {
            if let Some(s) = servers {
                s.stop().await;
            }
            return Err(e);
        }
    };
    let running = match inkwire::start(state, settings, shutdown).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(s) = servers {
                s.stop().await;
            }
            return Err(e);
        }
    };
    // Printed once everything runs: whatever is pasted from here works at once.
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
    println!(
        "  INKWIRE_ENV {}",
        std::env::var("INKWIRE_ENV").unwrap_or_else(|_| "(unset)".into())
    );
    println!("  service token (24 h): {service_token}");
    println!("  user token for dev-user (24 h): {user_token}");
    println!();
    print!(
        "{}",
        paste_block(addr, &service_token, &user_token, own_dir().as_deref())
    );
    println!();
    println!("Press Ctrl-C to stop.");

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

/// The directory of this executable, so that a pasted `PATH` makes `inkwire watch` and
/// `inkwire token` work in another shell (after `cargo run` the binary is not on `PATH`).
fn own_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

/// The lines a newcomer pastes into another shell: the README's walkthrough uses exactly
/// these variables.
pub fn paste_block(
    addr: SocketAddr,
    service_token: &str,
    user_token: &str,
    bin_dir: Option<&Path>,
) -> String {
    let mut out =
        String::from("Paste into another shell (then follow \"Walkthrough\" in README.md):\n");
    out.push_str(&format!("  export INKWIRE_URL=http://{addr}\n"));
    out.push_str(&format!("  export INKWIRE_SERVICE_TOKEN={service_token}\n"));
    out.push_str(&format!("  export INKWIRE_TOKEN={user_token}\n"));
    if let Some(dir) = bin_dir {
        out.push_str(&format!(
            "  export PATH={}:\"$PATH\"\n",
            shell_quote(&dir.to_string_lossy())
        ));
    }
    out.push_str(
        "  curl -sS -w '\\n' \"$INKWIRE_URL/api/projects\" -H \"Authorization: Bearer $INKWIRE_TOKEN\"\n",
    );
    out
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'"'"'"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paste_block_exports_what_the_walkthrough_uses() {
        let block = paste_block(
            "127.0.0.1:8080".parse().unwrap(),
            "svc.tok",
            "user.tok",
            Some(Path::new("/opt/it's here")),
        );
        assert!(block.contains("  export INKWIRE_URL=http://127.0.0.1:8080\n"));
        assert!(block.contains("  export INKWIRE_SERVICE_TOKEN=svc.tok\n"));
        assert!(block.contains("  export INKWIRE_TOKEN=user.tok\n"));
        assert!(block.contains(r#"  export PATH='/opt/it'"'"'s here':"$PATH""#));
    }

    #[test]
    fn a_locked_data_dir_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path()).unwrap();
        let err = lock_data_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("already running"), "{err}");
        drop(first);
        lock_data_dir(dir.path()).unwrap();
    }
}
