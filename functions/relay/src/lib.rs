//! The WebSocket relay: what every client sees.
//!
//! - `/ws/collaboration`, `/ws/analytics`, `/ws/notifications`, `/ws/presence`: one JSON
//!   protocol (see `protocol` and the README), authenticated before the upgrade;
//! - fan-out through NATS (`hub`), so any number of relay instances serve the same channels;
//! - recovery from the RELAY stream (`recovery`);
//! - revocation: live subscriptions re-checked when rights shrink (`revocation`);
//! - browsers: upgrades from origins that are not allowed are refused before the upgrade
//!   (`shared::origins`), and every refusal of an upgrade is problem+json;
//! - the router, a durable consumer that forwards domain events to channels (`router`);
//! - the server API: stats over all instances, broadcast, send-to-user (`api`), and
//!   Prometheus metrics at `/metrics`.

pub mod api;
pub mod connection;
pub mod hub;
pub mod metrics;
pub mod permissions;
pub mod presence;
pub mod protocol;
pub mod rate_limit;
pub mod recovery;
pub mod revocation;
pub mod router;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{FromRef, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use inkwire_shared::AppState;
use inkwire_shared::auth::{AuthError, Caller};
use inkwire_shared::config::{ConfigError, parse_duration};
use inkwire_shared::consumer::Shutdown;
use inkwire_shared::problem::Problem;
use inkwire_shared::user_presence::Device;
use inkwire_shared::websocket::{find_token, upgrade_rejection};

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::permissions::WsPath;
use crate::revocation::ControlSender;

/// Relay limits and timings, from `INKWIRE_RELAY_*` variables.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub heartbeat: Duration,
    pub send_queue: usize,
    pub max_subscriptions: usize,
    pub max_connections_per_user: usize,
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    pub max_frame_bytes: usize,
    /// How often every connection re-checks its project, document and room subscriptions,
    /// for access changes whose announcement was missed.
    pub recheck_interval: Duration,
    pub router: router::RouterConfig,
    /// User presence reports: how often, and the heartbeat of an idle instance.
    pub presence: presence::PresenceReportConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            heartbeat: Duration::from_secs(25),
            send_queue: 1024,
            max_subscriptions: 100,
            max_connections_per_user: 50,
            rate_per_sec: 50,
            rate_burst: 100,
            max_frame_bytes: 64 * 1024,
            recheck_interval: Duration::from_secs(30),
            router: router::RouterConfig::default(),
            presence: presence::PresenceReportConfig::default(),
        }
    }
}

impl RelayConfig {
    pub fn from_env() -> Result<RelayConfig, ConfigError> {
        let mut c = RelayConfig::default();
        let num =
            |name: &'static str, min: usize, max: usize| -> Result<Option<usize>, ConfigError> {
                match std::env::var(name) {
                    Err(_) => Ok(None),
                    Ok(v) => match v.trim().parse::<usize>() {
                        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                        _ => Err(ConfigError {
                            name,
                            problem: format!("{v:?} is not a whole number in {min}..={max}"),
                        }),
                    },
                }
            };
        if let Ok(v) = std::env::var("INKWIRE_RELAY_HEARTBEAT") {
            c.heartbeat = parse_duration(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_RELAY_HEARTBEAT",
                problem,
            })?;
        }
        if let Some(n) = num("INKWIRE_RELAY_SEND_QUEUE", 1, 1 << 20)? {
            c.send_queue = n;
        }
        if let Some(n) = num("INKWIRE_RELAY_MAX_SUBSCRIPTIONS", 1, 10_000)? {
            c.max_subscriptions = n;
        }
        if let Some(n) = num("INKWIRE_RELAY_MAX_CONNECTIONS_PER_USER", 1, 1_000_000)? {
            c.max_connections_per_user = n;
        }
        if let Some(n) = num("INKWIRE_RELAY_RATE", 1, 100_000)? {
            c.rate_per_sec = n as u32;
        }
        if let Some(n) = num("INKWIRE_RELAY_BURST", 1, 100_000)? {
            c.rate_burst = n as u32;
        }
        if let Some(n) = num("INKWIRE_RELAY_MAX_FRAME_BYTES", 256, 16 << 20)? {
            c.max_frame_bytes = n;
        }
        if let Ok(v) = std::env::var("INKWIRE_RELAY_RECHECK_INTERVAL") {
            c.recheck_interval = parse_duration(&v)
                .and_then(|d| {
                    if d >= Duration::from_millis(100) {
                        Ok(d)
                    } else {
                        Err(format!("{v:?} is shorter than 100ms"))
                    }
                })
                .map_err(|problem| ConfigError {
                    name: "INKWIRE_RELAY_RECHECK_INTERVAL",
                    problem,
                })?;
        }
        let short = |name: &'static str| -> Result<Option<Duration>, ConfigError> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(v) => parse_duration(&v)
                    .and_then(|d| {
                        if (Duration::from_millis(50)..=Duration::from_secs(3600)).contains(&d) {
                            Ok(Some(d))
                        } else {
                            Err(format!("{v:?} is not between 50ms and 1h"))
                        }
                    })
                    .map_err(|problem| ConfigError { name, problem }),
            }
        };
        if let Some(d) = short("INKWIRE_RELAY_PRESENCE_INTERVAL")? {
            c.presence.report_interval = d;
        }
        if let Some(d) = short("INKWIRE_RELAY_PRESENCE_HEARTBEAT")? {
            c.presence.heartbeat = d;
        }
        c.router = router::RouterConfig::from_env()?;
        Ok(c)
    }
}

