//! The daemon's [`LayerMounter`] for overlaybd layers.
//!
//! A layer's snapshot directory holds the merged filesystem of its whole chain (the layer and
//! every layer below it in the image): the chain's [`VirtualDisk`] is served as one FUSE file,
//! attached to a read-only loop device and mounted (ext4 with `noload`, or erofs) on the
//! snapshot's `fs`. A container's overlay therefore needs only the nearest overlaybd layer as
//! its lowerdir. No TCMU, configfs or C++ daemon is involved.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use shoal_fetcher::{BlobRef, Digest, Fetcher, ImageRef};
use shoal_formats::overlaybd::{ANNOTATION_BLOB_DIGEST, ANNOTATION_FS_TYPE};
use shoal_fuse::layer::MountedLayer;
use shoal_fuse::vdisk::{self, DiskLayer, FsType, VirtualDisk, DISK_FILE};
use shoal_fuse::FsError;
use tokio::runtime::Handle;
use tracing::{error, info, warn};

use crate::error::SnapshotError;
use crate::manifest::chain_of;
use crate::remote::{Fallback, LayerFormat, LayerLabels, LayerMounter, RemoteLayer, ResolvedLayer};

/// Directory beside a snapshot's `fs` where its virtual disk's FUSE file is served.
const DISK_DIR: &str = "vdisk";

/// Mounts a block device image file as a read-only filesystem; the seam that keeps the
/// mounter's logic testable without root.
pub trait BlockMount: Send + Sync + 'static {
    /// Attaches `image` to a read-only loop device and mounts it on `target`.
    fn mount(&self, image: &Path, fs_type: FsType, target: &Path) -> Result<(), String>;

    /// Lazily unmounts `target` (a loop device goes with its last user); a no-op when
    /// nothing is mounted there. Also detaches a previous daemon's dead disk FUSE mount.
    fn unmount(&self, target: &Path) -> Result<(), String>;
}

/// [`BlockMount`] through util-linux `mount -o loop`, which sets the loop device up read-only
/// with autoclear, so it is released when the filesystem is.
pub struct LoopMount;

