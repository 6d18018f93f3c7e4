//! [`CacheError`]: what failed in the chunk cache, one variant per operation.

use std::io;
use std::path::PathBuf;

use super::BlockKey;
use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("open cache {}", path.display())]
    OpenCache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("create cache files of blob {digest} in {}", path.display())]
    CreateCacheFiles {
        digest: Digest,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("blob {digest} of {size} bytes exceeds the limit of {limit} bytes")]
    BlobTooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },

    #[error("cache blob {digest}: cached as {cached} bytes, asked as {asked}")]
    CacheBlobSize {
        digest: Digest,
        cached: u64,
        asked: u64,
    },

    #[error("cache block {block}: {len} bytes given, block holds {expected}")]
    CacheBlockLength {
        block: BlockKey,
        len: u64,
        expected: u64,
    },

    #[error("cache bytes {range:?} of blob {blob}: {len} bytes given")]
    CacheExtentLength {
        blob: Digest,
        range: std::ops::Range<u64>,
        len: u64,
    },

    #[error("cache block {block}: no space left in {}", path.display())]
    CacheNoSpace { block: BlockKey, path: PathBuf },

    #[error("cache block {block}: every block is in use, none can be evicted")]
    CacheFull { block: BlockKey },

    #[error("write cache block {block} to {}", path.display())]
    WriteBlock {
        block: BlockKey,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("read cache block {block} from {}", path.display())]
    ReadBlock {
        block: BlockKey,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("persist cache bitmap {}", path.display())]
    PersistBitmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("evict cache block {block} from {}", path.display())]
    EvictBlock {
        block: BlockKey,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CacheError {
    /// Whether the cache's disk is full (as opposed to broken): storing a block failed with
    /// ENOSPC.
    pub fn is_no_space(&self) -> bool {
        let enospc = |source: &io::Error| source.raw_os_error() == Some(nix::libc::ENOSPC);
        match self {
            CacheError::CacheNoSpace { .. } => true,
            CacheError::CreateCacheFiles { source, .. }
            | CacheError::PersistBitmap { source, .. } => enospc(source),
            _ => false,
        }
    }
}
