//! Remote layers that could not be mounted again at start-up (their persisted index refused,
//! missing or unreadable). Such a layer's directory is empty: stacking it under a container
//! would hide its files without a word. So each is remembered, shown by `shoal status`, and
//! mounted again from the registry (the TOC fetched and checked against the digest kept in its
//! record) before any Prepare, View or Mounts stacks it; if that fails too, the call fails.

use parking_lot::Mutex;
use std::collections::BTreeMap;

use tracing::{info, warn};

use super::lazy::{write_durably, INDEX_FILE};
use super::{Inner, ShoalSnapshotter};
use crate::error::SnapshotError;
use crate::metadata::Record;
use crate::remote::{LayerFormat, LayerLabels, LABEL_CRI_MANIFEST_DIGEST};

/// A remote layer whose mount is missing, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmountedLayer {
    /// The snapshot's key (its chainID).
    pub key: String,
    /// The layer blob's digest.
    pub layer: String,
    pub reason: String,
}

/// The remote layers not mounted right now, by key.
#[derive(Debug, Default)]
pub(super) struct Unmounted {
    layers: Mutex<BTreeMap<String, UnmountedLayer>>,
}

impl Unmounted {
    pub(super) fn insert(&self, layer: UnmountedLayer) {
        self.lock().insert(layer.key.clone(), layer);
    }

    pub(super) fn list(&self) -> Vec<UnmountedLayer> {
        self.lock().values().cloned().collect()
    }

    fn get(&self, key: &str) -> Option<UnmountedLayer> {
        self.lock().get(key).cloned()
    }

    pub(super) fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, BTreeMap<String, UnmountedLayer>> {
        self.layers.lock()
    }
}

impl ShoalSnapshotter {
    /// Remote layers that are not mounted (their start-up remount failed and no registry
    /// remount has succeeded since), for `shoal status`.
    pub fn unmounted_layers(&self) -> Vec<UnmountedLayer> {
        self.inner.unmounted.list()
    }

    /// Makes sure every layer a snapshot on top of `parent` would stack is mounted: one that is
    /// not is mounted again from the registry, or the caller fails with the reason.
    pub(super) async fn ensure_stack_mounted(&self, parent: &str) -> Result<(), SnapshotError> {
        if parent.is_empty() || self.inner.unmounted.is_empty() {
            return Ok(());
        }
        let parent = parent.to_owned();
        let stack = self
            .blocking("walk parents", move |inner| inner.overlay_stack(&parent))
            .await?;
        for (key, record) in stack {
            if self.inner.unmounted.get(&key).is_some() {
                self.remount_from_registry(&key, record).await?;
            }
        }
        Ok(())
    }

    async fn remount_from_registry(&self, key: &str, record: Record) -> Result<(), SnapshotError> {
        // One repair at a time: two Prepares on the same broken layer must not mount it twice.
        // Only this gate is held across the registry fetch, never the state behind it.
        let _one_repair = self.inner.repair.lock().await;
        let Some(broken) = self.inner.unmounted.get(key) else {
            return Ok(()); // Another caller repaired it meanwhile.
        };
        let unavailable = |reason: String| SnapshotError::LayerUnavailable {
            key: key.to_owned(),
            layer: broken.layer.clone(),
            reason,
        };
        let Some(remote) = record.remote.clone() else {
            return Err(unavailable("the record is not a remote layer".into()));
        };
        let labels = LayerLabels {
            target: key.to_owned(),
            image_ref: remote.image_ref.clone(),
            layer_digest: remote.digest.clone(),
            manifest_digest: record.labels.get(LABEL_CRI_MANIFEST_DIGEST).cloned(),
            // The TOC digest checked at the first mount (the layer's annotation), kept in the
            // record: the registry's TOC must match it again.
            toc_digest: (remote.format == LayerFormat::Estargz)
                .then(|| remote.index_digest.clone()),
            overlaybd: remote.format == LayerFormat::Overlaybd,
        };
        let resolved = self
            .inner
            .mounter
            .resolve(&labels)
            .await
            .map_err(|fallback| {
                unavailable(format!(
                    "{}; mounting it from the registry failed: {fallback}",
                    broken.reason
                ))
            })?;
        if remote.format == LayerFormat::Estargz
            && resolved.layer.index_digest != remote.index_digest
        {
            return Err(unavailable(format!(
                "{}; the registry's TOC is {}, the layer was mounted with {}",
                broken.reason, resolved.layer.index_digest, remote.index_digest
            )));
        }
        let id = record.id;
        self.blocking("remount", move |inner| inner.mount_again(id, &resolved))
            .await
            .map_err(|err| unavailable(format!("{}; {err}", broken.reason)))?;
        self.inner.unmounted.remove(key);
        info!(key, layer = %remote.digest, "remote layer mounted again from the registry");
        Ok(())
    }
}

impl Inner {
    /// `(key, record)` of every snapshot an overlay on top of `parent` stacks, nearest first
    /// (the keys of [`overlay_parents`](Inner::overlay_parents)).
    fn overlay_stack(&self, parent: &str) -> Result<Vec<(String, Record)>, SnapshotError> {
        let mut stack = Vec::new();
        let mut key = parent.to_owned();
        while !key.is_empty() {
            let record = self.store.get(&key)?;
            let merged = record
                .remote
                .as_ref()
                .is_some_and(|r| r.format == LayerFormat::Overlaybd);
            let next = record.parent.clone();
            stack.push((key, record));
            if merged {
                break;
            }
            key = next;
        }
        Ok(stack)
    }

