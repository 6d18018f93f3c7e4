//! Learned prefetch of an overlaybd disk's blobs: what a first start read of each blob of the
//! chain, as runs of ZFile blocks (first block, count), and fetching them again before a
//! container asks. Block indices are the ZFile's own, so a trace names the same compressed
//! bytes on every node; it never vouches for them: each span is read through
//! [`shoal_fetcher::BlobRead`] with the layer's own checks (CRC32C, and the block digest table
//! when the layer has one), exactly as a container's read, and lands in the chunk cache.

use std::ops::Range;
use std::sync::Arc;

use futures::future::BoxFuture;
use shoal_fetcher::BlobRead;
use shoal_formats::overlaybd::{Step, ZFile};
use shoal_formats::trace::Unit;
use tracing::debug;

use super::VirtualDisk;
use crate::learn::{Recorder, Replayed, TraceTarget};

/// Blocks whose compressed bytes lie closer than this are fetched with one range (the blocks
/// between come along, checked like the rest).
const MERGE_GAP: u64 = 32 << 10;
/// A span of blocks fetched together is at most this long (compressed), so spans travel in
/// parallel.
const MAX_SPAN: u64 = 2 << 20;
/// Spans in flight at once (the fetcher bounds the fetches beneath them too).
const SPANS_IN_FLIGHT: usize = 16;

/// The recordings of a disk's blobs while its first start reads: one per layer, top first.
/// Reads made while the disk's filesystem is mounted are recorded (the next start needs them
/// too) but a recording settles only after reads that follow the mount: those of the
/// containers, which may start long after the pull that mounted the disk.
pub struct DiskRecording {
    layers: Vec<Arc<Recorder>>,
}

impl DiskRecording {
    /// The recording of a disk of `layers` blobs, its settle clock held until
    /// [`filesystem_mounted`](Self::filesystem_mounted).
    pub fn new(layers: usize) -> DiskRecording {
        let layers: Vec<_> = (0..layers).map(|_| Recorder::new()).collect();
        layers.iter().for_each(|r| r.hold_clock());
        DiskRecording { layers }
    }

    /// The disk's filesystem is mounted: reads from now on are its containers'.
    pub fn filesystem_mounted(&self) {
        self.layers.iter().for_each(|r| r.start_clock());
    }

    pub(super) fn recorder(&self, layer: usize) -> Arc<Recorder> {
        self.layers[layer].clone()
    }

    pub(super) fn is_active(&self) -> bool {
        self.layers.iter().any(|r| r.is_active())
    }

    pub(super) fn stop(&self) {
        self.layers.iter().for_each(|r| r.stop());
    }

    /// A read of the disk, by the plan the read itself made: notes every block it needs, each
    /// as (index, 1) with its compressed length.
    pub(super) fn note(&self, disk: &VirtualDisk, steps: &[Step]) {
        for step in steps {
            let Step::Blocks { layer, span } = step else {
                continue;
            };
            let layer = *layer;
            let (Some(recorder), Some(disk_layer)) =
                (self.layers.get(layer), disk.layers().get(layer))
            else {
                continue;
            };
            let zfile = disk_layer.layer().zfile();
            recorder.note(span.blocks.clone().map(|block| {
                let bytes = zfile.block_range(block).map_or(0, |r| r.end - r.start);
                ((block, 1), bytes)
            }));
        }
    }
}

/// One blob of a disk as its trace names it: runs of ZFile blocks.
pub(super) struct BlockTrace {
    pub(super) disk: Arc<VirtualDisk>,
    /// The blob's layer in the disk (0 = top).
    pub(super) layer: usize,
    pub(super) blobs: Arc<dyn BlobRead>,
}

impl TraceTarget for BlockTrace {
    fn unit(&self) -> Unit {
        Unit::OverlaybdBlocks
    }

    fn check(&self, entries: &[(u64, u64)]) -> Result<(), String> {
        check(self.zfile(), entries)
    }

    fn recorded(&self, entries: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        runs(entries)
    }

    fn replay<'a>(&'a self, entries: &'a [(u64, u64)]) -> BoxFuture<'a, Replayed> {
        Box::pin(self.fetch(entries))
    }
}

impl BlockTrace {
    fn zfile(&self) -> &ZFile {
        self.disk.layers()[self.layer].layer().zfile()
    }

