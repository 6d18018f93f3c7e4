//! The lifecycle with a fake format whose mounts hold a background task that never ends by
//! itself, over the recording mount seam.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};
use shoal_fuse::handover::FdStore;
use shoal_fuse::syscall::{Call, RecordingSyscall, Syscall};
use shoal_fuse::tasks::Tasks;
use shoal_fuse::vdisk::FsType;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::LazyMounter;
use crate::error::SnapshotError;
use crate::lazy_format::{Carried, LazyFormat, Opened, OpenedLayer, Served};
use crate::remote::{Fallback, LayerFormat, LayerLabels, LayerMounter, RemoteLayer, ResolvedLayer};

/// Bounds every wait on a task's end; a correct run waits microseconds.
const WAIT: Duration = Duration::from_secs(30);

/// Mounts through `loop_mount` and starts a task that runs until it is cancelled, reporting
/// its mountpoint when its future is dropped.
struct FakeFormat {
    stopped: mpsc::UnboundedSender<PathBuf>,
    reopened: Arc<AtomicUsize>,
}

struct FakeOpened {
    stopped: mpsc::UnboundedSender<PathBuf>,
}

/// Reports when dropped, which aborting a task does to its future.
struct Stopped(mpsc::UnboundedSender<PathBuf>, PathBuf);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.send(self.1.clone());
    }
}

fn blob() -> BlobRef {
    let image = ImageRef::repository("127.0.0.1:5000", "test/img").unwrap();
    BlobRef::new(image, Digest::of(b"layer"), 1234)
}

fn resolved() -> ResolvedLayer {
    ResolvedLayer {
        layer: RemoteLayer {
            format: LayerFormat::Estargz,
            image_ref: "127.0.0.1:5000/test/img:1".into(),
            digest: Digest::of(b"layer").to_string(),
            size: 1234,
            index_digest: "sha256:toc".into(),
        },
        index: b"index".to_vec(),
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LazyFormat for FakeFormat {
    fn kind(&self) -> LayerFormat {
        LayerFormat::Estargz
    }

    fn claims(&self, labels: &LayerLabels) -> bool {
        !labels.overlaybd
    }

    async fn open(&self, _labels: &LayerLabels) -> Result<Opened, Fallback> {
        Ok(Opened {
            resolved: resolved(),
            layer: Box::new(FakeOpened {
                stopped: self.stopped.clone(),
            }),
        })
    }

    fn reopen(&self, _resolved: &ResolvedLayer) -> Result<Box<dyn OpenedLayer>, String> {
        self.reopened.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeOpened {
            stopped: self.stopped.clone(),
        }))
    }
}

impl OpenedLayer for FakeOpened {
    fn blobs(&self) -> Vec<BlobRef> {
        vec![blob()]
    }

    fn mount(
        self: Box<Self>,
        mountpoint: &Path,
        syscall: &Arc<dyn Syscall>,
        _carried: &mut Carried,
    ) -> Result<Served, SnapshotError> {
        let mut tasks = Tasks::default();
        let stopped = Stopped(self.stopped, mountpoint.to_owned());
        tasks.spawn(&Handle::current(), async move {
            let _stopped = stopped;
            std::future::pending::<()>().await;
        });
        syscall
            .loop_mount(Path::new("/fake/disk"), FsType::Ext4, mountpoint)
            .map_err(|source| SnapshotError::MountDisk {
                mountpoint: mountpoint.to_owned(),
                source,
            })?;
        Ok(Served {
            sessions: Vec::new(),
            tasks,
        })
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    mounter: LazyMounter,
    syscall: Arc<RecordingSyscall>,
    stopped: mpsc::UnboundedReceiver<PathBuf>,
    reopened: Arc<AtomicUsize>,
    fs: PathBuf,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let config = shoal_config::Config::parse(&format!(
        "root = \"{}\"\n[registry]\ndocker_config = \"{}\"\nretries = 0\n",
        dir.path().join("root").display(),
        dir.path().join("none.json").display()
    ))
    .unwrap();
    let fetcher = Fetcher::new(&config).unwrap();
    let syscall = Arc::new(RecordingSyscall::default());
    let (tx, stopped) = mpsc::unbounded_channel();
    let reopened = Arc::new(AtomicUsize::new(0));
    let format = FakeFormat {
        stopped: tx,
        reopened: reopened.clone(),
    };
    let mounter = LazyMounter::new(
        fetcher,
        syscall.clone(),
        vec![Box::new(format)],
        crate::MountPolicy::new(crate::MountSettings {
            prefetch: Default::default(),
            resolve_timeout: Duration::from_secs(30),
        }),
    );
    let fs = dir.path().join("snapshots/1/fs");
    Harness {
        _dir: dir,
        mounter,
        syscall,
        stopped,
        reopened,
        fs,
    }
}

fn labels(overlaybd: bool) -> LayerLabels {
    LayerLabels {
        target: "sha256:chain".into(),
        image_ref: "127.0.0.1:5000/test/img:1".into(),
        layer_digest: Digest::of(b"layer").to_string(),
        manifest_digest: None,
        toc_digest: Some("sha256:toc".into()),
        overlaybd,
    }
}

async fn stopped(harness: &mut Harness) -> PathBuf {
    tokio::time::timeout(WAIT, harness.stopped.recv())
        .await
        .expect("the layer's task stopped")
        .unwrap()
}

#[tokio::test]
async fn unmounting_a_layer_stops_its_background_tasks_and_forgets_it() {
    let mut h = harness();
    let resolved = h.mounter.resolve(&labels(false)).await.unwrap();
    h.mounter.mount(&resolved, &h.fs).unwrap();
    assert_eq!(
        h.reopened.load(Ordering::SeqCst),
        0,
        "resolve's layer was used"
    );
    let listed = h.mounter.mounted_blobs();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].mounts, 1);
    assert!(h.stopped.try_recv().is_err(), "the task runs while mounted");

    h.mounter.unmount(&h.fs).unwrap();
    assert_eq!(stopped(&mut h).await, h.fs);
    assert!(h.mounter.mounted_blobs().is_empty());
    assert!(h.syscall.table().is_empty(), "{:?}", h.syscall.table());
}

