//! The handles every HTTP function and worker shares: configuration, NATS, JetStream, Redis
//! and the JWT keys. Cheap to clone.

use std::sync::Arc;

use redis::aio::ConnectionManager;

use crate::auth::JwtKeys;
use crate::config::Config;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub nats: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub redis: ConnectionManager,
    pub jwt: Arc<JwtKeys>,
}

impl AppState {
    /// What every function binary does first: tracing, configuration from the environment
    /// (refusing the development secret unless `INKWIRE_ENV=development`), and the
    /// connections (streams provisioned).
    pub async fn start_from_env(name: &str) -> anyhow::Result<AppState> {
        crate::telemetry::init();
        let config = Config::from_env()?;
        config.check_serving_secret()?;
        AppState::connect(config, name).await
    }

    /// Connects to NATS and Redis and provisions the JetStream streams.
    pub async fn connect(config: Config, name: &str) -> anyhow::Result<AppState> {
        let nats = crate::jetstream::connect(&config.nats_url, name).await?;
        let js = crate::jetstream::context_with_timeout(nats.clone(), config.publish_timeout);
        let report = crate::jetstream::provision(&js, &config).await?;
        for (stream, outcome) in report {
            tracing::debug!(%stream, ?outcome, "stream provisioned");
        }
        let redis = crate::redis_store::connect(&config.redis_url).await?;
        let jwt = Arc::new(JwtKeys::hs256(&config.jwt_secret));
        Ok(AppState {
            config: Arc::new(config),
            nats,
            js,
            redis,
            jwt,
        })
    }
}
