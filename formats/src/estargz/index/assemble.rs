//! Turning TOC entries into an [`Index`]: name cleaning, chunk grouping, whiteouts, landmarks,
//! implicit directories and hardlinks.
//!
//! Entries arrive one at a time ([`Assembler::push`]) and each is kept only as what the tree
//! needs of it (an [`Item`], its path in one text arena, its chunks' locations), because later
//! entries may replace earlier ones of the same name: the tree is made once all are in.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::tree::{Payload, Tree, DIR_SIZE};
use super::{
    Attr, Chunk, Index, IndexError, Ino, Prefetch, Span, MAX_CHUNK_SIZE, MAX_DEPTH,
    MAX_HARDLINK_CHAIN, MAX_NAME_LEN, MAX_PATH_LEN, NO_PREFETCH_LANDMARK, OPAQUE_XATTR,
    PREFETCH_LANDMARK, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
};
use crate::estargz::digest::Sha256Digest;
use crate::estargz::entry_name::{clean_entry_name, split_parent};
use crate::estargz::modtime::parse_modtime;
use crate::estargz::toc::{EntryType, TocEntry};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// How much of an over-long name an error message quotes.
const QUOTED: usize = 128;

/// What the tree needs of one TOC entry after name cleaning: 56 bytes.
struct Item {
    /// Path the entry is presented at (for whiteouts, the name they hide), in `paths`.
    path: Span,
    /// What the kind needs besides attributes: a regular file's data pieces (its own, then
    /// its chunk entries') in `pieces`; a link's `linkName` in `paths`; a device's numbers.
    data: Span,
    size: u64,
    mtime: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    /// One more than the position of its xattrs in `xattrs`; 0 for none.
    xattrs: u32,
    kind: EntryType,
    whiteout: bool,
    /// Whether the entry is part of the tree at all (landmarks and opaque markers are not).
    named: bool,
    /// The first piece's digest is the file's `digest`, which verifies a one-chunk file only.
    digest_from_file: bool,
}

const _: () = assert!(std::mem::size_of::<Item>() == 56);

/// Where one chunk of a file's data lies, as the TOC says.
struct Piece {
    chunk_offset: u64,
    chunk_size: u64,
    offset: u64,
    inner_offset: u64,
    digest: Option<Sha256Digest>,
}

impl Piece {
    fn of(entry: &TocEntry, digest: Option<Sha256Digest>) -> Self {
        Piece {
            chunk_offset: entry.chunk_offset,
            chunk_size: entry.chunk_size,
            offset: entry.offset,
            inner_offset: entry.inner_offset,
            digest,
        }
    }
}

/// Collects TOC entries, in order, for [`Assembler::finish`] to make the tree of.
#[derive(Default)]
pub(super) struct Assembler {
    items: Vec<Item>,
    paths: String,
    pieces: Vec<Piece>,
    /// Blob offsets where data gzip members start.
    member_starts: Vec<u64>,
    xattrs: Vec<BTreeMap<String, Vec<u8>>>,
    opaque_dirs: Vec<Span>,
    prefetch: Prefetch,
    last_was_reg: bool,
    seen: usize,
}

