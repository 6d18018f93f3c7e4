//! One overlaybd layer blob, opened lazily: metadata is fetched and parsed up front, data
//! blocks are read as reads need them, each through [`BlobRead`] with a decoder that checks
//! its CRC32C and decompresses it (the fetcher refetches a span that fails, once).

use std::ops::Range;

use bytes::Bytes;
use shoal_fetcher::{BlobRead, BlobRef, Expect, Rejection};

use crate::error::FsError;
use shoal_formats::overlaybd::lsmt::{self, LsmtError, LsmtFile};
use shoal_formats::overlaybd::tar_wrapper::{self, PROBE_LEN};
use shoal_formats::overlaybd::zfile::{ZFile, ZFileError, ZFileInfo, HEADER_SIZE};

/// The verified metadata of a layer, as fetched: enough to reopen it with no network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerMeta {
    /// Where the ZFile starts within the blob (after the tar wrapper's headers).
    pub payload_offset: u64,
    pub payload_len: u64,
    pub zfile_header: Vec<u8>,
    pub zfile_trailer: Vec<u8>,
    pub jump_table: Vec<u8>,
    pub lsmt_header: Vec<u8>,
    pub lsmt_trailer: Vec<u8>,
    pub lsmt_index: Vec<u8>,
}

/// A ZFile inside a blob: uncompressed reads through the fetcher.
#[derive(Debug)]
struct ZBlob {
    blob: BlobRef,
    payload_offset: u64,
    zfile: ZFile,
}

/// An opened overlaybd layer: its blob, ZFile block map and LSMT index.
#[derive(Debug)]
pub struct DiskLayer {
    zblob: ZBlob,
    lsmt: LsmtFile,
    meta: LayerMeta,
}

impl DiskLayer {
    /// Fetches and verifies the layer's tar wrapper, ZFile header, trailer and jump table, and
    /// the LSMT header, trailer and index inside the ZFile.
    pub async fn open(blobs: &dyn BlobRead, blob: BlobRef) -> Result<DiskLayer, FsError> {
        let name = blob.digest.to_string();
        let head_len = (PROBE_LEN as u64).min(blob.size);
        let head = fetch(blobs, &blob, "tar header", 0..head_len).await?;
        let payload =
            tar_wrapper::locate(&head, blob.size).map_err(|source| FsError::LayerWrapper {
                blob: name.clone(),
                source,
            })?;
        let zfile_err = |source| FsError::LayerZFile {
            blob: name.clone(),
            source,
        };
        let record = HEADER_SIZE as u64;
        if payload.len < 2 * record {
            return Err(zfile_err(ZFileError::BlobTooSmall { size: payload.len }));
        }
        let start = payload.offset;
        let end = payload.offset + payload.len;
        let zfile_header = fetch(blobs, &blob, "zfile header", start..start + record).await?;
        let zfile_trailer = fetch(blobs, &blob, "zfile trailer", end - record..end).await?;
        let info = ZFileInfo::parse(&zfile_header, &zfile_trailer).map_err(zfile_err)?;
        let table = info.jump_table_range(payload.len).map_err(zfile_err)?;
        let jump_table = fetch(
            blobs,
            &blob,
            "zfile jump table",
            start + table.start..start + table.end,
        )
        .await?;
        let zfile = ZFile::from_info(info, &jump_table).map_err(zfile_err)?;
        let zblob = ZBlob {
            blob,
            payload_offset: payload.offset,
            zfile,
        };

        let lsmt_err = |source| FsError::LayerLsmt {
            blob: name.clone(),
            source,
        };
        let size = zblob.zfile.uncompressed_size();
        let record = lsmt::HEADER_SIZE as u64;
        if size < 2 * record {
            return Err(lsmt_err(LsmtError::FileTooSmall { size }));
        }
        let lsmt_header = zblob.read(blobs, 0..record).await?;
        let lsmt_trailer = zblob.read(blobs, size - record..size).await?;
        let (_, index) =
            LsmtFile::locate_index(&lsmt_header, &lsmt_trailer, size).map_err(lsmt_err)?;
        let lsmt_index = zblob.read(blobs, index).await?;
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
        let blob = zblob.blob;
        DiskLayer::from_meta(blob, meta)
    }

    /// Reopens a layer from metadata [`DiskLayer::meta`] held, verifying it again.
    pub fn from_meta(blob: BlobRef, meta: LayerMeta) -> Result<DiskLayer, FsError> {
        let name = blob.digest.to_string();
        let zfile_err = |source| FsError::LayerZFile {
            blob: name.clone(),
            source,
        };
        let in_blob = meta
            .payload_offset
            .checked_add(meta.payload_len)
            .is_some_and(|end| end <= blob.size);
        if !in_blob {
            return Err(FsError::LayerWrapper {
                blob: name,
                source: tar_wrapper::TarWrapperError::Truncated {
                    offset: meta.payload_offset,
                    len: meta.payload_len,
                    blob_size: blob.size,
                },
            });
        }
        let info = ZFileInfo::parse(&meta.zfile_header, &meta.zfile_trailer).map_err(zfile_err)?;
        info.jump_table_range(meta.payload_len).map_err(zfile_err)?;
        let zfile = ZFile::from_info(info, &meta.jump_table).map_err(zfile_err)?;
        let lsmt = LsmtFile::parse(
            &meta.lsmt_header,
            &meta.lsmt_trailer,
            &meta.lsmt_index,
            zfile.uncompressed_size(),
        )
        .map_err(|source| FsError::LayerLsmt { blob: name, source })?;
        Ok(DiskLayer {
            zblob: ZBlob {
                blob,
                payload_offset: meta.payload_offset,
                zfile,
            },
            lsmt,
            meta,
        })
    }

