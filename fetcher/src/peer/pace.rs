//! [`Pace`]: how fast peers have been sending blocks, to tell a slow answer from a long one.
//!
//! A request is hedged (sent to a second holder too) once it has taken well over what its
//! size should take at the pace peers have shown; a fixed delay would either hedge every
//! large range or wait far too long on a stalled small one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The pace assumed before any peer has sent anything: a 100 Mbit/s link.
const PRIOR_BYTES_PER_SEC: u64 = 12_500_000;
/// Slowest and fastest pace believed, so one odd transfer cannot make hedging absurd.
const MIN_BYTES_PER_SEC: u64 = 1_000_000;
const MAX_BYTES_PER_SEC: u64 = 2_000_000_000;
/// A transfer is late at this many times its expected duration.
const LATE_FACTOR: u32 = 3;
/// Transfers shorter than this say more about latency than pace and are not counted.
const MIN_SAMPLE_BYTES: u64 = 64 << 10;

/// An exponentially weighted mean of the bytes per second that peers sent.
pub struct Pace {
    bytes_per_sec: AtomicU64,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            bytes_per_sec: AtomicU64::new(PRIOR_BYTES_PER_SEC),
        }
    }
}

impl Pace {
    /// Counts a transfer of `bytes` that took `took`.
    pub fn observe(&self, bytes: u64, took: Duration) {
        if bytes < MIN_SAMPLE_BYTES || took.is_zero() {
            return;
        }
        let sample = (bytes as f64 / took.as_secs_f64()) as u64;
        let sample = sample.clamp(MIN_BYTES_PER_SEC, MAX_BYTES_PER_SEC);
        // Races between updates lose a sample at worst.
        let old = self.bytes_per_sec.load(Ordering::Relaxed);
        let new = (old / 5) * 4 + sample / 5;
        self.bytes_per_sec.store(new, Ordering::Relaxed);
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    /// How long to wait on a request for `bytes` before asking a second holder: a few times
    /// the expected transfer, at least an eighth of the `budget` (latency dominates small
    /// requests) and at most half of it (the second request needs time too).
    pub fn hedge_after(&self, bytes: u64, budget: Duration) -> Duration {
        let expected = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec() as f64);
        (expected * LATE_FACTOR)
            .max(budget / 8)
            .min(budget / 2)
            .max(Duration::from_millis(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Duration = Duration::from_secs(2);

    #[test]
    fn small_requests_hedge_after_an_eighth_of_the_budget_and_large_ones_later() {
        let pace = Pace::default();
        assert_eq!(pace.hedge_after(4096, BUDGET), BUDGET / 8);
        // 2.5 MB at 12.5 MB/s is 200 ms; three times that.
        let large = pace.hedge_after(2_500_000, BUDGET);
        assert!((large.as_millis() as i64 - 600).abs() <= 1, "{large:?}");
        assert_eq!(pace.hedge_after(1 << 30, BUDGET), BUDGET / 2);
    }

    #[test]
    fn the_pace_follows_what_peers_send_and_ignores_tiny_transfers() {
        let pace = Pace::default();
        for _ in 0..40 {
            pace.observe(10_000_000, Duration::from_millis(100));
        }
        let fast = pace.bytes_per_sec();
        assert!(fast > 90_000_000, "{fast}");
        pace.observe(100, Duration::from_secs(10));
        assert_eq!(pace.bytes_per_sec(), fast);
        // A stalled transfer cannot drag the pace below the floor.
        for _ in 0..100 {
            pace.observe(1 << 20, Duration::from_secs(3600));
        }
        assert_eq!(pace.bytes_per_sec(), MIN_BYTES_PER_SEC);
    }
}
