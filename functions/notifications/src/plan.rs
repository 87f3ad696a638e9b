//! The decision, per recipient and channel, of what happens to one notification: delivered
//! now, held for quiet hours, put in a digest, muted, or skipped (and why). Pure: the caller
//! reads the recipient's preferences, devices and mute state from Redis and acts on the plan.
//!
//! Every channel the notification is routed to appears in the plan once, so the delivery log
//! has a status for each; channels outside the routing (after intersecting with the send's
//! `channels`) do not appear. The order of the checks (the contract):
//! 1. preferences: the category × channel switch off → `SkipPreference` (critical ignores
//!    the switches);
//! 2. routing: which channels at all ([`RoutingTable`]), intersected with the send's
//!    `channels` (in_app always kept);
//! 3. in_app is then always `Deliver`: stored and pushed at once, even in quiet hours (an
//!    inbox item makes no sound);
//! 4. an external channel without a configured provider, or without the recipient's contact
//!    point (email address, phone number, a push device) → `SkipNoAddress` with the reason.
//!    The provider is checked first: it is the operator's to fix, for every recipient;
//! 5. critical → `Deliver`: it bypasses digests, mute and quiet hours;
//! 6. digest: email routed `@digest`, or any email of a category whose digest is on →
//!    `Digest` at the next due time of the category's digest (a daily 08:00 local one when it
//!    is off). A due time inside quiet hours moves to the end of that quiet window; the
//!    window start (and so the digest's job id) stays that of the schedule;
//! 7. auto-mute: the caller found a similar notification sent within the recipient's mute
//!    window (`recently_sent_similar`; a window of 0 disables muting) → `Mute`;
//! 8. quiet hours now → `Hold{until}` the window's end;
//! 9. otherwise `Deliver`.

use jiff::Timestamp;

use crate::digest_schedule::{next_due, window_start};
use crate::model::{DeliveryChannel, DeliveryStatus, Priority};
use crate::preferences::{DEFAULT_DAILY_AT, DigestSetting, Preferences};
use crate::quiet_hours::opens_at;
use crate::routing::{Route, RoutingTable, digest_key};

/// Which external providers this deployment has configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Providers {
    pub email: bool,
    pub sms: bool,
    pub push: bool,
}

impl Providers {
    pub const ALL: Providers = Providers {
        email: true,
        sms: true,
        push: true,
    };
    pub const NONE: Providers = Providers {
        email: false,
        sms: false,
        push: false,
    };

    pub fn configured(&self, channel: DeliveryChannel) -> bool {
        match channel {
            DeliveryChannel::InApp => true,
            DeliveryChannel::Email => self.email,
            DeliveryChannel::Sms => self.sms,
            DeliveryChannel::Push => self.push,
        }
    }
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    pub priority: Priority,
    pub category: &'a str,
    /// The send's `channels`, when it named some.
    pub channels: Option<&'a [DeliveryChannel]>,
    pub group_key: Option<&'a str>,
    pub preferences: &'a Preferences,
    /// Whether the recipient has at least one push device.
    pub has_devices: bool,
    pub providers: Providers,
    pub now: Timestamp,
    /// A similar notification (same similarity key) went out within the mute window.
    pub recently_sent_similar: bool,
    pub routing: &'a RoutingTable,
}

/// Why an external channel cannot be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAddress {
    /// No provider is configured for this channel.
    NoProvider,
    NoEmail,
    NoPhone,
    NoDevice,
}

impl NoAddress {
    /// The reason as the delivery log shows it.
    pub fn message(self, channel: DeliveryChannel) -> String {
        match self {
            NoAddress::NoProvider => format!("no {} provider is configured", channel.as_str()),
            NoAddress::NoEmail => "the recipient has no email address".into(),
            NoAddress::NoPhone => "the recipient has no phone number".into(),
            NoAddress::NoDevice => "the recipient has no push device".into(),
        }
    }
}

/// What happens to one channel of one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Queued now (in_app: stored and pushed now).
    Deliver,
    /// Quiet hours: released at `until`.
    Hold {
        until: Timestamp,
    },
    /// In the digest `key` delivered at `due`, covering items since `window_start`.
    Digest {
        key: String,
        due: Timestamp,
        window_start: Timestamp,
    },
    /// Similar to one sent within the mute window: not sent.
    Mute,
    /// The recipient switched this channel off for the category.
    SkipPreference,
    SkipNoAddress {
        reason: NoAddress,
    },
}

