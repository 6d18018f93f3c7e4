//! [`Syscall`] for real: `umount2`, util-linux `mount -o loop`, `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};

use super::{parse_mount_points, MountError, Syscall};
use crate::vdisk::FsType;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The kernel's mount syscalls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        match umount2(target, MntFlags::MNT_DETACH) {
            // EINVAL: not a mount point (any more); ENOENT: no such path.
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
            Err(source) => Err(MountError::Unmount {
                target: target.to_owned(),
                source,
            }),
        }
    }

    fn loop_mount(&self, image: &Path, fs_type: FsType, target: &Path) -> Result<(), MountError> {
        // In a child process, not in the daemon: mounting reads the superblock through the
        // daemon's own FUSE file, in uninterruptible sleep. Were that a daemon thread, a kill -9
        // could never finish (the dying process would keep the /dev/fuse fd whose release
        // aborts the read); a child's mount fails instead. `-o loop` sets the device up
        // read-only with autoclear, so it goes with the filesystem.
        let options = match fs_type {
            FsType::Ext4 => "ro,loop,noload",
            FsType::Erofs => "ro,loop",
        };
        let output = Command::new("mount")
            .args(["-t", fs_type.as_str(), "-o", options])
            .arg(image)
            .arg(target)
            .output()
            .map_err(|source| MountError::StartLoopMount {
                image: image.to_owned(),
                target: target.to_owned(),
                source,
            })?;
        if output.status.success() {
            return Ok(());
        }
        Err(MountError::LoopMount {
            image: image.to_owned(),
            target: target.to_owned(),
            fs_type: fs_type.as_str(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }

    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, MountError> {
        let table = std::fs::read(MOUNTINFO).map_err(|source| MountError::ReadMountTable {
            path: MOUNTINFO.into(),
            source,
        })?;
        Ok(parse_mount_points(&table)
            .into_iter()
            .filter(|point| point.starts_with(dir))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_listed_and_a_fresh_dir_has_no_mounts() {
        let mounts = LinuxSyscall.mounts_under(Path::new("/")).unwrap();
        assert!(mounts.iter().any(|p| p == Path::new("/")), "{mounts:?}");
        let dir = tempfile::tempdir().unwrap();
        assert!(LinuxSyscall.mounts_under(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn unmounting_what_is_not_mounted_or_not_there_is_done() {
        let dir = tempfile::tempdir().unwrap();
        LinuxSyscall.unmount(dir.path()).unwrap();
        LinuxSyscall.unmount(&dir.path().join("missing")).unwrap();
    }
}
