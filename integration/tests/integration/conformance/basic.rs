//! The suite's lifecycle checks: prepare, commit, stat, view, update, remove, and the mounts.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use containerd_snapshots::api::snapshots::v1::{Info, Kind};
use containerd_snapshots::tonic::Code;

use super::{conformance, gc_root, key_of, unique, Suite};
use crate::client::{self, expect_code, kind};
use crate::fixture::privileged;
use crate::mount;
use crate::tree;

fn expect_kind_parent(info: &Info, want_kind: Kind, want_parent: &str) -> Result<()> {
    anyhow::ensure!(
        kind(info) == want_kind && info.parent == want_parent,
        "{}: expected {want_kind:?} with parent {want_parent:?}, got {:?} with parent {:?}",
        info.name,
        kind(info),
        info.parent
    );
    Ok(())
}

#[test]
fn basic() {
    privileged!();
    conformance(|suite| {
        let initial = [
            tree::file("/foo", "foo\n", 0o777),
            tree::dir("/a", 0o755),
            tree::dir("/a/b", 0o755),
            tree::dir("/a/b/c", 0o755),
        ];
        let diff = [
            tree::file("/bar", "bar\n", 0o777),
            tree::file("/foo", "bar\n", 0o777),
            tree::remove_all("/a/b"),
        ];
        let api = &suite.api;
        let preparing = suite.prepare_mounted("preparing", "")?;
        tree::apply(&preparing, &initial)?;
        mount::unmount(&preparing)?;
        let committed = key_of(&suite.work.join("committed"));
        api.commit_labeled(&committed, &key_of(&preparing), gc_root())?;
        let si = api.stat(&committed)?;
        expect_kind_parent(&si, Kind::Committed, "")?;
        anyhow::ensure!(
            api.stat(&key_of(&preparing)).is_err(),
            "active key still there after commit"
        );

        let next = suite.prepare_mounted("nextlayer", &committed)?;
        let expected = suite.work_dir("expected-initial")?;
        tree::apply(&expected, &initial)?;
        tree::assert_same(&expected, &next)?;
        tree::apply(&next, &diff)?;
        mount::unmount(&next)?;
        let ni = api.stat(&key_of(&next))?;
        expect_kind_parent(&ni, Kind::Active, &committed)?;

        let next_committed = key_of(&suite.work.join("committed-next"));
        api.commit_labeled(&next_committed, &key_of(&next), gc_root())?;
        let si2 = api.stat(&next_committed)?;
        expect_kind_parent(&si2, Kind::Committed, &committed)?;
        anyhow::ensure!(
            api.stat(&key_of(&next)).is_err(),
            "active key still there after commit"
        );

        let walked: HashMap<String, Info> = api
            .list(&[])?
            .into_iter()
            .map(|info| (info.name.clone(), info))
            .collect();
        for info in [&si, &si2] {
            let found = walked
                .get(&info.name)
                .with_context(|| format!("{} not listed", info.name))?;
            anyhow::ensure!(found == info, "listed {found:?}, stat said {info:?}");
        }

        let view = suite.work_dir("nextnextlayer")?;
        let mounts = api.view_labeled(&key_of(&view), &next_committed, gc_root())?;
        mount::mount_all(&mounts, &view)?;
        tree::apply(&expected, &diff)?;
        let compared = tree::assert_same(&expected, &view);
        mount::unmount(&view)?;
        compared?;
        api.remove(&key_of(&view))?;
        let refused = api.remove(&committed);
        anyhow::ensure!(
            refused.is_err(),
            "removing a snapshot with a child succeeded"
        );
        api.remove(&next_committed)?;
        api.remove(&committed)?;
        Ok(())
    });
}

#[test]
fn stat_active() {
    privileged!();
    conformance(|suite| {
        let preparing = suite.prepare_mounted("preparing", "")?;
        fs::write(preparing.join("foo"), "foo\n")?;
        let info = suite.api.stat(&key_of(&preparing))?;
        anyhow::ensure!(
            info.name == key_of(&preparing),
            "stat named {:?}",
            info.name
        );
        expect_kind_parent(&info, Kind::Active, "")
    });
}

#[test]
fn stat_committed() {
    privileged!();
    conformance(|suite| {
        let preparing = suite.prepare_mounted("preparing", "")?;
        fs::write(preparing.join("foo"), "foo\n")?;
        let committed = key_of(&suite.work.join("committed"));
        suite
            .api
            .commit_labeled(&committed, &key_of(&preparing), gc_root())?;
        let info = suite.api.stat(&committed)?;
        anyhow::ensure!(info.name == committed, "stat named {:?}", info.name);
        expect_kind_parent(&info, Kind::Committed, "")
    });
}

