//! One cached blob on disk: a sparse data file the size of the blob, and its presence bitmap.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use nix::fcntl::{fallocate, FallocateFlags};

use super::bitmap::{sync_parent, Bitmap, BitmapHeader};
use crate::digest::Digest;

pub struct BlobFile {
    pub digest: Digest,
    pub header: BitmapHeader,
    data: File,
    data_path: PathBuf,
    bitmap: Mutex<Bitmap>,
    /// Bumped whenever a block is dropped, so that a reader can tell that bytes it read
    /// without holding a lock may have been punched out underneath it.
    evictions: AtomicU64,
}

impl BlobFile {
    pub fn data_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join(format!("{}.data", digest.hex()))
    }

    pub fn bitmap_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join(format!("{}.bitmap", digest.hex()))
    }

    /// Creates the files of a blob with no blocks present yet.
    pub fn create(dir: &Path, digest: &Digest, header: BitmapHeader) -> io::Result<BlobFile> {
        let data_path = BlobFile::data_path(dir, digest);
        let data = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)?;
        data.set_len(header.blob_size)?;
        // The data file first: a bitmap without its data file would claim blocks nobody has.
        sync_parent(&data_path)?;
        let bitmap = Bitmap::create(&BlobFile::bitmap_path(dir, digest), digest, header)?;
        Ok(BlobFile {
            digest: digest.clone(),
            header,
            data,
            data_path,
            bitmap: Mutex::new(bitmap),
            evictions: AtomicU64::new(0),
        })
    }

    /// Reopens a blob's files after a restart; `None` when they do not belong together.
    pub fn open(
        dir: &Path,
        digest: &Digest,
        block_size: u64,
        max_blob_size: u64,
    ) -> io::Result<Option<BlobFile>> {
        let bitmap_path = BlobFile::bitmap_path(dir, digest);
        let Some(bitmap) = Bitmap::open(&bitmap_path, digest, max_blob_size)? else {
            return Ok(None);
        };
        let header = bitmap.header();
        if header.block_size != block_size {
            return Ok(None);
        }
        let data_path = BlobFile::data_path(dir, digest);
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(data) => data,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        if data.metadata()?.len() != header.blob_size {
            return Ok(None);
        }
        Ok(Some(BlobFile {
            digest: digest.clone(),
            header,
            data,
            data_path,
            bitmap: Mutex::new(bitmap),
            evictions: AtomicU64::new(0),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.data_path
    }

    pub fn bitmap(&self) -> MutexGuard<'_, Bitmap> {
        self.bitmap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of block `index`; the last block may be short.
    pub fn block_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.header.block_size);
        self.header
            .blob_size
            .saturating_sub(start)
            .min(self.header.block_size)
    }

    pub fn blocks_of(&self, range: &Range<u64>) -> Range<u64> {
        if range.is_empty() {
            return 0..0;
        }
        range.start / self.header.block_size..(range.end - 1) / self.header.block_size + 1
    }

    /// Bytes `range` when every block under it is present, checked again after reading so
    /// that a concurrent eviction cannot slip zeros in.
    pub fn read_present(&self, range: Range<u64>) -> io::Result<Option<Bytes>> {
        let before = self.evictions.load(Ordering::SeqCst);
        let all_present = {
            let bitmap = self.bitmap();
            self.blocks_of(&range).all(|index| bitmap.get(index))
        };
        if !all_present {
            return Ok(None);
        }
        let mut buffer = vec![0u8; (range.end - range.start) as usize];
        self.data.read_exact_at(&mut buffer, range.start)?;
        if self.evictions.load(Ordering::SeqCst) != before {
            return Ok(None);
        }
        Ok(Some(Bytes::from(buffer)))
    }

    /// Writes block `index` and syncs it; the caller marks it present afterwards.
    pub fn write_block(&self, index: u64, bytes: &[u8]) -> io::Result<()> {
        let offset = index * self.header.block_size;
        self.data.write_all_at(bytes, offset)?;
        self.data.sync_data()
    }

    pub fn mark_present(&self, index: u64) -> io::Result<()> {
        self.bitmap().set(index, true)
    }

    /// Marks block `index` absent, durably. Its bytes may be punched out only afterwards, so
    /// that no reader, now or after a crash, can take the hole for data.
    pub fn clear_block(&self, index: u64) -> io::Result<()> {
        self.bitmap().set(index, false)?;
        self.evictions.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Returns block `index`'s disk space; its bit must already be clear.
    pub fn punch(&self, index: u64) -> io::Result<()> {
        let offset = index * self.header.block_size;
        let len = self.block_len(index);
        fallocate(
            self.data.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .map_err(io::Error::from)
    }

    /// Removes both files; for blobs with nothing present.
    pub fn remove_files(dir: &Path, digest: &Digest) {
        for path in [
            BlobFile::bitmap_path(dir, digest),
            BlobFile::data_path(dir, digest),
        ] {
            if let Err(error) = std::fs::remove_file(&path) {
                if error.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), %error, "cannot remove cache file");
                }
            }
        }
    }
}
