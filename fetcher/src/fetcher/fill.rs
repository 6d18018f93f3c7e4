//! Background fill: the blocks a foreground read cached only partly are completed from the
//! registry once foreground reads have been quiet for a moment, one block at a time, so that
//! the cache (and the peers it serves) still holds whole blocks, while no fill competes with
//! a read for the link: a read's bytes would queue behind a fill's in the network.
//!
//! The queue is bounded; a block whose blob nobody pins any more (its layer was unmounted)
//! is dropped, with its partial bytes, instead of filled. The worker is a task the fetcher
//! starts when there is work and that ends when the queue is empty or the fetcher is gone.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{Fetcher, Inner};
use crate::cache::BlockKey;
use crate::flight::Joined;
use crate::reference::BlobRef;
use crate::stats::Source;

/// How long foreground fetches must have been quiet before a fill starts: a container's
/// start reads file after file with short pauses, which fills must not fall into.
pub(super) const QUIET: Duration = Duration::from_millis(300);
/// Written bytes between two gaps of a block below which the gaps are fetched as one range.
const MERGE_SLACK: u64 = 16 << 10;
/// Blocks waiting for a fill at most; more are left partial (and dropped at unmount).
const MAX_QUEUED: usize = 4096;

#[derive(Default)]
pub(super) struct Fill {
    queue: Mutex<Queue>,
    /// Foreground fetches under way.
    foreground: AtomicU64,
    /// When the last foreground fetch ended (or started).
    last_foreground: Mutex<Option<Instant>>,
    /// Foreground activity ended, or work arrived, or the worker went idle.
    changed: Notify,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<(BlobRef, u64)>,
    queued: HashSet<BlockKey>,
    /// The block being filled now.
    filling: Option<BlockKey>,
    worker: bool,
}

/// One foreground fetch under way, for as long as it lives.
pub(super) struct Foreground<'a>(&'a Fill);

impl Fill {
    pub(super) fn foreground(&self) -> Foreground<'_> {
        self.foreground.fetch_add(1, Ordering::SeqCst);
        *self.last_foreground.lock() = Some(Instant::now());
        Foreground(self)
    }

    /// How long until foreground fetches have been quiet for [`QUIET`]; zero when they have.
    fn quiet_in(&self) -> Option<Duration> {
        if self.foreground.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = *self.last_foreground.lock();
        Some(last.map_or(Duration::ZERO, |last| QUIET.saturating_sub(last.elapsed())))
    }

    /// Whether foreground fetches are under way.
    pub(super) fn busy(&self) -> bool {
        self.foreground.load(Ordering::SeqCst) > 0
    }

    fn idle(&self) -> bool {
        let queue = self.queue.lock();
        queue.order.is_empty() && queue.filling.is_none()
    }
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        *self.0.last_foreground.lock() = Some(Instant::now());
        self.0.foreground.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl Fetcher {
    /// Queues the blocks `indices` of `blob` that are partly cached for a fill.
    pub(super) fn queue_fill(&self, blob: &BlobRef, indices: Range<u64>) {
        let fill = &self.inner.fill;
        let start = {
            let mut queue = fill.queue.lock();
            for index in indices {
                let key = BlockKey::new(&blob.digest, index);
                let partial = !self.inner.cache.contains(&key);
                if partial && queue.queued.len() < MAX_QUEUED && queue.queued.insert(key) {
                    queue.order.push_back((blob.clone(), index));
                }
            }
            let start = !queue.worker && !queue.order.is_empty();
            queue.worker |= start;
            start
        };
        fill.changed.notify_waiters();
        if start {
            tokio::spawn(fill_worker(fill.clone(), Arc::downgrade(&self.inner)));
        }
    }

    /// Whether reads are fetching bytes a container waits for now.
    pub fn foreground_fetching(&self) -> bool {
        self.inner.fill.busy()
    }

    /// Blocks queued for a fill or being filled now.
    pub fn fill_pending(&self) -> u64 {
        let queue = self.inner.fill.queue.lock();
        queue.order.len() as u64 + u64::from(queue.filling.is_some())
    }

    /// Waits until the reads so far have cached their bytes and every fill they queued is
    /// done: for whoever needs the cache caught up (tests, reports). Fills have deadlines,
    /// so this ends.
    pub async fn filled(&self) {
        self.settled().await;
        let fill = &self.inner.fill;
        loop {
            let changed = fill.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if fill.idle() {
                return;
            }
            changed.await;
        }
    }

    /// Completes block `index` of `blob` from the registry: the bytes it lacks (a range
    /// request per gap, close gaps joined), joined with those it has, stored whole.
    async fn fill_block(&self, blob: &BlobRef, index: u64) {
        let inner = &self.inner;
        let key = BlockKey::new(&blob.digest, index);
        if inner.cache.contains(&key) {
            return;
        }
        let Joined::Lead(lead) = inner.flights.join(&key, false) else {
            return; // Someone fetches the whole block already.
        };
        // Readers may follow this flight from now on: every way out publishes. No gap left
        // (the reads covered the block) still means a store, of the bytes read back.
        let gaps = inner.cache.gaps(&blob.digest, blob.size, index);
        let span = self.geometry(blob).span(index);
        // The bytes between the fetched ranges are read back from the cache; if any went
        // meanwhile, the whole block is fetched instead.
        let mut fetches = merged(gaps);
        let mut parts: Vec<(u64, Bytes)> = Vec::new();
        for kept in between(&span, &fetches) {
            match inner.cache.read(&blob.digest, kept.clone()) {
                Some(bytes) => parts.push((kept.start, bytes)),
                None => {
                    fetches = vec![span.clone()];
                    parts.clear();
                    break;
                }
            }
        }
        for range in fetches {
            let fetched = {
                let Ok(_permit) = inner.remote.acquire().await else {
                    return;
                };
                let _in_flight = inner.counters.in_flight();
                let started = Instant::now();
                let fetched = self.registry().get_blob_range(blob, range.clone()).await;
                inner.latency.observe(Source::Registry, started.elapsed());
                fetched
            };
            let bytes = match fetched {
                Ok(bytes) => bytes,
                Err(error) => {
                    inner.counters.error();
                    tracing::debug!(block = %key, %error, "block fill failed");
                    lead.publish(Err(Arc::new(error.into())));
                    return;
                }
            };
            inner
                .counters
                .served(&blob.digest, Source::Registry, bytes.len() as u64);
            inner.counters.filled(bytes.len() as u64);
            parts.push((range.start, bytes));
        }
        parts.sort_by_key(|(start, _)| *start);
        let mut block = BytesMut::with_capacity((span.end - span.start) as usize);
        for (_, part) in parts {
            block.extend_from_slice(&part);
        }
        let block = block.freeze();
        lead.publish(Ok(block.clone()));
        self.store(blob, vec![(index, block)]).await;
        drop(lead);
    }
}

