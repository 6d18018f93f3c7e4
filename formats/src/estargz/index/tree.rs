//! The tree under construction: nodes, and a (directory, name) -> node map that lives only
//! while the index is built. Keys borrow the TOC's cleaned names and nodes keep no path, so
//! memory stays linear in the TOC however deep its names go.

use std::collections::{BTreeMap, HashMap};

use super::{Attr, DirEntry, Index, IndexError, Ino, Node, NodeKind, Prefetch, MAX_NODES, S_IFDIR};

pub(super) const DIR_SIZE: u64 = 4096;
const ROOT_SLOT: usize = 0;

#[derive(Default)]
pub(super) struct Tree<'a> {
    pub(super) nodes: Vec<Node>,
    by_name: HashMap<(usize, &'a str), usize>,
}

impl<'a> Tree<'a> {
    /// Pushes the root, which every other node hangs from.
    pub(super) fn with_root(attr: Attr, xattrs: BTreeMap<String, Vec<u8>>) -> Self {
        let mut tree = Tree::default();
        tree.nodes.push(Node {
            attr: Attr {
                ino: Ino::ROOT,
                ..attr
            },
            kind: dir(),
            xattrs,
            parent: Ino::ROOT,
        });
        tree
    }

    pub(super) fn implicit_dir_attr() -> Attr {
        Attr {
            ino: Ino::ROOT,
            mode: S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            size: DIR_SIZE,
            mtime: 0,
            nlink: 1,
            dev_major: 0,
            dev_minor: 0,
        }
    }

    fn push_node(
        &mut self,
        parent: usize,
        mut attr: Attr,
        xattrs: BTreeMap<String, Vec<u8>>,
        kind: NodeKind,
    ) -> Result<usize, IndexError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(IndexError::TooManyNodes { max: MAX_NODES });
        }
        let slot = self.nodes.len();
        attr.ino = Ino::from_slot(slot);
        self.nodes.push(Node {
            attr,
            kind,
            xattrs,
            parent: Ino::from_slot(parent),
        });
        Ok(slot)
    }

    /// Returns the directory at `path`, creating it and missing ancestors (mode 0755). One
    /// step per component, without recursion: a TOC decides how deep its names go.
    pub(super) fn ensure_dir(&mut self, path: &'a str) -> Result<usize, IndexError> {
        let mut at = ROOT_SLOT;
        if path.is_empty() {
            return Ok(at);
        }
        let mut end = 0;
        for name in path.split('/') {
            end += name.len();
            at = match self.by_name.get(&(at, name)) {
                Some(&slot) if matches!(self.nodes[slot].kind, NodeKind::Directory { .. }) => slot,
                Some(_) => {
                    return Err(IndexError::PathConflict {
                        path: path[..end].to_owned(),
                    })
                }
                None => {
                    let attr = Self::implicit_dir_attr();
                    let slot = self.push_node(at, attr, BTreeMap::new(), dir())?;
                    self.attach(at, name, slot);
                    slot
                }
            };
            end += 1;
        }
        Ok(at)
    }

    /// The node at `path`, if there is one; creates nothing.
    pub(super) fn find(&self, path: &str) -> Option<usize> {
        if path.is_empty() {
            return Some(ROOT_SLOT);
        }
        path.split('/').try_fold(ROOT_SLOT, |dir, name| {
            self.by_name.get(&(dir, name)).copied()
        })
    }

    /// Adds a non-directory node named `path`.
    pub(super) fn add(
        &mut self,
        path: &'a str,
        attr: Attr,
        xattrs: BTreeMap<String, Vec<u8>>,
        kind: NodeKind,
    ) -> Result<(), IndexError> {
        let (parent, name) = split(path);
        let parent = self.ensure_dir(parent)?;
        if self.by_name.contains_key(&(parent, name)) {
            return Err(IndexError::PathConflict {
                path: path.to_owned(),
            });
        }
        let slot = self.push_node(parent, attr, xattrs, kind)?;
        self.attach(parent, name, slot);
        Ok(())
    }

    /// Gives the node at `target` a second name, `path`.
    pub(super) fn link(&mut self, path: &'a str, target: &str) -> Result<(), IndexError> {
        let Some(slot) = self.find(target) else {
            return Err(IndexError::HardlinkTargetMissing {
                path: path.to_owned(),
                target: target.to_owned(),
            });
        };
        let (parent, name) = split(path);
        let parent = self.ensure_dir(parent)?;
        if self.by_name.contains_key(&(parent, name)) {
            return Err(IndexError::PathConflict {
                path: path.to_owned(),
            });
        }
        self.nodes[slot].attr.nlink += 1;
        self.attach(parent, name, slot);
        Ok(())
    }

    fn attach(&mut self, parent: usize, name: &'a str, slot: usize) {
        if let NodeKind::Directory { children } = &mut self.nodes[parent].kind {
            children.push(DirEntry {
                name: name.to_owned(),
                ino: Ino::from_slot(slot),
            });
            self.by_name.insert((parent, name), slot);
        }
    }

    pub(super) fn finish(mut self, prefetch: Prefetch) -> Index {
        drop(std::mem::take(&mut self.by_name));
        let is_dir: Vec<bool> = self
            .nodes
            .iter()
            .map(|n| matches!(n.kind, NodeKind::Directory { .. }))
            .collect();
        for node in &mut self.nodes {
            if let NodeKind::Directory { children } = &mut node.kind {
                children.sort_unstable_by(|a, b| a.name.cmp(&b.name));
                children.shrink_to_fit();
                let subdirs = children
                    .iter()
                    .filter(|c| c.ino.slot().is_some_and(|s| is_dir[s]))
                    .count();
                // "." plus the parent's entry, plus each subdirectory's "..".
                node.attr.nlink = 2 + subdirs as u32;
            }
        }
        self.nodes.shrink_to_fit();
        Index {
            nodes: self.nodes,
            prefetch,
        }
    }
}

pub(super) fn dir() -> NodeKind {
    NodeKind::Directory {
        children: Vec::new(),
    }
}

fn split(path: &str) -> (&str, &str) {
    crate::estargz::entry_name::split_parent(path)
}