impl BlockMount for LoopMount {
    fn mount(&self, image: &Path, fs_type: FsType, target: &Path) -> Result<(), String> {
        // ext4: `noload` skips journal replay, which a read-only device could not take.
        let options = match fs_type {
            FsType::Ext4 => "ro,loop,noload",
            FsType::Erofs => "ro,loop",
        };
        let output = Command::new("mount")
            .args(["-t", fs_type.as_str(), "-o", options])
            .arg(image)
            .arg(target)
            .output()
            .map_err(|e| format!("run mount: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "mount {} on {}: {}",
                image.display(),
                target.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    fn unmount(&self, target: &Path) -> Result<(), String> {
        detach(target)
    }
}

/// `umount2(MNT_DETACH)`, treating "not mounted" and "gone" as done.
fn detach(target: &Path) -> Result<(), String> {
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(errno) => Err(format!("unmount {}: {errno}", target.display())),
    }
}

/// A mounted chain: the FUSE session serving its disk, and the blobs pinned in the cache.
struct Mounted {
    disk: MountedLayer,
    blobs: Vec<Digest>,
}

/// Mounts overlaybd layers as loop-mounted FUSE virtual disks.
pub struct OverlaybdMounter {
    fetcher: Fetcher,
    runtime: Handle,
    block: Arc<dyn BlockMount>,
    /// Fetch mounted blobs whole in the background at this many bytes per second, then check
    /// each one's sha256; `None`: blocks are fetched as read (and CRC-checked) only.
    background_rate: Option<u64>,
    /// Blobs whose background fetch has started, so each runs once per daemon.
    fetching: Arc<Mutex<HashSet<Digest>>>,
    /// Disks opened by `resolve`, keyed by their metadata digest, waiting for `mount`.
    opened: Mutex<HashMap<String, Arc<VirtualDisk>>>,
    mounted: Mutex<HashMap<PathBuf, Mounted>>,
}

impl OverlaybdMounter {
    pub fn new(
        fetcher: Fetcher,
        runtime: Handle,
        block: Arc<dyn BlockMount>,
        background_rate: Option<u64>,
    ) -> OverlaybdMounter {
        OverlaybdMounter {
            fetcher,
            runtime,
            block,
            background_rate,
            fetching: Arc::new(Mutex::new(HashSet::new())),
            opened: Mutex::new(HashMap::new()),
            mounted: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `mountpoint` is (or was, before a restart) one of this mounter's.
    pub fn owns(&self, mountpoint: &Path) -> bool {
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(mountpoint)
            || disk_dir(mountpoint).is_some_and(|dir| dir.exists())
    }

    /// Opens every layer of the chain ending at the labelled layer and stacks them.
    async fn open(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        let image =
            ImageRef::parse(&labels.image_ref).map_err(|e| Fallback::Registry(e.to_string()))?;
        let chain = chain_of(&self.fetcher, &image, labels).await?;
        let top = chain.last().ok_or(Fallback::MissingLabels)?;
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
            layers.push(
                DiskLayer::open(&self.fetcher, blob)
                    .await
                    .map_err(fallback_of)?,
            );
        }
        let disk = VirtualDisk::new(layers, fs_type).map_err(fallback_of)?;
        let index = disk.persist();
        let index_digest = Digest::of(&index).to_string();
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index_digest.clone(), Arc::new(disk));
        Ok(ResolvedLayer {
            layer: RemoteLayer {
                format: LayerFormat::Overlaybd,
                image_ref: labels.image_ref.clone(),
                digest: labels.layer_digest.clone(),
                size: top.size,
                index_digest,
            },
            index,
        })
    }

    /// Starts the background fetch and digest check of each of `disk`'s blobs not yet started.
    fn fetch_in_background(&self, disk: &VirtualDisk) {
        let Some(rate) = self.background_rate else {
            return;
        };
        for layer in disk.layers() {
            let blob = layer.blob().clone();
            let fresh = self
                .fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(blob.digest.clone());
            if !fresh {
                continue;
            }
            let (fetcher, fetching) = (self.fetcher.clone(), self.fetching.clone());
            self.runtime.spawn(async move {
                match vdisk::fetch_and_verify(&fetcher, &blob, Some(rate)).await {
                    Ok(()) => info!(blob = %blob.digest, bytes = blob.size, "overlaybd layer fetched and its digest verified"),
                    Err(err) => {
                        error!(blob = %blob.digest, error = %err, "overlaybd layer background fetch failed");
                        // A later mount tries again.
                        fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&blob.digest);
                    }
                }
            });
        }
    }

    /// The disk `resolved` describes: the one `resolve` opened, or (after a restart) the
    /// persisted metadata, checked against its digest and verified again.
    fn disk_of(&self, resolved: &ResolvedLayer) -> Result<Arc<VirtualDisk>, String> {
        let expected = &resolved.layer.index_digest;
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(expected);
        if let Some(disk) = opened {
            return Ok(disk);
        }
        let actual = Digest::of(&resolved.index).to_string();
        if &actual != expected {
            return Err(format!(
                "persisted disk metadata has digest {actual}, expected {expected}"
            ));
        }
        VirtualDisk::from_persisted(&resolved.index)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

/// A stopping daemon detaches its disks rather than unmounting them (a running container keeps
/// them busy); the next daemon mounts them afresh from their persisted metadata.
impl Drop for OverlaybdMounter {
    fn drop(&mut self) {
        let mounted = std::mem::take(self.mounted.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (mountpoint, Mounted { mut disk, .. }) in mounted {
            if let Err(err) = disk.detach() {
                warn!(mountpoint = %mountpoint.display(), error = %err, "could not detach virtual disk");
            }
            std::thread::spawn(move || drop(disk));
        }
    }
}

#[containerd_snapshots::tonic::async_trait]
impl LayerMounter for OverlaybdMounter {
    async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
        if !labels.overlaybd {
            return Err(Fallback::NotLazyFormat(format!(
                "the layer has no {ANNOTATION_BLOB_DIGEST} annotation"
            )));
        }
        self.open(labels).await
    }

    fn mount(&self, resolved: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
        let fail = |reason: String| SnapshotError::MountLayer {
            mountpoint: mountpoint.to_owned(),
            reason,
        };
        let disk = self.disk_of(resolved).map_err(fail)?;
        let dir = disk_dir(mountpoint).ok_or_else(|| fail("mountpoint has no parent".into()))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
        let blobs: Vec<Digest> = disk
            .layers()
            .iter()
            .map(|l| l.blob().digest.clone())
            .collect();
        let fs_type = disk.fs_type();
        self.fetch_in_background(&disk);
        let served = vdisk::mount(
            disk,
            Arc::new(self.fetcher.clone()),
            self.runtime.clone(),
            &dir,
        )
        .map_err(|e| fail(e.to_string()))?;
        for blob in &blobs {
            self.fetcher.cache().pin(blob);
        }
        if let Err(reason) = self.block.mount(&dir.join(DISK_FILE), fs_type, mountpoint) {
            for blob in &blobs {
                self.fetcher.cache().unpin(blob);
            }
            // Nothing uses the disk yet, so its session ends at once.
            drop(served);
            return Err(fail(reason));
        }
        info!(
            blob = %resolved.layer.digest,
            layers = blobs.len(),
            mountpoint = %mountpoint.display(),
            "overlaybd layer mounted"
        );
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                mountpoint.to_owned(),
                Mounted {
                    disk: served,
                    blobs,
                },
            );
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), SnapshotError> {
        let fail = |reason: String| SnapshotError::UnmountLayer {
            mountpoint: mountpoint.to_owned(),
            reason,
        };
        self.block.unmount(mountpoint).map_err(fail)?;
        let mounted = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mountpoint);
        let Some(Mounted { mut disk, blobs }) = mounted else {
            // A previous daemon's disk: its FUSE connection is dead; detach what is left.
            if let Some(dir) = disk_dir(mountpoint) {
                self.block.unmount(&dir).map_err(fail)?;
            }
            return Ok(());
        };
        // The loop device may still read the disk until the filesystem on it is released.
        let detached = disk.detach().map_err(|e| fail(e.to_string()));
        for blob in &blobs {
            self.fetcher.cache().unpin(blob);
        }
        if detached.is_ok() {
            // The disk's first blob is the chain's top: the layer this snapshot is.
            let blob = blobs.first().map(ToString::to_string).unwrap_or_default();
            info!(blob, mountpoint = %mountpoint.display(), "overlaybd layer unmounted");
        }
        std::thread::spawn(move || drop(disk));
        detached
    }
}

fn disk_dir(mountpoint: &Path) -> Option<PathBuf> {
    mountpoint.parent().map(|dir| dir.join(DISK_DIR))
}

fn fallback_of(err: FsError) -> Fallback {
    match err {
        FsError::FetchLayerMetadata { .. } => Fallback::Registry(err.to_string()),
        other => Fallback::NotLazyFormat(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records block mounts; never touches the kernel.
    #[derive(Default)]
    struct RecordingBlockMount {
        calls: Mutex<Vec<String>>,
    }

    impl BlockMount for RecordingBlockMount {
        fn mount(&self, image: &Path, fs_type: FsType, target: &Path) -> Result<(), String> {
            self.calls.lock().unwrap().push(format!(
                "mount {} {} {}",
                fs_type.as_str(),
                image.display(),
                target.display()
            ));
            Ok(())
        }

        fn unmount(&self, target: &Path) -> Result<(), String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("unmount {}", target.display()));
            Ok(())
        }
    }

    fn mounter(dir: &Path, block: Arc<RecordingBlockMount>) -> OverlaybdMounter {
        let config = shoal_config::Config::parse(&format!(
            "root = \"{}\"\n[registry]\ndocker_config = \"{}\"\nretries = 0\n",
            dir.join("root").display(),
            dir.join("none.json").display()
        ))
        .unwrap();
        let fetcher = Fetcher::new(&config).unwrap();
        OverlaybdMounter::new(fetcher, Handle::current(), block, None)
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
        let mounter = mounter(dir.path(), Arc::default());
        let err = mounter.resolve(&labels(false)).await.unwrap_err();
        assert!(matches!(err, Fallback::NotLazyFormat(_)), "{err}");
        // Nothing listens on 127.0.0.1:1.
        let err = mounter.resolve(&labels(true)).await.unwrap_err();
        assert!(matches!(err, Fallback::Registry(_)), "{err}");
    }

    #[tokio::test]
    async fn persisted_metadata_must_match_its_digest() {
        let dir = tempfile::tempdir().unwrap();
        let block = Arc::new(RecordingBlockMount::default());
        let mounter = mounter(dir.path(), block.clone());
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
        assert!(block.calls.lock().unwrap().is_empty(), "nothing mounted");
    }

    #[tokio::test]
    async fn a_previous_daemons_disk_is_recognised_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let block = Arc::new(RecordingBlockMount::default());
        let mounter = mounter(dir.path(), block.clone());
        let fs = dir.path().join("snapshots/1/fs");
        std::fs::create_dir_all(&fs).unwrap();
        assert!(!mounter.owns(&fs), "an eStargz or plain snapshot");
        std::fs::create_dir_all(dir.path().join("snapshots/1").join(DISK_DIR)).unwrap();
        assert!(mounter.owns(&fs));
        mounter.unmount(&fs).unwrap();
        let disk = dir.path().join("snapshots/1").join(DISK_DIR);
        assert_eq!(
            *block.calls.lock().unwrap(),
            [
                format!("unmount {}", fs.display()),
                format!("unmount {}", disk.display())
            ]
        );
    }
}