#[test]
fn transitivity() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let preparing = suite.prepare_mounted("preparing", "")?;
        fs::write(preparing.join("foo"), "foo\n")?;
        let snap_a = key_of(&suite.work.join("snapA"));
        api.commit_labeled(&snap_a, &key_of(&preparing), gc_root())?;
        let next = suite.prepare_mounted("next", &snap_a)?;
        fs::write(next.join("foo"), "foo bar\n")?;
        let snap_b = key_of(&suite.work.join("snapB"));
        api.commit_labeled(&snap_b, &key_of(&next), gc_root())?;
        let si_a = api.stat(&snap_a)?;
        let si_b = api.stat(&snap_b)?;
        let si_parent_b = api.stat(&si_b.parent)?;
        anyhow::ensure!(si_a.parent.is_empty(), "A has parent {:?}", si_a.parent);
        anyhow::ensure!(si_b.parent == snap_a, "B's parent is {:?}", si_b.parent);
        anyhow::ensure!(
            si_parent_b.parent.is_empty(),
            "B's parent has parent {:?}",
            si_parent_b.parent
        );
        Ok(())
    });
}

#[test]
fn prepare_view_failing() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let preparing = suite.prepare_mounted("preparing", "")?;
        let snap_a = key_of(&suite.work.join("snapA"));
        api.commit_labeled(&snap_a, &key_of(&preparing), gc_root())?;

        let new_layer = key_of(&suite.work.join("newlayer"));
        api.prepare_labeled(&new_layer, &snap_a, gc_root())?;
        anyhow::ensure!(
            api.view(&new_layer, &snap_a).is_err(),
            "view reused an active key"
        );

        let prep_layer = key_of(&suite.work.join("prepLayer"));
        api.prepare_labeled(&prep_layer, &snap_a, gc_root())?;
        anyhow::ensure!(
            api.prepare(&prep_layer, &snap_a).is_err(),
            "prepare reused a key"
        );

        let view_layer = key_of(&suite.work.join("viewLayer"));
        api.view_labeled(&view_layer, &snap_a, gc_root())?;
        anyhow::ensure!(api.view(&view_layer, &snap_a).is_err(), "view reused a key");
        Ok(())
    });
}

/// c1 <- c2 <- a1, a2 (no parent), v1 (view of c2), v2 (view, no parent).
fn base_snapshots(suite: &Suite) -> Result<()> {
    let api = &suite.api;
    api.prepare_labeled("c1-a", "", gc_root())?;
    api.commit_labeled("c1", "c1-a", gc_root())?;
    api.prepare_labeled("c2-a", "c1", gc_root())?;
    api.commit_labeled("c2", "c2-a", gc_root())?;
    api.prepare_labeled("a1", "c2", gc_root())?;
    api.prepare_labeled("a2", "", gc_root())?;
    api.view_labeled("v1", "c2", gc_root())?;
    api.view_labeled("v2", "", gc_root())?;
    Ok(())
}

fn time_of(timestamp: Option<&prost_types::Timestamp>) -> Result<SystemTime> {
    let timestamp = timestamp.context("missing timestamp")?;
    let seconds = u64::try_from(timestamp.seconds).context("timestamp before 1970")?;
    let nanos = u32::try_from(timestamp.nanos).context("negative nanos")?;
    Ok(SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// `time` lies in `[from, to]`, give or take a millisecond of storage rounding.
fn within(time: SystemTime, from: SystemTime, to: SystemTime) -> bool {
    let slack = Duration::from_millis(1);
    time + slack >= from && time <= to + slack
}

#[test]
fn update() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let t1 = SystemTime::now();
        base_snapshots(suite)?;
        let t2 = SystemTime::now();
        let cases = [
            ("c1", Kind::Committed, ""),
            ("c2", Kind::Committed, "c1"),
            ("a1", Kind::Active, "c2"),
            ("a2", Kind::Active, ""),
            ("v1", Kind::View, "c2"),
            ("v2", Kind::View, ""),
        ];
        for (name, want_kind, want_parent) in cases {
            let mut info = api.stat(name)?;
            let created = time_of(info.created_at.as_ref())?;
            anyhow::ensure!(
                within(created, t1, t2),
                "{name}: created {created:?} outside [{t1:?}, {t2:?}]"
            );
            anyhow::ensure!(
                info.created_at == info.updated_at,
                "{name}: updated != created at creation"
            );
            expect_kind_parent(&info, want_kind, want_parent)?;
            anyhow::ensure!(info.name == name, "stat of {name} named {:?}", info.name);

            let mut expected = client::labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3")]);
            expected.extend(gc_root());
            info.parent = "doesnotexist".to_owned();
            info.labels = expected.clone();
            let u1 = SystemTime::now();
            let updated = api
                .update(info.clone(), &[])
                .with_context(|| format!("update {name}"))?;
            let u2 = SystemTime::now();
            anyhow::ensure!(
                updated.created_at == info.created_at,
                "{name}: update changed created"
            );
            let when = time_of(updated.updated_at.as_ref())?;
            anyhow::ensure!(
                within(when, u1, u2),
                "{name}: updated {when:?} outside [{u1:?}, {u2:?}]"
            );
            expect_kind_parent(&updated, want_kind, want_parent)?;
            anyhow::ensure!(
                updated.labels == expected,
                "{name}: labels {:?}",
                updated.labels
            );

            let mut partial = updated.clone();
            partial.labels = client::labels(&[("l1", "updated"), ("l4", "v4")]);
            let updated = api.update(partial, &["labels.l1", "labels.l2"])?;
            let mut expected = client::labels(&[("l1", "updated"), ("l3", "v3")]);
            expected.extend(gc_root());
            anyhow::ensure!(
                updated.labels == expected,
                "{name}: masked update gave {:?}",
                updated.labels
            );

            let mut whole = updated.clone();
            let mut expected = client::labels(&[("l4", "v4")]);
            expected.extend(gc_root());
            whole.labels = expected.clone();
            let updated = api.update(whole, &["labels"])?;
            anyhow::ensure!(
                updated.labels == expected,
                "{name}: labels update gave {:?}",
                updated.labels
            );

            let mut immutable = updated.clone();
            immutable.parent = "doesnotexist".to_owned();
            expect_code(
                &format!("{name}: update of parent"),
                api.update(immutable, &["parent"]),
                Code::InvalidArgument,
            )?;
        }
        Ok(())
    });
}

