//! [`HeldBlocks`]: all the peer side sees of this node's chunk cache.
//!
//! The listener serves bytes from it and the announcer drops what it no longer holds; that is
//! all the peer side needs, so it gets this view rather than the fetcher that owns the cache
//! (the fetcher depends on the peers, never the other way).

use std::ops::Range;

use bytes::Bytes;

use crate::cache::{BlockKey, ChunkCache};
use crate::digest::Digest;

pub(crate) trait HeldBlocks: Send + Sync + 'static {
    /// Bytes `range` of `blob` if every one of them is held; never waits on the network.
    fn read(&self, blob: &Digest, range: Range<u64>) -> Option<Bytes>;

    /// Whether `block` is held.
    fn holds(&self, block: &BlockKey) -> bool;
}

impl HeldBlocks for ChunkCache {
    fn read(&self, blob: &Digest, range: Range<u64>) -> Option<Bytes> {
        ChunkCache::read(self, blob, range)
    }

    fn holds(&self, block: &BlockKey) -> bool {
        self.contains(block)
    }
}
