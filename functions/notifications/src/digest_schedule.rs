//! When digests go out: the next delivery instant of a digest setting in the recipient's time
//! zone, and the window (previous delivery, this delivery] that a delivery covers.
//!
//! Deliveries are local wall-clock times — hourly at :00, daily at `at`, weekly on `weekday`
//! at `at` — so a digest follows the recipient's clock, not UTC (Kathmandu's and Chatham's
//! local :00 is UTC :15). Each local due time is turned into an instant with
//! [`crate::quiet_hours::resolve_local`]:
//! - a due time that does not exist that day (clocks turned forward) is delivered at the
//!   first instant after the gap: a daily 02:30 on New York's spring-forward day goes out at
//!   03:00 EDT; an hourly 02:00 there coincides with 03:00 and is delivered once;
//! - a due time that occurs twice (clocks turned back) is delivered once, at the earlier
//!   occurrence; an hourly digest therefore skips the repeated hour (01:00 EDT, then 02:00
//!   EST), since "never twice in the same local hour" is what a reader of the digest sees.
//!
//! `off` is scheduled as the contract's fallback for items routed to a digest when the
//! category has none: daily at 08:00.
//!
//! The window start is what makes a digest job id (`digest:{user}:{key}:{windowStartMs}`)
//! the same for every item and every instance in that window: every `after` in
//! `[window_start(d), d)` gives `next_due(after) == d`, hence the same window start.

use jiff::Timestamp;
use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;

use crate::model::DigestFrequency;
use crate::preferences::{DEFAULT_DAILY_AT, DigestSetting};
use crate::quiet_hours::resolve_local;

/// The first delivery instant strictly after `after`.
pub fn next_due(after: Timestamp, setting: &DigestSetting, tz: &TimeZone) -> Timestamp {
    // Candidates in civil order map to instants in non-decreasing order (gaps and folds keep
    // the order), so the first one past `after` is the answer. Starting a little before the
    // local time of `after` covers an offset change in between.
    let local = after.to_zoned(tz.clone()).datetime();
    candidates(local, setting, Direction::Forward)
        .map(|dt| resolve_local(tz, dt))
        .find(|t| *t > after)
        .unwrap_or(Timestamp::MAX)
}

/// The last delivery instant strictly before `before`.
pub fn previous_due(before: Timestamp, setting: &DigestSetting, tz: &TimeZone) -> Timestamp {
    let local = before.to_zoned(tz.clone()).datetime();
    candidates(local, setting, Direction::Backward)
        .map(|dt| resolve_local(tz, dt))
        .find(|t| *t < before)
        .unwrap_or(Timestamp::MIN)
}

/// Where the window delivered at `due` starts: the previous delivery instant. Items that
/// arrive in `[window_start, due)` are all in the delivery at `due`.
pub fn window_start(due: Timestamp, setting: &DigestSetting, tz: &TimeZone) -> Timestamp {
    previous_due(due, setting, tz)
}

#[derive(Clone, Copy)]
enum Direction {
    Forward,
    Backward,
}

