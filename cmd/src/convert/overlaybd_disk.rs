//! The ext4 work disk of an overlaybd conversion: a sparse image file that each OCI layer is
//! applied to in turn (loop-mounted read-write, whiteouts honoured), and the record of which
//! 4 KiB blocks each layer changed, which become that layer's LSMT extents.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::{Digest as _, Sha256};

use super::optimize::attribution::{path_key, LayerFiles};

/// Virtual size of converted disks, as the reference converter's ext4 base layer.
pub const VIRTUAL_SIZE: u64 = 64 << 30;
/// Filesystem block, and the unit changes are recorded in.
pub const BLOCK: u64 = 4096;
const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";

/// A run of changed bytes at a virtual-disk offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The work disk and a fingerprint of every non-zero block as the last layer left it.
pub struct WorkDisk {
    image: PathBuf,
    mountpoint: PathBuf,
    blocks: HashMap<u64, [u8; 16]>,
}

impl WorkDisk {
    /// Makes an empty ext4 filesystem on a new sparse image in `dir`. No journal (the disk is
    /// only ever mounted read-only), and uninitialised inode tables stay unwritten.
    pub fn create(dir: &Path) -> anyhow::Result<WorkDisk> {
        let image = dir.join("disk.img");
        let file = File::create(&image).with_context(|| format!("create {}", image.display()))?;
        file.set_len(VIRTUAL_SIZE)
            .with_context(|| format!("size {}", image.display()))?;
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-m", "0", "-O", "^has_journal"])
            .args(["-E", "lazy_itable_init=1,nodiscard"])
            .arg(&image))
        .context("make the ext4 filesystem (is e2fsprogs installed?)")?;
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("create {}", mountpoint.display()))?;
        // The image's root is the filesystem's root: nothing of mkfs's own may show in it.
        let mounted = Mounted::mount(&image, &mountpoint)?;
        remove(&mountpoint.join("lost+found"))?;
        mounted.unmount()?;
        Ok(WorkDisk {
            image,
            mountpoint,
            blocks: HashMap::new(),
        })
    }

    /// Applies one layer's tar stream to the filesystem, then returns the blocks it changed.
    pub fn apply<R: Read>(&mut self, tar: R) -> anyhow::Result<Vec<Change>> {
        {
            let mounted = Mounted::mount(&self.image, &self.mountpoint)?;
            apply_tar(tar, mounted.path())?;
            mounted.unmount()?;
        }
        self.changes()
    }

    /// Blocks whose content differs from what the previous layer left, coalesced into runs.
    fn changes(&mut self) -> anyhow::Result<Vec<Change>> {
        let file =
            File::open(&self.image).with_context(|| format!("open {}", self.image.display()))?;
        let mut seen = HashSet::new();
        let mut changed: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut buf = vec![0u8; BLOCK as usize];
        for (start, end) in data_extents(&file)? {
            let mut block = start / BLOCK;
            while block * BLOCK < end {
                file.read_exact_at(&mut buf, block * BLOCK)
                    .with_context(|| format!("read {}", self.image.display()))?;
                let zero = buf.iter().all(|&b| b == 0);
                let print = fingerprint(&buf);
                let was = if zero {
                    self.blocks.remove(&block)
                } else {
                    seen.insert(block);
                    self.blocks.insert(block, print)
                };
                // A zero block that was zero (absent) before is unchanged; so is an equal one.
                let same = if zero {
                    was.is_none()
                } else {
                    was == Some(print)
                };
                if !same {
                    changed.push((block, buf.clone()));
                }
                block += 1;
            }
        }
        // Blocks that held data but now lie in a hole read as zeros.
        let gone: Vec<u64> = self
            .blocks
            .keys()
            .filter(|b| !seen.contains(b))
            .copied()
            .collect();
        for block in gone {
            self.blocks.remove(&block);
            changed.push((block, vec![0; BLOCK as usize]));
        }
        changed.sort_by_key(|(block, _)| *block);
        Ok(coalesce(changed))
    }
}

/// Merges consecutive blocks into runs.
fn coalesce(blocks: Vec<(u64, Vec<u8>)>) -> Vec<Change> {
    let mut runs: Vec<Change> = Vec::new();
    for (block, data) in blocks {
        let offset = block * BLOCK;
        match runs.last_mut() {
            Some(run) if run.offset + run.data.len() as u64 == offset => {
                run.data.extend_from_slice(&data)
            }
            _ => runs.push(Change { offset, data }),
        }
    }
    runs
}