impl Assembler {
    /// Takes the next TOC entry; refuses one that no tree could hold whatever follows.
    pub(super) fn push(&mut self, entry: &TocEntry) -> Result<(), IndexError> {
        let index = self.seen;
        self.seen += 1;
        if entry.kind == EntryType::Chunk {
            match self.items.last_mut() {
                Some(item) if self.last_was_reg => {
                    self.member_starts.push(entry.offset);
                    if item.size > 0 {
                        self.pieces.push(Piece::of(entry, entry.chunk_digest));
                        item.data.len += 1;
                    }
                }
                _ => return Err(IndexError::OrphanChunk { index }),
            }
            return Ok(());
        }
        if entry.name.contains('\0') || entry.link_name.contains('\0') {
            return Err(IndexError::InvalidName {
                name: quote(&entry.name),
            });
        }
        let path = clean_entry_name(&entry.name);
        check_path(&path)?;
        if matches!(entry.kind, EntryType::Symlink | EntryType::Hardlink)
            && entry.link_name.len() > MAX_PATH_LEN
        {
            return Err(IndexError::PathTooLong {
                path: quote(&entry.link_name),
                len: entry.link_name.len(),
                max: MAX_PATH_LEN,
            });
        }
        // An entry that is not part of the tree still owns the chunk entries after it.
        self.last_was_reg = entry.kind == EntryType::Reg;
        let (parent, base) = split_parent(&path);
        let mut named = true;
        let mut whiteout = false;
        let presented = if path == PREFETCH_LANDMARK {
            self.prefetch = Prefetch::UpTo(entry.offset);
            named = false;
            Span::default()
        } else if path == NO_PREFETCH_LANDMARK {
            self.prefetch = Prefetch::Disabled;
            named = false;
            Span::default()
        } else if base == OPAQUE_WHITEOUT {
            let dir = self.push_path(parent);
            self.opaque_dirs.push(dir);
            named = false;
            Span::default()
        } else if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            whiteout = true;
            // A bare ".wh." hides nothing nameable.
            named = !hidden.is_empty();
            match (named, parent.is_empty()) {
                (false, _) => Span::default(),
                (true, true) => self.push_path(hidden),
                (true, false) => self.push_path(&format!("{parent}/{hidden}")),
            }
        } else {
            self.push_path(&path)
        };
        let has_data = entry.kind == EntryType::Reg && entry.size > 0;
        let digest = entry.chunk_digest.or(entry.digest);
        let data = match entry.kind {
            EntryType::Reg if has_data => {
                self.member_starts.push(entry.offset);
                self.pieces.push(Piece::of(entry, digest));
                Span {
                    start: self.pieces.len() as u32 - 1,
                    len: 1,
                }
            }
            EntryType::Symlink | EntryType::Hardlink => self.push_path(&entry.link_name),
            EntryType::Char | EntryType::Block => Span {
                start: entry.dev_major,
                len: entry.dev_minor,
            },
            _ => Span::default(),
        };
        let xattrs = if entry.xattrs.is_empty() {
            0
        } else {
            self.xattrs.push(entry.xattrs.clone());
            self.xattrs.len() as u32
        };
        self.items.push(Item {
            path: presented,
            data,
            size: entry.size,
            mtime: parse_modtime(&entry.mod_time).unwrap_or(0),
            mode: entry.mode as u32 & 0o7777,
            uid: entry.uid,
            gid: entry.gid,
            xattrs,
            kind: entry.kind,
            whiteout,
            named,
            digest_from_file: has_data && entry.chunk_digest.is_none() && digest.is_some(),
        });
        Ok(())
    }

    fn push_path(&mut self, path: &str) -> Span {
        // Paths are at most MAX_PATH_LEN bytes and entries at most MAX_TOC_ENTRIES: the arena
        // stays far below 4 GiB.
        let start = self.paths.len() as u32;
        self.paths.push_str(path);
        Span {
            start,
            len: path.len() as u32,
        }
    }

    fn text(&self, span: Span) -> &str {
        &self.paths[span.range()]
    }

    fn xattrs_of(&self, item: &Item) -> BTreeMap<String, Vec<u8>> {
        match item.xattrs {
            0 => BTreeMap::new(),
            n => self.xattrs[n as usize - 1].clone(),
        }
    }

    /// Makes the tree of the entries pushed; `toc_offset` closes the last data member.
    pub(super) fn finish(mut self, toc_offset: u64) -> Result<Index, IndexError> {
        self.member_starts.sort_unstable();
        self.member_starts.dedup();
        self.member_starts.shrink_to_fit();
        let winners = Winners::of(&self);
        let items = &self.items;
        let root = winners.get(&self, "").map(|i| &items[i]);
        let order = winners.in_toc_order(&self);
        let mut tree = match root {
            Some(item) if item.kind != EntryType::Dir => return Err(IndexError::RootNotDirectory),
            Some(item) => {
                Tree::with_root(attr_of(item, S_IFDIR), self.xattrs_of(item), order.len())
            }
            None => Tree::with_root(Tree::implicit_dir_attr(), BTreeMap::new(), order.len()),
        };

        // Directories first so that implicit parents never shadow an explicit entry's attributes.
        for &i in &order {
            let item = &items[i as usize];
            if item.kind == EntryType::Dir && !item.whiteout {
                let slot = tree.ensure_dir(self.text(item.path))?;
                tree.set_dir(slot, attr_of(item, S_IFDIR), self.xattrs_of(item));
            }
        }
        let mut chunks = Vec::new();
        for &i in &order {
            let item = &items[i as usize];
            if (item.kind == EntryType::Dir && !item.whiteout) || item.kind == EntryType::Hardlink {
                continue;
            }
            let path = self.text(item.path);
            let xattrs = self.xattrs_of(item);
            if item.whiteout {
                let attr = Attr {
                    mode: S_IFCHR,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    dev_major: 0,
                    dev_minor: 0,
                    ..attr_of(item, S_IFCHR)
                };
                tree.add(path, attr, xattrs, Payload::None)?;
                continue;
            }
            let (attr, payload) = match item.kind {
                EntryType::Reg => {
                    self.chunks_of(item, toc_offset, &mut chunks)?;
                    (attr_of(item, S_IFREG), Payload::Chunks(&chunks))
                }
                EntryType::Symlink => (
                    Attr {
                        size: u64::from(item.data.len),
                        ..attr_of(item, S_IFLNK)
                    },
                    Payload::Target(self.text(item.data)),
                ),
                EntryType::Char => (attr_of(item, S_IFCHR), Payload::None),
                EntryType::Block => (attr_of(item, S_IFBLK), Payload::None),
                EntryType::Fifo => (attr_of(item, S_IFIFO), Payload::None),
                // Directories and hardlinks are handled apart; chunks are not items.
                EntryType::Dir | EntryType::Hardlink | EntryType::Chunk => {
                    return Err(IndexError::PathConflict {
                        path: path.to_owned(),
                    })
                }
            };
            tree.add(path, attr, xattrs, payload)?;
        }
        for &i in &order {
            let item = &items[i as usize];
            if item.kind == EntryType::Hardlink && !item.whiteout {
                let target = self.resolve_hardlink(item, &winners)?;
                tree.link(self.text(item.path), &target)?;
            }
        }
        for &dir in &self.opaque_dirs {
            let slot = tree.ensure_dir(self.text(dir))?;
            tree.add_xattr(slot, OPAQUE_XATTR, b"y");
        }
        // What the entries were is not needed to lay the tree out: let it go first.
        let prefetch = self.prefetch;
        drop((order, winners, self));
        tree.finish(prefetch)
    }

    fn resolve_hardlink(&self, item: &Item, winners: &Winners) -> Result<String, IndexError> {
        let path = self.text(item.path);
        let mut current = item;
        let mut visited: Vec<&str> = vec![path];
        for _ in 0..MAX_HARDLINK_CHAIN {
            let target = clean_entry_name(self.text(current.data));
            if visited.contains(&target.as_str()) {
                let path = path.to_owned();
                return Err(if visited.len() == 1 {
                    IndexError::HardlinkToItself { path }
                } else {
                    IndexError::HardlinkCycle { path, target }
                });
            }
            let missing = || IndexError::HardlinkTargetMissing {
                path: path.to_owned(),
                target: target.clone(),
            };
            let i = winners.get(self, &target).ok_or_else(missing)?;
            let found = &self.items[i];
            match found.kind {
                EntryType::Hardlink if !found.whiteout => {
                    visited.push(self.text(found.path));
                    current = found;
                }
                EntryType::Dir if !found.whiteout => {
                    return Err(IndexError::HardlinkToDirectory {
                        path: path.to_owned(),
                        target,
                    })
                }
                _ => return Ok(target),
            }
        }
        Err(IndexError::HardlinkChainTooLong {
            path: path.to_owned(),
            max: MAX_HARDLINK_CHAIN,
        })
    }

    /// The chunks of regular file `item`, into `chunks` (emptied first).
    fn chunks_of(
        &self,
        item: &Item,
        toc_offset: u64,
        chunks: &mut Vec<Chunk>,
    ) -> Result<(), IndexError> {
        chunks.clear();
        if item.size == 0 {
            return Ok(());
        }
        let path = || self.text(item.path).to_owned();
        let layout_error = |at| IndexError::ChunkLayout {
            path: path(),
            size: item.size,
            at,
        };
        let pieces = &self.pieces[item.data.range()];
        let mut expected_offset = 0u64;
        for (n, piece) in pieces.iter().enumerate() {
            if piece.chunk_offset != expected_offset || expected_offset >= item.size {
                return Err(layout_error(piece.chunk_offset));
            }
            let size = match piece.chunk_size {
                0 => item.size - piece.chunk_offset,
                size => size,
            };
            // The reader skips `inner_offset` decompressed bytes: bounded like a chunk.
            if size > MAX_CHUNK_SIZE || piece.inner_offset > MAX_CHUNK_SIZE {
                return Err(IndexError::ChunkTooLarge {
                    path: path(),
                    size: size.max(piece.inner_offset),
                    max: MAX_CHUNK_SIZE,
                });
            }
            if piece.offset >= toc_offset {
                return Err(IndexError::DataOffsetOutOfRange {
                    path: path(),
                    offset: piece.offset,
                    toc_offset,
                });
            }
            let next = self.member_starts.partition_point(|&s| s <= piece.offset);
            let blob_end = self
                .member_starts
                .get(next)
                .copied()
                .unwrap_or(toc_offset)
                .min(toc_offset);
            // A whole-file digest stands in for the chunk digest of an unchunked file (legacy
            // TOCs). Without one, bytes would reach containers unchecked: such a TOC is not
            // mounted.
            let from_file = n == 0 && item.digest_from_file;
            let digest = piece
                .digest
                .filter(|_| !from_file || pieces.len() == 1)
                .ok_or(IndexError::ChunkWithoutDigest {
                    path: path(),
                    file_offset: piece.chunk_offset,
                })?;
            chunks.push(Chunk {
                file_offset: piece.chunk_offset,
                size,
                blob_offset: piece.offset,
                blob_end,
                inner_offset: piece.inner_offset,
                digest,
            });
            expected_offset = piece
                .chunk_offset
                .checked_add(size)
                .filter(|&end| end <= item.size)
                .ok_or_else(|| layout_error(piece.chunk_offset))?;
        }
        if expected_offset != item.size {
            return Err(layout_error(expected_offset));
        }
        Ok(())
    }
}

