use futures::StreamExt;

use super::*;
use crate::remote::NoRemote;

async fn list(sn: &ShoalSnapshotter, filters: &[&str]) -> Vec<String> {
    let filters = filters.iter().map(|s| s.to_string()).collect();
    let mut names: Vec<String> = sn
        .list(String::new(), filters)
        .await
        .unwrap()
        .map(|info| info.unwrap().name)
        .collect()
        .await;
    names.sort();
    names
}

#[tokio::test]
async fn prepare_commit_view_and_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let sn = ShoalSnapshotter::open(dir.path(), Arc::new(NoRemote)).unwrap();
    let mounts = sn
        .prepare("a".into(), String::new(), HashMap::new())
        .await
        .unwrap();
    assert_eq!(mounts[0].r#type, "bind");
    let upper = PathBuf::from(&mounts[0].source);
    let mode = std::fs::metadata(&upper).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "a snapshot root is 0755");
    std::fs::write(upper.join("file"), b"hello").unwrap();
    sn.commit("base".into(), "a".into(), HashMap::new())
        .await
        .unwrap();
    let usage = sn.usage("base".into()).await.unwrap();
    assert_eq!(usage.inodes, 2);

    let view = sn
        .view("v".into(), "base".into(), HashMap::new())
        .await
        .unwrap();
    assert_eq!(view[0].source, upper.display().to_string());
    assert_eq!(list(&sn, &["kind==view"]).await, ["v"]);
    assert_eq!(list(&sn, &["parent==base"]).await, ["v"]);
    assert_eq!(list(&sn, &[]).await, ["base", "v"]);

    std::fs::create_dir(dir.path().join("snapshots/999")).unwrap();
    sn.clear().await.unwrap();
    assert!(!dir.path().join("snapshots/999").exists());
    assert!(upper.exists(), "cleanup keeps live snapshots");
}

#[tokio::test]
async fn update_follows_containerd_field_paths() {
    let dir = tempfile::tempdir().unwrap();
    let sn = ShoalSnapshotter::open(dir.path(), Arc::new(NoRemote)).unwrap();
    let labels = HashMap::from([("a".to_string(), "1".to_string())]);
    sn.prepare("k".into(), String::new(), labels).await.unwrap();
    let before = sn.stat("k".into()).await.unwrap();

    let mut info = sn.stat("k".into()).await.unwrap();
    info.labels = HashMap::from([("b".to_string(), "2".to_string())]);
    let updated = sn
        .update(info, Some(vec!["labels.b".into()]))
        .await
        .unwrap();
    assert_eq!(updated.labels.len(), 2);
    assert!(updated.updated_at >= before.updated_at);
    assert_eq!(updated.created_at, before.created_at);

    let mut info = sn.stat("k".into()).await.unwrap();
    info.labels = HashMap::new();
    let updated = sn.update(info, None).await.unwrap();
    assert!(updated.labels.is_empty(), "no paths replaces all labels");

    let info = sn.stat("k".into()).await.unwrap();
    let err = sn
        .update(info, Some(vec!["parent".into()]))
        .await
        .unwrap_err();
    assert!(matches!(err, SnapshotError::InvalidUpdateField { .. }));
}

#[tokio::test]
async fn oversized_label_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let sn = ShoalSnapshotter::open(dir.path(), Arc::new(NoRemote)).unwrap();
    let labels = HashMap::from([("k".to_string(), "v".repeat(5000))]);
    let err = sn
        .prepare("k".into(), String::new(), labels)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        containerd_snapshots::tonic::Code::InvalidArgument
    );
}