fn fingerprint(block: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(block);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// Byte ranges of `file` that hold data (everything else is a hole and reads as zeros).
fn data_extents(file: &File) -> anyhow::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    let size = file.metadata().context("stat the work disk")?.len();
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let start = match lseek(fd, offset as i64, Whence::SeekData) {
            Ok(start) => start as u64,
            // ENXIO: no data after `offset`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(errno) => bail!("seek for data in the work disk: {errno}"),
        };
        let end = lseek(fd, start as i64, Whence::SeekHole)
            .map(|end| end as u64)
            .map_err(|errno| anyhow::anyhow!("seek for a hole in the work disk: {errno}"))?;
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

/// The work disk mounted read-write through a loop device; unmounted when dropped.
struct Mounted {
    path: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn mount(image: &Path, mountpoint: &Path) -> anyhow::Result<Mounted> {
        // noinit_itable: never zero inode tables behind the converter's back (that would make
        // a layer of gigabytes of zeros).
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,noinit_itable"])
            .arg(image)
            .arg(mountpoint))
        .context("loop-mount the work disk (converting to overlaybd needs root)")?;
        Ok(Mounted {
            path: mountpoint.to_owned(),
            mounted: true,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn unmount(mut self) -> anyhow::Result<()> {
        self.mounted = false;
        run(Command::new("umount").arg(&self.path)).context("unmount the work disk")
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
        }
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Unpacks an OCI layer tar onto `root`: `.wh.NAME` removes NAME, `.wh..wh..opq` empties its
/// directory of what lower layers put there, and an entry replaces whatever was at its path
/// (directories merge). Returns what the layer holds, for telling which layer provides a path.
pub fn apply_tar<R: Read>(tar: R, root: &Path) -> anyhow::Result<LayerFiles> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let root = root
        .canonicalize()
        .with_context(|| format!("resolve {}", root.display()))?;
    let mut written: HashSet<PathBuf> = HashSet::new();
    let mut files = LayerFiles::default();
    for entry in archive.entries().context("read the layer tar")? {
        let mut entry = entry.context("read the layer tar")?;
        let raw = entry
            .path()
            .context("read a tar entry's path")?
            .into_owned();
        let Some(rel) = relative(&raw) else {
            bail!("tar entry {} escapes the root", raw.display());
        };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        if name == OPAQUE {
            let dir = inside(&root, &parent)?;
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    if !written.contains(&parent.join(child.file_name())) {
                        remove(&child.path())?;
                    }
                }
            }
            files.opaque.insert(path_key(&parent));
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let dir = inside(&root, &parent)?;
            remove(&dir.join(hidden))?;
            files.whiteouts.insert(path_key(&parent.join(hidden)));
            continue;
        }
        let target = inside(&root, &parent)?.join(&name);
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            let merge = meta.is_dir() && entry.header().entry_type().is_dir();
            if !merge {
                remove(&target)?;
            }
        }
        entry
            .unpack_in(&root)
            .with_context(|| format!("unpack {}", rel.display()))?;
        files.entries.insert(path_key(&rel));
        written.insert(rel);
    }
    Ok(files)
}

/// `path` without `.`, a leading `/`, or any `..` (then `None`).
fn relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `root/rel` with symlinks resolved, refused if that leaves `root` (a whiteout must never
/// delete outside the disk). A directory that does not exist yet resolves to itself.
fn inside(root: &Path, rel: &Path) -> anyhow::Result<PathBuf> {
    let joined = root.join(rel);
    let resolved = match joined.canonicalize() {
        Ok(resolved) => resolved,
        Err(_) => return Ok(joined),
    };
    if !resolved.starts_with(root) {
        bail!("{} leads outside the layer root", rel.display());
    }
    Ok(resolved)
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let result = if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.with_context(|| format!("remove {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            match data {
                Some(data) => {
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    header.set_cksum();
                    builder.append_data(&mut header, path, *data).unwrap();
                }
                None => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    header.set_mode(0o755);
                    header.set_cksum();
                    builder.append_data(&mut header, path, &[][..]).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_directories_apply_to_lower_content_only() {
        let root = tempfile::tempdir().unwrap();
        let lower = tar_of(&[
            ("a/", None),
            ("a/keep", Some(b"1")),
            ("a/gone", Some(b"2")),
            ("o/", None),
            ("o/old", Some(b"3")),
            ("f", Some(b"old")),
        ]);
        apply_tar(&lower[..], root.path()).unwrap();
        let upper = tar_of(&[
            ("a/.wh.gone", Some(b"")),
            ("o/", None),
            ("o/new", Some(b"4")),
            ("o/.wh..wh..opq", Some(b"")),
            ("f", Some(b"new")),
        ]);
        apply_tar(&upper[..], root.path()).unwrap();
        let p = |rel: &str| root.path().join(rel);
        assert!(p("a/keep").exists());
        assert!(!p("a/gone").exists());
        assert!(!p("o/old").exists(), "opaque hides the lower file");
        assert!(p("o/new").exists(), "opaque keeps this layer's file");
        assert_eq!(std::fs::read(p("f")).unwrap(), b"new");
    }

    #[test]
    fn entries_escaping_the_root_are_refused() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(1);
        header.set_mode(0o644);
        // `append_data` refuses `..`, so write the name into the header directly.
        header.as_gnu_mut().unwrap().name[..11].copy_from_slice(b"../../evil\0");
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, &b"x"[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        let root = tempfile::tempdir().unwrap();
        let err = apply_tar(&tar[..], root.path()).unwrap_err().to_string();
        assert!(err.contains("escapes the root"), "{err}");
    }

    #[test]
    fn changes_coalesce_into_runs() {
        let runs = coalesce(vec![
            (1, vec![1; BLOCK as usize]),
            (2, vec![2; BLOCK as usize]),
            (5, vec![5; BLOCK as usize]),
        ]);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].offset, BLOCK);
        assert_eq!(runs[0].data.len(), 2 * BLOCK as usize);
        assert_eq!(runs[1].offset, 5 * BLOCK);
    }
}