    /// Persists the freshly verified index in place of the refused one and mounts it.
    fn mount_again(
        &self,
        id: u64,
        resolved: &crate::remote::ResolvedLayer,
    ) -> Result<(), SnapshotError> {
        let fs = self.layout.upper(id);
        let index = self.layout.dir(id).join(INDEX_FILE);
        write_durably(&index, &resolved.index).map_err(|source| SnapshotError::PersistIndex {
            path: index.clone(),
            source,
        })?;
        if let Err(err) = self.mounter.unmount(&fs) {
            warn!(mountpoint = %fs.display(), error = %err, "could not clear the old mount");
        }
        self.mounter.mount(resolved, &fs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use containerd_snapshots::Snapshotter;

    use super::*;
    use crate::remote::{
        Fallback, LayerMounter, RemoteLayer, ResolvedLayer, LABEL_CRI_IMAGE_REF,
        LABEL_CRI_LAYER_DIGEST, LABEL_TARGET,
    };

    /// Serves the index `good` from the "registry"; refuses to mount any other index.
    #[derive(Default)]
    struct Mounter {
        registry_down: bool,
        resolved: Mutex<Vec<Option<String>>>,
        mounted: Mutex<Vec<PathBuf>>,
    }

    #[containerd_snapshots::tonic::async_trait]
    impl LayerMounter for Mounter {
        async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
            self.resolved.lock().push(labels.toc_digest.clone());
            if self.registry_down {
                return Err(Fallback::Registry("connection refused".into()));
            }
            Ok(ResolvedLayer {
                layer: RemoteLayer {
                    format: LayerFormat::Estargz,
                    image_ref: labels.image_ref.clone(),
                    digest: labels.layer_digest.clone(),
                    size: 10,
                    index_digest: "sha256:toc".into(),
                },
                index: b"good".to_vec(),
            })
        }

        fn mount(&self, layer: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
            if layer.index != b"good" {
                return Err(SnapshotError::MountLayer {
                    mountpoint: mountpoint.to_owned(),
                    reason: "TOC digest mismatch".into(),
                });
            }
            self.mounted.lock().push(mountpoint.to_owned());
            Ok(())
        }

        fn unmount(&self, _mountpoint: &Path) -> Result<(), SnapshotError> {
            Ok(())
        }
    }

    /// A snapshotter holding remote layer `chain1`, reopened after its index was damaged.
    async fn damaged(dir: &Path, mounter: Arc<Mounter>) -> (ShoalSnapshotter, PathBuf) {
        {
            let sn = ShoalSnapshotter::open(dir, Arc::new(Mounter::default())).unwrap();
            let labels = HashMap::from([
                (LABEL_TARGET.to_string(), "chain1".to_string()),
                (LABEL_CRI_IMAGE_REF.to_string(), "r:5000/img:1".to_string()),
                (LABEL_CRI_LAYER_DIGEST.to_string(), "sha256:l1".to_string()),
            ]);
            let err = sn
                .prepare("extract-1".into(), String::new(), labels)
                .await
                .unwrap_err();
            assert!(matches!(err, SnapshotError::AlreadyExists { .. }), "{err}");
        }
        let index = std::fs::read_dir(dir.join("snapshots"))
            .unwrap()
            .map(|entry| entry.unwrap().path().join(INDEX_FILE))
            .find(|path| path.exists())
            .unwrap();
        std::fs::write(&index, b"edited").unwrap();
        let sn = ShoalSnapshotter::open(dir, mounter).unwrap();
        (sn, index)
    }

    #[tokio::test]
    async fn a_refused_index_is_mounted_again_from_the_registry_before_use() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(Mounter::default());
        let (sn, index) = damaged(dir.path(), mounter.clone()).await;
        let unmounted = sn.unmounted_layers();
        assert_eq!(unmounted.len(), 1);
        assert_eq!(unmounted[0].key, "chain1");
        assert_eq!(unmounted[0].layer, "sha256:l1");
        assert!(
            unmounted[0].reason.contains("persisted index"),
            "{unmounted:?}"
        );
        assert!(mounter.mounted.lock().is_empty());

        sn.prepare("container".into(), "chain1".into(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(
            *mounter.resolved.lock(),
            [Some("sha256:toc".to_string())],
            "the registry's TOC is checked against the digest kept in the record"
        );
        assert_eq!(mounter.mounted.lock().len(), 1);
        assert_eq!(
            std::fs::read(&index).unwrap(),
            b"good",
            "the index is persisted again"
        );
        assert!(sn.unmounted_layers().is_empty());
        sn.view("view".into(), "chain1".into(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(mounter.resolved.lock().len(), 1, "mounted once");
    }

    #[tokio::test]
    async fn without_the_registry_stacking_an_unmounted_layer_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(Mounter {
            registry_down: true,
            ..Mounter::default()
        });
        let (sn, _) = damaged(dir.path(), mounter.clone()).await;
        for result in [
            sn.prepare("container".into(), "chain1".into(), HashMap::new())
                .await,
            sn.view("view".into(), "chain1".into(), HashMap::new())
                .await,
        ] {
            let err = result.unwrap_err();
            assert!(
                matches!(&err, SnapshotError::LayerUnavailable { key, .. } if key == "chain1"),
                "{err}"
            );
            assert_eq!(err.code(), containerd_snapshots::tonic::Code::Unavailable);
            let text = err.to_string();
            assert!(
                text.contains("persisted index") && text.contains("connection refused"),
                "{text}"
            );
        }
        assert!(
            sn.stat("container".into()).await.is_err(),
            "nothing was created"
        );
        assert_eq!(sn.unmounted_layers().len(), 1);
        // Removing the layer forgets it.
        sn.remove("chain1".into()).await.unwrap();
        assert!(sn.unmounted_layers().is_empty());
    }
}
