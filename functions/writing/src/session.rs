//! A writing session's projection and the pure logic that advances it: keystroke batches,
//! requested and time-driven transitions, sliding-window WPM, bursts and flow detection.
//!
//! Everything here is a function of the session and one input (with the input's time), so
//! the live tracker and a replay of the stream compute the same state.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::state_machine::{SessionState, TrackerConfig, allowed};

/// Seconds of per-second history kept for the WPM and revision windows (5 minutes).
pub const WINDOW_SECS: u64 = 300;
/// Stream sequences remembered to recognise a redelivered message. The tracker flushes a
/// session before it has half this many unsaved messages, so every message a crash can
/// cause to be redelivered is still remembered.
pub const RECENT_SEQS: usize = 128;

/// Production in one second. Stored as a compact `[sec, words, added, deleted]` array: a
/// session keeps up to 300 of them and is saved on every batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "[u64; 4]", from = "[u64; 4]")]
pub struct Bucket {
    pub sec: u64,
    pub words: u32,
    pub added: u32,
    pub deleted: u32,
}

impl From<Bucket> for [u64; 4] {
    fn from(b: Bucket) -> [u64; 4] {
        [b.sec, b.words as u64, b.added as u64, b.deleted as u64]
    }
}

impl From<[u64; 4]> for Bucket {
    fn from(a: [u64; 4]) -> Bucket {
        let small = |x: u64| x.min(u32::MAX as u64) as u32;
        Bucket {
            sec: a[0],
            words: small(a[1]),
            added: small(a[2]),
            deleted: small(a[3]),
        }
    }
}

/// One keystroke batch as the tracker applies it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Batch {
    pub at_ms: u64,
    pub keys: u32,
    pub chars_added: u32,
    pub chars_deleted: u32,
    pub words_added: u32,
    pub words_deleted: u32,
    pub paragraph_boundary: bool,
    pub pasted: bool,
}

/// Why a state changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Input,
    User,
    Inactivity,
    Expired,
    Flow,
}

/// What applying an input produced: domain events to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Emitted {
    StateChanged {
        from: SessionState,
        to: SessionState,
        reason: Reason,
    },
    WordAdded {
        words: u32,
        total_words: u64,
    },
    ParagraphCompleted {
        index: u32,
        words: u64,
    },
    FlowEntered {
        wpm: f64,
        baseline_wpm: f64,
    },
    FlowExited {
        duration_ms: u64,
        words_in_flow: u64,
    },
    Ended {
        duration_ms: u64,
        words_added: u64,
        reason: Reason,
    },
}

impl Emitted {
    /// The writing event type and `data` for this emission.
    pub fn to_event(&self, session_id: &str) -> (&'static str, Value) {
        match self {
            Emitted::StateChanged { from, to, reason } => (
                "session_state_changed",
                json!({"sessionId": session_id, "from": from, "to": to, "reason": reason}),
            ),
            Emitted::WordAdded { words, total_words } => (
                "word_added",
                json!({"sessionId": session_id, "words": words, "totalWords": total_words}),
            ),
            Emitted::ParagraphCompleted { index, words } => (
                "paragraph_completed",
                json!({"sessionId": session_id, "paragraphIndex": index, "words": words}),
            ),
            Emitted::FlowEntered { wpm, baseline_wpm } => (
                "flow_state_entered",
                json!({"sessionId": session_id, "wpm": round2(*wpm), "baselineWpm": round2(*baseline_wpm)}),
            ),
            Emitted::FlowExited {
                duration_ms,
                words_in_flow,
            } => (
                "flow_state_exited",
                json!({"sessionId": session_id, "durationMs": duration_ms, "wordsInFlow": words_in_flow}),
            ),
            Emitted::Ended {
                duration_ms,
                words_added,
                reason,
            } => (
                "session_ended",
                json!({"sessionId": session_id, "durationMs": duration_ms, "wordsAdded": words_added,
                       "reason": match reason { Reason::Expired => "expired", Reason::Inactivity => "inactivity", _ => "user" }}),
            ),
        }
    }

