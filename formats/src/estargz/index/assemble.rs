//! Turning a TOC into an [`Index`]: name cleaning, chunk grouping, whiteouts, landmarks,
//! implicit directories and hardlinks.

use std::borrow::Cow;
use std::collections::HashMap;

use super::tree::{Tree, DIR_SIZE};
use super::{
    Attr, Chunk, Index, IndexError, Ino, NodeKind, Prefetch, MAX_CHUNK_SIZE, MAX_DEPTH,
    MAX_HARDLINK_CHAIN, MAX_NAME_LEN, MAX_PATH_LEN, NO_PREFETCH_LANDMARK, OPAQUE_XATTR,
    PREFETCH_LANDMARK, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG,
};
use crate::estargz::entry_name::{clean_entry_name, split_parent};
use crate::estargz::modtime::parse_modtime;
use crate::estargz::toc::{EntryType, Toc, TocEntry, MAX_TOC_ENTRIES};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// How much of an over-long name an error message quotes.
const QUOTED: usize = 128;

/// A TOC entry after name cleaning; the chunk entries that follow a regular file are
/// `toc.entries[index + 1..index + 1 + chunks]`.
struct Item<'a> {
    entry: &'a TocEntry,
    /// Path the entry is presented at (for whiteouts, the name they hide); borrowed from the
    /// TOC when it is already clean, as producers write it.
    path: Cow<'a, str>,
    whiteout: bool,
    /// Whether the entry is part of the tree at all (landmarks and opaque markers are not).
    named: bool,
    index: usize,
    chunks: usize,
}

pub(super) fn assemble(toc: &Toc, toc_offset: u64) -> Result<Index, IndexError> {
    if toc.entries.len() > MAX_TOC_ENTRIES {
        return Err(IndexError::TooManyNodes {
            max: MAX_TOC_ENTRIES,
        });
    }
    let mut prefetch = Prefetch::Unspecified;
    let mut opaque_dirs: Vec<Cow<str>> = Vec::new();
    let mut items: Vec<Item> = Vec::new();
    let mut last_was_reg = false;

    for (index, entry) in toc.entries.iter().enumerate() {
        if entry.kind == EntryType::Chunk {
            match items.last_mut() {
                Some(item) if last_was_reg => item.chunks += 1,
                _ => return Err(IndexError::OrphanChunk { index }),
            }
            continue;
        }
        if entry.name.contains('\0') || entry.link_name.contains('\0') {
            return Err(IndexError::InvalidName {
                name: quote(&entry.name),
            });
        }
        let path = clean(&entry.name);
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
        last_was_reg = entry.kind == EntryType::Reg;
        let (parent, base) = split_parent(&path);
        let (presented, whiteout): (Option<Cow<str>>, bool) = if path == PREFETCH_LANDMARK {
            prefetch = Prefetch::UpTo(entry.offset);
            (None, false)
        } else if path == NO_PREFETCH_LANDMARK {
            prefetch = Prefetch::Disabled;
            (None, false)
        } else if base == OPAQUE_WHITEOUT {
            opaque_dirs.push(sub(&path, parent));
            (None, false)
        } else if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            // A bare ".wh." hides nothing nameable.
            let hidden = (!hidden.is_empty()).then(|| Cow::Owned(join(parent, hidden)));
            (hidden, true)
        } else {
            (Some(path.clone()), false)
        };
        items.push(Item {
            entry,
            named: presented.is_some(),
            path: presented.unwrap_or_default(),
            whiteout,
            index,
            chunks: 0,
        });
    }

    // Cleaned path -> index in `items` of the entry presented there (later entries win, but
    // a real entry is never hidden by a whiteout of the same name).
    let mut winner: HashMap<&str, usize> = HashMap::new();
    for (slot, item) in items.iter().enumerate().filter(|(_, item)| item.named) {
        match winner.get(item.path.as_ref()) {
            Some(&old) if item.whiteout && !items[old].whiteout => {}
            _ => {
                winner.insert(item.path.as_ref(), slot);
            }
        }
    }

    let member_starts = member_starts(toc);
    let root = winner.get("").map(|&i| &items[i]);
    let mut tree = match root {
        Some(item) if item.entry.kind != EntryType::Dir => {
            return Err(IndexError::RootNotDirectory)
        }
        Some(item) => Tree::with_root(attr_of(item.entry, S_IFDIR), item.entry.xattrs.clone()),
        None => Tree::with_root(Tree::implicit_dir_attr(), Default::default()),
    };

    let mut winners: Vec<usize> = winner
        .values()
        .copied()
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
            node_of(item, toc, toc_offset, &member_starts)?
        };
        tree.add(&item.path, attr, item.entry.xattrs.clone(), kind)?;
    }
    for &i in &winners {
        let item = &items[i];
        if item.entry.kind == EntryType::Hardlink && !item.whiteout {
            let target = resolve_hardlink(item, &items, &winner)?;
            tree.link(&item.path, &target)?;
        }
    }
    for dir in &opaque_dirs {
        let slot = tree.ensure_dir(dir)?;
        tree.nodes[slot]
            .xattrs
            .insert(OPAQUE_XATTR.to_owned(), b"y".to_vec());
    }
    Ok(tree.finish(prefetch))
}

