//! Files and directories only root may read. Cached blocks are the images' contents (a file
//! that is mode 0600 inside an image is plain gzip in the cache), the metadata names every
//! image: so the daemon's root is 0700 and its files 0600, as containerd keeps its own
//! content, and what an earlier version left wider is narrowed at start.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Creates directory `path` (missing parents as usual) with [`DIR_MODE`], or narrows an
/// existing one to it; the mode it had when that narrowed it.
pub fn dir(path: &Path) -> io::Result<Option<u32>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(None),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => {
            narrow(path, DIR_MODE)
        }
        Err(error) => Err(error),
    }
}

/// Takes from `path`'s mode every permission `mode` does not grant; the mode it had when
/// that changed it.
pub fn narrow(path: &Path, mode: u32) -> io::Result<Option<u32>> {
    let had = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if had & !mode == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, Permissions::from_mode(had & mode))?;
    Ok(Some(had))
}

/// Options whose `create` makes a [`FILE_MODE`] file.
pub fn options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn new_and_existing_paths_end_up_private() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b/root");
        assert_eq!(dir(&fresh).unwrap(), None);
        assert_eq!(mode(&fresh), 0o700);
        std::fs::set_permissions(&fresh, Permissions::from_mode(0o755)).unwrap();
        assert_eq!(dir(&fresh).unwrap(), Some(0o755));
        assert_eq!(mode(&fresh), 0o700);

        let file = fresh.join("f");
        options().write(true).create(true).open(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(narrow(&file, FILE_MODE).unwrap(), Some(0o644));
        assert_eq!(mode(&file), 0o600);
        // Narrower than asked stays as it is.
        std::fs::set_permissions(&file, Permissions::from_mode(0o400)).unwrap();
        assert_eq!(narrow(&file, FILE_MODE).unwrap(), None);
        assert_eq!(mode(&file), 0o400);
    }
}
