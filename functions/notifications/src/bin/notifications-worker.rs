//! The notifications worker as one long-running process: the notifier (the durable consumer
//! of `notify.send.>`), the notification scheduler (held jobs, digests, scheduled sends), the
//! delivery worker (`notify.deliver.>`: SMTP, SNS) and the rules that turn domain events into
//! notifications. Run several for availability: the durable consumers share the work, every
//! step is idempotent, and the scheduler's leases keep instances from doubling anything.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;

use inkwire_notifications::config::NotifyConfig;
use inkwire_notifications::delivery::{DeliverySettings, DeliveryWorker, run_delivery};
use inkwire_notifications::notifier::{Notifier, NotifierSettings, run_notifier};
use inkwire_notifications::providers::{ProviderConfig, Providers};
use inkwire_notifications::rules::{self, RulesWorker, run_rules};
use inkwire_notifications::scheduler::run_scheduler;
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::{AppState, http};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Transparent huge pages off (shared::allocator).
    let _ = inkwire_shared::allocator::configure();
    let notify = Arc::new(NotifyConfig::from_env()?);
    let settings = NotifierSettings::from_env()?;
    let provider_config = ProviderConfig::from_env()?;
    let delivery = DeliverySettings::from_env()?;
    let rule_table = rules::from_env(&notify)?;
    let app = AppState::start_from_env("inkwire-notifications-worker").await?;
    let providers = Providers::build(&provider_config).await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let notifier = Notifier::new(
        app.js.clone(),
        app.redis.clone(),
        notify,
        Arc::new(settings),
    );
    let tasks = vec![
        tokio::spawn(run_notifier(notifier.clone(), shutdown.clone())),
        tokio::spawn(run_scheduler(notifier, shutdown.clone())),
        tokio::spawn(run_delivery(
            DeliveryWorker::new(
                app.js.clone(),
                app.redis.clone(),
                providers,
                Arc::new(delivery),
            ),
            shutdown.clone(),
        )),
        tokio::spawn(run_rules(
            RulesWorker {
                js: app.js.clone(),
                redis: app.redis.clone(),
                rules: Arc::new(rule_table),
            },
            shutdown,
        )),
    ];
    http::shutdown_signal().await;
    trigger.trigger();
    for task in tasks {
        task.await??;
    }
    Ok(())
}
