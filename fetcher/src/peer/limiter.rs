//! [`UploadLimiter`]: what this node gives its peers: a byte rate shared by every upload and
//! a cap on uploads at once, beyond which a requester hears "busy" and goes elsewhere.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct UploadLimiter {
    slots: Arc<Semaphore>,
    max_uploads: usize,
    bucket: Mutex<Bucket>,
}

/// A token bucket holding at most one second of tokens; it may go into debt so that a block
/// larger than the burst still goes out, after the sender has waited for it.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl UploadLimiter {
    pub fn new(rate: u64, max_uploads: usize) -> UploadLimiter {
        UploadLimiter {
            slots: Arc::new(Semaphore::new(max_uploads.max(1))),
            max_uploads: max_uploads.max(1),
            bucket: Mutex::new(Bucket {
                rate: rate.max(1) as f64,
                tokens: rate.max(1) as f64,
                at: Instant::now(),
            }),
        }
    }

    /// An upload slot, or `None` when every slot is taken (the requester is told "busy").
    pub fn try_start(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Uploads under way now: slots taken.
    pub fn in_flight(&self) -> usize {
        self.max_uploads - self.slots.available_permits()
    }

    /// How long the sender of `bytes` must wait to stay within the rate; the bytes are
    /// charged now.
    pub fn charge(&self, bytes: u64) -> Duration {
        self.charge_at(bytes, Instant::now())
    }

    /// [`charge`](Self::charge) at `now`, which is never before the last charge.
    fn charge_at(&self, bytes: u64, now: Instant) -> Duration {
        let mut bucket = self.bucket.lock();
        let now = now.max(bucket.at);
        let refill = now.duration_since(bucket.at).as_secs_f64() * bucket.rate;
        bucket.tokens = (bucket.tokens + refill).min(bucket.rate);
        bucket.at = now;
        bucket.tokens -= bytes as f64;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / bucket.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_enforced_after_the_burst() {
        let limiter = UploadLimiter::new(1000, 4);
        // All at one instant, so that no refill depends on how fast the test runs.
        let now = Instant::now();
        assert_eq!(limiter.charge_at(1000, now), Duration::ZERO);
        assert_eq!(limiter.charge_at(500, now), Duration::from_millis(500));
        // Debt accumulates: the next sender waits for both.
        assert_eq!(limiter.charge_at(500, now), Duration::from_secs(1));
        // And is paid off at the rate.
        let later = now + Duration::from_millis(1500);
        assert_eq!(limiter.charge_at(0, later), Duration::ZERO);
    }

    #[test]
    fn uploads_beyond_the_cap_are_refused() {
        let limiter = UploadLimiter::new(1 << 20, 2);
        let first = limiter.try_start().unwrap();
        let _second = limiter.try_start().unwrap();
        assert!(limiter.try_start().is_none());
        assert_eq!(limiter.in_flight(), 2);
        drop(first);
        assert_eq!(limiter.in_flight(), 1);
        assert!(limiter.try_start().is_some());
    }
}
