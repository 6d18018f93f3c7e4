//! A layer's FUSE connection, served fresh or carried over from an earlier daemon.
//!
//! A connection lives as long as any process holds its `/dev/fuse` fd, so a daemon that stops
//! while a holder keeps the fd leaves the kernel waiting, not failing: the next daemon takes
//! the fd back and serves it again. The kernel sends INIT once per connection, and fuser's
//! `Session::from_fd` will not serve a connection before it has seen one (its handshake answers
//! anything else with EIO and gives up). So a carried connection is started on a socket pair
//! that replays the INIT the kernel sent the first daemon ([`KernelInit`], persisted beside the
//! mount), and the session's fd is then swapped for the real connection's with `dup3` before
//! its threads start. Requests the earlier daemon read and never answered are asked for again
//! with `FUSE_NOTIFY_RESEND` (Linux 6.9, protocol 7.40).
//!
//! Architecture Invariant: until a carried connection's session starts, nothing in the daemon
//! touches its mount (not even a stat): the kernel would queue the request for the daemon
//! that is making it wait.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, Filesystem, InitFlags, KernelConfig, Request, Session};
use nix::errno::Errno;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::syscall::{FuseMount, Syscall};
use crate::FsError;

/// `FUSE_INIT` in `fuse_in_header.opcode`.
const OPCODE_INIT: u32 = 26;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND`.
const NOTIFY_RESEND: i32 = 7;
/// `FUSE_INIT_EXT`: `flags2` carries the upper 32 capability bits.
const INIT_EXT: u64 = 1 << 30;
/// The bit the kernel sets in `unique` of a request it sends again.
pub const UNIQUE_RESEND: u64 = 1 << 63;

/// What the kernel offered in a connection's INIT: replayed to a session that takes the
/// connection over, so it negotiates what the first one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInit {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// Capability bits the kernel offered (`flags | flags2 << 32`).
    pub flags: u64,
}

impl KernelInit {
    /// Whether the kernel can send again the requests a stopped daemon had read.
    pub fn can_resend(&self) -> bool {
        (self.major, self.minor) >= (7, 40)
    }

    /// The persisted form, beside the mount it belongs to.
    pub fn path_for(mountpoint: &Path) -> PathBuf {
        let mut name = mountpoint.file_name().unwrap_or_default().to_owned();
        name.push(".kernel-init");
        mountpoint.with_file_name(name)
    }

    /// The `FUSE_INIT` request the kernel sent, as bytes on the wire.
    fn request(&self) -> Vec<u8> {
        let mut flags = self.flags;
        if (self.major, self.minor) >= (7, 36) {
            flags |= INIT_EXT;
        }
        let body: [u32; 16] = [
            self.major,
            self.minor,
            self.max_readahead,
            flags as u32,
            (flags >> 32) as u32,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let len = 40 + body.len() * 4;
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(&(len as u32).to_ne_bytes());
        bytes.extend_from_slice(&OPCODE_INIT.to_ne_bytes());
        bytes.extend_from_slice(&2u64.to_ne_bytes()); // unique
        bytes.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
        bytes.extend_from_slice(&[0; 16]); // uid, gid, pid, padding
        for word in body {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        bytes
    }
}

/// Where a filesystem records the INIT its session negotiated, from its `init` callback.
#[derive(Debug, Clone, Default)]
pub struct InitRecord(Arc<Mutex<Option<KernelInit>>>);

impl InitRecord {
    pub fn record(&self, config: &mut KernelConfig) {
        let abi = config.kernel_abi();
        // fuser has no getter for the offered readahead; asking for more than it refuses it,
        // naming the offer.
        let max_readahead = match config.set_max_readahead(u32::MAX) {
            Err(offered) => offered,
            Ok(previous) => {
                let _ = config.set_max_readahead(previous);
                u32::MAX
            }
        };
        *self.0.lock() = Some(KernelInit {
            major: abi.0,
            minor: abi.1,
            max_readahead,
            flags: (config.capabilities() & !InitFlags::FUSE_INIT_EXT).bits(),
        });
    }

    pub fn get(&self) -> Option<KernelInit> {
        *self.0.lock()
    }
}

/// Counts the requests the kernel sent again to connections taken over ([`UNIQUE_RESEND`] set
/// in `unique`): those an earlier daemon had read and not answered. One per daemon, shared by
/// its connections.
#[derive(Debug, Clone, Default)]
pub struct ResentRequests(Arc<AtomicU64>);

impl ResentRequests {
    /// Counts `request` if it was resent. Serving it needs nothing more: every answer depends
    /// only on the request and the immutable layer, so it is the one the first daemon would
    /// have given.
    pub fn note(&self, request: &Request) {
        let unique = request.unique().0;
        if unique & UNIQUE_RESEND != 0 {
            self.0.fetch_add(1, Ordering::Relaxed);
            debug!(
                unique = unique & !UNIQUE_RESEND,
                "request resent by the kernel after a takeover"
            );
        }
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What a filesystem records about its connection from its callbacks, for the handover.
#[derive(Debug, Clone, Default)]
pub struct ConnectionRecord {
    pub init: InitRecord,
    pub resent: ResentRequests,
}

/// Why a connection could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("duplicate the connection's fd to keep it")]
    KeepFd(#[source] io::Error),
    #[error("start serving a new connection")]
    Handshake(#[source] io::Error),
    #[error("replay INIT to take over a connection")]
    ReplayInit(#[source] io::Error),
    #[error("INIT replayed to take over a connection was refused (error {errno})")]
    InitRefused { errno: i32 },
    #[error("take the carried connection's fd over")]
    SwapFd(#[source] Errno),
    #[error("start the session's threads")]
    Spawn(#[source] io::Error),
    #[error("ask the kernel to resend what an earlier daemon left unanswered")]
    Resend(#[source] Errno),
}

/// Whether requests an earlier daemon left unanswered were asked for again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    Asked,
    /// The kernel predates `FUSE_NOTIFY_RESEND`: those requests wait until the mount goes.
    Unsupported,
}

/// A served connection: its session and a copy of its fd, kept for the next daemon.
pub struct Served {
    pub session: BackgroundSession,
    pub fd: OwnedFd,
}

/// Where a layer's FUSE connection comes from.
#[derive(Debug)]
pub enum Origin {
    /// A new mount.
    New,
    /// A connection an earlier daemon served and a holder kept, negotiated as `init`.
    Carried { fd: OwnedFd, init: KernelInit },
}

/// A session serving a layer's mount, and whether it was carried over.
pub struct Started {
    pub served: Served,
    /// `Some` for a connection carried over from an earlier daemon.
    pub carried: Option<Resend>,
}

/// Starts serving `fs` at `mountpoint`: mounts a new connection through `syscall` and persists
/// the INIT it negotiated, or takes over the one `origin` carries.
#[allow(clippy::too_many_arguments)]
pub fn start<FS: Filesystem + Send + 'static>(
    fs: FS,
    record: &InitRecord,
    mountpoint: &Path,
    mount: &FuseMount,
    config: &Config,
    origin: Origin,
    syscall: &dyn Syscall,
) -> Result<Started, FsError> {
    let serve = |source| FsError::Serve {
        mountpoint: mountpoint.to_owned(),
        source,
    };
    match origin {
        Origin::Carried { fd, init } => {
            let (served, resend) = serve_carried(fs, fd, &init, config).map_err(serve)?;
            Ok(Started {
                served,
                carried: Some(resend),
            })
        }
        Origin::New => {
            let fd = syscall.mount_fuse(mountpoint, mount)?;
            let served = match serve_new(fs, fd, config) {
                Ok(served) => served,
                Err(err) => {
                    let _ = syscall.unmount(mountpoint);
                    return Err(serve(err));
                }
            };
            if let Some(init) = record.get() {
                let path = KernelInit::path_for(mountpoint);
                if let Err(err) = persist(&path, &init) {
                    warn!(path = %path.display(), error = %err, "could not persist the connection's INIT; this layer will not survive a restart of the daemon");
                }
            }
            Ok(Started {
                served,
                carried: None,
            })
        }
    }
}

/// Writes `init` to `path` atomically (a half-written file would be refused at takeover); not
/// synced, as a crash of the machine ends the connection too.
fn persist(path: &Path, init: &KernelInit) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(init)?)?;
    std::fs::rename(&tmp, path)
}

/// The INIT persisted beside `mountpoint` by the daemon that mounted it.
pub fn persisted(mountpoint: &Path) -> io::Result<KernelInit> {
    let bytes = std::fs::read(KernelInit::path_for(mountpoint))?;
    serde_json::from_slice(&bytes).map_err(io::Error::other)
}

/// Serves a connection just mounted (its INIT is waiting on `fd`).
fn serve_new<FS: Filesystem + Send + 'static>(
    fs: FS,
    fd: OwnedFd,
    config: &Config,
) -> Result<Served, ConnectionError> {
    let kept = fd.try_clone().map_err(ConnectionError::KeepFd)?;
    let session =
        Session::from_fd(fs, fd, config.acl, config.clone()).map_err(ConnectionError::Handshake)?;
    let session = session.spawn().map_err(ConnectionError::Spawn)?;
    Ok(Served { session, fd: kept })
}

/// Serves a connection an earlier daemon negotiated as `init`, and asks the kernel to resend
/// what that daemon read and never answered.
fn serve_carried<FS: Filesystem + Send + 'static>(
    fs: FS,
    fd: OwnedFd,
    init: &KernelInit,
    config: &Config,
) -> Result<(Served, Resend), ConnectionError> {
    let (ours, kernel) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ConnectionError::ReplayInit(e.into()))?;
    nix::unistd::write(&kernel, &init.request())
        .map_err(|e| ConnectionError::ReplayInit(e.into()))?;
    let session = Session::from_fd(fs, ours, config.acl, config.clone())
        .map_err(ConnectionError::ReplayInit)?;
    check_init_reply(kernel.as_fd())?;
    let session_fd = session.as_fd().as_raw_fd();
    // SAFETY: both fds are open and owned: `fd` by this function, `session_fd` by `session`,
    // whose threads have not started, so no other thread reads or writes it. dup3 replaces the
    // socket under `session_fd` with the connection atomically; the session owns the number
    // and closes it as before, now closing its copy of the connection.
    let swapped = unsafe { libc::dup3(fd.as_raw_fd(), session_fd, libc::O_CLOEXEC) };
    if swapped < 0 {
        return Err(ConnectionError::SwapFd(Errno::last()));
    }
    let resend = if init.can_resend() {
        notify_resend(fd.as_fd())?;
        Resend::Asked
    } else {
        Resend::Unsupported
    };
    let session = session.spawn().map_err(ConnectionError::Spawn)?;
    Ok((Served { session, fd }, resend))
}

/// Reads the session's answer to the replayed INIT: a `fuse_out_header` with no error.
fn check_init_reply(kernel: BorrowedFd<'_>) -> Result<(), ConnectionError> {
    let mut reply = [0u8; 4096];
    let n = nix::unistd::read(kernel.as_raw_fd(), &mut reply)
        .map_err(|e| ConnectionError::ReplayInit(e.into()))?;
    if n < 16 {
        return Err(ConnectionError::ReplayInit(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short reply to INIT",
        )));
    }
    let errno = i32::from_ne_bytes([reply[4], reply[5], reply[6], reply[7]]);
    if errno != 0 {
        return Err(ConnectionError::InitRefused { errno: -errno });
    }
    Ok(())
}

/// Moves every request of the connection that a server read but never answered back to the
/// kernel's queue, marked with [`UNIQUE_RESEND`].
fn notify_resend(fd: BorrowedFd<'_>) -> Result<(), ConnectionError> {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&NOTIFY_RESEND.to_ne_bytes());
    nix::unistd::write(fd, &header).map_err(ConnectionError::Resend)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replayed_init_is_a_well_formed_request() {
        let init = KernelInit {
            major: 7,
            minor: 41,
            max_readahead: 131072,
            flags: 0x1_0000_0001,
        };
        let bytes = init.request();
        assert_eq!(bytes.len(), 104);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_ne_bytes(bytes[4..8].try_into().unwrap()), 26);
        let word = |i: usize| u32::from_ne_bytes(bytes[40 + 4 * i..44 + 4 * i].try_into().unwrap());
        assert_eq!((word(0), word(1), word(2)), (7, 41, 131072));
        assert_eq!(word(3), 1 | (1 << 30), "flags2 in use: INIT_EXT set");
        assert_eq!(word(4), 1);
        assert!(init.can_resend());
        assert!(!KernelInit { minor: 39, ..init }.can_resend());
    }

    #[test]
    fn the_kernel_init_sits_beside_its_mount() {
        assert_eq!(
            KernelInit::path_for(Path::new("/r/snapshots/3/fs")),
            Path::new("/r/snapshots/3/fs.kernel-init")
        );
    }
}
