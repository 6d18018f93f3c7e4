//! Noticing a cache too small for its working set: blocks stored again soon after they were
//! evicted to make room. Each such refetch is counted; when [`THRESHOLD`] of them fall within
//! one [`WINDOW`], a report is due, at most once per [`REPORT_EVERY`], so that an operator
//! sees one warning with the numbers, not one per block.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::BlockKey;

/// How recent an eviction must be for storing its block again to count as thrashing.
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// Refetches within one window that make a report due.
pub(super) const THRESHOLD: usize = 64;
/// At most one report per this long.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(600);
/// Evictions remembered; older ones are forgotten first.
const MAX_REMEMBERED: usize = 1 << 16;

/// What a thrashing report says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ThrashReport {
    /// Blocks stored again within [`WINDOW`] of their eviction, in the last window.
    pub blocks: usize,
    /// Their bytes: how far the working set exceeds the cache, at least.
    pub bytes: u64,
}

#[derive(Debug, Default)]
pub(super) struct Thrash {
    evicted: HashMap<BlockKey, Instant>,
    order: VecDeque<(BlockKey, Instant)>,
    /// Refetches of the last window: when, and how many bytes.
    refetched: VecDeque<(Instant, u64)>,
    /// Refetches since start.
    total: u64,
    last_report: Option<Instant>,
}

impl Thrash {
    /// Block `key` was evicted to make room at `now`.
    pub fn evicted(&mut self, key: BlockKey, now: Instant) {
        if self.order.len() >= MAX_REMEMBERED {
            if let Some((old, at)) = self.order.pop_front() {
                if self.evicted.get(&old) == Some(&at) {
                    self.evicted.remove(&old);
                }
            }
        }
        self.evicted.insert(key, now);
        self.order.push_back((key, now));
    }

    /// Block `key` of `len` bytes is being stored at `now`; a report when one is due.
    pub fn stored(&mut self, key: BlockKey, len: u64, now: Instant) -> Option<ThrashReport> {
        let evicted_at = self.evicted.remove(&key)?;
        if now.saturating_duration_since(evicted_at) > WINDOW {
            return None;
        }
        self.total += 1;
        self.refetched.push_back((now, len));
        while let Some(&(at, _)) = self.refetched.front() {
            if now.saturating_duration_since(at) <= WINDOW {
                break;
            }
            self.refetched.pop_front();
        }
        let due = self.refetched.len() >= THRESHOLD
            && self
                .last_report
                .is_none_or(|last| now.saturating_duration_since(last) >= REPORT_EVERY);
        if !due {
            return None;
        }
        self.last_report = Some(now);
        Some(ThrashReport {
            blocks: self.refetched.len(),
            bytes: self.refetched.iter().map(|(_, len)| len).sum(),
        })
    }

    /// Blocks stored again soon after their eviction, since start.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn key(index: u64) -> BlockKey {
        BlockKey::new(Digest::of(b"blob"), index)
    }

    #[test]
    fn refetches_soon_after_eviction_report_once_per_period() {
        let start = Instant::now();
        let mut thrash = Thrash::default();
        let mut reports = Vec::new();
        // Every second, a block is evicted and a block evicted a second earlier comes back.
        for round in 0..(THRESHOLD as u64 * 3) {
            let now = start + Duration::from_millis(200 * round);
            thrash.evicted(key(round), now);
            if round > 0 {
                reports.extend(thrash.stored(key(round - 1), 4096, now));
            }
        }
        assert_eq!(thrash.total(), THRESHOLD as u64 * 3 - 1);
        assert_eq!(reports.len(), 1, "one report per period: {reports:?}");
        assert_eq!(reports[0].blocks, THRESHOLD);
        assert_eq!(reports[0].bytes, THRESHOLD as u64 * 4096);
        // After the period, a sustained thrash is reported again.
        let later = start + REPORT_EVERY + Duration::from_secs(60);
        let mut again = None;
        for i in 0..THRESHOLD as u64 {
            let now = later + Duration::from_millis(100 * i);
            thrash.evicted(key(10_000 + i), now);
            again = again.or(thrash.stored(key(10_000 + i), 4096, now));
        }
        assert!(again.is_some());
    }

    #[test]
    fn blocks_stored_long_after_eviction_or_never_evicted_are_not_thrashing() {
        let start = Instant::now();
        let mut thrash = Thrash::default();
        for i in 0..(THRESHOLD as u64 * 2) {
            thrash.evicted(key(i), start);
        }
        let late = start + WINDOW + Duration::from_secs(1);
        for i in 0..(THRESHOLD as u64 * 2) {
            assert_eq!(thrash.stored(key(i), 4096, late), None);
            assert_eq!(thrash.stored(key(1_000 + i), 4096, late), None);
        }
        assert_eq!(thrash.total(), 0);
    }
}
