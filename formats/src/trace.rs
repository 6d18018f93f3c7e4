//! Learned-prefetch traces: which chunks (eStargz) or ZFile blocks (overlaybd) of one layer
//! blob the first start of one image read, in the order it first read them. Pure: bytes in, a
//! [`Trace`] out, and back.
//!
//! A trace only says what to fetch ahead; it never vouches for bytes (every chunk fetched for
//! it is checked against the verified TOC like any read), so a trace that lies costs bytes,
//! never integrity. A damaged one must still be told apart from a good one, and one recorded
//! for another image or layer must not be taken for this one's: the encoding is versioned,
//! carries both digests and ends with the sha256 of everything before it.
//!
//! Layout (integers little endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `SHOALTRC` |
//! | 2 | version, 1 |
//! | 1 | unit: 1 = eStargz chunk, named by (inode, file offset); 2 = overlaybd ZFile blocks, named by (first block, block count) |
//! | 1 | reserved, 0 |
//! | 32 | sha256 of the image's manifest |
//! | 32 | sha256 of the layer blob |
//! | 4 | entry count `n` |
//! | 16 × n | entries: two u64 each |
//! | 32 | sha256 of every byte above |
//!
//! A new unit keeps the version: a reader that does not know a unit refuses the trace
//! ([`TraceError::UnknownUnit`]), which is what an older daemon does with an overlaybd trace.

use sha2::{Digest as _, Sha256};

/// The first bytes of every trace.
pub const MAGIC: &[u8; 8] = b"SHOALTRC";
/// The version this module writes, and the only one it reads.
pub const VERSION: u16 = 1;
/// Entries a trace holds at most (4 MiB encoded): a start that reads more is cut there.
pub const MAX_ENTRIES: usize = 1 << 18;

const HEADER_LEN: usize = 8 + 2 + 1 + 1 + 32 + 32 + 4;
const ENTRY_LEN: usize = 16;
const CHECKSUM_LEN: usize = 32;

/// The largest encoding of a valid trace.
pub const MAX_ENCODED_LEN: usize = HEADER_LEN + MAX_ENTRIES * ENTRY_LEN + CHECKSUM_LEN;

/// What one entry of a trace names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A chunk of an eStargz layer: the inode of its file (a function of the TOC alone) and
    /// an offset in the file that the chunk covers.
    EstargzChunk,
    /// Consecutive blocks of an overlaybd layer blob's ZFile: the index of the first block
    /// and how many. Indices are the ZFile's own (its jump table's), so they name the same
    /// compressed bytes on every node, and each is checked like any read when fetched.
    OverlaybdBlocks,
}

impl Unit {
    fn code(self) -> u8 {
        match self {
            Unit::EstargzChunk => 1,
            Unit::OverlaybdBlocks => 2,
        }
    }

    fn of(code: u8) -> Option<Unit> {
        match code {
            1 => Some(Unit::EstargzChunk),
            2 => Some(Unit::OverlaybdBlocks),
            _ => None,
        }
    }
}

/// The chunks one image's first start read from one layer, in the order first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub unit: Unit,
    /// sha256 of the image's manifest.
    pub image: [u8; 32],
    /// sha256 of the layer blob.
    pub layer: [u8; 32],
    pub entries: Vec<(u64, u64)>,
}

/// Why bytes are not a trace.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceError {
    #[error("trace is {len} bytes, shorter than its header and checksum")]
    TooShort { len: usize },
    #[error("trace is {len} bytes, more than the {max} a trace may take")]
    TooLong { len: usize, max: usize },
    #[error("not a trace: bad magic")]
    BadMagic,
    #[error("trace checksum does not match its bytes")]
    ChecksumMismatch,
    #[error("trace version {version} is not supported (this reads {VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("trace unit {unit} is unknown")]
    UnknownUnit { unit: u8 },
    #[error("trace claims {count} entries in {len} bytes")]
    LengthMismatch { count: usize, len: usize },
    #[error("trace has {count} entries, more than {MAX_ENTRIES}")]
    TooManyEntries { count: usize },
}