/// Everything the relay's handlers share.
#[derive(Clone)]
pub struct Relay {
    pub app: AppState,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<RelayConfig>,
    pub instance_id: String,
    pub shutdown: Shutdown,
    /// Connection reports for user presence.
    pub presence: Arc<presence::PresenceReporter>,
    next_id: Arc<AtomicU64>,
    /// Per user: connections admitted (counted against the per-user limit) and the control
    /// handle of each open one.
    users: Arc<Mutex<HashMap<String, UserConnections>>>,
}

/// One user's connections on this instance, in one entry (one key, and a `Vec` rather than a
/// map: most users hold one or two connections, and each byte here is paid per connection).
#[derive(Default)]
struct UserConnections {
    admitted: usize,
    controls: Vec<(u64, ControlSender)>,
}

impl FromRef<Relay> for AppState {
    fn from_ref(relay: &Relay) -> AppState {
        relay.app.clone()
    }
}

impl Relay {
    pub fn new(app: AppState, config: RelayConfig, shutdown: Shutdown) -> Relay {
        let metrics = Arc::new(Metrics::default());
        let hub = Hub::new(
            app.nats.clone(),
            app.js.clone(),
            metrics.clone(),
            config.send_queue,
        );
        let instance_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        Relay {
            app,
            hub,
            metrics,
            config: Arc::new(config),
            presence: presence::PresenceReporter::new(instance_id.clone()),
            instance_id,
            shutdown,
            next_id: Arc::new(AtomicU64::new(1)),
            users: Arc::default(),
        }
    }

    fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a connection of `user`, refusing it over the per-user limit.
    fn admit_user(&self, user: &str) -> bool {
        let mut map = self.users.lock().expect("users lock");
        let entry = map.entry(user.to_string()).or_default();
        if entry.admitted >= self.config.max_connections_per_user {
            return false;
        }
        entry.admitted += 1;
        true
    }

    fn release_user(&self, user: &str) {
        let mut map = self.users.lock().expect("users lock");
        if let Some(entry) = map.get_mut(user) {
            entry.admitted = entry.admitted.saturating_sub(1);
            if entry.admitted == 0 && entry.controls.is_empty() {
                map.remove(user);
            }
        }
    }

    fn register_connection(&self, user: &str, id: u64, control: ControlSender) {
        self.users
            .lock()
            .expect("users lock")
            .entry(user.to_string())
            .or_default()
            .controls
            .push((id, control));
    }

    fn unregister_connection(&self, user: &str, id: u64) {
        let mut map = self.users.lock().expect("users lock");
        if let Some(entry) = map.get_mut(user) {
            entry.controls.retain(|(c, _)| *c != id);
            if entry.admitted == 0 && entry.controls.is_empty() {
                map.remove(user);
            }
        }
    }

    /// The control handles of `user`'s connections on this instance.
    pub fn controls_of_user(&self, user: &str) -> Vec<ControlSender> {
        self.users
            .lock()
            .expect("users lock")
            .get(user)
            .map(|e| e.controls.iter().map(|(_, c)| c.clone()).collect())
            .unwrap_or_default()
    }

    /// The control handles of every connection on this instance.
    pub fn controls_of_all(&self) -> Vec<ControlSender> {
        self.controls_in_slice(0, 1)
    }

    /// The control handles of the connections whose id is `slice` modulo `slices`.
    pub fn controls_in_slice(&self, slice: u64, slices: u64) -> Vec<ControlSender> {
        self.users
            .lock()
            .expect("users lock")
            .values()
            .flat_map(|e| e.controls.iter())
            .filter(|(id, _)| *id % slices == slice)
            .map(|(_, control)| control.clone())
            .collect()
    }

    /// Starts the background parts of this instance: the stats responder, the periodic
    /// re-check of rights, the access-change listener and the presence reports. The router
    /// runs separately (`router::run`), once per deployment or per instance.
    pub async fn start_background(&self) -> anyhow::Result<()> {
        api::spawn_stats_responder(self.clone()).await?;
        tokio::spawn(self.presence.clone().run(
            self.app.nats.clone(),
            self.app.js.clone(),
            self.config.presence.clone(),
            self.shutdown.clone(),
        ));
        revocation::spawn_periodic_recheck(self.clone());
        revocation::spawn_access_listener(self.clone()).await
    }
}

