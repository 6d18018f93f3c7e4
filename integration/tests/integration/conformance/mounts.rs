//! The mounts themselves, compared with what containerd 1.6's overlayfs snapshotter returns:
//! a bind of `fs` without parents, a read-only bind of the parent for a one-parent view, and
//! overlay with `lowerdir` top first otherwise (with `upperdir`/`workdir` when active).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use containerd_snapshots::api::types::Mount;

use super::{conformance, gc_root};
use crate::fixture::privileged;

/// Options containerd's overlay snapshotter may add depending on the kernel and rootlessness.
const OPTIONAL_OVERLAY_OPTIONS: &[&str] = &["index=off", "userxattr", "volatile"];

fn single(mounts: &[Mount]) -> Result<&Mount> {
    anyhow::ensure!(mounts.len() == 1, "expected one mount, got {mounts:?}");
    Ok(&mounts[0])
}

/// The `fs` directory of a bind mount, checked to be `<root>/snapshots/<id>/fs`.
fn bind_source(mount: &Mount, root: &Path, read_only: bool) -> Result<PathBuf> {
    let flag = if read_only { "ro" } else { "rw" };
    anyhow::ensure!(
        mount.r#type == "bind" && mount.options == [flag, "rbind"],
        "expected bind [{flag}, rbind], got {mount:?}"
    );
    let source = PathBuf::from(&mount.source);
    snapshot_fs(&source, root)?;
    Ok(source)
}

fn snapshot_fs(path: &Path, root: &Path) -> Result<()> {
    let snapshots = root.join("snapshots");
    let id_dir = path.parent().context("fs without a parent")?;
    anyhow::ensure!(
        path.file_name().is_some_and(|name| name == "fs")
            && id_dir.parent() == Some(snapshots.as_path())
            && path.is_dir(),
        "{} is not an existing <root>/snapshots/<id>/fs",
        path.display()
    );
    Ok(())
}

/// `(upperdir, workdir, lowerdirs)` of an overlay mount, rejecting unexpected options.
fn overlay_parts(mount: &Mount) -> Result<(Option<String>, Option<String>, Vec<String>)> {
    anyhow::ensure!(
        mount.r#type == "overlay" && mount.source == "overlay",
        "expected an overlay mount, got {mount:?}"
    );
    let (mut upper, mut work, mut lower) = (None, None, Vec::new());
    for option in &mount.options {
        if let Some(dir) = option.strip_prefix("upperdir=") {
            upper = Some(dir.to_owned());
        } else if let Some(dir) = option.strip_prefix("workdir=") {
            work = Some(dir.to_owned());
        } else if let Some(dirs) = option.strip_prefix("lowerdir=") {
            lower = dirs.split(':').map(str::to_owned).collect();
        } else {
            anyhow::ensure!(
                OPTIONAL_OVERLAY_OPTIONS.contains(&option.as_str()),
                "unexpected overlay option {option:?}"
            );
        }
    }
    Ok((upper, work, lower))
}

#[test]
fn mounts_match_containerd_overlay_layout() {
    privileged!();
    conformance(|suite| {
        let api = &suite.api;
        let root = suite.daemon.root();

        let active = api.prepare_labeled("base-active", "", gc_root())?;
        let base_fs = bind_source(single(&active)?, root, false)?;
        api.commit_labeled("base", "base-active", gc_root())?;

        let empty_view = api.view_labeled("empty-view", "", gc_root())?;
        bind_source(single(&empty_view)?, root, true)?;

        let view = api.view_labeled("base-view", "base", gc_root())?;
        let viewed = bind_source(single(&view)?, root, true)?;
        anyhow::ensure!(
            viewed == base_fs,
            "a view of base binds {}",
            viewed.display()
        );

        let child = api.prepare_labeled("child-active", "base", gc_root())?;
        let (upper, work, lower) = overlay_parts(single(&child)?)?;
        let upper = PathBuf::from(upper.context("active overlay without upperdir")?);
        let work = PathBuf::from(work.context("active overlay without workdir")?);
        snapshot_fs(&upper, root)?;
        anyhow::ensure!(
            work == upper.with_file_name("work") && work.is_dir(),
            "workdir {} is not beside upperdir {}",
            work.display(),
            upper.display()
        );
        anyhow::ensure!(lower == [base_fs.to_string_lossy()], "lowerdir {lower:?}");
        anyhow::ensure!(
            api.mounts("child-active")? == child,
            "Mounts differs from Prepare"
        );

        api.commit_labeled("child", "child-active", gc_root())?;
        let two = api.view_labeled("two-view", "child", gc_root())?;
        let (upper, work, lower) = overlay_parts(single(&two)?)?;
        anyhow::ensure!(
            upper.is_none() && work.is_none(),
            "a view has an upper: {two:?}"
        );
        let child_fs = upper_of(&child)?;
        anyhow::ensure!(
            lower == [child_fs, base_fs.to_string_lossy().into_owned()],
            "lowerdir of a two-layer view is {lower:?}, expected top first"
        );
        Ok(())
    });
}

fn upper_of(mounts: &[Mount]) -> Result<String> {
    overlay_parts(single(mounts)?)?.0.context("no upperdir")
}