#[tokio::test]
async fn a_failed_unmount_leaves_the_layer_mounted_and_a_retry_releases_it() {
    let mut h = harness();
    let resolved = h.mounter.resolve(&labels(false)).await.unwrap();
    h.mounter.mount(&resolved, &h.fs).unwrap();
    h.syscall.fail("unmount");
    let err = h.mounter.unmount(&h.fs).unwrap_err();
    assert!(matches!(err, SnapshotError::UnmountLayer { .. }), "{err}");
    assert_eq!(h.mounter.mounted_blobs().len(), 1, "still listed");
    assert_eq!(h.syscall.table(), [h.fs.clone()]);

    h.syscall.recover("unmount");
    h.mounter.unmount(&h.fs).unwrap();
    assert_eq!(stopped(&mut h).await, h.fs);
    assert!(h.mounter.mounted_blobs().is_empty());
}

#[tokio::test]
async fn a_failed_mount_leaves_no_task_and_nothing_listed() {
    let mut h = harness();
    let resolved = h.mounter.resolve(&labels(false)).await.unwrap();
    h.syscall.fail("loop_mount");
    let err = h.mounter.mount(&resolved, &h.fs).unwrap_err();
    assert!(matches!(err, SnapshotError::MountDisk { .. }), "{err}");
    assert_eq!(stopped(&mut h).await, h.fs);
    assert!(h.mounter.mounted_blobs().is_empty());
}

#[tokio::test]
async fn a_restart_reopens_the_persisted_index_and_a_stopping_daemon_ends_every_task() {
    let h = harness();
    // No resolve: as after a restart, the index comes from disk.
    h.mounter.mount(&resolved(), &h.fs).unwrap();
    assert_eq!(h.reopened.load(Ordering::SeqCst), 1);
    let Harness {
        _dir,
        mounter,
        mut stopped,
        fs,
        ..
    } = h;
    drop(mounter);
    let ended = tokio::time::timeout(WAIT, stopped.recv()).await;
    assert_eq!(ended.expect("the layer's task stopped"), Some(fs));
}

#[tokio::test]
async fn labels_no_format_claims_are_not_lazy_and_stale_mounts_of_others_are_kept() {
    let h = harness();
    let err = h.mounter.resolve(&labels(true)).await.unwrap_err();
    assert_eq!(err, Fallback::Disabled);
    // A stale mount at the snapshot's fs goes; a sibling snapshot's stays.
    let other = h.fs.parent().unwrap().with_file_name("2").join("fs");
    h.syscall.add_mount(&h.fs);
    h.syscall.add_mount(&other);
    h.mounter.unmount(&h.fs).unwrap();
    assert_eq!(h.syscall.table(), [other]);
    assert!(h
        .syscall
        .calls()
        .contains(&Call::MountsUnder(h.fs.parent().unwrap().to_owned())));
}

/// An fd store in memory, recording what it is asked to release.
#[derive(Default)]
struct MemoryStore {
    kept: parking_lot::Mutex<Vec<(String, std::os::fd::OwnedFd)>>,
    released: parking_lot::Mutex<Vec<String>>,
}

