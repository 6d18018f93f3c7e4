//! Turning a TOC into an [`Index`]: name cleaning, chunk grouping, whiteouts, landmarks,
//! implicit directories and hardlinks.

use std::collections::{BTreeMap, HashMap};

use super::{
    Attr, Chunk, DirEntry, Index, IndexError, Ino, Node, NodeKind, Prefetch, MAX_CHUNK_SIZE,
    MAX_NODES, NO_PREFETCH_LANDMARK, OPAQUE_XATTR, PREFETCH_LANDMARK, S_IFBLK, S_IFCHR, S_IFDIR,
    S_IFIFO, S_IFLNK, S_IFREG,
};
use crate::estargz::digest::Sha256Digest;
use crate::estargz::entry_name::{clean_entry_name, split_parent};
use crate::estargz::modtime::parse_modtime;
use crate::estargz::toc::{EntryType, Toc, TocEntry, MAX_TOC_ENTRIES};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const HARDLINK_DEPTH: usize = 64;
const DIR_SIZE: u64 = 4096;

/// A TOC entry after name cleaning, with the chunk entries that follow a regular file.
struct Item<'a> {
    entry: &'a TocEntry,
    /// Path the entry is presented at (for whiteouts, the name they hide).
    path: String,
    whiteout: bool,
    chunks: Vec<&'a TocEntry>,
}

pub(super) fn assemble(toc: &Toc, toc_offset: u64) -> Result<Index, IndexError> {
    if toc.entries.len() > MAX_TOC_ENTRIES {
        return Err(IndexError::TooManyNodes {
            max: MAX_TOC_ENTRIES,
        });
    }
    let mut prefetch = Prefetch::Unspecified;
    let mut opaque_dirs = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    // Cleaned path -> index in `items` of the entry presented there (later entries win, but
    // a real entry is never hidden by a whiteout of the same name).
    let mut winner: HashMap<String, usize> = HashMap::new();
    let mut last_was_reg = false;

    for (index, entry) in toc.entries.iter().enumerate() {
        if entry.kind == EntryType::Chunk {
            match items.last_mut() {
                Some(item) if last_was_reg => item.chunks.push(entry),
                _ => return Err(IndexError::OrphanChunk { index }),
            }
            continue;
        }
        if entry.name.contains('\0') || entry.link_name.contains('\0') {
            return Err(IndexError::InvalidName {
                name: entry.name.chars().take(256).collect(),
            });
        }
        let path = clean_entry_name(&entry.name);
        // An entry that is not part of the tree still owns the chunk entries after it.
        last_was_reg = entry.kind == EntryType::Reg;
        let (parent, base) = split_parent(&path);
        let (path, whiteout) = if path == PREFETCH_LANDMARK {
            prefetch = Prefetch::UpTo(entry.offset);
            (None, false)
        } else if path == NO_PREFETCH_LANDMARK {
            prefetch = Prefetch::Disabled;
            (None, false)
        } else if base == OPAQUE_WHITEOUT {
            opaque_dirs.push(parent.to_owned());
            (None, false)
        } else if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            // A bare ".wh." hides nothing nameable.
            let hidden = (!hidden.is_empty()).then(|| join(parent, hidden));
            (hidden, true)
        } else {
            (Some(path.clone()), false)
        };
        items.push(Item {
            entry,
            path: path.clone().unwrap_or_default(),
            whiteout,
            chunks: Vec::new(),
        });
        let Some(path) = path else { continue };
        let slot = items.len() - 1;
        match winner.get(&path) {
            Some(&old) if whiteout && !items[old].whiteout => {}
            _ => {
                winner.insert(path, slot);
            }
        }
    }

    let member_starts = member_starts(toc);
    let mut tree = Tree::default();
    let root = winner.get("").map(|&i| &items[i]);
    match root {
        Some(item) if item.entry.kind != EntryType::Dir => {
            return Err(IndexError::RootNotDirectory)
        }
        Some(item) => tree.push(
            String::new(),
            attr_of(item.entry, S_IFDIR),
            item.entry,
            dir(),
        )?,
        None => tree.push_implicit_dir(String::new())?,
    };

    let mut winners: Vec<usize> = winner
        .into_values()
        .filter(|&i| !items[i].path.is_empty())
        .collect();
    winners.sort_unstable();
    // Directories first so that implicit parents never shadow an explicit entry's attributes.
    for &i in &winners {
        let item = &items[i];
        if item.entry.kind == EntryType::Dir && !item.whiteout {
            let slot = tree.ensure_dir(&item.path)?;
            let node = &mut tree.nodes[slot];
            node.attr = Attr {
                ino: node.attr.ino,
                ..attr_of(item.entry, S_IFDIR)
            };
            node.xattrs = item.entry.xattrs.clone();
        }
    }
    for &i in &winners {
        let item = &items[i];
        if (item.entry.kind == EntryType::Dir && !item.whiteout)
            || item.entry.kind == EntryType::Hardlink
        {
            continue;
        }
        let (attr, kind) = if item.whiteout {
            let attr = Attr {
                mode: S_IFCHR,
                uid: 0,
                gid: 0,
                size: 0,
                dev_major: 0,
                dev_minor: 0,
                ..attr_of(item.entry, S_IFCHR)
            };
            (attr, NodeKind::CharDevice)
        } else {
            node_of(item, toc_offset, &member_starts)?
        };
        tree.add(&item.path, attr, item.entry, kind)?;
    }
    let by_path = winner_map(&items, &winners);
    for &i in &winners {
        let item = &items[i];
        if item.entry.kind == EntryType::Hardlink && !item.whiteout {
            let target = resolve_hardlink(item, &items, &by_path)?;
            tree.link(&item.path, &target)?;
        }
    }
    for dir in opaque_dirs {
        let slot = tree.ensure_dir(&dir)?;
        tree.nodes[slot]
            .xattrs
            .insert(OPAQUE_XATTR.to_owned(), b"y".to_vec());
    }
    Ok(tree.finish(prefetch))
}

