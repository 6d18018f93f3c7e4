//! The in-memory filesystem tree of one eStargz layer, as a FUSE layer serves it: inodes with
//! attributes, sorted directories, symlink targets, xattrs, and each regular file's chunks
//! located in the blob.

mod assemble;
mod coverage;
mod tree;

use std::collections::BTreeMap;
use std::fmt;

use super::digest::Sha256Digest;
use super::toc::{decode_toc_entries, Stopped, Toc, TocError, MAX_TOC_ENTRIES};
use assemble::Assembler;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub name: &'a str,
    pub ino: Ino,
}

/// The entries of one directory, sorted by name.
#[derive(Clone, Copy)]
pub struct Children<'a> {
    text: &'a str,
    entries: &'a [Dirent],
}

impl<'a> Children<'a> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<DirEntry<'a>> {
        self.entries.get(i).map(|d| d.view(self.text))
    }

    pub fn iter(&self) -> impl Iterator<Item = DirEntry<'a>> + 'a {
        let text = self.text;
        self.entries.iter().map(move |d| d.view(text))
    }

    fn find(&self, name: &str) -> Option<Ino> {
        let i = self
            .entries
            .binary_search_by(|d| d.name(self.text).cmp(name))
            .ok()?;
        Some(self.entries[i].ino())
    }
}

impl fmt::Debug for Children<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl PartialEq for Children<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Children<'_> {}

/// What an inode is, with the data each kind needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind<'a> {
    Directory {
        children: Children<'a>,
    },
    Regular {
        chunks: &'a [Chunk],
    },
    Symlink {
        target: &'a str,
    },
    /// Also how whiteouts are presented (device 0:0).
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One inode of the tree, as read out of the index's compact storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node<'a> {
    pub attr: Attr,
    pub kind: NodeKind<'a>,
    pub xattrs: &'a BTreeMap<String, Vec<u8>>,
    /// Directory holding the first name (hardlinks share the node); the root's is the root.
    /// Names are not kept per node, so memory stays linear in the TOC: see [`Index::path`].
    pub parent: Ino,
}

/// Where a node's variable-length data lies: its children in [`Index::dirents`], its chunks
/// in [`Index::chunks`] or its link target in [`Index::text`]; a device's numbers.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// One inode as stored: 48 bytes, its kind in the file type bits of `mode`.
#[derive(Debug, Clone)]
struct Inode {
    size: u64,
    mtime: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    parent: u32,
    data: Span,
}

const _: () = assert!(std::mem::size_of::<Inode>() == 48);

/// A directory entry as stored, in 12 bytes: its name in [`Index::text`] and the inode slot
/// it names.
#[derive(Debug, Clone, Copy)]
struct Dirent {
    name_start: u32,
    slot: u32,
    /// Names are at most [`MAX_NAME_LEN`] bytes.
    name_len: u8,
}

impl Dirent {
    fn name<'a>(&self, text: &'a str) -> &'a str {
        let start = self.name_start as usize;
        &text[start..start + usize::from(self.name_len)]
    }

    fn ino(&self) -> Ino {
        Ino::from_slot(self.slot as usize)
    }

    fn view<'a>(&self, text: &'a str) -> DirEntry<'a> {
        DirEntry {
            name: self.name(text),
            ino: self.ino(),
        }
    }
}

/// What nodes without extended attributes (nearly all) point at.
static NO_XATTRS: BTreeMap<String, Vec<u8>> = BTreeMap::new();

/// What the landmark files said about prefetching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// No landmark: the producer said nothing.
    #[default]
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
    #[error("names and link targets would take more than {max} bytes")]
    TextTooLarge { max: u64 },
}

/// The filesystem tree of one layer, stored compactly: fixed-size inodes, every name and link
/// target in one text arena, every directory's entries and every file's chunks in one list
/// each, addressed by `u32` positions.
#[derive(Debug, Clone)]
pub struct Index {
    inodes: Vec<Inode>,
    /// Grouped by directory, each group sorted by name.
    dirents: Vec<Dirent>,
    chunks: Vec<Chunk>,
    text: String,
    /// The few nodes with extended attributes, sorted by slot.
    xattrs: Vec<(u32, BTreeMap<String, Vec<u8>>)>,
    prefetch: Prefetch,
}