    /// Fetches the blocks `entries` name, merged into spans, the earliest read first,
    /// several at once; a span the cache holds whole and good is skipped.
    async fn fetch(&self, entries: &[(u64, u64)]) -> Replayed {
        let mut replayed = Replayed::default();
        let mut spans = spans(self.zfile(), entries).into_iter();
        // Each span is a task of its own, so spans are decompressed and checked on every
        // worker thread at once; the set aborts those left when the replay is dropped (its
        // disk unmounted).
        let mut fetches = tokio::task::JoinSet::new();
        loop {
            while fetches.len() < SPANS_IN_FLIGHT {
                let Some(span) = spans.next() else { break };
                let (disk, blobs, at) = (self.disk.clone(), self.blobs.clone(), self.layer);
                fetches.spawn(async move { fetch_span(&disk, at, &*blobs, span.blocks).await });
            }
            let Some(joined) = fetches.join_next().await else {
                break;
            };
            match joined {
                Ok(Fetched::Cached) | Err(_) => {}
                Ok(Fetched::Blocks { blocks, bytes }) => {
                    replayed.chunks += blocks;
                    replayed.bytes += bytes;
                }
                Ok(Fetched::Failed { blocks, error }) => {
                    replayed.failed += blocks.end - blocks.start;
                    let blob = &self.disk.layers()[self.layer].blob().digest;
                    debug!(%blob, ?blocks, %error, "trace prefetch of a span of blocks failed");
                }
            }
        }
        replayed
    }
}

/// What fetching one span did.
enum Fetched {
    /// The cache held it, good.
    Cached,
    /// Fetched and checked: how many blocks, how many compressed bytes.
    Blocks {
        blocks: u64,
        bytes: u64,
    },
    Failed {
        blocks: Range<u64>,
        error: String,
    },
}

/// Reads `blocks` of layer `at` of `disk` as a container's read would (into the cache, checked
/// as the layer's checks say), unless the cache holds them whole and good.
async fn fetch_span(
    disk: &VirtualDisk,
    at: usize,
    blobs: &dyn BlobRead,
    blocks: Range<u64>,
) -> Fetched {
    let layer = &disk.layers()[at];
    let zfile = layer.layer().zfile();
    let span = match layer.layer().span(byte_range(zfile, &blocks)) {
        Ok(span) => span,
        Err(error) => {
            return Fetched::Failed {
                blocks,
                error: error.to_string(),
            }
        }
    };
    if layer.cached_blocks(blobs, &span).is_some() {
        return Fetched::Cached;
    }
    match layer.read_blocks(blobs, &span).await {
        Ok(_) => Fetched::Blocks {
            blocks: blocks.end - blocks.start,
            bytes: span.compressed.end - span.compressed.start,
        },
        Err(error) => Fetched::Failed {
            blocks,
            error: shoal_fetcher::with_causes(&error),
        },
    }
}

/// Why `entries` cannot name runs of `zfile`'s blocks, if they cannot.
fn check(zfile: &ZFile, entries: &[(u64, u64)]) -> Result<(), String> {
    let count = zfile.block_count();
    for &(first, len) in entries {
        let fits = len > 0 && first.checked_add(len).is_some_and(|end| end <= count);
        if !fits {
            return Err(format!(
                "it names blocks {first}+{len} of a ZFile of {count} blocks"
            ));
        }
    }
    Ok(())
}

/// Blocks noted one by one, in the order first read, as runs: a block read right after the
/// one before it joins its run.
fn runs(blocks: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (block, len) in blocks {
        match out.last_mut() {
            Some((first, run)) if *first + *run == block => *run += len,
            _ => out.push((block, len)),
        }
    }
    out
}

/// Blocks fetched with one range, and when the trace first named one of them.
#[derive(Debug, PartialEq, Eq)]
struct Span {
    first_read: usize,
    blocks: Range<u64>,
}

