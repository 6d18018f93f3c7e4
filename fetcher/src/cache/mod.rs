//! The node-local chunk cache: aligned blocks of blobs, as the registry serves them, on disk.
//!
//! Each blob has a sparse data file and a presence bitmap under the cache directory. A block
//! becomes present only after its bytes are synced and then its bit is synced, so neither a
//! concurrent reader nor a crash ever sees a partly written block. Usage is bounded by a byte
//! capacity: least recently used blocks are evicted first, blocks of pinned blobs last.

mod bitmap;
mod blob_file;
mod recency;
mod space;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;
use tracing::info;

use crate::digest::Digest;
use crate::error::FetchError;
use bitmap::BitmapHeader;
use blob_file::BlobFile;
use recency::Recency;
use space::SpaceAlarm;

/// Blobs beyond this are not cached; it bounds each bitmap at 32 MiB for 4 KiB blocks.
pub const MAX_CACHED_BLOB_BYTES: u64 = 1 << 40;

/// One cache unit: block `index` (of `block_size` bytes) of blob `blob`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub blob: Digest,
    pub index: u64,
}

impl BlockKey {
    pub fn new(blob: Digest, index: u64) -> BlockKey {
        BlockKey { blob, index }
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
}

pub struct ChunkCache {
    dir: PathBuf,
    block_size: u64,
    /// Changed while running by [`ChunkCache::set_capacity`].
    capacity: AtomicU64,
    state: Mutex<State>,
    space: SpaceAlarm,
}

struct State {
    blobs: HashMap<Digest, Arc<BlobFile>>,
    recency: Recency,
    /// Bytes of present blocks.
    used: u64,
    /// Bytes being written: counted against the capacity before they land.
    reserved: u64,
    writing: HashSet<BlockKey>,
    pins: HashMap<Digest, u32>,
    /// Blocks evicted for room since start.
    evictions: u64,
}

impl ChunkCache {
    /// Opens (creating if needed) the cache in `dir`, reloading what an earlier run left.
    /// Files that do not add up (torn, other block size) are removed, not trusted.
    pub fn open(dir: &Path, block_size: u64, capacity: u64) -> Result<ChunkCache, FetchError> {
        let open_error = |source| FetchError::OpenCache {
            path: dir.to_owned(),
            source,
        };
        if let Some(had) = crate::private::dir(dir).map_err(open_error)? {
            info!(dir = %dir.display(), was = format!("{had:o}"), "cache directory narrowed to 0700");
        }
        let mut loaded = Vec::new();
        let mut data_files = Vec::new();
        let mut narrowed = 0u64;
        for dirent in std::fs::read_dir(dir).map_err(open_error)? {
            let dirent = dirent.map_err(open_error)?;
            let path = dirent.path();
            // Files an earlier version left readable by everyone (or already removed below,
            // with the torn blob they belonged to).
            if dirent.file_type().is_ok_and(|kind| kind.is_file()) {
                match crate::private::narrow(&path, crate::private::FILE_MODE) {
                    Ok(Some(_)) => narrowed += 1,
                    Ok(None) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(open_error(error)),
                }
            }
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(".tmp") {
                remove_stale(&path);
            } else if let Some(digest) = digest_of(name, ".bitmap") {
                match BlobFile::open(dir, &digest, block_size, MAX_CACHED_BLOB_BYTES) {
                    Ok(Some(blob)) if blob.bitmap().present().next().is_some() => loaded.push(blob),
                    Ok(_) => BlobFile::remove_files(dir, &digest),
                    Err(source) => return Err(open_error(source)),
                }
            } else if let Some(digest) = digest_of(name, ".data") {
                data_files.push((digest, path));
            }
        }
        for (digest, path) in data_files {
            if !loaded.iter().any(|blob| blob.digest == digest) {
                remove_stale(&path);
            }
        }
        if narrowed > 0 {
            info!(dir = %dir.display(), files = narrowed, "cache files narrowed to 0600");
        }
        // Recency is not persisted; the data files' modification times approximate it.
        loaded.sort_by_key(|blob| {
            std::fs::metadata(blob.path())
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        });
        let mut state = State {
            blobs: HashMap::new(),
            recency: Recency::new(),
            used: 0,
            reserved: 0,
            writing: HashSet::new(),
            pins: HashMap::new(),
            evictions: 0,
        };
        for blob in loaded {
            for index in blob.bitmap().present() {
                let len = blob.block_len(index);
                state.used += len;
                state
                    .recency
                    .insert(BlockKey::new(blob.digest.clone(), index), len, false);
            }
            state.blobs.insert(blob.digest.clone(), Arc::new(blob));
        }
        let cache = ChunkCache {
            dir: dir.to_owned(),
            block_size,
            capacity: AtomicU64::new(capacity),
            state: Mutex::new(state),
            space: SpaceAlarm::default(),
        };
        // The capacity may have shrunk since the last run.
        cache.shrink_to(capacity)?;
        Ok(cache)
    }

