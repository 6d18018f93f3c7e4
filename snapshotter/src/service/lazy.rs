//! The remote-snapshot handshake: Prepare with a target chainID either mounts the layer lazily
//! and answers ALREADY_EXISTS, or falls back (logged and counted) to an ordinary snapshot that
//! containerd fills by downloading the layer.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{error, info, warn};

use super::remount::UnmountedLayer;
use super::{Inner, ShoalSnapshotter};
use crate::error::SnapshotError;
use crate::metadata::{Kind, Record};
use crate::remote::{Fallback, LayerFormat, LayerLabels, ResolvedLayer, LABEL_REMOTE};

/// File under a remote snapshot's directory holding its verified index (the eStargz TOC), so
/// that a restart mounts it again without the registry.
pub(super) const INDEX_FILE: &str = "index";

/// How lazy pulling has gone since start: layers mounted, fallbacks by reason.
#[derive(Debug, Default)]
pub struct LazyStats {
    mounted: AtomicU64,
    remount_failures: AtomicU64,
    fallbacks: Mutex<BTreeMap<&'static str, u64>>,
    /// Unpacks whose Prepare carried no remote-snapshot labels at all.
    pub(super) unlabelled: super::unlabelled::UnlabelledUnpacks,
}

impl LazyStats {
    pub fn mounted(&self) -> u64 {
        self.mounted.load(Ordering::Relaxed)
    }

    pub fn remount_failures(&self) -> u64 {
        self.remount_failures.load(Ordering::Relaxed)
    }

    /// Fallback counts keyed by [`Fallback::kind`], with layers containerd unpacked without
    /// asking for a remote snapshot as `unlabelled_unpack`.
    pub fn fallbacks(&self) -> BTreeMap<&'static str, u64> {
        let mut fallbacks = self.fallbacks.lock().clone();
        let unlabelled = self.unlabelled.layers();
        if unlabelled > 0 {
            fallbacks.insert(super::unlabelled::KIND, unlabelled);
        }
        fallbacks
    }

    pub(crate) fn fell_back(&self, key: &str, reason: &Fallback) {
        match reason {
            Fallback::NotLazyFormat(_) | Fallback::Disabled => {
                info!(key, reason = %reason, kind = reason.kind(), "layer is downloaded, not lazily mounted")
            }
            _ => {
                warn!(key, reason = %reason, kind = reason.kind(), "lazy mount failed; layer is downloaded instead")
            }
        }
        *self.fallbacks.lock().entry(reason.kind()).or_default() += 1;
    }
}

impl ShoalSnapshotter {
    /// `Ok(error)` is the answer to the Prepare (ALREADY_EXISTS when the layer is provided);
    /// `Err(why)` means "fall back to an ordinary snapshot", already logged and counted.
    pub(super) async fn try_remote(
        &self,
        key: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        layer: LayerLabels,
    ) -> Result<SnapshotError, Fallback> {
        let target = layer.target.clone();
        let exists = {
            let target = target.clone();
            self.blocking("stat", move |inner| inner.store.get(&target))
                .await
        };
        if exists.is_ok() {
            return Ok(SnapshotError::AlreadyExists { key: target });
        }
        let resolved = match self.inner.mounter.resolve(&layer).await {
            Ok(resolved) => resolved,
            Err(fallback) if layer.overlaybd => {
                return Ok(block_layer_unavailable(&layer, &fallback))
            }
            Err(fallback) => {
                self.inner.lazy.fell_back(key, &fallback);
                return Err(fallback);
            }
        };
        let mut labels = labels.clone();
        labels.insert(LABEL_REMOTE.into(), "shoal".into());
        let (name, parent_key) = (target.clone(), parent.to_string());
        let created = self
            .blocking("prepare remote", move |inner| {
                inner.create(&name, &parent_key, Kind::Committed, labels, Some(&resolved))
            })
            .await;
        match created {
            Ok(record) => {
                self.inner.lazy.mounted.fetch_add(1, Ordering::Relaxed);
                info!(
                    chain_id = %target,
                    id = record.id,
                    layer = record.remote.as_ref().map(|r| r.digest.as_str()).unwrap_or(""),
                    "layer mounted lazily"
                );
                Ok(SnapshotError::AlreadyExists { key: target })
            }
            // Another Prepare for the same layer won the race: the layer is there all the same.
            Err(SnapshotError::AlreadyExists { .. }) => {
                Ok(SnapshotError::AlreadyExists { key: target })
            }
            Err(err) if layer.overlaybd => Ok(block_layer_unavailable(
                &layer,
                &Fallback::Mount(err.to_string()),
            )),
            Err(err) => {
                let fallback = Fallback::Mount(err.to_string());
                self.inner.lazy.fell_back(key, &fallback);
                Err(fallback)
            }
        }
    }
}

