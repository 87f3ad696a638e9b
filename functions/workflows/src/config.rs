//! The engine's settings, from `INKWIRE_WORKFLOW_*` environment variables.

use std::path::PathBuf;
use std::time::Duration;

use inkwire_shared::config::parse_duration;
use inkwire_shared::providers::ProviderConfig;

use crate::messaging::AiConfig;

#[derive(Debug, Clone)]
pub struct WorkflowsConfig {
    /// How long a dispatched step may wait before the watcher dispatches it again, and the
    /// longest the watcher leaves an active run unexamined (`INKWIRE_WORKFLOW_WATCH_GRACE`).
    pub watch_grace: Duration,
    /// How often the watcher looks for due runs (`INKWIRE_WORKFLOW_WATCH_INTERVAL`): the
    /// precision of retries' backoffs and of delays.
    pub watch_interval: Duration,
    /// Added to a step's timeout for its lease: after `timeout + lease_margin` without a
    /// result, another worker may take the step over (`INKWIRE_WORKFLOW_LEASE_MARGIN`).
    pub lease_margin: Duration,
    /// Steps handled at once per worker (`INKWIRE_WORKFLOW_CONCURRENCY`).
    pub concurrency: usize,
    /// Let the HTTP action reach loopback and private addresses (`INKWIRE_WORKFLOW_HTTP_ALLOW_PRIVATE`;
    /// on in `inkwire dev` and the tests, off in production).
    pub http_allow_private: bool,
    /// Hosts the HTTP action may reach even when they resolve to private addresses
    /// (`INKWIRE_WORKFLOW_HTTP_ALLOW_HOSTS`, comma-separated): internal services a team trusts.
    pub http_allow_hosts: Vec<String>,
    /// The sandbox of the file action (`INKWIRE_WORKFLOW_FILES_DIR`); one directory per
    /// project inside it.
    pub files_dir: PathBuf,
    /// inkwire's own base URL (`INKWIRE_WORKFLOW_SELF_URL`, e.g. `http://127.0.0.1:8080`;
    /// `inkwire dev` / `serve` default to their address): what `"auth": "inkwire"` may call,
    /// and always reachable by the `http` action.
    pub self_url: Option<String>,
    /// SMTP and SNS for the email and SMS actions (the notifications' variables:
    /// `INKWIRE_SMTP_URL`, `INKWIRE_SNS_*`, ...).
    pub providers: ProviderConfig,
    /// The AI action's endpoint (`INKWIRE_WORKFLOW_AI_*`).
    pub ai: AiConfig,
}

impl Default for WorkflowsConfig {
    fn default() -> Self {
        WorkflowsConfig {
            watch_grace: Duration::from_secs(5),
            watch_interval: Duration::from_millis(100),
            lease_margin: Duration::from_secs(5),
            concurrency: 64,
            http_allow_private: false,
            http_allow_hosts: Vec::new(),
            files_dir: std::env::temp_dir().join("inkwire-workflow-files"),
            self_url: None,
            providers: ProviderConfig::default(),
            ai: AiConfig::default(),
        }
    }
}

impl WorkflowsConfig {
    /// The hosts the `http` action may reach on private addresses: the configured ones and
    /// inkwire's own.
    pub fn allowed_hosts(&self) -> Vec<String> {
        let mut hosts = self.http_allow_hosts.clone();
        if let Some(host) = self
            .self_url
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
            .and_then(|u| u.host_str().map(|h| h.to_ascii_lowercase()))
        {
            hosts.push(host);
        }
        hosts
    }

    pub fn from_env() -> anyhow::Result<WorkflowsConfig> {
        let mut c = WorkflowsConfig::default();
        for (name, slot) in [
            ("INKWIRE_WORKFLOW_WATCH_GRACE", &mut c.watch_grace),
            ("INKWIRE_WORKFLOW_WATCH_INTERVAL", &mut c.watch_interval),
            ("INKWIRE_WORKFLOW_LEASE_MARGIN", &mut c.lease_margin),
        ] {
            if let Ok(v) = std::env::var(name) {
                *slot = parse_duration(&v).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            }
        }
        if let Ok(v) = std::env::var("INKWIRE_WORKFLOW_CONCURRENCY") {
            c.concurrency = v
                .parse()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .ok_or_else(|| anyhow::anyhow!("INKWIRE_WORKFLOW_CONCURRENCY: 1 to 1024"))?;
        }
        if let Ok(v) = std::env::var("INKWIRE_WORKFLOW_HTTP_ALLOW_PRIVATE") {
            c.http_allow_private = matches!(v.as_str(), "1" | "true" | "yes");
        }
        if let Ok(v) = std::env::var("INKWIRE_WORKFLOW_HTTP_ALLOW_HOSTS") {
            c.http_allow_hosts = v
                .split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect();
        }
        if let Ok(v) = std::env::var("INKWIRE_WORKFLOW_FILES_DIR") {
            c.files_dir = PathBuf::from(v);
        }
        if let Ok(v) = std::env::var("INKWIRE_WORKFLOW_SELF_URL") {
            let v = v.trim().trim_end_matches('/').to_string();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                anyhow::bail!("INKWIRE_WORKFLOW_SELF_URL: not an http:// or https:// URL");
            }
            c.self_url = Some(v);
        }
        c.providers = ProviderConfig::from_env()?;
        c.ai = AiConfig::from_env()?;
        Ok(c)
    }
}
