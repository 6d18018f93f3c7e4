use std::path::PathBuf;

use fuser::Errno;
use shoal_fetcher::FetchError;

use shoal_formats::estargz::{FooterError, IndexError, TocDigest, TocError};
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
    #[error("{blob} is not eStargz")]
    ParseFooter {
        blob: String,
        #[source]
        source: FooterError,
    },
    #[error("read TOC of {blob}")]
    ParseToc {
        blob: String,
        #[source]
        source: TocError,
    },
    #[error("TOC of {blob} has digest {actual}, the layer annotation says {expected}")]
    TocDigestMismatch {
        blob: String,
        expected: TocDigest,
        actual: TocDigest,
    },
    #[error("build file index of {blob}")]
    BuildIndex {
        blob: String,
        #[source]
        source: IndexError,
    },
    #[error("persisted index is damaged: {reason}")]
    PersistedIndex { reason: &'static str },
    #[error("read {path} at {offset}")]
    ReadChunk {
        path: String,
        offset: u64,
        #[source]
        source: FetchError,
    },
    #[error(transparent)]
    Mount(#[from] crate::syscall::MountError),
    #[error("serve FUSE filesystem at {mountpoint}")]
    Serve {
        mountpoint: PathBuf,
        #[source]
        source: crate::connection::ConnectionError,
    },
    #[error("fetch the {what} of overlaybd layer {blob}")]
    FetchLayerMetadata {
        blob: String,
        what: &'static str,
        #[source]
        source: FetchError,
    },
    /// The format's own error says which part of the layer is bad; the mounter shows it.
    #[error(transparent)]
    OpenLayer(#[from] LayerError),
    #[error(transparent)]
    StackLayers(BlockMapError),
    #[error("persisted virtual disk is damaged")]
    PersistedDisk {
        #[source]
        source: serde_json::Error,
    },
    #[error("read block {block} of overlaybd layer {blob}")]
    ReadBlock {
        blob: String,
        block: u64,
        #[source]
        source: FetchError,
    },
    #[error("fetch overlaybd layer {blob} in the background")]
    FetchBlob {
        blob: String,
        #[source]
        source: FetchError,
    },
    #[error(transparent)]
    PlanRead(BlockMapError),
}

impl FsError {
    /// What a reader in the container sees.
    pub fn errno(&self) -> Errno {
        Errno::EIO
    }
}
