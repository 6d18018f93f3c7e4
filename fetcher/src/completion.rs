//! Background completion of a whole blob: its bytes fetched in order, in steps of [`STEP`]
//! bytes, [`STREAMS`] ranged requests at once (one stream rarely fills a link with a long
//! round trip, and a registry's storage often serves each request at a capped rate), at most
//! a configured rate. While foreground reads are fetching, one step at a time goes on: the
//! reads jump the queue, but completion never stops (stargz-snapshotter pauses its
//! background fetch for 5 s after any read; a container reading much keeps it paused).
//!
//! A blob is completed from its mount (`fetch.background`), or once reads have brought in a
//! share of it ([`read_most`], `fetch.complete_after_percent`, off by default: started midway
//! it fetches again bytes that reads are fetching, README "Completion started by reads").

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::error::FetchError;
use crate::reference::BlobRef;

/// One step: large enough to coalesce, small enough to pace and to yield between steps.
pub const STEP: u64 = 4 << 20;
/// Steps in flight at once while no foreground read is fetching.
pub const STREAMS: usize = 4;

/// How often [`read_most`] looks at what is cached: often enough that a container reading a
/// layer through at link speed gains most of the completion, rarely enough to cost nothing.
pub const READ_POLL: Duration = Duration::from_millis(250);

/// Returns once `cached()` says at least `share` (0 < share <= 1) of a `size`-byte blob is
/// cached; never if it does not come to that (the caller's task ends with its layer).
pub async fn read_most(cached: impl Fn() -> u64, size: u64, share: f64) {
    let wanted = (size as f64 * share).ceil() as u64;
    let mut poll = tokio::time::interval(READ_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        if cached() >= wanted {
            return;
        }
    }
}

/// How one blob is completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes per second at most; `None`: as fast as the link and the fetcher go.
    pub rate: Option<u64>,
    /// Steps in flight at once when foreground reads are quiet (at least one).
    pub streams: usize,
}

impl Completion {
    pub fn new(rate: Option<u64>) -> Completion {
        Completion {
            rate,
            streams: STREAMS,
        }
    }

    /// Runs `step` over all of `blob` in [`STEP`]-byte ranges, in order, up to `streams` at
    /// once, but one while `foreground()` says reads are fetching; ends at the first failed
    /// step (the steps in flight are dropped) or when every step succeeded.
    pub async fn run<F, Fut>(
        &self,
        blob: &BlobRef,
        foreground: impl Fn() -> bool,
        step: F,
    ) -> Result<(), FetchError>
    where
        F: Fn(Range<u64>) -> Fut,
        Fut: Future<Output = Result<(), FetchError>>,
    {
        let started = Instant::now();
        // When the step starting at `offset` is due: paced against the start, so a slow
        // step is not followed by a burst.
        let due = |offset: u64| {
            self.rate
                .map(|rate| started + Duration::from_secs_f64(offset as f64 / rate.max(1) as f64))
        };
        let mut next = 0;
        let mut in_flight = FuturesUnordered::new();
        loop {
            let limit = if foreground() { 1 } else { self.streams.max(1) };
            let mut wake = None;
            while in_flight.len() < limit && next < blob.size {
                if let Some(at) = due(next).filter(|at| *at > Instant::now()) {
                    wake = Some(at);
                    break;
                }
                let end = (next + STEP).min(blob.size);
                in_flight.push(step(next..end));
                next = end;
            }
            if in_flight.is_empty() {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => return Ok(()),
                }
                continue;
            }
            match wake {
                Some(at) => {
                    tokio::select! {
                        done = in_flight.next() => done.unwrap_or(Ok(()))?,
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => in_flight.next().await.unwrap_or(Ok(()))?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::reference::ImageRef;
    use crate::Digest;

    fn blob(size: u64) -> BlobRef {
        BlobRef::new(
            ImageRef::repository("registry.test", "team/layer").unwrap(),
            Digest::of(b"blob"),
            size,
        )
    }

    /// Runs a completion of a `size`-byte blob whose steps each take `took`; the ranges
    /// asked for and the most in flight at once.
    async fn run(
        completion: Completion,
        size: u64,
        foreground: &AtomicBool,
        took: Duration,
    ) -> (Vec<Range<u64>>, usize) {
        let asked = Mutex::new(Vec::new());
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        completion
            .run(
                &blob(size),
                || foreground.load(Ordering::SeqCst),
                |range| {
                    asked.lock().unwrap().push(range);
                    let (now, most) = (&now, &most);
                    async move {
                        let count = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(count, Ordering::SeqCst);
                        tokio::time::sleep(took).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    }
                },
            )
            .await
            .unwrap();
        (asked.into_inner().unwrap(), most.into_inner())
    }

    #[tokio::test(start_paused = true)]
    async fn every_byte_is_asked_for_once_in_order_several_steps_at_once() {
        let size = 10 * STEP + 5;
        let quiet = AtomicBool::new(false);
        let started = Instant::now();
        let (asked, most) = run(Completion::new(None), size, &quiet, Duration::from_secs(1)).await;
        let expected: Vec<Range<u64>> = (0..11)
            .map(|i| i * STEP..((i + 1) * STEP).min(size))
            .collect();
        assert_eq!(asked, expected);
        assert_eq!(most, STREAMS);
        // 11 one-second steps, four at a time: three rounds.
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn foreground_reads_leave_one_step_in_flight_never_none() {
        let busy = AtomicBool::new(true);
        let started = Instant::now();
        let (asked, most) = run(
            Completion::new(None),
            6 * STEP,
            &busy,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(asked.len(), 6);
        assert_eq!(most, 1);
        assert_eq!(started.elapsed(), Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn read_most_returns_once_the_share_is_cached_and_not_before() {
        let cached = AtomicUsize::new(0);
        let started = Instant::now();
        let waiting = read_most(|| cached.load(Ordering::SeqCst) as u64, 1000, 0.5);
        tokio::pin!(waiting);
        // 499 of 1000 bytes: not yet, however long it waits.
        cached.store(499, Ordering::SeqCst);
        assert!(tokio::time::timeout(Duration::from_secs(60), &mut waiting)
            .await
            .is_err());
        cached.store(500, Ordering::SeqCst);
        waiting.await;
        assert!(started.elapsed() <= Duration::from_secs(60) + READ_POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_paces_the_steps_against_the_start() {
        let quiet = AtomicBool::new(false);
        let started = Instant::now();
        // 8 steps at one step per second: the last starts at 7 s and takes no time.
        let completion = Completion::new(Some(STEP));
        let (asked, _) = run(completion, 8 * STEP, &quiet, Duration::ZERO).await;
        assert_eq!(asked.len(), 8);
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_step_ends_the_completion_with_its_error() {
        let asked = AtomicUsize::new(0);
        let failed = Completion::new(None)
            .run(
                &blob(8 * STEP),
                || false,
                |range| {
                    asked.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if range.start == 2 * STEP {
                            Err(FetchError::CacheTask {
                                block: crate::cache::BlockKey::new(Digest::of(b"blob"), 2),
                                reason: "test".into(),
                            })
                        } else {
                            Ok(())
                        }
                    }
                },
            )
            .await;
        assert!(failed.is_err());
        assert!(
            asked.load(Ordering::SeqCst) < 8,
            "steps went on after a failure"
        );
    }
}
