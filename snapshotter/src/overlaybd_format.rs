//! overlaybd as a [`LazyFormat`].
//!
//! A layer's snapshot directory holds the merged filesystem of its whole chain (the layer and
//! every layer below it in the image): the chain's [`VirtualDisk`] is served as one FUSE file,
//! attached to a read-only loop device and mounted (ext4 with `noload`, or erofs) on the
//! snapshot's `fs` through the mount seam. A container's overlay therefore needs only the
//! nearest overlaybd layer as its lowerdir. No TCMU, configfs or C++ daemon is involved.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use shoal_fetcher::{
    read_most, BlobRead, BlobRef, Digest, Fetcher, Histogram, ImageRef, Verification,
};
use shoal_formats::overlaybd::{TableRef, ANNOTATION_BLOB_DIGEST, ANNOTATION_FS_TYPE};
use shoal_fuse::connection::Origin;
use shoal_fuse::layer::{Learn, Learning, MountTarget};
use shoal_fuse::syscall::Syscall;
use shoal_fuse::tasks::Tasks;
use shoal_fuse::vdisk::{
    self, DiskLayer, DiskRecording, FsType, LayerChecks, VirtualDisk, DISK_FILE,
};
use shoal_fuse::FsError;
use tokio::runtime::Handle;
use tracing::{error, info};

use crate::error::{with_causes, SnapshotError};
use crate::lazy_format::{Carried, LazyFormat, Opened, OpenedLayer, Served};
use crate::manifest::layers_of;
use crate::mount_policy::MountPolicy;
use crate::remote::{Fallback, LayerFormat, LayerLabels, RemoteLayer, ResolvedLayer};

/// Directory beside a snapshot's `fs` where its virtual disk's FUSE file is served.
const DISK_DIR: &str = "vdisk";

/// Opens overlaybd chains as virtual disks and loop-mounts them.
pub struct OverlaybdFormat {
    fetcher: Fetcher,
    runtime: Handle,
    /// Where the disks' FUSE reads are timed (the daemon's one histogram of FUSE reads).
    read_latency: Arc<Histogram>,
    background: Background,
    /// Learned prefetch, when `fetch.learn` is on.
    learning: Option<Arc<Learning>>,
}

/// The background fetch of mounted blobs.
#[derive(Clone)]
struct Background {
    /// Its `prefetch.background_rate`, read at each mount: fetch mounted blobs whole at this
    /// many bytes per second, then check each one's sha256; `None`: blocks are fetched as read
    /// (and CRC-checked) only.
    policy: MountPolicy,
    /// Blobs whose background fetch runs or ended well, so each runs once per daemon.
    fetching: Arc<Mutex<HashSet<Digest>>>,
}

impl OverlaybdFormat {
    pub fn new(
        fetcher: Fetcher,
        runtime: Handle,
        policy: MountPolicy,
        read_latency: Arc<Histogram>,
        learning: Option<Arc<Learning>>,
    ) -> OverlaybdFormat {
        OverlaybdFormat {
            fetcher,
            runtime,
            read_latency,
            background: Background {
                policy,
                fetching: Arc::default(),
            },
            learning,
        }
    }