impl Decision {
    /// The delivery-log status this decision starts with.
    pub fn status(&self) -> DeliveryStatus {
        match self {
            Decision::Deliver => DeliveryStatus::Queued,
            Decision::Hold { .. } => DeliveryStatus::HeldQuietHours,
            Decision::Digest { .. } => DeliveryStatus::Digested,
            Decision::Mute => DeliveryStatus::Muted,
            Decision::SkipPreference => DeliveryStatus::SkippedPreference,
            Decision::SkipNoAddress { .. } => DeliveryStatus::SkippedNoAddress,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    pub channel: DeliveryChannel,
    pub decision: Decision,
}

/// The decision for every routed channel, in `DeliveryChannel::ALL` order (module doc).
pub fn plan(input: &PlanInput<'_>) -> Vec<ChannelPlan> {
    let routed = input.routing.channels(input.priority);
    let mut out: Vec<ChannelPlan> = Vec::with_capacity(routed.len() + 1);
    for (channel, route) in routed {
        let requested = match input.channels {
            None => true,
            Some(requested) => channel == DeliveryChannel::InApp || requested.contains(&channel),
        };
        if requested {
            out.push(ChannelPlan {
                channel,
                decision: decide(input, channel, route),
            });
        }
    }
    // The routing table always has in_app (parse refuses a row without it); kept here too so
    // that an inbox item is never lost to a hand-built table.
    if !out.iter().any(|p| p.channel == DeliveryChannel::InApp) {
        out.insert(
            0,
            ChannelPlan {
                channel: DeliveryChannel::InApp,
                decision: decide(input, DeliveryChannel::InApp, Route::Direct),
            },
        );
    }
    out
}

fn decide(input: &PlanInput<'_>, channel: DeliveryChannel, route: Route) -> Decision {
    let prefs = input.preferences;
    let critical = input.priority == Priority::Critical;
    if !critical && !prefs.channel_enabled(input.category, channel) {
        return Decision::SkipPreference;
    }
    if channel == DeliveryChannel::InApp {
        return Decision::Deliver;
    }
    if let Some(reason) = missing_address(input, channel) {
        return Decision::SkipNoAddress { reason };
    }
    if critical {
        return Decision::Deliver;
    }
    let tz = prefs.time_zone();
    let category_digest = prefs.digest_for(input.category);
    if channel == DeliveryChannel::Email && (route == Route::Digest || category_digest.is_on()) {
        let setting = if category_digest.is_on() {
            category_digest
        } else {
            DigestSetting::daily(DEFAULT_DAILY_AT)
        };
        let scheduled = next_due(input.now, &setting, &tz);
        return Decision::Digest {
            key: digest_key(input.category, input.group_key),
            due: opens_at(scheduled, &prefs.quiet_hours, &tz).unwrap_or(scheduled),
            window_start: window_start(scheduled, &setting, &tz),
        };
    }
    if input.recently_sent_similar && prefs.mute_window_seconds > 0 {
        return Decision::Mute;
    }
    match opens_at(input.now, &prefs.quiet_hours, &tz) {
        Some(until) => Decision::Hold { until },
        None => Decision::Deliver,
    }
}

fn missing_address(input: &PlanInput<'_>, channel: DeliveryChannel) -> Option<NoAddress> {
    if !input.providers.configured(channel) {
        return Some(NoAddress::NoProvider);
    }
    let contacts = &input.preferences.contacts;
    match channel {
        DeliveryChannel::InApp => None,
        DeliveryChannel::Email => contacts.email.is_none().then_some(NoAddress::NoEmail),
        DeliveryChannel::Sms => contacts.phone.is_none().then_some(NoAddress::NoPhone),
        DeliveryChannel::Push => (!input.has_devices).then_some(NoAddress::NoDevice),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preferences::{CategoryPreferences, Contacts, QuietHours, ZoneName};
    use DeliveryChannel::*;
    use jiff::civil::{Weekday, time};
    use proptest::prelude::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// A recipient in London with every contact point, quiet hours 22:00–08:00.
    fn prefs() -> Preferences {
        Preferences {
            time_zone: ZoneName::parse("Europe/London").unwrap(),
            contacts: Contacts {
                email: Some("ada@example.com".into()),
                phone: Some("+447700900123".into()),
            },
            ..Preferences::default()
        }
    }

    /// 2026-06-01 12:00 BST: outside the default quiet hours.
    const NOON: &str = "2026-06-01T11:00:00Z";
    /// 2026-06-01 23:00 BST: inside them (they end 2026-06-02 08:00 BST = 07:00Z).
    const NIGHT: &str = "2026-06-01T22:00:00Z";

    struct Case {
        priority: Priority,
        category: &'static str,
        channels: Option<Vec<DeliveryChannel>>,
        group_key: Option<&'static str>,
        prefs: Preferences,
        has_devices: bool,
        providers: Providers,
        now: Timestamp,
        similar: bool,
        routing: RoutingTable,
    }

    impl Case {
        fn new(priority: Priority) -> Case {
            Case {
                priority,
                category: "collaboration",
                channels: None,
                group_key: None,
                prefs: prefs(),
                has_devices: true,
                providers: Providers::ALL,
                now: ts(NOON),
                similar: false,
                routing: RoutingTable::default(),
            }
        }

        fn run(&self) -> Vec<(DeliveryChannel, Decision)> {
            plan(&PlanInput {
                priority: self.priority,
                category: self.category,
                channels: self.channels.as_deref(),
                group_key: self.group_key,
                preferences: &self.prefs,
                has_devices: self.has_devices,
                providers: self.providers,
                now: self.now,
                recently_sent_similar: self.similar,
                routing: &self.routing,
            })
            .into_iter()
            .map(|p| (p.channel, p.decision))
            .collect()
        }
    }

    fn digest(key: &str, due: &str, start: &str) -> Decision {
        Decision::Digest {
            key: key.into(),
            due: ts(due),
            window_start: ts(start),
        }
    }

    const D: Decision = Decision::Deliver;

    #[test]
    fn each_priority_routes_to_its_channels() {
        use Priority::*;
        let daily = digest(
            "collaboration",
            "2026-06-02T07:00:00Z", // 08:00 BST, when quiet hours end too
            "2026-06-01T07:00:00Z",
        );
        let expected: [(Priority, Vec<(DeliveryChannel, Decision)>); 4] = [
            (Critical, vec![(InApp, D), (Email, D), (Sms, D), (Push, D)]),
            (High, vec![(InApp, D), (Email, D), (Push, D)]),
            (Medium, vec![(InApp, D), (Push, D)]),
            (Low, vec![(InApp, D), (Email, daily)]),
        ];
        for (p, want) in expected {
            assert_eq!(Case::new(p).run(), want, "{p:?}");
        }
    }

    #[test]
    fn a_configured_table_is_followed() {
        let mut c = Case::new(Priority::Medium);
        c.routing = RoutingTable::parse("medium=in_app+sms+email@digest").unwrap();
        assert_eq!(
            c.run(),
            vec![
                (InApp, D),
                (
                    Email,
                    digest(
                        "collaboration",
                        "2026-06-02T07:00:00Z",
                        "2026-06-01T07:00:00Z"
                    )
                ),
                (Sms, D)
            ]
        );
    }

    #[test]
    fn critical_bypasses_quiet_hours_mute_switches_and_digests() {
        let mut c = Case::new(Priority::Critical);
        c.now = ts(NIGHT);
        c.similar = true;
        let mut cat = CategoryPreferences::default();
        for ch in DeliveryChannel::ALL {
            cat.channels.set(ch, false);
        }
        cat.digest = DigestSetting::hourly();
        c.prefs.categories.insert("collaboration".into(), cat);
        assert_eq!(c.run(), vec![(InApp, D), (Email, D), (Sms, D), (Push, D)]);
        // The same for high: all off, so everything is skipped by preference.
        c.priority = Priority::High;
        assert_eq!(
            c.run(),
            vec![
                (InApp, Decision::SkipPreference),
                (Email, Decision::SkipPreference),
                (Push, Decision::SkipPreference)
            ]
        );
    }

    #[test]
    fn critical_still_needs_an_address() {
        let mut c = Case::new(Priority::Critical);
        c.prefs.contacts = Contacts::default();
        c.has_devices = false;
        let no = |reason| Decision::SkipNoAddress { reason };
        assert_eq!(
            c.run(),
            vec![
                (InApp, D),
                (Email, no(NoAddress::NoEmail)),
                (Sms, no(NoAddress::NoPhone)),
                (Push, no(NoAddress::NoDevice))
            ]
        );
        c.providers = Providers::NONE;
        assert_eq!(
            c.run(),
            vec![
                (InApp, D),
                (Email, no(NoAddress::NoProvider)),
                (Sms, no(NoAddress::NoProvider)),
                (Push, no(NoAddress::NoProvider))
            ]
        );
        assert_eq!(
            NoAddress::NoProvider.message(Sms),
            "no sms provider is configured"
        );
    }

    #[test]
    fn no_provider_for_one_channel() {
        let mut c = Case::new(Priority::High);
        c.providers = Providers {
            email: false,
            ..Providers::ALL
        };
        assert_eq!(
            c.run(),
            vec![
                (InApp, D),
                (
                    Email,
                    Decision::SkipNoAddress {
                        reason: NoAddress::NoProvider
                    }
                ),
                (Push, D)
            ]
        );
    }

    #[test]
    fn low_email_goes_only_through_a_digest() {
        let mut c = Case::new(Priority::Low);
        // The category's own digest when it has one (weekly, Monday 09:00 BST).
        c.prefs.categories.insert(
            "collaboration".into(),
            CategoryPreferences {
                digest: DigestSetting::weekly(Weekday::Monday, time(9, 0, 0, 0)),
                ..Default::default()
            },
        );
        c.group_key = Some("doc-7");
        assert_eq!(
            c.run(),
            vec![
                (InApp, D),
                (
                    Email,
                    digest(
                        "collaboration.doc-7",
                        "2026-06-08T08:00:00Z",
                        "2026-06-01T08:00:00Z"
                    )
                )
            ]
        );
        // Never muted: the digest counts it.
        c.similar = true;
        assert!(matches!(c.run()[1].1, Decision::Digest { .. }));
        // Without an address it is skipped rather than digested.
        c.prefs.contacts.email = None;
        assert_eq!(
            c.run()[1].1,
            Decision::SkipNoAddress {
                reason: NoAddress::NoEmail
            }
        );
    }

    #[test]
    fn a_category_digest_takes_all_its_non_critical_email() {
        let mut c = Case::new(Priority::High);
        c.category = "publishing";
        c.prefs.categories.insert(
            "publishing".into(),
            CategoryPreferences {
                digest: DigestSetting::hourly(),
                ..Default::default()
            },
        );
        // 12:00 BST → 13:00 BST; push is not digested.
        assert_eq!(
            c.run(),
            vec![
                (InApp, D),
                (
                    Email,
                    digest("publishing", "2026-06-01T12:00:00Z", "2026-06-01T11:00:00Z")
                ),
                (Push, D)
            ]
        );
    }

    #[test]
    fn a_digest_due_in_quiet_hours_waits_for_their_end() {
        let mut c = Case::new(Priority::Low);
        // Daily at 23:30 BST, inside 22:00–08:00: due at 08:00 BST next morning, but the
        // window (the job id) is still the one of the 23:30 schedule.
        c.prefs.categories.insert(
            "collaboration".into(),
            CategoryPreferences {
                digest: DigestSetting::daily(time(23, 30, 0, 0)),
                ..Default::default()
            },
        );
        assert_eq!(
            c.run()[1].1,
            digest(
                "collaboration",
                "2026-06-02T07:00:00Z",
                "2026-05-31T22:30:00Z"
            )
        );
        // With quiet hours off it goes out at 23:30.
        c.prefs.quiet_hours.enabled = false;
        assert_eq!(
            c.run()[1].1,
            digest(
                "collaboration",
                "2026-06-01T22:30:00Z",
                "2026-05-31T22:30:00Z"
            )
        );
    }

    #[test]
    fn preference_off_skips_that_channel_only() {
        for ch in [InApp, Email, Push] {
            let mut c = Case::new(Priority::High);
            let mut cat = CategoryPreferences::default();
            cat.channels.set(ch, false);
            c.prefs.categories.insert("collaboration".into(), cat);
            for (got_ch, decision) in c.run() {
                if got_ch == ch {
                    assert_eq!(decision, Decision::SkipPreference, "{ch:?}");
                } else {
                    assert_eq!(decision, D, "{ch:?} off, {got_ch:?}");
                }
            }
        }
        // Another category's switch does not matter.
        let mut c = Case::new(Priority::High);
        let mut cat = CategoryPreferences::default();
        cat.channels.set(Email, false);
        c.prefs.categories.insert("chat".into(), cat);
        assert_eq!(c.run()[1], (Email, D));
    }

    #[test]
    fn requested_channels_intersect_and_keep_in_app() {
        let mut c = Case::new(Priority::High);
        c.channels = Some(vec![Email]);
        assert_eq!(c.run(), vec![(InApp, D), (Email, D)]);
        // Not routed for high: sms is not added by asking for it.
        c.channels = Some(vec![Sms]);
        assert_eq!(c.run(), vec![(InApp, D)]);
        c.channels = Some(vec![]);
        assert_eq!(c.run(), vec![(InApp, D)]);
        c.priority = Priority::Critical;
        c.channels = Some(vec![Sms, Push]);
        assert_eq!(c.run(), vec![(InApp, D), (Sms, D), (Push, D)]);
    }

    #[test]
    fn quiet_hours_hold_external_channels_but_not_in_app() {
        let mut c = Case::new(Priority::High);
        c.now = ts(NIGHT);
        let hold = Decision::Hold {
            until: ts("2026-06-02T07:00:00Z"),
        };
        assert_eq!(
            c.run(),
            vec![(InApp, D), (Email, hold.clone()), (Push, hold)]
        );
        // In New York the same instant is 18:00: nothing held.
        c.prefs.time_zone = ZoneName::parse("America/New_York").unwrap();
        assert_eq!(c.run(), vec![(InApp, D), (Email, D), (Push, D)]);
        // Quiet hours disabled.
        c.prefs.time_zone = ZoneName::parse("Europe/London").unwrap();
        c.prefs.quiet_hours = QuietHours {
            enabled: false,
            ..QuietHours::default()
        };
        assert_eq!(c.run(), vec![(InApp, D), (Email, D), (Push, D)]);
    }

    #[test]
    fn mute_applies_to_external_non_critical_only() {
        let mut c = Case::new(Priority::High);
        c.similar = true;
        assert_eq!(
            c.run(),
            vec![(InApp, D), (Email, Decision::Mute), (Push, Decision::Mute)]
        );
        // Muted rather than held: nothing would be released later.
        c.now = ts(NIGHT);
        assert_eq!(
            c.run(),
            vec![(InApp, D), (Email, Decision::Mute), (Push, Decision::Mute)]
        );
        // A mute window of 0 disables muting.
        c.now = ts(NOON);
        c.prefs.mute_window_seconds = 0;
        assert_eq!(c.run(), vec![(InApp, D), (Email, D), (Push, D)]);
        // Medium too; critical never.
        c.prefs.mute_window_seconds = 3600;
        c.priority = Priority::Medium;
        assert_eq!(c.run(), vec![(InApp, D), (Push, Decision::Mute)]);
        c.priority = Priority::Critical;
        assert!(c.run().iter().all(|(_, d)| *d == D));
    }

    #[test]
    fn statuses() {
        assert_eq!(D.status(), DeliveryStatus::Queued);
        assert_eq!(Decision::Mute.status(), DeliveryStatus::Muted);
        assert_eq!(
            Decision::Hold { until: ts(NOON) }.status(),
            DeliveryStatus::HeldQuietHours
        );
        assert_eq!(digest("k", NOON, NOON).status(), DeliveryStatus::Digested);
        assert_eq!(
            Decision::SkipPreference.status(),
            DeliveryStatus::SkippedPreference
        );
        assert_eq!(
            Decision::SkipNoAddress {
                reason: NoAddress::NoDevice
            }
            .status(),
            DeliveryStatus::SkippedNoAddress
        );
    }

    fn arb_prefs() -> impl Strategy<Value = Preferences> {
        let zone = prop::sample::select(vec![
            "UTC",
            "America/New_York",
            "Europe/London",
            "Asia/Kathmandu",
            "Pacific/Chatham",
        ]);
        let hm = (0i8..24, 0i8..60).prop_map(|(h, m)| time(h, m, 0, 0));
        let digest = prop_oneof![
            Just(DigestSetting::off()),
            Just(DigestSetting::hourly()),
            hm.clone().prop_map(DigestSetting::daily),
            (0i8..7, hm.clone()).prop_map(|(d, at)| DigestSetting::weekly(
                Weekday::from_monday_zero_offset(d).unwrap(),
                at
            )),
        ];
        let cat = (any::<[bool; 4]>(), digest).prop_map(|(sw, digest)| {
            let mut c = CategoryPreferences {
                digest,
                ..Default::default()
            };
            for (ch, on) in DeliveryChannel::ALL.into_iter().zip(sw) {
                c.channels.set(ch, on);
            }
            c
        });
        (
            zone,
            any::<bool>(),
            hm.clone(),
            hm,
            prop::option::of(cat),
            any::<[bool; 2]>(),
            prop_oneof![Just(0u64), Just(3600u64)],
        )
            .prop_map(|(z, enabled, start, end, cat, contacts, mute)| {
                let mut p = Preferences {
                    time_zone: ZoneName::parse(z).unwrap(),
                    quiet_hours: QuietHours {
                        enabled,
                        start,
                        end,
                    },
                    mute_window_seconds: mute,
                    contacts: Contacts {
                        email: contacts[0].then(|| "ada@example.com".to_string()),
                        phone: contacts[1].then(|| "+447700900123".to_string()),
                    },
                    ..Preferences::default()
                };
                if let Some(c) = cat {
                    p.categories.insert("chat".into(), c);
                }
                p
            })
    }

    fn arb_routing() -> impl Strategy<Value = RoutingTable> {
        prop_oneof![
            Just(RoutingTable::default()),
            Just(RoutingTable::parse("medium=in_app+email+sms;high=in_app+email@digest").unwrap()),
            Just(RoutingTable::parse("critical=in_app+push;low=in_app+sms+email@digest").unwrap()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn critical_is_never_held_muted_or_digested_and_in_app_never_held(
            priority in prop::sample::select(Priority::ALL.to_vec()),
            requested in prop::option::of(prop::sample::subsequence(DeliveryChannel::ALL.to_vec(), 0..=4)),
            group_key in prop::option::of(prop::sample::select(vec!["k", "doc-1", "a b"])),
            prefs in arb_prefs(),
            has_devices in any::<bool>(),
            providers in any::<[bool; 3]>(),
            secs in 0i64..3 * 366 * 86_400,
            similar in any::<bool>(),
            routing in arb_routing(),
        ) {
            let now = ts("2025-01-01T00:00:00Z") + jiff::SignedDuration::from_secs(secs);
            let input = PlanInput {
                priority,
                category: "chat",
                channels: requested.as_deref(),
                group_key,
                preferences: &prefs,
                has_devices,
                providers: Providers { email: providers[0], sms: providers[1], push: providers[2] },
                now,
                recently_sent_similar: similar,
                routing: &routing,
            };
            let out = plan(&input);
            prop_assert_eq!(out[0].channel, InApp, "in_app always first");
            let mut seen = Vec::new();
            for p in &out {
                prop_assert!(!seen.contains(&p.channel), "{:?} twice", p.channel);
                seen.push(p.channel);
                prop_assert!(routing.route(priority, p.channel).is_some());
                if let Some(r) = &requested && p.channel != InApp {
                    prop_assert!(r.contains(&p.channel));
                }
                match &p.decision {
                    Decision::Hold { until } => {
                        prop_assert!(priority != Priority::Critical && p.channel != InApp);
                        prop_assert!(*until > now);
                    }
                    Decision::Mute => {
                        prop_assert!(priority != Priority::Critical && p.channel != InApp);
                        prop_assert!(similar && prefs.mute_window_seconds > 0);
                    }
                    Decision::Digest { due, window_start, .. } => {
                        prop_assert!(priority != Priority::Critical && p.channel == Email);
                        prop_assert!(*window_start <= now && *due > now);
                        prop_assert!(!crate::quiet_hours::is_quiet(*due, &prefs.quiet_hours, &prefs.time_zone()));
                    }
                    Decision::SkipPreference => {
                        prop_assert!(priority != Priority::Critical);
                        prop_assert!(!prefs.channel_enabled("chat", p.channel));
                    }
                    Decision::SkipNoAddress { .. } => prop_assert!(p.channel != InApp),
                    Decision::Deliver => {
                        if p.channel != InApp && priority != Priority::Critical {
                            prop_assert!(!crate::quiet_hours::is_quiet(now, &prefs.quiet_hours, &prefs.time_zone()));
                        }
                    }
                }
            }
        }
    }
}