impl Trace {
    /// The trace's bytes; entries past [`MAX_ENTRIES`] are left out.
    pub fn encode(&self) -> Vec<u8> {
        let entries = &self.entries[..self.entries.len().min(MAX_ENTRIES)];
        let mut out = Vec::with_capacity(HEADER_LEN + entries.len() * ENTRY_LEN + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.unit.code());
        out.push(0);
        out.extend_from_slice(&self.image);
        out.extend_from_slice(&self.layer);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (a, b) in entries {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Parses a trace, refusing anything damaged: the checksum is checked before any field
    /// past the magic is believed.
    pub fn decode(bytes: &[u8]) -> Result<Trace, TraceError> {
        let len = bytes.len();
        if len < HEADER_LEN + CHECKSUM_LEN {
            return Err(TraceError::TooShort { len });
        }
        if len > MAX_ENCODED_LEN {
            return Err(TraceError::TooLong {
                len,
                max: MAX_ENCODED_LEN,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(TraceError::BadMagic);
        }
        let (body, sum) = bytes.split_at(len - CHECKSUM_LEN);
        let actual: [u8; 32] = Sha256::digest(body).into();
        if actual.as_slice() != sum {
            return Err(TraceError::ChecksumMismatch);
        }
        let version = u16::from_le_bytes([body[8], body[9]]);
        if version != VERSION {
            return Err(TraceError::UnsupportedVersion { version });
        }
        let unit = Unit::of(body[10]).ok_or(TraceError::UnknownUnit { unit: body[10] })?;
        let image = digest_at(body, 12);
        let layer = digest_at(body, 44);
        let count = u32::from_le_bytes(body[76..80].try_into().expect("4 bytes")) as usize;
        if count > MAX_ENTRIES {
            return Err(TraceError::TooManyEntries { count });
        }
        let entries_bytes = &body[HEADER_LEN..];
        if entries_bytes.len() != count * ENTRY_LEN {
            return Err(TraceError::LengthMismatch { count, len });
        }
        let entries = entries_bytes
            .chunks_exact(ENTRY_LEN)
            .map(|entry| {
                let a = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
                let b = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
                (a, b)
            })
            .collect();
        Ok(Trace {
            unit,
            image,
            layer,
            entries,
        })
    }
}

fn digest_at(body: &[u8], at: usize) -> [u8; 32] {
    body[at..at + 32].try_into().expect("32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(entries: usize) -> Trace {
        Trace {
            unit: Unit::EstargzChunk,
            image: [1; 32],
            layer: [2; 32],
            entries: (0..entries as u64).map(|i| (i + 2, i * 4096)).collect(),
        }
    }

    /// Re-seals `bytes` with a correct checksum after an edit, so a test reaches the checks
    /// behind it.
    fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
        let at = bytes.len() - CHECKSUM_LEN;
        let sum: [u8; 32] = Sha256::digest(&bytes[..at]).into();
        bytes[at..].copy_from_slice(&sum);
        bytes
    }

    #[test]
    fn a_trace_survives_its_encoding() {
        for n in [0, 1, 300] {
            let original = trace(n);
            let bytes = original.encode();
            assert_eq!(bytes.len(), HEADER_LEN + n * ENTRY_LEN + CHECKSUM_LEN);
            assert_eq!(Trace::decode(&bytes), Ok(original));
        }
    }

    #[test]
    fn any_flipped_byte_is_refused() {
        let bytes = trace(3).encode();
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let err = Trace::decode(&bad).unwrap_err();
            let expected = if at < 8 {
                TraceError::BadMagic
            } else {
                TraceError::ChecksumMismatch
            };
            assert_eq!(err, expected, "byte {at}");
        }
    }

    #[test]
    fn truncated_or_padded_bytes_are_refused() {
        let bytes = trace(3).encode();
        assert_eq!(
            Trace::decode(&bytes[..40]),
            Err(TraceError::TooShort { len: 40 })
        );
        assert_eq!(
            Trace::decode(&bytes[..bytes.len() - 1]),
            Err(TraceError::ChecksumMismatch)
        );
        let mut longer = bytes.clone();
        longer.insert(HEADER_LEN, 0);
        assert_eq!(
            Trace::decode(&resealed(longer.clone())),
            Err(TraceError::LengthMismatch {
                count: 3,
                len: longer.len()
            })
        );
        let huge = vec![0; MAX_ENCODED_LEN + 1];
        assert!(matches!(
            Trace::decode(&huge),
            Err(TraceError::TooLong { .. })
        ));
    }

    #[test]
    fn another_version_or_unit_is_refused_even_when_sealed() {
        let mut bytes = trace(1).encode();
        bytes[8] = 2;
        assert_eq!(
            Trace::decode(&resealed(bytes)),
            Err(TraceError::UnsupportedVersion { version: 2 })
        );
        let mut bytes = trace(1).encode();
        bytes[10] = 9;
        assert_eq!(
            Trace::decode(&resealed(bytes)),
            Err(TraceError::UnknownUnit { unit: 9 })
        );
        let mut bytes = trace(0).encode();
        bytes[76..80].copy_from_slice(&(MAX_ENTRIES as u32 + 1).to_le_bytes());
        assert_eq!(
            Trace::decode(&resealed(bytes)),
            Err(TraceError::TooManyEntries {
                count: MAX_ENTRIES + 1
            })
        );
    }

    #[test]
    fn an_overlaybd_trace_keeps_its_unit_and_an_estargz_one_its_bytes() {
        let blocks = Trace {
            unit: Unit::OverlaybdBlocks,
            entries: vec![(40, 3), (0, 1), (7, 12)],
            ..trace(0)
        };
        let bytes = blocks.encode();
        assert_eq!(bytes[10], 2, "the unit's code");
        assert_eq!(Trace::decode(&bytes), Ok(blocks));
        // An eStargz trace is unchanged by the new unit: same bytes as before it existed.
        assert_eq!(trace(1).encode()[10], 1);
    }

    #[test]
    fn entries_past_the_cap_are_left_out() {
        let long = trace(MAX_ENTRIES + 5);
        let decoded = Trace::decode(&long.encode()).unwrap();
        assert_eq!(decoded.entries.len(), MAX_ENTRIES);
        assert_eq!(decoded.entries[..], long.entries[..MAX_ENTRIES]);
    }
}