/// An overlaybd blob is a disk layer wrapped in a one-file tar: letting containerd unpack it
/// would give containers a root holding only `overlaybd.commit`, so the pull fails instead.
fn block_layer_unavailable(layer: &LayerLabels, reason: &Fallback) -> SnapshotError {
    error!(layer = %layer.layer_digest, reason = %reason, "overlaybd layer cannot be mounted");
    SnapshotError::BlockLayerUnavailable {
        layer: layer.layer_digest.clone(),
        reason: reason.to_string(),
    }
}

impl Inner {
    /// Lays out a remote snapshot in place (a FUSE mount cannot be renamed into place) and mounts
    /// it; a crash part-way leaves an orphan that start-up cleanup unmounts and removes.
    pub(super) fn make_remote_dir(
        &self,
        id: u64,
        resolved: &ResolvedLayer,
    ) -> Result<(), SnapshotError> {
        let dir = self.layout.dir(id);
        let fs = self.layout.upper(id);
        for (path, mode) in [(&dir, 0o700), (&fs, 0o755)] {
            std::fs::create_dir(path)
                .and_then(|()| {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|source| SnapshotError::CreateDir {
                    path: path.clone(),
                    source,
                })?;
        }
        let index = dir.join(INDEX_FILE);
        write_durably(&index, &resolved.index).map_err(|source| SnapshotError::PersistIndex {
            path: index,
            source,
        })?;
        self.mounter.mount(resolved, &fs)
    }

    /// The parents an overlay of `record` stacks, nearest first. An overlaybd layer's directory
    /// already holds the merged filesystem of its whole chain (deletions applied), so the list
    /// stops there: the layers below would only bring deleted files back.
    pub(super) fn overlay_parents(&self, record: &Record) -> Result<Vec<u64>, SnapshotError> {
        let mut ids = Vec::new();
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            let rec = self.store.get(&parent)?;
            ids.push(rec.id);
            let merged = rec
                .remote
                .as_ref()
                .is_some_and(|r| r.format == LayerFormat::Overlaybd);
            if merged {
                break;
            }
            parent = rec.parent;
        }
        Ok(ids)
    }

    /// Mounts every remote layer again after a restart, from its persisted index.
    pub(super) fn remount_all(&self) -> Result<(), SnapshotError> {
        let mut remounted = HashMap::new();
        for entry in self.store.list()? {
            let Some(layer) = entry.record.remote.clone() else {
                continue;
            };
            let fs = self.layout.upper(entry.record.id);
            let index_path = self.layout.dir(entry.record.id).join(INDEX_FILE);
            let result = std::fs::read(&index_path)
                .map_err(|source| SnapshotError::PersistIndex {
                    path: index_path.clone(),
                    source,
                })
                .and_then(|index| self.mounter.mount(&ResolvedLayer { layer, index }, &fs));
            match result {
                Ok(()) => {
                    remounted.insert(entry.key, entry.record.id);
                }
                Err(err) => {
                    self.lazy.remount_failures.fetch_add(1, Ordering::Relaxed);
                    error!(
                        key = %entry.key,
                        error = %err,
                        "could not mount remote layer again from its persisted index; \
                         it is mounted from the registry before anything stacks it"
                    );
                    self.unmounted.insert(UnmountedLayer {
                        key: entry.key,
                        layer: entry.record.remote.map(|r| r.digest).unwrap_or_default(),
                        reason: format!("its persisted index was refused: {err}"),
                    });
                }
            }
        }
        if !remounted.is_empty() {
            info!(layers = remounted.len(), "remote layers mounted again");
        }
        self.mounter.remounted();
        Ok(())
    }
}

