//! ZFile: overlaybd's seekable compression container.
//!
//! Layout: `header (512) | compressed block 0 [crc] | ... | block N-1 [crc] | jump table |
//! trailer (512)`. The jump table holds one little-endian `u32` per block: its compressed length
//! including the optional 4-byte CRC32C (seed [`BLOCK_CRC_SEED`]). The trailer records the table's
//! offset and entry count, the uncompressed size, the block size and the algorithm, plus CRC32C
//! digests of itself and of the table.

mod compress;
mod header;
mod reader;
mod span;

pub use compress::compress;
pub use header::{Algorithm, HeaderTrailer, Record, BLOCK_CRC_SEED, HEADER_SIZE};
pub use reader::ZFileReader;
pub use span::BlockSpan;

use std::error::Error as StdError;
use std::ops::Range;
use std::sync::Arc;

use super::source::{read_vec, BlockSource, SourceError};

/// Largest block size accepted; bounds every per-block allocation.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Largest jump table accepted (the reference reader's limit).
pub const MAX_BLOCK_COUNT: u64 = 1_000_000_000;
const CRC_LEN: u32 = 4;

/// Failure to parse or decode a ZFile.
#[derive(Debug, thiserror::Error)]
pub enum ZFileError {
    #[error("zfile {record} is {len} bytes, expected {HEADER_SIZE}")]
    RecordLength { record: Record, len: usize },
    #[error("zfile {record} has no zfile magic")]
    Magic { record: Record },
    #[error("zfile {record} has flags {flags:#x} of the wrong kind")]
    RecordKind { record: Record, flags: u64 },
    #[error("zfile {record} digest is {stored:#010x}, computed {computed:#010x}")]
    Digest {
        record: Record,
        stored: u32,
        computed: u32,
    },
    #[error("zfile header and trailer disagree on the file's layout")]
    HeaderMismatch,
    #[error("zfile uses unsupported compression algorithm {algo}")]
    UnsupportedAlgorithm { algo: u8 },
    #[error("zfile uses a compression dictionary, which is unsupported")]
    Dictionary,
    #[error("zfile block size {block_size} is not in 1..={MAX_BLOCK_SIZE}")]
    BlockSize { block_size: u32 },
    #[error("zfile jump table has {index_size} entries, but {original_size} bytes in {block_size}-byte blocks need {expected}")]
    BlockCount {
        index_size: u64,
        original_size: u64,
        block_size: u32,
        expected: u64,
    },
    #[error("zfile jump table at {index_offset} ({index_bytes} bytes) does not end before the trailer at {trailer_offset}")]
    JumpTableRange {
        index_offset: u64,
        index_bytes: u64,
        trailer_offset: u64,
    },
    #[error("zfile jump table is {actual} bytes, expected {expected}")]
    JumpTableLength { expected: u64, actual: usize },
    #[error("zfile jump table crc is {computed:#010x}, trailer records {stored:#010x}")]
    JumpTableChecksum { stored: u32, computed: u32 },
    #[error("zfile block {index} has compressed length {len}, outside {min}..={max}")]
    BlockLength {
        index: u64,
        len: u32,
        min: u32,
        max: u32,
    },
    #[error("zfile blocks end at {end}, past the jump table at {index_offset}")]
    BlocksOverrunIndex { end: u64, index_offset: u64 },
    #[error("zfile block {index} does not exist ({count} blocks)")]
    BlockIndex { index: u64, count: u64 },
    #[error("zfile block {index} was given {actual} compressed bytes, expected {expected}")]
    CompressedLength {
        index: u64,
        expected: u64,
        actual: usize,
    },
    #[error("zfile block {index} crc is {computed:#010x}, stored {stored:#010x}")]
    BlockChecksum {
        index: u64,
        stored: u32,
        computed: u32,
    },
    #[error("zfile block {index} failed to decompress with {algorithm:?}")]
    Decompress {
        index: u64,
        algorithm: Algorithm,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("zfile block {index} decompressed to {actual} bytes, expected {expected}")]
    DecompressedLength {
        index: u64,
        expected: u64,
        actual: usize,
    },
    #[error("zfile block {index} failed to compress with {algorithm:?}")]
    Compress {
        index: u64,
        algorithm: Algorithm,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("bytes {start}..{end} are not within the zfile's {size} decompressed bytes")]
    SpanRange { start: u64, end: u64, size: u64 },
    #[error("zfile of {size} bytes is too small for a header and trailer")]
    BlobTooSmall { size: u64 },
    #[error("failed to read the zfile {what}")]
    Read {
        what: &'static str,
        #[source]
        source: SourceError,
    },
}

