//! Quiet-hours arithmetic: whether an instant falls inside a recipient's quiet hours (local
//! wall-clock times in their time zone) and, if so, the instant the window ends, when held
//! email, SMS and push are released.
//!
//! The rule is purely wall-clock: an instant is quiet iff its local time of day `t` is in
//! `[start, end)` (for a window that wraps midnight, `t >= start || t < end`). A window whose
//! `start` equals `end` is empty (nothing held), and a disabled one holds nothing. The
//! window ends at the first instant whose local time is no longer inside, which is:
//! - `end` on the right local date, when that local time exists once;
//! - in a fold (clocks turned back, the local time occurs twice) the *earlier* occurrence,
//!   as jiff's `Disambiguation::Compatible` does; but never one at or before `now`: in the
//!   repeated hour a window such as 22:00–01:30 is quiet again from 01:00 (second
//!   occurrence) and then ends at the second 01:30;
//! - when clocks turned back take the local time below `start` (Chatham 2026-04-05 03:45 →
//!   02:45 with a window 03:00–04:00), the transition itself: the window is left there and
//!   entered again when the clock reaches `start` a second time;
//! - in a gap (clocks turned forward, the local time does not exist) the first instant after
//!   the gap, i.e. the transition itself (New York 2026-03-08: an end of 02:30 → 03:00 EDT).
//!   Here we deliberately differ from `Compatible`, which would shift 02:30 by the gap's
//!   length to 03:30: from 03:00 on the local time is past `end`, so holding until 03:30
//!   would hold messages while the recipient's clock says quiet hours are over.
//!
//! One degenerate case: when all of the non-quiet time of a day falls in a gap (window
//! 02:45–02:30 on a New York spring-forward day), that day has no instant outside the window
//! and it ends at the next day's `end` (more than 24 h away).
//!
//! [`resolve_local`] is the same gap/fold rule for any civil datetime; the digest schedule
//! uses it too.

use jiff::Timestamp;
use jiff::civil::{DateTime, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};

use crate::preferences::QuietHours;

/// Whether the local time of day `local` is inside the window (ignores `enabled`).
pub fn contains(qh: &QuietHours, local: Time) -> bool {
    let (start, end) = (qh.start, qh.end);
    match start.cmp(&end) {
        std::cmp::Ordering::Equal => false,
        std::cmp::Ordering::Less => start <= local && local < end,
        std::cmp::Ordering::Greater => local >= start || local < end,
    }
}

/// Whether `now` is inside the recipient's quiet hours.
pub fn is_quiet(now: Timestamp, qh: &QuietHours, tz: &TimeZone) -> bool {
    qh.enabled && contains(qh, now.to_zoned(tz.clone()).time())
}

/// `Some(instant the window ends)` if `now` is inside the quiet hours, else `None`. See the
/// module doc for DST gaps and folds.
pub fn opens_at(now: Timestamp, qh: &QuietHours, tz: &TimeZone) -> Option<Timestamp> {
    if !qh.enabled {
        return None;
    }
    let mut at = now;
    let mut ends = None;
    // One step normally; a second only in the degenerate gap case of the module doc.
    for _ in 0..3 {
        let zoned = at.to_zoned(tz.clone());
        let local = zoned.time();
        if !contains(qh, local) {
            return ends;
        }
        let date = if local < qh.end {
            zoned.date()
        } else {
            zoned.date().tomorrow().ok()?
        };
        let mut end = resolve_after(tz, date.to_datetime(qh.end), at);
        // Clocks turned back can leave the window before `end` (below `start`): it ends at
        // that transition. (Clocks turned forward out of it cross `end`: handled above.)
        if let Some(left) = tz
            .following(at)
            .map(|tr| tr.timestamp())
            .take_while(|t| *t < end)
            .find(|t| !contains(qh, t.to_zoned(tz.clone()).time()))
        {
            end = left;
        }
        at = end;
        ends = Some(at);
    }
    ends
}

/// The instant of the local datetime `dt`: in a gap the first instant after it (the
/// transition), in a fold the earlier of the two.
pub fn resolve_local(tz: &TimeZone, dt: DateTime) -> Timestamp {
    resolve(tz, dt, None)
}

