//! Mounting a virtual disk: one FUSE session, unmounted when its handle is dropped.

use std::sync::Arc;

use fuser::{Config, SessionACL};
use shoal_fetcher::{BlobRead, Histogram};
use tokio::runtime::Handle;
use tracing::info;

use super::fs::DiskFs;
use super::replay::{BlockTrace, DiskRecording};
use super::VirtualDisk;
use crate::error::FsError;
use crate::layer::{MountTarget, MountedLayer};
use crate::learn::{self, Learn};
use crate::syscall::FuseMount;

/// FUSE worker threads per disk: cached reads answer on them, the rest leave at once.
const THREADS: usize = 2;

/// Mounts `disk` read-only at the target's mountpoint as the file [`super::DISK_FILE`] (or
/// serves the connection it carries); reads that miss the cache run on `runtime`, and every
/// read's time is counted in `read_latency`. With `learn` (a new mount only: a connection
/// carried over has started long ago), each blob of the disk replays its trace or records
/// one into the given recording, as tasks the returned layer owns.
pub fn mount(
    disk: Arc<VirtualDisk>,
    blobs: Arc<dyn BlobRead>,
    runtime: Handle,
    target: MountTarget<'_>,
    read_latency: Arc<Histogram>,
    learn: Option<(Learn, Arc<DiskRecording>)>,
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
    let (learn, recording) = learn.unzip();
    let (fs_disk, fs_blobs, fs_runtime) = (disk.clone(), blobs.clone(), runtime.clone());
    let fs_recording = recording.clone();
    let build = |record| {
        DiskFs::new(
            fs_disk,
            fs_blobs,
            fs_runtime,
            record,
            read_latency,
            fs_recording,
        )
    };
    let mut mounted = MountedLayer::start(build, target, &fuse, &config)?;
    if let Some((learn, recording)) = learn.zip(recording) {
        if mounted.carried().is_some() {
            recording.stop();
        } else {
            for (at, layer) in disk.layers().iter().enumerate() {
                let target = BlockTrace {
                    disk: disk.clone(),
                    layer: at,
                    blobs: blobs.clone(),
                };
                let task = learn::run(
                    learn.learning.clone(),
                    learn.image.clone(),
                    layer.blob().clone(),
                    target,
                    recording.recorder(at),
                );
                mounted.tasks.spawn(&runtime, task);
            }
        }
    }
    if mounted.carried().is_some() {
        info!(layer = %top, mountpoint = %mountpoint.display(), "virtual disk carried over from an earlier daemon");
    } else {
        info!(layer = %top, mountpoint = %mountpoint.display(), "virtual disk mounted");
    }
    Ok(mounted)
}