fn winner_map<'a>(items: &'a [Item<'a>], winners: &[usize]) -> HashMap<&'a str, usize> {
    winners
        .iter()
        .map(|&i| (items[i].path.as_str(), i))
        .collect()
}

fn resolve_hardlink(
    item: &Item,
    items: &[Item],
    winners: &HashMap<&str, usize>,
) -> Result<String, IndexError> {
    let mut current = item;
    for _ in 0..HARDLINK_DEPTH {
        let target = clean_entry_name(&current.entry.link_name);
        let missing = || IndexError::HardlinkTargetMissing {
            path: item.path.clone(),
            target: target.clone(),
        };
        let &i = winners.get(target.as_str()).ok_or_else(missing)?;
        let found = &items[i];
        match found.entry.kind {
            EntryType::Hardlink if !found.whiteout => current = found,
            EntryType::Dir if !found.whiteout => {
                return Err(IndexError::HardlinkToDirectory {
                    path: item.path.clone(),
                    target,
                })
            }
            _ => return Ok(target),
        }
    }
    Err(IndexError::HardlinkTargetMissing {
        path: item.path.clone(),
        target: item.entry.link_name.chars().take(256).collect(),
    })
}

/// Sorted distinct blob offsets where data gzip members start.
fn member_starts(toc: &Toc) -> Vec<u64> {
    let mut starts: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| (e.kind == EntryType::Reg && e.size > 0) || e.kind == EntryType::Chunk)
        .map(|e| e.offset)
        .collect();
    starts.sort_unstable();
    starts.dedup();
    starts
}

