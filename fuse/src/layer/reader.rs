//! Reading a file range of an eStargz layer: chunk locations from the index, each chunk read
//! through [`BlobRead`] with its sha256 from the verified TOC and its gzip decoder, and a
//! memory cache of the decoded chunks. The fetcher checks every chunk before it returns it.
//!
//! A read first tries memory and the disk cache ([`ChunkReader::read_cached`], on the FUSE
//! thread); what it misses travels as a [`Pending`] read, with the chunks it found, to
//! [`ChunkReader::read_pending`], so the chunks are looked up once and found ones are not
//! looked for again.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use lru::LruCache;
use parking_lot::Mutex;
use shoal_fetcher::{
    BlobRead, BlobRef, Expect, Histogram, HistogramSnapshot, RawDigest, Rejection,
};

use crate::error::FsError;
use shoal_formats::estargz::{decompress_chunk, Chunk, Index, Ino};

/// Tunables of a [`ChunkReader`].
#[derive(Debug, Clone, Copy)]
pub struct ReaderConfig {
    /// Decompressed, verified chunk bytes kept in memory (shared by every layer of a reader).
    pub memory_bytes: u64,
}

/// Key of a decoded chunk: its blob and where it starts (`Copy`: built on every read).
type ChunkKey = (RawDigest, u64, u64);

/// Decoded-chunk memory cache shared by all layers, bounded in bytes.
pub struct ChunkReader {
    blobs: Arc<dyn BlobRead>,
    memory: Mutex<Memory>,
    read_failures: AtomicU64,
    /// FUSE read requests, from arrival to reply.
    /// Shared with the overlaybd disks' filesystems: one histogram of every FUSE read.
    read_latency: Arc<Histogram>,
}

/// What readers of lazily mounted layers have met since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Reads answered with an I/O error.
    pub read_failures: u64,
    /// Decoded chunk bytes held in memory.
    pub memory_bytes: u64,
}

struct Memory {
    chunks: LruCache<ChunkKey, Bytes>,
    bytes: u64,
    cap: u64,
}

impl ChunkReader {
    pub fn new(blobs: Arc<dyn BlobRead>, config: ReaderConfig) -> Arc<ChunkReader> {
        Arc::new(ChunkReader {
            blobs,
            memory: Mutex::new(Memory {
                chunks: LruCache::unbounded(),
                bytes: 0,
                cap: config.memory_bytes,
            }),
            read_failures: AtomicU64::new(0),
            read_latency: Arc::default(),
        })
    }