    pub fn is_transition(&self) -> bool {
        !matches!(
            self,
            Emitted::WordAdded { .. } | Emitted::ParagraphCompleted { .. }
        )
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The projection of one session, stored as JSON in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    pub id: String,
    pub user_id: String,
    pub project_id: Option<String>,
    pub document_id: Option<String>,
    pub goal_words: Option<u32>,
    /// The writer's IANA time zone when the session started (for words per local day).
    #[serde(default)]
    pub time_zone: Option<String>,
    pub state: SessionState,
    pub started_ms: u64,
    pub state_since_ms: u64,
    pub last_input_ms: Option<u64>,
    pub first_input_ms: Option<u64>,
    pub paused_at_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub end_reason: Option<Reason>,
    pub words_added: u64,
    pub words_deleted: u64,
    pub chars_added: u64,
    pub chars_deleted: u64,
    pub keystrokes: u64,
    pub paragraphs: u32,
    pub words_since_paragraph: u64,
    pub pasted_words: u64,
    pub pasted_chars: u64,
    pub active_ms: u64,
    pub paused_ms: u64,
    pub bursts: u32,
    pub burst_words: u64,
    pub longest_burst_words: u64,
    pub buckets: Vec<Bucket>,
    pub flow_candidate_since_ms: Option<u64>,
    pub flow_entered_ms: Option<u64>,
    pub flow_words_at_entry: u64,
    pub flow_ms: u64,
    pub baseline_wpm: f64,
    pub last_seq: u64,
    pub recent_seqs: std::collections::VecDeque<u64>,
}

impl Session {
    pub fn new(
        id: &str,
        user_id: &str,
        project_id: Option<String>,
        document_id: Option<String>,
        goal_words: Option<u32>,
        at_ms: u64,
        baseline_wpm: f64,
    ) -> Session {
        Session {
            id: id.to_string(),
            user_id: user_id.to_string(),
            project_id,
            document_id,
            goal_words,
            time_zone: None,
            state: SessionState::Idle,
            started_ms: at_ms,
            state_since_ms: at_ms,
            last_input_ms: None,
            first_input_ms: None,
            paused_at_ms: None,
            ended_ms: None,
            end_reason: None,
            words_added: 0,
            words_deleted: 0,
            chars_added: 0,
            chars_deleted: 0,
            keystrokes: 0,
            paragraphs: 0,
            words_since_paragraph: 0,
            pasted_words: 0,
            pasted_chars: 0,
            active_ms: 0,
            paused_ms: 0,
            bursts: 0,
            burst_words: 0,
            longest_burst_words: 0,
            buckets: Vec::new(),
            flow_candidate_since_ms: None,
            flow_entered_ms: None,
            flow_words_at_entry: 0,
            flow_ms: 0,
            baseline_wpm,
            last_seq: 0,
            recent_seqs: std::collections::VecDeque::new(),
        }
    }

    /// Words written, never below zero however much was deleted.
    pub fn net_words(&self) -> u64 {
        self.words_added.saturating_sub(self.words_deleted)
    }

    /// Records `seq` as applied; false when it was applied before (a redelivery).
    pub fn first_time(&mut self, seq: u64) -> bool {
        if self.recent_seqs.contains(&seq) {
            return false;
        }
        self.recent_seqs.push_back(seq);
        if self.recent_seqs.len() > RECENT_SEQS {
            self.recent_seqs.pop_front();
        }
        self.last_seq = self.last_seq.max(seq);
        true
    }

