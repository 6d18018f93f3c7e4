//! [`MemoryBlobs`]: the tiers held in memory, one whole blob per tier, so that the layers
//! above (and the trust decisions themselves) are tested on real checks without a cache
//! directory, peers or a registry.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::ops::Range;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::tiers::{Route, Tiers};
use crate::digest::Digest;
use crate::error::FetchError;
use crate::reference::BlobRef;

/// Blobs as a cache, one peer and a registry would hold them. A tier without a blob fails
/// its fetches; what a peer or the registry sends is cached, as the fetcher caches it.
#[derive(Default)]
pub struct MemoryBlobs {
    tiers: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    cache: HashMap<Digest, Bytes>,
    peer: HashMap<Digest, Bytes>,
    registry: HashMap<Digest, Bytes>,
    /// Bytes the registry sends instead of its own, one fetch each, first in first out.
    registry_once: HashMap<Digest, VecDeque<Bytes>>,
    /// Ranges that passed a check against a verified digest.
    passed: Vec<(Digest, Range<u64>)>,
    /// Fetches the peer answered, and fetches from the registry alone after a failed check.
    peer_fetches: u64,
    refetches: u64,
    /// Blobs whose cached copy the peer sent.
    from_peer: HashSet<Digest>,
    /// Times the peer was blamed for a blob that failed its digest.
    blamed: u64,
    /// Whether the peer proved membership (mutual TLS).
    authenticated: bool,
}

impl MemoryBlobs {
    /// The cache holds `bytes` as `digest`.
    pub fn cache(&self, digest: &Digest, bytes: impl Into<Bytes>) {
        self.held().cache.insert(digest.clone(), bytes.into());
    }

    /// The peer sends `bytes` for `digest`, right or wrong.
    pub fn peer_serves(&self, digest: &Digest, bytes: impl Into<Bytes>) {
        self.held().peer.insert(digest.clone(), bytes.into());
    }

    /// The registry sends `bytes` for `digest`.
    pub fn registry_serves(&self, digest: &Digest, bytes: impl Into<Bytes>) {
        self.held().registry.insert(digest.clone(), bytes.into());
    }

    /// The next fetch of `digest` from the registry gets `bytes` instead.
    pub fn registry_sends_once(&self, digest: &Digest, bytes: impl Into<Bytes>) {
        self.held()
            .registry_once
            .entry(digest.clone())
            .or_default()
            .push_back(bytes.into());
    }

    /// Ranges of `digest` that passed a check against a verified digest, in order.
    pub fn passed(&self, digest: &Digest) -> Vec<Range<u64>> {
        let held = self.held();
        let passed = held.passed.iter().filter(|(blob, _)| blob == digest);
        passed.map(|(_, range)| range.clone()).collect()
    }

    /// The peer is authenticated as a member (as with mutual TLS).
    pub fn peers_use_tls(&self) {
        self.held().authenticated = true;
    }

    /// How many times the peer was blamed for a blob that failed its digest.
    pub fn blamed(&self) -> u64 {
        self.held().blamed
    }

    /// How many fetches the peer answered.
    pub fn peer_fetches(&self) -> u64 {
        self.held().peer_fetches
    }

    /// How many times bytes were fetched again from the registry after failing a check.
    pub fn refetches(&self) -> u64 {
        self.held().refetches
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.tiers.lock()
    }

    fn slice(blob: &BlobRef, bytes: &Bytes, range: &Range<u64>) -> Result<Bytes, FetchError> {
        let fits = range.start <= range.end && range.end <= bytes.len() as u64;
        if !fits || bytes.len() as u64 != blob.size {
            return Err(FetchError::RangeOutOfBounds {
                digest: blob.digest.clone(),
                range: range.clone(),
                size: blob.size,
            });
        }
        Ok(bytes.slice(range.start as usize..range.end as usize))
    }

    /// The registry's bytes for `blob` (its one-off ones first), now cached.
    fn registry_sends(&self, blob: &BlobRef, range: &Range<u64>) -> Result<Bytes, FetchError> {
        let mut held = self.held();
        let once = held
            .registry_once
            .get_mut(&blob.digest)
            .and_then(VecDeque::pop_front);
        let bytes = once
            .or_else(|| held.registry.get(&blob.digest).cloned())
            .ok_or_else(|| FetchError::NoTier {
                blob: blob.digest.clone(),
                range: range.clone(),
            })?;
        held.cache.insert(blob.digest.clone(), bytes.clone());
        held.from_peer.remove(&blob.digest);
        Self::slice(blob, &bytes, range)
    }

    fn get(&self, blob: &BlobRef, range: Range<u64>, route: Route) -> Result<Bytes, FetchError> {
        if let Some(bytes) = self.cached(blob, range.clone()) {
            return Ok(bytes);
        }
        if route != Route::Registry {
            let mut held = self.held();
            if let Some(bytes) = held.peer.get(&blob.digest).cloned() {
                held.peer_fetches += 1;
                held.cache.insert(blob.digest.clone(), bytes.clone());
                held.from_peer.insert(blob.digest.clone());
                return Self::slice(blob, &bytes, &range);
            }
        }
        self.registry_sends(blob, &range)
    }
}

impl Tiers for MemoryBlobs {
    fn cached(&self, blob: &BlobRef, range: Range<u64>) -> Option<Bytes> {
        let bytes = self.held().cache.get(&blob.digest).cloned()?;
        Self::slice(blob, &bytes, &range).ok()
    }

    fn fetch(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send {
        std::future::ready(self.get(blob, range, route))
    }

    fn refetch(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send {
        {
            let mut held = self.held();
            held.refetches += 1;
            held.cache.remove(&blob.digest);
        }
        std::future::ready(self.registry_sends(blob, &range))
    }

    fn fill(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> impl Future<Output = Result<(), FetchError>> + Send {
        std::future::ready(self.get(blob, range, route).map(drop))
    }

    fn passed(&self, blob: &BlobRef, range: Range<u64>) {
        self.held().passed.push((blob.digest.clone(), range));
    }

    fn discard(&self, blob: &BlobRef) -> Result<(), FetchError> {
        self.held().cache.remove(&blob.digest);
        Ok(())
    }

    fn drop_peer_blocks(&self, blob: &BlobRef) -> Result<u64, FetchError> {
        let mut held = self.held();
        if !held.from_peer.remove(&blob.digest) {
            return Ok(0);
        }
        held.cache.remove(&blob.digest);
        held.blamed += 1;
        // A blamed peer is avoided from then on.
        held.peer.remove(&blob.digest);
        Ok(1)
    }

    fn block_size(&self) -> u64 {
        1 << 20
    }

    fn peers_authenticated(&self) -> bool {
        self.held().authenticated
    }
}