/// The blocks `entries` name (checked to fit `zfile`) merged into spans of neighbours in the
/// blob, ordered by the earliest read in each. Runs are merged as ranges, so a trace naming
/// a whole blob in one entry costs a span per 2 MiB, not a record per block.
fn spans(zfile: &ZFile, entries: &[(u64, u64)]) -> Vec<Span> {
    let count = zfile.block_count();
    let mut runs: Vec<(Range<u64>, usize)> = entries
        .iter()
        .enumerate()
        .map(|(order, &(first, len))| {
            (
                first.min(count)..first.saturating_add(len).min(count),
                order,
            )
        })
        .filter(|(run, _)| !run.is_empty())
        .collect();
    runs.sort_by_key(|(run, _)| run.start);
    // Overlapping runs (a recording never writes them) become one, read when its first was.
    let mut disjoint: Vec<(Range<u64>, usize)> = Vec::with_capacity(runs.len());
    for (run, order) in runs {
        match disjoint.last_mut() {
            Some((last, first_read)) if run.start < last.end => {
                last.end = last.end.max(run.end);
                *first_read = (*first_read).min(order);
            }
            _ => disjoint.push((run, order)),
        }
    }
    let compressed = |block| zfile.block_range(block).unwrap_or(0..0);
    let mut spans: Vec<Span> = Vec::new();
    for (run, order) in disjoint {
        for block in run {
            let range = compressed(block);
            match spans.last_mut() {
                Some(span)
                    if range.start <= compressed(span.blocks.end - 1).end + MERGE_GAP
                        && range.end - compressed(span.blocks.start).start <= MAX_SPAN =>
                {
                    span.blocks.end = block + 1;
                    span.first_read = span.first_read.min(order);
                }
                _ => spans.push(Span {
                    first_read: order,
                    blocks: block..block + 1,
                }),
            }
        }
    }
    spans.sort_by_key(|span| span.first_read);
    spans
}

