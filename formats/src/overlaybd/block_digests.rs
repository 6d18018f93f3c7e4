//! The block digest table Shoal's converter writes beside each overlaybd layer: the sha256 of
//! every `unit` bytes of the layer blob as the registry stores it (aligned, the last unit
//! shorter), so that any aligned block of the blob that is a whole number of units can be
//! checked on its own, whoever sent it. ZFile's per-block CRC32C travels with the bytes and
//! proves nothing about a sender; these digests come from a table the manifest anchors.
//!
//! The table is a blob of its own, referenced from the layer's descriptor by
//! [`ANNOTATION_BLOCK_DIGESTS`] (its digest) and [`ANNOTATION_BLOCK_DIGESTS_SIZE`]. Layout,
//! integers little-endian:
//!
//! ```text
//! magic "SHOALBDT" (8) | version u32 (1) | unit u32 | blob size u64 | count u64 | count × sha256 (32)
//! ```

use std::collections::HashMap;
use std::ops::Range;

use sha2::{Digest as _, Sha256};

/// Annotation on a layer descriptor: the digest (`sha256:<hex>`) of its block digest table.
pub const ANNOTATION_BLOCK_DIGESTS: &str = "dev.shoal.overlaybd/block-digests";
/// Annotation on a layer descriptor: the size in bytes of its block digest table.
pub const ANNOTATION_BLOCK_DIGESTS_SIZE: &str = "dev.shoal.overlaybd/block-digests-size";
/// Media type of a block digest table blob.
pub const MEDIA_TYPE: &str = "application/vnd.shoal.overlaybd.block-digests.v1";

/// The unit the converter writes: a divisor of every cache block size from 64 KiB up (the
/// default is 1 MiB), at 0.05% of the blob.
pub const DEFAULT_UNIT: u32 = 64 << 10;
/// Smallest and largest unit accepted (the cache's block size bounds).
pub const MIN_UNIT: u32 = 4 << 10;
pub const MAX_UNIT: u32 = 64 << 20;
/// Largest table accepted: 16 MiB of digests (a 32 GiB blob at 64 KiB units).
pub const MAX_TABLE_BYTES: u64 = 16 << 20;

const MAGIC: &[u8; 8] = b"SHOALBDT";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const DIGEST_LEN: usize = 32;

/// Why a block digest table, or the annotations naming it, were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockDigestsError {
    #[error("block digest table is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("block digest table has no SHOALBDT magic")]
    Magic,
    #[error("block digest table has version {version}, only {VERSION} is known")]
    Version { version: u32 },
    #[error("block digest table unit {unit} is not a power of two in {MIN_UNIT}..={MAX_UNIT}")]
    Unit { unit: u32 },
    #[error("block digest table is for a blob of {table} bytes, the layer is {layer}")]
    BlobSize { table: u64, layer: u64 },
    #[error("block digest table lists {count} digests, a {blob_size}-byte blob in {unit}-byte units needs {expected}")]
    Count {
        count: u64,
        blob_size: u64,
        unit: u32,
        expected: u64,
    },
    #[error("block digest table is {len} bytes, {count} digests need {expected}")]
    Length {
        len: usize,
        count: u64,
        expected: u64,
    },
    #[error("block digest table annotation {annotation} is {value:?}: {reason}")]
    Annotation {
        annotation: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Where a layer's table is: its digest (hex of the sha256) and size, from the annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableRef {
    /// `sha256:<64 hex>`.
    pub digest: String,
    pub sha256: [u8; 32],
    pub size: u64,
}

impl TableRef {
    /// The table a layer descriptor's annotations name: `None` when they name none (a layer
    /// from another converter), an error when they name one badly.
    pub fn from_annotations(
        annotations: &HashMap<String, String>,
    ) -> Option<Result<TableRef, BlockDigestsError>> {
        let digest = annotations.get(ANNOTATION_BLOCK_DIGESTS)?;
        Some(Self::parse(
            digest,
            annotations.get(ANNOTATION_BLOCK_DIGESTS_SIZE),
        ))
    }

