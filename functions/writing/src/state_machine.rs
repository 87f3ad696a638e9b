//! The writing-session state machine and its thresholds.
//!
//! ```text
//!   idle ──input──► warming_up ──(active ≥ warmup)──► active_writing ◄──► flow_state
//!                        │                                 │                 │
//!                        └──────── no input for pause_after ┴─────────────────┘
//!                                               ▼
//!                         paused ──(paused ≥ break_after)──► break
//!                 input/resume: paused → active_writing, break → warming_up
//!     end (user), expiry (ttl), or break ≥ end_after_break ──► ended (from any state)
//! ```
//!
//! Every transition is checked here: [`allowed`] is the single list of legal moves, and the
//! session logic never sets a state without asking it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Idle,
    WarmingUp,
    ActiveWriting,
    FlowState,
    Paused,
    Break,
    Ended,
}

impl SessionState {
    pub const ALL: [SessionState; 7] = [
        SessionState::Idle,
        SessionState::WarmingUp,
        SessionState::ActiveWriting,
        SessionState::FlowState,
        SessionState::Paused,
        SessionState::Break,
        SessionState::Ended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Idle => "idle",
            SessionState::WarmingUp => "warming_up",
            SessionState::ActiveWriting => "active_writing",
            SessionState::FlowState => "flow_state",
            SessionState::Paused => "paused",
            SessionState::Break => "break",
            SessionState::Ended => "ended",
        }
    }

    pub fn parse(s: &str) -> Option<SessionState> {
        SessionState::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// States in which the writer is producing text.
    pub fn is_writing(self) -> bool {
        matches!(
            self,
            SessionState::WarmingUp | SessionState::ActiveWriting | SessionState::FlowState
        )
    }
}

/// The legal transitions.
pub fn allowed(from: SessionState, to: SessionState) -> bool {
    use SessionState::*;
    if from == to {
        return false;
    }
    match (from, to) {
        (Ended, _) => false,
        (_, Ended) => true,
        (Idle, WarmingUp) => true,
        (WarmingUp, ActiveWriting) => true,
        (ActiveWriting, FlowState) | (FlowState, ActiveWriting) => true,
        (WarmingUp | ActiveWriting | FlowState | Idle, Paused) => true,
        (Paused, Break) => true,
        (Paused, ActiveWriting) | (Paused, WarmingUp) => true,
        (Break, WarmingUp) => true,
        _ => false,
    }
}

/// Thresholds of the tracker (SPEC §3); every one is configurable.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerConfig {
    /// No input for this long: the writer has paused.
    pub pause_after: Duration,
    /// Paused this long: it is a break.
    pub break_after: Duration,
    /// A break this long ends the session.
    pub end_after_break: Duration,
    /// Sessions end (expire) this long after they started.
    pub session_ttl: Duration,
    /// Active writing time before warming up is over.
    pub warmup: Duration,
    /// A gap between inputs at least this long separates bursts.
    pub burst_gap: Duration,
    /// How long the flow conditions must hold before flow is declared (about ten minutes).
    pub flow_window: Duration,
    /// Flow needs the 5-minute WPM at or above baseline × this.
    pub flow_min_ratio: f64,
    /// Flow ends when the 5-minute WPM drops below baseline × this.
    pub flow_exit_ratio: f64,
    /// Flow needs at most this share of deleted to added characters (revisions).
    pub flow_max_revision: f64,
    /// Baseline WPM of a writer without history (composition typing averages ~19 WPM).
    pub default_baseline_wpm: f64,
    /// Live metrics are pushed at most this often per session.
    pub live_interval: Duration,
    /// The tracker saves changed sessions at least this often (write-behind: messages are
    /// acknowledged after the save that covers them).
    pub flush_interval: Duration,
    /// An event time further than this from the time JetStream stored the event is replaced
    /// by the stored time (`INKWIRE_MAX_CLOCK_SKEW`, as on the events API).
    pub max_clock_skew: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            pause_after: Duration::from_secs(30),
            break_after: Duration::from_secs(5 * 60),
            end_after_break: Duration::from_secs(30 * 60),
            session_ttl: Duration::from_secs(24 * 3600),
            warmup: Duration::from_secs(60),
            burst_gap: Duration::from_secs(2),
            flow_window: Duration::from_secs(10 * 60),
            flow_min_ratio: 1.0,
            flow_exit_ratio: 0.8,
            flow_max_revision: 0.15,
            default_baseline_wpm: 19.0,
            live_interval: Duration::from_secs(1),
            flush_interval: Duration::from_millis(200),
            max_clock_skew: inkwire_shared::config::DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

impl TrackerConfig {
    /// Reads `INKWIRE_WRITING_*` overrides (durations like `30s`, `5m`; ratios as numbers).
    pub fn from_env() -> Result<TrackerConfig, inkwire_shared::config::ConfigError> {
        use inkwire_shared::config::{ConfigError, parse_duration};
        let mut c = TrackerConfig::default();
        let durations: [(&'static str, &mut Duration); 10] = [
            ("INKWIRE_WRITING_PAUSE_AFTER", &mut c.pause_after),
            ("INKWIRE_WRITING_BREAK_AFTER", &mut c.break_after),
            ("INKWIRE_WRITING_END_AFTER_BREAK", &mut c.end_after_break),
            ("INKWIRE_WRITING_SESSION_TTL", &mut c.session_ttl),
            ("INKWIRE_WRITING_WARMUP", &mut c.warmup),
            ("INKWIRE_WRITING_BURST_GAP", &mut c.burst_gap),
            ("INKWIRE_WRITING_FLOW_WINDOW", &mut c.flow_window),
            ("INKWIRE_WRITING_LIVE_INTERVAL", &mut c.live_interval),
            ("INKWIRE_WRITING_FLUSH_INTERVAL", &mut c.flush_interval),
            ("INKWIRE_MAX_CLOCK_SKEW", &mut c.max_clock_skew),
        ];
        for (name, slot) in durations {
            if let Ok(v) = std::env::var(name) {
                *slot = parse_duration(&v).map_err(|problem| ConfigError { name, problem })?;
            }
        }
        let ratios: [(&'static str, &mut f64); 4] = [
            ("INKWIRE_WRITING_FLOW_MIN_RATIO", &mut c.flow_min_ratio),
            ("INKWIRE_WRITING_FLOW_EXIT_RATIO", &mut c.flow_exit_ratio),
            (
                "INKWIRE_WRITING_FLOW_MAX_REVISION",
                &mut c.flow_max_revision,
            ),
            (
                "INKWIRE_WRITING_DEFAULT_BASELINE_WPM",
                &mut c.default_baseline_wpm,
            ),
        ];
        for (name, slot) in ratios {
            if let Ok(v) = std::env::var(name) {
                *slot = v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| ConfigError {
                        name,
                        problem: format!("{v:?} is not a non-negative number"),
                    })?;
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_leaves_ended_and_everything_can_end() {
        for s in SessionState::ALL {
            assert!(!allowed(SessionState::Ended, s));
            if s != SessionState::Ended {
                assert!(allowed(s, SessionState::Ended));
            }
            assert_eq!(SessionState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn flow_only_from_active_writing() {
        for s in SessionState::ALL {
            assert_eq!(
                allowed(s, SessionState::FlowState),
                s == SessionState::ActiveWriting
            );
        }
        assert!(
            !allowed(SessionState::Break, SessionState::ActiveWriting),
            "a break warms up again"
        );
    }
}
