use std::path::PathBuf;

use containerd_snapshots::tonic::{Code, Status};

/// Why a snapshot operation failed. Converted to a gRPC status exactly once, at the API boundary.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("open metadata store {path}: {source}")]
    OpenStore {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("metadata store {operation}: {source}")]
    Store {
        operation: &'static str,
        source: Box<redb::Error>,
    },
    #[error("decode metadata record of snapshot {key}: {source}")]
    DecodeRecord {
        key: String,
        source: serde_json::Error,
    },
    #[error("snapshot {key} does not exist")]
    NotFound { key: String },
    #[error("snapshot {key} already exists")]
    AlreadyExists { key: String },
    #[error("parent snapshot {parent} does not exist")]
    ParentNotFound { parent: String },
    #[error("parent {parent} is not a committed snapshot")]
    ParentNotCommitted { parent: String },
    #[error("snapshot {key} is not active (it is {kind})")]
    NotActive { key: String, kind: &'static str },
    #[error("snapshot {key} is committed and has no mounts")]
    NoMounts { key: String },
    #[error("cannot remove snapshot {key}: it has children")]
    HasChildren { key: String },
    #[error("invalid filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("cannot update field {field:?} of snapshot {key}")]
    InvalidUpdateField { key: String, field: String },
    #[error("invalid label {label:?}: {reason}")]
    InvalidLabel { label: String, reason: String },
    #[error("invalid snapshot key: {reason}")]
    InvalidKey { reason: &'static str },
    #[error("create snapshot directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("remove snapshot directory {path}: {source}")]
    RemoveDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("measure disk usage of {path}: {source}")]
    DiskUsage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount remote layer at {mountpoint}: {reason}")]
    MountLayer { mountpoint: PathBuf, reason: String },
    #[error("serve layer over FUSE at {mountpoint}")]
    ServeLayer {
        mountpoint: PathBuf,
        #[source]
        source: Box<shoal_fuse::FsError>,
    },
    #[error("mount virtual disk on {mountpoint}")]
    MountDisk {
        mountpoint: PathBuf,
        #[source]
        source: shoal_fuse::syscall::MountError,
    },
    #[error("unmount layer at {mountpoint}")]
    UnmountLayer {
        mountpoint: PathBuf,
        #[source]
        source: shoal_fuse::syscall::MountError,
    },
    #[error("persist layer index at {path}: {source}")]
    PersistIndex {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "block layer {layer} cannot be mounted, and a block layer has no files to unpack: {reason}"
    )]
    BlockLayerUnavailable { layer: String, reason: String },
    #[error("layer {key} ({layer}) is not mounted and cannot be mounted again: {reason}")]
    LayerUnavailable {
        key: String,
        layer: String,
        reason: String,
    },
    #[error("blocking task for {operation} failed: {reason}")]
    Task {
        operation: &'static str,
        reason: String,
    },
}

impl SnapshotError {
    pub(crate) fn store(operation: &'static str, source: impl Into<redb::Error>) -> Self {
        SnapshotError::Store {
            operation,
            source: Box::new(source.into()),
        }
    }

    /// The gRPC code containerd maps back to its `errdefs` errors.
    pub fn code(&self) -> Code {
        use SnapshotError::*;
        match self {
            NotFound { .. } | ParentNotFound { .. } => Code::NotFound,
            AlreadyExists { .. } => Code::AlreadyExists,
            NotActive { .. } | NoMounts { .. } | HasChildren { .. } => Code::FailedPrecondition,
            ParentNotCommitted { .. }
            | InvalidFilter { .. }
            | InvalidUpdateField { .. }
            | InvalidLabel { .. }
            | InvalidKey { .. } => Code::InvalidArgument,
            OpenStore { .. }
            | Store { .. }
            | DecodeRecord { .. }
            | CreateDir { .. }
            | RemoveDir { .. }
            | DiskUsage { .. }
            | MountLayer { .. }
            | ServeLayer { .. }
            | MountDisk { .. }
            | UnmountLayer { .. }
            | PersistIndex { .. }
            | Task { .. } => Code::Internal,
            BlockLayerUnavailable { .. } | LayerUnavailable { .. } => Code::Unavailable,
        }
    }
}

impl From<SnapshotError> for Status {
    fn from(err: SnapshotError) -> Status {
        Status::new(err.code(), with_causes(&err))
    }
}

pub(crate) use shoal_fetcher::with_causes;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_follow_the_message_once() {
        let unmount = SnapshotError::UnmountLayer {
            mountpoint: "/r/snapshots/1/fs".into(),
            source: shoal_fuse::syscall::MountError::Unmount {
                target: "/r/snapshots/1/fs".into(),
                source: nix::errno::Errno::EBUSY,
            },
        };
        let status = Status::from(unmount);
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(
            status.message(),
            "unmount layer at /r/snapshots/1/fs: unmount /r/snapshots/1/fs: \
             EBUSY: Device or resource busy"
        );
        let spelled = SnapshotError::CreateDir {
            path: "/r/x".into(),
            source: std::io::Error::other("disk full"),
        };
        assert_eq!(
            with_causes(&spelled),
            "create snapshot directory /r/x: disk full"
        );
    }
}
