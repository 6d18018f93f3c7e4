//! Mounting a layer: one FUSE session per layer, unmounted when its handle is dropped, unless
//! it is left serving for the next daemon.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, SessionACL};
use shoal_fetcher::{read_most, Checked, Completion};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::fs::{now_secs, LayerFs};
use super::replay::ChunkTrace;
use super::{ChunkReader, EstargzLayer};
use crate::connection::{self, ConnectionRecord, InitRecord, Origin, Resend, ResentRequests};
use crate::error::FsError;
use crate::learn::{self, Learn, Recorder};
use crate::syscall::{FuseMount, MountError, Syscall};
use crate::tasks::Tasks;

/// FUSE worker threads per layer: metadata is answered from memory, slow reads leave the thread.
const THREADS: usize = 2;

/// A mounted layer; dropping it unmounts (unless detached) and waits for its session to end.
/// Its background tasks (prefetch) end when it is detached or dropped.
pub struct MountedLayer {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    /// A copy of the connection's `/dev/fuse` fd, for a holder to keep across a restart.
    connection: std::os::fd::OwnedFd,
    carried: Option<Resend>,
    syscall: Arc<dyn Syscall>,
    detached: bool,
    pub(crate) tasks: Tasks,
}

impl MountedLayer {
    /// Serves the filesystem `build` makes around its connection record at the target: mounts
    /// a new connection or takes over the one the target's origin carries. Both formats start
    /// here.
    pub(crate) fn start<FS: fuser::Filesystem + Send + 'static>(
        build: impl FnOnce(ConnectionRecord) -> FS,
        target: MountTarget<'_>,
        fuse: &FuseMount,
        config: &Config,
    ) -> Result<MountedLayer, FsError> {
        let record = ConnectionRecord {
            init: InitRecord::default(),
            resent: target.resent.clone(),
        };
        let fs = build(record.clone());
        let started = connection::start(
            fs,
            &record.init,
            target.mountpoint,
            fuse,
            config,
            target.origin,
            &*target.syscall,
        )?;
        Ok(MountedLayer {
            mountpoint: target.mountpoint.to_owned(),
            session: Some(started.served.session),
            connection: started.served.fd,
            carried: started.carried,
            syscall: target.syscall,
            detached: false,
            tasks: Tasks::default(),
        })
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The connection's `/dev/fuse` fd: whoever holds a copy keeps the mount serving-ready.
    pub fn connection(&self) -> BorrowedFd<'_> {
        self.connection.as_fd()
    }

    /// `Some` if this session took over a connection an earlier daemon served.
    pub fn carried(&self) -> Option<Resend> {
        self.carried
    }

    /// Stops the layer's tasks and leaves its mount and session as they are, for this process's
    /// end: the kernel keeps the connection for whoever holds a copy of its fd, and the
    /// requests this daemon read but did not answer are resent to the next one.
    pub fn leave_serving(mut self) {
        self.tasks.cancel();
        // Dropped unjoined: its threads serve until the process exits.
        drop(self.session.take());
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
        if !self.detached {
            if let Err(err) = self.syscall.unmount(&self.mountpoint) {
                warn!(mountpoint = %self.mountpoint.display(), error = %shoal_fetcher::with_causes(&err), "unmount failed");
                // Its session ends when the mount does; waiting here could be forever.
                return;
            }
        }
        if let Err(err) = session.join() {
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
    /// Without `background_rate`: the whole layer in the background, unpaced, once this
    /// share (0 < share <= 1) of it is cached.
    pub complete_after: Option<f64>,
}

/// How a layer's reads check what is prefetched: every chunk against its digest from the
/// verified TOC (an index is not built otherwise), so peers may supply it.
const CHECKED: Checked = Checked::ChunkDigests;

/// Where and how a layer is mounted.
pub struct MountTarget<'a> {
    pub mountpoint: &'a Path,
    pub syscall: Arc<dyn Syscall>,
    pub origin: Origin,
    /// Where the daemon counts requests resent to its connections.
    pub resent: ResentRequests,
}

/// Mounts `layer` read-only at the target's mountpoint (or serves the connection it carries);
/// reads that miss run on `runtime`. Starts the prefetch of the landmark-prioritized files
/// and, if asked, of the whole layer, and with `learn` the learned prefetch (a new mount
/// only: a connection carried over has started long ago), as tasks the returned layer owns.
pub fn mount(
    layer: EstargzLayer,
    reader: Arc<ChunkReader>,
    runtime: Handle,
    target: MountTarget<'_>,
    prefetch: Prefetch,
    learn: Option<Learn>,
) -> Result<MountedLayer, FsError> {
    let mountpoint = target.mountpoint;
    // Containers run as any user; the kernel enforces modes (default_permissions).
    let fuse = FuseMount {
        source: format!("shoal:{}", layer.blob.digest),
        allow_other: true,
        dev_suid: true,
    };
    let mut config = Config::default();
    config.acl = SessionACL::All;
    config.n_threads = Some(THREADS);
    let prefetch_end = layer.index.prefetch_end().filter(|_| prefetch.landmark);
    let blob = layer.blob.clone();
    let (layer_reader, layer_runtime) = (reader.clone(), runtime.clone());
    let learner = learn.map(|learn| (learn, Recorder::new(), layer.clone()));
    let recorder = learner.as_ref().map(|(_, recorder, _)| recorder.clone());
    let build = |record| LayerFs::new(layer, layer_reader, layer_runtime, record, recorder);
    let mut mounted = MountedLayer::start(build, target, &fuse, &config)?;
    if let Some((learn, recorder, layer)) = learner {
        if mounted.carried().is_some() {
            recorder.stop();
        } else {
            let blob = layer.blob.clone();
            let target = ChunkTrace {
                layer,
                reader: reader.clone(),
            };
            let task = learn::run(learn.learning, learn.image, blob, target, recorder);
            mounted.tasks.spawn(&runtime, task);
        }
    }
    if mounted.carried().is_some() {
        info!(blob = %blob.digest, mountpoint = %mountpoint.display(), at = now_secs(), "layer carried over from an earlier daemon");
    } else {
        info!(blob = %blob.digest, mountpoint = %mountpoint.display(), at = now_secs(), "layer mounted");
    }
    let complete_after = prefetch
        .complete_after
        .filter(|_| prefetch.background_rate.is_none());
    if prefetch_end.is_some() || prefetch.background_rate.is_some() || complete_after.is_some() {
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
                background_fetch(&reader, &blob, Some(rate)).await;
            } else if let Some(share) = complete_after {
                let blobs = reader.blobs();
                read_most(|| blobs.cached_bytes(&blob), blob.size, share).await;
                info!(blob = %blob.digest, share, "reads brought in most of the layer; completing it");
                background_fetch(&reader, &blob, None).await;
            }
        });
    }
    Ok(mounted)
}

/// Fetches the whole blob into the cache at most `rate` bytes per second (`None`: as fast as
/// the link goes), skipping what is cached, several ranges at once while no read is fetching.
async fn background_fetch(reader: &ChunkReader, blob: &shoal_fetcher::BlobRef, rate: Option<u64>) {
    let blobs = reader.blobs();
    let completed = Completion::new(rate)
        .run(
            blob,
            || blobs.foreground_fetching(),
            |range| blobs.prefetch(blob, range, CHECKED),
        )
        .await;
    match completed {
        Ok(()) => {
            info!(blob = %blob.digest, bytes = blob.size, "layer fully fetched in the background")
        }
        Err(err) => {
            warn!(blob = %blob.digest, error = %shoal_fetcher::with_causes(&err), "background fetch stopped")
        }
    }
}
