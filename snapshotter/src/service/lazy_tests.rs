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
