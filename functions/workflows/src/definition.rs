//! The types of a workflow definition, as stored and as sent over the API (camelCase JSON).
//!
//! These types say what a *valid* definition holds; they are built by
//! [`parse_definition`](crate::validate::parse_definition), which checks the JSON first and
//! reports every problem with its JSON pointer. Deserializing them directly with serde fills in
//! the defaults but checks none of the rules (limits, dependencies, templates), so the engine
//! and the API must go through `parse_definition`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// One version of a workflow. A run keeps the version it started with, so a definition is
/// immutable once registered: changing it means registering `version + 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Definition {
    pub id: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub project_id: String,
    pub triggers: Vec<Trigger>,
    pub steps: Vec<Step>,
}

/// What starts a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub enum Trigger {
    /// An event of the catalogue (`category` / `eventType`, e.g. `writing` / `word_added`);
    /// all `filter` conditions must hold.
    Event {
        category: String,
        event_type: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        filter: Vec<FilterCondition>,
    },
    /// A cron schedule read in an IANA time zone (see [`crate::cron`] for DST behaviour).
    Cron {
        schedule: String,
        #[serde(default = "utc")]
        time_zone: String,
    },
    /// `POST /api/workflows/{id}/execute` only.
    Manual,
}

fn utc() -> String {
    "UTC".into()
}

/// One condition of an event filter: the value at `path` of the event envelope (`data.words`,
/// `projectId`, ...) compared with `value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterCondition {
    pub path: String,
    pub op: FilterOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterOp {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    Exists,
}

/// One node of the DAG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub id: String,
    pub action: Action,
    /// Any JSON; string leaves are minijinja templates rendered just before the step runs.
    #[serde(default = "empty_object")]
    pub input: Value,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "default_timeout")]
    pub timeout: Duration,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Compensation>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn default_timeout() -> Duration {
    Duration::from_millis(30_000)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Http,
    Redis,
    Email,
    Sms,
    Notification,
    Ai,
    File,
    Delay,
    Condition,
    Loop,
}

impl Action {
    /// Every action, in this order: the seven with effects, `delay`, then the two that only
    /// steer the run (validation takes slices of it).
    pub const ALL: [Action; 10] = [
        Action::Http,
        Action::Redis,
        Action::Email,
        Action::Sms,
        Action::Notification,
        Action::Ai,
        Action::File,
        Action::Delay,
        Action::Condition,
        Action::Loop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Http => "http",
            Action::Redis => "redis",
            Action::Email => "email",
            Action::Sms => "sms",
            Action::Notification => "notification",
            Action::Ai => "ai",
            Action::File => "file",
            Action::Delay => "delay",
            Action::Condition => "condition",
            Action::Loop => "loop",
        }
    }

    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// What a step's final failure (retries exhausted or non-retryable) does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// The run fails; steps not started are skipped.
    #[default]
    Fail,
    /// Dependants run anyway, with the error in `steps.<id>.error`.
    Continue,
    /// Once the attempts of `retry` are spent, the engine reruns the run from this step,
    /// keeping the outputs of the steps that completed (the rerun of the API, started by the
    /// engine instead of an operator); when and how often is the engine's policy.
    Retry,
    /// The compensations of the completed steps run in reverse completion order, then the run
    /// fails.
    Rollback,
}

/// Retries with exponential backoff: attempt `n` (from 1) waits
/// `min(initialInterval * backoffCoefficient^(n-1), maxInterval)`, less up to half of it when
/// `jitter` is on (so that many runs failing together do not retry in lockstep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_interval: Duration,
    pub backoff_coefficient: f64,
    pub max_interval: Duration,
    pub jitter: bool,
    /// Error codes (or messages) that end the step at once, without further attempts.
    pub non_retryable: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_interval: Duration::from_millis(1_000),
            backoff_coefficient: 2.0,
            max_interval: Duration::from_millis(5 * 60_000),
            jitter: true,
            non_retryable: Vec::new(),
        }
    }
}

/// The action run for a completed step when its run rolls back (an undo: delete the uploaded
/// file, send the correction). Its input may read the step's own output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compensation {
    pub action: Action,
    #[serde(default = "empty_object")]
    pub input: Value,
}

/// A duration written as an integer and one unit: `500ms`, `30s`, `5m`, `2h`, `1d`. One unit
/// only (no `1h30m`): definitions are written by hand and read by people, and `90m` says the
/// same. Serialized back in the largest unit that divides it exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Duration {
    pub const fn from_millis(ms: u64) -> Duration {
        Duration(std::time::Duration::from_millis(ms))
    }

    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Parses `<digits><unit>` with unit `ms`, `s`, `m`, `h` or `d`; no sign, no spaces, no
/// fraction. Zero is accepted here; callers check their own bounds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let bad = || {
        format!(
            "`{text}` is not a duration: write a whole number and a unit (ms, s, m, h, d), e.g. \"500ms\", \"30s\", \"5m\""
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let (_, scale) = UNITS.iter().find(|(u, _)| *u == unit).ok_or_else(bad)?;
    n.checked_mul(*scale)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long a duration"))
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.as_millis();
        let (unit, scale) = UNITS
            .iter()
            .find(|(_, s)| ms.is_multiple_of(*s) && ms > 0)
            .unwrap_or(&("s", 1_000));
        write!(f, "{}{unit}", ms / scale)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// 1–64 letters, digits, `_` or `-`: the same identifiers as the rest of inkwire, safe in NATS
/// subjects, Redis keys and URLs.
pub fn is_identifier(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        for (text, ms) in [("500ms", 500), ("1s", 1_000), ("5m", 300_000)] {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)));
        }
        assert_eq!(parse_duration("2h").map(Duration::as_millis), Ok(7_200_000));
        assert_eq!(
            parse_duration("1d").map(Duration::as_millis),
            Ok(86_400_000)
        );
        for bad in ["", "1", "s", "1.5s", "-1s", "1 s", "1w", "1h30m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(Duration::from_millis(90_000).to_string(), "90s");
        assert_eq!(Duration::from_millis(7_200_000).to_string(), "2h");
        assert_eq!(Duration::from_millis(1_500).to_string(), "1500ms");
        assert_eq!(Duration::from_millis(0).to_string(), "0s");
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("a-b_C9"));
        assert!(!is_identifier(""));
        assert!(!is_identifier("a.b"));
        assert!(!is_identifier(&"x".repeat(65)));
    }
}
