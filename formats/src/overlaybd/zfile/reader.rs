//! Random access to a ZFile's uncompressed bytes over any [`BlockSource`].

use super::{ZFile, ZFileError};
use crate::overlaybd::source::{check_range, read_vec, BlockSource, SourceError};

/// Presents the uncompressed contents of a ZFile held by `S`, verifying every block read.
///
/// No caching: each read decompresses the blocks it touches (the chunk cache above keeps
/// decompressed blocks).
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
        let block_size = u64::from(self.zfile.block_size());
        let mut filled = 0usize;
        for index in self.zfile.blocks_for(offset..offset + len) {
            let block = self.read_block(index).map_err(|e| SourceError::Backend {
                offset,
                len,
                source: Box::new(e),
            })?;
            let pos = offset + filled as u64;
            // `pos` lies in this block, so the in-block offset is below the block size.
            let start = (pos - index * block_size) as usize;
            let take = (block.len() - start).min(buf.len() - filled);
            buf[filled..filled + take].copy_from_slice(&block[start..start + take]);
            filled += take;
        }
        Ok(())
    }
}
