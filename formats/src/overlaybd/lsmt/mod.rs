//! LSMT: one overlaybd layer as a log-structured block file.
//!
//! Layout: `header (4096) | data | index | trailer (4096)`. The index is a sorted array of
//! 16-byte [`Mapping`]s from virtual-disk sectors to sectors of this file, padded to a 4 KiB
//! multiple with padding records; the trailer records its offset and record count and the
//! virtual disk size.

mod header;
mod index;
mod writer;

pub use header::{HeaderTrailer, Record, HEADER_SIZE, TAG_LEN, UUID_LEN};
pub use index::{parse_index, Mapping, MAX_LENGTH, MAX_MOFFSET, MAX_OFFSET, RECORD_SIZE, SECTOR};
pub use writer::{Extent, Writer};

use std::ops::Range;

use super::source::{read_vec, BlockSource, SourceError};

/// Largest index accepted, in records (the reference read-only limit).
pub const MAX_INDEX_RECORDS: u64 = 1_000_000;

/// Failure to parse, validate or write an LSMT file.
#[derive(Debug, thiserror::Error)]
pub enum LsmtError {
    #[error("lsmt {record} is {len} bytes, expected {HEADER_SIZE}")]
    RecordLength { record: Record, len: usize },
    #[error("lsmt {record} has no lsmt magic")]
    Magic { record: Record },
    #[error("lsmt {record} has flags {flags:#x} of the wrong kind")]
    RecordKind { record: Record, flags: u32 },
    #[error("lsmt index has {records} records, more than {MAX_INDEX_RECORDS}")]
    IndexTooLarge { records: u64 },
    #[error("lsmt index at {index_offset} ({records} records) does not end before the trailer at {trailer_offset}")]
    IndexRange {
        index_offset: u64,
        records: u64,
        trailer_offset: u64,
    },
    #[error("lsmt index region of {len} bytes is not a whole number of records")]
    IndexLength { len: usize },
    #[error("lsmt index record {record} maps no sectors")]
    EmptyMapping { record: usize },
    #[error(
        "lsmt index record {record} starts at sector {offset}, before the previous end {prev_end}"
    )]
    Unordered {
        record: usize,
        offset: u64,
        prev_end: u64,
    },
    #[error(
        "lsmt index record {record} ends at byte {end}, past the {virtual_size}-byte virtual disk"
    )]
    PastVirtualSize {
        record: usize,
        end: u64,
        virtual_size: u64,
    },
    #[error("lsmt index record {record} maps sectors {moffset}..{mend}, outside the data region ending at sector {data_end}")]
    PastDataRegion {
        record: usize,
        moffset: u64,
        mend: u64,
        data_end: u64,
    },
    #[error("lsmt file of {size} bytes is too small for a header and trailer")]
    FileTooSmall { size: u64 },
    #[error("failed to read the lsmt {what}")]
    Read {
        what: &'static str,
        #[source]
        source: SourceError,
    },
    #[error("lsmt extent at byte {offset} of {len} bytes is not sector aligned")]
    ExtentAlignment { offset: u64, len: usize },
    #[error("lsmt extent at byte {offset} overlaps the previous extent ending at {prev_end}")]
    ExtentOverlap { offset: u64, prev_end: u64 },
    #[error("lsmt extent ending at byte {end} lies past the {virtual_size}-byte virtual disk")]
    ExtentPastEnd { end: u64, virtual_size: u64 },
    #[error("lsmt {field} of {len} bytes does not fit its {max}-byte field")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// A parsed LSMT file: its trailer and validated mappings, sorted by virtual offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LsmtFile {
    trailer: HeaderTrailer,
    mappings: Vec<Mapping>,
}

impl LsmtFile {
    /// Checks the header and trailer and returns the byte range of the index within a file
    /// of `file_size` bytes, plus the trailer to pass to [`LsmtFile::parse_index`].
    pub fn locate_index(
        header: &[u8],
        trailer: &[u8],
        file_size: u64,
    ) -> Result<(HeaderTrailer, Range<u64>), LsmtError> {
        HeaderTrailer::parse(header, Record::Header)?;
        let trailer = HeaderTrailer::parse(trailer, Record::Trailer)?;
        let records = trailer.index_size;
        if records > MAX_INDEX_RECORDS {
            return Err(LsmtError::IndexTooLarge { records });
        }
        let index_offset = trailer.index_offset;
        let trailer_offset = file_size.saturating_sub(HEADER_SIZE as u64);
        // records <= MAX_INDEX_RECORDS, so only the addition can overflow.
        match index_offset.checked_add(records * RECORD_SIZE as u64) {
            Some(end) if index_offset >= HEADER_SIZE as u64 && end <= trailer_offset => {
                Ok((trailer, index_offset..end))
            }
            _ => Err(LsmtError::IndexRange {
                index_offset,
                records,
                trailer_offset,
            }),
        }
    }

    /// Parses the index bytes described by `trailer`.
    pub fn parse_index(trailer: HeaderTrailer, index: &[u8]) -> Result<Self, LsmtError> {
        let expected = trailer.index_size * RECORD_SIZE as u64;
        if index.len() as u64 != expected {
            return Err(LsmtError::IndexLength { len: index.len() });
        }
        let data = HEADER_SIZE as u64 / SECTOR..trailer.index_offset / SECTOR;
        let mappings = parse_index(index, trailer.virtual_size, data)?;
        Ok(Self { trailer, mappings })
    }

    /// Parses an LSMT file from its header, trailer and index bytes; `file_size` bounds
    /// where the trailer may claim the index is.
    pub fn parse(
        header: &[u8],
        trailer: &[u8],
        index: &[u8],
        file_size: u64,
    ) -> Result<Self, LsmtError> {
        let (trailer, _) = Self::locate_index(header, trailer, file_size)?;
        Self::parse_index(trailer, index)
    }

    /// Reads and parses the LSMT file held by `source` (e.g. a decompressing ZFile reader).
    pub fn open<S: BlockSource + ?Sized>(source: &S) -> Result<Self, LsmtError> {
        let size = source.size();
        if size < 2 * HEADER_SIZE as u64 {
            return Err(LsmtError::FileTooSmall { size });
        }
        let read = |what, offset, len| {
            read_vec(source, offset, len).map_err(|source| LsmtError::Read { what, source })
        };
        let header = read("header", 0, HEADER_SIZE as u64)?;
        let trailer = read("trailer", size - HEADER_SIZE as u64, HEADER_SIZE as u64)?;
        let (trailer, range) = Self::locate_index(&header, &trailer, size)?;
        let index = read("index", range.start, range.end - range.start)?;
        Self::parse_index(trailer, &index)
    }

    pub fn trailer(&self) -> &HeaderTrailer {
        &self.trailer
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.trailer.virtual_size
    }

    /// Index records on disk, padding included.
    pub fn index_records(&self) -> u64 {
        self.trailer.index_size
    }

    /// The mappings, sorted and disjoint.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }
}

#[cfg(test)]
mod tests;
