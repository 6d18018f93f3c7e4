//! Counters of where read bytes came from and how fetches went.

use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl Counters {
    pub fn served(&self, source: Source, bytes: u64) {
        let counter = match source {
            Source::Cache => &self.bytes_from_cache,
            Source::Registry => &self.bytes_from_registry,
            Source::Peer => &self.bytes_from_peers,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
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
        }
    }
}

pub(crate) struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