    fn parse(digest: &str, size: Option<&String>) -> Result<TableRef, BlockDigestsError> {
        let bad = |annotation, value: &str, reason| BlockDigestsError::Annotation {
            annotation,
            value: value.to_owned(),
            reason,
        };
        let hex = digest
            .strip_prefix("sha256:")
            .ok_or_else(|| bad(ANNOTATION_BLOCK_DIGESTS, digest, "not a sha256 digest"))?;
        let mut sha256 = [0u8; 32];
        let valid = hex.len() == 64 && !hex.bytes().any(|b| b.is_ascii_uppercase());
        if !valid || hex::decode_to_slice(hex, &mut sha256).is_err() {
            return Err(bad(
                ANNOTATION_BLOCK_DIGESTS,
                digest,
                "not 64 lowercase hex digits",
            ));
        }
        let size = size.ok_or_else(|| bad(ANNOTATION_BLOCK_DIGESTS_SIZE, "", "missing"))?;
        let size: u64 = size
            .parse()
            .map_err(|_| bad(ANNOTATION_BLOCK_DIGESTS_SIZE, size, "not a byte count"))?;
        if size > HEADER_LEN as u64 + MAX_TABLE_BYTES {
            return Err(bad(
                ANNOTATION_BLOCK_DIGESTS_SIZE,
                &size.to_string(),
                "larger than any table accepted",
            ));
        }
        Ok(TableRef {
            digest: digest.to_owned(),
            sha256,
            size,
        })
    }

    /// The annotations naming a table of `bytes`.
    pub fn annotations(bytes: &[u8]) -> [(String, String); 2] {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        [
            (ANNOTATION_BLOCK_DIGESTS.to_owned(), digest),
            (
                ANNOTATION_BLOCK_DIGESTS_SIZE.to_owned(),
                bytes.len().to_string(),
            ),
        ]
    }
}

/// A parsed table: the sha256 of every unit of one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigests {
    unit: u32,
    blob_size: u64,
    digests: Vec<[u8; 32]>,
}

impl BlockDigests {
    /// The table of `blob`, in units of `unit` bytes (a power of two in
    /// [`MIN_UNIT`]..=[`MAX_UNIT`]).
    pub fn of(blob: &[u8], unit: u32) -> Result<BlockDigests, BlockDigestsError> {
        check_unit(unit)?;
        let digests = blob
            .chunks(unit as usize)
            .map(|part| Sha256::digest(part).into())
            .collect();
        Ok(BlockDigests {
            unit,
            blob_size: blob.len() as u64,
            digests,
        })
    }

    /// Parses a table of a blob of `blob_size` bytes, checking everything it says.
    pub fn parse(bytes: &[u8], blob_size: u64) -> Result<BlockDigests, BlockDigestsError> {
        if bytes.len() < HEADER_LEN {
            return Err(BlockDigestsError::Short { len: bytes.len() });
        }
        if &bytes[..8] != MAGIC {
            return Err(BlockDigestsError::Magic);
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut le = [0u8; 8];
            le.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(le)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(BlockDigestsError::Version { version });
        }
        let unit = u32_at(12);
        check_unit(unit)?;
        let table = u64_at(16);
        if table != blob_size {
            return Err(BlockDigestsError::BlobSize {
                table,
                layer: blob_size,
            });
        }
        let count = u64_at(24);
        let expected = blob_size.div_ceil(u64::from(unit));
        if count != expected {
            return Err(BlockDigestsError::Count {
                count,
                blob_size,
                unit,
                expected,
            });
        }
        let body = (bytes.len() - HEADER_LEN) as u64;
        let needed = count.checked_mul(DIGEST_LEN as u64);
        if needed != Some(body) || body > MAX_TABLE_BYTES {
            return Err(BlockDigestsError::Length {
                len: bytes.len(),
                count,
                expected: needed.map_or(u64::MAX, |n| n.saturating_add(HEADER_LEN as u64)),
            });
        }
        let digests = bytes[HEADER_LEN..]
            .chunks_exact(DIGEST_LEN)
            .map(|d| {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(d);
                digest
            })
            .collect();
        Ok(BlockDigests {
            unit,
            blob_size,
            digests,
        })
    }

    /// The table as stored.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.digests.len() * DIGEST_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.unit.to_le_bytes());
        out.extend_from_slice(&self.blob_size.to_le_bytes());
        out.extend_from_slice(&(self.digests.len() as u64).to_le_bytes());
        for digest in &self.digests {
            out.extend_from_slice(digest);
        }
        out
    }

    /// Bytes of blob each digest covers (the last unit may be shorter).
    pub fn unit(&self) -> u64 {
        u64::from(self.unit)
    }

    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    /// The digests, unit by unit.
    pub fn digests(&self) -> &[[u8; 32]] {
        &self.digests
    }

    /// The bytes of the blob unit `index` covers.
    pub fn unit_range(&self, index: u64) -> Range<u64> {
        let start = index.saturating_mul(self.unit()).min(self.blob_size);
        start..start.saturating_add(self.unit()).min(self.blob_size)
    }
}

