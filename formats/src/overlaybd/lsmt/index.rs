//! LSMT index records: 16-byte `SegmentMapping`s from logical sectors to data-file sectors.
//!
//! Bit layout (little-endian, two `u64` words): word 0 holds the logical offset in bits 0..50
//! and the length in bits 50..64; word 1 holds the mapped offset in bits 0..55, the zeroed
//! flag in bit 55 and a runtime-only tag in bits 56..64. All units are 512-byte sectors.

use super::LsmtError;

/// Unit of every offset and length in the index.
pub const SECTOR: u64 = 512;
/// Size of one index record.
pub const RECORD_SIZE: usize = 16;
/// Longest mapping one record can describe, in sectors.
pub const MAX_LENGTH: u32 = (1 << 14) - 1;
/// Largest logical sector offset; also the marker of padding records.
pub const MAX_OFFSET: u64 = (1 << 50) - 1;
/// Largest mapped sector offset.
pub const MAX_MOFFSET: u64 = (1 << 55) - 1;

/// One index record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Logical (virtual disk) offset in sectors.
    pub offset: u64,
    /// Length in sectors.
    pub len: u32,
    /// Offset in the layer's data file, in sectors (meaningless when `zeroed`).
    pub moffset: u64,
    /// The range reads as zeros without data in the file.
    pub zeroed: bool,
}

impl Mapping {
    /// End (exclusive) of the logical range, in sectors.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }

    /// Whether this is an index padding record rather than a mapping.
    pub fn is_padding(&self) -> bool {
        self.offset == MAX_OFFSET
    }

    /// The padding record the reference writer fills index pages with.
    pub fn padding() -> Self {
        Self {
            offset: MAX_OFFSET,
            len: 0,
            moffset: 0,
            zeroed: false,
        }
    }

    /// Decodes a record; the tag is runtime state and is dropped.
    pub fn decode(record: &[u8; RECORD_SIZE]) -> Self {
        let mut word = [0u8; 8];
        word.copy_from_slice(&record[..8]);
        let w0 = u64::from_le_bytes(word);
        word.copy_from_slice(&record[8..]);
        let w1 = u64::from_le_bytes(word);
        Self {
            offset: w0 & MAX_OFFSET,
            len: (w0 >> 50) as u32,
            moffset: w1 & MAX_MOFFSET,
            zeroed: (w1 >> 55) & 1 == 1,
        }
    }

    /// Encodes a record with a zero tag; fields beyond their bit widths are masked off.
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let w0 = (self.offset & MAX_OFFSET) | (u64::from(self.len & MAX_LENGTH) << 50);
        let w1 = (self.moffset & MAX_MOFFSET) | (u64::from(self.zeroed) << 55);
        let mut out = [0u8; RECORD_SIZE];
        out[..8].copy_from_slice(&w0.to_le_bytes());
        out[8..].copy_from_slice(&w1.to_le_bytes());
        out
    }
}

/// Decodes an index region, drops padding and checks that the mappings are sorted, disjoint,
/// non-empty, inside the virtual disk and (unless zeroed) inside the data region
/// `data_sectors` (a range of data-file sectors).
pub fn parse_index(
    bytes: &[u8],
    virtual_size: u64,
    data_sectors: std::ops::Range<u64>,
) -> Result<Vec<Mapping>, LsmtError> {
    if !bytes.len().is_multiple_of(RECORD_SIZE) {
        return Err(LsmtError::IndexLength { len: bytes.len() });
    }
    let mut mappings: Vec<Mapping> = Vec::with_capacity(bytes.len() / RECORD_SIZE);
    for (record, chunk) in bytes.chunks_exact(RECORD_SIZE).enumerate() {
        let mut raw = [0u8; RECORD_SIZE];
        raw.copy_from_slice(chunk);
        let m = Mapping::decode(&raw);
        if m.is_padding() {
            continue;
        }
        if m.len == 0 {
            return Err(LsmtError::EmptyMapping { record });
        }
        if let Some(prev) = mappings.last() {
            if m.offset < prev.end() {
                return Err(LsmtError::Unordered {
                    record,
                    offset: m.offset,
                    prev_end: prev.end(),
                });
            }
        }
        if m.end() * SECTOR > virtual_size {
            return Err(LsmtError::PastVirtualSize {
                record,
                end: m.end() * SECTOR,
                virtual_size,
            });
        }
        let mend = m.moffset + u64::from(m.len);
        if !m.zeroed && (m.moffset < data_sectors.start || mend > data_sectors.end) {
            return Err(LsmtError::PastDataRegion {
                record,
                moffset: m.moffset,
                mend,
                data_end: data_sectors.end,
            });
        }
        mappings.push(m);
    }
    Ok(mappings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_at_field_limits() {
        let m = Mapping {
            offset: MAX_OFFSET - 1,
            len: MAX_LENGTH,
            moffset: MAX_MOFFSET,
            zeroed: true,
        };
        assert_eq!(Mapping::decode(&m.encode()), m);
        let m = Mapping {
            offset: 3,
            len: 1,
            moffset: 0,
            zeroed: false,
        };
        assert_eq!(Mapping::decode(&m.encode()), m);
    }

    #[test]
    fn decode_follows_the_reference_bit_layout() {
        // offset 8, length 2, moffset 16, zeroed, tag 7.
        let w0: u64 = 8 | (2 << 50);
        let w1: u64 = 16 | (1 << 55) | (7 << 56);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&w0.to_le_bytes());
        raw[8..].copy_from_slice(&w1.to_le_bytes());
        let m = Mapping::decode(&raw);
        assert_eq!(
            m,
            Mapping {
                offset: 8,
                len: 2,
                moffset: 16,
                zeroed: true
            }
        );
    }

    fn index(mappings: &[Mapping]) -> Vec<u8> {
        mappings.iter().flat_map(|m| m.encode()).collect()
    }

    #[test]
    fn parse_drops_padding_and_validates() {
        let a = Mapping {
            offset: 0,
            len: 8,
            moffset: 8,
            zeroed: false,
        };
        let b = Mapping {
            offset: 8,
            len: 8,
            moffset: 0,
            zeroed: true,
        };
        let bytes = index(&[a, b, Mapping::padding()]);
        assert_eq!(parse_index(&bytes, 1 << 20, 8..16).unwrap(), vec![a, b]);

        let overlap = Mapping {
            offset: 4,
            len: 8,
            moffset: 8,
            zeroed: false,
        };
        assert!(matches!(
            parse_index(&index(&[a, overlap]), 1 << 20, 8..32),
            Err(LsmtError::Unordered { record: 1, .. })
        ));
        let past_data = Mapping {
            offset: 0,
            len: 8,
            moffset: 12,
            zeroed: false,
        };
        assert!(matches!(
            parse_index(&index(&[past_data]), 1 << 20, 8..16),
            Err(LsmtError::PastDataRegion { record: 0, .. })
        ));
        assert!(matches!(
            parse_index(&index(&[a]), 4 * SECTOR, 8..16),
            Err(LsmtError::PastVirtualSize { record: 0, .. })
        ));
        let empty = Mapping {
            offset: 0,
            len: 0,
            moffset: 8,
            zeroed: false,
        };
        assert!(matches!(
            parse_index(&index(&[empty]), 1 << 20, 8..16),
            Err(LsmtError::EmptyMapping { record: 0 })
        ));
        assert!(matches!(
            parse_index(&[0u8; 17], 1 << 20, 8..16),
            Err(LsmtError::IndexLength { len: 17 })
        ));
    }
}
