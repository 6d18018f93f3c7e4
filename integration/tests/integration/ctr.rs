//! Shoal behind a real containerd, driven with `ctr`: pulls from the loopback registry, runs
//! containers, `ctr snapshots` subcommands, commits of container changes, and daemon restarts.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::containerd::{self, Containerd};
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::image;
use crate::mount;
use crate::process;
use crate::registry::Registry;

/// A registry holding the layered image, the daemon, and containerd using it as `shoal`.
struct Stack {
    reference: String,
    daemon: Daemon,
    ctd: Containerd,
    _registry: Registry,
}

impl Stack {
    fn start(fixture: &Fixture) -> Result<Stack> {
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "layered", &image::layered()?)?;
        let reference = built.push(&registry.host(), "test/layered")?;
        let daemon = Daemon::start(fixture)?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            ..containerd::Options::default()
        };
        let ctd = Containerd::start(fixture, &options)?;
        ctd.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "shoal",
            &reference,
        ])?;
        Ok(Stack {
            reference,
            daemon,
            ctd,
            _registry: registry,
        })
    }

    fn snapshots(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["snapshots", "--snapshotter", "shoal"];
        full.extend_from_slice(args);
        self.ctd.ctr(&full)
    }

    /// `(key, parent, kind)` rows of `ctr snapshots ls`.
    fn listed(&self) -> Result<BTreeSet<(String, String, String)>> {
        let out = self.snapshots(&["ls"])?;
        Ok(out
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [key, parent, kind] => Some(((*key).into(), (*parent).into(), (*kind).into())),
                    [key, kind] => Some(((*key).into(), String::new(), (*kind).into())),
                    _ => None,
                }
            })
            .collect())
    }

    fn run_check(&self, id: &str) -> Result<()> {
        let out = self.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &self.reference,
            id,
            "sh",
            "-c",
            image::LAYERED_CHECK,
        ])?;
        anyhow::ensure!(out.trim() == "layered-ok", "container {id} printed {out:?}");
        Ok(())
    }
}

#[test]
fn pull_run_and_writes_stay_in_the_container_snapshot() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        stack.run_check("first")?;

        stack.ctd.ctr(&[
            "run",
            "--snapshotter",
            "shoal",
            &stack.reference,
            "writer",
            "sh",
            "-c",
            "echo written > /data/written && echo changed > /data/overwrite",
        ])?;
        let dirs = stack.daemon.snapshot_dirs()?;
        let holders: Vec<&PathBuf> = dirs
            .iter()
            .filter(|dir| dir.join("data/written").exists())
            .collect();
        anyhow::ensure!(holders.len() == 1, "data/written found in {holders:?}");
        let upper = holders[0];
        let mounts = stack.snapshots(&["mounts", "/mnt", "writer"])?;
        anyhow::ensure!(
            mounts.contains(&format!("upperdir={}", upper.display())),
            "the writer's upper dir {} is not its snapshot's: {mounts}",
            upper.display()
        );
        for dir in dirs.iter().filter(|dir| *dir != upper) {
            if let Ok(text) = fs::read_to_string(dir.join("data/overwrite")) {
                anyhow::ensure!(
                    text != "changed\n",
                    "a committed layer was modified: {}",
                    dir.display()
                );
            }
        }

        let listed = stack.listed()?;
        let writer = listed
            .iter()
            .find(|(key, _, _)| key == "writer")
            .with_context(|| format!("writer not listed: {listed:?}"))?;
        anyhow::ensure!(
            writer.2 == "Active" && !writer.1.is_empty(),
            "writer listed as {writer:?}"
        );
        anyhow::ensure!(
            listed
                .iter()
                .filter(|(_, _, kind)| kind == "Committed")
                .count()
                == 3,
            "expected the image's 3 committed layers: {listed:?}"
        );
        let info = stack.snapshots(&["info", "writer"])?;
        anyhow::ensure!(
            info.contains("\"Name\": \"writer\"") && info.contains("\"Kind\": \"Active\""),
            "info: {info}"
        );
        let usage = stack.snapshots(&["usage", "writer"])?;
        anyhow::ensure!(
            usage.lines().any(|line| line.starts_with("writer")),
            "usage: {usage}"
        );
        let tree = stack.snapshots(&["tree"])?;
        anyhow::ensure!(tree.contains("writer"), "tree: {tree}");

        // Commit the container's changes and run a new container on top of them.
        stack.snapshots(&["commit", "writer-committed", "writer"])?;
        stack.snapshots(&["prepare", "child", "writer-committed"])?;
        let rootfs = fixture.mkdir("child-rootfs")?;
        let mount_command = stack.snapshots(&["mounts", &rootfs.to_string_lossy(), "child"])?;
        process::run(
            Command::new("sh").arg("-c").arg(mount_command.trim()),
            Duration::from_secs(20),
        )?;
        let out = stack.ctd.ctr(&[
            "run",
            "--rm",
            "--rootfs",
            &rootfs.to_string_lossy(),
            "child-run",
            "/bin/sh",
            "-c",
            "cat /data/written /data/overwrite /etc/greeting",
        ])?;
        mount::unmount(&rootfs)?;
        anyhow::ensure!(
            out == "written\nchanged\nhello from shoal\n",
            "the child container saw {out:?}"
        );
        stack.snapshots(&["rm", "child"])?;
        stack.snapshots(&["rm", "writer-committed"])?;
        let keys: Vec<String> = stack.listed()?.into_iter().map(|row| row.0).collect();
        anyhow::ensure!(
            !keys
                .iter()
                .any(|key| key == "child" || key == "writer-committed"),
            "removed snapshots still listed: {keys:?}"
        );
        Ok(())
    });
}

