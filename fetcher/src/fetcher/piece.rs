//! Foreground reads that fetch only what they need: the bytes of a read missing from the
//! cache are fetched as they are ("pieces", one range request per stretch of missing bytes,
//! each its own task, so independent stretches travel in parallel), handed to the reader,
//! then cached as partial blocks, which the background [fill](super::fill) completes.
//! Bytes inside a block or a piece already being fetched are waited for, not fetched again.

use std::ops::Range;

use bytes::Bytes;

use super::{assemble, Fetcher, Mode, MAX_RUN_BYTES};
use crate::cache::{BlockGeometry, BlockKey};
use crate::error::FetchError;
use crate::flight::Waiter;
use crate::pieces::{PieceLead, PieceWaiter};
use crate::reference::BlobRef;
use crate::stats::Source;

/// Pieces are widened to this alignment (or a sixteenth of a block, when smaller), within
/// their blocks: reads of neighbouring small files (a program's modules, its libraries) then
/// find each other's bytes, for a few KiB more per piece instead of a round trip per file
/// (stargz-snapshotter fetches 50 kB units likewise).
const PIECE_ALIGN: u64 = 64 << 10;

/// `missing` widened to the piece alignment, never past the blocks it lies in.
fn widened(missing: &Range<u64>, geometry: &BlockGeometry) -> Range<u64> {
    let align = (geometry.block_size / 16).clamp(1, PIECE_ALIGN);
    let blocks = geometry.covering(missing);
    let (first, last) = (geometry.span(blocks.start), geometry.span(blocks.end - 1));
    let start = (missing.start / align * align).max(first.start);
    let end = missing
        .end
        .div_ceil(align)
        .saturating_mul(align)
        .min(last.end);
    start..end
}

/// One block's part of a read.
enum Part {
    Ready(Bytes),
    /// The whole block is being fetched; the part wanted is `within` it.
    Block(Waiter, Range<usize>),
    /// A piece holding the part is being fetched.
    Piece(PieceWaiter, Range<u64>),
    /// Nobody fetches these bytes yet.
    Missing(Range<u64>),
}

impl Fetcher {
    /// Whether a read routed as `mode` fetches only its own bytes. Reads that may go to
    /// peers fetch whole blocks: peers hold, announce and grant whole blocks only.
    pub(super) fn fetches_pieces(&self, mode: Mode) -> bool {
        matches!(mode, Mode::Read { .. }) && self.peers_for(mode).is_none()
    }

    /// `range` of `blob`: cached parts from the cache, parts being fetched waited for, and
    /// the rest fetched as pieces.
    pub(super) async fn read_pieces(
        &self,
        blob: &BlobRef,
        range: &Range<u64>,
    ) -> Result<Bytes, FetchError> {
        let inner = &self.inner;
        let geometry = self.geometry(blob);
        let mut parts: Vec<Part> = Vec::new();
        let mut from_cache = 0;
        for index in geometry.covering(range) {
            let span = geometry.span(index);
            let wanted = span.start.max(range.start)..span.end.min(range.end);
            if let Some(bytes) = inner.cache.read(&blob.digest, wanted.clone()) {
                inner.counters.hits(1);
                from_cache += bytes.len() as u64;
                parts.push(Part::Ready(bytes));
                continue;
            }
            inner.counters.misses(1);
            let key = BlockKey::new(&blob.digest, index);
            if let Some(waiter) = inner.flights.follow(&key) {
                let within =
                    (wanted.start - span.start) as usize..(wanted.end - span.start) as usize;
                parts.push(Part::Block(waiter, within));
            } else if let Some(waiter) = inner.pieces.follow(blob.digest.raw(), &wanted) {
                parts.push(Part::Piece(waiter, wanted));
            } else {
                match parts.last_mut() {
                    Some(Part::Missing(missing))
                        if missing.end == wanted.start
                            && wanted.end - missing.start <= MAX_RUN_BYTES =>
                    {
                        missing.end = wanted.end
                    }
                    _ => parts.push(Part::Missing(wanted)),
                }
            }
        }
        inner
            .counters
            .served(&blob.digest, Source::Cache, from_cache);
        // Each piece is a task of its own, started before any is waited for: it must finish
        // for other waiters even if this reader gives up, and it caches its bytes after.
        let parts: Vec<Part> = parts
            .into_iter()
            .map(|part| match part {
                Part::Missing(missing) => {
                    let piece = widened(&missing, &geometry);
                    let lead = inner.pieces.lead(blob.digest.raw(), piece);
                    let waiter = lead.waiter();
                    let guard = inner.runs.start();
                    let fetch = self.clone().fetch_piece(blob.clone(), lead);
                    tokio::spawn(async move {
                        fetch.await;
                        drop(guard);
                    });
                    Part::Piece(waiter, missing)
                }
                other => other,
            })
            .collect();
        let mut got = Vec::with_capacity(parts.len());
        for part in parts {
            got.push(match part {
                Part::Ready(bytes) => bytes,
                Part::Block(waiter, within) => waiter.wait().await?.slice(within),
                Part::Piece(waiter, wanted) => waiter.wait(wanted).await?,
                Part::Missing(_) => unreachable!("every missing part became a piece"),
            });
        }
        Ok(assemble(got))
    }

    /// Fetches one piece from the registry, answers its waiters, caches it (its partial
    /// blocks then queued for a fill) and only then ends the flight.
    async fn fetch_piece(self, blob: BlobRef, lead: PieceLead) {
        let inner = &self.inner;
        let range = lead.range().clone();
        let geometry = self.geometry(&blob);
        let keys: Vec<BlockKey> = geometry
            .covering(&range)
            .map(|index| BlockKey::new(&blob.digest, index))
            .collect();
        // Foreground until its bytes are in the cache: a fill started earlier would see its
        // block's extents without them and fetch them a second time.
        let _foreground = inner.fill.foreground();
        let fetched = {
            let Ok(_permit) = inner.remote.acquire().await else {
                return;
            };
            let _in_flight = inner.counters.in_flight();
            let brief = inner.flights.all_failed_recently(&keys);
            tracing::debug!(blob = %blob.digest, ?range, "fetching bytes from the registry");
            let started = std::time::Instant::now();
            let fetched = if brief {
                self.registry()
                    .get_blob_range_briefly(&blob, range.clone(), super::run::AFTER_FAILURE_ATTEMPT)
                    .await
            } else {
                self.registry().get_blob_range(&blob, range.clone()).await
            };
            inner.latency.observe(Source::Registry, started.elapsed());
            inner.flights.fetched(&keys, fetched.is_ok(), brief);
            fetched
        };
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(error) => {
                inner.counters.error();
                tracing::debug!(blob = %blob.digest, ?range, %error, "range fetch failed");
                lead.publish(Err(std::sync::Arc::new(error.into())));
                return;
            }
        };
        inner
            .counters
            .served(&blob.digest, Source::Registry, bytes.len() as u64);
        lead.publish(Ok(bytes.clone()));
        let cache = inner.cache.clone();
        let digest = blob.digest.clone();
        let (size, cached) = (blob.size, range.clone());
        let stored =
            tokio::task::spawn_blocking(move || cache.insert_extent(&digest, size, cached, &bytes))
                .await;
        match stored {
            Ok(Ok(())) => {}
            // A full disk is logged by the cache, once per spell.
            Ok(Err(error)) if error.is_no_space() => {}
            Ok(Err(error)) => tracing::warn!(%error, "bytes fetched but not cached"),
            Err(error) => tracing::warn!(%error, "caching task failed"),
        }
        self.queue_fill(&blob, geometry.covering(&range));
        drop(lead);
    }
}
