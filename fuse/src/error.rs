use std::path::PathBuf;

use fuser::Errno;
use shoal_fetcher::FetchError;

use shoal_formats::estargz::{ChunkError, FooterError, IndexError, TocDigest, TocError};
use shoal_formats::overlaybd::{BlockMapError, LayerError};

/// Why a lazily mounted layer could not be opened, mounted or read. `FsError -> Errno` at the
/// FUSE boundary is [`FsError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("fetch footer and TOC of {blob}")]
    FetchIndex {
        blob: String,
        #[source]
        source: FetchError,
    },
    #[error("{blob} is not eStargz: {source}")]
    ParseFooter { blob: String, source: FooterError },
    #[error("read TOC of {blob}: {source}")]
    ParseToc { blob: String, source: TocError },
    #[error("TOC of {blob} has digest {actual}, the layer annotation says {expected}")]
    TocDigestMismatch {
        blob: String,
        expected: TocDigest,
        actual: TocDigest,
    },
    #[error("build file index of {blob}: {source}")]
    BuildIndex { blob: String, source: IndexError },
    #[error("persisted index is damaged: {reason}")]
    PersistedIndex { reason: &'static str },
    #[error("read {path} at {offset}: {source}")]
    ReadChunk {
        path: String,
        offset: u64,
        source: FetchError,
    },
    #[error("decode {path}: {source}")]
    DecodeChunk { path: String, source: ChunkError },
    #[error("mount FUSE filesystem at {mountpoint}: {source}")]
    Mount {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error("fetch the {what} of overlaybd layer {blob}: {source}")]
    FetchLayerMetadata {
        blob: String,
        what: &'static str,
        source: FetchError,
    },
    /// The format's own error says which part of the layer is bad; the mounter shows it.
    #[error(transparent)]
    OpenLayer(#[from] LayerError),
    #[error(transparent)]
    StackLayers(BlockMapError),
    #[error("persisted virtual disk is damaged: {source}")]
    PersistedDisk { source: serde_json::Error },
    #[error("read block {block} of overlaybd layer {blob}: {source}")]
    ReadBlock {
        blob: String,
        block: u64,
        source: FetchError,
    },
    #[error("fetch overlaybd layer {blob} in the background: {source}")]
    FetchBlob { blob: String, source: FetchError },
    #[error(transparent)]
    PlanRead(BlockMapError),
}

impl FsError {
    /// What a reader in the container sees.
    pub fn errno(&self) -> Errno {
        Errno::EIO
    }
}
