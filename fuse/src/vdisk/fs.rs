//! The FUSE filesystem of a virtual disk: a root directory holding one read-only file. Reads
//! answer on the FUSE thread when the cache holds every block; otherwise the reply moves into a
//! task on the daemon's runtime, so the FUSE thread never waits on the network.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use shoal_fetcher::{BlobRead, Histogram};
use tokio::runtime::Handle;
use tracing::warn;

use super::replay::DiskRecording;
use super::{VirtualDisk, DISK_FILE};
use crate::connection::ConnectionRecord;

/// The disk never changes, so the kernel may keep entries and attributes as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);
const ROOT: INodeNo = INodeNo(1);
const DISK: INodeNo = INodeNo(2);

pub struct DiskFs {
    disk: Arc<VirtualDisk>,
    blobs: Arc<dyn BlobRead>,
    runtime: Handle,
    record: ConnectionRecord,
    /// Each FUSE read's time from request to reply.
    read_latency: Arc<Histogram>,
    /// The first start's reads, while learned prefetch records them.
    recording: Option<Arc<DiskRecording>>,
}

impl DiskFs {
    pub fn new(
        disk: Arc<VirtualDisk>,
        blobs: Arc<dyn BlobRead>,
        runtime: Handle,
        record: ConnectionRecord,
        read_latency: Arc<Histogram>,
        recording: Option<Arc<DiskRecording>>,
    ) -> DiskFs {
        DiskFs {
            disk,
            blobs,
            runtime,
            record,
            read_latency,
            recording,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o555, 0, 2),
            DISK => (FileType::RegularFile, 0o444, self.disk.size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            // The disk is sparse: report what the layers hold, not the virtual size.
            blocks: 0,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.record.init.record(config);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.record.resent.note(req);
        if parent != ROOT || name != DISK_FILE {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(DISK) {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.record.resent.note(req);
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.record.resent.note(req);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match ino {
            // The page cache may keep what it read: the content never changes.
            DISK => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    /// Nothing is ever written, so a close has nothing to flush.
    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.record.resent.note(req);
        reply.ok();
    }

    /// Read-only: there is nothing to make durable. The kernel asks anyway (an ext4 journal
    /// replay check, `sync` in a container), and fuser's default answers with a warning.
    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.record.resent.note(req);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.record.resent.note(req);
        reply.ok();
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.record.resent.note(req);
        if ino != DISK {
            return reply.error(Errno::EISDIR);
        }
        let started = Instant::now();
        let recording = self.recording.as_ref().filter(|r| r.is_active());
        let noted = |steps: &[_]| {
            if let Some(recording) = recording {
                recording.note(&self.disk, steps);
            }
        };
        let pending = match self
            .disk
            .begin_read_noting(&*self.blobs, offset, size.into(), noted)
        {
            Ok(bytes) => {
                reply.data(&bytes);
                self.read_latency.observe(started.elapsed());
                return;
            }
            Err(pending) => pending,
        };
        let disk = self.disk.clone();
        let blobs = self.blobs.clone();
        let read_latency = self.read_latency.clone();
        self.runtime.spawn(async move {
            match disk.finish_read(&*blobs, pending).await {
                Ok(bytes) => reply.data(&bytes),
                Err(err) => {
                    warn!(offset, len = size, error = %shoal_fetcher::with_causes(&err), "virtual disk read failed");
                    reply.error(err.errno());
                }
            }
            read_latency.observe(started.elapsed());
        });
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.record.resent.note(req);
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(child, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.record.resent.note(req);
        reply.statfs(self.disk.size().div_ceil(4096), 0, 0, 2, 0, 4096, 255, 4096);
    }
}
