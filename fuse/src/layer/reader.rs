//! Reading a file range of an eStargz layer: chunk locations from the index, compressed bytes
//! from the fetcher (cache first), decompression, and the chunk digest check that keeps every
//! unverified byte away from containers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use shoal_fetcher::{BlobRef, Digest, Fetcher, Histogram, HistogramSnapshot};
use tracing::warn;

use super::mounted::{MountTable, MountedBlob};

use crate::error::FsError;
use crate::estargz::{decompress_chunk, verify, Chunk, Index, Ino};

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
    fetcher: Fetcher,
    memory: Mutex<Memory>,
    verify_failures: AtomicU64,
    read_failures: AtomicU64,
    /// FUSE read requests, from arrival to reply.
    read_latency: Histogram,
    mounted: MountTable,
}

/// What readers of lazily mounted layers have met since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Chunks whose bytes failed decompression or their digest (each is refetched once).
    pub verify_failures: u64,
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
    pub fn new(fetcher: Fetcher, config: ReaderConfig) -> Arc<ChunkReader> {
        Arc::new(ChunkReader {
            fetcher,
            memory: Mutex::new(Memory {
                chunks: LruCache::unbounded(),
                bytes: 0,
                cap: config.memory_bytes,
            }),
            verify_failures: AtomicU64::new(0),
            read_failures: AtomicU64::new(0),
            read_latency: Histogram::default(),
            mounted: MountTable::default(),
        })
    }

    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    pub fn stats(&self) -> ReaderStats {
        ReaderStats {
            verify_failures: self.verify_failures.load(Ordering::Relaxed),
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

    /// The blobs served by mounted layers right now.
    pub fn mounted(&self) -> Vec<MountedBlob> {
        self.mounted.list()
    }

    pub(crate) fn mount_added(&self, blob: &BlobRef) {
        self.mounted.add(blob);
    }

    pub(crate) fn mount_removed(&self, digest: &Digest) {
        self.mounted.remove(digest);
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
            let compressed = self
                .fetcher
                .read_cached(blob, chunk.blob_offset..chunk.blob_end)?;
            match self.decode(blob, index, ino, chunk, &compressed) {
                Ok(bytes) => decoded.push(bytes),
                // A bad cached block: let the async path refetch it.
                Err(_) => return None,
            }
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
        let path = || path_of(index, ino);
        let range = chunk.blob_offset..chunk.blob_end;
        let compressed = self
            .fetcher
            .read(blob, range.clone())
            .await
            .map_err(|source| FsError::ReadChunk {
                path: path(),
                offset: chunk.file_offset,
                source,
            })?;
        match self.decode(blob, index, ino, chunk, &compressed) {
            Ok(bytes) => Ok(bytes),
            Err(first) => {
                self.verify_failures.fetch_add(1, Ordering::Relaxed);
                warn!(blob = %blob.digest, error = %first, "chunk failed verification; fetching it again");
                let again = self.fetcher.refetch(blob, range).await.map_err(|source| {
                    FsError::ReadChunk {
                        path: path(),
                        offset: chunk.file_offset,
                        source,
                    }
                })?;
                self.decode(blob, index, ino, chunk, &again)
            }
        }
    }

    /// Decompresses and verifies one chunk; only verified bytes are remembered.
    fn decode(
        &self,
        blob: &BlobRef,
        index: &Index,
        ino: Ino,
        chunk: &Chunk,
        compressed: &[u8],
    ) -> Result<Bytes, FsError> {
        let decode_err = |source| FsError::DecodeChunk {
            path: path_of(index, ino),
            source,
        };
        let data = decompress_chunk(compressed, chunk).map_err(decode_err)?;
        verify(
            &data,
            &chunk.digest,
            &path_of(index, ino),
            chunk.file_offset,
        )
        .map_err(decode_err)?;
        // The compressed bytes that decoded to it are good: peers may have them.
        self.fetcher
            .verified(blob, chunk.blob_offset..chunk.blob_end);
        let bytes = Bytes::from(data);
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
