//! Reading a file range of an eStargz layer: chunk locations from the index, each chunk read
//! through [`BlobRead`] with its sha256 from the verified TOC and its gzip decoder, and a
//! memory cache of the decoded chunks. The fetcher checks every chunk before it returns it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use shoal_fetcher::{BlobRead, BlobRef, Expect, Histogram, HistogramSnapshot, Rejection};

use crate::error::FsError;
use shoal_formats::estargz::{decompress_chunk, Chunk, Index, Ino};

/// Tunables of a [`ChunkReader`].
#[derive(Debug, Clone, Copy)]
pub struct ReaderConfig {
    /// Decompressed, verified chunk bytes kept in memory (shared by every layer of a reader).
    pub memory_bytes: u64,
}

/// Key of a decoded chunk: its blob and where it starts.
type ChunkKey = (shoal_fetcher::Digest, u64, u64);

/// Decoded-chunk memory cache shared by all layers, bounded in bytes.
pub struct ChunkReader {
    blobs: Arc<dyn BlobRead>,
    memory: Mutex<Memory>,
    read_failures: AtomicU64,
    /// FUSE read requests, from arrival to reply.
    read_latency: Histogram,
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
            read_latency: Histogram::default(),
        })
    }

    pub fn blobs(&self) -> &dyn BlobRead {
        &*self.blobs
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            read_failures: self.read_failures.load(Ordering::Relaxed),
            memory_bytes: self.memory.lock().unwrap_or_else(|p| p.into_inner()).bytes,
        }
    }

    /// Counts one FUSE read that took `elapsed` from request to reply.
    pub fn observe_read(&self, elapsed: std::time::Duration) {
        self.read_latency.observe(elapsed);
    }

    pub fn read_latency(&self) -> HistogramSnapshot {
        self.read_latency.snapshot()
    }

    /// Reads `offset..offset+len` of `ino` if every chunk it needs is in memory or in the disk
    /// cache; `None` means some bytes need the network. Never blocks on I/O beyond the cache.
    pub fn read_cached(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        offset: u64,
        len: u64,
    ) -> Option<Result<Vec<u8>, FsError>> {
        let chunks = index.chunks_for(ino, offset, len)?;
        let mut decoded = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            if let Some(bytes) = self.remembered(blob, chunk) {
                decoded.push(bytes);
                continue;
            }
            let decode = |raw: &Bytes| decode(raw, chunk);
            let bytes = self
                .blobs
                .read_cached(blob, chunk_range(chunk), expect(chunk, &decode))?;
            self.remember(blob, chunk, bytes.clone());
            decoded.push(bytes);
        }
        Some(Ok(assemble(chunks, &decoded, offset, len, index, ino)))
    }

    /// Reads `offset..offset+len` of `ino`, fetching what is missing. A chunk that fails its
    /// digest is fetched once more from the registry before the read fails.
    pub async fn read(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        let Some(chunks) = index.chunks_for(ino, offset, len) else {
            return Ok(Vec::new());
        };
        let mut decoded = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            if let Some(bytes) = self.remembered(blob, chunk) {
                decoded.push(bytes);
                continue;
            }
            match self.fetch_chunk(blob, index, ino, chunk).await {
                Ok(bytes) => decoded.push(bytes),
                Err(err) => {
                    self.read_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(err);
                }
            }
        }
        Ok(assemble(chunks, &decoded, offset, len, index, ino))
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
        (blob.digest.clone(), chunk.blob_offset, chunk.inner_offset)
    }

    fn remembered(&self, blob: &BlobRef, chunk: &Chunk) -> Option<Bytes> {
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory.chunks.get(&Self::key(blob, chunk)).cloned()
    }

    fn remember(&self, blob: &BlobRef, chunk: &Chunk, bytes: Bytes) {
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
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
fn chunk_range(chunk: &Chunk) -> std::ops::Range<u64> {
    chunk.blob_offset..chunk.blob_end
}

/// What `chunk`'s bytes must match: its sha256 from the verified TOC, once gunzipped.
fn expect<'a>(chunk: &Chunk, decode: &'a dyn shoal_fetcher::Decode) -> Expect<'a> {
    Expect::Sha256 {
        digest: *chunk.digest.as_bytes(),
        decode,
    }
}

/// Gunzips one chunk out of its compressed bytes.
fn decode(raw: &Bytes, chunk: &Chunk) -> Result<Bytes, Rejection> {
    Ok(Bytes::from(decompress_chunk(raw, chunk)?))
}

/// The bytes `offset..offset+len` (clipped to the file) out of whole decoded `chunks`.
fn assemble(
    chunks: &[Chunk],
    decoded: &[Bytes],
    offset: u64,
    len: u64,
    index: &Index,
    ino: Ino,
) -> Vec<u8> {
    let size = index.node(ino).map(|n| n.attr.size).unwrap_or(0);
    let end = offset.saturating_add(len).min(size);
    let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
    for (chunk, data) in chunks.iter().zip(decoded) {
        let from = offset.max(chunk.file_offset) - chunk.file_offset;
        let to =
            (end.min(chunk.file_offset + chunk.size) - chunk.file_offset).min(data.len() as u64);
        if from < to {
            out.extend_from_slice(&data[from as usize..to as usize]);
        }
    }
    out
}

fn path_of(index: &Index, ino: Ino) -> String {
    index
        .path(ino)
        .unwrap_or_else(|| format!("inode {}", ino.get()))
}