    fn transition(&mut self, to: SessionState, reason: Reason, at_ms: u64, out: &mut Vec<Emitted>) {
        let from = self.state;
        debug_assert!(allowed(from, to), "illegal transition {from:?} → {to:?}");
        if !allowed(from, to) {
            return;
        }
        if from == SessionState::FlowState {
            let duration_ms = at_ms.saturating_sub(self.flow_entered_ms.unwrap_or(at_ms));
            self.flow_ms += duration_ms;
            out.push(Emitted::FlowExited {
                duration_ms,
                words_in_flow: self.net_words().saturating_sub(self.flow_words_at_entry),
            });
            self.flow_entered_ms = None;
        }
        // A break is still paused time: it is counted when the pause (or break) ends.
        if matches!(from, SessionState::Paused | SessionState::Break) && to != SessionState::Break {
            self.paused_ms += at_ms.saturating_sub(self.paused_at_ms.unwrap_or(at_ms));
            self.paused_at_ms = None;
        }
        if to == SessionState::Paused {
            self.paused_at_ms = Some(at_ms);
        }
        self.flow_candidate_since_ms = None;
        self.state = to;
        self.state_since_ms = at_ms;
        match to {
            SessionState::Ended => {
                self.ended_ms = Some(at_ms);
                self.end_reason = Some(reason);
                out.push(Emitted::Ended {
                    duration_ms: at_ms.saturating_sub(self.started_ms),
                    words_added: self.net_words(),
                    reason,
                });
            }
            SessionState::FlowState => {
                self.flow_entered_ms = Some(at_ms);
                self.flow_words_at_entry = self.net_words();
                out.push(Emitted::FlowEntered {
                    wpm: self.wpm(at_ms, 300),
                    baseline_wpm: self.baseline_wpm,
                });
            }
            _ => out.push(Emitted::StateChanged { from, to, reason }),
        }
    }

    /// Applies a keystroke batch.
    pub fn apply_batch(&mut self, b: Batch, cfg: &TrackerConfig) -> Vec<Emitted> {
        let mut out = Vec::new();
        if self.state == SessionState::Ended {
            return out;
        }
        let now = b.at_ms.max(self.state_since_ms);
        match self.state {
            SessionState::Idle => {
                self.transition(SessionState::WarmingUp, Reason::Input, now, &mut out)
            }
            SessionState::Paused => {
                let to = if self.active_ms >= cfg.warmup.as_millis() as u64 {
                    SessionState::ActiveWriting
                } else {
                    SessionState::WarmingUp
                };
                self.transition(to, Reason::Input, now, &mut out);
            }
            SessionState::Break => {
                self.transition(SessionState::WarmingUp, Reason::Input, now, &mut out)
            }
            _ => {}
        }
        let gap = self.last_input_ms.map(|t| now.saturating_sub(t));
        if let Some(g) = gap
            && g < cfg.pause_after.as_millis() as u64
        {
            self.active_ms += g;
        }
        if gap.is_none_or(|g| g >= cfg.burst_gap.as_millis() as u64) {
            self.bursts += 1;
            self.burst_words = 0;
        }
        self.keystrokes += b.keys as u64;
        if b.pasted {
            // Pasted or imported text is not writing: it is kept apart and moves no metric.
            self.pasted_words += b.words_added as u64;
            self.pasted_chars += b.chars_added as u64;
        } else {
            self.words_added += b.words_added as u64;
            self.words_deleted += b.words_deleted as u64;
            self.chars_added += b.chars_added as u64;
            self.chars_deleted += b.chars_deleted as u64;
            self.words_since_paragraph += b.words_added as u64;
            self.burst_words += b.words_added as u64;
            self.longest_burst_words = self.longest_burst_words.max(self.burst_words);
            self.add_bucket(now, b);
            if b.words_added > 0 {
                out.push(Emitted::WordAdded {
                    words: b.words_added,
                    total_words: self.net_words(),
                });
            }
        }
        if b.paragraph_boundary {
            out.push(Emitted::ParagraphCompleted {
                index: self.paragraphs,
                words: self.words_since_paragraph,
            });
            self.paragraphs += 1;
            self.words_since_paragraph = 0;
        }
        self.last_input_ms = Some(now);
        self.first_input_ms.get_or_insert(now);
        if self.state == SessionState::WarmingUp && self.active_ms >= cfg.warmup.as_millis() as u64
        {
            self.transition(SessionState::ActiveWriting, Reason::Input, now, &mut out);
        }
        self.evaluate_flow(now, cfg, &mut out);
        out
    }

