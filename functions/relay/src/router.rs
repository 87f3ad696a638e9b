//! The router: a durable consumer per category stream that forwards domain events to the
//! channels clients watch: `category:<c>` always, `project:<p>` and `document:<d>` when the
//! event names them.
//!
//! Which event types are forwarded is configurable: `INKWIRE_ROUTER_EXCLUDE` is a
//! comma-separated list of `category.type` or `category.*` (default `writing.keystroke,
//! writing.word_added,notification.notification_created`: raw keystrokes and per-batch word
//! counts are many and say nothing a watcher needs, the writing tracker pushes throttled live
//! metrics instead; a notification is one event per recipient, up to 1,000 per send, and its
//! recipient already gets it on `user:` from the inbox). The relay message type follows the
//! event: collaboration presence events (`user_joined`, `user_left`, `cursor_moved`) are
//! `presence_update`, other writing and collaboration events `document_update`, everything
//! else `system`; `data` is the whole event envelope. Forwarding is idempotent: each channel
//! copy has the id `<event id>:<channel>`.

use std::collections::HashSet;

use async_nats::jetstream;
use futures::future::join_all;
use inkwire_shared::channels::{self, Channel, ChannelKind, MessageType};
use inkwire_shared::config::ConfigError;
use inkwire_shared::consumer::{ConsumerSpec, Delivery, HandlerError, Shutdown, run};
use inkwire_shared::events::{Category, Event};
use inkwire_shared::subjects;

/// Durable consumer name on every category stream.
pub const DURABLE: &str = "relay-router";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// `writing.keystroke`, or `writing.*` for a whole category.
    pub exclude: HashSet<String>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            exclude: [
                "writing.keystroke".to_string(),
                "writing.word_added".to_string(),
                "notification.notification_created".to_string(),
            ]
            .into(),
        }
    }
}

impl RouterConfig {
    pub fn from_env() -> Result<RouterConfig, ConfigError> {
        match std::env::var("INKWIRE_ROUTER_EXCLUDE") {
            Err(_) => Ok(RouterConfig::default()),
            Ok(v) => Self::parse(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_ROUTER_EXCLUDE",
                problem,
            }),
        }
    }

    pub fn parse(v: &str) -> Result<RouterConfig, String> {
        let mut exclude = HashSet::new();
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (category, event_type) = item
                .split_once('.')
                .ok_or_else(|| format!("{item:?} is not category.type"))?;
            let category: Category = category.parse().map_err(|e| format!("{e}"))?;
            if event_type != "*" && !category.has_type(event_type) {
                return Err(format!("{event_type:?} is not a {category} event type"));
            }
            exclude.insert(item.to_string());
        }
        Ok(RouterConfig { exclude })
    }

    pub fn forwards(&self, category: Category, event_type: &str) -> bool {
        !self.exclude.contains(&format!("{category}.{event_type}"))
            && !self.exclude.contains(&format!("{category}.*"))
    }
}

/// The relay message type of a domain event.
pub fn message_type_of(category: Category, event_type: &str) -> MessageType {
    match (category, event_type) {
        (Category::Collaboration, "user_joined" | "user_left" | "cursor_moved") => {
            MessageType::PresenceUpdate
        }
        (Category::Collaboration | Category::Writing, _) => MessageType::DocumentUpdate,
        _ => MessageType::System,
    }
}

/// The channels an event goes to.
pub fn channels_of(event: &Event) -> Vec<Channel> {
    let mut out = vec![Channel::new(ChannelKind::Category, event.category.as_str())];
    if let Some(p) = &event.project_id {
        out.push(Channel::new(ChannelKind::Project, p.clone()));
    }
    if let Some(d) = &event.document_id {
        out.push(Channel::new(ChannelKind::Document, d.clone()));
    }
    out
}

/// Reads a stored event as the router does (the events API only stores what this accepts).
pub fn parse(payload: &[u8]) -> Result<Event, HandlerError> {
    serde_json::from_slice(payload)
        .map_err(|e| HandlerError::Permanent(format!("not an event envelope: {e}")))
}

async fn forward(
    js: &jetstream::Context,
    config: &RouterConfig,
    delivery: Delivery,
) -> Result<(), HandlerError> {
    let event = parse(&delivery.payload)?;
    if !config.forwards(event.category, &event.event_type) {
        return Ok(());
    }
    let data = serde_json::to_value(&event).map_err(|e| HandlerError::Permanent(e.to_string()))?;
    let kind = message_type_of(event.category, &event.event_type);
    for channel in channels_of(&event) {
        let id = format!("{}:{channel}", event.id);
        channels::publish(js, &channel, kind, &data, id)
            .await
            .map_err(|e| HandlerError::Retry(format!("publishing to {channel}: {e}")))?;
    }
    Ok(())
}

/// Runs the router on every category stream until `shutdown`.
pub async fn run_router(
    js: jetstream::Context,
    config: RouterConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let runs = Category::ALL.map(|category| {
        let js = js.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        async move {
            let spec = ConsumerSpec::new(subjects::event_stream(category), DURABLE);
            let handler_js = js.clone();
            run(
                js,
                spec,
                move |d| {
                    let js = handler_js.clone();
                    let config = config.clone();
                    async move { forward(&js, &config, d).await }
                },
                shutdown,
            )
            .await
        }
    });
    for result in join_all(runs).await {
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions() {
        let d = RouterConfig::default();
        assert!(!d.forwards(Category::Writing, "keystroke"));
        assert!(!d.forwards(Category::Writing, "word_added"));
        assert!(d.forwards(Category::Writing, "flow_state_entered"));
        let c = RouterConfig::parse("analytics.*, writing.keystroke").unwrap();
        assert!(!c.forwards(Category::Analytics, "metric_updated"));
        assert!(RouterConfig::parse("writing.sneeze").is_err());
        assert!(RouterConfig::parse("poetry.*").is_err());
        assert!(
            RouterConfig::parse("")
                .unwrap()
                .forwards(Category::Writing, "keystroke")
        );
    }

    #[test]
    fn types_and_channels() {
        assert_eq!(
            message_type_of(Category::Collaboration, "cursor_moved"),
            MessageType::PresenceUpdate
        );
        assert_eq!(
            message_type_of(Category::Writing, "word_added"),
            MessageType::DocumentUpdate
        );
        assert_eq!(
            message_type_of(Category::Publishing, "sales_updated"),
            MessageType::System
        );
        let e = Event::builder(Category::Writing, "word_added", "u")
            .project("p")
            .document("d")
            .build();
        let names: Vec<String> = channels_of(&e).iter().map(|c| c.to_string()).collect();
        assert_eq!(names, vec!["category:writing", "project:p", "document:d"]);
    }
}
