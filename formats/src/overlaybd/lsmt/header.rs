//! The 4096-byte LSMT header and trailer (same layout; the sealed trailer carries the index).

use super::LsmtError;

/// Size of the header and of the trailer.
pub const HEADER_SIZE: usize = 4096;
/// Length of a UUID field: 36 characters and a NUL.
pub const UUID_LEN: usize = 37;
/// Length of the user tag (commit message) field.
pub const TAG_LEN: usize = 256;

const MAGIC0: &[u8; 8] = b"LSMT\0\x01\x02\0";
const MAGIC1: [u8; 16] = [
    0x65, 0x7e, 0x63, 0xd2, 0x94, 0x44, 0x08, 0x4c, 0xa2, 0xd2, 0xc8, 0xec, 0x4f, 0xcf, 0xae, 0x8a,
];
/// `sizeof(HeaderTrailer)` (packed) in the reference implementation.
const STRUCT_SIZE: u32 = 390;
/// Format version the writer records (v1.1: UUID checks, no level range).
pub(super) const VERSION: u8 = 1;
pub(super) const SUB_VERSION: u8 = 1;

const FLAG_HEADER: u32 = 1 << 0;
const FLAG_DATA_FILE: u32 = 1 << 1;
const FLAG_SEALED: u32 = 1 << 2;

const UUID_AT: usize = 56;
const PARENT_UUID_AT: usize = UUID_AT + UUID_LEN;
const VERSION_AT: usize = 132;
const TAG_AT: usize = 134;

/// Which of the two 4096-byte records is meant, for error messages.
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

/// The decoded fields of an LSMT header or trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTrailer {
    pub flags: u32,
    /// Byte offset of the index (trailer only; 0 in a header).
    pub index_offset: u64,
    /// Number of 16-byte index records, padding included (trailer only).
    pub index_size: u64,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    pub uuid: String,
    pub parent_uuid: String,
    pub version: u8,
    pub sub_version: u8,
    pub user_tag: String,
}

impl HeaderTrailer {
    /// Decodes a header or trailer and checks that it is of the expected kind.
    pub fn parse(bytes: &[u8], record: Record) -> Result<Self, LsmtError> {
        let bytes: &[u8; HEADER_SIZE] = bytes.try_into().map_err(|_| LsmtError::RecordLength {
            record,
            len: bytes.len(),
        })?;
        if &bytes[0..8] != MAGIC0 || bytes[8..24] != MAGIC1 {
            return Err(LsmtError::Magic { record });
        }
        let flags = u32::from_le_bytes([bytes[28], bytes[29], bytes[30], bytes[31]]);
        let kind_ok = match record {
            Record::Header => flags & FLAG_HEADER != 0,
            Record::Trailer => {
                let want = FLAG_DATA_FILE | FLAG_SEALED;
                flags & FLAG_HEADER == 0 && flags & want == want
            }
        };
        if !kind_ok {
            return Err(LsmtError::RecordKind { record, flags });
        }
        Ok(Self {
            flags,
            index_offset: u64_at(bytes, 32),
            index_size: u64_at(bytes, 40),
            virtual_size: u64_at(bytes, 48),
            uuid: c_string(&bytes[UUID_AT..UUID_AT + UUID_LEN]),
            parent_uuid: c_string(&bytes[PARENT_UUID_AT..PARENT_UUID_AT + UUID_LEN]),
            version: bytes[VERSION_AT],
            sub_version: bytes[VERSION_AT + 1],
            user_tag: c_string(&bytes[TAG_AT..TAG_AT + TAG_LEN]),
        })
    }

    /// Encodes a sealed data-file header or trailer.
    pub(crate) fn encode(&self, record: Record) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..8].copy_from_slice(MAGIC0);
        out[8..24].copy_from_slice(&MAGIC1);
        out[24..28].copy_from_slice(&STRUCT_SIZE.to_le_bytes());
        let kind = match record {
            Record::Header => FLAG_HEADER,
            Record::Trailer => 0,
        };
        let flags = kind | FLAG_DATA_FILE | FLAG_SEALED;
        out[28..32].copy_from_slice(&flags.to_le_bytes());
        out[32..40].copy_from_slice(&self.index_offset.to_le_bytes());
        out[40..48].copy_from_slice(&self.index_size.to_le_bytes());
        out[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        put_c_string(&mut out[UUID_AT..UUID_AT + UUID_LEN], &self.uuid);
        put_c_string(
            &mut out[PARENT_UUID_AT..PARENT_UUID_AT + UUID_LEN],
            &self.parent_uuid,
        );
        out[VERSION_AT] = self.version;
        out[VERSION_AT + 1] = self.sub_version;
        put_c_string(&mut out[TAG_AT..TAG_AT + TAG_LEN], &self.user_tag);
        out
    }
}

fn u64_at(bytes: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(field)
}

/// Text up to the first NUL; invalid UTF-8 is replaced rather than rejected (it is only shown).
fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Writes `text` NUL-terminated; callers have checked it fits with its NUL.
fn put_c_string(field: &mut [u8], text: &str) {
    let len = text.len().min(field.len() - 1);
    field[..len].copy_from_slice(&text.as_bytes()[..len]);
}
