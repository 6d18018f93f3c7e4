//! [`BlockGeometry`]: how a blob of some size divides into aligned blocks. The one place the
//! block arithmetic is written.

use std::ops::Range;

/// A blob of `blob_size` bytes cut into blocks of `block_size` bytes; the last may be short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGeometry {
    pub block_size: u64,
    pub blob_size: u64,
}

impl BlockGeometry {
    /// `block_size` must not be zero (the configuration makes it a power of two ≥ 4 KiB).
    pub fn new(block_size: u64, blob_size: u64) -> BlockGeometry {
        debug_assert!(block_size > 0);
        BlockGeometry {
            block_size,
            blob_size,
        }
    }

    /// How many blocks the blob has.
    pub fn blocks(&self) -> u64 {
        self.blob_size.div_ceil(self.block_size)
    }

    /// The block holding byte `offset`.
    pub fn block_of(&self, offset: u64) -> u64 {
        offset / self.block_size
    }

    /// Where block `index` starts, whether or not the blob reaches it.
    pub fn start(&self, index: u64) -> u64 {
        index.saturating_mul(self.block_size)
    }

    /// Byte range of block `index` within the blob, clipped to it (empty past the end).
    pub fn span(&self, index: u64) -> Range<u64> {
        let start = self.start(index).min(self.blob_size);
        start..start.saturating_add(self.block_size).min(self.blob_size)
    }

    /// Bytes of block `index` (0 past the end).
    pub fn block_len(&self, index: u64) -> u64 {
        let span = self.span(index);
        span.end - span.start
    }

    /// The blocks any byte of `range` falls in; none for an empty range.
    pub fn covering(&self, range: &Range<u64>) -> Range<u64> {
        if range.is_empty() {
            return 0..0;
        }
        self.block_of(range.start)..self.block_of(range.end - 1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_ranges_and_the_last_is_short() {
        let geometry = BlockGeometry::new(4096, 4096 * 9 + 1);
        assert_eq!(geometry.blocks(), 10);
        assert_eq!(geometry.block_of(4095), 0);
        assert_eq!(geometry.block_of(4096), 1);
        assert_eq!(geometry.span(1), 4096..8192);
        assert_eq!(geometry.block_len(9), 1);
        assert_eq!(geometry.block_len(10), 0);
        assert_eq!(
            geometry.span(u64::MAX),
            geometry.blob_size..geometry.blob_size
        );
        assert_eq!(geometry.covering(&(0..1)), 0..1);
        assert_eq!(geometry.covering(&(4095..4097)), 0..2);
        assert_eq!(geometry.covering(&(8192..8192)), 0..0);
        assert_eq!(geometry.covering(&(4096..4096 * 9 + 1)), 1..10);
    }
}
