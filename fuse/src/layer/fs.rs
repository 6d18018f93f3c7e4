//! The FUSE filesystem of one eStargz layer. Metadata is answered from the in-memory index on
//! the FUSE thread; reads answer there too when the cache holds the bytes, and otherwise move
//! the reply into a task on the daemon's runtime, so the FUSE thread never waits on the network.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;
use tracing::warn;

use super::{ChunkReader, EstargzLayer};
use crate::connection::ConnectionRecord;
use crate::learn::Recorder;
use shoal_formats::estargz::{self, Index, Ino, NodeKind};

/// Layers never change, so the kernel may keep entries and attributes for as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);

pub struct LayerFs {
    /// Shared with the tasks of reads that miss, instead of copied into each.
    layer: Arc<EstargzLayer>,
    reader: Arc<ChunkReader>,
    runtime: Handle,
    record: ConnectionRecord,
    /// Notes the chunks reads touch while this layer records a trace.
    recorder: Option<Arc<Recorder>>,
}

impl LayerFs {
    pub fn new(
        layer: EstargzLayer,
        reader: Arc<ChunkReader>,
        runtime: Handle,
        record: ConnectionRecord,
        recorder: Option<Arc<Recorder>>,
    ) -> LayerFs {
        LayerFs {
            layer: Arc::new(layer),
            reader,
            runtime,
            record,
            recorder,
        }
    }

    fn index(&self) -> &Index {
        &self.layer.index
    }

    fn attr(&self, ino: Ino) -> Option<FileAttr> {
        let node = self.index().node(ino)?;
        let a = &node.attr;
        let kind = match node.kind {
            NodeKind::Directory { .. } => FileType::Directory,
            NodeKind::Regular { .. } => FileType::RegularFile,
            NodeKind::Symlink { .. } => FileType::Symlink,
            NodeKind::CharDevice => FileType::CharDevice,
            NodeKind::BlockDevice => FileType::BlockDevice,
            NodeKind::Fifo => FileType::NamedPipe,
        };
        let mtime = if a.mtime >= 0 {
            UNIX_EPOCH + Duration::from_secs(a.mtime as u64)
        } else {
            UNIX_EPOCH
        };
        Some(FileAttr {
            ino: INodeNo(ino.get()),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev(),
            blksize: 4096,
            flags: 0,
        })
    }
}

fn ino(n: INodeNo) -> Ino {
    Ino::new(n.0)
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.record.init.record(config);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.record.resent.note(req);
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self
            .index()
            .lookup(ino(parent), name)
            .and_then(|child| self.attr(child))
        {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, n: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.record.resent.note(req);
        match self.attr(ino(n)) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, req: &Request, n: INodeNo, reply: ReplyData) {
        self.record.resent.note(req);
        match self.index().node(ino(n)).map(|node| node.kind) {
            Some(NodeKind::Symlink { target }) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, req: &Request, n: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.record.resent.note(req);
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.index().node(ino(n)) {
            // The page cache may keep what it read: the content never changes.
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Nothing is ever written, so a close has nothing to flush (fuser's default answers
    /// ENOSYS with a warning on every mount).
    fn flush(
        &self,
        req: &Request,
        _n: INodeNo,
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
        _n: INodeNo,
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
        _n: INodeNo,
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
        n: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.record.resent.note(req);
        let ino = ino(n);
        let blob = &self.layer.blob;
        let started = Instant::now();
        if let Some(recorder) = self.recorder.as_ref().filter(|r| r.is_active()) {
            if let Some(chunks) = self.index().chunks_for(ino, offset, size.into()) {
                let parts = chunks.iter().map(|chunk| {
                    let bytes = chunk.blob_end - chunk.blob_offset;
                    ((ino.get(), chunk.file_offset), bytes)
                });
                recorder.note(parts);
            }
        }
        let pending = match self
            .reader
            .read_cached(blob, self.index(), ino, offset, size.into())
        {
            Ok(bytes) => {
                reply.data(&bytes);
                self.reader.observe_read(started.elapsed());
                return;
            }
            Err(pending) => pending,
        };
        let layer = self.layer.clone();
        let reader = self.reader.clone();
        self.runtime.spawn(async move {
            match reader
                .read_pending(&layer.blob, &layer.index, ino, pending)
                .await
            {
                Ok(bytes) => reply.data(&bytes),
                Err(err) => {
                    warn!(blob = %layer.blob.digest, error = %shoal_fetcher::with_causes(&err), "read failed");
                    reply.error(err.errno());
                }
            }
            reader.observe_read(started.elapsed());
        });
    }

    fn readdir(
        &self,
        req: &Request,
        n: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.record.resent.note(req);
        let dir = ino(n);
        let Some(children) = self.index().children(dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [(".", dir), ("..", dir)];
        let entries = dots
            .into_iter()
            .chain(children.iter().map(|c| (c.name, c.ino)));
        for (i, (name, child)) in entries.enumerate().skip(offset as usize) {
            let kind = self
                .attr(child)
                .map(|a| a.kind)
                .unwrap_or(FileType::RegularFile);
            if reply.add(INodeNo(child.get()), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, _n: INodeNo, reply: ReplyStatfs) {
        self.record.resent.note(req);
        let files = self.index().len() as u64;
        let blocks = self.layer.blob.size.div_ceil(4096);
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, req: &Request, n: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.record.resent.note(req);
        let Some(node) = self.index().node(ino(n)) else {
            return reply.error(Errno::ENOENT);
        };
        match name.to_str().and_then(|name| node.xattrs.get(name)) {
            Some(value) => xattr_reply(reply, size, value),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, req: &Request, n: INodeNo, size: u32, reply: ReplyXattr) {
        self.record.resent.note(req);
        let Some(node) = self.index().node(ino(n)) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for name in node.xattrs.keys() {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        xattr_reply(reply, size, &names);
    }
}

/// Seconds since the epoch, for the "mounted at" log line.
pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// The index's mode bits and fuser's file types must agree on what a whiteout is.
const _: () = assert!(estargz::index::S_IFCHR == libc::S_IFCHR);