    pub fn blobs(&self) -> &dyn BlobRead {
        &*self.blobs
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            read_failures: self.read_failures.load(Ordering::Relaxed),
            memory_bytes: self.memory.lock().bytes,
        }
    }

    /// Counts one FUSE read that took `elapsed` from request to reply.
    pub fn observe_read(&self, elapsed: std::time::Duration) {
        self.read_latency.observe(elapsed);
    }

    /// Where other filesystems of this daemon count their FUSE reads too.
    pub fn read_latency_histogram(&self) -> Arc<Histogram> {
        self.read_latency.clone()
    }

    pub fn read_latency(&self) -> HistogramSnapshot {
        self.read_latency.snapshot()
    }

    /// Reads `offset..offset+len` of `ino` if every chunk it needs is in memory or in the disk
    /// cache; otherwise the read as far as it got, for [`read_pending`](Self::read_pending) to
    /// finish. Never blocks on I/O beyond the cache.
    pub fn read_cached(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, Pending> {
        let Some(chunks) = index.chunks_for(ino, offset, len) else {
            return Ok(Bytes::new());
        };
        let wanted = clip(index, ino, offset, len);
        let mut found = Vec::with_capacity(chunks.len());
        let mut complete = true;
        for chunk in chunks {
            let bytes = self.remembered(blob, chunk).or_else(|| {
                let decode = |raw: &Bytes| decode(raw, chunk);
                let bytes =
                    self.blobs
                        .read_cached(blob, chunk_range(chunk), expect(chunk, &decode))?;
                self.remember(blob, chunk, bytes.clone());
                Some(bytes)
            });
            complete &= bytes.is_some();
            found.push(bytes);
            // Past the first miss the read needs the network anyway: the rest is left to
            // `read_pending`, off the FUSE thread.
            if !complete {
                found.extend(std::iter::repeat_n(None, chunks.len() - found.len()));
                break;
            }
        }
        if complete {
            return Ok(assemble(chunks, &found, &wanted));
        }
        Err(Pending {
            chunks: chunks.to_vec(),
            found,
            wanted,
        })
    }

    /// Finishes a read [`read_cached`](Self::read_cached) could not answer, fetching the
    /// chunks it did not find, all at once (a read covers a few chunks at most, and the
    /// fetcher bounds the fetches in flight). A chunk that fails its digest is fetched once
    /// more from the registry before the read fails.
    pub async fn read_pending(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        mut pending: Pending,
    ) -> Result<Bytes, FsError> {
        let mut fetches = Vec::new();
        for (at, (chunk, found)) in pending
            .chunks
            .iter()
            .zip(pending.found.iter_mut())
            .enumerate()
        {
            if found.is_some() {
                continue;
            }
            if let Some(bytes) = self.remembered(blob, chunk) {
                *found = Some(bytes);
                continue;
            }
            fetches.push(async move { (at, self.fetch_chunk(blob, index, ino, chunk).await) });
        }
        for (at, fetched) in futures::future::join_all(fetches).await {
            match fetched {
                Ok(bytes) => pending.found[at] = Some(bytes),
                Err(err) => {
                    self.read_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(err);
                }
            }
        }
        Ok(assemble(&pending.chunks, &pending.found, &pending.wanted))
    }

    /// Reads `offset..offset+len` of `ino`, fetching what is missing.
    pub async fn read(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, FsError> {
        match self.read_cached(blob, index, ino, offset, len) {
            Ok(bytes) => Ok(bytes),
            Err(pending) => self.read_pending(blob, index, ino, pending).await,
        }
    }

    async fn fetch_chunk(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        chunk: &Chunk,
    ) -> Result<Bytes, FsError> {
        let decode = |raw: &Bytes| decode(raw, chunk);
        let bytes = self
            .blobs
            .read(blob, chunk_range(chunk), expect(chunk, &decode))
            .await
            .map_err(|source| FsError::ReadChunk {
                path: path_of(index, ino),
                offset: chunk.file_offset,
                source,
            })?;
        self.remember(blob, chunk, bytes.clone());
        Ok(bytes)
    }

    fn key(blob: &BlobRef, chunk: &Chunk) -> ChunkKey {
        (blob.digest.raw(), chunk.blob_offset, chunk.inner_offset)
    }

    pub(super) fn remembered(&self, blob: &BlobRef, chunk: &Chunk) -> Option<Bytes> {
        self.memory
            .lock()
            .chunks
            .get(&Self::key(blob, chunk))
            .cloned()
    }

    pub(super) fn remember(&self, blob: &BlobRef, chunk: &Chunk, bytes: Bytes) {
        let mut memory = self.memory.lock();
        let len = bytes.len() as u64;
        if len > memory.cap {
            return;
        }
        if let Some(old) = memory.chunks.put(Self::key(blob, chunk), bytes) {
            memory.bytes -= old.len() as u64;
        }
        memory.bytes += len;
        while memory.bytes > memory.cap {
            match memory.chunks.pop_lru() {
                Some((_, evicted)) => memory.bytes -= evicted.len() as u64,
                None => break,
            }
        }
    }
}

/// Where `chunk`'s compressed bytes lie in its blob.
pub(super) fn chunk_range(chunk: &Chunk) -> std::ops::Range<u64> {
    chunk.blob_offset..chunk.blob_end
}

/// What `chunk`'s bytes must match: its sha256 from the verified TOC, once gunzipped.
pub(super) fn expect<'a>(chunk: &Chunk, decode: &'a dyn shoal_fetcher::Decode) -> Expect<'a> {
    Expect::Sha256 {
        digest: *chunk.digest.as_bytes(),
        decode,
    }
}

/// Gunzips one chunk out of its compressed bytes.
pub(super) fn decode(raw: &Bytes, chunk: &Chunk) -> Result<Bytes, Rejection> {
    Ok(Bytes::from(decompress_chunk(raw, chunk)?))
}

/// A read not answered whole from memory and the disk cache: the chunks under it, those
/// found so far, and the file bytes wanted.
pub struct Pending {
    chunks: Vec<Chunk>,
    found: Vec<Option<Bytes>>,
    wanted: Range<u64>,
}

/// The `wanted` file bytes out of whole decoded chunks, all found by now: a slice of the one
/// chunk when it holds them all (no copy), else joined.
fn assemble(chunks: &[Chunk], found: &[Option<Bytes>], wanted: &Range<u64>) -> Bytes {
    let parts = chunks.iter().zip(found).filter_map(|(chunk, data)| {
        let data = data.as_ref()?;
        let from = wanted.start.max(chunk.file_offset) - chunk.file_offset;
        let to = (wanted.end.min(chunk.file_offset + chunk.size) - chunk.file_offset)
            .min(data.len() as u64);
        (from < to).then(|| data.slice(from as usize..to as usize))
    });
    let mut parts = parts.peekable();
    let Some(first) = parts.next() else {
        return Bytes::new();
    };
    if parts.peek().is_none() {
        return first;
    }
    let mut out = BytesMut::with_capacity((wanted.end - wanted.start) as usize);
    out.extend_from_slice(&first);
    for part in parts {
        out.extend_from_slice(&part);
    }
    out.freeze()
}

/// `offset..offset+len` clipped to the file's size.
fn clip(index: &Index, ino: Ino, offset: u64, len: u64) -> Range<u64> {
    let size = index.node(ino).map(|n| n.attr.size).unwrap_or(0);
    let end = offset.saturating_add(len).min(size);
    offset.min(end)..end
}

fn path_of(index: &Index, ino: Ino) -> String {
    index
        .path(ino)
        .unwrap_or_else(|| format!("inode {}", ino.get()))
}