#[test]
fn remove() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        api.prepare_labeled("committed-a", "", gc_root())?;
        api.commit_labeled("committed-1", "committed-a", gc_root())?;
        api.prepare_labeled("reuse-1", "committed-1", gc_root())?;
        api.remove("reuse-1")?;
        api.view_labeled("reuse-1", "committed-1", gc_root())?;
        api.remove("reuse-1")?;
        api.prepare_labeled("reuse-1", "", gc_root())?;
        api.remove("committed-1")?;
        api.commit_labeled("committed-1", "reuse-1", gc_root())?;
        Ok(())
    });
}

#[test]
fn view_readonly() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let preparing = key_of(&suite.work.join("preparing"));
        api.prepare_labeled(&preparing, "", gc_root())?;
        let committed = key_of(&suite.work.join("committed"));
        api.commit_labeled(&committed, &preparing, gc_root())?;
        let view = key_of(&suite.work.join("view"));
        let mounts = api.view_labeled(&view, &committed, gc_root())?;
        let target = suite.work_dir("view-mount")?;
        mount::mount_all(&mounts, &target)?;
        let written = fs::write(target.join("testfile"), "testcontent");
        mount::unmount(&target)?;
        anyhow::ensure!(written.is_err(), "a write into a view succeeded");
        api.remove(&view)?;
        api.remove(&committed)?;
        Ok(())
    });
}

#[test]
fn stat_in_walk() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let prefix = "stats-in-walk-";
        let (c1, c2) = (format!("{prefix}c1"), format!("{prefix}c2"));
        api.prepare(&format!("{c1}-a"), "")?;
        api.commit(&c1, &format!("{c1}-a"))?;
        api.prepare(&format!("{c2}-a"), &c1)?;
        api.commit(&c2, &format!("{c2}-a"))?;
        api.prepare(&format!("{prefix}a1"), &c2)?;
        api.view(&format!("{prefix}v1"), &c2)?;
        // Stat every snapshot while the List stream is still open, on a second connection.
        let other = suite.daemon.client()?;
        let mut walk = api.list_stream(&[])?;
        let mut seen = 0;
        while let Some(info) = walk.next_info()? {
            if !info.name.starts_with(prefix) {
                continue;
            }
            let stat = other.stat(&info.name)?;
            anyhow::ensure!(stat == info, "walk gave {info:?}, stat gave {stat:?}");
            seen += 1;
        }
        anyhow::ensure!(seen == 4, "expected 4 snapshots in the walk, saw {seen}");
        Ok(())
    });
}

/// The gRPC form of the suite's CloseTwice: work, drop the connection, connect and drop again;
/// the daemon still serves and kept the state.
#[test]
fn close_twice() {
    privileged!();
    conformance(|suite| {
        let name = unique("closeTwice");
        let prepare = format!("{name}-prepare");
        {
            let first = suite.daemon.client()?;
            first.prepare_labeled(&prepare, "", gc_root())?;
            first.commit_labeled(&name, &prepare, gc_root())?;
            first.remove(&name)?;
        }
        drop(suite.daemon.client()?);
        let third = suite.daemon.client()?;
        expect_code(
            "stat of the removed snapshot",
            third.stat(&name),
            Code::NotFound,
        )?;
        third.prepare_labeled("after-close", "", gc_root())?;
        Ok(())
    });
}

#[test]
fn root_permission() {
    privileged!();
    conformance(|suite| {
        let preparing = suite.prepare_mounted("preparing", "")?;
        let mode = fs::metadata(&preparing)?.permissions().mode() & 0o777;
        mount::unmount(&preparing)?;
        anyhow::ensure!(
            mode == 0o755,
            "the root of a new snapshot has mode {mode:o}, expected 755"
        );
        Ok(())
    });
}
