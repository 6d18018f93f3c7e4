//! Mounting a layer: one FUSE session per layer, unmounted when its handle is dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use shoal_fetcher::Checked;
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::fs::{now_secs, LayerFs};
use super::{ChunkReader, EstargzLayer};
use crate::error::FsError;
use crate::syscall::{MountError, Syscall};
use crate::tasks::Tasks;

/// FUSE worker threads per layer: metadata is answered from memory, slow reads leave the thread.
const THREADS: usize = 2;

/// A mounted layer; dropping it unmounts (unless detached) and waits for its session to end.
/// Its background tasks (prefetch) end when it is detached or dropped.
pub struct MountedLayer {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    detached: bool,
    tasks: Tasks,
}

impl MountedLayer {
    /// Wraps a FUSE session serving `mountpoint` (a virtual disk's, say).
    pub(crate) fn from_session(mountpoint: &Path, session: BackgroundSession) -> MountedLayer {
        MountedLayer {
            mountpoint: mountpoint.to_owned(),
            session: Some(session),
            detached: false,
            tasks: Tasks::default(),
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Background tasks of this layer still running.
    pub fn tasks_running(&self) -> usize {
        self.tasks.running()
    }

    /// Lazily unmounts the layer through `syscall` (`MNT_DETACH`): it leaves the mount table at
    /// once, while an overlay stacked on it keeps being served until it lets go. Its background
    /// tasks stop. Dropping the layer afterwards waits for the overlay to let go, so do it off
    /// any thread that must not block.
    pub fn detach(&mut self, syscall: &dyn Syscall) -> Result<(), MountError> {
        self.tasks.cancel();
        if self.detached {
            return Ok(());
        }
        syscall.unmount(&self.mountpoint)?;
        self.detached = true;
        Ok(())
    }
}

impl Drop for MountedLayer {
    fn drop(&mut self) {
        self.tasks.cancel();
        let Some(session) = self.session.take() else {
            return;
        };
        let ended = if self.detached {
            session.join()
        } else {
            session.umount_and_join()
        };
        if let Err(err) = ended {
            warn!(mountpoint = %self.mountpoint.display(), error = %shoal_fetcher::with_causes(&err), "unmount failed");
        }
    }
}

/// What to fetch ahead of reads once a layer is mounted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prefetch {
    /// The files a `.prefetch.landmark` marks as prioritized, right away.
    pub landmark: bool,
    /// The whole layer in the background, at most this many bytes per second.
    pub background_rate: Option<u64>,
}

/// How a layer's reads check what is prefetched: every chunk against its digest from the
/// verified TOC (an index is not built otherwise), so peers may supply it.
const CHECKED: Checked = Checked::ChunkDigests;

/// Step of the background fetch: large enough to coalesce, small enough to pace.
const BACKGROUND_STEP: u64 = 4 << 20;

/// Mounts `layer` read-only at `mountpoint`; reads that miss run on `runtime`. Starts the
/// prefetch of the landmark-prioritized files and, if asked, of the whole layer, as tasks the
/// returned layer owns.
pub fn mount(
    layer: EstargzLayer,
    reader: Arc<ChunkReader>,
    runtime: Handle,
    mountpoint: &Path,
    prefetch: Prefetch,
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
    let prefetch_end = layer.index.prefetch_end().filter(|_| prefetch.landmark);
    let blob = layer.blob.clone();
    let fs = LayerFs::new(layer, reader.clone(), runtime.clone());
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(|source| FsError::Mount {
        mountpoint: mountpoint.to_owned(),
        source,
    })?;
    info!(blob = %blob.digest, mountpoint = %mountpoint.display(), at = now_secs(), "layer mounted");
    let mut mounted = MountedLayer::from_session(mountpoint, session);
    if prefetch_end.is_some() || prefetch.background_rate.is_some() {
        mounted.tasks.spawn(&runtime, async move {
            if let Some(end) = prefetch_end {
                match reader.blobs().prefetch(&blob, 0..end, CHECKED).await {
                    Ok(()) => {
                        info!(blob = %blob.digest, bytes = end, "prefetched prioritized files")
                    }
                    Err(err) => warn!(blob = %blob.digest, error = %shoal_fetcher::with_causes(&err), "prefetch failed"),
                }
            }
            if let Some(rate) = prefetch.background_rate {
                background_fetch(&reader, &blob, rate).await;
            }
        });
    }
    Ok(mounted)
}

/// Fetches the whole blob into the cache at `rate` bytes per second, skipping what is cached.
async fn background_fetch(reader: &ChunkReader, blob: &shoal_fetcher::BlobRef, rate: u64) {
    let started = std::time::Instant::now();
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + BACKGROUND_STEP).min(blob.size);
        if let Err(err) = reader.blobs().prefetch(blob, offset..end, CHECKED).await {
            warn!(blob = %blob.digest, error = %shoal_fetcher::with_causes(&err), "background fetch stopped");
            return;
        }
        offset = end;
        // Pace against the start so a slow step is not followed by a burst.
        let due = std::time::Duration::from_secs_f64(offset as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    info!(blob = %blob.digest, bytes = blob.size, "layer fully fetched in the background");
}