fn check_unit(unit: u32) -> Result<(), BlockDigestsError> {
    if unit.is_power_of_two() && (MIN_UNIT..=MAX_UNIT).contains(&unit) {
        return Ok(());
    }
    Err(BlockDigestsError::Unit { unit })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn a_table_round_trips_and_covers_every_unit() {
        let data = blob(3 * 4096 + 100);
        let table = BlockDigests::of(&data, 4096).unwrap();
        assert_eq!(table.digests().len(), 4);
        assert_eq!(table.unit_range(3), 12288..12388);
        let last: [u8; 32] = Sha256::digest(&data[12288..]).into();
        assert_eq!(table.digests()[3], last);
        let parsed = BlockDigests::parse(&table.encode(), data.len() as u64).unwrap();
        assert_eq!(parsed, table);
        // An empty blob has an empty table.
        let empty = BlockDigests::of(&[], DEFAULT_UNIT).unwrap();
        assert_eq!(BlockDigests::parse(&empty.encode(), 0).unwrap(), empty);
    }

    #[test]
    fn bad_tables_are_refused_saying_why() {
        let data = blob(10_000);
        let good = BlockDigests::of(&data, 4096).unwrap().encode();
        let size = data.len() as u64;
        let refused = |bytes: &[u8], size| BlockDigests::parse(bytes, size).unwrap_err();
        assert_eq!(
            refused(&good[..20], size),
            BlockDigestsError::Short { len: 20 }
        );
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(refused(&bad, size), BlockDigestsError::Magic);
        let mut bad = good.clone();
        bad[8] = 2;
        assert_eq!(
            refused(&bad, size),
            BlockDigestsError::Version { version: 2 }
        );
        for unit in [0u32, 1000, 2048, 128 << 20] {
            let mut bad = good.clone();
            bad[12..16].copy_from_slice(&unit.to_le_bytes());
            assert_eq!(refused(&bad, size), BlockDigestsError::Unit { unit });
        }
        assert!(matches!(
            refused(&good, size + 1),
            BlockDigestsError::BlobSize { .. }
        ));
        let mut bad = good.clone();
        bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            refused(&bad, size),
            BlockDigestsError::Count { .. }
        ));
        assert!(matches!(
            refused(&good[..good.len() - 1], size),
            BlockDigestsError::Length { .. }
        ));
        let mut long = good.clone();
        long.extend_from_slice(&[0; 32]);
        assert!(matches!(
            refused(&long, size),
            BlockDigestsError::Length { .. }
        ));
        let message = refused(&good, size + 1).to_string();
        assert!(message.contains("10001"), "{message}");
    }

    #[test]
    fn annotations_name_the_table_or_are_refused() {
        let table = BlockDigests::of(&blob(5000), 4096).unwrap().encode();
        let annotations: HashMap<String, String> = TableRef::annotations(&table).into();
        let found = TableRef::from_annotations(&annotations).unwrap().unwrap();
        assert_eq!(found.size, table.len() as u64);
        assert_eq!(found.sha256, <[u8; 32]>::from(Sha256::digest(&table)));
        assert!(TableRef::from_annotations(&HashMap::new()).is_none());

        let with = |digest: &str, size: Option<&str>| {
            let mut map = HashMap::from([(ANNOTATION_BLOCK_DIGESTS.to_owned(), digest.to_owned())]);
            if let Some(size) = size {
                map.insert(ANNOTATION_BLOCK_DIGESTS_SIZE.to_owned(), size.to_owned());
            }
            TableRef::from_annotations(&map).unwrap()
        };
        let hex = "a".repeat(64);
        assert!(with(&format!("sha256:{hex}"), Some("64")).is_ok());
        for (digest, size) in [
            (format!("sha512:{hex}"), Some("64")),
            (format!("sha256:{}", "A".repeat(64)), Some("64")),
            ("sha256:abc".to_owned(), Some("64")),
            (format!("sha256:{hex}"), None),
            (format!("sha256:{hex}"), Some("-1")),
            (format!("sha256:{hex}"), Some("99999999999")),
        ] {
            let err = with(&digest, size).unwrap_err();
            assert!(matches!(err, BlockDigestsError::Annotation { .. }), "{err}");
        }
    }
}
