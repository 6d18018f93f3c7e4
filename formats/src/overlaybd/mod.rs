//! overlaybd block-layer formats, as pure readers and writers over bytes.
//!
//! A layer blob is an optional [`tar_wrapper`] around a [`zfile`] (compressed, CRC-checked
//! blocks) around an [`lsmt`] file (a log-structured index from virtual-disk sectors to data).
//! [`stack`] merges the indexes of a layer stack top first and [`Disk`] reads the resulting
//! virtual disk (an ext4 or erofs image). The readers here do their I/O through
//! [`BlockSource`] (tests, fuzzing and `shoal convert` hold whole blobs); the FUSE virtual
//! disk, whose blobs arrive through the fetcher, executes the same [`BlockMap`] plans.
//!
//! Typical read path for one layer: `tar_wrapper::locate` → [`Window`] over the payload →
//! [`ZFileReader`] → [`LsmtFile::open`]; then [`Disk::open`] over the per-layer readers.
//!
//! The one ZFile block map: [`ZFile::span`] / [`ZFile::decode_span`] say which blocks hold a
//! range and how to check and decompress them ([`ZFileReader`] executes that); a [`Layer`]
//! (parsed from [`LayerMeta`] bytes) places its ZFile in the blob, and [`BlockMap`] composes
//! the [`Stack`] with each layer's blocks into a plan of [`Step`]s for any virtual-disk range,
//! which the FUSE virtual disk executes through the fetcher.

pub mod block_digests;
mod block_map;
mod disk;
mod layer;
pub mod lsmt;
mod source;
pub mod stack;
pub mod tar_wrapper;
pub mod zfile;

pub use block_digests::{BlockDigests, BlockDigestsError, TableRef};
pub use block_map::{BlockMap, BlockMapError, Step};
pub use disk::{Disk, DiskError};
pub use layer::{Layer, LayerError, LayerMeta};
pub use lsmt::{LsmtError, LsmtFile};
pub use source::{BlockSource, SourceError, Window};
pub use stack::{Piece, Stack, StackError};
pub use tar_wrapper::{Payload, TarWrapperError};
pub use zfile::{BlockSpan, ZFile, ZFileError, ZFileReader};

/// Annotation on an overlaybd layer descriptor naming the blob's digest.
pub const ANNOTATION_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
/// Annotation carrying the blob size in bytes.
pub const ANNOTATION_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
/// Annotation carrying the overlaybd format version (e.g. `0.1.0`).
pub const ANNOTATION_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
/// Annotation naming the filesystem inside the virtual disk (`ext4` or `erofs`).
pub const ANNOTATION_FS_TYPE: &str = "containerd.io/snapshot/overlaybd/blob-fs-type";

#[cfg(test)]
pub(crate) mod fixture_tests;
