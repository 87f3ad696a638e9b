//! The notification settings every part reads: the known categories, how many recipients one
//! send may name, how many notifications an inbox keeps, and how far ahead a send may be
//! scheduled. Read once from the environment (`NotifyConfig::from_env`); the defaults are
//! what the tests and `inkwire dev` use.

use std::time::Duration;

/// Categories known when `INKWIRE_NOTIFY_CATEGORIES` is not set (spelled once, beside the
/// preferences that name them).
pub use crate::preferences::DEFAULT_CATEGORIES;

/// Most recipients one send may name (the request schema says the same).
pub const MAX_RECIPIENTS: usize = 1_000;
/// Notifications an inbox keeps by default (the newest).
pub const DEFAULT_INBOX_LIMIT: usize = 1_000;
/// How far in the future `sendAt` may be.
pub const MAX_SEND_HORIZON: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Category names a send, a preference or a rule may use.
    pub categories: Vec<String>,
    /// Most recipients of one send.
    pub max_recipients: usize,
    /// Notifications kept per inbox; adding one more drops the oldest (read or not), so the
    /// unread count always counts what the inbox holds.
    pub inbox_limit: usize,
    /// Latest `sendAt` accepted, from now.
    pub max_send_horizon: Duration,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            categories: DEFAULT_CATEGORIES.iter().map(|c| c.to_string()).collect(),
            max_recipients: MAX_RECIPIENTS,
            inbox_limit: DEFAULT_INBOX_LIMIT,
            max_send_horizon: MAX_SEND_HORIZON,
        }
    }
}

/// A category name: it becomes part of Redis keys and digest keys, so it follows a strict
/// rule (a lowercase letter, then up to 63 of `[a-z0-9_]`).
pub fn is_valid_category_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl NotifyConfig {
    pub fn from_env() -> anyhow::Result<NotifyConfig> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the settings through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<NotifyConfig> {
        let mut config = NotifyConfig::default();
        if let Some(raw) = get("INKWIRE_NOTIFY_CATEGORIES") {
            let mut categories: Vec<String> = Vec::new();
            for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if !is_valid_category_name(name) {
                    anyhow::bail!(
                        "INKWIRE_NOTIFY_CATEGORIES: {name:?} is not a category name (a lowercase letter, then up to 63 of a-z, 0-9, _)"
                    );
                }
                if !categories.iter().any(|c| c == name) {
                    categories.push(name.to_string());
                }
            }
            if categories.is_empty() {
                anyhow::bail!("INKWIRE_NOTIFY_CATEGORIES names no category");
            }
            config.categories = categories;
        }
        if let Some(raw) = get("INKWIRE_NOTIFY_INBOX_LIMIT") {
            config.inbox_limit = match raw.trim().parse::<usize>() {
                Ok(n) if (1..=100_000).contains(&n) => n,
                _ => anyhow::bail!(
                    "INKWIRE_NOTIFY_INBOX_LIMIT: {raw:?} is not a whole number in 1..=100000"
                ),
            };
        }
        Ok(config)
    }

    pub fn is_known_category(&self, name: &str) -> bool {
        self.categories.iter().any(|c| c == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults() {
        let c = NotifyConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(c, NotifyConfig::default());
        assert_eq!(c.categories.len(), 8);
        assert!(c.is_known_category("chat"));
        assert!(!c.is_known_category("poetry"));
        assert_eq!(c.inbox_limit, 1_000);
        assert_eq!(c.max_recipients, 1_000);
    }

    #[test]
    fn categories_and_inbox_limit_from_the_environment() {
        let c = NotifyConfig::from_lookup(lookup(&[
            ("INKWIRE_NOTIFY_CATEGORIES", " billing, chat ,billing,"),
            ("INKWIRE_NOTIFY_INBOX_LIMIT", "50"),
        ]))
        .unwrap();
        assert_eq!(c.categories, ["billing", "chat"]);
        assert_eq!(c.inbox_limit, 50);
        for bad in ["Chat", "a.b", "", " , ", "1st"] {
            assert!(
                NotifyConfig::from_lookup(lookup(&[("INKWIRE_NOTIFY_CATEGORIES", bad)])).is_err(),
                "{bad:?}"
            );
        }
        for bad in ["0", "-1", "lots", "100001"] {
            assert!(
                NotifyConfig::from_lookup(lookup(&[("INKWIRE_NOTIFY_INBOX_LIMIT", bad)])).is_err(),
                "{bad:?}"
            );
        }
    }
}