/// `gaps` (in order) joined where less than [`MERGE_SLACK`] of written bytes lies between
/// them: fetching those again costs less than another request.
fn merged(gaps: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(gaps.len());
    for gap in gaps {
        match merged.last_mut() {
            Some(last) if gap.start - last.end < MERGE_SLACK => last.end = gap.end,
            _ => merged.push(gap),
        }
    }
    merged
}

/// The parts of `span` outside `fetches` (in order, within it).
fn between(span: &Range<u64>, fetches: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut kept = Vec::new();
    let mut at = span.start;
    for fetch in fetches {
        if fetch.start > at {
            kept.push(at..fetch.start);
        }
        at = fetch.end;
    }
    if at < span.end {
        kept.push(at..span.end);
    }
    kept
}

/// Fills queued blocks, one at a time, whenever foreground fetches have been quiet for
/// [`QUIET`]; ends when the queue is empty or the fetcher has been dropped.
async fn fill_worker(fill: Arc<Fill>, inner: Weak<Inner>) {
    loop {
        let changed = fill.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match fill.quiet_in() {
            None => {
                changed.await;
                continue;
            }
            Some(wait) if !wait.is_zero() => {
                tokio::time::sleep(wait).await;
                continue;
            }
            Some(_) => {}
        }
        let Some(fetcher) = inner.upgrade().map(|inner| Fetcher { inner }) else {
            return;
        };
        let next = {
            let mut queue = fill.queue.lock();
            let next = queue.order.pop_front();
            match &next {
                Some((blob, index)) => {
                    let key = BlockKey::new(&blob.digest, *index);
                    queue.queued.remove(&key);
                    queue.filling = Some(key);
                }
                None => queue.worker = false,
            }
            next
        };
        let Some((blob, index)) = next else {
            fill.changed.notify_waiters();
            return;
        };
        if fetcher.inner.cache.is_pinned(&blob.digest) {
            fetcher.fill_block(&blob, index).await;
        } else {
            // Its layer is gone: nobody will read the rest of the block.
            let cache = fetcher.inner.cache.clone();
            let digest = blob.digest.clone();
            let dropped =
                tokio::task::spawn_blocking(move || cache.drop_partial(&digest, index)).await;
            if let Err(error) = dropped {
                tracing::warn!(%error, "dropping a partial block failed");
            }
        }
        drop(fetcher);
        fill.queue.lock().filling = None;
        fill.changed.notify_waiters();
    }
}
