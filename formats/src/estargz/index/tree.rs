//! The tree under construction: inodes in the order they are made, directory entries in the
//! order they are attached, and a (directory, name) -> entry table that lives only while the
//! index is built. Names are copied once into the index's text arena and nodes keep no path,
//! so memory stays linear in the TOC however deep its names go.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::{
    Attr, Chunk, Dirent, Index, IndexError, Inode, Prefetch, Span, MAX_NODES, S_IFBLK, S_IFCHR,
    S_IFDIR, S_IFMT,
};

pub(super) const DIR_SIZE: u64 = 4096;
const ROOT_SLOT: usize = 0;

/// What a node holds besides its attributes; devices keep their numbers from the attributes.
pub(super) enum Payload<'p> {
    None,
    Chunks(&'p [Chunk]),
    Target(&'p str),
}

/// A directory entry while the tree is built; grouped by directory when it is finished.
struct Link {
    parent: u32,
    name_start: u32,
    slot: u32,
    name_len: u8,
}

pub(super) struct Tree {
    inodes: Vec<Inode>,
    links: Vec<Link>,
    chunks: Vec<Chunk>,
    text: String,
    xattrs: BTreeMap<u32, BTreeMap<String, Vec<u8>>>,
    /// Positions in `links`, hashed by (directory slot, name).
    by_name: HashTable<u32>,
    hasher: RandomState,
}

impl Tree {
    /// Pushes the root, which every other node hangs from; room is made for about `names`
    /// names up front (growing the name table later would hash every name again).
    pub(super) fn with_root(attr: Attr, xattrs: BTreeMap<String, Vec<u8>>, names: usize) -> Self {
        let mut tree = Tree {
            inodes: Vec::with_capacity(names + 1),
            links: Vec::with_capacity(names),
            chunks: Vec::new(),
            text: String::new(),
            xattrs: BTreeMap::new(),
            by_name: HashTable::with_capacity(names),
            hasher: RandomState::new(),
        };
        tree.inodes.push(inode(attr, ROOT_SLOT, Span::default()));
        tree.set_xattrs(ROOT_SLOT, xattrs);
        tree
    }

    pub(super) fn implicit_dir_attr() -> Attr {
        Attr {
            ino: super::Ino::ROOT,
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
        attr: Attr,
        xattrs: BTreeMap<String, Vec<u8>>,
        payload: Payload,
    ) -> Result<usize, IndexError> {
        if self.inodes.len() >= MAX_NODES {
            return Err(IndexError::TooManyNodes { max: MAX_NODES });
        }
        let data = match payload {
            Payload::None => Span::default(),
            Payload::Chunks(chunks) => {
                let start = self.chunks.len();
                self.chunks.extend_from_slice(chunks);
                span(start, chunks.len())?
            }
            Payload::Target(target) => self.push_text(target)?,
        };
        let slot = self.inodes.len();
        self.inodes.push(inode(attr, parent, data));
        self.set_xattrs(slot, xattrs);
        Ok(slot)
    }

    fn push_text(&mut self, text: &str) -> Result<Span, IndexError> {
        let start = self.text.len();
        if start + text.len() > u32::MAX as usize {
            return Err(IndexError::TextTooLarge {
                max: u64::from(u32::MAX),
            });
        }
        self.text.push_str(text);
        span(start, text.len())
    }

    fn set_xattrs(&mut self, slot: usize, xattrs: BTreeMap<String, Vec<u8>>) {
        if xattrs.is_empty() {
            self.xattrs.remove(&(slot as u32));
        } else {
            self.xattrs.insert(slot as u32, xattrs);
        }
    }

    /// Gives directory `slot` the attributes and xattrs of its explicit entry.
    pub(super) fn set_dir(&mut self, slot: usize, attr: Attr, xattrs: BTreeMap<String, Vec<u8>>) {
        let parent = self.inodes[slot].parent as usize;
        self.inodes[slot] = inode(attr, parent, Span::default());
        self.set_xattrs(slot, xattrs);
    }

    /// Adds one extended attribute to node `slot`.
    pub(super) fn add_xattr(&mut self, slot: usize, name: &str, value: &[u8]) {
        self.xattrs
            .entry(slot as u32)
            .or_default()
            .insert(name.to_owned(), value.to_vec());
    }

    fn is_dir(&self, slot: usize) -> bool {
        self.inodes[slot].mode & S_IFMT == S_IFDIR
    }

    fn hash(&self, parent: usize, name: &str) -> u64 {
        self.hasher.hash_one((parent as u32, name))
    }

    /// The node named `name` in directory `parent`.
    fn child(&self, parent: usize, name: &str) -> Option<usize> {
        let links = &self.links;
        let text = &self.text;
        self.by_name
            .find(self.hash(parent, name), |&i| {
                let link = &links[i as usize];
                link.parent as usize == parent && link_name(text, link) == name
            })
            .map(|&i| links[i as usize].slot as usize)
    }

    /// Returns the directory at `path`, creating it and missing ancestors (mode 0755). One
    /// step per component, without recursion: a TOC decides how deep its names go.
    pub(super) fn ensure_dir(&mut self, path: &str) -> Result<usize, IndexError> {
        let mut at = ROOT_SLOT;
        if path.is_empty() {
            return Ok(at);
        }
        let mut end = 0;
        for name in path.split('/') {
            end += name.len();
            at = match self.child(at, name) {
                Some(slot) if self.is_dir(slot) => slot,
                Some(_) => {
                    return Err(IndexError::PathConflict {
                        path: path[..end].to_owned(),
                    })
                }
                None => {
                    let attr = Self::implicit_dir_attr();
                    let slot = self.push_node(at, attr, BTreeMap::new(), Payload::None)?;
                    self.attach(at, name, slot)?;
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
        path.split('/')
            .try_fold(ROOT_SLOT, |dir, name| self.child(dir, name))
    }

    /// Adds a non-directory node named `path`.
    pub(super) fn add(
        &mut self,
        path: &str,
        attr: Attr,
        xattrs: BTreeMap<String, Vec<u8>>,
        payload: Payload,
    ) -> Result<(), IndexError> {
        let (parent, name) = split(path);
        let parent = self.ensure_dir(parent)?;
        if self.child(parent, name).is_some() {
            return Err(IndexError::PathConflict {
                path: path.to_owned(),
            });
        }
        let slot = self.push_node(parent, attr, xattrs, payload)?;
        self.attach(parent, name, slot)
    }

    /// Gives the node at `target` a second name, `path`.
    pub(super) fn link(&mut self, path: &str, target: &str) -> Result<(), IndexError> {
        let Some(slot) = self.find(target) else {
            return Err(IndexError::HardlinkTargetMissing {
                path: path.to_owned(),
                target: target.to_owned(),
            });
        };
        let (parent, name) = split(path);
        let parent = self.ensure_dir(parent)?;
        if self.child(parent, name).is_some() {
            return Err(IndexError::PathConflict {
                path: path.to_owned(),
            });
        }
        self.inodes[slot].nlink += 1;
        self.attach(parent, name, slot)
    }

    fn attach(&mut self, parent: usize, name: &str, slot: usize) -> Result<(), IndexError> {
        if !self.is_dir(parent) {
            return Ok(());
        }
        // Names were checked against MAX_NAME_LEN before they got here.
        let name_len = u8::try_from(name.len()).map_err(|_| IndexError::NameTooLong {
            path: name.chars().take(128).collect(),
            len: name.len(),
            max: super::MAX_NAME_LEN,
        })?;
        let Span { start, .. } = self.push_text(name)?;
        let position = self.links.len() as u32;
        self.links.push(Link {
            parent: parent as u32,
            name_start: start,
            slot: slot as u32,
            name_len,
        });
        let hash = self.hash(parent, name);
        let (links, text, hasher) = (&self.links, &self.text, &self.hasher);
        self.by_name.insert_unique(hash, position, |&i| {
            let link = &links[i as usize];
            hasher.hash_one((link.parent, link_name(text, link)))
        });
        Ok(())
    }

    pub(super) fn finish(self, prefetch: Prefetch) -> Result<Index, IndexError> {
        let Tree {
            mut inodes,
            mut links,
            chunks,
            text,
            xattrs,
            by_name,
            hasher: _,
        } = self;
        drop(by_name);
        // Each directory's entries together, sorted by name (names within one are distinct).
        links.sort_unstable_by(|a, b| {
            a.parent
                .cmp(&b.parent)
                .then_with(|| link_name(&text, a).cmp(link_name(&text, b)))
        });
        let mut dirents = Vec::with_capacity(links.len());
        let mut group = 0;
        while group < links.len() {
            let parent = links[group].parent as usize;
            let end = group + links[group..].partition_point(|l| l.parent as usize == parent);
            let subdirs = links[group..end]
                .iter()
                .filter(|l| inodes[l.slot as usize].mode & S_IFMT == S_IFDIR)
                .count();
            // "." plus the parent's entry, plus each subdirectory's "..".
            inodes[parent].nlink = 2 + subdirs as u32;
            inodes[parent].data = span(group, end - group)?;
            group = end;
        }
        for dir in inodes.iter_mut().filter(|i| i.mode & S_IFMT == S_IFDIR) {
            if dir.data.len == 0 {
                dir.nlink = 2;
            }
        }
        dirents.extend(links.iter().map(|l| Dirent {
            name_start: l.name_start,
            slot: l.slot,
            name_len: l.name_len,
        }));
        drop(links);
        inodes.shrink_to_fit();
        let mut text = text;
        text.shrink_to_fit();
        let mut chunks = chunks;
        chunks.shrink_to_fit();
        Ok(Index {
            inodes,
            dirents,
            chunks,
            text,
            xattrs: xattrs.into_iter().collect(),
            prefetch,
        })
    }
}

fn inode(attr: Attr, parent: usize, data: Span) -> Inode {
    let data = match attr.mode & S_IFMT {
        S_IFCHR | S_IFBLK => Span {
            start: attr.dev_major,
            len: attr.dev_minor,
        },
        _ => data,
    };
    Inode {
        size: attr.size,
        mtime: attr.mtime,
        mode: attr.mode,
        uid: attr.uid,
        gid: attr.gid,
        nlink: attr.nlink,
        parent: parent as u32,
        data,
    }
}

fn span(start: usize, len: usize) -> Result<Span, IndexError> {
    let too_many = |_| IndexError::TooManyNodes { max: MAX_NODES };
    Ok(Span {
        start: u32::try_from(start).map_err(too_many)?,
        len: u32::try_from(len).map_err(too_many)?,
    })
}

fn link_name<'t>(text: &'t str, link: &Link) -> &'t str {
    let start = link.name_start as usize;
    &text[start..start + usize::from(link.name_len)]
}

fn split(path: &str) -> (&str, &str) {
    crate::estargz::entry_name::split_parent(path)
}
