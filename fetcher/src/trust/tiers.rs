//! [`Tiers`]: what the trust decisions stand on, the cache, peers and registry, as one
//! trait; [`Fetcher`] is the real one, [`super::MemoryBlobs`] the one tests use.

use std::future::Future;
use std::ops::Range;

use bytes::Bytes;

use crate::error::FetchError;
use crate::fetcher::Fetcher;
use crate::reference::BlobRef;

/// Which tiers may supply missing bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The cache, then peers, then the registry.
    Peers,
    /// The cache, then the registry.
    Registry,
    /// As [`Route::Peers`], and always a full fetch, even right after a failure: opening a
    /// layer, whose mount waits on it, must not fail on a short attempt.
    Index,
}

/// The tiers below the trust decisions. They move bytes and never judge them: every byte
/// they return is unchecked until [`super`] has checked it.
pub trait Tiers: Send + Sync {
    /// Bytes `range` of `blob` if the cache holds all of them; never waits on the network.
    fn cached(&self, blob: &BlobRef, range: Range<u64>) -> Option<Bytes>;

    /// Bytes `range` of `blob`, from the cache or the tiers `route` allows.
    fn fetch(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send;

    /// Bytes `range` of `blob` from the registry alone: the cached copy is dropped and the
    /// peer that sent any of it is blamed, for those bytes failed their check.
    fn refetch(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send;

    /// Brings `range` of `blob` into the cache from the tiers `route` allows.
    fn fill(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> impl Future<Output = Result<(), FetchError>> + Send;

    /// Bytes `range` of `blob` passed a check against a digest from a verified index: the
    /// peer-sent blocks every byte of which has now passed become shareable.
    fn passed(&self, blob: &BlobRef, range: Range<u64>);

    /// `blob` failed its digest: none of it may be served or shared again.
    fn discard(&self, blob: &BlobRef) -> Result<(), FetchError>;

    /// `blob` failed its digest: the blocks peers sent of it are dropped and their senders
    /// blamed. How many blocks were dropped.
    fn drop_peer_blocks(&self, blob: &BlobRef) -> Result<u64, FetchError>;

    /// The unit peers trade: a cache block.
    fn block_size(&self) -> u64;

    /// Whether every peer is authenticated as a member of the cluster (mutual TLS).
    fn peers_authenticated(&self) -> bool;

    /// Whether reads are fetching bytes a container waits for now.
    fn foreground_fetching(&self) -> bool {
        false
    }

    /// Bytes of `blob` the cache holds in whole blocks.
    fn cached_bytes(&self, _blob: &BlobRef) -> u64 {
        0
    }
}

impl Tiers for Fetcher {
    fn cached(&self, blob: &BlobRef, range: Range<u64>) -> Option<Bytes> {
        self.read_cached(blob, range)
    }

    fn fetch(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send {
        self.read_routed(blob, range, route)
    }

    fn refetch(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
    ) -> impl Future<Output = Result<Bytes, FetchError>> + Send {
        Fetcher::refetch(self, blob, range)
    }

    fn fill(
        &self,
        blob: &BlobRef,
        range: Range<u64>,
        route: Route,
    ) -> impl Future<Output = Result<(), FetchError>> + Send {
        self.prefetch_routed(blob, range, route)
    }

    fn passed(&self, blob: &BlobRef, range: Range<u64>) {
        if let Some(peers) = self.peers() {
            peers.verified(blob, range);
        }
    }

    fn discard(&self, blob: &BlobRef) -> Result<(), FetchError> {
        Ok(self.cache().invalidate(&blob.digest, 0..blob.size)?)
    }

    fn drop_peer_blocks(&self, blob: &BlobRef) -> Result<u64, FetchError> {
        let Some(peers) = self.peers() else {
            return Ok(0);
        };
        let geometry = self.cache().geometry(blob.size);
        let blocks = peers.rejected_all(&blob.digest, geometry.covering(&(0..blob.size)));
        for &index in &blocks {
            self.cache()
                .invalidate(&blob.digest, geometry.span(index))?;
        }
        Ok(blocks.len() as u64)
    }

    fn block_size(&self) -> u64 {
        self.cache().block_size()
    }

    fn foreground_fetching(&self) -> bool {
        Fetcher::foreground_fetching(self)
    }

    fn cached_bytes(&self, blob: &BlobRef) -> u64 {
        self.cache().cached_bytes(&blob.digest)
    }

    fn peers_authenticated(&self) -> bool {
        self.peers().is_some_and(|peers| peers.authenticated())
    }
}
