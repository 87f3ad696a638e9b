//! Test support shared by the time-zone arithmetic tests (quiet hours, digest schedules):
//! the zones the issue names — DST in both hemispheres, a 45-minute offset, a 12:45 one —
//! and a proptest strategy of instants that lands near their transitions half of the time.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

/// America/New_York and Europe/London (DST), Asia/Kathmandu (+05:45), Pacific/Chatham
/// (+12:45 / +13:45).
pub const ZONES: [&str; 4] = [
    "America/New_York",
    "Europe/London",
    "Asia/Kathmandu",
    "Pacific/Chatham",
];

pub fn tz(name: &str) -> TimeZone {
    TimeZone::get(name).unwrap()
}

pub fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// Instants over 2025–2027; half of them within `hours` of one of `zone`'s transitions.
pub fn instant_near_transitions(zone: &str, hours: i64) -> impl Strategy<Value = Timestamp> {
    let z = tz(zone);
    let from = ts("2025-01-01T00:00:00Z");
    let mut transitions: Vec<Timestamp> = z
        .following(from)
        .take_while(|t| t.timestamp() < ts("2028-01-01T00:00:00Z"))
        .map(|t| t.timestamp())
        .collect();
    if transitions.is_empty() {
        transitions.push(from);
    }
    prop_oneof![
        (0i64..3 * 366 * 86_400).prop_map(move |s| from + SignedDuration::from_secs(s)),
        (
            prop::sample::select(transitions),
            -hours * 3600..hours * 3600
        )
            .prop_map(|(t, s)| t + SignedDuration::from_secs(s)),
    ]
}