/// The relay as its own long-running process (the `relay` binary, and the tests'
/// `relay-process`): configuration from the environment, the background parts, the router
/// (unless `INKWIRE_ROUTER=off`), served until SIGTERM or Ctrl-C, every WebSocket closed with
/// "going away" first.
pub async fn serve_from_env() -> anyhow::Result<()> {
    use inkwire_shared::consumer::ShutdownTrigger;
    use inkwire_shared::http;
    let relay_config = RelayConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-relay").await?;
    let addr = app.config.http_addr;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let relay = Relay::new(app.clone(), relay_config.clone(), shutdown.clone());
    relay.start_background().await?;
    let router = (std::env::var("INKWIRE_ROUTER").as_deref() != Ok("off")).then(|| {
        tokio::spawn(router::run_router(
            app.js.clone(),
            relay_config.router,
            shutdown.clone(),
        ))
    });
    let served = http::serve(self::app(relay), addr, async move {
        http::shutdown_signal().await;
        // Close every WebSocket with "going away" before the server stops.
        trigger.trigger();
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    if let Some(r) = router {
        let _ = r.await;
    }
    served
}

/// The relay as a complete service (its own binary): routes and health behind the shared edge,
/// CORS with the allowed origins.
pub fn app(relay: Relay) -> Router {
    let cors = inkwire_shared::origins::cors_layer(&relay.app.config.allowed_origins);
    let health = inkwire_shared::http::health_routes().with_state(relay.app.clone());
    inkwire_shared::http::edge(routes(relay).merge(health)).layer(cors)
}

/// The relay's routes: the four WebSocket paths, `/metrics`, and the server API (no health
/// routes or fallbacks, so that `inkwire dev` can merge it with other functions).
pub fn routes(relay: Relay) -> Router {
    let mut router = Router::new();
    for path in WsPath::ALL {
        router = router.route(
            path.route(),
            get(
                move |state: State<Relay>,
                      ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
                      query: Result<Query<HashMap<String, String>>, QueryRejection>,
                      headers: HeaderMap| {
                    upgrade(state, ws, query, headers, path)
                },
            ),
        );
    }
    router
        .route("/metrics", get(metrics_text))
        .merge(api::routes())
        .with_state(relay)
}

/// The protocol name the relay answers with when the client offers it.
pub const PROTOCOL: &str = "inkwire.v1";

async fn upgrade(
    State(relay): State<Relay>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    path: WsPath,
) -> Response {
    // The origin first, whatever the credentials: a browser attaches the session cookie to
    // an upgrade from any site (cross-site WebSocket hijacking).
    if let Err(e) = relay.app.config.allowed_origins.check(&headers) {
        return Problem::from(e).into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return upgrade_rejection(rejection, "WebSocket connections"),
    };
    let Ok(Query(query)) = query else {
        return Problem::bad_request(
            "invalid_parameter",
            "the query string is not valid (bad percent-encoding?)",
        )
        .into_response();
    };
    let token = match find_token(&query, &headers).map(|(t, _)| t) {
        Some(t) => t,
        None => return Problem::from(AuthError::Missing).into_response(),
    };
    let caller: Caller = match relay.app.jwt.verify(&token) {
        Ok(c) => c,
        Err(e) => return Problem::from(e).into_response(),
    };
    // The device as the client reports it (user presence); nothing is guessed from headers.
    let device = match Device::from_query(&query) {
        Ok(d) => d,
        Err(why) => return Problem::bad_request("invalid_parameter", why).into_response(),
    };
    if relay.shutdown.is_triggered() {
        return Problem::unavailable("relay is shutting down; connect to another instance")
            .into_response();
    }
    if !relay.admit_user(&caller.user_id) {
        return Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            format!(
                "at most {} connections per user",
                relay.config.max_connections_per_user
            ),
        )
        .into_response();
    }
    let max = relay.config.max_frame_bytes;
    let user = caller.user_id.clone();
    let relay2 = relay.clone();
    ws.protocols([PROTOCOL])
        // Small buffers: most connections are idle most of the time, and memory per idle
        // connection is what limits how many one instance holds.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(max * 4 + 1024 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_failed_upgrade(move |_| relay2.release_user(&user))
        .on_upgrade(move |socket| connection::run(socket, relay, caller, path, device))
}

async fn metrics_text(State(relay): State<Relay>, caller: Caller) -> Response {
    if !caller.is_privileged() {
        return Problem::forbidden("metrics need the admin or service role").into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        relay.metrics.render(&relay.instance_id),
    )
        .into_response()
}