fn node_of(
    item: &Item,
    toc_offset: u64,
    member_starts: &[u64],
) -> Result<(Attr, NodeKind), IndexError> {
    let e = item.entry;
    Ok(match e.kind {
        EntryType::Reg => (
            attr_of(e, S_IFREG),
            NodeKind::Regular {
                chunks: chunks_of(item, toc_offset, member_starts)?,
            },
        ),
        EntryType::Symlink => (
            Attr {
                size: e.link_name.len() as u64,
                ..attr_of(e, S_IFLNK)
            },
            NodeKind::Symlink {
                target: e.link_name.clone(),
            },
        ),
        EntryType::Char => (attr_of(e, S_IFCHR), NodeKind::CharDevice),
        EntryType::Block => (attr_of(e, S_IFBLK), NodeKind::BlockDevice),
        EntryType::Fifo => (attr_of(e, S_IFIFO), NodeKind::Fifo),
        // Directories, hardlinks and chunks are handled by the caller.
        EntryType::Dir | EntryType::Hardlink | EntryType::Chunk => {
            return Err(IndexError::PathConflict {
                path: item.path.clone(),
            })
        }
    })
}

fn chunks_of(
    item: &Item,
    toc_offset: u64,
    member_starts: &[u64],
) -> Result<Vec<Chunk>, IndexError> {
    let file = item.entry;
    if file.size == 0 {
        return Ok(Vec::new());
    }
    let layout_error = |at| IndexError::ChunkLayout {
        path: item.path.clone(),
        size: file.size,
        at,
    };
    let pieces = std::iter::once(file).chain(item.chunks.iter().copied());
    let piece_count = 1 + item.chunks.len();
    let mut chunks = Vec::with_capacity(piece_count);
    let mut expected_offset = 0u64;
    for piece in pieces {
        if piece.chunk_offset != expected_offset || expected_offset >= file.size {
            return Err(layout_error(piece.chunk_offset));
        }
        let size = match piece.chunk_size {
            0 => file.size - piece.chunk_offset,
            size => size,
        };
        if size > MAX_CHUNK_SIZE {
            return Err(IndexError::ChunkTooLarge {
                path: item.path.clone(),
                size,
                max: MAX_CHUNK_SIZE,
            });
        }
        if piece.offset >= toc_offset {
            return Err(IndexError::DataOffsetOutOfRange {
                path: item.path.clone(),
                offset: piece.offset,
                toc_offset,
            });
        }
        let next = member_starts.partition_point(|&s| s <= piece.offset);
        let blob_end = member_starts
            .get(next)
            .copied()
            .unwrap_or(toc_offset)
            .min(toc_offset);
        // A whole-file digest stands in for the chunk digest of an unchunked file (legacy TOCs).
        let digest = piece
            .chunk_digest
            .or(if piece_count == 1 { file.digest } else { None });
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
            .filter(|&end| end <= file.size)
            .ok_or_else(|| layout_error(piece.chunk_offset))?;
    }
    if expected_offset != file.size {
        return Err(layout_error(expected_offset));
    }
    Ok(chunks)
}

fn attr_of(e: &TocEntry, file_type: u32) -> Attr {
    let size = match file_type {
        S_IFREG => e.size,
        S_IFDIR => DIR_SIZE,
        _ => 0,
    };
    Attr {
        ino: Ino::ROOT,
        mode: (e.mode as u32 & 0o7777) | file_type,
        uid: e.uid,
        gid: e.gid,
        size,
        mtime: parse_modtime(&e.mod_time).unwrap_or(0),
        nlink: 1,
        dev_major: e.dev_major,
        dev_minor: e.dev_minor,
    }
}

