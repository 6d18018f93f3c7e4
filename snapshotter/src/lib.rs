//! Snapshotter layer of Shoal: containerd's Snapshots API, served over a proxy-plugin socket.
//!
//! - [`ShoalSnapshotter`] implements `containerd_snapshots::Snapshotter`; [`server`] wraps it
//!   in the tonic service the daemon serves.
//! - `metadata`: snapshot records in an embedded transactional store (redb) under the root.
//! - `layout`: on-disk layout and mount lists, identical to containerd's overlayfs snapshotter.
//! - `filter`: containerd's filter syntax for List.
//! - [`remote`]: the remote-snapshot handshake's labels, fallback reasons, and the
//!   [`remote::LayerMounter`] seam through which lazy layers are mounted (a recording double in
//!   tests, FUSE in the daemon): [`FuseMounter`] (eStargz), [`OverlaybdMounter`] (a chain's
//!   virtual disk over FUSE, loop-mounted read-only), [`FormatMounter`] choosing between them.
//! - [`SnapshotError`]: the crate's one error type; `From<SnapshotError> for tonic::Status` is the
//!   only conversion to gRPC codes.
//!
//! Architecture Invariant: a snapshot record is visible only if its directory exists; every
//! change to records is one transaction, and none runs a mount or makes a directory (creation
//! reserves a pending record, makes the directory outside, then commits the record).

mod error;
mod filter;
mod format_mounter;
mod fuse_mounter;
mod layout;
mod manifest;
mod metadata;
mod overlaybd_mounter;
pub mod remote;
mod service;
mod usage;

pub use containerd_snapshots::{api, server, tonic};
pub use error::SnapshotError;
pub use format_mounter::FormatMounter;
pub use fuse_mounter::FuseMounter;
pub use layout::Layout;
pub use overlaybd_mounter::{BlockMount, LoopMount, OverlaybdMounter};
pub use service::{LazyStats, ShoalSnapshotter, SnapshotCounts, UnmountedLayer};
