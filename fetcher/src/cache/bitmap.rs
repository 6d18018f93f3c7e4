//! The persisted presence bitmap of one cached blob: which of its blocks are durable on disk.
//!
//! Layout (little-endian): magic `SHOALBM\0`, version u32, reserved u32, block size u64, blob
//! size u64, the digest's 64 hex digits, then one bit per block (bit `i % 8` of byte `i / 8`).
//! The header is written once, through a temporary file renamed into place; afterwards each
//! change rewrites the single byte holding the bit and is synced before it is believed.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use crate::digest::Digest;

const MAGIC: &[u8; 8] = b"SHOALBM\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 64;

/// What a bitmap's header says about its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapHeader {
    pub block_size: u64,
    pub blob_size: u64,
}

impl BitmapHeader {
    pub fn blocks(&self) -> u64 {
        self.blob_size.div_ceil(self.block_size)
    }

    fn encode(&self, digest: &Digest) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&self.block_size.to_le_bytes());
        header[24..32].copy_from_slice(&self.blob_size.to_le_bytes());
        header[32..].copy_from_slice(digest.hex().as_bytes());
        header
    }

    fn decode(bytes: &[u8], digest: &Digest) -> Option<BitmapHeader> {
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(bytes.get(at..at + 8)?);
            Some(u64::from_le_bytes(word))
        };
        if bytes.len() < HEADER_LEN
            || &bytes[..8] != MAGIC
            || bytes[8..12] != VERSION.to_le_bytes()
            || &bytes[32..HEADER_LEN] != digest.hex().as_bytes()
        {
            return None;
        }
        let header = BitmapHeader {
            block_size: u64_at(16)?,
            blob_size: u64_at(24)?,
        };
        (header.block_size > 0).then_some(header)
    }
}

/// One blob's presence bits, in memory and on disk.
#[derive(Debug)]
pub struct Bitmap {
    file: File,
    header: BitmapHeader,
    bits: Vec<u8>,
}

impl Bitmap {
    /// Creates an all-absent bitmap at `path`, durably, replacing any previous one.
    pub fn create(path: &Path, digest: &Digest, header: BitmapHeader) -> io::Result<Bitmap> {
        let bits = vec![0u8; bits_len(header.blocks())?];
        let tmp = path.with_extension("bitmap.tmp");
        let mut file = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&header.encode(digest))?;
        file.write_all(&bits)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)?;
        Ok(Bitmap { file, header, bits })
    }

    /// Loads the bitmap at `path`; `None` when it is not a valid bitmap of `digest`, for
    /// example one torn by a crash during creation or left by another version.
    pub fn open(path: &Path, digest: &Digest, max_blob_size: u64) -> io::Result<Option<Bitmap>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut head = [0u8; HEADER_LEN];
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(None);
        }
        let Some(header) = BitmapHeader::decode(&head, digest) else {
            return Ok(None);
        };
        if header.blob_size > max_blob_size {
            return Ok(None);
        }
        let mut bits = vec![0u8; bits_len(header.blocks())?];
        if file.metadata()?.len() != (HEADER_LEN + bits.len()) as u64
            || file.read_exact_at(&mut bits, HEADER_LEN as u64).is_err()
        {
            return Ok(None);
        }
        Ok(Some(Bitmap { file, header, bits }))
    }

    pub fn header(&self) -> BitmapHeader {
        self.header
    }

    pub fn get(&self, index: u64) -> bool {
        let Ok(byte) = usize::try_from(index / 8) else {
            return false;
        };
        self.bits
            .get(byte)
            .is_some_and(|bits| bits & (1 << (index % 8)) != 0)
    }

    /// Sets bit `index` to `present`, durably; the in-memory bit changes only after the disk's.
    pub fn set(&mut self, index: u64, present: bool) -> io::Result<()> {
        let byte = usize::try_from(index / 8)
            .ok()
            .filter(|&byte| byte < self.bits.len() && index < self.header.blocks())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "block out of range"))?;
        let mask = 1u8 << (index % 8);
        let updated = if present {
            self.bits[byte] | mask
        } else {
            self.bits[byte] & !mask
        };
        if updated == self.bits[byte] {
            return Ok(());
        }
        // One byte never tears, so the bitmap on disk is always some valid state.
        self.file
            .write_all_at(&[updated], (HEADER_LEN + byte) as u64)?;
        self.file.sync_data()?;
        self.bits[byte] = updated;
        Ok(())
    }

    /// Indices of the present blocks.
    pub fn present(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.header.blocks()).filter(|&index| self.get(index))
    }
}

fn bits_len(blocks: u64) -> io::Result<usize> {
    usize::try_from(blocks.div_ceil(8))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "blob too large for a bitmap"))
}

/// Makes a rename or creation in `path`'s directory durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"blob");
        let path = dir.path().join("x.bitmap");
        let header = BitmapHeader {
            block_size: 4096,
            blob_size: 4096 * 9 + 1,
        };
        let mut bitmap = Bitmap::create(&path, &digest, header).unwrap();
        assert_eq!(header.blocks(), 10);
        bitmap.set(0, true).unwrap();
        bitmap.set(9, true).unwrap();
        bitmap.set(3, true).unwrap();
        bitmap.set(3, false).unwrap();
        assert!(bitmap.set(10, true).is_err());
        drop(bitmap);

        let bitmap = Bitmap::open(&path, &digest, u64::MAX).unwrap().unwrap();
        assert_eq!(bitmap.header(), header);
        assert_eq!(bitmap.present().collect::<Vec<_>>(), vec![0, 9]);

        let other = Digest::of(b"other");
        assert!(Bitmap::open(&path, &other, u64::MAX).unwrap().is_none());
        assert!(Bitmap::open(&path, &digest, 100).unwrap().is_none());
        std::fs::write(&path, b"SHOALBM\0short").unwrap();
        assert!(Bitmap::open(&path, &digest, u64::MAX).unwrap().is_none());
    }
}
