//! Test harness: starts real `nats-server` (JetStream, temporary directory) and
//! `redis-server` on free loopback ports, serves the functions on a free port, and offers
//! small HTTP helpers. Panics with a clear message when a server binary is missing.

use std::time::Duration;

use inkwire_relay::RelayConfig;
use inkwire_shared::auth::{Claims, GlobalRole, unix_now};
use inkwire_shared::config::Config;
use inkwire_shared::consumer::ShutdownTrigger;
pub use inkwire_shared::local_servers::NatsOptions;
use inkwire_shared::local_servers::{LocalServers, Persistence};
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::{AppState, http};

pub mod peers;
pub mod ws;
pub mod yjs_peer;
use reqwest::StatusCode;
use serde_json::Value;
pub use ws::{Ended, WsClient, ws_url};

pub use serde_json::json;

/// The owner [`TestEnv::add_member`] gives a project that has none yet.
pub const HARNESS_OWNER: &str = "harness-owner";

/// Real servers plus every function (events API, relay, router) on one address, for one
/// test.
pub struct TestEnv {
    pub state: AppState,
    pub base: String,
    pub http: reqwest::Client,
    pub nats_url: String,
    pub redis_url: String,
    pub relay: inkwire_relay::Relay,
    pub coedit: inkwire_collaboration::Coedit,
    pub shutdown: ShutdownTrigger,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    servers: Option<LocalServers>,
    _dir: tempfile::TempDir,
}

/// Another instance of the functions (a second relay) against the same NATS and Redis.
pub struct Instance {
    pub base: String,
    pub relay: inkwire_relay::Relay,
    pub coedit: inkwire_collaboration::Coedit,
    pub shutdown: ShutdownTrigger,
}

/// The settings tests start from: the defaults, without the user-presence worker (its
/// `presence_update` frames on project and room channels would be noise in the tests of
/// other features; `tests/user_presence.rs` turns it on) and without the analytics worker
/// (its `metrics_update` frames likewise; `tests/analytics.rs` turns it on).
fn test_settings() -> inkwire::Settings {
    inkwire::Settings {
        without_presence_worker: true,
        without_analytics_worker: true,
        without_workflows_worker: true,
        workflows: inkwire_workflows::WorkflowsConfig {
            http_allow_private: true,
            watch_grace: Duration::from_secs(1),
            ..Default::default()
        },
        ..inkwire::Settings::default()
    }
}