/// `clean_entry_name`, borrowing `name` when it is clean already.
fn clean(name: &str) -> Cow<'_, str> {
    let cleaned = clean_entry_name(name);
    if cleaned == name {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(cleaned)
    }
}

/// `part`, a prefix of `path`, borrowed when `path` is.
fn sub<'a>(path: &Cow<'a, str>, part: &str) -> Cow<'a, str> {
    match path {
        Cow::Borrowed(whole) => Cow::Borrowed(&whole[..part.len()]),
        Cow::Owned(_) => Cow::Owned(part.to_owned()),
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

fn resolve_hardlink(
    item: &Item,
    items: &[Item],
    winners: &HashMap<&str, usize>,
) -> Result<String, IndexError> {
    let mut current = item;
    let mut visited: Vec<&str> = vec![item.path.as_ref()];
    for _ in 0..MAX_HARDLINK_CHAIN {
        let target = clean_entry_name(&current.entry.link_name);
        if visited.contains(&target.as_str()) {
            let path = item.path.to_string();
            return Err(if visited.len() == 1 {
                IndexError::HardlinkToItself { path }
            } else {
                IndexError::HardlinkCycle { path, target }
            });
        }
        let missing = || IndexError::HardlinkTargetMissing {
            path: item.path.to_string(),
            target: target.clone(),
        };
        let &i = winners.get(target.as_str()).ok_or_else(missing)?;
        let found = &items[i];
        match found.entry.kind {
            EntryType::Hardlink if !found.whiteout => {
                visited.push(found.path.as_ref());
                current = found;
            }
            EntryType::Dir if !found.whiteout => {
                return Err(IndexError::HardlinkToDirectory {
                    path: item.path.to_string(),
                    target,
                })
            }
            _ => return Ok(target),
        }
    }
    Err(IndexError::HardlinkChainTooLong {
        path: item.path.to_string(),
        max: MAX_HARDLINK_CHAIN,
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
    toc: &Toc,
    toc_offset: u64,
    member_starts: &[u64],
) -> Result<(Attr, NodeKind), IndexError> {
    let e = item.entry;
    Ok(match e.kind {
        EntryType::Reg => (
            attr_of(e, S_IFREG),
            NodeKind::Regular {
                chunks: chunks_of(item, toc, toc_offset, member_starts)?,
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
                path: item.path.to_string(),
            })
        }
    })
}

fn chunks_of(
    item: &Item,
    toc: &Toc,
    toc_offset: u64,
    member_starts: &[u64],
) -> Result<Vec<Chunk>, IndexError> {
    let file = item.entry;
    if file.size == 0 {
        return Ok(Vec::new());
    }
    let path = || item.path.to_string();
    let layout_error = |at| IndexError::ChunkLayout {
        path: path(),
        size: file.size,
        at,
    };
    let following = &toc.entries[item.index + 1..item.index + 1 + item.chunks];
    let pieces = std::iter::once(file).chain(following);
    let piece_count = 1 + item.chunks;
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
        let next = member_starts.partition_point(|&s| s <= piece.offset);
        let blob_end = member_starts
            .get(next)
            .copied()
            .unwrap_or(toc_offset)
            .min(toc_offset);
        // A whole-file digest stands in for the chunk digest of an unchunked file (legacy TOCs).
        // Without one, bytes would reach containers unchecked: such a TOC is not mounted.
        let digest = piece
            .chunk_digest
            .or(if piece_count == 1 { file.digest } else { None })
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

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}
