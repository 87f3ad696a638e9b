//! Every function of inkwire composed into one process: the events API, the relay (WebSocket
//! paths, metrics, server API) and the router, the writing-session API with its tracker and
//! scheduler, the notifications API with its notifier, scheduler, delivery worker and rules,
//! co-editing (the y-websocket endpoint `/ws/docs/{id}` and its REST API), chat rooms, the
//! client session store, user presence (its API and worker), the activity log (API,
//! consumers and sweep), analytics (API, counters and the bucket push) and workflows (API,
//! step workers and watcher), on one address. Used by `inkwire dev`, `inkwire serve`, the
//! benchmarks and the end-to-end tests.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use futures::FutureExt;
use inkwire_activity::ActivityConfig;
use inkwire_analytics::AnalyticsConfig;
use inkwire_client_sessions::ClientSessionConfig;
use inkwire_collaboration::{Coedit, CoeditConfig};
use inkwire_notifications::api::NotificationsApi;
use inkwire_notifications::config::NotifyConfig;
use inkwire_notifications::delivery::{DeliverySettings, DeliveryWorker};
use inkwire_notifications::notifier::{Notifier, NotifierSettings};
use inkwire_notifications::providers::{ProviderConfig, Providers};
use inkwire_notifications::rules::{self, RulesWorker};
use inkwire_presence::{PresenceApi, PresenceConfig, PresenceWorker};
use inkwire_relay::{Relay, RelayConfig};
use inkwire_shared::AppState;
use inkwire_shared::consumer::Shutdown;
use inkwire_workflows::{Engine as WorkflowEngine, WorkflowsConfig};
use inkwire_writing::api::WritingApi;
use inkwire_writing::state_machine::TrackerConfig;
use inkwire_writing::tracker::Tracker;
use tokio::task::JoinHandle;

/// Settings of the functions that have their own.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub relay: RelayConfig,
    pub writing: TrackerConfig,
    pub notify: NotifyConfig,
    pub notifier: NotifierSettings,
    /// SMTP and SNS (none by default: those channels are skipped with a reason).
    pub providers: ProviderConfig,
    pub delivery: DeliverySettings,
    /// The rules from domain events; `None` means issue 9's defaults.
    pub rules: Option<Vec<rules::Rule>>,
    /// Run no notification delivery worker in this process (jobs wait on `notify.deliver.>`
    /// for a `notifications-worker` elsewhere). Also how the notifier's part is tested alone.
    pub without_delivery: bool,
    /// Co-editing limits and timings.
    pub coedit: CoeditConfig,
    /// The client session store's TTL and limits.
    pub client_sessions: ClientSessionConfig,
    /// User presence: away time, heartbeat TTL.
    pub presence: PresenceConfig,
    /// Run no presence worker in this process (reports wait in the PRESENCE stream for a
    /// `presence-worker` elsewhere, and no `presence_update` is pushed from here). The test
    /// harness sets it by default, so that tests of other features see no presence frames
    /// on the project and room channels they watch.
    pub without_presence_worker: bool,
    /// Activity log retention and sweep.
    pub activity: ActivityConfig,
    /// Run no activity worker in this process (its consumers wait for an `activity-worker`
    /// elsewhere). The benches of other features set it: the worker reads every user-channel
    /// push for the reads among them.
    pub without_activity_worker: bool,
    /// Analytics buckets, retention, batches and push timing.
    pub analytics: AnalyticsConfig,
    /// Run no analytics worker in this process (its consumers and the bucket push wait for
    /// an `analytics-worker` elsewhere). How the tests run consumers they stop and restart.
    pub without_analytics_worker: bool,
    /// The workflow engine: watcher timing, concurrency, the HTTP allow-list, the file
    /// sandbox.
    pub workflows: WorkflowsConfig,
    /// Run no workflow step worker or watcher in this process (dispatches wait in the `WF`
    /// stream for a `workflows-worker` elsewhere). How the tests crash and restart it.
    pub without_workflows_worker: bool,
}