impl shoal_fuse::handover::FdStore for MemoryStore {
    fn keep(
        &self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), shoal_fuse::handover::HandoverError> {
        let fd = fd.try_clone_to_owned().unwrap();
        self.kept.lock().push((name.to_owned(), fd));
        Ok(())
    }

    fn release(&self, name: &str) -> Result<(), shoal_fuse::handover::HandoverError> {
        self.kept.lock().retain(|(n, _)| n != name);
        self.released.lock().push(name.to_owned());
        Ok(())
    }

    fn kept(
        &self,
    ) -> Result<Vec<(String, std::os::fd::OwnedFd)>, shoal_fuse::handover::HandoverError> {
        Ok(self
            .kept
            .lock()
            .iter()
            .map(|(n, fd)| (n.clone(), fd.try_clone().unwrap()))
            .collect())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

fn null_fd() -> std::os::fd::OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

#[tokio::test]
async fn a_mount_with_nothing_carried_releases_what_a_dead_daemon_left_there_first() {
    let h = harness();
    h.syscall.add_mount(&h.fs);
    h.mounter.mount(&resolved(), &h.fs).unwrap();
    let calls = h.syscall.calls();
    let unmounted = calls.iter().position(|c| c == &Call::Unmount(h.fs.clone()));
    let mounted = calls
        .iter()
        .position(|c| matches!(c, Call::LoopMount { .. }));
    assert!(unmounted < mounted && unmounted.is_some(), "{calls:?}");
    assert_eq!(h.syscall.table().len(), 1, "one mount, the new one");
}

#[tokio::test]
async fn a_layer_resolved_by_this_daemon_mounts_without_reading_the_mount_table() {
    let h = harness();
    let resolved = h.mounter.resolve(&labels(false)).await.unwrap();
    h.mounter.mount(&resolved, &h.fs).unwrap();
    let calls = h.syscall.calls();
    assert!(
        !calls.iter().any(|c| matches!(c, Call::MountsUnder(_))),
        "a new snapshot's directory has nothing stale: {calls:?}"
    );
}

#[tokio::test]
async fn connections_left_for_gone_mounts_or_snapshots_are_released_not_served() {
    let h = harness();
    let store = Arc::new(MemoryStore::default());
    let orphan = h.fs.parent().unwrap().with_file_name("9").join("fs");
    // The layer's own connection, whose mount has gone, and one for a snapshot that is gone.
    store
        .keep(&h.fs.to_string_lossy(), null_fd().as_fd())
        .unwrap();
    store
        .keep(&orphan.to_string_lossy(), null_fd().as_fd())
        .unwrap();
    h.syscall.add_mount(&orphan);
    let Harness {
        _dir,
        mounter,
        syscall,
        fs,
        ..
    } = h;
    let mounter = mounter.with_handover(store.clone(), _dir.path());
    mounter.mount(&resolved(), &fs).unwrap();
    let report = mounter.handover_report();
    assert_eq!(report.carried, 0);
    assert_eq!(report.not_carried.len(), 1, "{report:?}");
    assert_eq!(report.not_carried[0].0, fs);
    assert!(
        report.not_carried[0].1.contains("mount is gone"),
        "{report:?}"
    );

    mounter.remounted();
    let released = store.released.lock().clone();
    assert_eq!(
        released,
        [
            fs.to_string_lossy().into_owned(),
            orphan.to_string_lossy().into_owned()
        ]
    );
    assert!(syscall.calls().contains(&Call::Unmount(orphan.clone())));
    assert!(!syscall.table().contains(&orphan));
    assert!(store.kept.lock().is_empty());
}

#[tokio::test]
async fn connections_of_mounts_outside_the_root_are_neither_taken_nor_released() {
    let h = harness();
    let store = Arc::new(MemoryStore::default());
    let elsewhere = tempfile::tempdir().unwrap();
    let theirs = elsewhere.path().join("snapshots/1/fs");
    store
        .keep(&theirs.to_string_lossy(), null_fd().as_fd())
        .unwrap();
    let Harness {
        _dir, mounter, fs, ..
    } = h;
    let mounter = mounter.with_handover(store.clone(), _dir.path());
    mounter.mount(&resolved(), &fs).unwrap();
    mounter.remounted();
    assert!(
        store.released.lock().is_empty(),
        "released another daemon's connection"
    );
    let kept = store.kept.lock();
    assert!(kept
        .iter()
        .any(|(name, _)| Path::new(name) == theirs.as_path()));
    drop(kept);
    let report = mounter.handover_report();
    assert_eq!(report.carried, 0);
    assert!(report.not_carried.is_empty(), "{report:?}");
}
