//! The 512-byte ZFile header and trailer (same layout; the sealed trailer is authoritative).

use super::{crc32c_raw, ZFileError};

/// Size of the header and of the trailer.
pub const HEADER_SIZE: usize = 512;
/// Seed of the CRC32C stored after each compressed block ("salted" so a zero block is not 0).
pub const BLOCK_CRC_SEED: u32 = 100_007;

const MAGIC0: &[u8; 8] = b"ZFile\0\x01\0";
const MAGIC1: &[u8; 16] = b"tuji.yyf@Alibaba";
/// `sizeof(HeaderTrailer)` in the reference implementation, recorded in every header.
const STRUCT_SIZE: u32 = 96;

const FLAG_HEADER: u64 = 1 << 0;
const FLAG_DATA_FILE: u64 = 1 << 1;
const FLAG_SEALED: u64 = 1 << 2;
const FLAG_INFO_VALID: u64 = 1 << 3;
const FLAG_DIGEST: u64 = 1 << 4;

/// Block compression algorithm recorded in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Lz4,
    Zstd,
}

impl Algorithm {
    fn from_code(code: u8) -> Result<Self, ZFileError> {
        match code {
            1 => Ok(Self::Lz4),
            2 => Ok(Self::Zstd),
            algo => Err(ZFileError::UnsupportedAlgorithm { algo }),
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Lz4 => 1,
            Self::Zstd => 2,
        }
    }
}

/// Which of the two 512-byte records is meant, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Header,
    Trailer,
}

impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::Trailer => "trailer",
        })
    }
}

/// The decoded fields of a header or trailer.
///
/// Old writers left uninitialised memory in unused flag bits, so only the documented low
/// bits are ever interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTrailer {
    pub flags: u64,
    pub index_offset: u64,
    /// Number of `u32` entries in the jump table (one per block).
    pub index_size: u64,
    pub original_size: u64,
    pub index_crc: u32,
    pub block_size: u32,
    pub algorithm: Algorithm,
    pub level: u8,
    pub dict_size: u32,
    /// Whether each compressed block is followed by its CRC32C.
    pub verify: bool,
}

impl HeaderTrailer {
    /// Decodes the header, checking its magic, kind and digest. A header written before the
    /// file was finished carries no information (old writers left uninitialised memory in
    /// it): `None`.
    pub fn parse_header(bytes: &[u8]) -> Result<Option<Self>, ZFileError> {
        let (bytes, flags) = check(bytes, Record::Header)?;
        if flags & FLAG_INFO_VALID == 0 {
            return Ok(None);
        }
        decode(bytes, flags).map(Some)
    }

    /// Decodes the sealed trailer, checking its magic, kind and digest.
    pub fn parse_trailer(bytes: &[u8]) -> Result<Self, ZFileError> {
        let (bytes, flags) = check(bytes, Record::Trailer)?;
        decode(bytes, flags)
    }

    /// Whether the jump-table CRC and header digest were recorded.
    pub fn has_digest(&self) -> bool {
        self.flags & FLAG_DIGEST != 0
    }

    /// Encodes the sealed trailer, or the header rewritten with the trailer's information
    /// (what the reference converter leaves at the front of a finished file).
    pub(crate) fn encode(&self, record: Record) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..8].copy_from_slice(MAGIC0);
        out[8..24].copy_from_slice(MAGIC1);
        out[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
        let flags = FLAG_DATA_FILE
            | FLAG_DIGEST
            | match record {
                Record::Header => FLAG_HEADER | FLAG_INFO_VALID,
                Record::Trailer => FLAG_SEALED,
            };
        out[32..40].copy_from_slice(&flags.to_le_bytes());
        out[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        out[48..56].copy_from_slice(&self.index_size.to_le_bytes());
        out[56..64].copy_from_slice(&self.original_size.to_le_bytes());
        out[64..68].copy_from_slice(&self.index_crc.to_le_bytes());
        out[72..76].copy_from_slice(&self.block_size.to_le_bytes());
        out[76] = self.algorithm.code();
        out[77] = self.level;
        out[84..88].copy_from_slice(&self.dict_size.to_le_bytes());
        out[88] = u8::from(self.verify);
        let digest = digest(&out);
        out[28..32].copy_from_slice(&digest.to_le_bytes());
        out
    }
}

/// Checks magic, kind and (when recorded) digest; returns the record and its flags.
fn check(bytes: &[u8], record: Record) -> Result<(&[u8; HEADER_SIZE], u64), ZFileError> {
    let bytes: &[u8; HEADER_SIZE] = bytes.try_into().map_err(|_| ZFileError::RecordLength {
        record,
        len: bytes.len(),
    })?;
    if &bytes[0..8] != MAGIC0 || &bytes[8..24] != MAGIC1 {
        return Err(ZFileError::Magic { record });
    }
    let flags = u64_at(bytes, 32);
    let kind_ok = match record {
        Record::Header => flags & FLAG_HEADER != 0,
        Record::Trailer => {
            let want = FLAG_DATA_FILE | FLAG_SEALED;
            flags & FLAG_HEADER == 0 && flags & want == want
        }
    };
    if !kind_ok {
        return Err(ZFileError::RecordKind { record, flags });
    }
    if flags & FLAG_DIGEST != 0 {
        let stored = u32_at(bytes, 28);
        let computed = digest(bytes);
        if stored != computed {
            return Err(ZFileError::Digest {
                record,
                stored,
                computed,
            });
        }
    }
    Ok((bytes, flags))
}

fn decode(bytes: &[u8; HEADER_SIZE], flags: u64) -> Result<HeaderTrailer, ZFileError> {
    if bytes[78] != 0 {
        // No known writer uses a shared dictionary; refuse rather than misdecode.
        return Err(ZFileError::Dictionary);
    }
    Ok(HeaderTrailer {
        flags,
        index_offset: u64_at(bytes, 40),
        index_size: u64_at(bytes, 48),
        original_size: u64_at(bytes, 56),
        index_crc: u32_at(bytes, 64),
        block_size: u32_at(bytes, 72),
        algorithm: Algorithm::from_code(bytes[76])?,
        level: bytes[77],
        dict_size: u32_at(bytes, 84),
        verify: bytes[88] != 0,
    })
}

/// CRC32C of the whole record with the digest field taken as zero.
fn digest(bytes: &[u8; HEADER_SIZE]) -> u32 {
    let crc = crc32c_raw(0, &bytes[..28]);
    let crc = crc32c_raw(crc, &[0; 4]);
    crc32c_raw(crc, &bytes[32..])
}

fn u32_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(field)
}

fn u64_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(field)
}