    /// Changes the cap (a reloaded `cache.capacity`), evicting least recently used blocks at
    /// once if the cache now holds more.
    pub fn set_capacity(&self, capacity: u64) -> Result<(), FetchError> {
        self.capacity.store(capacity, Ordering::Relaxed);
        self.shrink_to(capacity)
    }

    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    fn shrink_to(&self, capacity: u64) -> Result<(), FetchError> {
        let mut state = self.lock();
        while state.used > capacity {
            let Some((key, len)) = state.recency.victim() else {
                break;
            };
            self.evict(&mut state, &key, len)?;
            state.evictions += 1;
        }
        Ok(())
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes `range` of blob `digest` when every block under it is present; never blocks on
    /// anything but the local disk.
    pub fn read(&self, digest: &Digest, range: Range<u64>) -> Option<Bytes> {
        let blob = {
            let mut state = self.lock();
            let blob = state.blobs.get(digest)?.clone();
            if range.start > range.end || range.end > blob.header.blob_size {
                return None;
            }
            for index in blob.blocks_of(&range) {
                state.recency.touch(&BlockKey::new(digest.clone(), index));
            }
            blob
        };
        match blob.read_present(range) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(path = %blob.path().display(), %error, "cannot read cache block");
                None
            }
        }
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        let state = self.lock();
        state
            .blobs
            .get(&key.blob)
            .is_some_and(|blob| blob.bitmap().get(key.index))
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
    ) -> Result<(), FetchError> {
        let outcome = self.store(digest, blob_size, index, bytes);
        let (used, wanted) = (self.lock().used, bytes.len() as u64);
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
    ) -> Result<Written, FetchError> {
        let key = BlockKey::new(digest.clone(), index);
        let (blob, len) = {
            let mut state = self.lock();
            let blob = self.blob(&mut state, digest, blob_size)?;
            let len = blob.block_len(index);
            if len == 0 || bytes.len() as u64 != len {
                return Err(FetchError::CacheBlockLength {
                    block: key,
                    len: bytes.len() as u64,
                    expected: len,
                });
            }
            if state.writing.contains(&key) || blob.bitmap().get(index) {
                state.recency.touch(&key);
                return Ok(Written::Already);
            }
            self.make_room(&mut state, len, &key)?;
            state.reserved += len;
            state.writing.insert(key.clone());
            (blob, len)
        };

        let outcome = match blob.write_block(index, bytes) {
            Err(source) => {
                // Give back whatever part of the block did land.
                if let Err(error) = blob.punch(index) {
                    tracing::warn!(block = %key, %error, "cannot punch out a failed write");
                }
                Err(write_error(key.clone(), blob.path(), source))
            }
            // If this fails the bit may or may not have reached the disk; the data did, so
            // leaving the bytes in place keeps either outcome valid.
            Ok(()) => blob
                .mark_present(index)
                .map_err(|source| FetchError::PersistBitmap {
                    path: BlobFile::bitmap_path(&self.dir, digest),
                    source,
                }),
        };

        let mut state = self.lock();
        state.reserved -= len;
        state.writing.remove(&key);
        if outcome.is_ok() {
            state.used += len;
            let pinned = state.pins.contains_key(digest);
            state.recency.insert(key, len, pinned);
        }
        outcome.map(|()| Written::Now)
    }

    /// Drops every present block overlapping `range`, e.g. because its bytes failed
    /// verification.
    pub fn invalidate(&self, digest: &Digest, range: Range<u64>) -> Result<(), FetchError> {
        let mut state = self.lock();
        let Some(blob) = state.blobs.get(digest).cloned() else {
            return Ok(());
        };
        let end = range.end.min(blob.header.blob_size);
        for index in blob.blocks_of(&(range.start..end)) {
            if blob.bitmap().get(index) {
                let key = BlockKey::new(digest.clone(), index);
                self.evict(&mut state, &key, blob.block_len(index))?;
            }
        }
        Ok(())
    }

    /// Protects blob `digest`'s blocks: they are evicted only when nothing else is left.
    /// Pins nest; each needs its [`unpin`](Self::unpin).
    pub fn pin(&self, digest: &Digest) {
        let mut state = self.lock();
        let count = state.pins.entry(digest.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.move_tier(&mut state, digest, true);
        }
    }