/// Why [`Index::from_toc_json`] failed: the JSON, or the tree it describes.
#[derive(Debug, thiserror::Error)]
pub enum OpenIndexError {
    #[error("decode toc")]
    Decode {
        #[source]
        source: TocError,
    },
    #[error("build file index")]
    Build {
        #[source]
        source: IndexError,
    },
}

impl Index {
    /// Builds the tree from a parsed TOC; `toc_offset` (from the footer) closes the last data
    /// member.
    pub fn new(toc: &Toc, toc_offset: u64) -> Result<Self, IndexError> {
        if toc.entries.len() > MAX_TOC_ENTRIES {
            return Err(IndexError::TooManyNodes {
                max: MAX_TOC_ENTRIES,
            });
        }
        let mut assembler = Assembler::default();
        for entry in &toc.entries {
            assembler.push(entry)?;
        }
        Self::checked(assembler.finish(toc_offset)?)
    }

    /// Builds the tree from TOC JSON as it is decoded, one entry at a time: the entries are
    /// never all held, only what the tree keeps of them. The caller checks the JSON's digest.
    pub fn from_toc_json(json: &[u8], toc_offset: u64) -> Result<Self, OpenIndexError> {
        let mut assembler = Assembler::default();
        decode_toc_entries(json, MAX_TOC_ENTRIES, &mut |entry| assembler.push(&entry)).map_err(
            |stop| match stop {
                Stopped::Decode(source) => OpenIndexError::Decode { source },
                Stopped::Visit(source) => OpenIndexError::Build { source },
            },
        )?;
        let built = assembler
            .finish(toc_offset)
            .and_then(Self::checked)
            .map_err(|source| OpenIndexError::Build { source })?;
        Ok(built)
    }

    fn checked(index: Index) -> Result<Self, IndexError> {
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
            names.push(entry.name);
            // Parents are created before their children, so this climbs strictly.
            if names.len() > MAX_DEPTH {
                return None;
            }
            current = parent;
        }
        names.reverse();
        Some(names.join("/"))
    }

    pub fn root(&self) -> Node<'_> {
        self.view(0)
    }

    pub fn node(&self, ino: Ino) -> Option<Node<'_>> {
        let slot = ino.slot().filter(|&s| s < self.inodes.len())?;
        Some(self.view(slot))
    }

    fn view(&self, slot: usize) -> Node<'_> {
        let inode = &self.inodes[slot];
        let data = inode.data;
        let (dev_major, dev_minor) = match inode.mode & S_IFMT {
            S_IFCHR | S_IFBLK => (data.start, data.len),
            _ => (0, 0),
        };
        let kind = match inode.mode & S_IFMT {
            S_IFDIR => NodeKind::Directory {
                children: Children {
                    text: &self.text,
                    entries: &self.dirents[data.range()],
                },
            },
            S_IFREG => NodeKind::Regular {
                chunks: &self.chunks[data.range()],
            },
            S_IFLNK => NodeKind::Symlink {
                target: &self.text[data.range()],
            },
            S_IFCHR => NodeKind::CharDevice,
            S_IFBLK => NodeKind::BlockDevice,
            _ => NodeKind::Fifo,
        };
        let xattrs = match self
            .xattrs
            .binary_search_by_key(&(slot as u32), |(s, _)| *s)
        {
            Ok(i) => &self.xattrs[i].1,
            Err(_) => &NO_XATTRS,
        };
        Node {
            attr: Attr {
                ino: Ino::from_slot(slot),
                mode: inode.mode,
                uid: inode.uid,
                gid: inode.gid,
                size: inode.size,
                mtime: inode.mtime,
                nlink: inode.nlink,
                dev_major,
                dev_minor,
            },
            kind,
            xattrs,
            parent: Ino::from_slot(inode.parent as usize),
        }
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.inodes.len()
    }

    pub fn is_empty(&self) -> bool {
        false // the root always exists
    }

    /// All inodes in inode order.
    pub fn nodes(&self) -> impl Iterator<Item = Node<'_>> {
        (0..self.inodes.len()).map(|slot| self.view(slot))
    }

    /// A directory's entries sorted by name; `None` when `ino` is not a directory.
    pub fn children(&self, ino: Ino) -> Option<Children<'_>> {
        match self.node(ino)?.kind {
            NodeKind::Directory { children } => Some(children),
            _ => None,
        }
    }

    pub fn lookup(&self, parent: Ino, name: &str) -> Option<Ino> {
        self.children(parent)?.find(name)
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
        let NodeKind::Regular { chunks } = node.kind else {
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
