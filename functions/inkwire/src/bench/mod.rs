//! `inkwire bench <scenario>`: benchmarks that measure the raw baseline in the same run and
//! report each figure beside it as a ratio, because machines (and especially shared CI
//! machines) are noisy.

mod analytics;
mod chat;
mod coedit;
mod fanout;
mod histogram;
mod ingest;
mod load_client;
mod notify;
mod presence;
mod report;
mod tracker;
mod workflows;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Scenario {
    /// Event ingest: bare JetStream publishing (baseline) vs the HTTP publish and batch APIs.
    Ingest(ingest::IngestArgs),
    /// WebSocket fan-out: N clients on one channel; the relay vs a bare broadcast server.
    Fanout(fanout::FanoutArgs),
    /// Writing tracker: keystroke batches per second vs bare pipelined Redis; POST → live metrics latency.
    Tracker(tracker::TrackerArgs),
    /// In-app notifications: send API → notifier → inbox → WebSocket frame, vs bare JetStream publish.
    Notify(notify::NotifyArgs),
    /// Co-editing: stock Yjs clients typing into shared documents, inkwire's `/ws/docs` vs the
    /// reference `@y/websocket-server` on the same load.
    Coedit(coedit::CoeditArgs),
    /// Presence: editors moving awareness cursors over documents; move → conflict warning
    /// latency, checked against a brute-force oracle, vs the plain awareness relay.
    Presence(presence::PresenceArgs),
    /// Chat: messages through the chat API to every member of a room of 10 and of 1,000,
    /// vs bare fan-out of the same messages to the same clients.
    Chat(chat::ChatArgs),
    /// Analytics: events counted per second from a backlog vs a bare JetStream consumer;
    /// bucket end → push lag at a steady rate.
    Analytics(analytics::AnalyticsArgs),
    /// Workflows: steps/s through a 10-step DAG with runs in flight and step dispatch
    /// latency, vs a bare JetStream publish → consume round trip.
    Workflows(workflows::WorkflowsArgs),
    /// The client side of `fanout`, run as a separate process (internal).
    #[command(hide = true)]
    FanoutClients(fanout::ClientsArgs),
}

/// Servers for a benchmark: the given URLs, or child servers in a temporary directory.
pub struct BenchServers {
    pub state: inkwire_shared::AppState,
    servers: Option<inkwire_shared::local_servers::LocalServers>,
    _dir: tempfile::TempDir,
}

impl BenchServers {
    pub async fn start(
        nats_url: Option<String>,
        redis_url: Option<String>,
        name: &str,
    ) -> anyhow::Result<BenchServers> {
        use inkwire_shared::local_servers::{LocalServers, Persistence};
        let dir = tempfile::tempdir()?;
        let servers = match (&nats_url, &redis_url) {
            (Some(_), Some(_)) => None,
            _ => Some(LocalServers::start(dir.path(), Persistence::Scratch).await?),
        };
        let mut config = inkwire_shared::config::Config::from_env()?;
        config.nats_url = nats_url
            .or_else(|| servers.as_ref().map(|s| s.nats_url.clone()))
            .unwrap_or_default();
        config.redis_url = redis_url
            .or_else(|| servers.as_ref().map(|s| s.redis_url.clone()))
            .unwrap_or_default();
        let state = inkwire_shared::AppState::connect(config, name).await?;
        Ok(BenchServers {
            state,
            servers,
            _dir: dir,
        })
    }

    pub async fn stop(self) {
        if let Some(s) = self.servers {
            s.stop().await;
        }
    }
}

/// inkwire itself on a free local port, as `inkwire serve` runs it, for a benchmark to load.
pub struct Served {
    pub addr: std::net::SocketAddr,
    trigger: inkwire_shared::consumer::ShutdownTrigger,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    running: inkwire::Running,
}

impl Served {
    pub async fn start(
        state: &inkwire_shared::AppState,
        settings: inkwire::Settings,
    ) -> anyhow::Result<Served> {
        let (trigger, shutdown) = inkwire_shared::consumer::ShutdownTrigger::new();
        let running = inkwire::start(state.clone(), settings, shutdown.clone()).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut stop = shutdown;
        let server = tokio::spawn(inkwire_shared::http::serve_on(
            listener,
            running.router.clone(),
            async move { stop.wait().await },
        ));
        Ok(Served {
            addr,
            trigger,
            server,
            running,
        })
    }

    /// Stops the HTTP server and every background part, and waits for them.
    pub async fn stop(self) {
        self.trigger.trigger();
        let _ = self.server.await;
        self.running.finished().await;
    }
}

pub async fn run(scenario: Scenario) -> anyhow::Result<()> {
    match scenario {
        Scenario::Ingest(args) => ingest::run(args).await,
        Scenario::Fanout(args) => fanout::run(args).await,
        Scenario::Tracker(args) => tracker::run(args).await,
        Scenario::Notify(args) => notify::run(args).await,
        Scenario::Coedit(args) => coedit::run(args).await,
        Scenario::Presence(args) => presence::run(args).await,
        Scenario::Chat(args) => chat::run(args).await,
        Scenario::Analytics(args) => analytics::run(args).await,
        Scenario::Workflows(args) => workflows::run(args).await,
        Scenario::FanoutClients(args) => fanout::clients(args).await,
    }
}
