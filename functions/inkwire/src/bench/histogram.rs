//! A lock-free latency histogram with about 3% resolution (log-linear buckets over
//! microseconds), so that millions of samples from many tasks cost nothing to record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SUB_BITS: u32 = 5; // 32 buckets per power of two
const BUCKETS: usize = 64 << SUB_BITS;

pub struct Histogram {
    counts: Vec<AtomicU64>,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_us: AtomicU64::new(0),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < (1 << SUB_BITS) {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    let shift = exp - SUB_BITS;
    let mantissa = (us >> shift) & ((1 << SUB_BITS) - 1);
    (((shift + 1) << SUB_BITS) as u64 + mantissa) as usize
}

fn upper_bound_of(bucket: usize) -> u64 {
    if bucket < (1 << SUB_BITS) {
        return bucket as u64;
    }
    let shift = (bucket >> SUB_BITS) as u32 - 1;
    let mantissa = (bucket & ((1 << SUB_BITS) - 1)) as u64;
    (((1u64 << SUB_BITS) + mantissa + 1) << shift) - 1
}

impl Histogram {
    pub fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u64::MAX as u128) as u64;
        self.counts[bucket_of(us).min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The latency below which a fraction `q` of the samples fall, in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= target {
                return upper_bound_of(i).min(self.max_us.load(Ordering::Relaxed)) as f64 / 1000.0;
            }
        }
        self.max_ms()
    }

    pub fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for us in [0u64, 1, 31, 32, 33, 100, 1000, 12_345, 999_999, 10_000_000] {
            let b = bucket_of(us);
            assert!(upper_bound_of(b) >= us, "{us}");
            assert!(
                upper_bound_of(b) as f64 <= us as f64 * 1.07 + 1.0,
                "{us} → {}",
                upper_bound_of(b)
            );
        }
    }

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        assert!((h.quantile_ms(0.5) - 50.0).abs() < 2.0);
        assert!((h.quantile_ms(0.99) - 99.0).abs() < 3.5);
        assert_eq!(h.max_ms(), 100.0);
    }
}
