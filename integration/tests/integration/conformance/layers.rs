//! The suite's layering checks (former docker issues with layered filesystems), the removal of
//! intermediate snapshots, and a 128-layer chain mounted as one view.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{conformance, gc_root, key_of};
use crate::fixture::privileged;
use crate::mount;
use crate::tree;

#[test]
fn layer_file_update() {
    privileged!();
    conformance(|suite| {
        let l1 = vec![
            tree::dir("/etc", 0o700),
            tree::file("/etc/hosts", "mydomain 10.0.0.1", 0o644),
            tree::file("/etc/profile", "PATH=/usr/bin", 0o644),
        ];
        let l2 = vec![
            tree::file("/etc/hosts", "mydomain 10.0.0.2", 0o644),
            tree::file("/etc/profile", "PATH=/usr/bin", 0o666),
            tree::dir("/root", 0o700),
            tree::file("/root/.bashrc", "PATH=/usr/sbin:/usr/bin", 0o644),
        ];
        // Several rounds straddling second boundaries, as the suite does, to catch changes
        // lost to same-second timestamps.
        for _ in 0..3 {
            suite.check_snapshots(&[l1.clone(), l2.clone()])?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
            std::thread::sleep(Duration::from_nanos(u64::from(
                1_000_000_000 - now.subsec_nanos(),
            )));
        }
        Ok(())
    });
}

#[test]
fn remove_directory_in_lower_layer() {
    privileged!();
    conformance(|suite| {
        suite.check_snapshots(&[
            vec![
                tree::dir("/lib", 0o700),
                tree::file("/lib/hidden", "", 0o644),
            ],
            vec![
                tree::remove_all("/lib"),
                tree::dir("/lib", 0o700),
                tree::file("/lib/not-hidden", "", 0o644),
            ],
            vec![tree::file("/lib/newfile", "", 0o644)],
        ])
    });
}

#[test]
fn chown() {
    privileged!();
    conformance(|suite| {
        suite.check_snapshots(&[
            vec![
                tree::dir("/opt", 0o700),
                tree::dir("/opt/a", 0o700),
                tree::dir("/opt/a/b", 0o700),
                tree::file("/opt/a/b/file.txt", "hello", 0o644),
            ],
            vec![
                tree::chown("/opt", 1, 1),
                tree::chown("/opt/a", 1, 1),
                tree::chown("/opt/a/b", 1, 1),
                tree::chown("/opt/a/b/file.txt", 1, 1),
            ],
        ])
    });
}

/// The suite's Rename check without its directory rename: overlayfs without `redirect_dir`
/// answers EXDEV to renaming a lower directory, for containerd's own overlayfs as well.
#[test]
fn rename_files() {
    privileged!();
    conformance(|suite| {
        suite.check_snapshots(&[
            vec![
                tree::dir("/somefiles", 0o700),
                tree::file("/somefiles/f1", "was here first!", 0o644),
                tree::file("/somefiles/f2", "nothing interesting", 0o644),
            ],
            vec![
                tree::file("/somefiles/f1-overwrite", "new content 1", 0o644),
                tree::rename("/somefiles/f1-overwrite", "/somefiles/f1"),
                tree::rename("/somefiles/f2", "/somefiles/f3"),
            ],
        ])
    });
}

#[test]
fn directory_permission_on_commit() {
    privileged!();
    conformance(|suite| {
        suite.check_snapshots(&[
            vec![
                tree::dir("/dir1", 0o700),
                tree::dir("/dir2", 0o700),
                tree::dir("/dir3", 0o700),
                tree::dir("/dir4", 0o700),
                tree::file("/dir4/f1", "...", 0o644),
                tree::dir("/dir5", 0o700),
                tree::file("/dir5/f1", "...", 0o644),
                tree::chown("/dir1", 1, 1),
                tree::chown("/dir2", 1, 1),
                tree::chown("/dir3", 1, 1),
                tree::chown("/dir5", 1, 1),
                tree::chown("/dir5/f1", 1, 1),
            ],
            vec![
                tree::chown("/dir2", 0, 0),
                tree::remove_all("/dir3"),
                tree::chown("/dir4", 1, 1),
                tree::chown("/dir4/f1", 1, 1),
            ],
            vec![
                tree::dir("/dir3", 0o700),
                tree::chown("/dir3", 1, 1),
                tree::remove_all("/dir5"),
                tree::dir("/dir5", 0o700),
                tree::chown("/dir5", 1, 1),
            ],
        ])
    });
}

