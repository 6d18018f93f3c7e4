//! Eviction: which blocks leave the cache for room, and how their absence is made durable
//! before their bytes are punched out, with no lock held across that I/O.

use std::sync::Arc;
use std::time::Instant;

use super::blob_file::BlobFile;
use super::{BlockKey, CacheError, ChunkCache, State};

/// A block chosen for eviction: hidden from readers and held in `busy`, its absence not yet
/// durable and its bytes still on disk.
pub(super) struct Victim {
    pub(super) blob: Arc<BlobFile>,
    pub(super) key: BlockKey,
}

impl ChunkCache {
    pub(super) fn shrink_to(&self, capacity: u64) -> Result<(), CacheError> {
        let victims = {
            let mut state = self.state.lock();
            self.take_touches(&mut state);
            let mut victims = Vec::new();
            while state.used > capacity {
                let Some(victim) = self.choose_victim(&mut state) else {
                    break;
                };
                state.evictions += 1;
                victims.push(victim);
            }
            victims
        };
        self.retire(victims)
    }

    /// Chooses victims until `len` more bytes fit under the capacity; the victims chosen
    /// must be retired even when not enough could be found.
    pub(super) fn make_room(
        &self,
        state: &mut State,
        len: u64,
        key: &BlockKey,
        now: Instant,
    ) -> (Vec<Victim>, Result<(), CacheError>) {
        let fits = |state: &State| state.used + state.reserved + len <= self.capacity();
        let mut victims = Vec::new();
        if !fits(state) {
            self.take_touches(state);
        }
        while !fits(state) {
            let Some(victim) = self.choose_victim(state) else {
                return (victims, Err(CacheError::CacheFull { block: *key }));
            };
            state.evictions += 1;
            state.thrash.evicted(victim.key, now);
            victims.push(victim);
        }
        (victims, Ok(()))
    }

    /// Brings the hits blobs noted since the last call into the eviction order.
    pub(super) fn take_touches(&self, state: &mut State) {
        let blobs: Vec<Arc<BlobFile>> = self.blobs.read().values().cloned().collect();
        for blob in blobs {
            let raw = blob.digest.raw();
            for index in blob.take_touched() {
                state.recency.touch(&BlockKey { blob: raw, index });
            }
        }
    }

    /// Takes the next block out of the eviction order and hides it from readers.
    pub(super) fn choose_victim(&self, state: &mut State) -> Option<Victim> {
        loop {
            let (key, len) = state.recency.victim()?;
            state.recency.remove(&key);
            state.used -= len;
            if let Some(blob) = self.blobs.read().get(&key.blob).cloned() {
                blob.hide(key.index);
                state.busy.insert(key);
                return Some(Victim { blob, key });
            }
        }
    }

    /// Makes the victims' absence durable, then punches out their bytes; no lock is held.
    pub(super) fn retire(&self, victims: Vec<Victim>) -> Result<(), CacheError> {
        if victims.is_empty() {
            return Ok(());
        }
        let mut failed = None;
        for Victim { blob, key } in &victims {
            match blob.persist_absent(key.index) {
                // The block is already gone for readers; a failed punch only wastes space.
                Ok(()) => {
                    if let Err(error) = blob.punch(key.index) {
                        tracing::warn!(block = %key, %error, "cannot punch out an evicted block");
                    }
                }
                // Hidden for this run; on disk it stays present with its bytes intact, so
                // a restart finds it valid.
                Err(source) => {
                    failed.get_or_insert(CacheError::EvictBlock {
                        block: *key,
                        path: BlobFile::bitmap_path(&self.dir, &blob.digest),
                        source,
                    });
                }
            }
        }
        let mut state = self.state.lock();
        for victim in &victims {
            state.busy.remove(&victim.key);
        }
        failed.map_or(Ok(()), Err)
    }
}