    fn add_bucket(&mut self, now_ms: u64, b: Batch) {
        let sec = now_ms / 1000;
        match self.buckets.last_mut() {
            Some(last) if last.sec == sec => {
                last.words += b.words_added;
                last.added += b.chars_added;
                last.deleted += b.chars_deleted;
            }
            _ => self.buckets.push(Bucket {
                sec,
                words: b.words_added,
                added: b.chars_added,
                deleted: b.chars_deleted,
            }),
        }
        let horizon = sec.saturating_sub(WINDOW_SECS);
        if self.buckets.first().is_none_or(|x| x.sec > horizon) {
            return;
        }
        let keep_from = self
            .buckets
            .iter()
            .position(|x| x.sec > horizon)
            .unwrap_or(self.buckets.len());
        self.buckets.drain(..keep_from);
    }

    /// Words per minute over the last `secs` seconds (up to five minutes) before `now_ms`, or
    /// since the first input when the session is younger than that.
    pub fn wpm(&self, now_ms: u64, secs: u64) -> f64 {
        let now = now_ms / 1000;
        let written_for = self
            .first_input_ms
            .map_or(1, |f| now.saturating_sub(f / 1000) + 1);
        let secs = secs.clamp(1, WINDOW_SECS).min(written_for.max(1));
        let from = now.saturating_sub(secs);
        let words: u64 = self
            .buckets
            .iter()
            .filter(|b| b.sec > from && b.sec <= now)
            .map(|b| b.words as u64)
            .sum();
        words as f64 * 60.0 / secs as f64
    }

    /// Deleted / added characters over the last five minutes.
    pub fn revision_ratio(&self, now_ms: u64) -> f64 {
        let from = (now_ms / 1000).saturating_sub(WINDOW_SECS);
        let (added, deleted) = self
            .buckets
            .iter()
            .filter(|b| b.sec > from)
            .fold((0u64, 0u64), |(a, d), b| {
                (a + b.added as u64, d + b.deleted as u64)
            });
        if added == 0 {
            if deleted == 0 { 0.0 } else { 1.0 }
        } else {
            deleted as f64 / added as f64
        }
    }

    /// Flow (SPEC §3): sustained production at or above the writer's own baseline with few
    /// revisions, for about ten minutes without a pause.
    fn evaluate_flow(&mut self, now: u64, cfg: &TrackerConfig, out: &mut Vec<Emitted>) {
        let wpm = self.wpm(now, WINDOW_SECS);
        let revisions = self.revision_ratio(now);
        match self.state {
            SessionState::ActiveWriting => {
                let holds = wpm >= self.baseline_wpm * cfg.flow_min_ratio
                    && revisions <= cfg.flow_max_revision;
                if !holds {
                    self.flow_candidate_since_ms = None;
                    return;
                }
                let since = *self.flow_candidate_since_ms.get_or_insert(now);
                if now.saturating_sub(since) >= cfg.flow_window.as_millis() as u64 {
                    self.transition(SessionState::FlowState, Reason::Flow, now, out);
                }
            }
            SessionState::FlowState
                if wpm < self.baseline_wpm * cfg.flow_exit_ratio
                    || revisions > cfg.flow_max_revision =>
            {
                self.transition(SessionState::ActiveWriting, Reason::Flow, now, out);
            }
            _ => {}
        }
    }

