//! One cached blob on disk: a sparse data file the size of the blob, and its presence bitmap.
//! Its in-memory state (which blocks are present, which were read since the cache last
//! looked) sits under the blob's own lock, never held across I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use nix::fcntl::{fallocate, FallocateFlags};
use parking_lot::Mutex;

use super::bitmap::{sync_parent, BitmapFile, Presence};
use super::extents::Extents;
use super::geometry::BlockGeometry;
use crate::digest::Digest;

pub struct BlobFile {
    pub digest: Digest,
    pub geometry: BlockGeometry,
    data: File,
    data_path: PathBuf,
    bitmap: BitmapFile,
    blocks: Mutex<Blocks>,
    /// Bumped whenever a block is dropped, so that a reader can tell that bytes it read
    /// without holding a lock may have been punched out underneath it.
    evictions: AtomicU64,
}

struct Blocks {
    /// Durable blocks: a bit is set only after its block's bytes and byte are synced.
    present: Presence,
    /// Blocks read since the cache last took them into its eviction order: readers note
    /// them here so that a hit never takes the cache's own lock.
    touched: Presence,
    any_touched: bool,
    /// Written parts of blocks not present yet: readable while this process runs (the
    /// bytes are in the data file, synced or not), never recorded on disk, so a restart
    /// forgets them and cannot take an unwritten byte for data.
    partial: Extents,
}