#[test]
fn snapshots_survive_daemon_restarts() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture)?;
        stack.ctd.ctr(&[
            "run",
            "--snapshotter",
            "shoal",
            &stack.reference,
            "keeper",
            "sh",
            "-c",
            "echo kept > /kept",
        ])?;
        let before = stack.listed()?;
        anyhow::ensure!(
            before.len() == 4,
            "expected 3 layers and keeper: {before:?}"
        );

        let status = stack.daemon.stop()?;
        anyhow::ensure!(status.success(), "SIGTERM exit status {status}");
        anyhow::ensure!(
            !stack.daemon.socket().exists(),
            "the socket outlived SIGTERM"
        );
        stack.daemon.launch()?;
        expect_listed_again(&stack, &before, "SIGTERM")?;
        stack.run_check("after-sigterm")?;

        stack.daemon.kill()?;
        stack.daemon.launch()?;
        expect_listed_again(&stack, &before, "SIGKILL")?;
        stack.run_check("after-sigkill")?;
        Ok(())
    });
}

/// containerd reconnects to the proxy with a back-off, so the first calls may still fail.
fn expect_listed_again(
    stack: &Stack,
    before: &BTreeSet<(String, String, String)>,
    after: &str,
) -> Result<()> {
    let mut last = BTreeSet::new();
    wait_until(
        &format!("ctr snapshots ls after {after}"),
        Duration::from_secs(30),
        || {
            last = stack.listed()?;
            Ok(true)
        },
    )?;
    anyhow::ensure!(
        &last == before,
        "after {after} the snapshots are {last:?}, before they were {before:?}"
    );
    Ok(())
}

#[test]
fn an_image_unpacked_without_remote_snapshot_labels_is_logged_once_with_what_to_use() {
    privileged!();
    Fixture::run(|fixture| {
        // `ctr image pull` on containerd 1.6 prepares every layer without the labels a
        // remote snapshotter needs: the layers are downloaded, and the daemon says so once.
        let stack = Stack::start(fixture)?;
        let layers = stack.listed()?.len();
        anyhow::ensure!(layers >= 2, "a layered image has {layers} snapshots");
        let log = stack.daemon.log();
        let said = log.matches("without remote-snapshot labels").count();
        anyhow::ensure!(
            said == 1 && log.contains("shoal rpull"),
            "said {said} times for one image of {layers} layers:\n{log}"
        );
        Ok(())
    });
}
