//! Co-editing limits and timings, from `INKWIRE_COEDIT_*` variables: how long an unused
//! document stays loaded, how often documents are compacted, the size and rate limits that
//! bound memory, and the keep-alive that stops stock clients from reconnecting. Every value
//! is range-checked; a bad one stops the process at start with a message naming the variable.

use std::time::Duration;

use inkwire_shared::config::{ConfigError, parse_duration};

/// Co-editing settings.
#[derive(Debug, Clone)]
pub struct CoeditConfig {
    /// A document with no connection for this long is compacted and unloaded.
    pub idle_unload: Duration,
    /// How often a loaded document that changed is compacted (snapshot + purge).
    pub compact_interval: Duration,
    /// Largest WebSocket frame, hence largest update or awareness message, in bytes.
    pub max_update_bytes: usize,
    /// Largest document (its encoded state) in bytes; updates that would grow it further are
    /// refused.
    pub max_document_bytes: usize,
    /// Connections per document on one instance.
    pub max_connections_per_document: usize,
    /// Frames per second per connection (sustained) and burst; frames beyond it are read
    /// later (the connection is slowed down, not closed).
    pub rate_per_sec: u32,
    pub rate_burst: u32,
    /// A connection that received nothing for this long gets an empty awareness message
    /// (stock clients reconnect after 30 s of silence).
    pub keepalive: Duration,
    /// WebSocket ping interval; a connection silent for three intervals is closed.
    pub ping_interval: Duration,
    /// Frames queued towards one connection before it is closed as too slow.
    pub send_queue: usize,
    /// How often `collaboration.edit_applied` events and contribution counters are flushed.
    pub attribution_interval: Duration,
    /// How often every loaded document re-checks its connections' roles (safety net for
    /// missed access-change announcements).
    pub recheck_interval: Duration,
    /// How long loading a document may take before the connection is refused.
    pub load_timeout: Duration,
    /// Presence not renewed for this long is removed (REST clients, and any client whose
    /// instance stopped renewing it).
    pub presence_ttl: Duration,
    /// Presence changes of a document are coalesced into one `presence_update` per interval
    /// (so a cursor produces at most `1 / interval` frames per second).
    pub presence_interval: Duration,
    /// The same pair of users in the same place is warned at most once per interval (again
    /// sooner only when the severity rises).
    pub conflict_interval: Duration,
    /// An instance's heartbeat lives this long in Redis (renewed every third of it); the
    /// presence of an instance whose heartbeat expired is removed by the others.
    pub instance_ttl: Duration,
}

impl Default for CoeditConfig {
    fn default() -> Self {
        CoeditConfig {
            idle_unload: Duration::from_secs(60),
            compact_interval: Duration::from_secs(30),
            max_update_bytes: 1024 * 1024,
            max_document_bytes: 16 * 1024 * 1024,
            max_connections_per_document: 200,
            rate_per_sec: 200,
            rate_burst: 1000,
            keepalive: Duration::from_secs(15),
            ping_interval: Duration::from_secs(30),
            send_queue: 4096,
            attribution_interval: Duration::from_secs(5),
            recheck_interval: Duration::from_secs(30),
            load_timeout: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(15 * 60),
            presence_interval: Duration::from_millis(250),
            conflict_interval: Duration::from_secs(5 * 60),
            instance_ttl: Duration::from_secs(30),
        }
    }
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    min: usize,
    max: usize,
) -> Result<Option<usize>, ConfigError> {
    match get(name) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ConfigError {
                name,
                problem: format!("{v:?} is not a whole number in {min}..={max}"),
            }),
        },
    }
}

fn duration(
    get: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    min: Duration,
) -> Result<Option<Duration>, ConfigError> {
    match get(name) {
        None => Ok(None),
        Some(v) => parse_duration(&v)
            .and_then(|d| {
                if d >= min {
                    Ok(d)
                } else {
                    Err(format!("{v:?} is shorter than {min:?}"))
                }
            })
            .map(Some)
            .map_err(|problem| ConfigError { name, problem }),
    }
}

impl CoeditConfig {
    pub fn from_env() -> Result<CoeditConfig, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get`, so tests can supply their own variables.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CoeditConfig, ConfigError> {
        let mut c = CoeditConfig::default();
        let ms = Duration::from_millis;
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_IDLE_UNLOAD", ms(10))? {
            c.idle_unload = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_COMPACT_INTERVAL", ms(100))? {
            c.compact_interval = d;
        }
        if let Some(n) = number(&get, "INKWIRE_COEDIT_MAX_UPDATE_BYTES", 1024, 64 << 20)? {
            c.max_update_bytes = n;
        }
        if let Some(n) = number(&get, "INKWIRE_COEDIT_MAX_DOCUMENT_BYTES", 1024, 1 << 30)? {
            c.max_document_bytes = n;
        }
        if let Some(n) = number(&get, "INKWIRE_COEDIT_MAX_CONNECTIONS", 1, 100_000)? {
            c.max_connections_per_document = n;
        }
        if let Some(n) = number(&get, "INKWIRE_COEDIT_RATE", 1, 100_000)? {
            c.rate_per_sec = n as u32;
        }
        if let Some(n) = number(&get, "INKWIRE_COEDIT_BURST", 1, 100_000)? {
            c.rate_burst = n as u32;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_KEEPALIVE", ms(100))? {
            if d >= Duration::from_secs(30) {
                return Err(ConfigError {
                    name: "INKWIRE_COEDIT_KEEPALIVE",
                    problem: "must be shorter than 30s (clients reconnect after 30s of silence)"
                        .into(),
                });
            }
            c.keepalive = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_PING_INTERVAL", ms(100))? {
            c.ping_interval = d;
        }
        if let Some(n) = number(&get, "INKWIRE_COEDIT_SEND_QUEUE", 16, 1 << 20)? {
            c.send_queue = n;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_ATTRIBUTION_INTERVAL", ms(50))? {
            c.attribution_interval = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_RECHECK_INTERVAL", ms(100))? {
            c.recheck_interval = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_LOAD_TIMEOUT", ms(100))? {
            c.load_timeout = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_PRESENCE_TTL", ms(1000))? {
            c.presence_ttl = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_PRESENCE_INTERVAL", ms(10))? {
            c.presence_interval = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_CONFLICT_INTERVAL", ms(100))? {
            c.conflict_interval = d;
        }
        if let Some(d) = duration(&get, "INKWIRE_COEDIT_INSTANCE_TTL", ms(1000))? {
            c.instance_ttl = d;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<CoeditConfig, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CoeditConfig::from_lookup(move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let c = with(&[]).unwrap();
        assert_eq!(c.idle_unload, Duration::from_secs(60));
        let c = with(&[("INKWIRE_COEDIT_IDLE_UNLOAD", "2s")]).unwrap();
        assert_eq!(c.idle_unload, Duration::from_secs(2));
        let e = with(&[("INKWIRE_COEDIT_IDLE_UNLOAD", "soon")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_COEDIT_IDLE_UNLOAD");
        let e = with(&[("INKWIRE_COEDIT_KEEPALIVE", "45s")]).unwrap_err();
        assert!(e.problem.contains("30s"), "{e}");
        let e = with(&[("INKWIRE_COEDIT_MAX_CONNECTIONS", "0")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_COEDIT_MAX_CONNECTIONS");
    }
}
