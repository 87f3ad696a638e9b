//! The vocabulary every part of notifications shares: priorities, delivery channels, digest
//! frequencies and delivery statuses, spelled once with their wire names.

use serde::{Deserialize, Serialize};

/// How urgent a notification is; decides its default channels and whether quiet hours and
/// auto-mute apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Critical,
    High,
    Medium,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 4] = [
        Priority::Critical,
        Priority::High,
        Priority::Medium,
        Priority::Low,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Where a notification can be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryChannel {
    /// The inbox, pushed live to `user:{id}` through the relay.
    InApp,
    Email,
    Sms,
    Push,
}

impl DeliveryChannel {
    pub const ALL: [DeliveryChannel; 4] = [
        DeliveryChannel::InApp,
        DeliveryChannel::Email,
        DeliveryChannel::Sms,
        DeliveryChannel::Push,
    ];
    /// The channels that leave inkwire (held in quiet hours, muted, retried).
    pub const EXTERNAL: [DeliveryChannel; 3] = [
        DeliveryChannel::Email,
        DeliveryChannel::Sms,
        DeliveryChannel::Push,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryChannel::InApp => "in_app",
            DeliveryChannel::Email => "email",
            DeliveryChannel::Sms => "sms",
            DeliveryChannel::Push => "push",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryChannel> {
        DeliveryChannel::ALL.into_iter().find(|c| c.as_str() == s)
    }

    pub fn is_external(self) -> bool {
        self != DeliveryChannel::InApp
    }
}

/// How often a category's digest goes out (in the user's time zone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DigestFrequency {
    Off,
    Hourly,
    Daily,
    Weekly,
}

impl DigestFrequency {
    pub fn as_str(self) -> &'static str {
        match self {
            DigestFrequency::Off => "off",
            DigestFrequency::Hourly => "hourly",
            DigestFrequency::Daily => "daily",
            DigestFrequency::Weekly => "weekly",
        }
    }
}

/// Where one channel of one notification stands, as the delivery log shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// A delivery job exists and will be attempted.
    Queued,
    /// Waiting for the recipient's quiet hours to end.
    HeldQuietHours,
    /// Will go out in the recipient's next digest for this key.
    Digested,
    /// Similar to one sent within the mute window: not sent (counted in the next one).
    Muted,
    /// The recipient turned this category off on this channel.
    SkippedPreference,
    /// No contact point (email, phone, device) or no provider configured for the channel.
    SkippedNoAddress,
    Sent,
    /// Gave up: a permanent provider error, or retries exhausted.
    Failed,
    /// A scheduled send cancelled before it was due.
    Cancelled,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "queued",
            DeliveryStatus::HeldQuietHours => "held_quiet_hours",
            DeliveryStatus::Digested => "digested",
            DeliveryStatus::Muted => "muted",
            DeliveryStatus::SkippedPreference => "skipped_preference",
            DeliveryStatus::SkippedNoAddress => "skipped_no_address",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more will happen to this delivery.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            DeliveryStatus::Muted
                | DeliveryStatus::SkippedPreference
                | DeliveryStatus::SkippedNoAddress
                | DeliveryStatus::Sent
                | DeliveryStatus::Failed
                | DeliveryStatus::Cancelled
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()), Some(p));
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        for c in DeliveryChannel::ALL {
            assert_eq!(DeliveryChannel::parse(c.as_str()), Some(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert_eq!(Priority::parse("urgent"), None);
        assert_eq!(
            serde_json::to_value(DeliveryStatus::HeldQuietHours).unwrap(),
            "held_quiet_hours"
        );
    }
}
