//! Mounting a layer: one FUSE session per layer, unmounted when its handle is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::fs::{now_secs, LayerFs};
use super::{ChunkReader, EstargzLayer};
use crate::error::FsError;

/// FUSE worker threads per layer: metadata is answered from memory, slow reads leave the thread.
const THREADS: usize = 2;

/// A mounted layer; dropping it unmounts.
pub struct MountedLayer {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl MountedLayer {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(err) = session.umount_and_join() {
                warn!(mountpoint = %self.mountpoint.display(), error = %err, "unmount failed");
            }
        }
    }
}

/// Mounts `layer` read-only at `mountpoint`; reads that miss run on `runtime`. Starts the
/// prefetch of the landmark-prioritized files.
pub fn mount(
    layer: EstargzLayer,
    reader: Arc<ChunkReader>,
    runtime: Handle,
    mountpoint: &Path,
    prefetch: bool,
) -> Result<MountedLayer, FsError> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("shoal:{}", layer.blob.digest)),
        MountOption::Subtype("shoal".into()),
        MountOption::RO,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::DefaultPermissions,
    ];
    // Containers run as any user; the kernel enforces modes (default_permissions).
    config.acl = SessionACL::All;
    config.n_threads = Some(THREADS);
    let prefetch_end = layer.index.prefetch_end().filter(|_| prefetch);
    let blob = layer.blob.clone();
    let fs = LayerFs::new(layer, reader.clone(), runtime.clone());
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|source| FsError::Mount {
        mountpoint: mountpoint.to_owned(),
        source,
    })?;
    info!(blob = %blob.digest, mountpoint = %mountpoint.display(), at = now_secs(), "layer mounted");
    if let Some(end) = prefetch_end {
        runtime.spawn(async move {
            match reader.fetcher().prefetch(&blob, 0..end).await {
                Ok(()) => info!(blob = %blob.digest, bytes = end, "prefetched prioritized files"),
                Err(err) => warn!(blob = %blob.digest, error = %err, "prefetch failed"),
            }
        });
    }
    Ok(MountedLayer {
        mountpoint: mountpoint.to_owned(),
        session: Some(session),
    })
}
