//! Filesystem layer of Shoal: the FUSE filesystems that present lazily pulled layers, over the
//! pure format readers of `shoal-formats`.
//!
//! - [`layer`]: an opened eStargz layer ([`layer::EstargzLayer`]), the [`layer::ChunkReader`]
//!   that verifies every chunk before it is served, and [`layer::mount`].
//! - [`vdisk`]: an overlaybd layer stack's merged virtual disk ([`vdisk::VirtualDisk`]), read
//!   through the chunk cache with every ZFile block CRC-checked, served as one FUSE file.
//! - `learn`: learned prefetch for both (recording the parts a first start reads, finding a
//!   trace and replaying it), re-exported through [`layer`].
//! - [`syscall`]: the one seam for mount syscalls (FUSE mount, unmount, read-only loop mount,
//!   the mount table), real and recording; [`tasks`]: background tasks a mounted layer owns.
//! - [`connection`]: a layer's FUSE connection, served new or carried over from an earlier
//!   daemon ([`connection::KernelInit`] replayed, unanswered requests resent);
//!   [`handover`]: where connections wait between daemons (Shoal's fd holder or systemd's
//!   fd store).
//! - [`FsError`]: the crate's error; [`FsError::errno`] is the one conversion to FUSE errors.
//!
//! Architecture Invariant: the FUSE thread never waits on the network; a read that misses the
//! cache moves its reply into a task on the daemon's runtime.

pub mod connection;
mod error;
pub mod handover;
pub mod layer;
mod learn;
pub mod syscall;
pub mod tasks;
pub mod vdisk;

pub use error::FsError;
