//! The in-memory filesystem tree of one eStargz layer, as a FUSE layer serves it: inodes with
//! attributes, sorted directories, symlink targets, xattrs, and each regular file's chunks
//! located in the blob.

mod assemble;
mod coverage;
mod tree;

use std::collections::BTreeMap;
use std::fmt;

use super::digest::Sha256Digest;
use super::toc::Toc;

/// Largest uncompressed chunk accepted from a TOC (the reference default is 4 MiB); bounds the
/// buffer a reader allocates per chunk.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Largest number of inodes (explicit plus implicit directories) an index may hold.
pub const MAX_NODES: usize = 2 * super::toc::MAX_TOC_ENTRIES;
/// Longest name component, in bytes: `NAME_MAX`, past which an ordinary unpack fails too.
pub const MAX_NAME_LEN: usize = 255;
/// Longest root-relative path or link target, in bytes: `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;
/// Deepest path, in components. No real image comes near; it bounds the work per entry.
pub const MAX_DEPTH: usize = 1024;
/// Hardlinks followed from one name to its file (a chain, not a cycle, as long as this).
pub const MAX_HARDLINK_CHAIN: usize = 64;
/// Most bytes deflate can expand one compressed byte into (258-byte matches at one bit
/// each): chunks claiming more data than their gzip members could hold are refused at open.
pub const MAX_DEFLATE_RATIO: u64 = 1032;

/// File type bits, as in `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;
pub const S_IFBLK: u32 = 0o060_000;
pub const S_IFIFO: u32 = 0o010_000;

/// Root-level file whose blob offset ends the prioritized (prefetch) region.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// Root-level file saying nothing is prioritized.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// Extended attribute marking an overlayfs opaque directory.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// An inode number; the root is [`Ino::ROOT`] and numbers are dense from there.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ino(u64);

impl Ino {
    pub const ROOT: Ino = Ino(1);

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The inode numbered `n` as the kernel hands it back.
    pub const fn new(n: u64) -> Self {
        Ino(n)
    }

    fn from_slot(slot: usize) -> Self {
        Ino(slot as u64 + 1)
    }

    fn slot(self) -> Option<usize> {
        usize::try_from(self.0).ok()?.checked_sub(1)
    }
}

impl fmt::Debug for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ino {}", self.0)
    }
}

/// Attributes of one inode, in `stat` terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    /// Permission bits plus file type bits (`S_IFREG`, ...).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Modification time in Unix seconds.
    pub mtime: i64,
    pub nlink: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
}

impl Attr {
    /// The device number in the kernel's 32-bit `new_encode_dev` form, as FUSE carries it.
    pub fn rdev(&self) -> u32 {
        (self.dev_minor & 0xff) | (self.dev_major << 8) | ((self.dev_minor & !0xff) << 12)
    }

    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
}

/// One piece of a regular file's data, located in the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the chunk starts in the file (`chunkOffset`).
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Start of the gzip member holding the chunk.
    pub blob_offset: u64,
    /// Start of the next distinct gzip member (or the TOC): fetch `blob_offset..blob_end`.
    pub blob_end: u64,
    /// Where the chunk starts inside the member's decompressed stream (`innerOffset`).
    pub inner_offset: u64,
    /// SHA-256 of the uncompressed chunk (`chunkDigest`, or the file's `digest` when it is
    /// one chunk): an index is only built when every chunk has one.
    pub digest: Sha256Digest,
}

/// A directory entry; directories keep these sorted by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub ino: Ino,
}

/// What an inode is, with the data each kind needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Directory {
        children: Vec<DirEntry>,
    },
    Regular {
        chunks: Vec<Chunk>,
    },
    Symlink {
        target: String,
    },
    /// Also how whiteouts are presented (device 0:0).
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One inode of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub attr: Attr,
    pub kind: NodeKind,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Directory holding the first name (hardlinks share the node); the root's is the root.
    /// Names are not kept per node, so memory stays linear in the TOC: see [`Index::path`].
    pub parent: Ino,
}

