//! Filesystem changes applied to a directory, and a comparison of two trees: the tools behind
//! containerd's `fstest` appliers, used for snapshot contents and image layers alike.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// One change to a tree; paths are relative to the tree's root (a leading `/` is ignored).
#[derive(Clone, Debug)]
pub enum Op {
    /// Writes a file (replacing any) and sets its permission bits exactly.
    File(String, Vec<u8>, u32),
    /// Creates a directory and its parents and sets its permission bits exactly.
    Dir(String, u32),
    RemoveAll(String),
    Chown(String, u32, u32),
    /// `Link(existing, new)`: a hard link.
    Link(String, String),
    /// `Symlink(target, path)`.
    Symlink(String, String),
    Rename(String, String),
    /// `Xattr(path, name, value)`, set without following symlinks.
    Xattr(String, String, Vec<u8>),
}

pub fn file(path: impl Into<String>, content: impl Into<Vec<u8>>, mode: u32) -> Op {
    Op::File(path.into(), content.into(), mode)
}

pub fn dir(path: impl Into<String>, mode: u32) -> Op {
    Op::Dir(path.into(), mode)
}

pub fn remove_all(path: impl Into<String>) -> Op {
    Op::RemoveAll(path.into())
}

pub fn chown(path: impl Into<String>, uid: u32, gid: u32) -> Op {
    Op::Chown(path.into(), uid, gid)
}

pub fn link(existing: impl Into<String>, new: impl Into<String>) -> Op {
    Op::Link(existing.into(), new.into())
}

pub fn symlink(target: impl Into<String>, path: impl Into<String>) -> Op {
    Op::Symlink(target.into(), path.into())
}

pub fn rename(from: impl Into<String>, to: impl Into<String>) -> Op {
    Op::Rename(from.into(), to.into())
}

pub fn xattr(path: impl Into<String>, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Op {
    Op::Xattr(path.into(), name.into(), value.into())
}

fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Applies `ops` to the tree at `root`, in order.
pub fn apply(root: &Path, ops: &[Op]) -> Result<()> {
    for op in ops {
        apply_one(root, op).with_context(|| format!("apply {op:?} under {}", root.display()))?;
    }
    Ok(())
}

fn apply_one(root: &Path, op: &Op) -> Result<()> {
    match op {
        Op::File(path, content, mode) => write_file(&under(root, path), content, *mode),
        Op::Dir(path, mode) => make_dir(&under(root, path), *mode),
        Op::RemoveAll(path) => remove_path(&under(root, path)),
        Op::Chown(path, uid, gid) => {
            std::os::unix::fs::lchown(under(root, path), Some(*uid), Some(*gid))?;
            Ok(())
        }
        Op::Link(existing, new) => Ok(fs::hard_link(under(root, existing), under(root, new))?),
        Op::Symlink(target, path) => Ok(std::os::unix::fs::symlink(target, under(root, path))?),
        Op::Rename(from, to) => Ok(fs::rename(under(root, from), under(root, to))?),
        Op::Xattr(path, name, value) => set_xattr(&under(root, path), name, value),
    }
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    fs::write(path, content)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn make_dir(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn remove_path(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(fs::remove_dir_all(path)?),
        Ok(_) => Ok(fs::remove_file(path)?),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err.into()),
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).context("path contains a NUL byte")
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let c_path = c_path(path)?;
    let c_name = CString::new(name).context("xattr name contains a NUL byte")?;
    // SAFETY: both strings are NUL-terminated and outlive the call; value points to
    // value.len() readable bytes.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("setxattr {name}"));
    }
    Ok(())
}

/// The value of xattr `name` on `path` (not following symlinks), `None` when unset.
pub fn get_xattr(path: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let c_path = c_path(path)?;
    let c_name = CString::new(name).context("xattr name contains a NUL byte")?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: both strings are NUL-terminated; buf is writable for buf.len() bytes.
    let len = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if len < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        return Err(err).context(format!("getxattr {name} on {}", path.display()));
    }
    buf.truncate(usize::try_from(len).context("negative xattr length")?);
    Ok(Some(buf))
}

/// What is compared for one path: type, permissions, ownership, content and user xattrs; not
/// times, sizes of directories or inode numbers.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: String,
    user_xattrs: BTreeMap<String, Vec<u8>>,
}

/// Builds the comparable description of every path below `root` (the root itself excluded).
fn manifest(root: &Path) -> Result<BTreeMap<PathBuf, Entry>> {
    let mut entries = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    // Bounded: each directory is visited once and test trees are small.
    while let Some(dir) = pending.pop() {
        for child in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = child?.path();
            let meta = fs::symlink_metadata(&path)?;
            let file_type = meta.file_type();
            let (kind, content) = if file_type.is_dir() {
                pending.push(path.clone());
                ("dir", String::new())
            } else if file_type.is_symlink() {
                let target = fs::read_link(&path)?;
                ("symlink", target.to_string_lossy().into_owned())
            } else if file_type.is_file() {
                let bytes = fs::read(&path)?;
                ("file", hex::encode(Sha256::digest(&bytes)))
            } else {
                ("special", format!("rdev {}", meta.rdev()))
            };
            let relative = path.strip_prefix(root)?.to_owned();
            entries.insert(
                relative,
                Entry {
                    kind,
                    mode: meta.mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    content,
                    user_xattrs: user_xattrs(&path)?,
                },
            );
        }
    }
    Ok(entries)
}

fn user_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let c_path = c_path(path)?;
    let mut names = vec![0u8; 4096];
    // SAFETY: c_path is NUL-terminated; names is writable for names.len() bytes.
    let len = unsafe { libc::llistxattr(c_path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("listxattr {}", path.display()));
    }
    names.truncate(usize::try_from(len).context("negative xattr list length")?);
    let mut found = BTreeMap::new();
    for name in names
        .split(|&byte| byte == 0)
        .filter(|name| !name.is_empty())
    {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("user.") {
            let value = get_xattr(path, &name)?.unwrap_or_default();
            found.insert(name, value);
        }
    }
    Ok(found)
}

/// Fails with every difference when the trees at `expected` and `actual` differ.
pub fn assert_same(expected: &Path, actual: &Path) -> Result<()> {
    let want = manifest(expected)?;
    let got = manifest(actual)?;
    let mut differences = Vec::new();
    for (path, entry) in &want {
        match got.get(path) {
            None => differences.push(format!("missing {}: {entry:?}", path.display())),
            Some(other) if other != entry => differences.push(format!(
                "differs {}: expected {entry:?}, found {other:?}",
                path.display()
            )),
            Some(_) => {}
        }
    }
    for (path, entry) in &got {
        if !want.contains_key(path) {
            differences.push(format!("unexpected {}: {entry:?}", path.display()));
        }
    }
    anyhow::ensure!(
        differences.is_empty(),
        "{} differs from {}:\n  {}",
        actual.display(),
        expected.display(),
        differences.join("\n  ")
    );
    Ok(())
}