/// Parsed header and trailer: everything needed to find and check the jump table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZFileInfo {
    trailer: HeaderTrailer,
}

impl ZFileInfo {
    /// Checks the header and the (authoritative) trailer.
    pub fn parse(header: &[u8], trailer: &[u8]) -> Result<Self, ZFileError> {
        let header = HeaderTrailer::parse_header(header)?;
        let trailer = HeaderTrailer::parse_trailer(trailer)?;
        if let Some(header) = header {
            let same = HeaderTrailer {
                flags: trailer.flags,
                ..header
            };
            if same != trailer {
                return Err(ZFileError::HeaderMismatch);
            }
        }
        if trailer.block_size == 0 || trailer.block_size > MAX_BLOCK_SIZE {
            return Err(ZFileError::BlockSize {
                block_size: trailer.block_size,
            });
        }
        let expected = trailer
            .original_size
            .div_ceil(u64::from(trailer.block_size));
        if trailer.index_size != expected || trailer.index_size > MAX_BLOCK_COUNT {
            return Err(ZFileError::BlockCount {
                index_size: trailer.index_size,
                original_size: trailer.original_size,
                block_size: trailer.block_size,
                expected,
            });
        }
        Ok(Self { trailer })
    }

    /// The decoded trailer.
    pub fn trailer(&self) -> &HeaderTrailer {
        &self.trailer
    }

    /// Byte range of the jump table within a ZFile of `file_size` bytes.
    pub fn jump_table_range(&self, file_size: u64) -> Result<Range<u64>, ZFileError> {
        let index_offset = self.trailer.index_offset;
        // index_size <= MAX_BLOCK_COUNT, so this cannot overflow.
        let index_bytes = self.trailer.index_size * u64::from(CRC_LEN);
        let trailer_offset = file_size.saturating_sub(HEADER_SIZE as u64);
        match index_offset.checked_add(index_bytes) {
            Some(end) if index_offset >= HEADER_SIZE as u64 && end <= trailer_offset => {
                Ok(index_offset..end)
            }
            _ => Err(ZFileError::JumpTableRange {
                index_offset,
                index_bytes,
                trailer_offset,
            }),
        }
    }
}

/// A parsed ZFile: maps each uncompressed block to its compressed bytes and decodes them.
#[derive(Debug, Clone)]
pub struct ZFile {
    trailer: HeaderTrailer,
    /// `offsets[i]..offsets[i + 1]` is block `i` (with its CRC) within the ZFile. Shared, so
    /// that the block map of a disk holds its layers' tables without copying them.
    offsets: Arc<[u64]>,
}

impl ZFile {
    /// Parses a ZFile from its header, trailer and jump-table bytes.
    pub fn parse(header: &[u8], trailer: &[u8], jump_table: &[u8]) -> Result<Self, ZFileError> {
        Self::from_info(ZFileInfo::parse(header, trailer)?, jump_table)
    }

    /// Completes a parsed header/trailer with the jump-table bytes.
    pub fn from_info(info: ZFileInfo, jump_table: &[u8]) -> Result<Self, ZFileError> {
        let trailer = info.trailer;
        let expected = trailer.index_size * u64::from(CRC_LEN);
        if jump_table.len() as u64 != expected {
            return Err(ZFileError::JumpTableLength {
                expected,
                actual: jump_table.len(),
            });
        }
        if trailer.has_digest() {
            let computed = crc32c_raw(0, jump_table);
            if computed != trailer.index_crc {
                return Err(ZFileError::JumpTableChecksum {
                    stored: trailer.index_crc,
                    computed,
                });
            }
        }
        let min = if trailer.verify { CRC_LEN + 1 } else { 1 };
        let max = max_compressed_len(trailer.block_size);
        let mut offsets = Vec::with_capacity(jump_table.len() / 4 + 1);
        let mut end = HEADER_SIZE as u64 + u64::from(trailer.dict_size);
        offsets.push(end);
        for (index, entry) in jump_table.chunks_exact(4).enumerate() {
            let len = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            if !(min..=max).contains(&len) {
                return Err(ZFileError::BlockLength {
                    index: index as u64,
                    len,
                    min,
                    max,
                });
            }
            end += u64::from(len);
            offsets.push(end);
        }
        if end > trailer.index_offset {
            return Err(ZFileError::BlocksOverrunIndex {
                end,
                index_offset: trailer.index_offset,
            });
        }
        Ok(Self {
            trailer,
            offsets: offsets.into(),
        })
    }