pub(super) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use containerd_snapshots::Snapshotter;
    use futures::StreamExt;

    use super::*;
    use crate::remote::{LayerFormat, LayerMounter, RemoteLayer, LABEL_TARGET};

    /// Records every call; "mounts" by remembering the mountpoint.
    #[derive(Default)]
    struct RecordingMounter {
        fail_resolve: Option<Fallback>,
        /// Every mount fails (after the directory was made).
        fail_mount: bool,
        /// Resolve layers as overlaybd (each holds its whole chain) rather than eStargz.
        overlaybd: bool,
        calls: Mutex<Vec<String>>,
    }

    impl RecordingMounter {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().clone()
        }
    }

    #[containerd_snapshots::tonic::async_trait]
    impl LayerMounter for RecordingMounter {
        async fn resolve(&self, labels: &LayerLabels) -> Result<ResolvedLayer, Fallback> {
            self.calls
                .lock()
                .push(format!("resolve {}", labels.layer_digest));
            if let Some(fallback) = &self.fail_resolve {
                return Err(fallback.clone());
            }
            Ok(ResolvedLayer {
                layer: RemoteLayer {
                    format: if self.overlaybd {
                        LayerFormat::Overlaybd
                    } else {
                        LayerFormat::Estargz
                    },
                    image_ref: labels.image_ref.clone(),
                    digest: labels.layer_digest.clone(),
                    size: 1234,
                    index_digest: "sha256:toc".into(),
                },
                index: b"{\"version\":1}".to_vec(),
            })
        }

        fn mount(&self, layer: &ResolvedLayer, mountpoint: &Path) -> Result<(), SnapshotError> {
            self.calls.lock().push(format!(
                "mount {} {} index={}",
                layer.layer.digest,
                mountpoint.display(),
                String::from_utf8_lossy(&layer.index)
            ));
            if self.fail_mount {
                return Err(SnapshotError::MountLayer {
                    mountpoint: mountpoint.to_owned(),
                    reason: "refused by the test".into(),
                });
            }
            Ok(())
        }

        fn unmount(&self, mountpoint: &Path) -> Result<(), SnapshotError> {
            self.calls
                .lock()
                .push(format!("unmount {}", mountpoint.display()));
            Ok(())
        }

        fn release_cached(&self, digest: &str) {
            self.calls.lock().push(format!("release {digest}"));
        }

        fn cached_bytes(&self, digest: &str) -> u64 {
            // As if a tenth of each 1234-byte layer were cached.
            if digest.starts_with("sha256:") {
                123
            } else {
                0
            }
        }
    }

    fn remote_labels(target: &str, layer: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_TARGET.to_string(), target.to_string()),
            (
                crate::remote::LABEL_CRI_IMAGE_REF.to_string(),
                "127.0.0.1:5000/img:1".to_string(),
            ),
            (
                crate::remote::LABEL_CRI_LAYER_DIGEST.to_string(),
                layer.to_string(),
            ),
        ])
    }

    fn open(root: &Path, mounter: &Arc<RecordingMounter>) -> ShoalSnapshotter {
        ShoalSnapshotter::open(root, mounter.clone()).unwrap()
    }

    #[tokio::test]
    async fn remote_layers_commit_the_target_and_answer_already_exists() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter::default());
        let sn = open(dir.path(), &mounter);

        let err = sn
            .prepare(
                "extract-1 chain1".into(),
                String::new(),
                remote_labels("chain1", "sha256:l1"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SnapshotError::AlreadyExists { key } if key == "chain1"),
            "{err}"
        );
        let err = sn
            .prepare(
                "extract-2 chain2".into(),
                "chain1".into(),
                remote_labels("chain2", "sha256:l2"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, SnapshotError::AlreadyExists { .. }));

        let info = sn.stat("chain2".into()).await.unwrap();
        assert_eq!(info.parent, "chain1");
        // Its usage is what the node caches of the layer, not its empty directory.
        assert_eq!(sn.usage("chain2".into()).await.unwrap().size, 123);
        assert_eq!(info.kind, containerd_snapshots::Kind::Committed);
        assert_eq!(
            info.labels.get(LABEL_TARGET).map(String::as_str),
            Some("chain2")
        );
        assert!(
            sn.stat("extract-2 chain2".into()).await.is_err(),
            "the key is never created"
        );

        // containerd's follow-up lookup.
        let filter = format!(r#"labels."{LABEL_TARGET}"==chain1,parent=="#);
        let found: Vec<_> = sn
            .list(String::new(), vec![filter])
            .await
            .unwrap()
            .map(|i| i.unwrap().name)
            .collect()
            .await;
        assert_eq!(found, ["chain1"]);

        // A container on top sees both FUSE mountpoints as lowerdirs, top first.
        let mounts = sn
            .prepare("container".into(), "chain2".into(), HashMap::new())
            .await
            .unwrap();
        let lower = mounts[0].options.last().unwrap().clone();
        let calls = mounter.calls();
        let mountpoints: Vec<PathBuf> = calls
            .iter()
            .filter_map(|c| c.strip_prefix("mount "))
            .map(|c| PathBuf::from(c.split(' ').nth(1).unwrap()))
            .collect();
        assert_eq!(
            lower,
            format!(
                "lowerdir={}:{}",
                mountpoints[1].display(),
                mountpoints[0].display()
            )
        );
        assert_eq!(sn.lazy_stats().mounted(), 2);

        // The same layer asked again (another image sharing it) is found, not mounted twice.
        let err = sn
            .prepare(
                "extract-3 chain1".into(),
                String::new(),
                remote_labels("chain1", "sha256:l1"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, SnapshotError::AlreadyExists { .. }));
        assert_eq!(
            mounter
                .calls()
                .iter()
                .filter(|c| c.starts_with("mount"))
                .count(),
            2
        );
    }

    #[tokio::test]
    async fn removing_a_blobs_last_snapshot_releases_its_cached_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter::default());
        let sn = open(dir.path(), &mounter);
        // Two images share layer l1 under different parents: two snapshots of one blob.
        for (key, parent, target, layer) in [
            ("extract-1 a", "", "a", "sha256:l0"),
            ("extract-2 b", "a", "b", "sha256:l1"),
            ("extract-3 c", "", "c", "sha256:l1"),
        ] {
            let err = sn
                .prepare(key.into(), parent.into(), remote_labels(target, layer))
                .await
                .unwrap_err();
            assert!(matches!(err, SnapshotError::AlreadyExists { .. }), "{err}");
        }
        let released = || -> Vec<String> {
            mounter
                .calls()
                .into_iter()
                .filter(|call| call.starts_with("release "))
                .collect()
        };
        sn.remove("b".into()).await.unwrap();
        assert!(released().is_empty(), "c still uses l1: {:?}", released());
        sn.remove("c".into()).await.unwrap();
        assert_eq!(released(), ["release sha256:l1"]);
        sn.remove("a".into()).await.unwrap();
        assert_eq!(released(), ["release sha256:l1", "release sha256:l0"]);
    }

    #[tokio::test]
    async fn unresolvable_layers_fall_back_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter {
            fail_resolve: Some(Fallback::NotLazyFormat("plain gzip".into())),
            ..Default::default()
        });
        let sn = open(dir.path(), &mounter);
        let mounts = sn
            .prepare(
                "extract-1".into(),
                String::new(),
                remote_labels("chain1", "sha256:l1"),
            )
            .await
            .unwrap();
        assert_eq!(
            mounts[0].r#type, "bind",
            "an ordinary snapshot to download into"
        );
        assert_eq!(
            sn.stat("extract-1".into()).await.unwrap().kind,
            containerd_snapshots::Kind::Active
        );
        assert_eq!(sn.lazy_stats().fallbacks().get("not_lazy_format"), Some(&1));

        let labels = HashMap::from([(LABEL_TARGET.to_string(), "chain9".to_string())]);
        sn.prepare("extract-2".into(), String::new(), labels)
            .await
            .unwrap();
        assert_eq!(sn.lazy_stats().fallbacks().get("missing_labels"), Some(&1));
    }

    #[tokio::test]
    async fn containers_on_overlaybd_layers_stack_only_the_nearest_one() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter {
            overlaybd: true,
            ..Default::default()
        });
        let sn = open(dir.path(), &mounter);
        for (key, parent, target, layer) in [
            ("extract-1", "", "chain1", "sha256:l1"),
            ("extract-2", "chain1", "chain2", "sha256:l2"),
        ] {
            let err = sn
                .prepare(key.into(), parent.into(), remote_labels(target, layer))
                .await
                .unwrap_err();
            assert!(matches!(err, SnapshotError::AlreadyExists { .. }), "{err}");
        }
        let calls = mounter.calls();
        let top = calls
            .iter()
            .filter_map(|c| c.strip_prefix("mount sha256:l2 "))
            .map(|c| c.split(' ').next().unwrap().to_owned())
            .next()
            .unwrap();
        let mounts = sn
            .prepare("container".into(), "chain2".into(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(mounts[0].r#type, "overlay");
        assert!(
            mounts[0].options.contains(&format!("lowerdir={top}")),
            "{:?}",
            mounts[0].options
        );
        let view = sn
            .view("view".into(), "chain2".into(), HashMap::new())
            .await
            .unwrap();
        assert_eq!(view[0].r#type, "bind");
        assert_eq!(view[0].source, top);
    }

    #[tokio::test]
    async fn unmountable_overlaybd_layers_fail_the_pull_instead_of_unpacking() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter {
            fail_resolve: Some(Fallback::Registry("connection refused".into())),
            ..Default::default()
        });
        let sn = open(dir.path(), &mounter);
        let mut labels = remote_labels("chain1", "sha256:l1");
        labels.insert(
            crate::remote::LABEL_OVERLAYBD_BLOB_DIGEST.to_string(),
            "sha256:l1".to_string(),
        );
        let err = sn
            .prepare("extract-1".into(), String::new(), labels)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, SnapshotError::BlockLayerUnavailable { layer, .. } if layer == "sha256:l1"),
            "{err}"
        );
        assert_eq!(err.code(), containerd_snapshots::tonic::Code::Unavailable);
        assert!(
            sn.stat("extract-1".into()).await.is_err(),
            "nothing to unpack into"
        );
        assert!(sn.lazy_stats().fallbacks().is_empty());
    }

    #[tokio::test]
    async fn a_failed_mount_leaves_no_record_and_no_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter {
            fail_mount: true,
            ..Default::default()
        });
        let sn = open(dir.path(), &mounter);
        let mounts = sn
            .prepare(
                "extract-1".into(),
                String::new(),
                remote_labels("chain1", "sha256:l1"),
            )
            .await
            .unwrap();
        assert_eq!(mounts[0].r#type, "bind", "fell back to a download");
        assert!(sn.stat("chain1".into()).await.is_err(), "no remote record");
        assert_eq!(sn.lazy_stats().fallbacks().get("mount"), Some(&1));
        let calls = mounter.calls();
        let mountpoint = calls
            .iter()
            .find_map(|c| c.strip_prefix("mount sha256:l1 "))
            .map(|c| PathBuf::from(c.split(' ').next().unwrap()))
            .unwrap();
        assert!(
            calls.last().unwrap() == &format!("unmount {}", mountpoint.display()),
            "{calls:?}"
        );
        assert!(
            !mountpoint.parent().unwrap().exists(),
            "its directory is gone"
        );
        let dirs = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(dirs, 1, "only the fallback snapshot's directory");
        // The key is free again: the reservation went with the failure.
        let err = {
            let ok = Arc::new(RecordingMounter::default());
            drop(sn);
            let sn = open(dir.path(), &ok);
            sn.prepare(
                "extract-2".into(),
                String::new(),
                remote_labels("chain1", "sha256:l1"),
            )
            .await
            .unwrap_err()
        };
        assert!(matches!(err, SnapshotError::AlreadyExists { .. }), "{err}");
    }

    #[tokio::test]
    async fn start_up_drops_a_half_made_snapshot_and_unmounts_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter::default());
        let fs = {
            let sn = open(dir.path(), &mounter);
            // A daemon killed after reserving and mounting, before committing.
            let (record, _) = sn
                .inner
                .store
                .reserve("chain1", "", Kind::Committed, BTreeMap::new(), None)
                .unwrap();
            let fs = sn.inner.layout.upper(record.id);
            std::fs::create_dir_all(&fs).unwrap();
            fs
        };
        let restarted = Arc::new(RecordingMounter::default());
        let sn = open(dir.path(), &restarted);
        assert_eq!(
            restarted.calls(),
            [format!("unmount {}", fs.display())],
            "unmounted, never mounted again"
        );
        assert!(!fs.parent().unwrap().exists());
        assert!(sn.stat("chain1".into()).await.is_err());
        let err = sn
            .prepare(
                "extract-1".into(),
                String::new(),
                remote_labels("chain1", "sha256:l1"),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, SnapshotError::AlreadyExists { .. }), "{err}");
        assert!(
            sn.stat("chain1".into()).await.is_ok(),
            "the key is free again"
        );
    }

    #[tokio::test]
    async fn restart_remounts_from_the_persisted_index_and_remove_unmounts() {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(RecordingMounter::default());
        {
            let sn = open(dir.path(), &mounter);
            let _ = sn
                .prepare(
                    "extract-1".into(),
                    String::new(),
                    remote_labels("chain1", "sha256:l1"),
                )
                .await;
        }
        let restarted = Arc::new(RecordingMounter::default());
        let sn = open(dir.path(), &restarted);
        // What a previous daemon left mounted is the mounter's to take over or release.
        let calls = restarted.calls();
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("mount sha256:l1") && c.ends_with("index={\"version\":1}")),
            "{calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("resolve")),
            "no registry on restart"
        );

        sn.remove("chain1".into()).await.unwrap();
        let calls = restarted.calls();
        assert_eq!(
            calls[calls.len() - 2..],
            [
                format!("unmount {}", dir.path().join("snapshots/1/fs").display()),
                "release sha256:l1".to_owned()
            ]
        );
    }
}
