//! [`Syscall`] for real: `mount(2)` of `/dev/fuse`, `umount2`, util-linux `mount -o loop`,
//! `/proc/self/mountinfo`.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::{parse_mount_points, FuseMount, MountError, Syscall};
use crate::vdisk::FsType;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const FUSE_DEVICE: &str = "/dev/fuse";

/// The kernel's mount syscalls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount_fuse(&self, target: &Path, fuse: &FuseMount) -> Result<OwnedFd, MountError> {
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .open(FUSE_DEVICE)
            .map_err(|source| MountError::OpenFuseDevice {
                path: FUSE_DEVICE.into(),
                target: target.to_owned(),
                source,
            })?;
        let root_mode = std::fs::metadata(target)
            .map(|m| m.mode() & libc::S_IFMT)
            .map_err(|source| MountError::OpenFuseDevice {
                path: target.to_owned(),
                target: target.to_owned(),
                source,
            })?;
        let mut data = format!(
            "fd={},rootmode={root_mode:o},user_id={},group_id={},default_permissions",
            device.as_raw_fd(),
            nix::unistd::getuid(),
            nix::unistd::getgid(),
        );
        if fuse.allow_other {
            data.push_str(",allow_other");
        }
        let mut flags = MsFlags::MS_RDONLY;
        if !fuse.dev_suid {
            flags |= MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
        }
        mount(
            Some(fuse.source.as_str()),
            target,
            Some("fuse.shoal"),
            flags,
            Some(data.as_str()),
        )
        .map_err(|source| MountError::MountFuse {
            target: target.to_owned(),
            source,
        })?;
        Ok(device.into())
    }

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
