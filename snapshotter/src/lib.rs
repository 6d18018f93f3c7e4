//! Snapshotter layer of Shoal: containerd's Snapshots API, served over a proxy-plugin socket.
//!
//! - [`ShoalSnapshotter`] implements `containerd_snapshots::Snapshotter`; [`server`] wraps it
//!   in the tonic service the daemon serves.
//! - `metadata`: snapshot records in an embedded transactional store (redb) under the root.
//! - `layout`: on-disk layout and mount lists, identical to containerd's overlayfs snapshotter.
//! - `filter`: containerd's filter syntax for List.
//! - [`remote`]: the remote-snapshot handshake's labels, fallback reasons, and the
//!   [`remote::LayerMounter`] seam through which lazy layers are mounted (a recording double in
//!   tests, FUSE in the daemon): [`LazyMounter`], one lifecycle for every format, with the
//!   per-format parts behind [`LazyFormat`]: [`EstargzFormat`] (a FUSE tree) and
//!   [`OverlaybdFormat`] (a chain's virtual disk over FUSE, loop-mounted read-only).
//!   An image's first eStargz Prepare opens the layers above it ahead (`open_ahead`), so later
//!   Prepares find their TOCs fetched and verified.
//! - [`MountPolicy`]: the prefetch and resolve timeout that layers are opened and mounted
//!   with, read at each open and mount so that a reload applies from the next layer on.
//! - [`SnapshotError`]: the crate's one error type; `From<SnapshotError> for tonic::Status` is the
//!   only conversion to gRPC codes.
//!
//! Architecture Invariant: a snapshot record is visible only if its directory exists; every
//! change to records is one transaction, and none runs a mount or makes a directory (creation
//! reserves a pending record, makes the directory outside, then commits the record).

mod error;
mod estargz_format;
mod filter;
mod layout;
mod lazy_format;
mod lazy_mounter;
mod manifest;
mod metadata;
mod mount_policy;
mod mount_table;
mod open_ahead;
mod overlaybd_format;
pub mod remote;
mod service;
mod usage;

pub use containerd_snapshots::{api, server, tonic};
pub use error::SnapshotError;
pub use estargz_format::EstargzFormat;
pub use layout::Layout;
pub use lazy_format::{LazyFormat, Opened, OpenedLayer, Served};
pub use lazy_mounter::{HandoverReport, LazyMounter};
pub use mount_policy::{MountPolicy, MountSettings};
pub use mount_table::MountedBlob;
pub use overlaybd_format::OverlaybdFormat;
pub use service::{LazyStats, ShoalSnapshotter, SnapshotCounts, UnmountedLayer};
