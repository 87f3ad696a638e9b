//! Presence settings, from `INKWIRE_PRESENCE_*` variables. The API and the worker read the
//! same ones: the API derives "away" from the idle time when it answers, the worker when it
//! publishes.

use std::time::Duration;

use inkwire_shared::config::{ConfigError, parse_duration};

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// Idle time (no client frame on any of the user's connections) after which a user is
    /// away. `INKWIRE_PRESENCE_AWAY_AFTER`, default 5 min.
    pub away_after: Duration,
    /// How long a relay instance may go without a report (its heartbeat) before its
    /// connections are swept. Keep it at least three relay heartbeats
    /// (`INKWIRE_RELAY_PRESENCE_HEARTBEAT`). `INKWIRE_PRESENCE_TTL`, default 30 s.
    pub ttl: Duration,
    /// How often the worker looks for lapsed instances and idle users.
    /// `INKWIRE_PRESENCE_TICK`, default 1 s.
    pub tick: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            away_after: Duration::from_secs(300),
            ttl: Duration::from_secs(30),
            tick: Duration::from_secs(1),
        }
    }
}

fn duration(
    name: &'static str,
    min: Duration,
    max: Duration,
) -> Result<Option<Duration>, ConfigError> {
    let Ok(v) = std::env::var(name) else {
        return Ok(None);
    };
    parse_duration(&v)
        .and_then(|d| {
            if (min..=max).contains(&d) {
                Ok(Some(d))
            } else {
                Err(format!("{v:?} is not between {min:?} and {max:?}"))
            }
        })
        .map_err(|problem| ConfigError { name, problem })
}

impl PresenceConfig {
    pub fn from_env() -> Result<PresenceConfig, ConfigError> {
        let mut c = PresenceConfig::default();
        let day = Duration::from_secs(86_400);
        if let Some(d) = duration(
            "INKWIRE_PRESENCE_AWAY_AFTER",
            Duration::from_millis(100),
            day,
        )? {
            c.away_after = d;
        }
        if let Some(d) = duration("INKWIRE_PRESENCE_TTL", Duration::from_millis(100), day)? {
            c.ttl = d;
        }
        if let Some(d) = duration(
            "INKWIRE_PRESENCE_TICK",
            Duration::from_millis(20),
            Duration::from_secs(60),
        )? {
            c.tick = d;
        }
        Ok(c)
    }

    pub fn away_after_ms(&self) -> u64 {
        self.away_after.as_millis() as u64
    }
}
