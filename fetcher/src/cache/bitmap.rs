//! The presence bitmap of one cached blob: which of its blocks are durable on disk. On disk
//! ([`BitmapFile`]) one byte per block, written and synced without any lock held; in memory
//! ([`Presence`]) one bit per block, under the blob's lock.
//!
//! Layout (little-endian): magic `SHOALBM\0`, version u32, reserved u32, block size u64, blob
//! size u64, the digest's 64 hex digits, then one byte per block (1 present, 0 absent). The
//! header is written once, through a temporary file renamed into place. A block's byte is
//! only ever written by whoever holds that block (storing or evicting it, never both), and a
//! single byte never tears, so writes of different blocks need no lock between them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::Path;

use super::geometry::BlockGeometry;
use crate::digest::Digest;

const MAGIC: &[u8; 8] = b"SHOALBM\0";
/// Version 1 kept one bit per block (bit `i % 8` of byte `i / 8`): neighbours shared a byte,
/// so every write of it had to be serialised with a lock held across the sync. A version 1
/// bitmap is rewritten as version 2 when opened, so an upgrade keeps the cache.
const VERSION: u32 = 2;
const VERSION_BITS: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 64;
/// Read step when loading the block bytes, so that a large bitmap is not read in one buffer.
const LOAD_STEP: usize = 1 << 20;

fn encode(geometry: &BlockGeometry, digest: &Digest) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&geometry.block_size.to_le_bytes());
    header[24..32].copy_from_slice(&geometry.blob_size.to_le_bytes());
    header[32..].copy_from_slice(digest.hex().as_bytes());
    header
}

/// The header's version (one this code reads) and geometry.
fn decode(bytes: &[u8], digest: &Digest) -> Option<(u32, BlockGeometry)> {
    let u64_at = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes.get(at..at + 8)?);
        Some(u64::from_le_bytes(word))
    };
    if bytes.len() < HEADER_LEN
        || &bytes[..8] != MAGIC
        || &bytes[32..HEADER_LEN] != digest.hex().as_bytes()
    {
        return None;
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
    if version != VERSION && version != VERSION_BITS {
        return None;
    }
    let block_size = u64_at(16)?;
    let blob_size = u64_at(24)?;
    (block_size > 0).then(|| (version, BlockGeometry::new(block_size, blob_size)))
}

/// One blob's presence bytes on disk.
#[derive(Debug)]
pub struct BitmapFile {
    file: File,
    geometry: BlockGeometry,
}

impl BitmapFile {
    /// Creates an all-absent bitmap at `path`, durably, replacing any previous one.
    pub fn create(
        path: &Path,
        digest: &Digest,
        geometry: BlockGeometry,
    ) -> io::Result<(BitmapFile, Presence)> {
        let presence = Presence::new(geometry.blocks())?;
        let tmp = path.with_extension("bitmap.tmp");
        let mut file = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&encode(&geometry, digest))?;
        // Sparse: the block bytes read as zero, absent, until written.
        file.set_len(HEADER_LEN as u64 + geometry.blocks())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)?;
        Ok((BitmapFile { file, geometry }, presence))
    }

    /// Loads the bitmap at `path`; `None` when it is not a valid bitmap of `digest`, for
    /// example one torn by a crash during creation or left by another version.
    pub fn open(
        path: &Path,
        digest: &Digest,
        max_blob_size: u64,
    ) -> io::Result<Option<(BitmapFile, Presence)>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut head = [0u8; HEADER_LEN];
        if file.read_exact_at(&mut head, 0).is_err() {
            return Ok(None);
        }
        let Some((version, geometry)) = decode(&head, digest) else {
            return Ok(None);
        };
        if geometry.blob_size > max_blob_size {
            return Ok(None);
        }
        if version == VERSION_BITS {
            return BitmapFile::upgrade(path, &file, digest, geometry);
        }
        if file.metadata()?.len() != HEADER_LEN as u64 + geometry.blocks() {
            return Ok(None);
        }
        let mut presence = Presence::new(geometry.blocks())?;
        let mut buffer = vec![0u8; LOAD_STEP];
        let mut index = 0u64;
        while index < geometry.blocks() {
            let step = (geometry.blocks() - index).min(LOAD_STEP as u64) as usize;
            let piece = &mut buffer[..step];
            if file
                .read_exact_at(piece, HEADER_LEN as u64 + index)
                .is_err()
            {
                return Ok(None);
            }
            for (at, byte) in piece.iter().enumerate() {
                match byte {
                    0 => {}
                    1 => presence.set(index + at as u64, true),
                    _ => return Ok(None),
                }
            }
            index += step as u64;
        }
        Ok(Some((BitmapFile { file, geometry }, presence)))
    }

    /// Rewrites the version 1 bitmap `old` at `path` as version 2 with the same blocks
    /// present. A crash midway loses presence bits, never invents one: the new file starts
    /// all-absent, and its bytes are set only after it replaced the old one.
    fn upgrade(
        path: &Path,
        old: &File,
        digest: &Digest,
        geometry: BlockGeometry,
    ) -> io::Result<Option<(BitmapFile, Presence)>> {
        let mut bits = Presence::new(geometry.blocks())?;
        if old.metadata()?.len() != HEADER_LEN as u64 + bits.bits.len() as u64
            || old
                .read_exact_at(&mut bits.bits, HEADER_LEN as u64)
                .is_err()
        {
            return Ok(None);
        }
        let (file, mut presence) = BitmapFile::create(path, digest, geometry)?;
        for index in bits.iter().filter(|index| *index < geometry.blocks()) {
            file.file.write_all_at(&[1], HEADER_LEN as u64 + index)?;
            presence.set(index, true);
        }
        file.file.sync_data()?;
        Ok(Some((file, presence)))
    }

    pub fn geometry(&self) -> BlockGeometry {
        self.geometry
    }

    /// Writes block `index`'s byte and syncs it. The caller must hold the block (store or
    /// evict it) so that nobody else writes the same byte meanwhile.
    pub fn persist(&self, index: u64, present: bool) -> io::Result<()> {
        if index >= self.geometry.blocks() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "block out of range",
            ));
        }
        self.file
            .write_all_at(&[u8::from(present)], HEADER_LEN as u64 + index)?;
        self.file.sync_data()
    }
}

