//! Lazily mounted eStargz layers: opening one (footer and TOC, verified), reading its files
//! through the chunk cache, and serving it as a read-only FUSE filesystem.

mod fs;
mod mount;
mod reader;
mod replay;

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use shoal_fetcher::{Anchor, BlobRead, BlobRef, FetchError, Rejection};

use crate::error::FsError;
use shoal_formats::estargz::{
    parse_footer,
    toc::{check_compressed_size, read_toc_json},
    Index, OpenIndexError, TocDigest, FOOTER_SIZE,
};

pub use crate::learn::{
    LayerLearning, Learn, LearnSettings, LearnState, LearnStats, Learning, Replayed,
};
pub use mount::{mount, MountTarget, MountedLayer, Prefetch};
pub use reader::{ChunkReader, Pending, ReaderConfig, ReaderStats};

/// An opened eStargz layer: its blob, file index and TOC digest.
#[derive(Clone)]
pub struct EstargzLayer {
    pub blob: BlobRef,
    pub index: Arc<Index>,
    pub toc_digest: TocDigest,
}

impl EstargzLayer {
    /// Reads the footer and TOC of `blob` through `blobs`, which checks the TOC against
    /// `expected`, the layer's `containerd.io/snapshot/stargz/toc.digest` annotation. Also
    /// returns the bytes to persist so that the layer can be opened again without the registry
    /// ([`EstargzLayer::from_persisted`]): `toc_offset` (8 bytes, little endian), then the TOC
    /// JSON. They are the one copy of the JSON kept: the index holds none of it.
    pub async fn open(
        blobs: &dyn BlobRead,
        blob: BlobRef,
        expected: TocDigest,
    ) -> Result<(EstargzLayer, Vec<u8>), FsError> {
        let name = blob.digest.to_string();
        let anchored = blobs
            .read_index(&blob, &Footer { blob: &name }, *expected.as_bytes())
            .await
            .map_err(|error| index_error(&name, expected, error))?;
        let mut persisted = Vec::with_capacity(8 + anchored.decoded.len());
        persisted.extend_from_slice(&anchored.region.start.to_le_bytes());
        persisted.extend_from_slice(&anchored.decoded);
        drop(anchored);
        let layer = EstargzLayer::from_persisted(blob, &persisted, expected)?;
        Ok((layer, persisted))
    }

    /// Opens the layer from the bytes [`EstargzLayer::open`] returned, verifying them again:
    /// their digest before a byte of them is parsed, then the tree they describe, built as the
    /// JSON is decoded.
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
        let actual = TocDigest::of(json);
        if actual != expected {
            return Err(FsError::TocDigestMismatch {
                blob: name,
                expected,
                actual,
            });
        }
        if toc_offset > blob.size {
            return Err(FsError::PersistedIndex {
                reason: "TOC offset past the end of the blob",
            });
        }
        let index = Index::from_toc_json(json, toc_offset).map_err(|error| match error {
            OpenIndexError::Decode { source } => FsError::ParseToc { blob: name, source },
            OpenIndexError::Build { source } => FsError::BuildIndex { blob: name, source },
        })?;
        Ok(EstargzLayer {
            blob,
            index: Arc::new(index),
            toc_digest: actual,
        })
    }
}

/// The eStargz footer of blob `blob` as an [`Anchor`]: it says where the TOC is, and the
/// TOC's JSON is what the annotation's digest covers.
struct Footer<'a> {
    blob: &'a str,
}

impl Anchor for Footer<'_> {
    fn tail_len(&self, blob_size: u64) -> u64 {
        (FOOTER_SIZE as u64).min(blob_size)
    }

    fn locate(&self, tail: &Bytes, blob_size: u64) -> Result<Range<u64>, Rejection> {
        let blob = self.blob.to_owned();
        let footer = parse_footer(blob_size, tail).map_err(|source| FsError::ParseFooter {
            blob: blob.clone(),
            source,
        })?;
        let region = footer.toc_offset..blob_size - footer.size as u64;
        // The footer is the publisher's word: refuse a huge region before asking for it.
        check_compressed_size(region.end.saturating_sub(region.start))
            .map_err(|source| FsError::ParseToc { blob, source })?;
        Ok(region)
    }

    fn decode(&self, region: &Bytes) -> Result<Bytes, Rejection> {
        let json = read_toc_json(region).map_err(|source| FsError::ParseToc {
            blob: self.blob.to_owned(),
            source,
        })?;
        Ok(Bytes::from(json))
    }
}

/// The error of an index read: a TOC whose digest differs from the annotation, the footer's
/// or TOC's own error (back as [`Footer`] made it), or a failed fetch.
fn index_error(blob: &str, expected: TocDigest, error: FetchError) -> FsError {
    if let FetchError::CheckIndex { source, .. } = &error {
        if let Some(FetchError::Sha256Mismatch { actual, .. }) = source.downcast_ref() {
            return FsError::TocDigestMismatch {
                blob: blob.to_owned(),
                expected,
                actual: TocDigest::from_bytes(*actual),
            };
        }
    }
    let source = match error {
        FetchError::CheckIndex { blob, source } => match source.downcast::<FsError>() {
            Ok(own) => return *own,
            Err(source) => FetchError::CheckIndex { blob, source },
        },
        other => other,
    };
    FsError::FetchIndex {
        blob: blob.to_owned(),
        source,
    }
}
