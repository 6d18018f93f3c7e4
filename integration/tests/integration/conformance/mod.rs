//! containerd's snapshotter test suite (`snapshots/testsuite` of containerd 1.6), re-expressed
//! against the daemon's gRPC socket: each check of the suite is one `#[test]`. Files are
//! applied into mounted snapshots and compared, after commit, with the same changes applied to
//! a plain directory.

mod basic;
mod layers;
mod mounts;
mod walk;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

use crate::client::{self, Labels, Snapshots};
use crate::daemon::Daemon;
use crate::fixture::Fixture;
use crate::mount;
use crate::tree::{self, Op};

/// The label containerd's suite puts on everything so its garbage collector keeps it.
fn gc_root() -> Labels {
    client::labels(&[("containerd.io/gc.root", "conformance")])
}

/// A running daemon, a client, and a work directory for mount points.
struct Suite {
    daemon: Daemon,
    api: Snapshots,
    work: PathBuf,
}

impl Suite {
    fn start(fixture: &Fixture) -> Result<Suite> {
        let daemon = Daemon::start(fixture)?;
        let api = daemon.client()?;
        let work = fixture.mkdir("work")?;
        Ok(Suite { daemon, api, work })
    }

    /// A fresh directory under the work directory.
    fn work_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.work.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Prepares an active snapshot keyed by the path of a new work directory (as the suite
    /// does) and mounts it there.
    fn prepare_mounted(&self, name: &str, parent: &str) -> Result<PathBuf> {
        let target = self.work_dir(name)?;
        let key = key_of(&target);
        let mounts = self
            .api
            .prepare_labeled(&key, parent, gc_root())
            .with_context(|| format!("prepare {key} on {parent:?}"))?;
        mount::mount_all(&mounts, &target)?;
        Ok(target)
    }

    /// Commits a snapshot built by applying `ops` in an active snapshot over `parent`.
    fn create_snapshot(&self, parent: &str, ops: &[Op]) -> Result<String> {
        let name = unique("layer");
        let preparing = format!("{name}-prepare");
        let mounts = self.api.prepare_labeled(&preparing, parent, gc_root())?;
        let target = self.work_dir(&format!("{name}-mnt"))?;
        mount::mount_all(&mounts, &target)?;
        let applied = tree::apply(&target, ops);
        mount::unmount(&target)?;
        applied?;
        self.api
            .commit_labeled(&name, &preparing, gc_root())
            .with_context(|| format!("commit {preparing} as {name}"))?;
        Ok(name)
    }

    /// Mounts a view of `name` and compares it with the tree at `expected`.
    fn check_snapshot(&self, name: &str, expected: &Path) -> Result<()> {
        let view = format!("{name}-view");
        let mounts = self.api.view_labeled(&view, name, gc_root())?;
        let target = self.work_dir(&format!("{name}-check"))?;
        mount::mount_all(&mounts, &target)?;
        let compared = tree::assert_same(expected, &target);
        mount::unmount(&target)?;
        self.api
            .remove(&view)
            .with_context(|| format!("remove view {view}"))?;
        compared.with_context(|| format!("snapshot {name}"))
    }

    /// Builds a chain of snapshots, one per change list, checking each against a flat directory
    /// that received the same changes.
    fn check_snapshots(&self, layers: &[Vec<Op>]) -> Result<()> {
        let flat = self.work_dir(&unique("flat"))?;
        let mut parent = String::new();
        for (index, ops) in layers.iter().enumerate() {
            let name = self
                .create_snapshot(&parent, ops)
                .with_context(|| format!("create snapshot {}", index + 1))?;
            tree::apply(&flat, ops)?;
            self.check_snapshot(&name, &flat)
                .with_context(|| format!("check snapshot {}", index + 1))?;
            parent = name;
        }
        Ok(())
    }
}

fn key_of(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs a conformance check with a fresh fixture and daemon.
fn conformance(check: impl FnOnce(&Suite) -> Result<()>) {
    Fixture::run(|fixture| {
        let suite = Suite::start(fixture)?;
        check(&suite)
    });
}