/// Presence bits in memory: one per block.
#[derive(Debug)]
pub struct Presence {
    bits: Vec<u8>,
    blocks: u64,
}

impl Presence {
    pub fn new(blocks: u64) -> io::Result<Presence> {
        let len = usize::try_from(blocks.div_ceil(8)).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "blob too large for a bitmap")
        })?;
        Ok(Presence {
            bits: vec![0; len],
            blocks,
        })
    }

    pub fn get(&self, index: u64) -> bool {
        let Ok(byte) = usize::try_from(index / 8) else {
            return false;
        };
        self.bits
            .get(byte)
            .is_some_and(|bits| bits & (1 << (index % 8)) != 0)
    }

    /// Sets bit `index`; out of range is ignored (nothing can be present there).
    pub fn set(&mut self, index: u64, present: bool) {
        if index >= self.blocks {
            return;
        }
        let (byte, mask) = ((index / 8) as usize, 1u8 << (index % 8));
        if present {
            self.bits[byte] |= mask;
        } else {
            self.bits[byte] &= !mask;
        }
    }

    /// Indices of the set bits, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, bits)| **bits != 0)
            .flat_map(|(byte, bits)| {
                (0..8)
                    .filter(move |bit| bits & (1 << bit) != 0)
                    .map(move |bit| byte as u64 * 8 + bit)
            })
    }

    /// Clears every bit, returning the indices that were set.
    pub fn take(&mut self) -> Vec<u64> {
        let set = self.iter().collect();
        self.bits.fill(0);
        set
    }
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
        let geometry = BlockGeometry::new(4096, 4096 * 9 + 1);
        let (file, _) = BitmapFile::create(&path, &digest, geometry).unwrap();
        assert_eq!(geometry.blocks(), 10);
        file.persist(0, true).unwrap();
        file.persist(9, true).unwrap();
        file.persist(3, true).unwrap();
        file.persist(3, false).unwrap();
        assert!(file.persist(10, true).is_err());
        drop(file);

        let (file, presence) = BitmapFile::open(&path, &digest, u64::MAX).unwrap().unwrap();
        assert_eq!(file.geometry(), geometry);
        assert_eq!(presence.iter().collect::<Vec<_>>(), vec![0, 9]);

        let other = Digest::of(b"other");
        assert!(BitmapFile::open(&path, &other, u64::MAX).unwrap().is_none());
        assert!(BitmapFile::open(&path, &digest, 100).unwrap().is_none());
        std::fs::write(&path, b"SHOALBM\0short").unwrap();
        assert!(BitmapFile::open(&path, &digest, u64::MAX)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_version_1_bitmap_is_upgraded_with_its_blocks_present() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::of(b"blob");
        let path = dir.path().join("x.bitmap");
        let geometry = BlockGeometry::new(4096, 4096 * 9 + 1);
        let mut old = encode(&geometry, &digest).to_vec();
        old[8..12].copy_from_slice(&VERSION_BITS.to_le_bytes());
        // Blocks 0, 3 and 9 present: bits 0 and 3 of byte 0, bit 1 of byte 1.
        old.extend_from_slice(&[0b0000_1001, 0b0000_0010]);
        std::fs::write(&path, &old).unwrap();

        let (file, presence) = BitmapFile::open(&path, &digest, u64::MAX).unwrap().unwrap();
        assert_eq!(presence.iter().collect::<Vec<_>>(), vec![0, 3, 9]);
        assert_eq!(file.geometry(), geometry);
        drop(file);
        let upgraded = std::fs::read(&path).unwrap();
        assert_eq!(upgraded[8..12], VERSION.to_le_bytes());
        assert_eq!(upgraded.len(), HEADER_LEN + 10);
        let (_, again) = BitmapFile::open(&path, &digest, u64::MAX).unwrap().unwrap();
        assert_eq!(again.iter().collect::<Vec<_>>(), vec![0, 3, 9]);

        // A version 1 file of the wrong length is refused, not half read.
        old.pop();
        std::fs::write(&path, &old).unwrap();
        assert!(BitmapFile::open(&path, &digest, u64::MAX)
            .unwrap()
            .is_none());
    }

    #[test]
    fn presence_bits_set_clear_and_drain() {
        let mut presence = Presence::new(20).unwrap();
        for index in [0, 7, 8, 19, 20, 400] {
            presence.set(index, true);
        }
        assert_eq!(presence.iter().collect::<Vec<_>>(), vec![0, 7, 8, 19]);
        presence.set(7, false);
        assert!(!presence.get(7) && presence.get(8) && !presence.get(20));
        assert_eq!(presence.take(), vec![0, 8, 19]);
        assert_eq!(presence.iter().count(), 0);
    }
}
