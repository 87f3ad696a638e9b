//! Statistics of a user's activity in their own time zone: events per type per local day,
//! active days, the most active local hours, and the current and longest streak of
//! consecutive active days. Computed from the quarter-hour counts (`store::quarters`): each
//! quarter lies within one local hour of any zone, so the local day and hour are exact.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde_json::{Value, json};

use crate::sources::Kind;

/// How many of the busiest hours `mostActiveHours` lists.
pub const TOP_HOURS: usize = 3;

/// The statistics of `quarters` (type, quarter start in ms, count) in `tz`, `today` being
/// the local date now.
pub fn compute(quarters: &[(Kind, u64, u64)], tz: &TimeZone, today: Date) -> Value {
    let mut days: BTreeMap<Date, BTreeMap<Kind, u64>> = BTreeMap::new();
    let mut hours = [0u64; 24];
    let mut totals: BTreeMap<Kind, u64> = BTreeMap::new();
    for &(kind, start_ms, count) in quarters {
        let Ok(ts) = Timestamp::from_millisecond(start_ms as i64) else {
            continue;
        };
        let local = ts.to_zoned(tz.clone());
        *days
            .entry(local.date())
            .or_default()
            .entry(kind)
            .or_default() += count;
        hours[local.hour() as usize] += count;
        *totals.entry(kind).or_default() += count;
    }
    let by_type = |m: &BTreeMap<Kind, u64>| -> Value {
        m.iter()
            .map(|(k, n)| (k.as_str().to_string(), json!(n)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let day_list: Vec<Value> = days
        .iter()
        .map(|(d, m)| {
            json!({"date": d.to_string(), "total": m.values().sum::<u64>(), "byType": by_type(m)})
        })
        .collect();
    let mut busiest: Vec<(usize, u64)> = hours
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, n)| *n > 0)
        .collect();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let active: Vec<Date> = days.keys().copied().collect();
    let (current, longest) = streaks(&active, today);
    json!({
        "days": day_list,
        "totals": by_type(&totals),
        "activeDays": active.len(),
        "hours": hours.to_vec(),
        "mostActiveHours": busiest.iter().take(TOP_HOURS)
            .map(|(h, n)| json!({"hour": h, "count": n})).collect::<Vec<_>>(),
        "currentStreak": current,
        "longestStreak": longest,
    })
}

/// `(current, longest)` runs of consecutive dates in `active` (sorted, distinct). The current
/// streak ends today, or yesterday when nothing happened yet today.
pub fn streaks(active: &[Date], today: Date) -> (u32, u32) {
    let mut longest = 0u32;
    let mut run = 0u32;
    let mut prev: Option<Date> = None;
    for d in active {
        run = match prev {
            Some(p) if p.tomorrow().ok() == Some(*d) => run + 1,
            _ => 1,
        };
        longest = longest.max(run);
        prev = Some(*d);
    }
    let yesterday = today.yesterday().ok();
    let current = match active.last() {
        Some(last) if *last == today || Some(*last) == yesterday => run,
        _ => 0,
    };
    (current, longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        s.parse().unwrap()
    }

    #[test]
    fn streaks_count_consecutive_days() {
        let days = [
            d("2027-01-01"),
            d("2027-01-02"),
            d("2027-01-03"),
            d("2027-01-05"),
            d("2027-01-06"),
        ];
        assert_eq!(streaks(&days, d("2027-01-06")), (2, 3));
        assert_eq!(
            streaks(&days, d("2027-01-07")),
            (2, 3),
            "today not active yet"
        );
        assert_eq!(streaks(&days, d("2027-01-08")), (0, 3));
        assert_eq!(streaks(&[], d("2027-01-08")), (0, 0));
    }

    #[test]
    fn local_days_and_hours_follow_the_zone() {
        // 2027-01-15T23:30Z: the 16th at 00:30 in Berlin, the 15th at 18:30 in New York.
        let at = 1_800_000_000_000 + 15 * 3_600_000 + 30 * 60_000;
        let q = [
            (Kind::Comment, at, 2),
            (Kind::ChatMessage, at - 3_600_000, 1),
        ];
        let berlin = compute(
            &q,
            &TimeZone::get("Europe/Berlin").unwrap(),
            d("2027-01-16"),
        );
        assert_eq!(berlin["days"].as_array().unwrap().len(), 2);
        assert_eq!(berlin["days"][1]["date"], "2027-01-16");
        assert_eq!(berlin["days"][1]["byType"]["comment"], 2);
        assert_eq!(berlin["hours"][0], 2);
        assert_eq!(berlin["mostActiveHours"][0], json!({"hour": 0, "count": 2}));
        assert_eq!(berlin["currentStreak"], 2);
        let ny = compute(
            &q,
            &TimeZone::get("America/New_York").unwrap(),
            d("2027-01-15"),
        );
        assert_eq!(ny["activeDays"], 1);
        assert_eq!(ny["days"][0]["total"], 3);
        assert_eq!(ny["totals"]["chat_message"], 1);
    }
}
