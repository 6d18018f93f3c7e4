//! Mounting a virtual disk: one FUSE session, unmounted when its handle is dropped.

use std::path::Path;
use std::sync::Arc;

use fuser::{Config, MountOption, SessionACL};
use shoal_fetcher::BlobRead;
use tokio::runtime::Handle;
use tracing::info;

use super::fs::DiskFs;
use super::VirtualDisk;
use crate::error::FsError;
use crate::layer::MountedLayer;

/// FUSE worker threads per disk: cached reads answer on them, the rest leave at once.
const THREADS: usize = 2;

/// Mounts `disk` read-only at `mountpoint` as the file [`super::DISK_FILE`]; reads that miss
/// the cache run on `runtime`.
pub fn mount(
    disk: Arc<VirtualDisk>,
    blobs: Arc<dyn BlobRead>,
    runtime: Handle,
    mountpoint: &Path,
) -> Result<MountedLayer, FsError> {
    let top = disk
        .layers()
        .first()
        .map(|l| l.blob().digest.to_string())
        .unwrap_or_default();
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("shoal-vdisk:{top}")),
        MountOption::Subtype("shoal".into()),
        MountOption::RO,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    // Only root (the loop driver's opener) reads the disk.
    config.acl = SessionACL::Owner;
    config.n_threads = Some(THREADS);
    let fs = DiskFs::new(disk, blobs, runtime);
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|source| FsError::Mount {
        mountpoint: mountpoint.to_owned(),
        source,
    })?;
    info!(layer = %top, mountpoint = %mountpoint.display(), "virtual disk mounted");
    Ok(MountedLayer::from_session(mountpoint, session))
}
