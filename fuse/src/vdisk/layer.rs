//! One overlaybd layer blob, opened lazily: its metadata is fetched up front and parsed by
//! [`Layer`]; data blocks are read as reads need them, each span of blocks through
//! [`BlobRead`] with a decoder that checks every block's CRC32C and decompresses it, and, when
//! the layer has a usable block digest table, against that table ([`LayerChecks`]; the
//! fetcher refetches a span that fails, once). What to read is planned in `shoal-formats`
//! ([`ZFile::span`], [`shoal_formats::overlaybd::BlockMap`]); this file only executes it.

use std::ops::Range;

use bytes::Bytes;
use shoal_fetcher::{BlobRead, BlobRef, Rejection};
use shoal_formats::overlaybd::lsmt::{self, LsmtError, LsmtFile};
use shoal_formats::overlaybd::tar_wrapper::{self, PROBE_LEN};
use shoal_formats::overlaybd::zfile::{BlockSpan, ZFile, ZFileError, ZFileInfo, HEADER_SIZE};
use shoal_formats::overlaybd::{Layer, LayerError, LayerMeta};

use super::checks::LayerChecks;
use crate::error::FsError;

/// An opened overlaybd layer: its blob, the metadata it was parsed from, the parse, and what
/// its reads are checked against.
#[derive(Debug)]
pub struct DiskLayer {
    blob: BlobRef,
    layer: Layer,
    meta: LayerMeta,
    checks: LayerChecks,
}

impl DiskLayer {
    /// Fetches and verifies the layer's tar wrapper, ZFile header, trailer and jump table, and
    /// the LSMT header, trailer and index inside the ZFile, each read checked as `checks` say.
    pub async fn open(
        blobs: &dyn BlobRead,
        blob: BlobRef,
        checks: LayerChecks,
    ) -> Result<DiskLayer, FsError> {
        let checks = &checks;
        let fetch = |what, range| fetch(blobs, checks, &blob, what, range);
        let head_len = (PROBE_LEN as u64).min(blob.size);
        let head = fetch("tar header", 0..head_len).await?;
        let payload = tar_wrapper::locate(&head, blob.size).map_err(LayerError::from)?;
        let zfile_err = |source: ZFileError| FsError::OpenLayer(source.into());
        let record = HEADER_SIZE as u64;
        if payload.len < 2 * record {
            return Err(zfile_err(ZFileError::BlobTooSmall { size: payload.len }));
        }
        let start = payload.offset;
        let end = payload.offset + payload.len;
        let zfile_header = fetch("zfile header", start..start + record).await?;
        let zfile_trailer = fetch("zfile trailer", end - record..end).await?;
        let info = ZFileInfo::parse(&zfile_header, &zfile_trailer).map_err(zfile_err)?;
        let table = info.jump_table_range(payload.len).map_err(zfile_err)?;
        let jump_table = fetch("zfile jump table", start + table.start..start + table.end).await?;
        let zfile = ZFile::from_info(info, &jump_table).map_err(zfile_err)?;

        let size = zfile.uncompressed_size();
        let record = lsmt::HEADER_SIZE as u64;
        if size < 2 * record {
            return Err(FsError::OpenLayer(LsmtError::FileTooSmall { size }.into()));
        }
        let at = payload.offset;
        let read = |range| read_zfile(blobs, checks, &blob, &zfile, at, range);
        let lsmt_header = read(0..record).await?;
        let lsmt_trailer = read(size - record..size).await?;
        let (_, index) = LsmtFile::locate_index(&lsmt_header, &lsmt_trailer, size)
            .map_err(|source| FsError::OpenLayer(source.into()))?;
        let lsmt_index = read(index).await?;
        let meta = LayerMeta {
            payload_offset: payload.offset,
            payload_len: payload.len,
            zfile_header,
            zfile_trailer,
            jump_table,
            lsmt_header,
            lsmt_trailer,
            lsmt_index,
        };
        DiskLayer::from_meta(blob, meta, checks.clone())
    }

