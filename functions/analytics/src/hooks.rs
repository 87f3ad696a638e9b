//! What reacts to closed buckets — threshold crossings ([`crate::thresholds`]) and anomaly
//! detection ([`crate::anomalies`]): [`on_bucket_closed`] is called once for every bucket
//! the closer closes (also one without events: a value falling to nothing is what a `lt`
//! threshold or a dip is about), with the series that changed in it, after its frames went
//! out.

use std::sync::Arc;

use redis::aio::ConnectionManager;

use crate::config::AnalyticsConfig;

/// What a series measures.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Events of every type.
    Total,
    /// Events of one type (`word_added`, ...).
    Type(String),
    /// Words written (from `writing.word_added`).
    Words,
}

/// One series' value in a closed bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// `None` for the overall series.
    pub project: Option<String>,
    pub metric: Metric,
    /// The bucket's count (not a running total).
    pub value: i64,
}

/// A bucket that was closed and pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedBucket {
    pub start_ms: u64,
    pub end_ms: u64,
    pub resolution_ms: u64,
    /// Every series with a count in this bucket (unchanged series are absent), sorted by
    /// project (overall first) then metric.
    pub changes: Vec<Change>,
}

/// What a hook may use: publish events (e.g. `analytics.threshold_crossed`) and keep state.
#[derive(Clone)]
pub struct HookContext {
    pub js: async_nats::jetstream::Context,
    pub redis: ConnectionManager,
    pub config: Arc<AnalyticsConfig>,
}

/// A bucket hash field as a series (`store::field`, `store::words_field`); `None` for a
/// field that is not a bucket series.
pub fn parse_field(field: &str) -> Option<(Option<String>, Metric)> {
    let (project, rest) = match field.strip_prefix("p:") {
        Some(r) => {
            let (p, rest) = r.split_once(':')?;
            (Some(p.to_string()), rest)
        }
        None => (None, field),
    };
    let metric = match rest {
        "total" => Metric::Total,
        "words" => Metric::Words,
        r => Metric::Type(r.strip_prefix("t:")?.to_string()),
    };
    Some((project, metric))
}

/// Called once per closed bucket (by the instance holding the push lease), after the
/// bucket's frames were published. Thresholds and anomaly detection hook in here; an error
/// is logged and does not hold up the next bucket. (If the instance fails between this call
/// and recording the bucket as pushed, the next holder of the lease calls it again for the
/// same bucket: hooks should publish with ids derived from the bucket.)
pub async fn on_bucket_closed(ctx: &HookContext, bucket: &ClosedBucket) -> anyhow::Result<()> {
    // Both run; the first error is reported after both had their turn.
    let thresholds = crate::thresholds::evaluate(ctx, bucket).await;
    let anomalies = crate::anomalies::on_bucket_closed(ctx, bucket).await;
    thresholds.and(anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_parse_as_series() {
        assert_eq!(parse_field("total"), Some((None, Metric::Total)));
        assert_eq!(
            parse_field("p:p-1:t:word_added"),
            Some((Some("p-1".into()), Metric::Type("word_added".into())))
        );
        assert_eq!(
            parse_field("p:p-1:words"),
            Some((Some("p-1".into()), Metric::Words))
        );
        assert_eq!(parse_field("d:0:units"), None);
    }
}
