//! Disk usage of a directory tree, measured as containerd's `fs.DiskUsage` does: allocated
//! blocks, with every inode counted once however many hard links point at it.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::SnapshotError;
use crate::metadata::DiskUsage;

pub fn measure(root: &Path) -> Result<DiskUsage, SnapshotError> {
    let fail = |path: &Path, source| SnapshotError::DiskUsage {
        path: path.to_owned(),
        source,
    };
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    let mut pending: Vec<PathBuf> = vec![root.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| fail(&path, e))?;
        if seen.insert((meta.dev(), meta.ino())) {
            usage.inodes += 1;
            usage.size += (meta.blocks() * 512) as i64;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| fail(&path, e))? {
                pending.push(entry.map_err(|e| fail(&path, e))?.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_blocks_and_inodes_once_per_hardlink() {
        let dir = tempfile::tempdir().unwrap();
        let empty = measure(dir.path()).unwrap();
        assert_eq!(empty.inodes, 1);
        std::fs::write(dir.path().join("a"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let usage = measure(dir.path()).unwrap();
        assert_eq!(usage.inodes, 3, "root, one file (two links), one dir");
        assert!(usage.size >= 64 * 1024, "{usage:?}");
        assert!(
            usage.size < 3 * 64 * 1024,
            "hard link counted twice: {usage:?}"
        );
    }

    #[test]
    fn missing_directory_is_an_error() {
        let err = measure(Path::new("/nonexistent/shoal")).unwrap_err();
        assert!(matches!(err, SnapshotError::DiskUsage { .. }));
    }
}
