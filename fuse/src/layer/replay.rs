//! Replaying a learned trace of an eStargz layer: the chunks it names, fetched before a
//! container asks for them. The trace only says which chunks; each is looked up in the layer's
//! verified index (a name the index does not have is skipped) and checked against its TOC
//! digest as any read.

use std::collections::HashSet;
use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;

use shoal_fetcher::{BlobRef, FetchError};
use shoal_formats::estargz::{Chunk, Index, Ino};
use shoal_formats::trace::Unit;
use tracing::debug;

use super::reader::{chunk_range, decode, expect, ChunkReader};
use super::EstargzLayer;
use crate::learn::{Replayed, TraceTarget};

/// Chunks closer than this in the blob are fetched with one range (the gap comes along).
const MERGE_GAP: u64 = 32 << 10;
/// A span of chunks fetched together is at most this long, so spans travel in parallel.
const MAX_SPAN: u64 = 2 << 20;
/// Spans in flight at once (the fetcher bounds the fetches beneath them too).
const SPANS_IN_FLIGHT: usize = 16;

/// An eStargz layer as its trace names it: chunks by (inode, file offset).
pub(super) struct ChunkTrace {
    pub(super) layer: EstargzLayer,
    pub(super) reader: Arc<ChunkReader>,
}

impl TraceTarget for ChunkTrace {
    fn unit(&self) -> Unit {
        Unit::EstargzChunk
    }

    /// Any entry fits: one the index does not have is skipped at replay.
    fn check(&self, _entries: &[(u64, u64)]) -> Result<(), String> {
        Ok(())
    }

    fn replay<'a>(&'a self, entries: &'a [(u64, u64)]) -> BoxFuture<'a, Replayed> {
        Box::pin(
            self.reader
                .prefetch_chunks(&self.layer.blob, &self.layer.index, entries),
        )
    }
}

/// Chunks fetched with one range, and when the trace first named one of them.
struct Span {
    first_read: usize,
    range: Range<u64>,
    chunks: Vec<Chunk>,
}

impl ChunkReader {
    /// Fetches the chunks `entries` name (an inode and a file offset each, in the order a
    /// first start read them), merged into spans, the earliest read first, several at once;
    /// each chunk checked against its digest and kept in memory.
    pub async fn prefetch_chunks(
        self: &Arc<Self>,
        blob: &BlobRef,
        index: &Index,
        entries: &[(u64, u64)],
    ) -> Replayed {
        let mut replayed = Replayed::default();
        let mut seen = HashSet::new();
        let mut wanted: Vec<(usize, Chunk)> = Vec::new();
        for (order, &(ino, offset)) in entries.iter().enumerate() {
            let found = index
                .chunks_for(Ino::new(ino), offset, 1)
                .and_then(|chunks| chunks.first());
            let Some(chunk) = found else {
                replayed.unknown += 1;
                continue;
            };
            if !seen.insert((chunk.blob_offset, chunk.inner_offset))
                || self.remembered(blob, chunk).is_some()
            {
                continue;
            }
            wanted.push((order, chunk.clone()));
        }
        // Each span is a task of its own, so spans are decoded and checked on every worker
        // thread at once; the set aborts those left when the replay is dropped (its layer
        // unmounted).
        let mut spans = spans(wanted).into_iter();
        let mut fetches = tokio::task::JoinSet::new();
        loop {
            while fetches.len() < SPANS_IN_FLIGHT {
                let Some(span) = spans.next() else { break };
                let (reader, blob) = (self.clone(), blob.clone());
                fetches.spawn(async move {
                    let got = reader.fetch_span(&blob, &span).await;
                    (span, got)
                });
            }
            let Some(joined) = fetches.join_next().await else {
                break;
            };
            let Ok((span, got)) = joined else { continue };
            match got {
                Ok(count) => {
                    replayed.chunks += count.0;
                    replayed.bytes += count.1;
                }
                Err(error) => {
                    replayed.failed += span.chunks.len() as u64;
                    debug!(blob = %blob.digest, range = ?span.range, error = %shoal_fetcher::with_causes(&error), "trace prefetch of a span failed");
                }
            }
        }
        replayed
    }

    /// Fetches one span's chunks with one read, each checked, and keeps them in memory;
    /// how many chunks and compressed bytes.
    async fn fetch_span(&self, blob: &BlobRef, span: &Span) -> Result<(u64, u64), FetchError> {
        let decoders: Vec<_> = span
            .chunks
            .iter()
            .map(|chunk| move |raw: &Bytes| decode(raw, chunk))
            .collect();
        let parts: Vec<_> = span
            .chunks
            .iter()
            .zip(&decoders)
            .map(|(chunk, decoder)| (chunk_range(chunk), expect(chunk, decoder)))
            .collect();
        let decoded = self
            .blobs()
            .read_parts(blob, span.range.clone(), &parts)
            .await?;
        let mut bytes = 0;
        for (chunk, data) in span.chunks.iter().zip(decoded) {
            bytes += chunk.blob_end - chunk.blob_offset;
            self.remember(blob, chunk, data);
        }
        Ok((span.chunks.len() as u64, bytes))
    }
}

/// `chunks` (with when each was first read) merged into spans of neighbours in the blob,
/// ordered by the earliest read in each.
fn spans(mut chunks: Vec<(usize, Chunk)>) -> Vec<Span> {
    chunks.sort_by_key(|(_, chunk)| (chunk.blob_offset, chunk.inner_offset));
    let mut spans: Vec<Span> = Vec::new();
    for (order, chunk) in chunks {
        let range = chunk_range(&chunk);
        match spans.last_mut() {
            Some(span)
                if range.start <= span.range.end + MERGE_GAP
                    && range.end.max(span.range.end) - span.range.start <= MAX_SPAN =>
            {
                span.range.end = span.range.end.max(range.end);
                span.first_read = span.first_read.min(order);
                span.chunks.push(chunk);
            }
            _ => spans.push(Span {
                first_read: order,
                range,
                chunks: vec![chunk],
            }),
        }
    }
    spans.sort_by_key(|span| span.first_read);
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(blob_offset: u64, len: u64) -> Chunk {
        Chunk {
            file_offset: 0,
            size: len,
            blob_offset,
            blob_end: blob_offset + len,
            inner_offset: 0,
            digest: shoal_formats::estargz::Sha256Digest::from_bytes([0; 32]),
        }
    }

    #[test]
    fn neighbours_share_a_span_and_the_first_read_goes_first() {
        let far = 10 << 20;
        let got = spans(vec![
            (2, chunk(1000, 100)),
            (0, chunk(far, 100)),
            (1, chunk(1100 + MERGE_GAP, 100)),
            (3, chunk(1100 + 3 * MERGE_GAP, 100)),
        ]);
        let ranges: Vec<_> = got
            .iter()
            .map(|s| (s.first_read, s.range.clone()))
            .collect();
        assert_eq!(
            ranges,
            [
                (0, far..far + 100),
                (1, 1000..1200 + MERGE_GAP),
                (3, 1100 + 3 * MERGE_GAP..1200 + 3 * MERGE_GAP),
            ]
        );
        // A span never grows past its cap.
        let many: Vec<_> = (0..100)
            .map(|i| (i, chunk(i as u64 * 100_000, 100_000)))
            .collect();
        assert!(spans(many)
            .iter()
            .all(|s| s.range.end - s.range.start <= MAX_SPAN));
    }
}