    /// Applies a requested transition (`paused`, `active_writing` to resume, `ended`).
    /// Returns `None` when it does not apply to the current state.
    pub fn apply_request(
        &mut self,
        to: SessionState,
        reason: Reason,
        at_ms: u64,
        cfg: &TrackerConfig,
    ) -> Option<Vec<Emitted>> {
        let mut out = Vec::new();
        let at = at_ms.max(self.state_since_ms);
        let to = match (self.state, to) {
            // Resuming after a break means warming up again; after a short pause, not.
            (SessionState::Break, SessionState::ActiveWriting) => SessionState::WarmingUp,
            (SessionState::Paused, SessionState::ActiveWriting)
                if self.active_ms < cfg.warmup.as_millis() as u64 =>
            {
                SessionState::WarmingUp
            }
            (_, t) => t,
        };
        if !allowed(self.state, to) {
            return None;
        }
        if self.state.is_writing()
            && let Some(last) = self.last_input_ms
        {
            // Time written right up to the pause counts as active.
            self.active_ms += at
                .saturating_sub(last)
                .min(cfg.pause_after.as_millis() as u64);
            self.last_input_ms = Some(at);
        }
        self.transition(to, reason, at, &mut out);
        Some(out)
    }

    /// The time-driven transition due at `now_ms`, if any: what the scheduler asks for.
    pub fn due_transition(
        &self,
        now_ms: u64,
        cfg: &TrackerConfig,
    ) -> Option<(SessionState, Reason, u64)> {
        let (at, to, reason) = self.next_due(cfg)?;
        (at <= now_ms).then_some((to, reason, at))
    }

    /// When the next time-driven transition falls due, and what it is.
    pub fn next_due(&self, cfg: &TrackerConfig) -> Option<(u64, SessionState, Reason)> {
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        let expiry = (
            self.started_ms + ms(cfg.session_ttl),
            SessionState::Ended,
            Reason::Expired,
        );
        let step = match self.state {
            SessionState::Ended => return None,
            SessionState::Idle => None,
            s if s.is_writing() => self.last_input_ms.map(|t| {
                (
                    t + ms(cfg.pause_after),
                    SessionState::Paused,
                    Reason::Inactivity,
                )
            }),
            SessionState::Paused => self.paused_at_ms.map(|t| {
                (
                    t + ms(cfg.break_after),
                    SessionState::Break,
                    Reason::Inactivity,
                )
            }),
            SessionState::Break => Some((
                self.state_since_ms + ms(cfg.end_after_break),
                SessionState::Ended,
                Reason::Inactivity,
            )),
            _ => None,
        };
        Some(match step {
            Some(s) if s.0 < expiry.0 => s,
            _ => expiry,
        })
    }

