//! The merged virtual disk of an overlaybd layer stack, served lazily as one read-only FUSE file.
//!
//! - [`DiskLayer`]: one overlaybd layer blob opened through the chunk cache: its tar wrapper,
//!   ZFile header, trailer and jump table, and the LSMT index inside (fetched here, parsed and
//!   checked by `shoal_formats::overlaybd::Layer`).
//! - [`VirtualDisk`]: layers stacked top first; `shoal_formats::overlaybd::BlockMap` plans each
//!   read as spans of ZFile blocks, which are read through [`shoal_fetcher::BlobRead`] with a
//!   decoder that checks each block's CRC and decompresses it, and against the layer's block
//!   digest table when it has one ([`LayerChecks`]; the fetcher decides where the bytes may
//!   come from and refetches a bad span once), and kept in a small memory of decoded blocks. Its metadata
//!   persists as bytes, so a restart reopens it without the registry.
//! - [`fetch_and_verify`]: the background fetch of a whole blob, ending with its sha256 check.
//! - [`mount`]: a FUSE filesystem holding the one file [`DISK_FILE`], whose content is the disk;
//!   with learned prefetch, each blob's first-start reads recorded as runs of ZFile blocks, or
//!   a trace of them fetched at mount (`replay.rs`).
//!
//! The snapshotter loop-mounts that file read-only (ext4 or erofs, see [`FsType`]).

mod checks;
mod disk;
mod fs;
mod layer;
mod memory;
mod mount;
mod persisted;
mod replay;
mod verify;

pub use checks::{LayerChecks, NO_TABLE};
pub use disk::{PendingRead, VirtualDisk};
pub use layer::DiskLayer;
pub use mount::mount;
pub use replay::DiskRecording;
pub use verify::fetch_and_verify;

/// Name of the file, at the root of a disk's FUSE mount, whose content is the virtual disk.
pub const DISK_FILE: &str = "disk";

/// The filesystem inside a virtual disk (annotation `containerd.io/snapshot/overlaybd/blob-fs-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Erofs,
}

impl FsType {
    /// The filesystem an annotation names; no annotation means ext4, as in the reference.
    pub fn from_annotation(value: Option<&str>) -> Option<FsType> {
        match value.unwrap_or("ext4") {
            "ext4" => Some(FsType::Ext4),
            "erofs" => Some(FsType::Erofs),
            _ => None,
        }
    }

    /// The name `mount -t` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
        }
    }
}

#[cfg(test)]
mod tests;
