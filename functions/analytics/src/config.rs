//! The analytics settings, from `INKWIRE_ANALYTICS_*` environment variables: the bucket
//! length, how long each resolution is kept, the consumer batch and the push ticker.

use std::time::Duration;

use inkwire_shared::config::{ConfigError, parse_duration};

pub const MINUTE_MS: u64 = 60_000;
pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 86_400_000;

/// The analytics settings.
#[derive(Debug, Clone)]
pub struct AnalyticsConfig {
    /// The shortest bucket (`INKWIRE_ANALYTICS_BUCKET`, 5 s): 100 ms to 1 min, dividing a
    /// minute, so that every bucket lies inside one minute bucket.
    pub bucket: Duration,
    /// How long buckets are kept (`INKWIRE_ANALYTICS_BUCKET_RETENTION`, 1 h).
    pub bucket_retention: Duration,
    /// How long minute buckets are kept (`INKWIRE_ANALYTICS_MINUTE_RETENTION`, 2 days).
    pub minute_retention: Duration,
    /// How long hour buckets are kept (`INKWIRE_ANALYTICS_HOUR_RETENTION`, 35 days).
    pub hour_retention: Duration,
    /// How long day buckets and a book's daily sales are kept
    /// (`INKWIRE_ANALYTICS_DAY_RETENTION`, 400 days).
    pub day_retention: Duration,
    /// Messages per fetched batch, applied with one script call (`INKWIRE_ANALYTICS_BATCH`,
    /// 500).
    pub batch: usize,
    /// How often each instance looks for a closed bucket to push
    /// (`INKWIRE_ANALYTICS_PUSH_INTERVAL`, 100 ms).
    pub push_interval: Duration,
    /// Buckets that ended longer ago than this when they could be closed (the workers were
    /// down) are not pushed (`INKWIRE_ANALYTICS_PUSH_HORIZON`, 1 min): a live stream has no
    /// use for them, and they stay readable through the API.
    pub push_horizon: Duration,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            bucket: Duration::from_secs(5),
            bucket_retention: Duration::from_secs(3600),
            minute_retention: Duration::from_secs(2 * 86400),
            hour_retention: Duration::from_secs(35 * 86400),
            day_retention: Duration::from_secs(400 * 86400),
            batch: 500,
            push_interval: Duration::from_millis(100),
            push_horizon: Duration::from_secs(60),
        }
    }
}

impl AnalyticsConfig {
    pub fn from_env() -> Result<AnalyticsConfig, ConfigError> {
        let mut c = AnalyticsConfig::default();
        let durations: [(&'static str, &mut Duration); 7] = [
            ("INKWIRE_ANALYTICS_BUCKET", &mut c.bucket),
            (
                "INKWIRE_ANALYTICS_BUCKET_RETENTION",
                &mut c.bucket_retention,
            ),
            (
                "INKWIRE_ANALYTICS_MINUTE_RETENTION",
                &mut c.minute_retention,
            ),
            ("INKWIRE_ANALYTICS_HOUR_RETENTION", &mut c.hour_retention),
            ("INKWIRE_ANALYTICS_DAY_RETENTION", &mut c.day_retention),
            ("INKWIRE_ANALYTICS_PUSH_INTERVAL", &mut c.push_interval),
            ("INKWIRE_ANALYTICS_PUSH_HORIZON", &mut c.push_horizon),
        ];
        for (name, slot) in durations {
            if let Ok(v) = std::env::var(name) {
                *slot = parse_duration(&v).map_err(|problem| ConfigError { name, problem })?;
                if slot.is_zero() {
                    return Err(ConfigError {
                        name,
                        problem: "must be more than zero".into(),
                    });
                }
            }
        }
        if let Ok(v) = std::env::var("INKWIRE_ANALYTICS_BATCH") {
            c.batch = v
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=5000).contains(n))
                .ok_or_else(|| ConfigError {
                    name: "INKWIRE_ANALYTICS_BATCH",
                    problem: format!("{v:?} is not a number from 1 to 5000"),
                })?;
        }
        c.check().map_err(|problem| ConfigError {
            name: "INKWIRE_ANALYTICS_BUCKET",
            problem,
        })?;
        Ok(c)
    }

    /// The bucket must divide a minute (so rollups are sums of whole buckets).
    pub fn check(&self) -> Result<(), String> {
        let ms = self.bucket_ms();
        if !(100..=MINUTE_MS).contains(&ms) || !MINUTE_MS.is_multiple_of(ms) {
            return Err(format!(
                "{ms} ms: the bucket must be 100 ms to 1 min and divide a minute (e.g. 1s, 5s, 10s)"
            ));
        }
        Ok(())
    }

    pub fn bucket_ms(&self) -> u64 {
        self.bucket.as_millis() as u64
    }

    /// Every resolution, shortest first, with how long its buckets are kept (ms).
    pub fn resolutions(&self) -> Vec<(u64, u64)> {
        let mut out = vec![(self.bucket_ms(), self.bucket_retention.as_millis() as u64)];
        for (res, keep) in [
            (MINUTE_MS, self.minute_retention),
            (HOUR_MS, self.hour_retention),
            (DAY_MS, self.day_retention),
        ] {
            if res > self.bucket_ms() {
                out.push((res, keep.as_millis() as u64));
            }
        }
        out
    }
}

/// `5s`, `1m`, `1h`, `1d`, `500ms`: a length as the API and frames spell it.
pub fn label(ms: u64) -> String {
    if ms.is_multiple_of(DAY_MS) {
        format!("{}d", ms / DAY_MS)
    } else if ms.is_multiple_of(HOUR_MS) {
        format!("{}h", ms / HOUR_MS)
    } else if ms.is_multiple_of(MINUTE_MS) {
        format!("{}m", ms / MINUTE_MS)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_divide_a_minute() {
        let mut c = AnalyticsConfig::default();
        assert!(c.check().is_ok());
        assert_eq!(c.resolutions().len(), 4);
        c.bucket = Duration::from_secs(7);
        assert!(c.check().is_err());
        c.bucket = Duration::from_secs(60);
        assert!(c.check().is_ok());
        assert_eq!(c.resolutions().len(), 3);
        assert_eq!(label(5000), "5s");
        assert_eq!(label(DAY_MS), "1d");
        assert_eq!(label(250), "250ms");
    }
}
