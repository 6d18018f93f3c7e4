//! Counters of where read bytes came from and how fetches went.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Digest;

/// Most blobs whose bytes are counted one by one. Entries outlive their mounts (they are
/// counters), so the table is bounded instead: a blob read for the first time while it is full
/// pushes out the one read least recently. A few thousand covers every layer a node keeps.
pub const MAX_COUNTED_BLOBS: usize = 4096;

/// Where the bytes of a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Cache,
    Registry,
    /// Another node's cache; not built yet, counted here so that it slots in without a
    /// change to the stats' consumers.
    Peer,
}

/// A snapshot of a [`Fetcher`](crate::Fetcher)'s counters since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    pub bytes_from_cache: u64,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
    /// Blocks found in the cache.
    pub cache_hits: u64,
    /// Blocks that had to be fetched.
    pub cache_misses: u64,
    /// Remote fetches that failed, after their retries.
    pub fetch_errors: u64,
    /// Remote fetches under way right now.
    pub in_flight: u64,
    /// Reads whose bytes failed their check (each then fetched once more from the registry).
    pub verify_failures: u64,
    /// Of `bytes_from_registry`, those the background fill of partly read blocks fetched:
    /// no read waited for them.
    pub bytes_filled: u64,
}

/// Bytes of one blob served, by source, since the blob was first read (or since it came back
/// after being pushed out of the [bounded](MAX_COUNTED_BLOBS) table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlobBytes {
    pub from_cache: u64,
    pub from_registry: u64,
    pub from_peers: u64,
}

impl BlobBytes {
    fn add(&mut self, source: Source, bytes: u64) {
        let counter = match source {
            Source::Cache => &mut self.from_cache,
            Source::Registry => &mut self.from_registry,
            Source::Peer => &mut self.from_peers,
        };
        *counter += bytes;
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    bytes_from_cache: AtomicU64,
    bytes_from_registry: AtomicU64,
    bytes_from_peers: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    fetch_errors: AtomicU64,
    in_flight: AtomicU64,
    verify_failures: AtomicU64,
    bytes_filled: AtomicU64,
    /// One lock per call, not per block: callers add up a read's cache hits first.
    blobs: Mutex<BlobTable>,
}

impl Counters {
    /// Counts `bytes` of `blob` served from `source`, in the totals and in the blob's own.
    pub fn served(&self, blob: &Digest, source: Source, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let counter = match source {
            Source::Cache => &self.bytes_from_cache,
            Source::Registry => &self.bytes_from_registry,
            Source::Peer => &self.bytes_from_peers,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        self.blobs
            .lock()
            .add(blob, source, bytes, MAX_COUNTED_BLOBS);
    }

    /// Every counted blob's bytes, in no particular order.
    pub fn blobs(&self) -> Vec<(Digest, BlobBytes)> {
        let table = self.blobs.lock();
        table
            .entries
            .iter()
            .map(|(digest, entry)| (digest.clone(), entry.bytes))
            .collect()
    }

    pub fn hits(&self, blocks: u64) {
        self.cache_hits.fetch_add(blocks, Ordering::Relaxed);
    }

    pub fn misses(&self, blocks: u64) {
        self.cache_misses.fetch_add(blocks, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.fetch_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn verify_failure(&self) {
        self.verify_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn filled(&self, bytes: u64) {
        self.bytes_filled.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts a fetch as in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    pub fn snapshot(&self) -> FetchStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        FetchStats {
            bytes_from_cache: load(&self.bytes_from_cache),
            bytes_from_registry: load(&self.bytes_from_registry),
            bytes_from_peers: load(&self.bytes_from_peers),
            cache_hits: load(&self.cache_hits),
            cache_misses: load(&self.cache_misses),
            fetch_errors: load(&self.fetch_errors),
            in_flight: load(&self.in_flight),
            verify_failures: load(&self.verify_failures),
            bytes_filled: load(&self.bytes_filled),
        }
    }
}

pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Per-blob bytes, with a logical clock to find the blob read least recently.
#[derive(Debug, Default)]
struct BlobTable {
    entries: HashMap<Digest, BlobEntry>,
    clock: u64,
}

#[derive(Debug)]
struct BlobEntry {
    bytes: BlobBytes,
    read_at: u64,
}

impl BlobTable {
    fn add(&mut self, blob: &Digest, source: Source, bytes: u64, max: usize) {
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(blob) {
            entry.read_at = self.clock;
            entry.bytes.add(source, bytes);
            return;
        }
        // A scan, but only when a new blob meets a full table: rare next to reads.
        while self.entries.len() >= max.max(1) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, entry)| entry.read_at)
                .map(|(digest, _)| digest.clone());
            match oldest {
                Some(digest) => self.entries.remove(&digest),
                None => break,
            };
        }
        let mut counted = BlobBytes::default();
        counted.add(source, bytes);
        self.entries.insert(
            blob.clone(),
            BlobEntry {
                bytes: counted,
                read_at: self.clock,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn bytes_are_counted_per_blob_and_in_total() {
        let counters = Counters::default();
        counters.served(&digest(1), Source::Registry, 100);
        counters.served(&digest(1), Source::Cache, 40);
        counters.served(&digest(2), Source::Peer, 7);
        counters.served(&digest(3), Source::Cache, 0);
        let mut blobs = counters.blobs();
        blobs.sort_by(|a, b| a.0.cmp(&b.0));
        let of = |n: u8| blobs.iter().find(|(d, _)| *d == digest(n)).map(|(_, b)| *b);
        assert_eq!(
            of(1),
            Some(BlobBytes {
                from_cache: 40,
                from_registry: 100,
                from_peers: 0
            })
        );
        assert_eq!(of(2).map(|b| b.from_peers), Some(7));
        assert_eq!(of(3), None, "nothing served, nothing listed");
        let total = counters.snapshot();
        assert_eq!(
            (
                total.bytes_from_registry,
                total.bytes_from_cache,
                total.bytes_from_peers
            ),
            (100, 40, 7)
        );
    }

    #[test]
    fn a_full_table_drops_the_blob_read_least_recently() {
        let mut table = BlobTable::default();
        for n in 0..3 {
            table.add(&digest(n), Source::Registry, 1, 3);
        }
        // Blob 0 is read again, so blob 1 is now the oldest.
        table.add(&digest(0), Source::Cache, 5, 3);
        table.add(&digest(3), Source::Registry, 1, 3);
        assert_eq!(table.entries.len(), 3);
        assert!(!table.entries.contains_key(&digest(1)));
        assert_eq!(table.entries[&digest(0)].bytes.from_cache, 5);
        assert!(table.entries.contains_key(&digest(3)));
        // Bounded however many blobs come through.
        for n in 10..200 {
            table.add(&digest(n), Source::Peer, 1, 3);
        }
        assert_eq!(table.entries.len(), 3);
        assert!(table.entries.contains_key(&digest(199)));
    }
}