impl BlobFile {
    pub fn data_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join(format!("{}.data", digest.hex()))
    }

    pub fn bitmap_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join(format!("{}.bitmap", digest.hex()))
    }

    /// Creates the files of a blob with no blocks present yet.
    pub fn create(dir: &Path, digest: &Digest, geometry: BlockGeometry) -> io::Result<BlobFile> {
        let data_path = BlobFile::data_path(dir, digest);
        let data = crate::private::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)?;
        data.set_len(geometry.blob_size)?;
        // The data file first: a bitmap without its data file would claim blocks nobody has.
        sync_parent(&data_path)?;
        let (bitmap, present) =
            BitmapFile::create(&BlobFile::bitmap_path(dir, digest), digest, geometry)?;
        BlobFile::new(digest, data, data_path, bitmap, present)
    }

    /// Reopens a blob's files after a restart; `None` when they do not belong together.
    pub fn open(
        dir: &Path,
        digest: &Digest,
        block_size: u64,
        max_blob_size: u64,
    ) -> io::Result<Option<BlobFile>> {
        let bitmap_path = BlobFile::bitmap_path(dir, digest);
        let Some((bitmap, present)) = BitmapFile::open(&bitmap_path, digest, max_blob_size)? else {
            return Ok(None);
        };
        let geometry = bitmap.geometry();
        if geometry.block_size != block_size {
            return Ok(None);
        }
        let data_path = BlobFile::data_path(dir, digest);
        let data = match OpenOptions::new().read(true).write(true).open(&data_path) {
            Ok(data) => data,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        if data.metadata()?.len() != geometry.blob_size {
            return Ok(None);
        }
        BlobFile::new(digest, data, data_path, bitmap, present).map(Some)
    }

    fn new(
        digest: &Digest,
        data: File,
        data_path: PathBuf,
        bitmap: BitmapFile,
        present: Presence,
    ) -> io::Result<BlobFile> {
        let geometry = bitmap.geometry();
        Ok(BlobFile {
            digest: digest.clone(),
            geometry,
            data,
            data_path,
            bitmap,
            blocks: Mutex::new(Blocks {
                present,
                touched: Presence::new(geometry.blocks())?,
                any_touched: false,
                partial: Extents::default(),
            }),
            evictions: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.data_path
    }

    pub fn is_present(&self, index: u64) -> bool {
        self.blocks.lock().present.get(index)
    }

    /// Indices of the present blocks.
    pub fn present(&self) -> Vec<u64> {
        self.blocks.lock().present.iter().collect()
    }

    /// Bytes `range` when every block under it is present or has the part of `range` it
    /// holds written, checked again after reading so that a concurrent eviction cannot slip
    /// zeros in. The blocks count as just used.
    pub fn read_present(&self, range: Range<u64>) -> io::Result<Option<Bytes>> {
        let before = self.evictions.load(Ordering::SeqCst);
        {
            let mut blocks = self.blocks.lock();
            let covering = self.geometry.covering(&range);
            let held = |blocks: &Blocks, index: u64| {
                let span = self.geometry.span(index);
                let part = span.start.max(range.start)..span.end.min(range.end);
                blocks.present.get(index) || blocks.partial.covers(index, &part)
            };
            if !covering.clone().all(|index| held(&blocks, index)) {
                return Ok(None);
            }
            for index in covering {
                blocks.touched.set(index, true);
            }
            blocks.any_touched = true;
        }
        let mut buffer = vec![0u8; (range.end - range.start) as usize];
        self.data.read_exact_at(&mut buffer, range.start)?;
        if self.evictions.load(Ordering::SeqCst) != before {
            return Ok(None);
        }
        Ok(Some(Bytes::from(buffer)))
    }

    /// The blocks read since the last call.
    pub fn take_touched(&self) -> Vec<u64> {
        let mut blocks = self.blocks.lock();
        if !std::mem::take(&mut blocks.any_touched) {
            return Vec::new();
        }
        blocks.touched.take()
    }

    /// Writes block `index` and syncs it; the caller marks it present afterwards.
    pub fn write_block(&self, index: u64, bytes: &[u8]) -> io::Result<()> {
        self.data.write_all_at(bytes, self.geometry.start(index))?;
        self.data.sync_data()
    }

    /// Makes block `index` present: its byte durably, then its bit. Its data must be durable
    /// already ([`write_block`](Self::write_block)).
    pub fn mark_present(&self, index: u64) -> io::Result<()> {
        self.bitmap.persist(index, true)?;
        let mut blocks = self.blocks.lock();
        blocks.present.set(index, true);
        blocks.partial.remove(index);
        Ok(())
    }

    /// Writes `bytes` at `range` (all within block `index`, not present) without syncing,
    /// then records them as a valid part of the block. The caller holds the block.
    pub fn write_extent(&self, index: u64, range: Range<u64>, bytes: &[u8]) -> io::Result<()> {
        self.data.write_all_at(bytes, range.start)?;
        let mut blocks = self.blocks.lock();
        if !blocks.present.get(index) {
            blocks.partial.add(index, range);
        }
        Ok(())
    }

    /// The parts of block `index` neither present nor written: all of it when nothing is.
    pub fn gaps(&self, index: u64) -> Vec<Range<u64>> {
        let blocks = self.blocks.lock();
        if blocks.present.get(index) {
            return Vec::new();
        }
        blocks.partial.gaps(index, self.geometry.span(index))
    }

    /// Forgets block `index`'s written parts, hiding them from readers at once; whether it
    /// had any. The caller holds the block, and may then punch its bytes out.
    pub fn drop_extents(&self, index: u64) -> bool {
        let dropped = self.blocks.lock().partial.remove(index);
        if dropped {
            self.evictions.fetch_add(1, Ordering::SeqCst);
        }
        dropped
    }

    /// Bytes written in blocks not present yet.
    pub fn partial_bytes(&self) -> u64 {
        self.blocks.lock().partial.bytes()
    }

    /// Hides block `index` from readers at once; [`persist_absent`](Self::persist_absent)
    /// then makes that durable, and only then may its bytes be punched out.
    pub fn hide(&self, index: u64) {
        self.blocks.lock().present.set(index, false);
        self.evictions.fetch_add(1, Ordering::SeqCst);
    }

    /// Writes block `index`'s byte as absent and syncs it; after [`hide`](Self::hide).
    pub fn persist_absent(&self, index: u64) -> io::Result<()> {
        self.bitmap.persist(index, false)
    }

    /// Returns block `index`'s disk space; its absence must already be durable, so that no
    /// reader, now or after a crash, can take the hole for data.
    pub fn punch(&self, index: u64) -> io::Result<()> {
        let span = self.geometry.span(index);
        fallocate(
            self.data.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            span.start as i64,
            (span.end - span.start) as i64,
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
