use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("metadata.db")).unwrap();
    (dir, store)
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn no_dir(_: u64, _: Option<u64>) -> Result<(), SnapshotError> {
    Ok(())
}

#[test]
fn create_commit_remove_lifecycle() {
    let (_dir, store) = store();
    let a = store
        .create("a", "", Kind::Active, labels(&[]), None, no_dir)
        .unwrap();
    let usage = DiskUsage {
        size: 4096,
        inodes: 2,
    };
    let base = store
        .commit("a", "base", labels(&[("x", "1")]), usage)
        .unwrap();
    assert_eq!(base.id, a.id, "commit keeps the directory id");
    assert_eq!(base.kind, Kind::Committed);
    assert!(matches!(
        store.get("a"),
        Err(SnapshotError::NotFound { .. })
    ));

    let child = store
        .create("b", "base", Kind::Active, labels(&[]), None, no_dir)
        .unwrap();
    assert_eq!(store.parent_ids(&child).unwrap(), vec![base.id]);
    assert!(matches!(
        store.remove("base"),
        Err(SnapshotError::HasChildren { .. })
    ));
    store.remove("b").unwrap();
    store.remove("base").unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn errors_match_containerd_semantics() {
    let (_dir, store) = store();
    assert!(matches!(
        store.create("a", "missing", Kind::Active, labels(&[]), None, no_dir),
        Err(SnapshotError::ParentNotFound { .. })
    ));
    store
        .create("a", "", Kind::Active, labels(&[]), None, no_dir)
        .unwrap();
    assert!(matches!(
        store.create("a", "", Kind::View, labels(&[]), None, no_dir),
        Err(SnapshotError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.create("b", "a", Kind::Active, labels(&[]), None, no_dir),
        Err(SnapshotError::ParentNotCommitted { .. })
    ));
    store
        .create("v", "", Kind::View, labels(&[]), None, no_dir)
        .unwrap();
    assert!(matches!(
        store.commit("v", "c", labels(&[]), DiskUsage::default()),
        Err(SnapshotError::NotActive { .. })
    ));
}

#[test]
fn failed_directory_setup_leaves_no_record() {
    let (_dir, store) = store();
    let err = store.create("a", "", Kind::Active, labels(&[]), None, |_, _| {
        Err(SnapshotError::InvalidKey { reason: "boom" })
    });
    assert!(err.is_err());
    assert!(matches!(
        store.get("a"),
        Err(SnapshotError::NotFound { .. })
    ));
}

#[test]
fn a_pending_record_is_invisible_and_dropped_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.db");
    {
        let store = Store::open(&path).unwrap();
        store
            .create("base", "", Kind::Active, labels(&[]), None, no_dir)
            .unwrap();
        store
            .commit("base", "c", labels(&[]), DiskUsage::default())
            .unwrap();
        // What a daemon killed between the two phases leaves.
        let (reserved, _) = store
            .reserve("half", "c", Kind::Active, labels(&[]), None)
            .unwrap();
        assert!(matches!(
            store.get("half"),
            Err(SnapshotError::NotFound { .. })
        ));
        let keys: Vec<String> = store.list().unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["c"]);
        assert!(
            matches!(store.remove("c"), Err(SnapshotError::HasChildren { .. })),
            "the parent of a snapshot being made stays"
        );
        assert!(matches!(
            store.create("half", "", Kind::Active, labels(&[]), None, no_dir),
            Err(SnapshotError::AlreadyExists { .. })
        ));
        let live = store.with_live_ids(|ids| ids.clone()).unwrap();
        assert!(
            live.contains(&reserved.id),
            "its directory is not reclaimed"
        );
    }
    let store = Store::open(&path).unwrap();
    let dropped = store.abandon_all_pending().unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].key, "half");
    assert!(store.abandon_all_pending().unwrap().is_empty());
    store.remove("c").unwrap();
    store
        .create("half", "", Kind::Active, labels(&[]), None, no_dir)
        .unwrap();
}

#[test]
fn directories_are_made_outside_the_write_transaction() {
    let (_dir, store) = store();
    // A write inside make_dir would deadlock if the reservation's transaction were open.
    store
        .create("a", "", Kind::Active, labels(&[]), None, |_, _| {
            store
                .create("b", "", Kind::Active, labels(&[]), None, no_dir)
                .map(|_| ())
        })
        .unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
}

#[test]
fn a_store_left_half_made_by_a_killed_daemon_does_not_block_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.db");
    // What a daemon killed inside the first creation leaves: a file that is no store.
    std::fs::write(path.with_extension("db.new"), [0u8; 4096]).unwrap();
    let store = Store::open(&path).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(!path.with_extension("db.new").exists());
}

#[test]
fn records_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.db");
    {
        let store = Store::open(&path).unwrap();
        store
            .create("a", "", Kind::Active, labels(&[("k", "v")]), None, no_dir)
            .unwrap();
        store
            .commit("a", "c", labels(&[("k", "v")]), DiskUsage::default())
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    let record = store.get("c").unwrap();
    assert_eq!(record.labels, labels(&[("k", "v")]));
    let next = store
        .create("d", "c", Kind::Active, labels(&[]), None, no_dir)
        .unwrap();
    assert!(next.id > record.id, "ids are never reused");
}

#[test]
fn corrupt_file_is_a_clear_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metadata.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&path).err().expect("garbage must not open");
    assert!(matches!(err, SnapshotError::OpenStore { .. }), "{err}");
}
