//! The node-local chunk cache: aligned blocks of blobs, as the registry serves them, on disk.
//!
//! Each blob has a sparse data file and a presence bitmap under the cache directory. A block
//! becomes present only after its bytes are synced and then its presence byte is synced, so
//! neither a concurrent reader nor a crash ever sees a partly written block; an evicted block
//! is hidden first, its absence synced next, and only then its bytes punched out. None of
//! that I/O happens under a lock: a block being stored or evicted is held in `busy`, which
//! keeps every other writer off it. Usage is bounded by a byte capacity: least recently used
//! blocks are evicted first, blocks of pinned blobs last.
//!
//! A hit takes one process-wide lock, for reading (the blob map), and its blob's own lock;
//! the eviction order learns of hits when it next needs a victim.

mod bitmap;
mod blob_file;
mod error;
mod eviction;
mod extents;
mod geometry;
mod partial;
mod recency;
mod reload;
mod space;
#[cfg(test)]
mod tests;
mod thrash;

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};

use crate::digest::{Digest, RawDigest};
use blob_file::BlobFile;
pub use error::CacheError;
use eviction::Victim;
pub use geometry::BlockGeometry;
use recency::Recency;
use space::SpaceAlarm;

/// Blobs beyond this are not cached; it bounds each bitmap at 32 MiB in memory (256 MiB on
/// disk, sparse) for 4 KiB blocks.
pub const MAX_CACHED_BLOB_BYTES: u64 = 1 << 40;

/// One cache unit: block `index` (of the cache's block size) of blob `blob`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub blob: RawDigest,
    pub index: u64,
}

impl BlockKey {
    /// Takes the digest by reference, or by value from callers that hold a copy anyway.
    pub fn new(blob: impl Borrow<Digest>, index: u64) -> BlockKey {
        BlockKey {
            blob: blob.borrow().raw(),
            index,
        }
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.blob, self.index)
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}[{}]", self.blob, self.index)
    }
}

/// What the cache holds, against what it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    pub bytes: u64,
    pub blocks: u64,
    pub capacity: u64,
    /// Blocks evicted to stay under the capacity since start (not those dropped because
    /// their bytes failed verification).
    pub evictions: u64,
    /// Blocks not stored since start because the cache's disk was full.
    pub no_space_failures: u64,
    /// Blocks stored again within a minute of their eviction since start: the cache is
    /// smaller than what is being read.
    pub refetched_after_eviction: u64,
}

pub struct ChunkCache {
    dir: PathBuf,
    block_size: u64,
    /// Changed while running by [`ChunkCache::set_capacity`].
    capacity: AtomicU64,
    /// Read by every hit; written only when a blob's files have been created.
    blobs: RwLock<HashMap<RawDigest, Arc<BlobFile>>>,
    state: Mutex<State>,
    /// Signalled (with `state`) when a blob's files were created, or failed to be.
    created: Condvar,
    /// Signalled (with `state`) when the last extent writer of a block is done.
    extents_written: Condvar,
    space: SpaceAlarm,
    #[cfg(test)]
    fault: Mutex<Option<Step>>,
}

/// Everything but the hit path: eviction order, accounting, blocks in hand.
#[derive(Default)]
struct State {
    recency: Recency,
    /// Bytes of present blocks.
    used: u64,
    /// Bytes being written: counted against the capacity before they land.
    reserved: u64,
    /// Blocks being stored or evicted: each has one writer of its presence byte at a time.
    busy: HashSet<BlockKey>,
    /// Blocks with extents being written, and by how many writers: extents of one block
    /// are written side by side, while a store or a drop of the block waits for them.
    writing: HashMap<BlockKey, u32>,
    /// Blobs whose files are being created.
    creating: HashSet<RawDigest>,
    pins: HashMap<RawDigest, u32>,
    /// Blocks evicted for room since start.
    evictions: u64,
    /// Blocks stored again soon after their eviction: a cache smaller than its working set.
    thrash: thrash::Thrash,
}