/// Local due datetimes around `local`, in civil order from a little before it (forward) or
/// from a little after it (backward). Long enough to always contain the answer.
fn candidates(
    local: DateTime,
    setting: &DigestSetting,
    direction: Direction,
) -> Box<dyn Iterator<Item = DateTime>> {
    let sign: i64 = match direction {
        Direction::Forward => 1,
        Direction::Backward => -1,
    };
    match setting.frequency {
        DigestFrequency::Hourly => {
            let hour = local
                .date()
                .to_datetime(Time::new(local.hour(), 0, 0, 0).unwrap_or_default());
            Box::new(
                (-3i64..30)
                    .filter_map(move |k| hour.checked_add(jiff::Span::new().hours(sign * k)).ok()),
            )
        }
        DigestFrequency::Off | DigestFrequency::Daily | DigestFrequency::Weekly => {
            let at = match setting.frequency {
                DigestFrequency::Off => DEFAULT_DAILY_AT,
                _ => setting.at,
            };
            let weekly = (setting.frequency == DigestFrequency::Weekly).then_some(setting.weekday);
            let day = local.date();
            Box::new(
                (-2i64..10)
                    .filter_map(move |k| day.checked_add(jiff::Span::new().days(sign * k)).ok())
                    .filter(move |d: &Date| weekly.is_none_or(|w| d.weekday() == w))
                    .map(move |d| d.to_datetime(at)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone_testing::{ZONES, ts, tz};
    use jiff::SignedDuration;
    use jiff::civil::{Weekday, date, time};
    use proptest::prelude::*;

    fn daily(h: i8, m: i8) -> DigestSetting {
        DigestSetting::daily(time(h, m, 0, 0))
    }

    /// Successive dues from `from`, `n` of them.
    fn dues(from: Timestamp, s: &DigestSetting, z: &TimeZone, n: usize) -> Vec<Timestamp> {
        let mut out = Vec::new();
        let mut t = from;
        for _ in 0..n {
            t = next_due(t, s, z);
            out.push(t);
        }
        out
    }

    #[test]
    fn hourly_is_on_the_local_hour() {
        let s = DigestSetting::hourly();
        assert_eq!(
            next_due(ts("2026-06-01T10:20:00Z"), &s, &TimeZone::UTC),
            ts("2026-06-01T11:00:00Z")
        );
        assert_eq!(
            next_due(ts("2026-06-01T11:00:00Z"), &s, &TimeZone::UTC),
            ts("2026-06-01T12:00:00Z"),
            "strictly after"
        );
        // Kathmandu (+05:45) and Chatham (+12:45 in winter): local :00 is UTC :15.
        assert_eq!(
            next_due(ts("2026-06-01T10:20:00Z"), &s, &tz("Asia/Kathmandu")),
            ts("2026-06-01T11:15:00Z")
        );
        assert_eq!(
            next_due(ts("2026-06-01T10:00:00Z"), &s, &tz("Pacific/Chatham")),
            ts("2026-06-01T10:15:00Z")
        );
    }

    #[test]
    fn daily_and_weekly_in_local_time() {
        let ldn = tz("Europe/London");
        // 08:00 BST is 07:00 UTC.
        assert_eq!(
            next_due(ts("2026-06-01T06:59:00Z"), &daily(8, 0), &ldn),
            ts("2026-06-01T07:00:00Z")
        );
        assert_eq!(
            next_due(ts("2026-06-01T07:00:00Z"), &daily(8, 0), &ldn),
            ts("2026-06-02T07:00:00Z")
        );
        // 2026-06-01 is a Monday.
        let weekly = DigestSetting::weekly(Weekday::Monday, time(9, 0, 0, 0));
        assert_eq!(
            next_due(ts("2026-06-01T07:59:00Z"), &weekly, &ldn),
            ts("2026-06-01T08:00:00Z")
        );
        assert_eq!(
            next_due(ts("2026-06-01T08:00:00Z"), &weekly, &ldn),
            ts("2026-06-08T08:00:00Z")
        );
        let friday = DigestSetting::weekly(Weekday::Friday, time(17, 30, 0, 0));
        assert_eq!(
            next_due(ts("2026-06-01T08:00:00Z"), &friday, &tz("Asia/Kathmandu")),
            ts("2026-06-05T11:45:00Z")
        );
        // `off` falls back to daily 08:00.
        assert_eq!(
            next_due(ts("2026-06-01T00:00:00Z"), &DigestSetting::off(), &ldn),
            ts("2026-06-01T07:00:00Z")
        );
    }

    #[test]
    fn new_york_2026_dst_days() {
        let ny = tz("America/New_York");
        // Spring forward 2026-03-08 02:00 EST → 03:00 EDT: a daily 02:30 goes out at 03:00.
        let d = dues(ts("2026-03-07T00:00:00Z"), &daily(2, 30), &ny, 3);
        assert_eq!(
            d,
            vec![
                ts("2026-03-07T07:30:00Z"), // 02:30 EST
                ts("2026-03-08T07:00:00Z"), // 03:00 EDT (02:30 does not exist)
                ts("2026-03-09T06:30:00Z"), // 02:30 EDT
            ]
        );
        // Hourly: 01:00 EST, then 03:00 EDT (02:00 does not exist), then 04:00.
        let h = dues(ts("2026-03-08T05:30:00Z"), &DigestSetting::hourly(), &ny, 3);
        assert_eq!(
            h,
            vec![
                ts("2026-03-08T06:00:00Z"),
                ts("2026-03-08T07:00:00Z"),
                ts("2026-03-08T08:00:00Z")
            ]
        );
        // Fall back 2026-11-01 02:00 EDT → 01:00 EST: a daily 01:30 goes out once.
        let d = dues(ts("2026-10-31T12:00:00Z"), &daily(1, 30), &ny, 2);
        assert_eq!(
            d,
            vec![ts("2026-11-01T05:30:00Z"), ts("2026-11-02T06:30:00Z")]
        );
        // Hourly: 00:00 EDT, 01:00 EDT, then 02:00 EST (the repeated 01:00 is skipped).
        let h = dues(ts("2026-11-01T03:30:00Z"), &DigestSetting::hourly(), &ny, 3);
        assert_eq!(
            h,
            vec![
                ts("2026-11-01T04:00:00Z"),
                ts("2026-11-01T05:00:00Z"),
                ts("2026-11-01T07:00:00Z")
            ]
        );
        // From inside the repeated hour the next is 02:00 EST.
        assert_eq!(
            next_due(ts("2026-11-01T06:10:00Z"), &DigestSetting::hourly(), &ny),
            ts("2026-11-01T07:00:00Z")
        );
    }

    #[test]
    fn london_2026_dst_days() {
        let ldn = tz("Europe/London");
        // 2026-03-29 01:00 GMT → 02:00 BST: 01:30 goes out at 02:00 BST (01:00 UTC).
        assert_eq!(
            dues(ts("2026-03-28T12:00:00Z"), &daily(1, 30), &ldn, 2),
            vec![ts("2026-03-29T01:00:00Z"), ts("2026-03-30T00:30:00Z")]
        );
        // 2026-10-25 02:00 BST → 01:00 GMT: 01:30 once, at BST.
        assert_eq!(
            dues(ts("2026-10-24T12:00:00Z"), &daily(1, 30), &ldn, 2),
            vec![ts("2026-10-25T00:30:00Z"), ts("2026-10-26T01:30:00Z")]
        );
        // Weekly on Sunday 01:30 across both changes.
        let sunday = DigestSetting::weekly(Weekday::Sunday, time(1, 30, 0, 0));
        assert_eq!(
            next_due(ts("2026-03-28T12:00:00Z"), &sunday, &ldn),
            ts("2026-03-29T01:00:00Z")
        );
        assert_eq!(
            next_due(ts("2026-10-24T12:00:00Z"), &sunday, &ldn),
            ts("2026-10-25T00:30:00Z")
        );
    }

    #[test]
    fn kathmandu_2026_has_no_transition() {
        let ktm = tz("Asia/Kathmandu");
        let d = dues(ts("2026-01-01T00:00:00Z"), &daily(8, 0), &ktm, 365);
        for pair in d.windows(2) {
            assert_eq!(
                pair[1].duration_since(pair[0]),
                SignedDuration::from_hours(24)
            );
        }
        assert_eq!(d[0], ts("2026-01-01T02:15:00Z"));
        for t in &d {
            assert_eq!(t.to_zoned(ktm.clone()).time(), time(8, 0, 0, 0));
        }
    }

    #[test]
    fn chatham_2026_dst_days() {
        let cha = tz("Pacific/Chatham");
        // 2026-09-27 02:45 +12:45 → 03:45 +13:45 (14:00Z): a daily 03:00 goes out at 03:45.
        let d = dues(ts("2026-09-25T00:00:00Z"), &daily(3, 0), &cha, 3);
        assert_eq!(
            d,
            vec![
                ts("2026-09-25T14:15:00Z"),
                ts("2026-09-26T14:00:00Z"),
                ts("2026-09-27T13:15:00Z")
            ]
        );
        assert_eq!(d[1].to_zoned(cha.clone()).time(), time(3, 45, 0, 0));
        // Hourly on that night: 02:00, then 03:45 (03:00 is in the gap), then 04:00.
        let h = dues(
            ts("2026-09-26T12:30:00Z"),
            &DigestSetting::hourly(),
            &cha,
            3,
        );
        assert_eq!(
            h,
            vec![
                ts("2026-09-26T13:15:00Z"),
                ts("2026-09-26T14:00:00Z"),
                ts("2026-09-26T14:15:00Z")
            ]
        );
        // 2026-04-05 03:45 +13:45 → 02:45 +12:45 (2026-04-04T14:00Z): 03:00 once, the earlier.
        assert_eq!(
            dues(ts("2026-04-04T00:00:00Z"), &daily(3, 0), &cha, 2),
            vec![ts("2026-04-04T13:15:00Z"), ts("2026-04-05T14:15:00Z")]
        );
    }

    #[test]
    fn window_start_is_the_previous_due_and_shared_by_the_window() {
        let ny = tz("America/New_York");
        let s = daily(2, 30);
        let due = next_due(ts("2026-03-08T01:00:00Z"), &s, &ny);
        assert_eq!(due, ts("2026-03-08T07:00:00Z"));
        assert_eq!(window_start(due, &s, &ny), ts("2026-03-07T07:30:00Z"));
        // Every instant of the window maps to the same due and window start.
        let mut t = ts("2026-03-07T07:30:00Z");
        while t < due {
            assert_eq!(next_due(t, &s, &ny), due);
            t += SignedDuration::from_mins(7);
        }
    }

    fn arb_setting() -> impl Strategy<Value = DigestSetting> {
        let at = (0i8..24, prop_oneof![Just(0i8), Just(30), Just(45), 0i8..60])
            .prop_map(|(h, m)| time(h, m, 0, 0));
        let weekday = (0i8..7).prop_map(|d| Weekday::from_monday_zero_offset(d).unwrap());
        prop_oneof![
            Just(DigestSetting::hourly()),
            at.clone().prop_map(DigestSetting::daily),
            (weekday, at).prop_map(|(w, a)| DigestSetting::weekly(w, a)),
        ]
    }

    /// Instants over 2025–2027, half of them within 50 hours of a transition.
    fn arb_instant(zone: &'static str) -> impl Strategy<Value = Timestamp> {
        crate::zone_testing::instant_near_transitions(zone, 50)
    }

    fn arb_case() -> impl Strategy<Value = (&'static str, Timestamp, DigestSetting)> {
        prop::sample::select(ZONES.to_vec())
            .prop_flat_map(|z| (Just(z), arb_instant(z), arb_setting()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        #[test]
        fn dues_are_well_spaced_local_times((zone, from, s) in arb_case()) {
            let z = tz(zone);
            let d = dues(from, &s, &z, 30);
            prop_assert!(d[0] > from);
            for pair in d.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                prop_assert!(b > a, "not increasing: {} then {}", a, b);
                let gap = b.duration_since(a);
                let (la, lb) = (a.to_zoned(z.clone()), b.to_zoned(z.clone()));
                match s.frequency {
                    DigestFrequency::Hourly => {
                        prop_assert!(
                            (la.date(), la.hour()) != (lb.date(), lb.hour()),
                            "two in local hour {} {}", la, lb
                        );
                        prop_assert!(gap <= SignedDuration::from_hours(2));
                    }
                    DigestFrequency::Daily => {
                        prop_assert!(la.date() != lb.date(), "two on {}", la.date());
                        prop_assert!(gap >= SignedDuration::from_hours(23)
                            && gap <= SignedDuration::from_hours(25), "{} → {}", la, lb);
                    }
                    _ => {
                        prop_assert!(gap >= SignedDuration::from_hours(167)
                            && gap <= SignedDuration::from_hours(169), "{} → {}", la, lb);
                        prop_assert_eq!(lb.weekday(), s.weekday);
                    }
                }
                // The local time is the setting's, except when it fell into a gap (then
                // it is the first instant after, within the hour).
                let want = match s.frequency {
                    DigestFrequency::Hourly => time(lb.hour(), 0, 0, 0),
                    _ => s.at,
                };
                if lb.time() != want {
                    let before = z.preceding(b + SignedDuration::from_nanos(1)).next().unwrap();
                    prop_assert_eq!(before.timestamp(), b, "{} is not at {:?}", lb, want);
                }
                // The window of `b` is (a, b]: it starts at the previous due.
                prop_assert_eq!(window_start(b, &s, &z), a);
            }
        }

        #[test]
        fn every_instant_of_a_window_maps_to_one_due((zone, from, s) in arb_case(), frac in 0.0f64..1.0) {
            let z = tz(zone);
            let due = next_due(from, &s, &z);
            let start = window_start(due, &s, &z);
            prop_assert!(start <= from && from < due);
            let mid = start + SignedDuration::from_secs_f64(due.duration_since(start).as_secs_f64() * frac);
            if mid < due {
                prop_assert_eq!(next_due(mid, &s, &z), due);
            }
            prop_assert_eq!(next_due(start, &s, &z), due);
            prop_assert_eq!(previous_due(from + SignedDuration::from_nanos(1), &s, &z), start);
        }
    }

    #[test]
    fn dates_far_out_do_not_panic() {
        let s = daily(8, 0);
        let _ = next_due(Timestamp::MAX, &s, &TimeZone::UTC);
        let _ = previous_due(Timestamp::MIN, &s, &TimeZone::UTC);
        let _ = next_due(
            Timestamp::MIN,
            &DigestSetting::hourly(),
            &tz("Pacific/Chatham"),
        );
        assert_eq!(
            next_due(
                date(2026, 1, 1)
                    .at(0, 0, 0, 0)
                    .to_zoned(TimeZone::UTC)
                    .unwrap()
                    .timestamp(),
                &s,
                &TimeZone::UTC
            ),
            ts("2026-01-01T08:00:00Z")
        );
    }
}
