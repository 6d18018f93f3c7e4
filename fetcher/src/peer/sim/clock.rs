//! The simulation's time and chance: a virtual clock with an event queue, a seeded random
//! source, and links that send at a fixed rate, one transfer after another.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Events ordered by virtual time, ties in the order they were scheduled: the same seed
/// replays the same run.
pub struct Queue<E> {
    heap: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    slots: Vec<Option<E>>,
    free: Vec<usize>,
    seq: u64,
    now: Duration,
    /// What virtual time zero is as an [`Instant`], for the daemon's code that takes one.
    base: Instant,
}

impl<E> Queue<E> {
    pub fn new() -> Queue<E> {
        Queue {
            heap: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            seq: 0,
            now: Duration::ZERO,
            base: Instant::now(),
        }
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// `at` as the daemon's code sees time.
    pub fn instant(&self, at: Duration) -> Instant {
        self.base + at
    }

    /// Schedules `event` at `at` (never before now).
    pub fn at(&mut self, at: Duration, event: E) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(event);
                slot
            }
            None => {
                self.slots.push(Some(event));
                self.slots.len() - 1
            }
        };
        self.seq += 1;
        self.heap.push(Reverse((at.max(self.now), self.seq, slot)));
    }

    /// The next event, the clock moved to its time.
    pub fn next(&mut self) -> Option<E> {
        let Reverse((at, _, slot)) = self.heap.pop()?;
        self.now = at;
        self.free.push(slot);
        self.slots[slot].take()
    }
}

/// SplitMix64: small, fast and the same everywhere, which is all a simulation needs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0.0..1.0`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `low..=high`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        low + (high.saturating_sub(low)).mul_f64(self.unit())
    }
}

/// One direction of a link (a node's uplink or downlink, the registry's uplink): it sends
/// at `rate` bytes a second, one transfer after another in the order they came.
pub struct Fifo {
    rate: f64,
    free_at: Duration,
}

impl Fifo {
    pub fn new(rate: f64) -> Fifo {
        Fifo {
            rate,
            free_at: Duration::ZERO,
        }
    }

    /// Queues `bytes` from `now`; when they are through.
    pub fn send(&mut self, now: Duration, bytes: u64) -> Duration {
        let start = self.free_at.max(now);
        self.free_at = start + Duration::from_secs_f64(bytes as f64 / self.rate);
        self.free_at
    }

    /// Queues a job that takes `work` of this server's time (an owner's CPU).
    pub fn serve(&mut self, now: Duration, work: Duration) -> Duration {
        self.free_at = self.free_at.max(now) + work;
        self.free_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_in_time_order_ties_in_schedule_order() {
        let mut queue = Queue::new();
        queue.at(Duration::from_millis(5), 'b');
        queue.at(Duration::from_millis(1), 'a');
        queue.at(Duration::from_millis(5), 'c');
        let order: Vec<char> = std::iter::from_fn(|| queue.next()).collect();
        assert_eq!(order, ['a', 'b', 'c']);
        assert_eq!(queue.now(), Duration::from_millis(5));
    }

    #[test]
    fn a_link_sends_one_transfer_after_another() {
        let mut link = Fifo::new(1000.0);
        assert_eq!(link.send(Duration::ZERO, 500), Duration::from_millis(500));
        assert_eq!(link.send(Duration::ZERO, 500), Duration::from_secs(1));
        assert_eq!(
            link.send(Duration::from_secs(3), 1000),
            Duration::from_secs(4)
        );
    }
}