/// Like [`resolve_local`], but in a fold the later occurrence when the earlier one is not
/// after `after`.
fn resolve_after(tz: &TimeZone, dt: DateTime, after: Timestamp) -> Timestamp {
    resolve(tz, dt, Some(after))
}

fn resolve(tz: &TimeZone, dt: DateTime, after: Option<Timestamp>) -> Timestamp {
    let ambiguous = tz.to_ambiguous_timestamp(dt);
    let at = |offset: jiff::tz::Offset| offset.to_timestamp(dt).unwrap_or(Timestamp::MAX);
    match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { offset } => at(offset),
        AmbiguousOffset::Fold {
            before,
            after: later,
        } => {
            let earlier = at(before);
            match after {
                Some(a) if earlier <= a => at(later),
                _ => earlier,
            }
        }
        AmbiguousOffset::Gap {
            after: offset_after,
            ..
        } => {
            // `dt` read with the offset after the gap is an instant before the transition; the
            // next transition from there is the end of the gap.
            let before_gap = at(offset_after);
            tz.following(before_gap)
                .next()
                .map(|t| t.timestamp())
                .unwrap_or(before_gap)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zone_testing::{ZONES, ts, tz};
    use jiff::civil::{date, time};
    use jiff::{SignedDuration, ToSpan};
    use proptest::prelude::*;

    fn window(start: (i8, i8), end: (i8, i8)) -> QuietHours {
        QuietHours {
            enabled: true,
            start: time(start.0, start.1, 0, 0),
            end: time(end.0, end.1, 0, 0),
        }
    }

    #[test]
    fn wrapping_and_plain_windows() {
        let utc = TimeZone::UTC;
        let night = window((22, 0), (8, 0));
        assert_eq!(opens_at(ts("2026-06-01T21:59:59Z"), &night, &utc), None);
        assert_eq!(
            opens_at(ts("2026-06-01T22:00:00Z"), &night, &utc),
            Some(ts("2026-06-02T08:00:00Z"))
        );
        assert_eq!(
            opens_at(ts("2026-06-02T03:00:00Z"), &night, &utc),
            Some(ts("2026-06-02T08:00:00Z"))
        );
        assert_eq!(opens_at(ts("2026-06-02T08:00:00Z"), &night, &utc), None);
        let lunch = window((13, 0), (14, 0));
        assert_eq!(opens_at(ts("2026-06-01T12:59:00Z"), &lunch, &utc), None);
        assert_eq!(
            opens_at(ts("2026-06-01T13:30:00Z"), &lunch, &utc),
            Some(ts("2026-06-01T14:00:00Z"))
        );
        assert_eq!(opens_at(ts("2026-06-01T14:00:00Z"), &lunch, &utc), None);
        assert_eq!(opens_at(ts("2026-06-01T23:00:00Z"), &lunch, &utc), None);
    }

    #[test]
    fn empty_and_disabled_windows_hold_nothing() {
        let utc = TimeZone::UTC;
        let empty = window((9, 0), (9, 0));
        let mut off = window((0, 0), (23, 59));
        off.enabled = false;
        for h in 0..24 {
            let now = date(2026, 6, 1)
                .at(h, 0, 0, 0)
                .to_zoned(utc.clone())
                .unwrap()
                .timestamp();
            assert_eq!(opens_at(now, &empty, &utc), None);
            assert_eq!(opens_at(now, &off, &utc), None);
            assert!(!is_quiet(now, &off, &utc));
        }
    }

    #[test]
    fn local_time_not_utc() {
        // 06:00 UTC is 07:00 in London (BST) and 11:45 in Kathmandu.
        let now = ts("2026-06-01T06:00:00Z");
        let night = window((22, 0), (8, 0));
        assert_eq!(
            opens_at(now, &night, &tz("Europe/London")),
            Some(ts("2026-06-01T07:00:00Z"))
        );
        assert_eq!(opens_at(now, &night, &tz("Asia/Kathmandu")), None);
        // 20:00 UTC is 02:15 next day in Kathmandu: ends at 08:00 +05:45 = 02:15 UTC.
        assert_eq!(
            opens_at(ts("2026-06-01T20:00:00Z"), &night, &tz("Asia/Kathmandu")),
            Some(ts("2026-06-02T02:15:00Z"))
        );
    }

    #[test]
    fn new_york_2026_spring_forward() {
        // 2026-03-08 02:00 EST → 03:00 EDT (07:00 UTC).
        let ny = tz("America/New_York");
        // An end inside the gap ends at the transition, 03:00 EDT, not 03:30.
        let w = window((22, 0), (2, 30));
        assert_eq!(
            opens_at(ts("2026-03-08T06:30:00Z"), &w, &ny), // 01:30 EST
            Some(ts("2026-03-08T07:00:00Z"))
        );
        assert_eq!(opens_at(ts("2026-03-08T07:00:00Z"), &w, &ny), None);
        // An ordinary night across the change is an hour shorter.
        let night = window((22, 0), (8, 0));
        let start = ts("2026-03-08T03:00:00Z"); // 22:00 EST on the 7th
        let end = opens_at(start, &night, &ny).unwrap();
        assert_eq!(end, ts("2026-03-08T12:00:00Z")); // 08:00 EDT
        assert_eq!(end.duration_since(start), SignedDuration::from_hours(9));
        // A start inside the gap: quiet from the transition on.
        let w = window((2, 30), (4, 0));
        assert_eq!(opens_at(ts("2026-03-08T06:59:59Z"), &w, &ny), None);
        assert_eq!(
            opens_at(ts("2026-03-08T07:00:00Z"), &w, &ny),
            Some(ts("2026-03-08T08:00:00Z"))
        );
        // Degenerate: every non-quiet minute of the day is in the gap.
        let w = window((2, 45), (2, 30));
        assert_eq!(
            opens_at(ts("2026-03-08T06:00:00Z"), &w, &ny), // 01:00 EST
            Some(ts("2026-03-09T06:30:00Z"))               // 02:30 EDT on the 9th
        );
    }

    #[test]
    fn new_york_2026_fall_back() {
        // 2026-11-01 02:00 EDT → 01:00 EST (06:00 UTC); 01:00–01:59 happens twice.
        let ny = tz("America/New_York");
        let w = window((22, 0), (1, 30));
        // Before the fold: the first 01:30 (EDT).
        assert_eq!(
            opens_at(ts("2026-11-01T03:00:00Z"), &w, &ny), // 23:00 EDT
            Some(ts("2026-11-01T05:30:00Z"))
        );
        // Between the first 01:30 and the second 01:00 the clock is outside the window.
        assert_eq!(opens_at(ts("2026-11-01T05:45:00Z"), &w, &ny), None);
        // In the repeated hour it is 01:00–01:29 again: quiet until the second 01:30 (EST).
        assert_eq!(
            opens_at(ts("2026-11-01T06:10:00Z"), &w, &ny),
            Some(ts("2026-11-01T06:30:00Z"))
        );
        // A window 01:30–03:00 is left when 02:00 EDT turns into 01:00 EST, and entered
        // again at the second 01:30.
        let w = window((1, 30), (3, 0));
        assert_eq!(
            opens_at(ts("2026-11-01T05:50:00Z"), &w, &ny), // 01:50 EDT
            Some(ts("2026-11-01T06:00:00Z"))
        );
        assert_eq!(opens_at(ts("2026-11-01T06:10:00Z"), &w, &ny), None); // 01:10 EST
        assert_eq!(
            opens_at(ts("2026-11-01T06:30:00Z"), &w, &ny), // 01:30 EST
            Some(ts("2026-11-01T08:00:00Z"))
        );
        // An ordinary night across the change is an hour longer.
        let night = window((22, 0), (8, 0));
        let start = ts("2026-11-01T02:00:00Z"); // 22:00 EDT on Oct 31
        let end = opens_at(start, &night, &ny).unwrap();
        assert_eq!(end, ts("2026-11-01T13:00:00Z")); // 08:00 EST
        assert_eq!(end.duration_since(start), SignedDuration::from_hours(11));
    }

    #[test]
    fn london_2026() {
        let ldn = tz("Europe/London");
        // 2026-03-29 01:00 GMT → 02:00 BST; an end of 01:15 is in the gap.
        let w = window((23, 0), (1, 15));
        assert_eq!(
            opens_at(ts("2026-03-29T00:30:00Z"), &w, &ldn),
            Some(ts("2026-03-29T01:00:00Z"))
        );
        // 2026-10-25 02:00 BST → 01:00 GMT; an end of 01:15 is ambiguous: the earlier first.
        assert_eq!(
            opens_at(ts("2026-10-24T23:00:00Z"), &w, &ldn), // 00:00 BST
            Some(ts("2026-10-25T00:15:00Z"))
        );
        assert_eq!(
            opens_at(ts("2026-10-25T01:05:00Z"), &w, &ldn), // 01:05 GMT, second time
            Some(ts("2026-10-25T01:15:00Z"))
        );
    }

    #[test]
    fn kathmandu_has_no_dst_and_a_45_minute_offset() {
        let ktm = tz("Asia/Kathmandu");
        let night = window((22, 0), (8, 0));
        // Every day of 2026 the night is exactly 10 h: no transitions.
        let mut day = date(2026, 1, 1);
        while day.year() == 2026 {
            let start = ktm.to_timestamp(day.at(22, 0, 0, 0)).unwrap();
            let end = opens_at(start, &night, &ktm).unwrap();
            assert_eq!(end.duration_since(start), SignedDuration::from_hours(10));
            assert_eq!(end.to_zoned(ktm.clone()).time(), time(8, 0, 0, 0));
            day = day.tomorrow().unwrap();
        }
        assert_eq!(
            opens_at(ts("2026-03-08T16:15:00Z"), &night, &ktm), // 22:00 +05:45
            Some(ts("2026-03-09T02:15:00Z"))
        );
    }

    #[test]
    fn chatham_2026() {
        let cha = tz("Pacific/Chatham");
        // 2026-04-05 03:45 +13:45 → 02:45 +12:45 (2026-04-04T14:00Z): 02:45–03:44 twice.
        let w = window((22, 0), (3, 0));
        assert_eq!(
            opens_at(ts("2026-04-04T12:00:00Z"), &w, &cha), // 01:45 +13:45
            Some(ts("2026-04-04T13:15:00Z"))                // 03:00 +13:45, the first one
        );
        assert_eq!(
            opens_at(ts("2026-04-04T14:05:00Z"), &w, &cha), // 02:50 +12:45, second pass
            Some(ts("2026-04-04T14:15:00Z"))                // 03:00 +12:45
        );
        // Turned back below the start of a 03:00–04:00 window: it is left at the transition
        // and entered again at the second 03:00.
        let w2 = window((3, 0), (4, 0));
        assert_eq!(
            opens_at(ts("2026-04-04T13:59:59Z"), &w2, &cha), // 03:44:59 +13:45
            Some(ts("2026-04-04T14:00:00Z"))
        );
        assert_eq!(opens_at(ts("2026-04-04T14:00:00Z"), &w2, &cha), None); // 02:45 +12:45
        assert_eq!(
            opens_at(ts("2026-04-04T14:15:00Z"), &w2, &cha), // 03:00 +12:45
            Some(ts("2026-04-04T15:15:00Z"))
        );
        // 2026-09-27 02:45 +12:45 → 03:45 +13:45 (2026-09-26T14:00Z): an end of 03:00 is in
        // the gap, the window ends at the transition.
        assert_eq!(
            opens_at(ts("2026-09-26T13:00:00Z"), &w, &cha), // 01:45 +12:45
            Some(ts("2026-09-26T14:00:00Z"))
        );
        assert_eq!(
            ts("2026-09-26T14:00:00Z").to_zoned(cha.clone()).time(),
            time(3, 45, 0, 0)
        );
    }

    #[test]
    fn resolve_local_gap_and_fold() {
        let ny = tz("America/New_York");
        assert_eq!(
            resolve_local(&ny, date(2026, 3, 8).at(2, 30, 0, 0)),
            ts("2026-03-08T07:00:00Z")
        );
        assert_eq!(
            resolve_local(&ny, date(2026, 11, 1).at(1, 30, 0, 0)),
            ts("2026-11-01T05:30:00Z")
        );
        assert_eq!(
            resolve_local(&ny, date(2026, 6, 1).at(1, 30, 0, 0)),
            ts("2026-06-01T05:30:00Z")
        );
    }

    /// Instants over 2025–2027, half of them within 30 hours of a transition.
    fn arb_instant(zone: &'static str) -> impl Strategy<Value = Timestamp> {
        crate::zone_testing::instant_near_transitions(zone, 30)
    }

    fn arb_case() -> impl Strategy<Value = (&'static str, Timestamp, QuietHours)> {
        prop::sample::select(ZONES.to_vec()).prop_flat_map(|zone| {
            let hm = (0i8..24, prop_oneof![Just(0i8), Just(30), Just(45), 0i8..60]);
            (Just(zone), arb_instant(zone), hm.clone(), hm)
                .prop_map(|(z, now, s, e)| (z, now, window(s, e)))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn opens_at_matches_the_wall_clock((zone, now, qh) in arb_case(), frac in 0.0f64..1.0) {
            let z = tz(zone);
            let local = now.to_zoned(z.clone()).time();
            let inside = contains(&qh, local);
            let got = opens_at(now, &qh, &z);
            prop_assert_eq!(got.is_some(), inside, "local {} window {:?}", local, qh);
            if let Some(t) = got {
                prop_assert!(t > now);
                // All non-quiet time of the day may fall in a gap (module doc); gaps here
                // are at most one hour.
                let outside_minutes = (i32::from(qh.start.hour()) * 60 + i32::from(qh.start.minute())
                    - i32::from(qh.end.hour()) * 60 - i32::from(qh.end.minute())).rem_euclid(1440);
                let limit = if outside_minutes > 60 { 25 } else { 49 };
                prop_assert!(t.duration_since(now) <= SignedDuration::from_hours(limit),
                    "{} → {}", now, t);
                // It ends at the local `end`, or at a transition: the end of a gap that
                // `end` fell in, or clocks turned back below `start`.
                let at_t = t.to_zoned(z.clone());
                let at_transition = z.preceding(t + SignedDuration::from_nanos(1)).next()
                    .is_some_and(|tr| tr.timestamp() == t);
                let ended_in_gap = at_transition && matches!(
                    z.to_ambiguous_timestamp(at_t.date().to_datetime(qh.end)).offset(),
                    AmbiguousOffset::Gap { .. }
                );
                let turned_back = at_transition
                    && (t - SignedDuration::from_nanos(1)).to_zoned(z.clone()).time() > at_t.time();
                prop_assert!(at_t.time() == qh.end || ended_in_gap || turned_back,
                    "ends at local {} (end {})", at_t.time(), format!("{:?}", qh.end));
                prop_assert_eq!(opens_at(t, &qh, &z), None);
                // Any instant before the end is held until the same end.
                let span = t.duration_since(now).as_secs_f64();
                let mid = now + SignedDuration::from_secs_f64(span * frac);
                if mid < t {
                    prop_assert_eq!(opens_at(mid, &qh, &z), Some(t));
                }
            }
        }
    }

    #[test]
    fn dst_days_of_2026_in_every_zone_are_consistent() {
        // Minute by minute over each 2026 transition day (±1 day), a few windows: the
        // answer agrees with the wall clock and every held instant is released exactly once.
        let windows = [
            window((22, 0), (8, 0)),
            window((1, 0), (3, 0)),
            window((2, 30), (2, 0)),
            window((13, 0), (14, 0)),
        ];
        for zone in ZONES {
            let z = tz(zone);
            for tr in z
                .following(ts("2026-01-01T00:00:00Z"))
                .take_while(|t| t.timestamp() < ts("2027-01-01T00:00:00Z"))
            {
                for qh in &windows {
                    let mut now = tr.timestamp() - 24.hours();
                    while now < tr.timestamp() + 24.hours() {
                        let local = now.to_zoned(z.clone()).time();
                        match opens_at(now, qh, &z) {
                            None => assert!(!contains(qh, local), "{zone} {now}"),
                            Some(t) => {
                                assert!(contains(qh, local));
                                assert!(t > now);
                                assert!(!is_quiet(t, qh, &z), "{zone} {now} → {t}");
                            }
                        }
                        now += 1.minutes();
                    }
                }
            }
        }
    }
}
