//! Mounting a virtual disk: one FUSE session, unmounted when its handle is dropped.

use std::sync::Arc;

use fuser::{Config, SessionACL};
use shoal_fetcher::{BlobRead, Histogram};
use tokio::runtime::Handle;
use tracing::info;

use super::fs::DiskFs;
use super::VirtualDisk;
use crate::error::FsError;
use crate::layer::{MountTarget, MountedLayer};
use crate::syscall::FuseMount;

/// FUSE worker threads per disk: cached reads answer on them, the rest leave at once.
const THREADS: usize = 2;

/// Mounts `disk` read-only at the target's mountpoint as the file [`super::DISK_FILE`] (or
/// serves the connection it carries); reads that miss the cache run on `runtime`, and every
/// read's time is counted in `read_latency`.
pub fn mount(
    disk: Arc<VirtualDisk>,
    blobs: Arc<dyn BlobRead>,
    runtime: Handle,
    target: MountTarget<'_>,
    read_latency: Arc<Histogram>,
) -> Result<MountedLayer, FsError> {
    let mountpoint = target.mountpoint;
    let top = disk
        .layers()
        .first()
        .map(|l| l.blob().digest.to_string())
        .unwrap_or_default();
    // Only root (the loop driver's opener) reads the disk.
    let fuse = FuseMount {
        source: format!("shoal-vdisk:{top}"),
        allow_other: false,
        dev_suid: false,
    };
    let mut config = Config::default();
    config.acl = SessionACL::Owner;
    config.n_threads = Some(THREADS);
    let build = |record| DiskFs::new(disk, blobs, runtime, record, read_latency);
    let mounted = MountedLayer::start(build, target, &fuse, &config)?;
    if mounted.carried().is_some() {
        info!(layer = %top, mountpoint = %mountpoint.display(), "virtual disk carried over from an earlier daemon");
    } else {
        info!(layer = %top, mountpoint = %mountpoint.display(), "virtual disk mounted");
    }
    Ok(mounted)
}