/// Cleaned path -> the item presented there: later entries win, but a real entry is never
/// hidden by a whiteout of the same name. Holds positions in `items`, hashed by path.
struct Winners {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl Winners {
    fn of(assembler: &Assembler) -> Self {
        let hasher = RandomState::new();
        let items = &assembler.items;
        // Sized once: growing would hash every path again.
        let mut table: HashTable<u32> =
            HashTable::with_capacity(items.iter().filter(|item| item.named).count());
        let path_of = |i: u32| assembler.text(items[i as usize].path);
        for (slot, item) in items.iter().enumerate().filter(|(_, item)| item.named) {
            let path = assembler.text(item.path);
            let hash = hasher.hash_one(path);
            match table.find_mut(hash, |&i| path_of(i) == path) {
                Some(old) if item.whiteout && !items[*old as usize].whiteout => {}
                Some(old) => *old = slot as u32,
                None => {
                    table.insert_unique(hash, slot as u32, |&i| hasher.hash_one(path_of(i)));
                }
            }
        }
        Winners { table, hasher }
    }

    fn get(&self, assembler: &Assembler, path: &str) -> Option<usize> {
        let items = &assembler.items;
        self.table
            .find(self.hasher.hash_one(path), |&i| {
                assembler.text(items[i as usize].path) == path
            })
            .map(|&i| i as usize)
    }

