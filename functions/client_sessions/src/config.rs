//! Client session settings from `INKWIRE_CLIENT_SESSION_*` variables: the sliding TTL, the
//! largest stored session and the number of sessions a user may hold. Every value is
//! range-checked; a bad one stops the process at start with a message naming the variable.

use std::time::Duration;

use inkwire_shared::config::{ConfigError, parse_duration};

/// Client session settings.
#[derive(Debug, Clone)]
pub struct ClientSessionConfig {
    /// A session not read or written for this long is gone (`INKWIRE_CLIENT_SESSION_TTL`).
    pub ttl: Duration,
    /// Largest stored session: the JSON text of its `state` plus that of its `preferences`,
    /// in bytes (`INKWIRE_CLIENT_SESSION_MAX_BYTES`); `413` beyond.
    pub max_bytes: usize,
    /// Live sessions per user (`INKWIRE_CLIENT_SESSION_MAX_PER_USER`); creating one more is
    /// `409 too_many_client_sessions`.
    pub max_per_user: usize,
}

impl Default for ClientSessionConfig {
    fn default() -> Self {
        ClientSessionConfig {
            ttl: Duration::from_secs(24 * 3600),
            max_bytes: 64 * 1024,
            max_per_user: 20,
        }
    }
}

/// Smallest TTL (tests use short ones; below this a session would expire between two
/// requests of the same page load).
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// Largest TTL: 30 days. Ephemeral state, not an archive.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl ClientSessionConfig {
    pub fn from_env() -> Result<ClientSessionConfig, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get`, so tests can supply their own variables.
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<ClientSessionConfig, ConfigError> {
        let mut c = ClientSessionConfig::default();
        if let Some(v) = get("INKWIRE_CLIENT_SESSION_TTL") {
            c.ttl = parse_duration(&v)
                .and_then(|d| {
                    if (MIN_TTL..=MAX_TTL).contains(&d) {
                        Ok(d)
                    } else {
                        Err(format!("{v:?} is outside 100ms..=30d"))
                    }
                })
                .map_err(|problem| ConfigError {
                    name: "INKWIRE_CLIENT_SESSION_TTL",
                    problem,
                })?;
        }
        if let Some(v) = get("INKWIRE_CLIENT_SESSION_MAX_BYTES") {
            c.max_bytes = number(&v, 256, 4 * 1024 * 1024).map_err(|problem| ConfigError {
                name: "INKWIRE_CLIENT_SESSION_MAX_BYTES",
                problem,
            })?;
        }
        if let Some(v) = get("INKWIRE_CLIENT_SESSION_MAX_PER_USER") {
            c.max_per_user = number(&v, 1, 1000).map_err(|problem| ConfigError {
                name: "INKWIRE_CLIENT_SESSION_MAX_PER_USER",
                problem,
            })?;
        }
        Ok(c)
    }
}

fn number(v: &str, min: usize, max: usize) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{v:?} is not a whole number in {min}..={max}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Result<ClientSessionConfig, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ClientSessionConfig::from_lookup(move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_and_ranges() {
        let c = with(&[]).unwrap();
        assert_eq!(c.ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_bytes, 65_536);
        assert_eq!(c.max_per_user, 20);
        let c = with(&[
            ("INKWIRE_CLIENT_SESSION_TTL", "2s"),
            ("INKWIRE_CLIENT_SESSION_MAX_BYTES", "1024"),
            ("INKWIRE_CLIENT_SESSION_MAX_PER_USER", "3"),
        ])
        .unwrap();
        assert_eq!(
            (c.ttl, c.max_bytes, c.max_per_user),
            (Duration::from_secs(2), 1024, 3)
        );
        for (name, bad) in [
            ("INKWIRE_CLIENT_SESSION_TTL", "10ms"),
            ("INKWIRE_CLIENT_SESSION_TTL", "31d"),
            ("INKWIRE_CLIENT_SESSION_TTL", "soon"),
            ("INKWIRE_CLIENT_SESSION_MAX_BYTES", "10"),
            ("INKWIRE_CLIENT_SESSION_MAX_PER_USER", "0"),
            ("INKWIRE_CLIENT_SESSION_MAX_PER_USER", "-1"),
        ] {
            let e = with(&[(name, bad)]).unwrap_err();
            assert_eq!(e.name, name, "{bad}");
        }
    }
}
