//! A [`Syscall`] double for unit tests: keeps a mount table of its own, records every call,
//! and fails the operations it is told to.

use parking_lot::Mutex;
use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::{FuseMount, MountError, Syscall};
use crate::vdisk::FsType;

/// One call a [`RecordingSyscall`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    MountFuse(PathBuf),
    Unmount(PathBuf),
    LoopMount {
        image: PathBuf,
        fs_type: FsType,
        target: PathBuf,
    },
    MountsUnder(PathBuf),
}

/// Records calls; "mounts" by listing the target in its own table. Never touches the kernel.
#[derive(Debug, Default)]
pub struct RecordingSyscall {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<Call>,
    table: Vec<PathBuf>,
    failing: HashSet<&'static str>,
}

impl RecordingSyscall {
    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Lists `path` as mounted, as a previous daemon might have left it.
    pub fn add_mount(&self, path: &Path) {
        self.lock().table.push(path.to_owned());
    }

    /// The mount points it lists now.
    pub fn table(&self) -> Vec<PathBuf> {
        self.lock().table.clone()
    }

    /// From now on `operation` (`"mount_fuse"`, `"unmount"`, `"loop_mount"` or
    /// `"mounts_under"`) fails.
    pub fn fail(&self, operation: &'static str) {
        self.lock().failing.insert(operation);
    }

    /// `operation` works again.
    pub fn recover(&self, operation: &'static str) {
        self.lock().failing.remove(operation);
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }
}

impl Syscall for RecordingSyscall {
    /// "Mounts" by listing `target`; the fd it returns is `/dev/null`'s, which no kernel
    /// connection is behind.
    fn mount_fuse(&self, target: &Path, _mount: &FuseMount) -> Result<OwnedFd, MountError> {
        let mut state = self.lock();
        state.calls.push(Call::MountFuse(target.to_owned()));
        if state.failing.contains("mount_fuse") {
            return Err(MountError::MountFuse {
                target: target.to_owned(),
                source: Errno::EPERM,
            });
        }
        let null =
            std::fs::File::open("/dev/null").map_err(|source| MountError::OpenFuseDevice {
                path: "/dev/null".into(),
                target: target.to_owned(),
                source,
            })?;
        state.table.push(target.to_owned());
        Ok(null.into())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut state = self.lock();
        state.calls.push(Call::Unmount(target.to_owned()));
        if state.failing.contains("unmount") {
            return Err(MountError::Unmount {
                target: target.to_owned(),
                source: Errno::EBUSY,
            });
        }
        // The topmost mount at `target` goes.
        if let Some(at) = state.table.iter().rposition(|p| p == target) {
            state.table.remove(at);
        }
        Ok(())
    }

    fn loop_mount(&self, image: &Path, fs_type: FsType, target: &Path) -> Result<(), MountError> {
        let mut state = self.lock();
        state.calls.push(Call::LoopMount {
            image: image.to_owned(),
            fs_type,
            target: target.to_owned(),
        });
        if state.failing.contains("loop_mount") {
            return Err(MountError::LoopMount {
                image: image.to_owned(),
                target: target.to_owned(),
                fs_type: fs_type.as_str(),
                stderr: "told to fail".into(),
            });
        }
        state.table.push(target.to_owned());
        Ok(())
    }

    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, MountError> {
        let mut state = self.lock();
        state.calls.push(Call::MountsUnder(dir.to_owned()));
        if state.failing.contains("mounts_under") {
            return Err(MountError::ReadMountTable {
                path: "/proc/self/mountinfo".into(),
                source: std::io::Error::other("told to fail"),
            });
        }
        Ok(state
            .table
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect())
    }
}