    /// The winners other than the root, in TOC order.
    fn in_toc_order(&self, assembler: &Assembler) -> Vec<u32> {
        let mut order: Vec<u32> = self
            .table
            .iter()
            .copied()
            .filter(|&i| assembler.items[i as usize].path.len > 0)
            .collect();
        order.sort_unstable();
        order
    }
}

/// Refuses names an ordinary unpack could not create, and depths no image needs.
fn check_path(path: &str) -> Result<(), IndexError> {
    if path.len() > MAX_PATH_LEN {
        return Err(IndexError::PathTooLong {
            path: quote(path),
            len: path.len(),
            max: MAX_PATH_LEN,
        });
    }
    let mut depth = 0;
    for name in path.split('/').filter(|name| !name.is_empty()) {
        depth += 1;
        if name.len() > MAX_NAME_LEN {
            return Err(IndexError::NameTooLong {
                path: quote(path),
                len: name.len(),
                max: MAX_NAME_LEN,
            });
        }
    }
    if depth > MAX_DEPTH {
        return Err(IndexError::TooDeep {
            path: quote(path),
            depth,
            max: MAX_DEPTH,
        });
    }
    Ok(())
}

/// The start of `text`, for messages about names that may be megabytes long.
fn quote(text: &str) -> String {
    text.chars().take(QUOTED).collect()
}

fn attr_of(item: &Item, file_type: u32) -> Attr {
    let size = match file_type {
        S_IFREG => item.size,
        S_IFDIR => DIR_SIZE,
        _ => 0,
    };
    // Only devices keep their numbers (the index has nowhere to keep others').
    let (dev_major, dev_minor) = match item.kind {
        EntryType::Char | EntryType::Block => (item.data.start, item.data.len),
        _ => (0, 0),
    };
    Attr {
        ino: Ino::ROOT,
        mode: item.mode | file_type,
        uid: item.uid,
        gid: item.gid,
        size,
        mtime: item.mtime,
        nlink: 1,
        dev_major,
        dev_minor,
    }
}
