//! Test harness: starts real `nats-server` (JetStream, temporary directory) and
//! `redis-server` on free loopback ports, serves the functions on a free port, and offers
//! small HTTP helpers. Panics with a clear message when a server binary is missing.

use std::time::Duration;

use inkwire_relay::RelayConfig;
use inkwire_shared::auth::{Claims, GlobalRole, unix_now};
use inkwire_shared::config::Config;
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::local_servers::{LocalServers, Persistence};
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::{AppState, http};

pub mod ws;
use reqwest::StatusCode;
use serde_json::Value;
pub use ws::{Ended, WsClient, ws_url};

pub use serde_json::json;

/// Real servers plus every function (events API, relay, router) on one address, for one
/// test.
pub struct TestEnv {
    pub state: AppState,
    pub base: String,
    pub http: reqwest::Client,
    pub nats_url: String,
    pub redis_url: String,
    pub relay: inkwire_relay::Relay,
    pub shutdown: ShutdownTrigger,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    servers: Option<LocalServers>,
    _dir: tempfile::TempDir,
}

/// Another instance of the functions (a second relay) against the same NATS and Redis.
pub struct Instance {
    pub base: String,
    pub relay: inkwire_relay::Relay,
    pub shutdown: ShutdownTrigger,
}

async fn serve_instance(
    state: AppState,
    settings: inkwire::Settings,
) -> (
    String,
    inkwire_relay::Relay,
    ShutdownTrigger,
    tokio::sync::oneshot::Sender<()>,
) {
    let (trigger, shutdown) = ShutdownTrigger::new();
    let running = inkwire::start(state, settings, shutdown)
        .await
        .expect("start functions");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let relay = running.relay.clone();
    tokio::spawn(http::serve_on(listener, running.router.clone(), async {
        let _ = rx.await;
    }));
    (base, relay, trigger, tx)
}

impl TestEnv {
    pub async fn start() -> TestEnv {
        Self::start_with(|_| {}).await
    }

    /// Starts with the default configuration changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestEnv {
        Self::start_full(tweak, |_| {}).await
    }

    /// Starts with changed configuration and relay settings.
    pub async fn start_full(
        tweak: impl FnOnce(&mut Config),
        relay_tweak: impl FnOnce(&mut RelayConfig),
    ) -> TestEnv {
        Self::start_settings(tweak, |s| relay_tweak(&mut s.relay)).await
    }

    /// Starts with changed configuration and function settings.
    pub async fn start_settings(
        tweak: impl FnOnce(&mut Config),
        settings_tweak: impl FnOnce(&mut inkwire::Settings),
    ) -> TestEnv {
        let dir = tempfile::tempdir().expect("temporary directory");
        let servers = match LocalServers::start(dir.path(), Persistence::Scratch).await {
            Ok(s) => s,
            Err(e) => panic!("the tests need real servers: {e}"),
        };
        let mut config = Config {
            nats_url: servers.nats_url.clone(),
            redis_url: servers.redis_url.clone(),
            ..Config::default()
        };
        tweak(&mut config);
        let state = AppState::connect(config, "inkwire-test")
            .await
            .expect("connect to test servers");
        let mut settings = inkwire::Settings::default();
        settings_tweak(&mut settings);
        let (base, relay, shutdown, tx) = serve_instance(state.clone(), settings).await;
        TestEnv {
            state,
            base,
            relay,
            shutdown,
            http: reqwest::Client::new(),
            nats_url: servers.nats_url.clone(),
            redis_url: servers.redis_url.clone(),
            stop: Some(tx),
            servers: Some(servers),
            _dir: dir,
        }
    }

    /// A second instance of every function against the same servers.
    pub async fn second_instance(&self, relay_tweak: impl FnOnce(&mut RelayConfig)) -> Instance {
        let config = (*self.state.config).clone();
        let state = AppState::connect(config, "inkwire-test-2")
            .await
            .expect("connect second instance");
        let mut settings = inkwire::Settings::default();
        relay_tweak(&mut settings.relay);
        let (base, relay, shutdown, tx) = serve_instance(state, settings).await;
        std::mem::forget(tx); // served until the test ends
        Instance {
            base,
            relay,
            shutdown,
        }
    }

    /// `ws://…/ws/<path>?token=…`
    pub fn ws_url(&self, path: &str, token: &str) -> String {
        ws_url(&self.base, path, token)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn token(&self, user: &str) -> String {
        self.state.jwt.issue(user, &[], Duration::from_secs(600))
    }
    pub fn service_token(&self) -> String {
        self.state
            .jwt
            .issue("svc", &[GlobalRole::Service], Duration::from_secs(600))
    }
    pub fn admin_token(&self) -> String {
        self.state
            .jwt
            .issue("ops", &[GlobalRole::Admin], Duration::from_secs(600))
    }
    pub fn expired_token(&self, user: &str) -> String {
        self.state.jwt.sign(&Claims {
            sub: user.into(),
            roles: vec![],
            exp: unix_now() - 600,
            iat: unix_now() - 1200,
        })
    }

    pub async fn add_member(&self, project: &str, user: &str, role: ProjectRole) {
        let mut redis = self.state.redis.clone();
        membership::set_member(&mut redis, project, user, Some(role))
            .await
            .unwrap();
    }
    pub async fn register_document(&self, project: &str, document: &str) {
        let mut redis = self.state.redis.clone();
        membership::register_document(&mut redis, project, document)
            .await
            .unwrap()
            .unwrap();
    }

    pub async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let res = req.send().await.expect("request");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, body, headers)
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        let (s, b, _) = self
            .send(self.http.post(self.url(path)).bearer_auth(token).json(body))
            .await;
        (s, b)
    }
    pub async fn put(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        let (s, b, _) = self
            .send(self.http.put(self.url(path)).bearer_auth(token).json(body))
            .await;
        (s, b)
    }
    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (s, b, _) = self
            .send(self.http.get(self.url(path)).bearer_auth(token))
            .await;
        (s, b)
    }
    pub async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        let (s, b, _) = self
            .send(self.http.delete(self.url(path)).bearer_auth(token))
            .await;
        (s, b)
    }

    /// Messages stored in a stream.
    pub async fn stream_messages(&self, stream: &str) -> u64 {
        let mut s = self.state.js.get_stream(stream).await.unwrap();
        s.info().await.unwrap().state.messages
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // Children are killed on drop (kill_on_drop); nothing outlives the test.
        drop(self.servers.take());
    }
}

/// A valid event envelope for tests.
pub fn word_added(user: &str, project: &str, words: u64) -> Value {
    json!({
        "category": "writing",
        "type": "word_added",
        "userId": user,
        "projectId": project,
        "data": {"sessionId": "s-1", "words": words}
    })
}