/// What the landmark files said about prefetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// No landmark: the producer said nothing.
    Unspecified,
    /// `.no.prefetch.landmark`: nothing is prioritized.
    Disabled,
    /// `.prefetch.landmark` at this blob offset: the bytes before it are prioritized.
    UpTo(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("entry name {name:?} contains a NUL byte")]
    InvalidName { name: String },
    #[error("name component of {len} bytes in {path:?} exceeds the {max}-byte limit")]
    NameTooLong {
        path: String,
        len: usize,
        max: usize,
    },
    #[error("path of {len} bytes starting {path:?} exceeds the {max}-byte limit")]
    PathTooLong {
        path: String,
        len: usize,
        max: usize,
    },
    #[error("path of {depth} components starting {path:?} exceeds the {max}-component limit")]
    TooDeep {
        path: String,
        depth: usize,
        max: usize,
    },
    #[error("chunk entry {index} does not follow a regular file")]
    OrphanChunk { index: usize },
    #[error("{path}: chunks do not cover the {size}-byte file contiguously at offset {at}")]
    ChunkLayout { path: String, size: u64, at: u64 },
    #[error("{path}: chunk of {size} bytes exceeds the {max}-byte limit")]
    ChunkTooLarge { path: String, size: u64, max: u64 },
    #[error(
        "{path}: chunk at file offset {file_offset} has no chunkDigest, so it cannot be verified"
    )]
    ChunkWithoutDigest { path: String, file_offset: u64 },
    #[error("{path}: data offset {offset} is not before the toc at {toc_offset}")]
    DataOffsetOutOfRange {
        path: String,
        offset: u64,
        toc_offset: u64,
    },
    #[error("{path}: chunk at file offset {file_offset} overlaps another chunk in the gzip member at blob offset {blob_offset}")]
    ChunksOverlap {
        path: String,
        file_offset: u64,
        blob_offset: u64,
    },
    #[error("{path}: chunks claim {claimed} bytes from the {compressed} compressed bytes at blob offset {blob_offset}, more than gzip can expand them to")]
    ChunkBeyondData {
        path: String,
        blob_offset: u64,
        claimed: u64,
        compressed: u64,
    },
    #[error("{path} is used both as a directory and as a non-directory")]
    PathConflict { path: String },
    #[error("root entry is not a directory")]
    RootNotDirectory,
    #[error("hardlink {path} points at {target:?}, which is not in the layer")]
    HardlinkTargetMissing { path: String, target: String },
    #[error("hardlink {path} points at directory {target:?}")]
    HardlinkToDirectory { path: String, target: String },
    #[error("hardlink {path} points at itself")]
    HardlinkToItself { path: String },
    #[error("hardlink {path} leads into a cycle of hardlinks at {target:?}")]
    HardlinkCycle { path: String, target: String },
    #[error("hardlink {path} is the start of a chain of more than {max} hardlinks")]
    HardlinkChainTooLong { path: String, max: usize },
    #[error("index would hold more than {max} inodes")]
    TooManyNodes { max: usize },
}

/// The filesystem tree of one layer.
#[derive(Debug, Clone)]
pub struct Index {
    nodes: Vec<Node>,
    prefetch: Prefetch,
}

impl Index {
    /// Builds the tree from a parsed TOC; `toc_offset` (from the footer) closes the last data
    /// member.
    pub fn new(toc: &Toc, toc_offset: u64) -> Result<Self, IndexError> {
        let index = assemble::assemble(toc, toc_offset)?;
        coverage::check(&index)?;
        Ok(index)
    }

    /// The root-relative path of the first name of `ino` (hardlinks share a node), for
    /// messages; `None` for an inode not in the tree.
    pub fn path(&self, ino: Ino) -> Option<String> {
        let mut names = Vec::new();
        let mut current = ino;
        while current != Ino::ROOT {
            let parent = self.node(current)?.parent;
            let entry = self.children(parent)?.iter().find(|e| e.ino == current)?;
            names.push(entry.name.as_str());
            // Parents are created before their children, so this climbs strictly.
            if names.len() > MAX_DEPTH {
                return None;
            }
            current = parent;
        }
        names.reverse();
        Some(names.join("/"))
    }

    pub fn root(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(ino.slot()?)
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        false // the root always exists
    }

    /// All inodes in inode order.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// A directory's entries sorted by name; `None` when `ino` is not a directory.
    pub fn children(&self, ino: Ino) -> Option<&[DirEntry]> {
        match &self.node(ino)?.kind {
            NodeKind::Directory { children } => Some(children),
            _ => None,
        }
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Option<Ino> {
        let children = self.children(parent)?;
        let i = children
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()?;
        Some(children[i].ino)
    }

    /// Resolves a `/`-separated path from the root without following symlinks.
    pub fn lookup_path(&self, path: &str) -> Option<Ino> {
        path.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .try_fold(Ino::ROOT, |dir, name| self.lookup(dir, name))
    }

    /// The chunks of regular file `ino` overlapping `offset..offset + len`, clipped to the file
    /// size (empty past the end); `None` when `ino` is not a regular file.
    pub fn chunks_for(&self, ino: Ino, offset: u64, len: u64) -> Option<&[Chunk]> {
        let node = self.node(ino)?;
        let NodeKind::Regular { chunks } = &node.kind else {
            return None;
        };
        let end = offset.saturating_add(len).min(node.attr.size);
        if offset >= end {
            return Some(&[]);
        }
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        let last = chunks.partition_point(|c| c.file_offset < end);
        Some(&chunks[first..last.max(first)])
    }

    pub fn prefetch(&self) -> Prefetch {
        self.prefetch
    }

    /// Blob offset of `.prefetch.landmark`: the bytes before it hold the prioritized files.
    pub fn prefetch_end(&self) -> Option<u64> {
        match self.prefetch {
            Prefetch::UpTo(offset) => Some(offset),
            Prefetch::Unspecified | Prefetch::Disabled => None,
        }
    }
}

#[cfg(test)]
mod tests;
