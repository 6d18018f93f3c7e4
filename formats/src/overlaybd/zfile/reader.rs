//! Random access to a ZFile's uncompressed bytes over any [`BlockSource`].

use super::{ZFile, ZFileError};
use crate::overlaybd::source::{check_range, read_vec, BlockSource, SourceError};

/// Presents the uncompressed contents of a ZFile held by `S`, verifying every block read.
///
/// No caching: each read decompresses the blocks it touches. Reads plan and decode through
/// [`ZFile::span`] and [`ZFile::decode_span`], the block map the FUSE disk executes too.
#[derive(Debug)]
pub struct ZFileReader<S> {
    zfile: ZFile,
    source: S,
}

impl<S: BlockSource> ZFileReader<S> {
    /// Parses the ZFile in `source`.
    pub fn open(source: S) -> Result<Self, ZFileError> {
        let zfile = ZFile::open(&source)?;
        Ok(Self { zfile, source })
    }

    /// Pairs an already parsed ZFile with the source holding it.
    pub fn new(zfile: ZFile, source: S) -> Self {
        Self { zfile, source }
    }

    pub fn zfile(&self) -> &ZFile {
        &self.zfile
    }

    /// Reads, verifies and decompresses block `index`.
    pub fn read_block(&self, index: u64) -> Result<Vec<u8>, ZFileError> {
        let range = self.zfile.block_range(index)?;
        let compressed =
            read_vec(&self.source, range.start, range.end - range.start).map_err(|source| {
                ZFileError::Read {
                    what: "block",
                    source,
                }
            })?;
        self.zfile.decompress_block(&compressed, index)
    }
}

impl<S: BlockSource> BlockSource for ZFileReader<S> {
    fn size(&self) -> u64 {
        self.zfile.uncompressed_size()
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = buf.len() as u64;
        check_range(offset, len, self.size())?;
        let backend = |e: ZFileError| SourceError::Backend {
            offset,
            len,
            source: Box::new(e),
        };
        let span = self.zfile.span(offset..offset + len).map_err(backend)?;
        let compressed = read_vec(
            &self.source,
            span.compressed.start,
            span.compressed.end - span.compressed.start,
        )
        .map_err(|source| {
            backend(ZFileError::Read {
                what: "blocks",
                source,
            })
        })?;
        let blocks = self
            .zfile
            .decode_span(&span, &compressed)
            .map_err(backend)?;
        buf.copy_from_slice(&blocks[span.keep]);
        Ok(())
    }
}