fn dir() -> NodeKind {
    NodeKind::Directory {
        children: Vec::new(),
    }
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

/// The tree under construction: nodes plus a path -> slot map (slot = inode - 1).
#[derive(Default)]
struct Tree {
    nodes: Vec<Node>,
    by_path: HashMap<String, usize>,
}

impl Tree {
    fn push(
        &mut self,
        path: String,
        attr: Attr,
        entry: &TocEntry,
        kind: NodeKind,
    ) -> Result<usize, IndexError> {
        self.push_node(path, attr, entry.xattrs.clone(), entry.digest, kind)
    }

    fn push_implicit_dir(&mut self, path: String) -> Result<usize, IndexError> {
        let attr = Attr {
            ino: Ino::ROOT,
            mode: S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            size: DIR_SIZE,
            mtime: 0,
            nlink: 1,
            dev_major: 0,
            dev_minor: 0,
        };
        self.push_node(path, attr, BTreeMap::new(), None, dir())
    }

    fn push_node(
        &mut self,
        path: String,
        mut attr: Attr,
        xattrs: BTreeMap<String, Vec<u8>>,
        digest: Option<Sha256Digest>,
        kind: NodeKind,
    ) -> Result<usize, IndexError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(IndexError::TooManyNodes { max: MAX_NODES });
        }
        let slot = self.nodes.len();
        attr.ino = Ino::from_slot(slot);
        self.by_path.insert(path.clone(), slot);
        self.nodes.push(Node {
            attr,
            kind,
            xattrs,
            path,
            digest,
        });
        Ok(slot)
    }

    /// Returns the directory at `path`, creating it and missing ancestors (mode 0755).
    fn ensure_dir(&mut self, path: &str) -> Result<usize, IndexError> {
        if let Some(&slot) = self.by_path.get(path) {
            return match self.nodes[slot].kind {
                NodeKind::Directory { .. } => Ok(slot),
                _ => Err(IndexError::PathConflict {
                    path: path.to_owned(),
                }),
            };
        }
        let (parent, name) = split_parent(path);
        let parent = self.ensure_dir(parent)?;
        let slot = self.push_implicit_dir(path.to_owned())?;
        self.attach(parent, name, slot);
        Ok(slot)
    }

    fn add(
        &mut self,
        path: &str,
        attr: Attr,
        entry: &TocEntry,
        kind: NodeKind,
    ) -> Result<(), IndexError> {
        if self.by_path.contains_key(path) {
            return Err(IndexError::PathConflict {
                path: path.to_owned(),
            });
        }
        let (parent, name) = split_parent(path);
        let parent = self.ensure_dir(parent)?;
        let slot = self.push(path.to_owned(), attr, entry, kind)?;
        self.attach(parent, name, slot);
        Ok(())
    }

    fn link(&mut self, path: &str, target: &str) -> Result<(), IndexError> {
        if self.by_path.contains_key(path) {
            return Err(IndexError::PathConflict {
                path: path.to_owned(),
            });
        }
        let Some(&slot) = self.by_path.get(target) else {
            return Err(IndexError::HardlinkTargetMissing {
                path: path.to_owned(),
                target: target.to_owned(),
            });
        };
        let (parent, name) = split_parent(path);
        let parent = self.ensure_dir(parent)?;
        self.nodes[slot].attr.nlink += 1;
        self.attach(parent, name, slot);
        Ok(())
    }

    fn attach(&mut self, parent: usize, name: &str, slot: usize) {
        if let NodeKind::Directory { children } = &mut self.nodes[parent].kind {
            children.push(DirEntry {
                name: name.to_owned(),
                ino: Ino::from_slot(slot),
            });
        }
    }

    fn finish(mut self, prefetch: Prefetch) -> Index {
        let is_dir: Vec<bool> = self
            .nodes
            .iter()
            .map(|n| matches!(n.kind, NodeKind::Directory { .. }))
            .collect();
        for node in &mut self.nodes {
            if let NodeKind::Directory { children } = &mut node.kind {
                children.sort_unstable_by(|a, b| a.name.cmp(&b.name));
                let subdirs = children
                    .iter()
                    .filter(|c| c.ino.slot().is_some_and(|s| is_dir[s]))
                    .count();
                // "." plus the parent's entry, plus each subdirectory's "..".
                node.attr.nlink = 2 + subdirs as u32;
            }
        }
        Index {
            nodes: self.nodes,
            prefetch,
        }
    }
}
