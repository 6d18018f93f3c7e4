//! Latency histograms: fixed buckets of atomic counters, cheap enough for every read, rendered
//! by the daemon as Prometheus histograms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::stats::Source;

/// Upper bounds of the buckets, in seconds: a cache hit lands in the first few, a registry
/// round trip over a WAN in the middle, a stalled fetch in the last.
pub const BUCKET_BOUNDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// Observations counted by the first bucket whose bound they do not exceed (plus `+Inf`).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKET_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A point-in-time copy of a [`Histogram`]: per-bucket (not cumulative) counts, the last one
/// for observations above every bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub sum_nanos: u64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKET_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKET_BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_nanos: self.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound, observations at or below it)` per bucket, ending with `+Inf`: the
    /// cumulative form Prometheus expects.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        BUCKET_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(bound, n)| {
                total += n;
                (bound, total)
            })
            .collect()
    }
}

/// How long block reads took, by where their bytes came from.
#[derive(Debug, Default)]
pub struct FetchLatency {
    cache: Histogram,
    registry: Histogram,
    peer: Histogram,
}

impl FetchLatency {
    pub fn observe(&self, source: Source, elapsed: Duration) {
        self.of(source).observe(elapsed);
    }

    pub fn of(&self, source: Source) -> &Histogram {
        match source {
            Source::Cache => &self.cache,
            Source::Registry => &self.registry,
            Source::Peer => &self.peer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_accumulate() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(50));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 3);
        let cumulative = snapshot.cumulative();
        assert_eq!(cumulative[0], (0.0001, 1));
        // 3 ms is above 2.5 ms, at or below 5 ms.
        assert_eq!(cumulative[4].1, 1);
        assert_eq!(cumulative[5], (0.005, 2));
        assert_eq!(cumulative[13].1, 2);
        assert_eq!(cumulative[14], (f64::INFINITY, 3));
        assert_eq!(snapshot.sum_nanos, 60_003_050_000);
    }
}