async fn serve_instance(
    state: AppState,
    settings: inkwire::Settings,
) -> (
    String,
    inkwire_relay::Relay,
    inkwire_collaboration::Coedit,
    ShutdownTrigger,
    tokio::sync::oneshot::Sender<()>,
) {
    let (trigger, shutdown) = ShutdownTrigger::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut settings = settings;
    if settings.workflows.self_url.is_none() {
        settings.workflows.self_url = Some(base.clone());
    }
    let running = inkwire::start(state, settings, shutdown)
        .await
        .expect("start functions");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let relay = running.relay.clone();
    let coedit = running.coedit.clone();
    tokio::spawn(http::serve_on(listener, running.router.clone(), async {
        let _ = rx.await;
    }));
    (base, relay, coedit, trigger, tx)
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
        Self::start_nats_options(NatsOptions::default(), tweak, settings_tweak).await
    }

    /// Starts with nats-server settings (e.g. a small `max_payload`), changed configuration
    /// and function settings.
    pub async fn start_nats_options(
        nats_options: NatsOptions,
        tweak: impl FnOnce(&mut Config),
        settings_tweak: impl FnOnce(&mut inkwire::Settings),
    ) -> TestEnv {
        let dir = tempfile::tempdir().expect("temporary directory");
        let servers =
            match LocalServers::start_with(dir.path(), Persistence::Scratch, &nats_options).await {
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
        let mut settings = test_settings();
        settings.workflows.files_dir = dir.path().join("workflow-files");
        settings_tweak(&mut settings);
        let (base, relay, coedit, shutdown, tx) = serve_instance(state.clone(), settings).await;
        TestEnv {
            state,
            base,
            relay,
            coedit,
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
        self.second_instance_settings(|s| relay_tweak(&mut s.relay))
            .await
    }

    /// A second instance of every function with its own settings.
    pub async fn second_instance_settings(
        &self,
        settings_tweak: impl FnOnce(&mut inkwire::Settings),
    ) -> Instance {
        let config = (*self.state.config).clone();
        let state = AppState::connect(config, "inkwire-test-2")
            .await
            .expect("connect second instance");
        let mut settings = test_settings();
        settings_tweak(&mut settings);
        let (base, relay, coedit, shutdown, tx) = serve_instance(state, settings).await;
        std::mem::forget(tx); // served until the test ends
        Instance {
            base,
            relay,
            coedit,
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

    /// Adds `user` to `project`. A project never exists without an owner, so when the
    /// project has none yet, [`HARNESS_OWNER`] becomes its owner first.
    pub async fn add_member(&self, project: &str, user: &str, role: ProjectRole) {
        let mut redis = self.state.redis.clone();
        let outcome = membership::set_member(&mut redis, project, user, Some(role))
            .await
            .unwrap();
        if outcome == membership::MembershipChange::NeedsOwner {
            let owner = membership::set_member(
                &mut redis,
                project,
                HARNESS_OWNER,
                Some(ProjectRole::Owner),
            )
            .await
            .unwrap();
            assert_eq!(owner, membership::MembershipChange::Applied);
            let again = membership::set_member(&mut redis, project, user, Some(role))
                .await
                .unwrap();
            assert_eq!(again, membership::MembershipChange::Applied);
        } else {
            assert_eq!(outcome, membership::MembershipChange::Applied);
        }
    }
    pub async fn register_document(&self, project: &str, document: &str) {
        let mut redis = self.state.redis.clone();
        membership::register_document(&mut redis, project, document)
            .await
            .unwrap()
            .unwrap();
    }

    /// Adds `members` (user, role) to `project` and registers `document` in it.
    pub async fn document_with_members(
        &self,
        project: &str,
        document: &str,
        members: &[(&str, ProjectRole)],
    ) {
        for (user, role) in members {
            self.add_member(project, user, *role).await;
        }
        self.register_document(project, document).await;
    }

    /// A stock Yjs client (`yjs_peer`) of `document` on the server at `base` as `user`,
    /// synced.
    pub async fn synced_peer(&self, base: &str, document: &str, user: &str) -> yjs_peer::YjsPeer {
        let mut p = yjs_peer::YjsPeer::start(base, document, &self.token(user), false).await;
        p.wait_synced().await;
        p
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

    /// Freezes nats-server (SIGSTOP): connections stay open and what is sent is buffered by
    /// the kernel, but nothing is answered until [`TestEnv::continue_nats`]. A publish made
    /// meanwhile is stored after the continue, its ack long timed out.
    pub fn stop_nats(&self) {
        let pid = self.signal_nats("-STOP");
        // The stop lands on each thread when it is next scheduled: wait until every one is
        // stopped, so that nothing sent from now on is answered.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !all_threads_stopped(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not stop"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets a nats-server frozen by [`TestEnv::stop_nats`] run again (SIGCONT).
    pub fn continue_nats(&self) {
        self.signal_nats("-CONT");
    }

    fn signal_nats(&self, signal: &str) -> u32 {
        let pid = self
            .servers
            .as_ref()
            .and_then(|s| s.nats_pid())
            .expect("nats-server runs");
        let status = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
        pid
    }

    /// The process id of the test's nats-server.
    pub fn nats_pid(&self) -> u32 {
        self.servers
            .as_ref()
            .and_then(|s| s.nats_pid())
            .expect("nats-server runs")
    }

    /// The process id of the test's redis-server.
    pub fn redis_pid(&self) -> u32 {
        self.servers
            .as_ref()
            .and_then(|s| s.redis_pid())
            .expect("redis-server runs")
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

/// Are all threads of `pid` stopped (state `T` in `/proc/<pid>/task/*/stat`)?
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                // The state follows the parenthesised command name.
                let after = stat.rsplit_once(") ")?.1;
                after.chars().next()
            })
            .is_some_and(|state| state == 'T' || state == 't')
    })
}

/// The writing API's start route.
pub const START: &str = "/api/realtime/writing/sessions/start";
/// The relay API's broadcast route.
pub const BROADCAST: &str = "/api/realtime/websocket/broadcast";

/// A server binary of this workspace run as its own process against the test environment's
/// NATS and Redis (development mode, the environment's JWT secret, a free port), so that a
/// test can kill it with SIGKILL: no task finishes, no socket closes cleanly, nothing is
/// flushed. Killed when dropped.
pub struct ServerProcess {
    pub base: String,
    child: std::process::Child,
}

impl ServerProcess {
    /// Starts `exe` with `extra` environment variables and waits until `/readyz` answers.
    pub async fn start(env: &TestEnv, exe: &str, extra: &[(&str, &str)]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(exe)
            .env_clear()
            .env("NATS_URL", &env.nats_url)
            .env("REDIS_URL", &env.redis_url)
            .env("INKWIRE_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("INKWIRE_ENV", "development")
            .env("INKWIRE_JWT_SECRET", &env.state.config.jwt_secret)
            .envs(extra.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("run {exe}: {e}"));
        let base = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = env.http.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{exe} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ServerProcess { base, child }
    }

    /// Waits until the process exits by itself (e.g. an injected crash); false after
    /// `timeout`.
    pub async fn exited_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.child.try_wait().expect("try_wait").is_some() {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a writing session for `token`'s user in p-1/d-1 and returns its id.
pub async fn start_session(env: &TestEnv, token: &str) -> String {
    let (status, started) = env
        .post(
            START,
            token,
            &json!({"projectId": "p-1", "documentId": "d-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    started["sessionId"].as_str().unwrap().to_string()
}

/// Broadcasts `{"n": n}` to `channel` as the service; returns the message's position.
pub async fn broadcast(env: &TestEnv, channel: &str, n: u64) -> u64 {
    let (status, body) = env
        .post(
            BROADCAST,
            &env.service_token(),
            &json!({"channel": channel, "type": "system", "data": {"n": n}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["seq"].as_u64().unwrap()
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