    pub fn unpin(&self, digest: &Digest) {
        let mut state = self.lock();
        let Some(count) = state.pins.get_mut(digest) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            state.pins.remove(digest);
            self.move_tier(&mut state, digest, false);
        }
    }

    /// Bytes of `digest` the cache holds (0 for a blob it has never seen).
    pub fn cached_bytes(&self, digest: &Digest) -> u64 {
        let Some(blob) = self.lock().blobs.get(digest).cloned() else {
            return 0;
        };
        let bitmap = blob.bitmap();
        bitmap.present().map(|index| blob.block_len(index)).sum()
    }

    pub fn usage(&self) -> CacheUsage {
        let state = self.lock();
        CacheUsage {
            bytes: state.used,
            blocks: state.recency.len() as u64,
            capacity: self.capacity(),
            evictions: state.evictions,
            no_space_failures: self.space.failures(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The blob's files, created on first use.
    fn blob(
        &self,
        state: &mut State,
        digest: &Digest,
        blob_size: u64,
    ) -> Result<Arc<BlobFile>, FetchError> {
        if let Some(blob) = state.blobs.get(digest) {
            if blob.header.blob_size != blob_size {
                return Err(FetchError::CacheBlobSize {
                    digest: digest.clone(),
                    cached: blob.header.blob_size,
                    asked: blob_size,
                });
            }
            return Ok(blob.clone());
        }
        if blob_size > MAX_CACHED_BLOB_BYTES {
            return Err(FetchError::BlobTooLarge {
                digest: digest.clone(),
                size: blob_size,
                limit: MAX_CACHED_BLOB_BYTES,
            });
        }
        let header = BitmapHeader {
            block_size: self.block_size,
            blob_size,
        };
        let blob = BlobFile::create(&self.dir, digest, header).map_err(|source| {
            BlobFile::remove_files(&self.dir, digest);
            FetchError::CreateCacheFiles {
                digest: digest.clone(),
                path: self.dir.clone(),
                source,
            }
        })?;
        let blob = Arc::new(blob);
        state.blobs.insert(digest.clone(), blob.clone());
        Ok(blob)
    }

    /// Evicts until `len` more bytes fit under the capacity.
    fn make_room(&self, state: &mut State, len: u64, key: &BlockKey) -> Result<(), FetchError> {
        while state.used + state.reserved + len > self.capacity() {
            let Some((victim, victim_len)) = state.recency.victim() else {
                return Err(FetchError::CacheFull { block: key.clone() });
            };
            self.evict(state, &victim, victim_len)?;
            state.evictions += 1;
        }
        Ok(())
    }

    fn evict(&self, state: &mut State, key: &BlockKey, len: u64) -> Result<(), FetchError> {
        let Some(blob) = state.blobs.get(&key.blob).cloned() else {
            state.recency.remove(key);
            return Ok(());
        };
        blob.clear_block(key.index)
            .map_err(|source| FetchError::EvictBlock {
                block: key.clone(),
                path: BlobFile::bitmap_path(&self.dir, &key.blob),
                source,
            })?;
        state.recency.remove(key);
        state.used -= len;
        // The block is already gone for readers; a failed punch only wastes disk space.
        if let Err(error) = blob.punch(key.index) {
            tracing::warn!(block = %key, %error, "cannot punch out an evicted block");
        }
        Ok(())
    }

    fn move_tier(&self, state: &mut State, digest: &Digest, pinned: bool) {
        let Some(blob) = state.blobs.get(digest).cloned() else {
            return;
        };
        let present: Vec<u64> = blob.bitmap().present().collect();
        let keys = present
            .into_iter()
            .map(|index| BlockKey::new(digest.clone(), index));
        state.recency.set_pinned(keys, pinned);
    }
}

/// Whether an insert wrote bytes, which tells that the disk had room for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Now,
    Already,
}

fn write_error(block: BlockKey, path: &Path, source: io::Error) -> FetchError {
    if source.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) {
        FetchError::CacheNoSpace {
            block,
            path: path.to_owned(),
        }
    } else {
        FetchError::WriteBlock {
            block,
            path: path.to_owned(),
            source,
        }
    }
}

/// `<64 hex>.<suffix>` names a blob's file.
fn digest_of(name: &str, suffix: &str) -> Option<Digest> {
    let hex = name.strip_suffix(suffix)?;
    Digest::parse(&format!("sha256:{hex}")).ok()
}

fn remove_stale(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        // Gone already (removed with its torn blob, or by an operator): nothing to do.
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot remove stale cache file")
        }
    }
}