#[test]
fn deleted_files_in_child_snapshot() {
    privileged!();
    conformance(|suite| {
        suite.check_snapshots(&[
            vec![
                tree::file("/foo", "foo\n", 0o777),
                tree::file("/foobar", "foobar\n", 0o777),
            ],
            vec![tree::remove_all("/foobar")],
            vec![],
        ])
    });
}

#[test]
fn move_file_from_lower_layer() {
    privileged!();
    conformance(|suite| {
        suite.check_snapshots(&[
            vec![
                tree::dir("/dir1", 0o700),
                tree::file("/dir1/f1", "Hello", 0o644),
                tree::dir("dir2", 0o700),
                tree::file("dir2/f2", "...", 0o644),
            ],
            vec![
                tree::dir("/dir3", 0o700),
                tree::file("/dir3/f1", "Hello", 0o644),
                tree::remove_all("/dir1"),
                tree::link("dir2/f2", "dir3/f2"),
                tree::remove_all("dir2/f2"),
            ],
        ])
    });
}

#[test]
fn remove_intermediate_snapshot() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let base = suite.prepare_mounted("base", "")?;
        let committed_base = key_of(&suite.work.join("committed-base"));
        api.commit_labeled(&committed_base, &key_of(&base), gc_root())?;
        let intermediate = key_of(&suite.work.join("intermediate"));
        api.prepare_labeled(&intermediate, &committed_base, gc_root())?;
        let committed_inter = key_of(&suite.work.join("committed-inter"));
        api.commit_labeled(&committed_inter, &intermediate, gc_root())?;
        let top = key_of(&suite.work.join("toplayer"));
        api.prepare_labeled(&top, &committed_inter, gc_root())?;

        anyhow::ensure!(
            api.remove(&committed_inter).is_err(),
            "removing a snapshot with a child succeeded"
        );
        api.remove(&top)?;
        api.remove(&committed_inter)?;
        mount::unmount(&base)?;
        api.remove(&committed_base)?;
        Ok(())
    });
}

/// 128 layers each overwriting, adding, and replacing a directory, then one view of the top:
/// the overlay options exceed a page, so the mount needs relative lowerdirs.
#[test]
fn layers_128_mount() {
    privileged!();
    conformance(|suite| {
        let mut appliers = vec![vec![
            tree::file("/bottom", "way at the bottom\n", 0o777),
            tree::file("/overwriteme", "FIRST!\n", 0o777),
            tree::dir("/ADDHERE", 0o755),
            tree::dir("/ONLYME", 0o755),
            tree::file("/ONLYME/bottom", "bye!\n", 0o777),
        ]];
        for i in 1..=127 {
            appliers.push(vec![
                tree::file("/overwriteme", format!("{i} WAS HERE!\n"), 0o777),
                tree::file(format!("/ADDHERE/file-{i}"), "same\n", 0o755),
                tree::remove_all("/ONLYME"),
                tree::dir("/ONLYME", 0o755),
                tree::file(format!("/ONLYME/file-{i}"), "only me!\n", 0o777),
            ]);
        }
        let flat = suite.work_dir("flat")?;
        let mut parent = String::new();
        for (i, ops) in appliers.iter().enumerate() {
            let preparing = suite.work_dir(&format!("prepare-layer-{i}"))?;
            let mounts = suite
                .api
                .prepare_labeled(&key_of(&preparing), &parent, gc_root())?;
            mount::mount_all(&mounts, &preparing)?;
            let checked = tree::assert_same(&flat, &preparing)
                .and_then(|()| tree::apply(&flat, ops))
                .and_then(|()| tree::apply(&preparing, ops))
                .and_then(|()| tree::assert_same(&flat, &preparing));
            mount::unmount(&preparing)?;
            checked.map_err(|err| err.context(format!("layer {i}")))?;
            parent = key_of(&suite.work.join(format!("committed-{i}")));
            suite
                .api
                .commit_labeled(&parent, &key_of(&preparing), gc_root())?;
        }
        let view = suite.work_dir("fullview")?;
        let mounts = suite.api.view_labeled(&key_of(&view), &parent, gc_root())?;
        mount::mount_all(&mounts, &view)?;
        let compared = tree::assert_same(&flat, &view);
        mount::unmount(&view)?;
        compared
    });
}
