//! Real-time co-editing: a Yjs server (yrs) that stock `y-websocket` clients use unchanged,
//! durable in JetStream, on any number of instances, with bounded memory.
//!
//! - `/ws/docs/{documentId}` speaks the y-websocket protocol (`protocol`, `connection`),
//!   authenticated before the upgrade like the relay: project owners and editors write,
//!   reviewers and readers read;
//! - each loaded document is one task (`document`) that follows the document's subject in
//!   the `YDOC` stream (`storage`), so instances apply each other's updates, and shares
//!   awareness over core NATS;
//! - documents without connections are compacted and unloaded after
//!   `INKWIRE_COEDIT_IDLE_UNLOAD` (`config`);
//! - edits are attributed per user (`attribution`), and the REST API serves a document's
//!   text, binary state and contributions (`api`); losing a right drops or demotes live
//!   connections at once (`access`);
//! - presence per document from awareness and REST (`presence`, `presence_api`), resolved
//!   from Yjs relative positions (`positions`) by each document task, with conflict
//!   prediction (`conflicts`) and warnings (`document::sessions`).

pub mod access;
pub mod api;
pub mod attribution;
pub mod config;
pub mod conflicts;
pub mod connection;
pub mod document;
pub mod metrics;
pub mod positions;
pub mod presence;
pub mod presence_api;
pub mod protocol;
pub mod storage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use inkwire_shared::AppState;
use inkwire_shared::consumer::Shutdown;
use tokio::sync::OnceCell;

pub use config::CoeditConfig;
use document::DocHandle;
use storage::{StorageError, Store};

/// A registry slot: loaded once, by whoever asks first.
pub type DocCell = Arc<OnceCell<DocHandle>>;

/// The co-editing service of one instance. Cheap to clone.
#[derive(Clone)]
pub struct Coedit(Arc<Inner>);

pub struct Inner {
    pub app: AppState,
    pub config: CoeditConfig,
    pub store: Store,
    pub instance_id: String,
    pub attribution: attribution::Attribution,
    pub shutdown: Shutdown,
    docs: Mutex<HashMap<String, DocCell>>,
    next_conn: AtomicU64,
}

impl std::ops::Deref for Coedit {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Coedit {
    /// Opens the stream, starts the attribution aggregator and the access-change listener.
    pub async fn start(
        app: AppState,
        config: CoeditConfig,
        shutdown: Shutdown,
    ) -> anyhow::Result<Coedit> {
        let store = Store::open(&app.js).await?;
        let attribution = attribution::start(
            app.js.clone(),
            app.redis.clone(),
            config.attribution_interval,
            shutdown.clone(),
        );
        let instance_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let coedit = Coedit(Arc::new(Inner {
            app,
            config,
            store,
            instance_id,
            attribution,
            shutdown,
            docs: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        }));
        access::spawn_listener(coedit.clone()).await?;
        coedit.spawn_heartbeat().await;
        Ok(coedit)
    }

    /// Keeps this instance's heartbeat alive in Redis (the first one before serving, so its
    /// sessions are never taken for a dead instance's); removed on shutdown, so the others
    /// drop whatever presence is left at once rather than after the TTL.
    async fn spawn_heartbeat(&self) {
        let ttl = self.config.instance_ttl;
        let mut redis = self.app.redis.clone();
        // Redis down at start delays presence, not co-editing: the ticker retries.
        if let Err(e) = presence::heartbeat(&mut redis, &self.instance_id, ttl).await {
            tracing::warn!(error = %e, "instance heartbeat not stored yet");
        }
        let instance = self.instance_id.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if let Err(e) = presence::heartbeat(&mut redis, &instance, ttl).await {
                            tracing::warn!(error = %e, "instance heartbeat not renewed");
                        }
                    }
                    _ = shutdown.wait() => break,
                }
            }
            let _: redis::RedisResult<()> =
                redis::AsyncCommands::del(&mut redis, presence::instance_key(&instance)).await;
        });
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Documents loaded on this instance.
    pub fn loaded_documents(&self) -> usize {
        self.docs
            .lock()
            .expect("docs lock")
            .values()
            .filter(|c| c.initialized())
            .count()
    }

    /// The handle of a loaded document, if it is loaded here.
    pub fn handle_of(&self, document: &str) -> Option<DocHandle> {
        self.docs
            .lock()
            .expect("docs lock")
            .get(document)
            .and_then(|c| c.get().cloned())
    }

    /// Handles of every loaded document.
    pub fn handles(&self) -> Vec<DocHandle> {
        self.docs
            .lock()
            .expect("docs lock")
            .values()
            .filter_map(|c| c.get().cloned())
            .collect()
    }

    /// The loaded document, loading it (once, whoever asks concurrently) when needed.
    pub async fn document(&self, document: &str, project: &str) -> Result<DocHandle, StorageError> {
        let cell = self
            .docs
            .lock()
            .expect("docs lock")
            .entry(document.to_string())
            .or_default()
            .clone();
        let handle = cell
            .get_or_try_init(|| async {
                let loaded =
                    tokio::time::timeout(self.config.load_timeout, self.store.load(document))
                        .await
                        .map_err(|_| StorageError::JetStream("loading timed out".into()))??;
                Ok::<_, StorageError>(document::spawn(
                    self.clone(),
                    document,
                    project,
                    loaded,
                    cell.clone(),
                ))
            })
            .await?;
        Ok(handle.clone())
    }

    /// Removes `cell` from the registry if it is still the document's slot.
    pub(crate) fn forget(&self, document: &str, cell: &DocCell) {
        let mut docs = self.docs.lock().expect("docs lock");
        if docs.get(document).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            docs.remove(document);
        }
    }

    /// Compacts `document` now if it is loaded here (tests, operators).
    pub async fn compact_now(&self, document: &str) {
        if let Some(h) = self.handle_of(document) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if h.send(document::Command::CompactNow(tx)).await {
                let _ = rx.await;
            }
        }
    }
}

/// The co-editing routes: the WebSocket endpoint and the REST API (no health routes or
/// fallbacks, so that `inkwire start` can merge it with the other functions).
pub fn routes(coedit: Coedit) -> Router {
    let api = api::DocumentsApi {
        app: coedit.app.clone(),
        store: coedit.store.clone(),
    };
    connection::routes(coedit.clone())
        .merge(api::routes(api))
        .merge(presence_api::routes(coedit))
}

/// The co-editing service as a complete service (its own binary): routes and health behind
/// the shared edge, CORS with the allowed origins.
pub fn app(coedit: Coedit) -> Router {
    let cors = inkwire_shared::origins::cors_layer(&coedit.app.config.allowed_origins);
    let health = inkwire_shared::http::health_routes().with_state(coedit.app.clone());
    inkwire_shared::http::edge(routes(coedit).merge(health)).layer(cors)
}

/// The `coedit` process: configuration from the environment, the endpoint and the REST API
/// on `INKWIRE_HTTP_ADDR` until SIGINT / SIGTERM (then compacted and unloaded). The `coedit`
/// binary is this function; the tests run it as a process of its own to kill it with SIGKILL.
pub async fn serve_from_env() -> anyhow::Result<()> {
    let config = CoeditConfig::from_env()?;
    let app = AppState::start_from_env("inkwire-coedit").await?;
    let addr = app.config.http_addr;
    let (trigger, shutdown) = inkwire_shared::consumer::ShutdownTrigger::new();
    let coedit = Coedit::start(app, config, shutdown).await?;
    inkwire_shared::http::serve(self::app(coedit), addr, async move {
        inkwire_shared::http::shutdown_signal().await;
        trigger.trigger();
    })
    .await
}
