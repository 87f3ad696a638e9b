//! Configuration from environment variables, with defaults that work on a laptop.
//!
//! Every knob is an `INKWIRE_*` variable except the two connection URLs, which keep the names
//! operators already use (`NATS_URL`, `REDIS_URL`). Secrets (the JWT secret) are never printed:
//! `Config`'s `Debug` output masks them.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::origins::AllowedOrigins;

/// How far ahead of the server's clock a client's event time may be (`INKWIRE_MAX_CLOCK_SKEW`).
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// The development JWT secret used when `INKWIRE_JWT_SECRET` is not set. Anyone can read it
/// here, so it is only for `inkwire dev` and tests: `Config::from_env` refuses it when
/// `INKWIRE_ENV=production` (even when set explicitly), and the serving processes refuse it
/// unless `INKWIRE_ENV=development` ([`Config::check_serving_secret`]).
pub const DEV_JWT_SECRET: &str = "inkwire-dev-secret-change-me";

/// `INKWIRE_ENV`: what kind of deployment this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Environment {
    /// Not said. Serving refuses the development secret, as in production.
    #[default]
    Unspecified,
    /// `development`: the development secret is allowed (`inkwire dev` sets this).
    Development,
    /// `production`: the development secret is refused everywhere.
    Production,
}

/// Everything a function needs to start.
#[derive(Clone)]
pub struct Config {
    pub nats_url: String,
    pub redis_url: String,
    pub http_addr: SocketAddr,
    pub jwt_secret: String,
    /// `INKWIRE_ENV`.
    pub environment: Environment,
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
    /// Browser origins allowed besides the server's own (`INKWIRE_ALLOWED_ORIGINS`): CORS and
    /// WebSocket upgrades.
    pub allowed_origins: AllowedOrigins,
    /// How far ahead of the server's clock an event's `timestamp` may be.
    pub max_clock_skew: Duration,
    /// How far behind the server's clock an event's `timestamp` may be.
    pub max_event_age: Duration,
    /// How long a JetStream publish waits for the stream's ack (and the bound of every other
    /// JetStream API request). Past it the answer is `503 outcome_unknown`.
    pub publish_timeout: Duration,
    /// How long the first answer to a request with an `Idempotency-Key` is kept.
    pub idempotency_ttl: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("nats_url", &redact_url(&self.nats_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("http_addr", &self.http_addr)
            .field("jwt_secret", &"<redacted>")
            .field("environment", &self.environment)
            .field("event_retention", &self.event_retention)
            .field("duplicate_window", &self.duplicate_window)
            .field("replicas", &self.replicas)
            .field("memory_storage", &self.memory_storage)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("publish_window", &self.publish_window)
            .field("relay_retention", &self.relay_retention)
            .field("relay_history_per_channel", &self.relay_history_per_channel)
            .field("allowed_origins", &self.allowed_origins)
            .field("max_clock_skew", &self.max_clock_skew)
            .field("max_event_age", &self.max_event_age)
            .field("publish_timeout", &self.publish_timeout)
            .field("idempotency_ttl", &self.idempotency_ttl)
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
            environment: Environment::Unspecified,
            event_retention: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
            memory_storage: false,
            max_body_bytes: 4 * 1024 * 1024,
            publish_window: 256,
            relay_retention: Duration::from_secs(600),
            relay_history_per_channel: 1000,
            allowed_origins: AllowedOrigins::default(),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            max_event_age: Duration::from_secs(24 * 3600),
            publish_timeout: Duration::from_secs(5),
            idempotency_ttl: Duration::from_secs(24 * 3600),
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
        if let Some(v) = get("INKWIRE_ENV") {
            c.environment = match v.trim() {
                "development" => Environment::Development,
                "production" => Environment::Production,
                other => {
                    return Err(ConfigError {
                        name: "INKWIRE_ENV",
                        problem: format!("{other:?} is neither \"development\" nor \"production\""),
                    });
                }
            };
        }
        if let Some(v) = get("INKWIRE_JWT_SECRET") {
            if v.len() < 16 {
                return Err(ConfigError {
                    name: "INKWIRE_JWT_SECRET",
                    problem: "must be at least 16 bytes".into(),
                });
            }
            c.jwt_secret = v;
        }
        if c.environment == Environment::Production && c.uses_dev_secret() {
            return Err(ConfigError {
                name: "INKWIRE_JWT_SECRET",
                problem: "must be set, to a secret other than the built-in development one, \
                          when INKWIRE_ENV=production"
                    .into(),
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
        if let Some(v) = get("INKWIRE_ALLOWED_ORIGINS") {
            c.allowed_origins = AllowedOrigins::parse(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_ALLOWED_ORIGINS",
                problem,
            })?;
        } else if get("INKWIRE_ENV").as_deref() == Some("development") {
            // Pages of local development servers, whatever port they picked.
            c.allowed_origins = AllowedOrigins::local_development();
        }
        if let Some(v) = get("INKWIRE_MAX_CLOCK_SKEW") {
            c.max_clock_skew = parse_duration(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_MAX_CLOCK_SKEW",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_MAX_EVENT_AGE") {
            c.max_event_age = parse_duration(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_MAX_EVENT_AGE",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_PUBLISH_TIMEOUT") {
            c.publish_timeout = parse_duration(&v)
                .and_then(|d| {
                    if d.is_zero() {
                        Err(format!("{v:?} must be longer than zero"))
                    } else {
                        Ok(d)
                    }
                })
                .map_err(|problem| ConfigError {
                    name: "INKWIRE_PUBLISH_TIMEOUT",
                    problem,
                })?;
        }
        if let Some(v) = get("INKWIRE_IDEMPOTENCY_TTL") {
            c.idempotency_ttl = parse_duration(&v)
                .and_then(|d| {
                    if d < Duration::from_secs(1) {
                        Err(format!("{v:?} must be at least 1s"))
                    } else {
                        Ok(d)
                    }
                })
                .map_err(|problem| ConfigError {
                    name: "INKWIRE_IDEMPOTENCY_TTL",
                    problem,
                })?;
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

impl Config {
    /// Is the JWT secret the built-in development one (set or defaulted)?
    pub fn uses_dev_secret(&self) -> bool {
        self.jwt_secret == DEV_JWT_SECRET
    }

    /// The rule for processes that serve clients (`inkwire serve` and every function
    /// binary): the built-in development secret, which anyone can read in the source, signs
    /// tokens only when `INKWIRE_ENV=development` says so explicitly.
    pub fn check_serving_secret(&self) -> Result<(), ConfigError> {
        if !self.uses_dev_secret() || self.environment == Environment::Development {
            return Ok(());
        }
        Err(ConfigError {
            name: "INKWIRE_JWT_SECRET",
            problem: "is unset or the built-in development secret, which anyone can read; set a \
                      secret of your own (at least 16 bytes), or INKWIRE_ENV=development on a \
                      laptop"
                .into(),
        })
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
    let scale: u64 = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{v:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    // Checked: a request may carry any digits, and a wrapped product is a wrong duration.
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{v:?} is too long a duration"))
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
        // Too long to represent: an error, not a panic or a wrapped value.
        assert!(parse_duration("999999999999999999d").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = with(&[("INKWIRE_STREAM_REPLICAS", "9")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_STREAM_REPLICAS");
        let e = with(&[("INKWIRE_JWT_SECRET", "short")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_JWT_SECRET");
        let e = with(&[("INKWIRE_ENV", "production")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_JWT_SECRET");
        let e = with(&[("INKWIRE_PUBLISH_TIMEOUT", "0s")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_PUBLISH_TIMEOUT");
        let e = with(&[("INKWIRE_IDEMPOTENCY_TTL", "5")]).unwrap_err();
        assert_eq!(e.name, "INKWIRE_IDEMPOTENCY_TTL");
        let c = with(&[
            ("INKWIRE_PUBLISH_TIMEOUT", "1500ms"),
            ("INKWIRE_IDEMPOTENCY_TTL", "2h"),
        ])
        .unwrap();
        assert_eq!(c.publish_timeout, Duration::from_millis(1500));
        assert_eq!(c.idempotency_ttl, Duration::from_secs(7200));
        let e = with(&[(
            "INKWIRE_ALLOWED_ORIGINS",
            "https://ok.example, https://bad/path",
        )])
        .unwrap_err();
        assert_eq!(e.name, "INKWIRE_ALLOWED_ORIGINS");
    }

    #[test]
    fn allowed_origins() {
        assert!(with(&[]).unwrap().allowed_origins.is_empty());
        let c = with(&[("INKWIRE_ENV", "development")]).unwrap();
        assert!(c.allowed_origins.allows("http://localhost:5173"));
        let c = with(&[("INKWIRE_ALLOWED_ORIGINS", "https://app.example.com")]).unwrap();
        assert!(c.allowed_origins.allows("https://app.example.com"));
        assert!(!c.allowed_origins.allows("http://localhost:5173"));
    }

    #[test]
    fn the_development_secret_needs_development_explicitly() {
        // Unset: configuration loads (tools such as `inkwire token` work), serving refuses.
        let c = with(&[]).unwrap();
        assert!(c.uses_dev_secret());
        assert_eq!(
            c.check_serving_secret().unwrap_err().name,
            "INKWIRE_JWT_SECRET"
        );
        // Set explicitly to the development secret: the same.
        let c = with(&[("INKWIRE_JWT_SECRET", DEV_JWT_SECRET)]).unwrap();
        assert!(c.check_serving_secret().is_err());
        // Development says so: allowed.
        let c = with(&[("INKWIRE_ENV", "development")]).unwrap();
        assert_eq!(c.environment, Environment::Development);
        c.check_serving_secret().unwrap();
        // Production refuses it, defaulted or explicit.
        for vars in [
            vec![("INKWIRE_ENV", "production")],
            vec![
                ("INKWIRE_ENV", "production"),
                ("INKWIRE_JWT_SECRET", DEV_JWT_SECRET),
            ],
        ] {
            let e = with(&vars).unwrap_err();
            assert_eq!(e.name, "INKWIRE_JWT_SECRET", "{vars:?}");
        }
        // A real secret serves anywhere.
        for env in ["production", "development"] {
            let c = with(&[
                ("INKWIRE_ENV", env),
                ("INKWIRE_JWT_SECRET", "a-real-secret-of-32-characters!!"),
            ])
            .unwrap();
            c.check_serving_secret().unwrap();
        }
        let c = with(&[("INKWIRE_JWT_SECRET", "a-real-secret-of-32-characters!!")]).unwrap();
        c.check_serving_secret().unwrap();
        // Unknown environments are a typo, not a silent "not development".
        assert_eq!(
            with(&[("INKWIRE_ENV", "prod")]).unwrap_err().name,
            "INKWIRE_ENV"
        );
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