    /// The live metrics shown to clients.
    pub fn metrics(&self, now_ms: u64) -> Value {
        let end = self.ended_ms.unwrap_or(now_ms);
        let paused_now = match (self.state, self.paused_at_ms) {
            (SessionState::Paused | SessionState::Break, Some(p)) => end.saturating_sub(p),
            _ => 0,
        };
        let flow_now = match (self.state, self.flow_entered_ms) {
            (SessionState::FlowState, Some(f)) => end.saturating_sub(f),
            _ => 0,
        };
        let active_min = self.active_ms as f64 / 60_000.0;
        json!({
            "sessionId": self.id,
            "userId": self.user_id,
            "projectId": self.project_id,
            "documentId": self.document_id,
            "state": self.state,
            "stateSince": self.state_since_ms,
            "startedAt": self.started_ms,
            "endedAt": self.ended_ms,
            "endReason": self.end_reason,
            "durationMs": end.saturating_sub(self.started_ms),
            "activeMs": self.active_ms,
            "pausedMs": self.paused_ms + paused_now,
            "flowMs": self.flow_ms + flow_now,
            "wpm1m": round2(self.wpm(end, 60)),
            "wpm5m": round2(self.wpm(end, WINDOW_SECS)),
            "averageWpm": if active_min > 0.0 { round2(self.net_words() as f64 / active_min) } else { 0.0 },
            "baselineWpm": round2(self.baseline_wpm),
            "words": self.net_words(),
            "wordsAdded": self.words_added,
            "wordsDeleted": self.words_deleted,
            "charsAdded": self.chars_added,
            "charsDeleted": self.chars_deleted,
            "keystrokes": self.keystrokes,
            "pastedWords": self.pasted_words,
            "pastedChars": self.pasted_chars,
            "paragraphs": self.paragraphs,
            "bursts": self.bursts,
            "longestBurstWords": self.longest_burst_words,
            "revisionRatio": round2(self.revision_ratio(end)),
            "goalWords": self.goal_words,
            "goalProgress": self.goal_words.map(|g| round2((self.net_words() as f64 / g as f64).min(1.0))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> TrackerConfig {
        TrackerConfig::default()
    }

    fn batch(at_ms: u64, words: u32) -> Batch {
        Batch {
            at_ms,
            keys: words * 6,
            chars_added: words * 6,
            chars_deleted: 0,
            words_added: words,
            ..Default::default()
        }
    }

    fn session() -> Session {
        Session::new("s", "u", Some("p".into()), None, Some(500), 0, 19.0)
    }

    #[test]
    fn wpm_on_a_scripted_session() {
        let mut s = session();
        // 30 words per minute: one word every 2 s for five minutes.
        for i in 0..150u64 {
            s.apply_batch(batch(i * 2000, 1), &cfg());
        }
        let now = 149 * 2000;
        assert!((s.wpm(now, 60) - 30.0).abs() < 1.01, "{}", s.wpm(now, 60));
        assert!((s.wpm(now, 300) - 30.0).abs() < 0.5, "{}", s.wpm(now, 300));
        assert_eq!(s.words_added, 150);
        assert_eq!(s.active_ms, 149 * 2000);
        assert_eq!(s.bursts, 150, "a 2 s gap starts a new burst");
    }

    #[test]
    fn deletions_never_make_words_negative_and_paste_does_not_count() {
        let mut s = session();
        s.apply_batch(
            Batch {
                at_ms: 0,
                words_added: 3,
                chars_added: 18,
                ..Default::default()
            },
            &cfg(),
        );
        s.apply_batch(
            Batch {
                at_ms: 500,
                words_deleted: 10,
                chars_deleted: 60,
                ..Default::default()
            },
            &cfg(),
        );
        assert_eq!(s.net_words(), 0);
        let out = s.apply_batch(
            Batch {
                at_ms: 900,
                words_added: 400,
                chars_added: 2400,
                pasted: true,
                ..Default::default()
            },
            &cfg(),
        );
        assert_eq!(s.net_words(), 0);
        assert_eq!(s.pasted_words, 400);
        assert!(out.iter().all(|e| !matches!(e, Emitted::WordAdded { .. })));
    }

    #[test]
    fn warms_up_then_flows_then_pauses_breaks_and_ends() {
        let c = cfg();
        let mut s = session();
        let mut events = Vec::new();
        // 30 WPM with few revisions for 12 minutes: above the 19 WPM baseline.
        for i in 0..360u64 {
            events.extend(s.apply_batch(batch(i * 2000, 1), &c));
        }
        let states: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Emitted::StateChanged { to, .. } => Some(*to),
                Emitted::FlowEntered { .. } => Some(SessionState::FlowState),
                _ => None,
            })
            .collect();
        assert_eq!(
            states,
            vec![
                SessionState::WarmingUp,
                SessionState::ActiveWriting,
                SessionState::FlowState
            ]
        );
        assert_eq!(s.state, SessionState::FlowState);
        // Flow needs about ten minutes of sustained conditions after warming up.
        let entered = s.flow_entered_ms.unwrap();
        assert!(
            entered >= c.warmup.as_millis() as u64 + c.flow_window.as_millis() as u64 - 2000,
            "{entered}"
        );

        // Silence: pause after 30 s, break after 5 min more, end after 30 min more.
        let last = s.last_input_ms.unwrap();
        let (to, reason, at) = s.due_transition(last + 31_000, &c).unwrap();
        assert_eq!(
            (to, reason, at),
            (SessionState::Paused, Reason::Inactivity, last + 30_000)
        );
        let out = s.apply_request(to, reason, at, &c).unwrap();
        assert!(matches!(out[0], Emitted::FlowExited { .. }));
        assert_eq!(s.state, SessionState::Paused);
        assert!(s.due_transition(at + 60_000, &c).is_none());
        let (to, reason, at2) = s.due_transition(at + 301_000, &c).unwrap();
        assert_eq!((to, reason), (SessionState::Break, Reason::Inactivity));
        s.apply_request(to, reason, at2, &c).unwrap();
        let (to, reason, at3) = s.due_transition(at2 + 31 * 60_000, &c).unwrap();
        assert_eq!(to, SessionState::Ended);
        let out = s.apply_request(to, reason, at3, &c).unwrap();
        assert!(matches!(
            out[0],
            Emitted::Ended {
                reason: Reason::Inactivity,
                ..
            }
        ));
        assert_eq!(s.paused_ms, at3 - at);
        assert!(s.next_due(&c).is_none());
        // Nothing moves an ended session.
        assert!(s.apply_batch(batch(at3 + 1000, 5), &c).is_empty());
        assert!(
            s.apply_request(SessionState::Paused, Reason::User, at3 + 2000, &c)
                .is_none()
        );
    }

    #[test]
    fn heavy_revision_prevents_flow() {
        let c = cfg();
        let mut s = session();
        for i in 0..400u64 {
            s.apply_batch(
                Batch {
                    at_ms: i * 2000,
                    words_added: 1,
                    chars_added: 6,
                    chars_deleted: 3,
                    keys: 9,
                    ..Default::default()
                },
                &c,
            );
        }
        assert_eq!(s.state, SessionState::ActiveWriting);
    }

    #[test]
    fn sessions_expire() {
        let c = TrackerConfig {
            session_ttl: Duration::from_secs(3600),
            ..cfg()
        };
        let s = session();
        assert_eq!(
            s.next_due(&c),
            Some((3_600_000, SessionState::Ended, Reason::Expired))
        );
    }

    /// Random inputs never produce an illegal transition, and the counters stay consistent.
    #[test]
    fn random_sessions_only_make_legal_moves() {
        let c = TrackerConfig {
            warmup: Duration::from_secs(5),
            flow_window: Duration::from_secs(20),
            ..cfg()
        };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut s = session();
            let mut now = 0u64;
            let mut state = s.state;
            for _ in 0..300 {
                now += next() % 40_000;
                let events = match next() % 10 {
                    0 => s
                        .apply_request(SessionState::Paused, Reason::User, now, &c)
                        .unwrap_or_default(),
                    1 => s
                        .apply_request(SessionState::ActiveWriting, Reason::User, now, &c)
                        .unwrap_or_default(),
                    2 => match s.due_transition(now, &c) {
                        Some((to, reason, at)) => {
                            s.apply_request(to, reason, at, &c).unwrap_or_default()
                        }
                        None => vec![],
                    },
                    3 if next() % 20 == 0 => s
                        .apply_request(SessionState::Ended, Reason::User, now, &c)
                        .unwrap_or_default(),
                    _ => s.apply_batch(
                        Batch {
                            at_ms: now,
                            words_added: (next() % 8) as u32,
                            words_deleted: (next() % 3) as u32,
                            chars_added: (next() % 40) as u32,
                            chars_deleted: (next() % 10) as u32,
                            keys: 10,
                            paragraph_boundary: next() % 15 == 0,
                            pasted: next() % 25 == 0,
                        },
                        &c,
                    ),
                };
                for e in &events {
                    let to = match e {
                        Emitted::StateChanged { from, to, .. } => {
                            assert_eq!(*from, state);
                            *to
                        }
                        Emitted::FlowEntered { .. } => SessionState::FlowState,
                        Emitted::FlowExited { .. } => continue,
                        Emitted::Ended { .. } => SessionState::Ended,
                        _ => continue,
                    };
                    assert!(allowed(state, to), "{state:?} → {to:?}");
                    state = to;
                }
                assert_eq!(state, s.state);
                assert!(s.net_words() <= s.words_added);
                assert!(s.active_ms <= now.saturating_sub(s.started_ms) + 1);
            }
        }
    }
}
