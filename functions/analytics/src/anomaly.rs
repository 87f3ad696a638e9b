//! The anomaly detector: is a series' newest value far from what its history says it
//! should be?
//!
//! A robust z-score, with the week as the season (writing and sales have daily and weekly
//! rhythms: a quiet Sunday night is not an anomaly).
//!
//! - **Seasonal expectation.** With at least [`DetectorConfig::min_seasons`] earlier weeks,
//!   the expected value is the median of the values at the same time of the week in those
//!   weeks, times the series' current level: the median ratio of the recent values to
//!   their own seasonal medians. A series that grew 20 % since last month is expected 20 %
//!   higher at every time of the week.
//! - **Recent expectation.** With fewer weeks, the expected value is the median of the
//!   recent values (the last [`DetectorConfig::recent`] points).
//! - **Spread.** The scale is 1.4826 × the median absolute deviation of the recent values
//!   from their expectations (a standard deviation if the noise were normal, unmoved by
//!   the outliers it is looking for), never below √expected (counts are at least
//!   Poisson-noisy) nor below [`DetectorConfig::min_scale`].
//! - **Decision.** `score = |value − expected| / scale`; an anomaly is a score of at least
//!   [`DetectorConfig::threshold`] with `|value − expected|` at least
//!   [`DetectorConfig::min_delta`] (one event more than usual is never an anomaly).
//! - **Minimum history.** No decision before [`DetectorConfig::min_history`] recent points:
//!   a new series has no baseline yet.
//!
//! The detector is pure: the caller gives it the newest value and the history, and turns a
//! detection into an `analytics.anomaly_detected` event.

/// The detector's settings. The defaults are the ones the tests hold to their targets:
/// recall ≥ 0.9 on planted spikes and dips, at most one false alarm per simulated day of
/// one-minute points.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorConfig {
    /// Recent points the level and the spread are taken from.
    pub recent: usize,
    /// Recent points needed before any decision.
    pub min_history: usize,
    /// Earlier weeks needed for the seasonal expectation.
    pub min_seasons: usize,
    /// The score at which a value is an anomaly.
    pub threshold: f64,
    /// The smallest distance from the expectation that can be an anomaly.
    pub min_delta: f64,
    /// The smallest spread.
    pub min_scale: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            recent: 60,
            min_history: 30,
            min_seasons: 2,
            threshold: 4.5,
            min_delta: 5.0,
            min_scale: 1.0,
        }
    }
}

/// Which way the value left its expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Spike,
    Dip,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Spike => "spike",
            Direction::Dip => "dip",
        }
    }
}

/// A value the history did not expect.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub value: f64,
    pub expected: f64,
    pub score: f64,
    pub direction: Direction,
    /// Whether the expectation came from earlier weeks (else from the recent values).
    pub seasonal: bool,
}

/// One recent point: its value and, when the series has earlier weeks, the median of the
/// values at the same time of the week in those weeks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub value: f64,
    pub seasonal: Option<f64>,
}

/// The history of a series at the time of its newest value.
#[derive(Debug, Clone, Default)]
pub struct History<'a> {
    /// The points before the newest, oldest first (only the last `recent` are used).
    pub recent: &'a [Point],
    /// The values around the newest value's time of the week in earlier weeks (the caller
    /// picks the neighbourhood: a few points either side smooth the expectation).
    pub same_time_earlier_weeks: &'a [f64],
    /// How many earlier weeks those values come from.
    pub earlier_weeks: usize,
}