/// The steps of storing a block that a test can make fail, to stand for a crash there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    WriteData,
    PersistPresence,
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, reloading what an earlier run left.
    /// Files that do not add up (torn, other block size) are removed, not trusted.
    pub fn open(dir: &Path, block_size: u64, capacity: u64) -> Result<ChunkCache, CacheError> {
        let mut state = State::default();
        let mut blobs = HashMap::new();
        for blob in reload::load(dir, block_size)? {
            let raw = blob.digest.raw();
            for index in blob.present() {
                let len = blob.geometry.block_len(index);
                state.used += len;
                state
                    .recency
                    .insert(BlockKey { blob: raw, index }, len, false);
            }
            blobs.insert(raw, Arc::new(blob));
        }
        let cache = ChunkCache {
            dir: dir.to_owned(),
            block_size,
            capacity: AtomicU64::new(capacity),
            blobs: RwLock::new(blobs),
            state: Mutex::new(state),
            created: Condvar::new(),
            extents_written: Condvar::new(),
            space: SpaceAlarm::default(),
            #[cfg(test)]
            fault: Mutex::new(None),
        };
        // The capacity may have shrunk since the last run.
        cache.shrink_to(capacity)?;
        Ok(cache)
    }

    /// Changes the cap (a reloaded `cache.capacity`), evicting least recently used blocks at
    /// once if the cache now holds more.
    pub fn set_capacity(&self, capacity: u64) -> Result<(), CacheError> {
        self.capacity.store(capacity, Ordering::Relaxed);
        self.shrink_to(capacity)
    }

    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// How a blob of `blob_size` bytes divides into this cache's blocks.
    pub fn geometry(&self, blob_size: u64) -> BlockGeometry {
        BlockGeometry::new(self.block_size, blob_size)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes `range` of blob `digest` when every block under it is present; never blocks on
    /// anything but the local disk.
    pub fn read(&self, digest: &Digest, range: Range<u64>) -> Option<Bytes> {
        let blob = self.blobs.read().get(&digest.raw()).cloned()?;
        if range.start > range.end || range.end > blob.geometry.blob_size {
            return None;
        }
        match blob.read_present(range) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(path = %blob.path().display(), %error, "cannot read cache block");
                None
            }
        }
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        let blob = self.blobs.read().get(&key.blob).cloned();
        blob.is_some_and(|blob| blob.is_present(key.index))
    }

    /// Stores block `index` of blob `digest` (of `blob_size` bytes), evicting others to make
    /// room. On error the block stays absent and the cache stays consistent. A full disk is
    /// logged when it starts and when it ends, not at every block.
    pub fn insert(
        &self,
        digest: &Digest,
        blob_size: u64,
        index: u64,
        bytes: &[u8],
    ) -> Result<(), CacheError> {
        let outcome = self.store(digest, blob_size, index, bytes);
        let (used, wanted) = (self.state.lock().used, bytes.len() as u64);
        self.space
            .observe(&outcome, &self.dir, wanted, used, self.capacity());
        outcome.map(|_| ())
    }

    fn store(
        &self,
        digest: &Digest,
        blob_size: u64,
        index: u64,
        bytes: &[u8],
    ) -> Result<Written, CacheError> {
        let key = BlockKey::new(digest, index);
        let blob = self.blob(digest, blob_size)?;
        let len = blob.geometry.block_len(index);
        if len == 0 || bytes.len() as u64 != len {
            return Err(CacheError::CacheBlockLength {
                block: key,
                len: bytes.len() as u64,
                expected: len,
            });
        }
        let mut thrashing = None;
        let now = Instant::now();
        let (victims, room) = {
            let mut state = self.state.lock();
            self.wait_for_extents(&mut state, &key);
            if blob.is_present(index) {
                state.recency.touch(&key);
                return Ok(Written::Already);
            }
            if state.busy.contains(&key) {
                return Ok(Written::Already);
            }
            let (victims, room) = self.make_room(&mut state, len, &key, now);
            if room.is_ok() {
                state.reserved += len;
                state.busy.insert(key);
                thrashing = state.thrash.stored(key, len, now);
            }
            (victims, room)
        };
        if let Some(report) = thrashing {
            tracing::warn!(
                capacity = self.capacity(),
                refetched_blocks = report.blocks,
                refetched_bytes = report.bytes,
                working_set_at_least = self.capacity() + report.bytes,
                "chunk cache is thrashing: blocks evicted in the last minute are being fetched \
                 again; raise cache.capacity above the working set"
            );
        }
        if let Err(error) = self.retire(victims) {
            tracing::warn!(block = %key, %error, "cannot evict a block to make room");
        }
        room?;

        let outcome = match self
            .fail_at(Step::WriteData)
            .and_then(|()| blob.write_block(index, bytes))
        {
            Err(source) => {
                // Give back whatever part of the block did land.
                if let Err(error) = blob.punch(index) {
                    tracing::warn!(block = %key, %error, "cannot punch out a failed write");
                }
                Err(write_error(key, blob.path(), source))
            }
            // If this fails the byte may or may not have reached the disk; the data did, so
            // leaving the bytes in place keeps either outcome valid.
            Ok(()) => self
                .fail_at(Step::PersistPresence)
                .and_then(|()| blob.mark_present(index))
                .map_err(|source| CacheError::PersistBitmap {
                    path: BlobFile::bitmap_path(&self.dir, digest),
                    source,
                }),
        };

        let mut state = self.state.lock();
        state.reserved -= len;
        state.busy.remove(&key);
        if outcome.is_ok() {
            state.used += len;
            let pinned = state.pins.contains_key(&key.blob);
            state.recency.insert(key, len, pinned);
        }
        outcome.map(|()| Written::Now)
    }

    /// Drops every present or partly written block overlapping `range`, e.g. because its
    /// bytes failed verification.
    pub fn invalidate(&self, digest: &Digest, range: Range<u64>) -> Result<(), CacheError> {
        let Some(blob) = self.blobs.read().get(&digest.raw()).cloned() else {
            return Ok(());
        };
        let end = range.end.min(blob.geometry.blob_size);
        for index in blob.geometry.covering(&(range.start..end)) {
            self.drop_partial(digest, index);
        }
        let victims = {
            let mut state = self.state.lock();
            let mut victims = Vec::new();
            for index in blob.geometry.covering(&(range.start..end)) {
                let key = BlockKey::new(digest, index);
                if state.busy.contains(&key) || !blob.is_present(index) {
                    continue;
                }
                if let Some(len) = state.recency.remove(&key) {
                    state.used -= len;
                }
                blob.hide(index);
                state.busy.insert(key);
                victims.push(Victim {
                    blob: blob.clone(),
                    key,
                });
            }
            victims
        };
        self.retire(victims)
    }

    /// Protects blob `digest`'s blocks: they are evicted only when nothing else is left.
    /// Pins nest; each needs its [`unpin`](Self::unpin).
    pub fn pin(&self, digest: &Digest) {
        let mut state = self.state.lock();
        let count = state.pins.entry(digest.raw()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.move_tier(&mut state, digest, true);
        }
    }

    pub fn unpin(&self, digest: &Digest) {
        let mut state = self.state.lock();
        let Some(count) = state.pins.get_mut(&digest.raw()) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            state.pins.remove(&digest.raw());
            self.move_tier(&mut state, digest, false);
        }
    }

    /// Whether someone (a mounted layer) pins blob `digest`.
    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.state.lock().pins.contains_key(&digest.raw())
    }

    /// Bytes of `digest` the cache holds (0 for a blob it has never seen).
    pub fn cached_bytes(&self, digest: &Digest) -> u64 {
        let Some(blob) = self.blobs.read().get(&digest.raw()).cloned() else {
            return 0;
        };
        let present = blob.present();
        present
            .into_iter()
            .map(|index| blob.geometry.block_len(index))
            .sum()
    }

    pub fn usage(&self) -> CacheUsage {
        let state = self.state.lock();
        CacheUsage {
            bytes: state.used,
            blocks: state.recency.len() as u64,
            capacity: self.capacity(),
            evictions: state.evictions,
            no_space_failures: self.space.failures(),
            refetched_after_eviction: state.thrash.total(),
        }
    }

    /// The blob's files, created on first use with no lock held; a concurrent first use
    /// waits for that creation instead of starting its own.
    fn blob(&self, digest: &Digest, blob_size: u64) -> Result<Arc<BlobFile>, CacheError> {
        let raw = digest.raw();
        let known = |blob: Arc<BlobFile>| {
            if blob.geometry.blob_size != blob_size {
                return Err(CacheError::CacheBlobSize {
                    digest: digest.clone(),
                    cached: blob.geometry.blob_size,
                    asked: blob_size,
                });
            }
            Ok(blob)
        };
        if let Some(blob) = self.blobs.read().get(&raw).cloned() {
            return known(blob);
        }
        let mut state = self.state.lock();
        loop {
            if let Some(blob) = self.blobs.read().get(&raw).cloned() {
                return known(blob);
            }
            if !state.creating.contains(&raw) {
                break;
            }
            self.created.wait(&mut state);
        }
        if blob_size > MAX_CACHED_BLOB_BYTES {
            return Err(CacheError::BlobTooLarge {
                digest: digest.clone(),
                size: blob_size,
                limit: MAX_CACHED_BLOB_BYTES,
            });
        }
        state.creating.insert(raw);
        drop(state);
        let created =
            BlobFile::create(&self.dir, digest, self.geometry(blob_size)).map_err(|source| {
                BlobFile::remove_files(&self.dir, digest);
                CacheError::CreateCacheFiles {
                    digest: digest.clone(),
                    path: self.dir.clone(),
                    source,
                }
            });
        let mut state = self.state.lock();
        state.creating.remove(&raw);
        let created = created.map(|blob| {
            let blob = Arc::new(blob);
            self.blobs.write().insert(raw, blob.clone());
            blob
        });
        drop(state);
        self.created.notify_all();
        created
    }

    fn move_tier(&self, state: &mut State, digest: &Digest, pinned: bool) {
        let Some(blob) = self.blobs.read().get(&digest.raw()).cloned() else {
            return;
        };
        let raw = digest.raw();
        let keys = blob
            .present()
            .into_iter()
            .map(|index| BlockKey { blob: raw, index });
        state.recency.set_pinned(keys, pinned);
    }

    #[cfg(test)]
    fn fail_at(&self, step: Step) -> io::Result<()> {
        if *self.fault.lock() == Some(step) {
            return Err(io::Error::other("injected fault"));
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn fail_at(&self, _step: Step) -> io::Result<()> {
        Ok(())
    }
}

/// Whether an insert wrote bytes, which tells that the disk had room for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Now,
    Already,
}

fn write_error(block: BlockKey, path: &Path, source: io::Error) -> CacheError {
    if source.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) {
        CacheError::CacheNoSpace {
            block,
            path: path.to_owned(),
        }
    } else {
        CacheError::WriteBlock {
            block,
            path: path.to_owned(),
            source,
        }
    }
}