    /// `image`: the manifest digest of the image whose top layer this disk is, when known (a
    /// Prepare's labels), which its blobs' learned prefetch is keyed by.
    fn opened(&self, disk: VirtualDisk, image: Option<Digest>) -> Box<dyn OpenedLayer> {
        let learn = self
            .learning
            .clone()
            .zip(image)
            .map(|(learning, image)| Learn { learning, image });
        Box::new(OpenedDisk {
            disk: Arc::new(disk),
            fetcher: self.fetcher.clone(),
            runtime: self.runtime.clone(),
            background: self.background.clone(),
            read_latency: self.read_latency.clone(),
            learn,
        })
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LazyFormat for OverlaybdFormat {
    fn kind(&self) -> LayerFormat {
        LayerFormat::Overlaybd
    }

    fn claims(&self, labels: &LayerLabels) -> bool {
        labels.overlaybd
    }

    /// Opens every layer of the chain ending at the labelled layer and stacks them.
    async fn open(&self, labels: &LayerLabels) -> Result<Opened, Fallback> {
        if !labels.overlaybd {
            return Err(Fallback::NotLazyFormat(format!(
                "the layer has no {ANNOTATION_BLOB_DIGEST} annotation"
            )));
        }
        let image =
            ImageRef::parse(&labels.image_ref).map_err(|e| Fallback::Registry(e.to_string()))?;
        let in_image = layers_of(&self.fetcher, &image, labels).await?;
        let chain = &in_image.all[..=in_image.at];
        let top = in_image.labelled();
        let fs_type =
            FsType::from_annotation(top.annotations.get(ANNOTATION_FS_TYPE).map(String::as_str))
                .ok_or_else(|| {
                    Fallback::NotLazyFormat("unknown overlaybd filesystem type".into())
                })?;
        let mut layers = Vec::with_capacity(chain.len());
        for descriptor in chain.iter().rev() {
            if !descriptor.annotations.contains_key(ANNOTATION_BLOB_DIGEST) {
                return Err(Fallback::NotLazyFormat(format!(
                    "layer {} below an overlaybd layer is not overlaybd",
                    descriptor.digest
                )));
            }
            let digest =
                Digest::parse(&descriptor.digest).map_err(|e| Fallback::Registry(e.to_string()))?;
            let blob = BlobRef::new(image.clone(), digest, descriptor.size);
            // The table is named by the manifest just read (by digest when the labels carry
            // one), so it is anchored in what the registry served.
            let named = TableRef::from_annotations(&descriptor.annotations);
            let checks = LayerChecks::fetch(&self.fetcher, &blob, named).await;
            layers.push(
                DiskLayer::open(&self.fetcher, blob, checks)
                    .await
                    .map_err(fallback_of)?,
            );
        }
        let disk = VirtualDisk::new(layers, fs_type).map_err(fallback_of)?;
        // Containers read the disk of the image's top layer alone; the disks below it are
        // mounted too, and their reads (a filesystem's mount) are no start to learn from.
        // Without the image's digest there is nothing to key a trace by.
        let learned_for = labels
            .manifest_digest
            .as_deref()
            .filter(|_| in_image.above().is_empty())
            .and_then(|digest| Digest::parse(digest).ok());
        let index = disk.persist();
        let index_digest = Digest::of(&index).to_string();
        Ok(Opened {
            resolved: ResolvedLayer {
                layer: RemoteLayer {
                    format: LayerFormat::Overlaybd,
                    image_ref: labels.image_ref.clone(),
                    digest: labels.layer_digest.clone(),
                    size: top.size,
                    index_digest,
                },
                index,
            },
            layer: self.opened(disk, learned_for),
        })
    }

    /// The persisted metadata, checked against its digest and verified again.
    fn reopen(&self, resolved: &ResolvedLayer) -> Result<Box<dyn OpenedLayer>, String> {
        let expected = &resolved.layer.index_digest;
        let actual = Digest::of(&resolved.index).to_string();
        if &actual != expected {
            return Err(format!(
                "persisted disk metadata has digest {actual}, expected {expected}"
            ));
        }
        let disk = VirtualDisk::from_persisted(&resolved.index, &self.fetcher)
            .map_err(|e| with_causes(&e))?;
        // Mounted again after a restart: its start is long past, nothing to learn or replay.
        Ok(self.opened(disk, None))
    }

    fn companions(&self, mountpoint: &Path) -> Vec<PathBuf> {
        disk_dir(mountpoint).into_iter().collect()
    }
}

/// A chain's disk, opened, and what it is served with.
struct OpenedDisk {
    disk: Arc<VirtualDisk>,
    fetcher: Fetcher,
    runtime: Handle,
    background: Background,
    read_latency: Arc<Histogram>,
    learn: Option<Learn>,
}

impl OpenedLayer for OpenedDisk {
    fn blobs(&self) -> Vec<BlobRef> {
        self.disk
            .layers()
            .iter()
            .map(|l| l.blob().clone())
            .collect()
    }

    fn verification(&self) -> Vec<(Digest, Verification)> {
        self.disk
            .layers()
            .iter()
            .map(|l| (l.blob().digest.clone(), l.checks().verification().clone()))
            .collect()
    }

    fn mount(
        self: Box<Self>,
        mountpoint: &Path,
        syscall: &Arc<dyn Syscall>,
        carried: &mut Carried,
    ) -> Result<Served, SnapshotError> {
        let dir = disk_dir(mountpoint).ok_or_else(|| SnapshotError::MountLayer {
            mountpoint: mountpoint.to_owned(),
            reason: "mountpoint has no parent".into(),
        })?;
        let origin = carried.take(&dir);
        let disk_carried = matches!(origin, Origin::Carried { .. });
        // A carried disk's directory is its FUSE mount, which nobody serves until the session
        // below starts: even a stat of it would wait for this very daemon.
        if !disk_carried {
            std::fs::create_dir_all(&dir).map_err(|source| SnapshotError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        let fs_type = self.disk.fs_type();
        let mut tasks = Tasks::default();
        self.background
            .start(&mut tasks, &self.runtime, &self.fetcher, &self.disk);
        let target = MountTarget {
            mountpoint: &dir,
            syscall: syscall.clone(),
            origin,
            resent: carried.resent(),
        };
        let layers = self.disk.layers().len();
        let learn = self
            .learn
            .map(|learn| (learn, Arc::new(DiskRecording::new(layers))));
        let recording = learn.as_ref().map(|(_, recording)| recording.clone());
        let served = vdisk::mount(
            self.disk,
            Arc::new(self.fetcher.clone()),
            self.runtime.clone(),
            target,
            self.read_latency,
            learn,
        )
        .map_err(|source| SnapshotError::ServeLayer {
            mountpoint: dir.clone(),
            source: Box::new(source),
        })?;
        // A carried disk's filesystem is still mounted on its loop device, which has waited
        // for the disk's reads; the daemon had only to serve the disk again.
        let still_mounted = disk_carried
            && syscall
                .mounts_under(mountpoint)
                .is_ok_and(|points| points.iter().any(|p| p == mountpoint));
        if !still_mounted {
            // On failure nothing uses the disk yet: dropping its session ends it at once, and
            // dropping the tasks stops the background fetch.
            syscall
                .loop_mount(&dir.join(DISK_FILE), fs_type, mountpoint)
                .map_err(|source| SnapshotError::MountDisk {
                    mountpoint: mountpoint.to_owned(),
                    source,
                })?;
        }
        // From here on the disk's reads are its containers'.
        if let Some(recording) = recording {
            recording.filesystem_mounted();
        }
        Ok(Served {
            sessions: vec![served],
            tasks,
        })
    }
}

impl Background {
    /// Starts, as tasks the mounting layer owns, the fetch and check of each of `disk`'s
    /// blobs not fetched or being fetched already: all of them with `fetch.background`, and
    /// always those whose blocks peers may send unchecked but for their CRC, so that the
    /// blob's digest finds a forgery, and blames its sender, as soon as it can.
    fn start(
        &self,
        tasks: &mut Tasks,
        runtime: &Handle,
        fetcher: &Fetcher,
        disk: &Arc<VirtualDisk>,
    ) {
        let prefetch = self.policy.get().prefetch;
        let configured = prefetch.background_rate;
        for (at, layer) in disk.layers().iter().enumerate() {
            let urgent = matches!(
                layer.checks().verification(),
                Verification::PerBlob { peers: true, .. }
            );
            // Started now, or once reads have brought in this share of the blob.
            let after_reads = match (configured.is_some() || urgent, prefetch.complete_after) {
                (true, _) => None,
                (false, Some(share)) => Some(share),
                (false, None) => continue,
            };
            let blob = layer.blob().clone();
            let fresh = self.lock().insert(blob.digest.clone());
            if !fresh {
                continue;
            }
            let fetcher = fetcher.clone();
            let disk = disk.clone();
            let running = Running {
                background: self.clone(),
                blob: Some(blob.digest.clone()),
            };
            tasks.spawn(runtime, async move {
                // Moved in whole: dropped with the task, however it ends.
                let mut running = running;
                if let Some(share) = after_reads {
                    read_most(|| BlobRead::cached_bytes(&fetcher, &blob), blob.size, share).await;
                    info!(blob = %blob.digest, share, "reads brought in most of the overlaybd layer; completing it");
                }
                match vdisk::fetch_and_verify(&fetcher, &disk, at, configured).await {
                    Ok(()) => {
                        info!(blob = %blob.digest, bytes = blob.size, "overlaybd layer fetched and its digest verified");
                        running.blob = None;
                    }
                    Err(err) => {
                        error!(blob = %blob.digest, error = %with_causes(&err), "overlaybd layer background fetch failed")
                    }
                }
            });
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashSet<Digest>> {
        self.fetching.lock()
    }
}

/// A background fetch in progress: one that fails or is cancelled with its layer forgets its
/// blob, so a later mount starts it again.
struct Running {
    background: Background,
    /// `None` once the blob is fetched and verified.
    blob: Option<Digest>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(digest) = self.blob.take() {
            self.background.lock().remove(&digest);
        }
    }
}

fn disk_dir(mountpoint: &Path) -> Option<PathBuf> {
    mountpoint.parent().map(|dir| dir.join(DISK_DIR))
}

fn fallback_of(err: FsError) -> Fallback {
    use crate::error::with_causes;
    match err {
        FsError::FetchLayerMetadata { .. } => Fallback::Registry(with_causes(&err)),
        other => Fallback::NotLazyFormat(with_causes(&other)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shoal_fuse::syscall::{Call, RecordingSyscall};

    use super::*;
    use crate::lazy_mounter::LazyMounter;
    use crate::remote::LayerMounter;

    fn fetcher(dir: &Path) -> Fetcher {
        let config = shoal_config::Config::parse(&format!(
            "root = \"{}\"\n[registry]\ndocker_config = \"{}\"\nretries = 0\n",
            dir.join("root").display(),
            dir.join("none.json").display()
        ))
        .unwrap();
        Fetcher::new(&config).unwrap()
    }

    fn policy() -> MountPolicy {
        MountPolicy::new(crate::MountSettings {
            prefetch: Default::default(),
            resolve_timeout: Duration::from_secs(30),
        })
    }

    fn mounter(dir: &Path, syscall: Arc<RecordingSyscall>) -> LazyMounter {
        let fetcher = fetcher(dir);
        let format = OverlaybdFormat::new(
            fetcher.clone(),
            Handle::current(),
            policy(),
            Arc::default(),
            None,
        );
        LazyMounter::new(fetcher, syscall, vec![Box::new(format)], policy())
    }

    fn labels(overlaybd: bool) -> LayerLabels {
        LayerLabels {
            target: "sha256:chain".into(),
            image_ref: "127.0.0.1:1/test/img:1".into(),
            layer_digest: format!("sha256:{}", "a".repeat(64)),
            manifest_digest: None,
            toc_digest: None,
            overlaybd,
        }
    }

    #[tokio::test]
    async fn only_overlaybd_layers_are_resolved_and_registry_failures_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let format = OverlaybdFormat::new(
            fetcher(dir.path()),
            Handle::current(),
            policy(),
            Arc::default(),
            None,
        );
        assert!(!format.claims(&labels(false)));
        let err = format.open(&labels(false)).await.err().unwrap();
        assert!(matches!(err, Fallback::NotLazyFormat(_)), "{err}");
        // Nothing listens on 127.0.0.1:1.
        let err = format.open(&labels(true)).await.err().unwrap();
        assert!(matches!(err, Fallback::Registry(_)), "{err}");
    }

    #[tokio::test]
    async fn persisted_metadata_must_match_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let syscall = Arc::new(RecordingSyscall::default());
        let mounter = mounter(dir.path(), syscall.clone());
        let resolved = ResolvedLayer {
            layer: RemoteLayer {
                format: LayerFormat::Overlaybd,
                image_ref: "127.0.0.1:1/test/img:1".into(),
                digest: format!("sha256:{}", "a".repeat(64)),
                size: 1,
                index_digest: Digest::of(b"another record").to_string(),
            },
            index: b"{}".to_vec(),
        };
        let fs = dir.path().join("snapshots/1/fs");
        let err = mounter.mount(&resolved, &fs).unwrap_err().to_string();
        assert!(err.contains("digest"), "{err}");
        assert!(syscall.calls().is_empty(), "nothing mounted");
        assert!(!dir.path().join("snapshots/1").join(DISK_DIR).exists());
    }

    #[tokio::test]
    async fn a_previous_daemons_disk_and_filesystem_are_released_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let syscall = Arc::new(RecordingSyscall::default());
        let mounter = mounter(dir.path(), syscall.clone());
        let snapshot = dir.path().join("snapshots/1");
        let (fs, disk) = (snapshot.join("fs"), snapshot.join(DISK_DIR));
        let other = dir.path().join("snapshots/2/fs");
        // As a crash between the disk's mount and the filesystem's leaves them.
        syscall.add_mount(&disk);
        syscall.add_mount(&fs);
        syscall.add_mount(&other);
        mounter.unmount(&fs).unwrap();
        assert_eq!(syscall.table(), [other]);
        let unmounts: Vec<Call> = syscall
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Unmount(_)))
            .collect();
        assert_eq!(unmounts, [Call::Unmount(fs), Call::Unmount(disk)]);
    }
}