impl Settings {
    pub fn from_env() -> anyhow::Result<Settings> {
        Ok(Settings {
            relay: RelayConfig::from_env()?,
            writing: TrackerConfig::from_env()?,
            notify: NotifyConfig::from_env()?,
            notifier: NotifierSettings::from_env()?,
            providers: ProviderConfig::from_env()?,
            delivery: DeliverySettings::from_env()?,
            rules: None,
            without_delivery: false,
            coedit: CoeditConfig::from_env()?,
            client_sessions: ClientSessionConfig::from_env()?,
            presence: PresenceConfig::from_env()?,
            without_presence_worker: false,
            activity: ActivityConfig::from_env()?,
            without_activity_worker: false,
            analytics: AnalyticsConfig::from_env()?,
            without_analytics_worker: false,
            workflows: WorkflowsConfig::from_env()?,
            without_workflows_worker: false,
        })
    }
}

/// The composed service and its background work.
pub struct Running {
    pub router: Router,
    pub relay: Relay,
    pub coedit: Coedit,
    background: Vec<JoinHandle<anyhow::Result<()>>>,
}

/// Builds the router and starts the background parts (relay stats responder, router
/// consumers, writing tracker and scheduler, notifier and notification scheduler, presence
/// worker, activity worker, analytics worker, workflow runner). They stop when `shutdown` is triggered.
pub async fn start(
    state: AppState,
    settings: Settings,
    shutdown: Shutdown,
) -> anyhow::Result<Running> {
    let relay = Relay::new(state.clone(), settings.relay.clone(), shutdown.clone());
    relay.start_background().await?;
    let coedit = Coedit::start(state.clone(), settings.coedit.clone(), shutdown.clone()).await?;
    let router_task = tokio::spawn(inkwire_relay::router::run_router(
        state.js.clone(),
        settings.relay.router.clone(),
        shutdown.clone(),
    ));
    let tracker = Tracker::new(
        state.js.clone(),
        state.redis.clone(),
        settings.writing.clone(),
        true,
    );
    let tracker_task = tokio::spawn(inkwire_writing::tracker::run_tracker(
        tracker,
        shutdown.clone(),
    ));
    let scheduler_task = tokio::spawn(inkwire_writing::scheduler::run_scheduler(
        state.js.clone(),
        state.redis.clone(),
        settings.writing.clone(),
        Duration::from_millis(250),
        shutdown.clone(),
    ));
    let notify = Arc::new(settings.notify);
    let notifier = Notifier::new(
        state.js.clone(),
        state.redis.clone(),
        notify.clone(),
        Arc::new(settings.notifier),
    );
    let notifier_task = tokio::spawn(inkwire_notifications::notifier::run_notifier(
        notifier.clone(),
        shutdown.clone(),
    ));
    let notify_scheduler_task = tokio::spawn(inkwire_notifications::scheduler::run_scheduler(
        notifier,
        shutdown.clone(),
    ));
    let providers = Providers::build(&settings.providers).await?;
    let delivery = DeliveryWorker::new(
        state.js.clone(),
        state.redis.clone(),
        providers.clone(),
        Arc::new(settings.delivery),
    );
    let delivery_task = tokio::spawn(if settings.without_delivery {
        futures::future::ready(Ok(())).boxed()
    } else {
        inkwire_notifications::delivery::run_delivery(delivery, shutdown.clone()).boxed()
    });
    let rule_table = match settings.rules {
        Some(r) => r,
        None => rules::from_env(&notify)?,
    };
    let presence_task = tokio::spawn(if settings.without_presence_worker {
        futures::future::ready(Ok(())).boxed()
    } else {
        inkwire_presence::run_worker(
            PresenceWorker {
                js: state.js.clone(),
                nats: state.nats.clone(),
                redis: state.redis.clone(),
                config: settings.presence.clone(),
            },
            shutdown.clone(),
        )
        .boxed()
    });
    let activity_task = tokio::spawn(if settings.without_activity_worker {
        futures::future::ready(Ok(())).boxed()
    } else {
        inkwire_activity::run_worker(
            state.js.clone(),
            state.redis.clone(),
            (*state.config).clone(),
            settings.activity.clone(),
            shutdown.clone(),
        )
        .boxed()
    });
    let analytics_task = tokio::spawn(if settings.without_analytics_worker {
        futures::future::ready(Ok(())).boxed()
    } else {
        inkwire_analytics::run_worker(
            state.js.clone(),
            state.redis.clone(),
            settings.analytics.clone(),
            shutdown.clone(),
        )
        .boxed()
    });
    let mut workflows_config = settings.workflows.clone();
    if workflows_config.self_url.is_none() {
        // Steps with `"auth": "inkwire"` call this process.
        workflows_config.self_url = Some(format!("http://{}", state.config.http_addr));
    }
    let workflow_engine =
        WorkflowEngine::new(state.js.clone(), state.redis.clone(), workflows_config)
            .with_jwt(state.jwt.clone());
    let workflows_task = tokio::spawn(if settings.without_workflows_worker {
        futures::future::ready(Ok(())).boxed()
    } else {
        inkwire_workflows::run_worker(workflow_engine.clone(), shutdown.clone()).boxed()
    });
    let rules_task = tokio::spawn(rules::run_rules(
        RulesWorker {
            js: state.js.clone(),
            redis: state.redis.clone(),
            rules: Arc::new(rule_table),
        },
        shutdown,
    ));
    let cors = inkwire_shared::origins::cors_layer(&state.config.allowed_origins);
    let writing = WritingApi {
        app: state.clone(),
        config: Arc::new(settings.writing),
    };
    let notifications = NotificationsApi {
        app: state.clone(),
        config: notify,
        providers,
    };
    let chat_state = state.clone();
    let client_sessions = inkwire_client_sessions::ClientSessionsApi {
        app: state.clone(),
        config: Arc::new(settings.client_sessions),
    };
    let presence = PresenceApi {
        app: state.clone(),
        config: settings.presence,
    };
    let activity = inkwire_activity::ActivityApi {
        app: state.clone(),
        config: Arc::new(settings.activity),
    };
    let analytics = inkwire_analytics::AnalyticsApi {
        app: state.clone(),
        config: Arc::new(settings.analytics),
    };
    let workflows_state = state.clone();
    let router = inkwire_events::routes()
        .merge(inkwire_shared::http::health_routes())
        .with_state(state)
        .merge(inkwire_relay::routes(relay.clone()))
        .merge(inkwire_writing::api::routes(writing))
        .merge(inkwire_notifications::api::routes(notifications))
        .merge(inkwire_collaboration::routes(coedit.clone()))
        .merge(inkwire_chat::routes(inkwire_chat::ChatApi {
            app: chat_state,
        }))
        .merge(inkwire_client_sessions::routes(client_sessions))
        .merge(inkwire_presence::routes(presence))
        .merge(inkwire_activity::routes(activity))
        .merge(inkwire_analytics::routes(analytics))
        .merge(inkwire_workflows::routes(inkwire_workflows::WorkflowsApi {
            app: workflows_state,
            engine: workflow_engine,
        }));
    Ok(Running {
        router: inkwire_shared::http::edge(router).layer(cors),
        relay,
        background: vec![
            router_task,
            tracker_task,
            scheduler_task,
            notifier_task,
            notify_scheduler_task,
            delivery_task,
            rules_task,
            presence_task,
            activity_task,
            analytics_task,
            workflows_task,
        ],
        coedit,
    })
}

impl Running {
    /// Waits for the background work to finish after shutdown was triggered.
    pub async fn finished(self) {
        for task in self.background {
            match task.await {
                Ok(Err(e)) => tracing::error!(error = %e, "background task failed"),
                Err(e) if !e.is_cancelled() => {
                    tracing::error!(error = %e, "background task panicked")
                }
                _ => {}
            }
        }
    }
}