/// The median of `values` (`None` when empty). Sorts a copy.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Decides whether `value` is an anomaly given `history`.
pub fn detect(value: f64, history: &History<'_>, config: &DetectorConfig) -> Option<Anomaly> {
    if !value.is_finite() {
        return None;
    }
    let recent = &history.recent[history.recent.len().saturating_sub(config.recent)..];
    if recent.len() < config.min_history {
        return None;
    }
    let seasonal_now = (history.earlier_weeks >= config.min_seasons)
        .then(|| median(history.same_time_earlier_weeks))
        .flatten();
    // The seasonal path needs the recent points' own seasonal medians for the level.
    let seasonal_recent: Vec<(f64, f64)> = recent
        .iter()
        .filter_map(|p| p.seasonal.map(|s| (p.value, s)))
        .collect();
    let (expected, residuals, seasonal) = match seasonal_now {
        Some(now) if seasonal_recent.len() >= config.min_history => {
            // The level: how the series stands against its season lately (1 when the
            // season is empty, so that an empty time of the week does not divide by 0).
            let ratios: Vec<f64> = seasonal_recent
                .iter()
                .filter(|(_, s)| *s > 0.0)
                .map(|(v, s)| v / s)
                .collect();
            let level = median(&ratios).unwrap_or(1.0);
            let residuals: Vec<f64> = seasonal_recent.iter().map(|(v, s)| v - s * level).collect();
            (now * level, residuals, true)
        }
        _ => {
            let values: Vec<f64> = recent.iter().map(|p| p.value).collect();
            let center = median(&values)?;
            let residuals: Vec<f64> = values.iter().map(|v| v - center).collect();
            (center, residuals, false)
        }
    };
    let deviations: Vec<f64> = residuals.iter().map(|r| r.abs()).collect();
    let mad = median(&deviations).unwrap_or(0.0);
    let scale = (1.4826 * mad)
        .max(expected.max(0.0).sqrt())
        .max(config.min_scale);
    let delta = value - expected;
    let score = delta.abs() / scale;
    (score >= config.threshold && delta.abs() >= config.min_delta).then_some(Anomaly {
        value,
        expected,
        score,
        direction: if delta > 0.0 {
            Direction::Spike
        } else {
            Direction::Dip
        },
        seasonal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: usize = 1_440; // one-minute points
    const WEEK: usize = 7 * DAY;

    /// splitmix64: a deterministic generator for the synthetic series (no dependency for
    /// a test's noise).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn uniform(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }

        /// A Poisson count with mean `mean` (Knuth's method, in pieces of at most 30 so
        /// that `exp(-mean)` does not underflow).
        fn poisson(&mut self, mean: f64) -> f64 {
            let mut left = mean;
            let mut total = 0u64;
            while left > 0.0 {
                let part = left.min(30.0);
                left -= part;
                let limit = (-part).exp();
                let mut p = 1.0;
                let mut k = 0u64;
                loop {
                    p *= self.uniform();
                    if p <= limit {
                        break;
                    }
                    k += 1;
                }
                total += k;
            }
            total as f64
        }
    }

    /// The mean at minute `t`: a daily cycle (quiet nights), quieter weekends, slow growth.
    fn rate(t: usize, base: f64) -> f64 {
        let day_phase = (t % DAY) as f64 / DAY as f64;
        let daily = 0.55 - 0.45 * (2.0 * std::f64::consts::PI * day_phase).cos();
        let weekday = (t / DAY) % 7;
        let weekly = if weekday >= 5 { 0.6 } else { 1.0 };
        let growth = 1.0 + 0.1 * t as f64 / (4 * WEEK) as f64;
        base * daily * weekly * growth
    }

    struct Outcome {
        planted: usize,
        found: usize,
        false_alarms: usize,
        days: usize,
        worst_day: usize,
    }

    /// Runs the detector over `weeks` weeks of one-minute points of a series with mean
    /// `base`, with a spike (×`spike`) or a dip (×`dip`) planted at random minutes of the
    /// evaluated days, and counts what it finds. The first `warmup` weeks only build
    /// history.
    fn simulate(
        config: &DetectorConfig,
        seed: u64,
        base: f64,
        weeks: usize,
        warmup: usize,
        spike: f64,
        dip: f64,
    ) -> Outcome {
        let mut rng = Rng(seed);
        let n = weeks * WEEK;
        let start = warmup * WEEK;
        // About 8 planted anomalies per evaluated day, at least an hour apart.
        let mut planted = vec![None; n];
        // Planted where they stand out of the noise: a spike where at least 10 a minute
        // are expected (tripled: 20 more, ≥ 6 noise deviations), a dip where at least 40
        // are (a tenth: 36 fewer, ≥ 5.5 deviations). Lower, Poisson noise hides them.
        let mut t = start + 60;
        while t < n {
            let factor = if rng.uniform() < 0.5 { spike } else { dip };
            let floor = if factor > 1.0 { 10.0 } else { 40.0 };
            if rate(t, base) >= floor {
                planted[t] = Some(factor);
            }
            t += 120 + (rng.next() % 120) as usize;
        }
        let values: Vec<f64> = (0..n)
            .map(|t| {
                let mean = rate(t, base) * planted[t].unwrap_or(1.0);
                rng.poisson(mean)
            })
            .collect();
        // As the worker expects a minute: from the hour it falls in, in each earlier week
        // (the 1 h rollup, per minute). An hour is smooth where one minute of one week is
        // noise.
        let hourly: Vec<f64> = values
            .chunks(60)
            .map(|h| h.iter().sum::<f64>() / 60.0)
            .collect();
        let seasonal_at = |t: usize| -> Vec<f64> {
            (1..=t / WEEK)
                .map(|w| hourly[(t - w * WEEK) / 60])
                .collect()
        };
        let points: Vec<Point> = (0..n)
            .map(|t| {
                let earlier = seasonal_at(t);
                Point {
                    value: values[t],
                    seasonal: (t / WEEK >= config.min_seasons)
                        .then(|| median(&earlier))
                        .flatten(),
                }
            })
            .collect();
        let (mut found, mut false_alarms, mut planted_count) = (0, 0, 0);
        let mut per_day = vec![0usize; weeks * 7];
        for t in start..n {
            // The history as the worker would keep it: planted points are in it too.
            let earlier = seasonal_at(t);
            let history = History {
                recent: &points[t.saturating_sub(config.recent)..t],
                same_time_earlier_weeks: &earlier,
                earlier_weeks: t / WEEK,
            };
            let hit = detect(values[t], &history, config);
            match (planted[t], hit) {
                (Some(_), hit) => {
                    planted_count += 1;
                    found += usize::from(hit.is_some());
                }
                (None, Some(_)) => {
                    false_alarms += 1;
                    per_day[t / DAY] += 1;
                }
                (None, None) => {}
            }
        }
        Outcome {
            planted: planted_count,
            found,
            false_alarms,
            days: (weeks - warmup) * 7,
            worst_day: per_day.into_iter().max().unwrap_or(0),
        }
    }

    fn check(o: &Outcome, what: &str) {
        let recall = o.found as f64 / o.planted as f64;
        assert!(
            recall >= 0.9,
            "{what}: recall {recall:.3} ({} of {})",
            o.found,
            o.planted
        );
        assert!(
            o.false_alarms <= o.days,
            "{what}: {} false alarms in {} days",
            o.false_alarms,
            o.days
        );
        assert!(
            o.worst_day <= 1,
            "{what}: {} false alarms in one day",
            o.worst_day
        );
        eprintln!(
            "{what}: recall {recall:.3} ({} of {}), {} false alarms in {} days",
            o.found, o.planted, o.false_alarms, o.days
        );
    }

    #[test]
    fn seasonal_series_spikes_and_dips_are_found_with_few_false_alarms() {
        // Four weeks: two of history, two evaluated with the seasonal expectation.
        for seed in [1, 2, 3] {
            let o = simulate(&DetectorConfig::default(), seed, 100.0, 4, 2, 3.0, 0.1);
            check(&o, &format!("seasonal, seed {seed}"));
        }
    }

    #[test]
    fn without_earlier_weeks_the_recent_values_do_nearly_as_well() {
        // The same series with the seasonal expectation switched off.
        let config = DetectorConfig {
            min_seasons: usize::MAX,
            ..DetectorConfig::default()
        };
        for seed in [1, 2, 3] {
            let o = simulate(&config, seed, 100.0, 1, 0, 3.0, 0.1);
            check(&o, &format!("recent only, seed {seed}"));
        }
    }

    #[test]
    fn a_young_series_uses_its_recent_values() {
        // One week evaluated from the second day on, without earlier weeks.
        let config = DetectorConfig::default();
        let mut rng = Rng(7);
        let values: Vec<f64> = (0..DAY * 2).map(|_| rng.poisson(40.0)).collect();
        let points: Vec<Point> = values
            .iter()
            .map(|&value| Point {
                value,
                seasonal: None,
            })
            .collect();
        let mut false_alarms = 0;
        for t in DAY..2 * DAY {
            let h = History {
                recent: &points[t - config.recent..t],
                same_time_earlier_weeks: &[],
                earlier_weeks: 0,
            };
            false_alarms += usize::from(detect(values[t], &h, &config).is_some());
        }
        assert!(false_alarms <= 1, "{false_alarms} false alarms in a day");
        let h = History {
            recent: &points[DAY - config.recent..DAY],
            same_time_earlier_weeks: &[],
            earlier_weeks: 0,
        };
        let spike = detect(120.0, &h, &config).expect("a tripled minute is a spike");
        assert_eq!(spike.direction, Direction::Spike);
        assert!(!spike.seasonal);
        let dip = detect(4.0, &h, &config).expect("a minute at a tenth is a dip");
        assert_eq!(dip.direction, Direction::Dip);
    }

    #[test]
    fn no_decision_without_enough_history_and_small_deltas_are_never_anomalies() {
        let config = DetectorConfig::default();
        let few = vec![
            Point {
                value: 1.0,
                seasonal: None
            };
            config.min_history - 1
        ];
        let h = History {
            recent: &few,
            same_time_earlier_weeks: &[],
            earlier_weeks: 0,
        };
        assert_eq!(detect(1_000.0, &h, &config), None);
        // A quiet series: 0 or 1 a minute; 4 is far in z but below min_delta.
        let quiet: Vec<Point> = (0..60)
            .map(|i| Point {
                value: (i % 2) as f64,
                seasonal: None,
            })
            .collect();
        let h = History {
            recent: &quiet,
            same_time_earlier_weeks: &[],
            earlier_weeks: 0,
        };
        assert_eq!(detect(4.0, &h, &config), None);
        assert!(detect(20.0, &h, &config).is_some());
        assert_eq!(detect(f64::NAN, &h, &config), None);
    }

    #[test]
    fn a_quiet_time_of_the_week_is_not_a_dip() {
        // Weekday afternoons at 100, Sunday nights at 5: the seasonal expectation for a
        // Sunday night is 5, so 5 is normal and 100 is a spike.
        let config = DetectorConfig::default();
        let recent: Vec<Point> = (0..60)
            .map(|i| Point {
                value: 5.0 + (i % 3) as f64,
                seasonal: Some(6.0),
            })
            .collect();
        let h = History {
            recent: &recent,
            same_time_earlier_weeks: &[5.0, 6.0, 7.0],
            earlier_weeks: 3,
        };
        assert_eq!(detect(5.0, &h, &config), None);
        let a = detect(100.0, &h, &config).expect("spike");
        assert!(a.seasonal);
        assert!((a.expected - 6.0).abs() < 1.0, "{a:?}");
    }
}