    /// Reopens a layer from metadata [`DiskLayer::meta`] held, verifying it again.
    pub fn from_meta(
        blob: BlobRef,
        meta: LayerMeta,
        checks: LayerChecks,
    ) -> Result<DiskLayer, FsError> {
        let layer = Layer::parse(&meta, blob.size)?;
        Ok(DiskLayer {
            blob,
            layer,
            meta,
            checks,
        })
    }

    /// What the layer's reads are checked against.
    pub fn checks(&self) -> &LayerChecks {
        &self.checks
    }

    pub fn blob(&self) -> &BlobRef {
        &self.blob
    }

    pub fn meta(&self) -> &LayerMeta {
        &self.meta
    }

    pub fn lsmt(&self) -> &LsmtFile {
        self.layer.lsmt()
    }

    /// The parsed layer: its ZFile placed in the blob, and its LSMT index.
    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// The blocks of `span` (placed in this layer's blob), checked and decompressed whole, if
    /// the cache holds them and they pass; `None`: [`DiskLayer::read_blocks`] must fetch them.
    pub(super) fn cached_blocks(&self, blobs: &dyn BlobRead, span: &BlockSpan) -> Option<Bytes> {
        let zfile = self.layer.zfile();
        let decode = |raw: &Bytes| decode(zfile, span, raw);
        // A bad cached block comes back as `None`: the async path refetches it.
        blobs.read_cached(
            &self.blob,
            span.compressed.clone(),
            self.checks.blocks(&decode),
        )
    }

    /// The blocks of `span`, checked and decompressed whole, fetching what the cache lacks.
    pub(super) async fn read_blocks(
        &self,
        blobs: &dyn BlobRead,
        span: &BlockSpan,
    ) -> Result<Bytes, FsError> {
        read_blocks(
            blobs,
            &self.checks,
            &self.blob,
            self.layer.zfile(),
            span,
            false,
        )
        .await
    }
}

/// Blocks `span` of the ZFile `zfile` in `blob`, checked as `checks` say for data, or for
/// metadata to be `kept` (the fetcher decides where they may come from); a span with a block
/// that fails is fetched once more from the registry before the read fails.
async fn read_blocks(
    blobs: &dyn BlobRead,
    checks: &LayerChecks,
    blob: &BlobRef,
    zfile: &ZFile,
    span: &BlockSpan,
    kept: bool,
) -> Result<Bytes, FsError> {
    let decode = |raw: &Bytes| decode(zfile, span, raw);
    let expect = match kept {
        true => checks.kept_blocks(&decode),
        false => checks.blocks(&decode),
    };
    blobs
        .read(blob, span.compressed.clone(), expect)
        .await
        .map_err(|source| FsError::ReadBlock {
            blob: blob.digest.to_string(),
            block: span.blocks.start,
            source,
        })
}

/// Decompressed bytes `range` of the ZFile `zfile`, which starts `at` bytes into `blob`.
async fn read_zfile(
    blobs: &dyn BlobRead,
    checks: &LayerChecks,
    blob: &BlobRef,
    zfile: &ZFile,
    at: u64,
    range: Range<u64>,
) -> Result<Vec<u8>, FsError> {
    let span = zfile
        .span(range)
        .map_err(|source| FsError::OpenLayer(source.into()))?
        .shifted(at);
    let blocks = read_blocks(blobs, checks, blob, zfile, &span, true).await?;
    Ok(blocks.slice(span.keep.clone()).to_vec())
}

fn decode(zfile: &ZFile, span: &BlockSpan, raw: &Bytes) -> Result<Bytes, Rejection> {
    Ok(Bytes::from(zfile.decode_span(span, raw)?))
}

/// Fetches metadata bytes `range` of `blob`: covered by the block digest table, or only by
/// the whole blob's digest.
async fn fetch(
    blobs: &dyn BlobRead,
    checks: &LayerChecks,
    blob: &BlobRef,
    what: &'static str,
    range: Range<u64>,
) -> Result<Vec<u8>, FsError> {
    blobs
        .read(blob, range, checks.raw())
        .await
        .map(|bytes| bytes.to_vec())
        .map_err(|source| FsError::FetchLayerMetadata {
            blob: blob.digest.to_string(),
            what,
            source,
        })
}
