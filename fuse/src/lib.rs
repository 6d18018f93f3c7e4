//! Filesystem layer of Shoal: the FUSE filesystems that present lazily pulled layers, over the
//! pure format readers of `shoal-formats`.
//!
//! - [`layer`]: an opened eStargz layer ([`layer::EstargzLayer`]), the [`layer::ChunkReader`]
//!   that verifies every chunk before it is served, and [`layer::mount`].
//! - [`vdisk`]: an overlaybd layer stack's merged virtual disk ([`vdisk::VirtualDisk`]), read
//!   through the chunk cache with every ZFile block CRC-checked, served as one FUSE file.
//! - [`syscall`]: the one seam for mount syscalls (unmount, read-only loop mount, the mount
//!   table), real and recording; [`tasks`]: background tasks a mounted layer owns.
//! - [`FsError`]: the crate's error; [`FsError::errno`] is the one conversion to FUSE errors.
//!
//! Architecture Invariant: the FUSE thread never waits on the network; a read that misses the
//! cache moves its reply into a task on the daemon's runtime.

mod error;
pub mod layer;
pub mod syscall;
pub mod tasks;
pub mod vdisk;

pub use error::FsError;