    /// Reads and parses the ZFile held by `source`.
    pub fn open<S: BlockSource + ?Sized>(source: &S) -> Result<Self, ZFileError> {
        let size = source.size();
        if size < 2 * HEADER_SIZE as u64 {
            return Err(ZFileError::BlobTooSmall { size });
        }
        let read = |what, offset, len| {
            read_vec(source, offset, len).map_err(|source| ZFileError::Read { what, source })
        };
        let header = read("header", 0, HEADER_SIZE as u64)?;
        let trailer = read("trailer", size - HEADER_SIZE as u64, HEADER_SIZE as u64)?;
        let info = ZFileInfo::parse(&header, &trailer)?;
        let range = info.jump_table_range(size)?;
        let jump_table = read("jump table", range.start, range.end - range.start)?;
        Self::from_info(info, &jump_table)
    }

    /// The decoded trailer.
    pub fn trailer(&self) -> &HeaderTrailer {
        &self.trailer
    }

    /// Size of the original (uncompressed) file.
    pub fn uncompressed_size(&self) -> u64 {
        self.trailer.original_size
    }

    /// Uncompressed block size.
    pub fn block_size(&self) -> u32 {
        self.trailer.block_size
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        self.trailer.index_size
    }

    pub fn algorithm(&self) -> Algorithm {
        self.trailer.algorithm
    }

    /// Byte range of block `index`'s compressed bytes (with CRC) within the ZFile.
    pub fn block_range(&self, index: u64) -> Result<Range<u64>, ZFileError> {
        let count = self.block_count();
        if index >= count {
            return Err(ZFileError::BlockIndex { index, count });
        }
        let i = index as usize;
        Ok(self.offsets[i]..self.offsets[i + 1])
    }

    /// Blocks holding uncompressed bytes `range` (clamped to the file).
    pub fn blocks_for(&self, range: Range<u64>) -> Range<u64> {
        let end = range.end.min(self.uncompressed_size());
        if range.start >= end {
            return 0..0;
        }
        let block = u64::from(self.block_size());
        range.start / block..end.div_ceil(block)
    }

    /// Uncompressed length of block `index`.
    pub fn block_len(&self, index: u64) -> Result<u64, ZFileError> {
        self.block_range(index)?;
        let block = u64::from(self.block_size());
        Ok(block.min(self.uncompressed_size() - index * block))
    }

    /// Checks the CRC of block `index`'s compressed bytes (as read from [`Self::block_range`])
    /// and decompresses them.
    pub fn decompress_block(&self, compressed: &[u8], index: u64) -> Result<Vec<u8>, ZFileError> {
        let range = self.block_range(index)?;
        let expected = range.end - range.start;
        if compressed.len() as u64 != expected {
            return Err(ZFileError::CompressedLength {
                index,
                expected,
                actual: compressed.len(),
            });
        }
        let data = if self.trailer.verify {
            let (data, crc) = compressed.split_at(compressed.len() - CRC_LEN as usize);
            let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            let computed = crc32c_raw(BLOCK_CRC_SEED, data);
            if stored != computed {
                return Err(ZFileError::BlockChecksum {
                    index,
                    stored,
                    computed,
                });
            }
            data
        } else {
            compressed
        };
        let len = self.block_len(index)?;
        // block_len <= MAX_BLOCK_SIZE, so the allocation is bounded.
        let mut out = vec![0u8; len as usize];
        let algorithm = self.algorithm();
        let decompress_error = |source: Box<dyn StdError + Send + Sync>| ZFileError::Decompress {
            index,
            algorithm,
            source,
        };
        let actual = match algorithm {
            Algorithm::Lz4 => lz4_flex::block::decompress_into(data, &mut out)
                .map_err(|e| decompress_error(Box::new(e)))?,
            Algorithm::Zstd => zstd::bulk::decompress_to_buffer(data, &mut out[..])
                .map_err(|e| decompress_error(Box::new(e)))?,
        };
        if actual as u64 != len {
            return Err(ZFileError::DecompressedLength {
                index,
                expected: len,
                actual,
            });
        }
        Ok(out)
    }
}

/// CRC32C as overlaybd computes it: the bare register update from `seed`, without the
/// customary inversion before and after (so seed 0 over zeros stays 0, unlike standard CRC32C).
pub fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// Largest compressed block (with CRC) any supported algorithm can produce for `block_size`.
fn max_compressed_len(block_size: u32) -> u32 {
    let lz4 = block_size + block_size / 255 + 16;
    let small_input_margin = (128 * 1024u32).saturating_sub(block_size) >> 11;
    let zstd = block_size + block_size / 256 + small_input_margin;
    lz4.max(zstd) + CRC_LEN
}

#[cfg(test)]
mod tests;
