//! Cron triggers: a schedule read in the wall-clock time of an IANA time zone.
//!
//! Schedules have 5 fields (`minute hour day-of-month month day-of-week`) or 6 (a leading
//! `second`), as croner parses them (`L`, `#`, `W`, names like `MON`/`JAN` and `@daily`-style
//! nicknames included); a year field is refused. Day-of-month and day-of-week combine with OR,
//! as in Vixie cron.
//!
//! Daylight-saving time — the rules come from croner (OCPS / Vixie cron); this crate pins
//! them down with tests, because "vague around DST" is a classic complaint about schedulers:
//! - **Spring forward (a gap)**: a schedule with a fixed second, minute and hour whose local
//!   time does not exist that day (02:30 in New York on 2026-03-08) fires **once**, at the
//!   first instant after the gap (03:00 local). Wildcard or stepped schedules (`*/15 * * * *`)
//!   simply have no occurrences inside the gap.
//! - **Fall back (an overlap)**: a fixed-time schedule whose local time occurs twice (01:30 in
//!   New York on 2026-11-01) fires **once**, at the first occurrence (01:30 EDT). Wildcard or
//!   stepped schedules fire in both passes of the repeated hour, since each of those instants
//!   is a distinct real time.
//!
//! The search moves in real time: feed the instant a trigger last fired (not the current wall
//! clock) to [`next_after`] to get the next one; that is what keeps a fixed-time job from
//! firing again in the second pass of a repeated hour.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// Parses a schedule of 5 or 6 fields; the message says what is wrong.
pub fn parse_schedule(schedule: &str) -> Result<Cron, String> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(schedule)
        .map_err(|e| format!("`{schedule}` is not a cron schedule of 5 or 6 fields: {e}"))
}

/// Looks an IANA time zone name up in the bundled tz database (so every machine agrees,
/// whatever its `/usr/share/zoneinfo`).
pub fn parse_time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!("`{name}` is not an IANA time zone name (such as \"Europe/Paris\" or \"UTC\")")
    })
}

/// The first fire time of `schedule` in `time_zone` strictly after `after`.
pub fn next_after(schedule: &str, time_zone: &str, after: Timestamp) -> Result<Timestamp, String> {
    let cron = parse_schedule(schedule)?;
    let zone = parse_time_zone(time_zone)?;
    cron.find_next_occurrence(&after.to_zoned(zone), false)
        .map(|z| z.timestamp())
        .map_err(|e| format!("no next time for `{schedule}` after {after}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("test timestamp")
    }

    /// Every fire time in `[from, to)`, space-separated.
    fn fires(schedule: &str, zone: &str, from: &str, to: &str) -> String {
        let (mut at, end) = (ts(from), ts(to));
        let mut out = Vec::new();
        loop {
            at = next_after(schedule, zone, at).expect("next");
            if at >= end {
                return out.join(" ");
            }
            out.push(at.to_string());
        }
    }

    #[test]
    fn new_york_spring_forward_fires_once_after_the_gap() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT, so 02:30 does not exist that day. Before:
        // 02:30 EST = 07:30Z; on the day, 03:00 EDT = 07:00Z; after, 02:30 EDT = 06:30Z.
        let got = fires(
            "30 2 * * *",
            "America/New_York",
            "2026-03-07T00:00:00Z",
            "2026-03-10T00:00:00Z",
        );
        assert_eq!(
            got,
            "2026-03-07T07:30:00Z 2026-03-08T07:00:00Z 2026-03-09T06:30:00Z"
        );
    }

    #[test]
    fn new_york_fall_back_fires_once_at_the_first_pass() {
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice, 02:30 once.
        let got = fires(
            "30 2 * * *",
            "America/New_York",
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
        );
        assert_eq!(
            got,
            "2026-10-31T06:30:00Z 2026-11-01T07:30:00Z 2026-11-02T07:30:00Z"
        );
        // 01:30 EDT = 05:30Z (the first pass), not also 01:30 EST = 06:30Z.
        let got = fires(
            "30 1 * * *",
            "America/New_York",
            "2026-10-31T12:00:00Z",
            "2026-11-02T00:00:00Z",
        );
        assert_eq!(got, "2026-11-01T05:30:00Z");
        // A wildcard hour fires in both passes: they are distinct instants.
        let got = fires(
            "30 * * * *",
            "America/New_York",
            "2026-11-01T04:00:00Z",
            "2026-11-01T07:00:00Z",
        );
        assert_eq!(
            got,
            "2026-11-01T04:30:00Z 2026-11-01T05:30:00Z 2026-11-01T06:30:00Z"
        );
    }

    #[test]
    fn london_spring_forward_and_fall_back() {
        // 2026-03-29: 01:00 GMT jumps to 02:00 BST, so 01:30 does not exist (fires at 02:00).
        let got = fires(
            "30 1 * * *",
            "Europe/London",
            "2026-03-28T00:00:00Z",
            "2026-03-31T00:00:00Z",
        );
        assert_eq!(
            got,
            "2026-03-28T01:30:00Z 2026-03-29T01:00:00Z 2026-03-30T00:30:00Z"
        );
        let got = fires(
            "30 2 * * *",
            "Europe/London",
            "2026-03-28T00:00:00Z",
            "2026-03-31T00:00:00Z",
        );
        assert_eq!(
            got,
            "2026-03-28T02:30:00Z 2026-03-29T01:30:00Z 2026-03-30T01:30:00Z"
        );
        // 2026-10-25: 02:00 BST falls back to 01:00 GMT; 01:30 happens twice, fires once.
        let got = fires(
            "30 1 * * *",
            "Europe/London",
            "2026-10-24T00:00:00Z",
            "2026-10-27T00:00:00Z",
        );
        assert_eq!(
            got,
            "2026-10-24T00:30:00Z 2026-10-25T00:30:00Z 2026-10-26T01:30:00Z"
        );
        let got = fires(
            "30 2 * * *",
            "Europe/London",
            "2026-10-24T00:00:00Z",
            "2026-10-27T00:00:00Z",
        );
        assert_eq!(
            got,
            "2026-10-24T01:30:00Z 2026-10-25T02:30:00Z 2026-10-26T02:30:00Z"
        );
    }

    #[test]
    fn paris_evening_job_follows_the_offset() {
        let at =
            |schedule, from| next_after(schedule, "Europe/Paris", ts(from)).map(|t| t.to_string());
        assert_eq!(
            at("0 20 * * *", "2026-01-15T12:00:00Z"),
            Ok("2026-01-15T19:00:00Z".into())
        );
        assert_eq!(
            at("0 20 * * *", "2026-07-15T12:00:00Z"),
            Ok("2026-07-15T18:00:00Z".into())
        );
        // Monday 09:00 (the weekly digest): 2026-03-30 is the first Monday in summer time.
        assert_eq!(
            at("0 9 * * 1", "2026-03-28T00:00:00Z"),
            Ok("2026-03-30T07:00:00Z".into())
        );
    }

    #[test]
    fn six_fields_are_seconds_and_bad_input_is_explained() {
        let at = next_after("15 0 20 * * *", "UTC", ts("2026-01-15T12:00:00Z"));
        assert_eq!(at, Ok(ts("2026-01-15T20:00:15Z")));
        for bad in ["0 20 * *", "0 0 20 * * * 2026", "61 * * * *", ""] {
            assert!(parse_schedule(bad).is_err(), "{bad}");
        }
        let err = next_after("0 20 * * *", "Mars/Olympus", ts("2026-01-15T12:00:00Z"));
        assert!(err.is_err_and(|e| e.contains("Mars/Olympus")));
    }
}
