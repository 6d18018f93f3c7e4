//! Lazily mounted eStargz layers: opening one (footer and TOC, verified), reading its files
//! through the chunk cache, and serving it as a read-only FUSE filesystem.

mod fs;
mod mount;
mod mounted;
mod reader;

use std::ops::Range;
use std::sync::Arc;

use shoal_fetcher::{BlobRef, Fetcher};

use crate::error::FsError;
use crate::estargz::{
    parse_footer,
    toc::{check_compressed_size, decode_toc_json, read_toc_json},
    Index, TocDigest, FOOTER_SIZE,
};

pub use mount::{mount, MountedLayer, Prefetch};
pub use mounted::MountedBlob;
pub use reader::{ChunkReader, ReaderConfig, ReaderStats};

/// An opened eStargz layer: its blob, file index, and the bytes to persist so that it can be
/// opened again without the registry.
#[derive(Clone)]
pub struct EstargzLayer {
    pub blob: BlobRef,
    pub index: Arc<Index>,
    pub toc_digest: TocDigest,
    /// `toc_offset` (8 bytes, little endian) followed by the TOC JSON.
    pub persisted: Vec<u8>,
}

impl EstargzLayer {
    /// Fetches the footer and TOC of `blob` and checks the TOC against `expected`, the layer's
    /// `containerd.io/snapshot/stargz/toc.digest` annotation.
    pub async fn open(
        fetcher: &Fetcher,
        blob: BlobRef,
        expected: TocDigest,
    ) -> Result<EstargzLayer, FsError> {
        match EstargzLayer::fetch(fetcher, blob.clone(), expected, false).await {
            // Peers may have sent the footer and TOC: read them once more from the registry
            // alone (the fetcher blames the peer) before giving up.
            Err(first) if fetcher.peers().is_some() => {
                tracing::warn!(blob = %blob.digest, error = %first, "layer index did not check out; reading it from the registry");
                EstargzLayer::fetch(fetcher, blob, expected, true).await
            }
            outcome => outcome,
        }
    }

    async fn fetch(
        fetcher: &Fetcher,
        blob: BlobRef,
        expected: TocDigest,
        from_registry: bool,
    ) -> Result<EstargzLayer, FsError> {
        let read = |range: Range<u64>| {
            let blob = &blob;
            async move {
                if from_registry {
                    fetcher.refetch(blob, range).await
                } else {
                    fetcher.read_index(blob, range).await
                }
            }
        };
        let name = blob.digest.to_string();
        let tail_len = (FOOTER_SIZE as u64).min(blob.size);
        let tail = read(blob.size - tail_len..blob.size)
            .await
            .map_err(|source| FsError::FetchFooter {
                blob: name.clone(),
                source,
            })?;
        let footer = parse_footer(blob.size, &tail).map_err(|source| FsError::ParseFooter {
            blob: name.clone(),
            source,
        })?;
        let region: Range<u64> = footer.toc_offset..blob.size - footer.size as u64;
        // The footer is the publisher's word: refuse a huge region before asking for it.
        check_compressed_size(region.end - region.start).map_err(|source| FsError::ParseToc {
            blob: name.clone(),
            source,
        })?;
        let compressed = read(region.clone())
            .await
            .map_err(|source| FsError::FetchToc {
                blob: name.clone(),
                source,
            })?;
        let json = read_toc_json(&compressed).map_err(|source| FsError::ParseToc {
            blob: name.clone(),
            source,
        })?;
        let mut persisted = footer.toc_offset.to_le_bytes().to_vec();
        persisted.extend_from_slice(&json);
        let layer = EstargzLayer::from_persisted(blob.clone(), &persisted, expected)?;
        // The TOC's bytes decoded to the expected digest, and the one datum of the footer,
        // the TOC offset, is where that TOC was found: peers may have both.
        fetcher.verified(&blob, region);
        fetcher.verified(&blob, blob.size - tail_len..blob.size);
        Ok(layer)
    }

    /// Opens the layer from bytes [`EstargzLayer::persisted`] held, verifying them again.
    pub fn from_persisted(
        blob: BlobRef,
        persisted: &[u8],
        expected: TocDigest,
    ) -> Result<EstargzLayer, FsError> {
        let name = blob.digest.to_string();
        let (offset, json) = persisted
            .split_first_chunk::<8>()
            .ok_or(FsError::PersistedIndex {
                reason: "shorter than its header",
            })?;
        let toc_offset = u64::from_le_bytes(*offset);
        let parsed = decode_toc_json(json).map_err(|source| FsError::ParseToc {
            blob: name.clone(),
            source,
        })?;
        if parsed.digest != expected {
            return Err(FsError::TocDigestMismatch {
                blob: name,
                expected,
                actual: parsed.digest,
            });
        }
        if toc_offset > blob.size {
            return Err(FsError::PersistedIndex {
                reason: "TOC offset past the end of the blob",
            });
        }
        let index = Index::new(&parsed.toc, toc_offset)
            .map_err(|source| FsError::BuildIndex { blob: name, source })?;
        Ok(EstargzLayer {
            blob,
            index: Arc::new(index),
            toc_digest: parsed.digest,
            persisted: persisted.to_vec(),
        })
    }
}
