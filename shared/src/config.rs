//! Configuration from environment variables, with defaults that work on a laptop.
//!
//! Every knob is an `INKWIRE_*` variable except the two connection URLs, which keep the names
//! operators already use (`NATS_URL`, `REDIS_URL`). Secrets (the JWT secret) are never printed:
//! `Config`'s `Debug` output masks them.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// The development JWT secret used when `INKWIRE_JWT_SECRET` is not set. Fine for `inkwire dev`
/// and tests; `Config::from_env` refuses it when `INKWIRE_ENV=production`.
pub const DEV_JWT_SECRET: &str = "inkwire-dev-secret-change-me";

/// Everything a function needs to start.
#[derive(Clone)]
pub struct Config {
    pub nats_url: String,
    pub redis_url: String,
    pub http_addr: SocketAddr,
    pub jwt_secret: String,
    /// How long events stay in the per-category streams.
    pub event_retention: Duration,
    /// The JetStream duplicate window used for `Nats-Msg-Id` dedupe.
    pub duplicate_window: Duration,
    /// Stream replicas (1 on a single node, 3 on the infra/ cluster).
    pub replicas: usize,
    /// `file` (default) or `memory`.
    pub memory_storage: bool,
    /// Largest accepted HTTP request body in bytes.
    pub max_body_bytes: usize,
    /// How many JetStream publish acks may be outstanding while publishing a batch.
    pub publish_window: usize,
    /// How long the RELAY stream keeps channel messages for recovery.
    pub relay_retention: Duration,
    /// How many messages per channel the RELAY stream keeps.
    pub relay_history_per_channel: i64,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("nats_url", &redact_url(&self.nats_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("http_addr", &self.http_addr)
            .field("jwt_secret", &"<redacted>")
            .field("event_retention", &self.event_retention)
            .field("duplicate_window", &self.duplicate_window)
            .field("replicas", &self.replicas)
            .field("memory_storage", &self.memory_storage)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("publish_window", &self.publish_window)
            .field("relay_retention", &self.relay_retention)
            .field("relay_history_per_channel", &self.relay_history_per_channel)
            .finish()
    }
}

/// Hides a password in `scheme://user:password@host` URLs so they can be logged.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://<redacted>@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A configuration value that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("environment variable {name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nats_url: "nats://127.0.0.1:4222".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            http_addr: "127.0.0.1:8080".parse().expect("literal address"),
            jwt_secret: DEV_JWT_SECRET.into(),
            event_retention: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            memory_storage: false,
            max_body_bytes: 4 * 1024 * 1024,
            publish_window: 256,
            relay_retention: Duration::from_secs(600),
            relay_history_per_channel: 1000,
        }
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get`, so tests can supply their own variables.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(v) = get("NATS_URL") {
            c.nats_url = v;
        }
        if let Some(v) = get("REDIS_URL") {
            c.redis_url = v;
        }
        if let Some(v) = get("INKWIRE_HTTP_ADDR") {
            c.http_addr = v.parse().map_err(|e| ConfigError {
                name: "INKWIRE_HTTP_ADDR",
                problem: format!("{e} (expected host:port)"),
            })?;
        }
        if let Some(v) = get("INKWIRE_JWT_SECRET") {
            if v.len() < 16 {
                return Err(ConfigError {
                    name: "INKWIRE_JWT_SECRET",
                    problem: "must be at least 16 bytes".into(),
                });
            }
            c.jwt_secret = v;
        } else if get("INKWIRE_ENV").as_deref() == Some("production") {
            return Err(ConfigError {
                name: "INKWIRE_JWT_SECRET",
                problem: "must be set when INKWIRE_ENV=production".into(),
            });
        }
        if let Some(v) = get("INKWIRE_EVENT_RETENTION") {
            c.event_retention = parse_duration(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_EVENT_RETENTION",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_DUPLICATE_WINDOW") {
            c.duplicate_window = parse_duration(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_DUPLICATE_WINDOW",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_STREAM_REPLICAS") {
            c.replicas = parse_in_range(&v, 1, 5).map_err(|problem| ConfigError {
                name: "INKWIRE_STREAM_REPLICAS",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_STREAM_STORAGE") {
            c.memory_storage = match v.as_str() {
                "file" => false,
                "memory" => true,
                _ => {
                    return Err(ConfigError {
                        name: "INKWIRE_STREAM_STORAGE",
                        problem: format!("{v:?} is neither \"file\" nor \"memory\""),
                    });
                }
            };
        }
        if let Some(v) = get("INKWIRE_MAX_BODY_BYTES") {
            c.max_body_bytes =
                parse_in_range(&v, 1024, 64 * 1024 * 1024).map_err(|problem| ConfigError {
                    name: "INKWIRE_MAX_BODY_BYTES",
                    problem,
                })?;
        }
        if let Some(v) = get("INKWIRE_PUBLISH_WINDOW") {
            c.publish_window = parse_in_range(&v, 1, 65536).map_err(|problem| ConfigError {
                name: "INKWIRE_PUBLISH_WINDOW",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_RELAY_RETENTION") {
            c.relay_retention = parse_duration(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_RELAY_RETENTION",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_RELAY_HISTORY") {
            c.relay_history_per_channel =
                parse_in_range(&v, 1, 1_000_000).map_err(|problem| ConfigError {
                    name: "INKWIRE_RELAY_HISTORY",
                    problem,
                })? as i64;
        }
        if c.duplicate_window > c.event_retention {
            return Err(ConfigError {
                name: "INKWIRE_DUPLICATE_WINDOW",
                problem: "must not be longer than INKWIRE_EVENT_RETENTION".into(),
            });
        }
        Ok(c)
    }
}

fn parse_in_range(v: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("{n} is outside {min}..={max}"));
    }
    Ok(n)
}

/// Parses durations such as `90s`, `15m`, `2h`, `30d` or `250ms`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{v:?} has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{v:?} does not start with a number"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "{v:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_local() {
        let c = with(&[]).unwrap();
        assert_eq!(c.nats_url, "nats://127.0.0.1:4222");
        assert_eq!(c.replicas, 1);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10w").is_err());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = with(&[("INKWIRE_STREAM_REPLICAS", "9")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_STREAM_REPLICAS");
        let e = with(&[("INKWIRE_JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_JWT_SECRET");
        let e = with(&[("INKWIRE_ENV", "production")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_JWT_SECRET");
    }

    #[test]
    fn debug_hides_secrets() {
        let c = with(&[
            ("INKWIRE_JWT_SECRET", "a-very-secret-secret"),
            ("REDIS_URL", "redis://:hunter2@db:6379"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("a-very-secret-secret"));
        assert!(!shown.contains("hunter2"));
    }
}
