//! The ZFile block map: which blocks hold a range of the decompressed file, where their
//! compressed bytes lie, and how to check, decompress and cut them. Planning and decoding are
//! separate so that whoever holds the compressed bytes (a [`super::ZFileReader`] over a
//! [`crate::overlaybd::BlockSource`], the FUSE disk through the fetcher) executes the same plan.

use std::ops::Range;

use super::{ZFile, ZFileError};

/// Consecutive blocks covering part of a ZFile's decompressed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpan {
    /// The blocks, by index.
    pub blocks: Range<u64>,
    /// Where their compressed bytes (CRCs included) lie: within the ZFile, or within the
    /// enclosing blob once [`BlockSpan::shifted`].
    pub compressed: Range<u64>,
    /// Which bytes of the blocks' decompressed concatenation were asked for.
    pub keep: Range<usize>,
}

impl BlockSpan {
    /// The same span for a ZFile that starts `by` bytes into a blob.
    pub fn shifted(self, by: u64) -> BlockSpan {
        BlockSpan {
            compressed: self.compressed.start + by..self.compressed.end + by,
            ..self
        }
    }

    /// Decompressed bytes the span yields.
    pub fn len(&self) -> usize {
        self.keep.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keep.is_empty()
    }
}

impl ZFile {
    /// The blocks holding decompressed bytes `range`; an empty range needs no block.
    pub fn span(&self, range: Range<u64>) -> Result<BlockSpan, ZFileError> {
        let size = self.uncompressed_size();
        if range.start > range.end || range.end > size {
            return Err(ZFileError::SpanRange {
                start: range.start,
                end: range.end,
                size,
            });
        }
        let blocks = self.blocks_for(range.clone());
        if blocks.is_empty() {
            return Ok(BlockSpan {
                blocks: 0..0,
                compressed: 0..0,
                keep: 0..0,
            });
        }
        let first = self.block_range(blocks.start)?;
        let last = self.block_range(blocks.end - 1)?;
        let base = blocks.start * u64::from(self.block_size());
        // A span is as long as the read it serves, which is held in memory: it fits in usize.
        let keep = (range.start - base) as usize..(range.end - base) as usize;
        Ok(BlockSpan {
            blocks,
            compressed: first.start..last.end,
            keep,
        })
    }

    /// Checks each block of `span` against its CRC32C and decompresses it, out of the span's
    /// compressed bytes: the blocks whole, concatenated (cut them with [`BlockSpan::keep`]).
    pub fn decode_span(&self, span: &BlockSpan, compressed: &[u8]) -> Result<Vec<u8>, ZFileError> {
        let expected = span.compressed.end - span.compressed.start;
        if compressed.len() as u64 != expected {
            return Err(ZFileError::CompressedLength {
                index: span.blocks.start,
                expected,
                actual: compressed.len(),
            });
        }
        let mut out = Vec::new();
        let Some(first) = span.blocks.clone().next() else {
            return Ok(out);
        };
        let base = self.block_range(first)?.start;
        for index in span.blocks.clone() {
            let block = self.block_range(index)?;
            let within = (block.start - base) as usize..(block.end - base) as usize;
            let bytes = compressed.get(within).ok_or(ZFileError::CompressedLength {
                index,
                expected: block.end - block.start,
                actual: compressed
                    .len()
                    .saturating_sub((block.start - base) as usize),
            })?;
            out.extend_from_slice(&self.decompress_block(bytes, index)?);
        }
        Ok(out)
    }
}