    pub fn blob(&self) -> &BlobRef {
        &self.zblob.blob
    }

    pub fn meta(&self) -> &LayerMeta {
        &self.meta
    }

    pub fn lsmt(&self) -> &LsmtFile {
        &self.lsmt
    }

    /// Appends the LSMT file's bytes `range` to `out` if the cache holds every block they
    /// need and each verifies; `None` means the network (or a refetch) is needed.
    pub(super) fn read_cached(
        &self,
        blobs: &dyn BlobRead,
        range: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        self.zblob.read_cached(blobs, range, out)
    }

    /// Appends the LSMT file's bytes `range` to `out`, fetching what the cache lacks.
    pub(super) async fn read(
        &self,
        blobs: &dyn BlobRead,
        range: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Result<(), FsError> {
        out.extend_from_slice(&self.zblob.read(blobs, range).await?);
        Ok(())
    }
}

impl ZBlob {
    /// Blocks covering uncompressed `range`, and where their compressed bytes lie in the blob.
    fn span(&self, range: &Range<u64>) -> Result<(Range<u64>, Range<u64>), ZFileError> {
        let blocks = self.zfile.blocks_for(range.clone());
        if blocks.is_empty() {
            return Ok((blocks, 0..0));
        }
        let first = self.zfile.block_range(blocks.start)?;
        let last = self.zfile.block_range(blocks.end - 1)?;
        let at = self.payload_offset;
        Ok((blocks, at + first.start..at + last.end))
    }

    fn read_cached(
        &self,
        blobs: &dyn BlobRead,
        range: Range<u64>,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let (blocks, span) = self.span(&range).ok()?;
        if blocks.is_empty() {
            return (range.is_empty()).then_some(());
        }
        let decode = |raw: &Bytes| self.decode_span(raw, span.start, blocks.clone(), &range);
        // A bad cached block comes back as `None`: the async path refetches it.
        let data = blobs.read_cached(&self.blob, span.clone(), Expect::Embedded(&decode))?;
        out.extend_from_slice(&data);
        Some(())
    }

    /// Uncompressed bytes `range`, each block CRC-checked; a span with a block that fails is
    /// fetched once more from the registry (the cached copy dropped) before the read fails.
    async fn read(&self, blobs: &dyn BlobRead, range: Range<u64>) -> Result<Vec<u8>, FsError> {
        let name = || self.blob.digest.to_string();
        let decode_err = |block, source| FsError::DecodeBlock {
            blob: name(),
            block,
            source,
        };
        let size = self.zfile.uncompressed_size();
        if range.end > size || range.start > range.end {
            return Err(decode_err(
                0,
                ZFileError::BlockIndex {
                    index: range.end.div_ceil(u64::from(self.zfile.block_size())),
                    count: self.zfile.block_count(),
                },
            ));
        }
        let (blocks, span) = self.span(&range).map_err(|source| decode_err(0, source))?;
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let decode = |raw: &Bytes| self.decode_span(raw, span.start, blocks.clone(), &range);
        let data = blobs
            .read(&self.blob, span.clone(), Expect::Embedded(&decode))
            .await
            .map_err(|source| FsError::ReadBlock {
                blob: name(),
                block: blocks.start,
                source,
            })?;
        Ok(data.to_vec())
    }

    /// Checks and decompresses `blocks` out of `compressed` (blob bytes starting at `base`):
    /// their part of `range`.
    fn decode_span(
        &self,
        compressed: &Bytes,
        base: u64,
        blocks: Range<u64>,
        range: &Range<u64>,
    ) -> Result<Bytes, Rejection> {
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for index in blocks {
            self.decode(compressed, base, index, range, &mut out)?;
        }
        Ok(Bytes::from(out))
    }

    /// Verifies and decompresses block `index` out of `compressed` (blob bytes starting at
    /// `base`) and appends its part of `range` to `out`.
    fn decode(
        &self,
        compressed: &Bytes,
        base: u64,
        index: u64,
        range: &Range<u64>,
        out: &mut Vec<u8>,
    ) -> Result<(), ZFileError> {
        let block = self.zfile.block_range(index)?;
        let from = (self.payload_offset + block.start - base) as usize;
        let to = (self.payload_offset + block.end - base) as usize;
        let bytes = compressed
            .get(from..to)
            .ok_or(ZFileError::CompressedLength {
                index,
                expected: block.end - block.start,
                actual: compressed.len().saturating_sub(from),
            })?;
        let data = self.zfile.decompress_block(bytes, index)?;
        let block_start = index * u64::from(self.zfile.block_size());
        let lo = range.start.max(block_start) - block_start;
        let hi = range.end.min(block_start + data.len() as u64) - block_start;
        if lo < hi {
            out.extend_from_slice(&data[lo as usize..hi as usize]);
        }
        Ok(())
    }
}

/// Fetches metadata bytes `range` of `blob`: only the whole blob's digest covers them.
async fn fetch(
    blobs: &dyn BlobRead,
    blob: &BlobRef,
    what: &'static str,
    range: Range<u64>,
) -> Result<Vec<u8>, FsError> {
    blobs
        .read(blob, range, Expect::BlobDigest)
        .await
        .map(|bytes| bytes.to_vec())
        .map_err(|source| FsError::FetchLayerMetadata {
            blob: blob.digest.to_string(),
            what,
            source,
        })
}
