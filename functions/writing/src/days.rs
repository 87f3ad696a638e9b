//! Writing days in the writer's own time zone: which local date an input belongs to, and
//! streaks of consecutive days.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

/// The time zone named `name` (IANA, e.g. `Europe/Berlin`), if it exists.
pub fn time_zone(name: &str) -> Option<TimeZone> {
    TimeZone::get(name).ok()
}

/// The local date (`YYYY-MM-DD`) of `at_ms` in `tz` (UTC when absent or unknown).
pub fn local_day(at_ms: u64, tz: Option<&str>) -> String {
    let ts = Timestamp::from_millisecond(at_ms as i64).unwrap_or(Timestamp::UNIX_EPOCH);
    let zone = tz.and_then(time_zone).unwrap_or(TimeZone::UTC);
    ts.to_zoned(zone).date().to_string()
}

/// Consecutive days, ending today (or yesterday, when nothing was written yet today), on
/// which at least `threshold` words were written. `words_on` gives the words of a date.
pub fn streak(today: &str, threshold: u64, words_on: impl Fn(&str) -> u64) -> u32 {
    let Ok(mut day) = today.parse::<Date>() else {
        return 0;
    };
    let threshold = threshold.max(1);
    if words_on(&day.to_string()) < threshold {
        match day.yesterday() {
            Ok(d) => day = d,
            Err(_) => return 0,
        }
    }
    let mut n = 0;
    while words_on(&day.to_string()) >= threshold {
        n += 1;
        match day.yesterday() {
            Ok(d) => day = d,
            Err(_) => break,
        }
        if n > 10_000 {
            break;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn local_days_follow_the_time_zone() {
        // 2026-11-21 23:30 UTC is already the 22nd in Berlin and still the 21st in New York.
        let at = 1_795_303_800_000; // 2026-11-21T23:30:00Z
        assert_eq!(local_day(at, None), "2026-11-21");
        assert_eq!(local_day(at, Some("Europe/Berlin")), "2026-11-22");
        assert_eq!(local_day(at, Some("America/New_York")), "2026-11-21");
        assert_eq!(local_day(at, Some("Not/AZone")), "2026-11-21");
        // Across a DST change (Berlin, 2026-03-29 01:00 UTC clocks go 02:00 → 03:00).
        assert_eq!(
            local_day(1_774_825_200_000, Some("Europe/Berlin")),
            "2026-03-30"
        ); // 2026-03-29T23:00Z
        assert!(time_zone("Asia/Tokyo").is_some());
    }

    #[test]
    fn streaks() {
        let days: HashMap<&str, u64> = [
            ("2026-11-21", 300),
            ("2026-11-20", 10),
            ("2026-11-19", 500),
            ("2026-11-17", 900),
        ]
        .into();
        let words = |d: &str| days.get(d).copied().unwrap_or(0);
        assert_eq!(streak("2026-11-21", 1, words), 3);
        assert_eq!(
            streak("2026-11-22", 1, words),
            3,
            "today not written yet: the streak still counts"
        );
        assert_eq!(streak("2026-11-23", 1, words), 0);
        assert_eq!(
            streak("2026-11-21", 250, words),
            1,
            "a daily goal raises the bar"
        );
    }
}
