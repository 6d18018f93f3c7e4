//! Partially filled blocks: the bytes a foreground read fetched, cached before the rest of
//! their block has arrived.
//!
//! Such bytes are written into the data file without a sync and readable at once, by this
//! process, through the page cache; they are never recorded on disk, so after a crash or a
//! restart their block is simply absent (its presence byte was never set) and nothing
//! unwritten can be served. A block becomes present, durable, only when its whole bytes are
//! stored ([`ChunkCache::insert`]); only then may peers be told of it. Partial blocks are
//! not counted against the capacity: the background fill makes them whole within moments,
//! or drops them.

use std::collections::hash_map::Entry;
use std::ops::Range;

use parking_lot::MutexGuard;

use super::{write_error, BlockKey, CacheError, ChunkCache, State, Step};
use crate::digest::Digest;

impl ChunkCache {
    /// Caches `bytes` at `range` of blob `digest` (of `blob_size` bytes): the blocks it
    /// covers whole are stored as [`insert`](Self::insert) does, the parts of others as
    /// written extents. A block being stored or evicted meanwhile is skipped (its bytes are
    /// not lost to the reader, who has them, only not cached).
    pub fn insert_extent(
        &self,
        digest: &Digest,
        blob_size: u64,
        range: Range<u64>,
        bytes: &[u8],
    ) -> Result<(), CacheError> {
        if bytes.len() as u64 != range.end - range.start || range.end > blob_size {
            return Err(CacheError::CacheExtentLength {
                blob: digest.clone(),
                range,
                len: bytes.len() as u64,
            });
        }
        let geometry = self.geometry(blob_size);
        for index in geometry.covering(&range) {
            let span = geometry.span(index);
            let part = span.start.max(range.start)..span.end.min(range.end);
            let slice =
                &bytes[(part.start - range.start) as usize..(part.end - range.start) as usize];
            if part == span {
                self.insert(digest, blob_size, index, slice)?;
            } else {
                self.write_extent(digest, blob_size, index, part, slice)?;
            }
        }
        Ok(())
    }

    fn write_extent(
        &self,
        digest: &Digest,
        blob_size: u64,
        index: u64,
        part: Range<u64>,
        bytes: &[u8],
    ) -> Result<(), CacheError> {
        let key = BlockKey::new(digest, index);
        let blob = self.blob(digest, blob_size)?;
        {
            // Another extent being written is no reason to skip this one (two reads in one
            // block cache both); a store or a drop of the block under way is.
            let mut state = self.state.lock();
            if blob.is_present(index) || state.busy.contains(&key) {
                return Ok(());
            }
            *state.writing.entry(key).or_default() += 1;
        }
        let written = self
            .fail_at(Step::WriteData)
            .and_then(|()| blob.write_extent(index, part, bytes));
        {
            let mut state = self.state.lock();
            if let Entry::Occupied(mut writers) = state.writing.entry(key) {
                *writers.get_mut() -= 1;
                if *writers.get() == 0 {
                    writers.remove();
                    self.extents_written.notify_all();
                }
            }
        }
        written.map_err(|source| write_error(key, blob.path(), source))
    }

    /// Waits until no extent of block `key` is being written: a store or a drop must not
    /// interleave with a writer's bytes. Writers hold no lock while they write and wait for
    /// nothing, so this ends.
    pub(super) fn wait_for_extents(&self, state: &mut MutexGuard<'_, State>, key: &BlockKey) {
        while state.writing.contains_key(key) {
            self.extents_written.wait(state);
        }
    }

    /// The parts of block `index` of blob `digest` the cache holds neither whole nor
    /// written: all of it for a blob it has never seen, none for a present block.
    pub fn gaps(&self, digest: &Digest, blob_size: u64, index: u64) -> Vec<Range<u64>> {
        match self.blobs.read().get(&digest.raw()) {
            Some(blob) => blob.gaps(index),
            None => {
                let span = self.geometry(blob_size).span(index);
                if span.is_empty() {
                    Vec::new()
                } else {
                    vec![span]
                }
            }
        }
    }

    /// Drops the written parts of block `index` of blob `digest` and returns their space:
    /// for a block whose fill was given up, or whose bytes failed their check.
    pub fn drop_partial(&self, digest: &Digest, index: u64) {
        let Some(blob) = self.blobs.read().get(&digest.raw()).cloned() else {
            return;
        };
        let key = BlockKey::new(digest, index);
        {
            let mut state = self.state.lock();
            self.wait_for_extents(&mut state, &key);
            if blob.is_present(index) || !state.busy.insert(key) {
                return;
            }
        }
        if blob.drop_extents(index) {
            if let Err(error) = blob.punch(index) {
                tracing::warn!(block = %key, %error, "cannot punch out a partial block");
            }
        }
        self.state.lock().busy.remove(&key);
    }

    /// Bytes of blocks not yet whole written for blob `digest`.
    pub fn partial_bytes(&self, digest: &Digest) -> u64 {
        self.blobs
            .read()
            .get(&digest.raw())
            .map_or(0, |blob| blob.partial_bytes())
    }
}