/// The decompressed bytes of `blocks` in `zfile`.
fn byte_range(zfile: &ZFile, blocks: &Range<u64>) -> Range<u64> {
    let size = u64::from(zfile.block_size());
    let end = (blocks.end * size).min(zfile.uncompressed_size());
    (blocks.start * size).min(end)..end
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_fetcher::trust::Tiers;
    use shoal_fetcher::MemoryBlobs;

    use super::super::tests::{cached, fixture_blob, open};
    use super::super::FsType;
    use super::*;
    use crate::learn::LearnSettings;

    #[test]
    fn blocks_read_one_after_another_make_one_run() {
        let noted = vec![(4, 1), (5, 1), (6, 1), (0, 1), (7, 1), (1, 1)];
        assert_eq!(runs(noted), [(4, 3), (0, 1), (7, 1), (1, 1)]);
        assert!(runs(Vec::new()).is_empty());
    }

    /// The fixture's disk, its blob in the registry only (opening it cached the blob whole,
    /// which is forgotten).
    async fn uncached_disk(registry: Option<Vec<u8>>) -> (Arc<MemoryBlobs>, Arc<VirtualDisk>) {
        let blob = fixture_blob();
        let (blobs, blob_ref) = cached(&blob);
        let layer = open(&blobs, blob_ref.clone()).await.unwrap();
        blobs.discard(&blob_ref).unwrap();
        if let Some(bytes) = registry {
            blobs.registry_serves(&blob_ref.digest, bytes);
        }
        let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
        (Arc::new(blobs), Arc::new(disk))
    }

    /// What reading `reads` of `disk` records, as the trace keeps it.
    async fn recorded(disk: &VirtualDisk, reads: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let recording = DiskRecording::new(1);
        recording.filesystem_mounted();
        for &(offset, len) in reads {
            recording.note(disk, &disk.plan(offset, len).unwrap());
        }
        let settings = LearnSettings {
            settle: Duration::ZERO,
            max_bytes: u64::MAX,
        };
        let (noted, _, _) = recording.recorder(0).settled(settings).await;
        runs(noted)
    }

    fn trace_of(blobs: &Arc<MemoryBlobs>, disk: &Arc<VirtualDisk>) -> BlockTrace {
        BlockTrace {
            disk: disk.clone(),
            layer: 0,
            blobs: blobs.clone(),
        }
    }

    #[tokio::test]
    async fn a_recording_names_the_blocks_reads_needed_and_a_replay_brings_them_in() {
        let (blobs, disk) = uncached_disk(Some(fixture_blob())).await;
        let reads = [(1024, 1024), (4 << 20, 65_536), (0, 4096)];
        assert!(reads
            .iter()
            .all(|&(offset, len)| disk.read_cached(&*blobs, offset, len).is_none()));
        let entries = recorded(&disk, &reads).await;
        // The superblock's block first, then the second read's run; the first block again
        // is not new.
        let zfile = disk.layers()[0].layer().zfile();
        let lsmt_blocks = |offset, len| {
            let steps = disk.plan(offset, len).unwrap();
            steps
                .iter()
                .filter_map(|step| match step {
                    Step::Blocks { span, .. } => Some(span.blocks.clone()),
                    Step::Zero { .. } => None,
                })
                .collect::<Vec<_>>()
        };
        let first = lsmt_blocks(1024, 1024);
        assert_eq!(entries[0], (first[0].start, first[0].end - first[0].start));
        let named: u64 = entries.iter().map(|(_, n)| n).sum();
        assert!(named >= 2 && entries.len() <= named as usize);
        let target = trace_of(&blobs, &disk);
        assert_eq!(target.check(&entries), Ok(()));

        let replayed = target.replay(&entries).await;
        assert_eq!(replayed.failed, 0);
        assert!(replayed.chunks >= 1 && replayed.bytes > 0, "{replayed:?}");
        // What the reads need is now in the cache, checked: they answer without a fetch.
        for &(offset, len) in &reads {
            assert!(disk.read_cached(&*blobs, offset, len).is_some());
        }
        // A replay of what the cache holds fetches nothing.
        assert_eq!(target.replay(&entries).await, Replayed::default());
        assert!(zfile.block_count() > 0);
    }

    #[tokio::test]
    async fn blocks_are_fetched_in_spans_the_earliest_read_first_each_block_once() {
        let (_, disk) = uncached_disk(None).await;
        let zfile = disk.layers()[0].layer().zfile();
        let last = zfile.block_count() - 1;
        let at = |block: u64| zfile.block_range(block).unwrap();
        // The first and last blocks lie far apart in the blob: two spans, the last block's
        // (read first) first; the first block named twice is fetched once.
        assert!(at(last).start > at(0).end + MERGE_GAP);
        let got = spans(zfile, &[(last, 1), (0, 1), (0, 1)]);
        assert_eq!(
            got,
            [
                Span {
                    first_read: 0,
                    blocks: last..last + 1
                },
                Span {
                    first_read: 1,
                    blocks: 0..1
                },
            ]
        );
        // One entry naming every block: spans cover each block once, none longer than the cap.
        let whole = spans(zfile, &[(0, last + 1), (3, 2)]);
        let mut next = 0;
        for span in &whole {
            assert_eq!(span.blocks.start, next);
            assert!(at(span.blocks.end - 1).end - at(span.blocks.start).start <= MAX_SPAN);
            next = span.blocks.end;
        }
        assert_eq!(next, last + 1);
    }

    #[tokio::test]
    async fn a_trace_naming_blocks_the_blob_does_not_have_is_refused() {
        let (blobs, disk) = uncached_disk(None).await;
        let count = disk.layers()[0].layer().zfile().block_count();
        let target = trace_of(&blobs, &disk);
        assert_eq!(target.check(&[(0, 1), (count - 1, 1)]), Ok(()));
        for bad in [(count, 1), (count - 1, 2), (0, 0), (u64::MAX, 2)] {
            let err = target.check(&[(0, 1), bad]).unwrap_err();
            assert!(err.contains(&format!("of {count} blocks")), "{err}");
        }
    }

    #[tokio::test]
    async fn replayed_blocks_pass_the_checks_of_reads_or_are_not_kept() {
        // The registry serves every data block damaged (metadata is as it was).
        let good = fixture_blob();
        let mut bad = good.clone();
        let end = bad.len() - 4096;
        for byte in &mut bad[2048..end] {
            *byte ^= 0x5a;
        }
        let (blobs, disk) = uncached_disk(Some(bad)).await;
        let entries = recorded(&disk, &[(1024, 1024)]).await;
        let replayed = trace_of(&blobs, &disk).replay(&entries).await;
        assert_eq!(replayed.chunks, 0, "{replayed:?}");
        assert!(replayed.failed >= 1, "{replayed:?}");
        assert!(disk.read_cached(&*blobs, 1024, 1024).is_none());

        // Nowhere to fetch from: every block fails, and nothing else happens.
        let (blobs, disk) = uncached_disk(None).await;
        let entries = recorded(&disk, &[(1024, 1024), (4 << 20, 65_536)]).await;
        let named: u64 = entries.iter().map(|(_, n)| n).sum();
        let replayed = trace_of(&blobs, &disk).replay(&entries).await;
        // Blocks between named ones close in the blob come along in their span.
        assert!(
            replayed.chunks == 0 && replayed.failed >= named,
            "{replayed:?}"
        );
    }
}
