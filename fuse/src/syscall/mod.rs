//! The mount syscalls Shoal makes, behind one seam (youki's `Syscall` pattern): [`LinuxSyscall`]
//! talks to the kernel, [`RecordingSyscall`] records calls for unit tests and fails on demand.
//! No other code mounts FUSE, unmounts, loop-mounts or reads the mount table.

mod linux;
mod mountinfo;
mod recording;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use linux::LinuxSyscall;
pub use mountinfo::parse_mount_points;
pub use recording::{Call, RecordingSyscall};

use crate::vdisk::FsType;

/// Why a mount syscall failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("unmount {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("start mount to loop-mount {image} on {target}")]
    StartLoopMount {
        image: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loop-mount {image} on {target} as {fs_type}: {stderr}")]
    LoopMount {
        image: PathBuf,
        target: PathBuf,
        fs_type: &'static str,
        /// What mount(8) said.
        stderr: String,
    },
    #[error("open {path} to mount {target}")]
    OpenFuseDevice {
        path: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount FUSE on {target}")]
    MountFuse {
        target: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("read mount table {path}")]
    ReadMountTable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A read-only FUSE mount: its name in the mount table and who may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseMount {
    /// The mount's source (`shoal:<digest>`), what `mount` and mountinfo show.
    pub source: String,
    /// Every user may use it, not only the mounting one (containers run as anyone).
    pub allow_other: bool,
    /// Device files and setuid bits in it take effect (an image's own files).
    pub dev_suid: bool,
}

/// The mount syscalls of lazily mounted layers.
pub trait Syscall: Send + Sync + 'static {
    /// Opens a new FUSE connection and mounts it read-only on `target` (type `fuse.shoal`,
    /// kernel-checked permissions); returns the connection's `/dev/fuse` fd, on which the
    /// kernel's INIT is waiting. The connection lives as long as any process holds that fd.
    fn mount_fuse(&self, target: &Path, mount: &FuseMount) -> Result<OwnedFd, MountError>;

    /// Lazily unmounts `target` (`MNT_DETACH`): it leaves the mount table at once, while users
    /// of it keep it alive until they let go. Nothing mounted there, or no `target`, is done.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;

    /// Attaches `image` to a read-only loop device (released with the filesystem) and mounts
    /// it read-only on `target`; ext4 with `noload`, as a read-only device cannot replay a
    /// journal.
    fn loop_mount(&self, image: &Path, fs_type: FsType, target: &Path) -> Result<(), MountError>;

    /// Mount points at or below `dir`, one entry per mount (a path mounted over twice is
    /// listed twice), in mount-table order.
    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, MountError>;
}
