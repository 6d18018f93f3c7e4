//! Damage a restart meets and a registry that misbehaves: a layer whose persisted index is
//! refused is mounted again from the registry or refused clearly, never stacked empty; a
//! daemon killed between a snapshot's reservation and its commit leaves neither behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::binary;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::lazy::{data_image, ensure_all_lazy, ensure_sums, sha256_hex, Stack};
use crate::mount;
use crate::overlaybd;
use crate::process::{self, Process};
use crate::proxy::Fault;

/// Bounds the wait for the held mount and for rpull's end once the daemon is gone.
const HOLD_TIMEOUT: Duration = Duration::from_secs(120);

/// The persisted index (`snapshots/<id>/index`) whose TOC names `entry`.
fn index_naming(root: &Path, entry: &str) -> Result<PathBuf> {
    let snapshots = root.join("snapshots");
    for dirent in fs::read_dir(&snapshots).with_context(|| format!("list {snapshots:?}"))? {
        let index = dirent?.path().join("index");
        let Ok(bytes) = fs::read(&index) else {
            continue;
        };
        if bytes.windows(entry.len()).any(|w| w == entry.as_bytes()) {
            return Ok(index);
        }
    }
    anyhow::bail!("no persisted index under {snapshots:?} names {entry}")
}

fn status(stack: &Stack) -> Result<String> {
    let mut command = Command::new(binary::cli()?);
    command
        .arg("--config")
        .arg(stack.daemon.config())
        .arg("status");
    process::run(&mut command, Duration::from_secs(30))
}

#[test]
fn a_layer_whose_persisted_index_is_refused_is_mounted_from_the_registry_or_refused() {
    privileged!();
    Fixture::run(|fixture| {
        let address = crate::fixture::loopback_addr(9464);
        // After the `[registry]` header: quick failures, and `/status` for `shoal status`.
        let settings =
            format!("timeout_secs = 5\nretries = 1\n[metrics]\naddress = \"{address}\"\n");
        let mut stack = Stack::start(fixture, &settings)?;
        let (layers, mut expected) = data_image(&[("payload", 1 << 20)])?;
        expected.insert("/etc/greeting".into(), sha256_hex(b"hello from shoal\n"));
        let image = stack.publish(fixture, "badindex", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;
        // Caches what the check below runs (sh, cat, ls), so that only the layer can fail it.
        let warm = stack.run(&image.estargz, "warm-up", "cat /etc/greeting; ls /data")?;
        anyhow::ensure!(warm.contains("payload"), "warm-up run: {warm}");

        // Edit the top layer's persisted TOC (the one holding /data) while the daemon is down.
        stack.daemon.stop()?;
        let index = index_naming(stack.daemon.root(), "data/payload")?;
        let mut bytes = fs::read(&index)?;
        let at = bytes
            .windows(b"payload".len())
            .position(|w| w == b"payload")
            .context("payload in the index")?;
        bytes[at] = b'P';
        fs::write(&index, &bytes)?;
        // And its blocks leave the chunk cache, which would otherwise serve its TOC again.
        let top = image.layers[1].digest.trim_start_matches("sha256:");
        for suffix in ["data", "bitmap"] {
            let cached = stack.daemon.root().join(format!("cache/{top}.{suffix}"));
            fs::remove_file(&cached).with_context(|| format!("remove {}", cached.display()))?;
        }

        // The registry fails too: the layer can be mounted neither way, so the container
        // must not start (it would see the base layer alone, without /data).
        let proxy = stack.registry.proxy();
        proxy.inject("/blobs/", Fault::Status(500));
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        let shown = status(&stack)?;
        anyhow::ensure!(
            shown.contains("NOT MOUNTED") && shown.contains("persisted index was refused"),
            "shoal status does not show the unmounted layer: {shown}"
        );
        let refused = stack.run(
            &image.estargz,
            "without-registry",
            "cat /etc/greeting; ls /data; true",
        );
        match refused {
            Ok(out) => anyhow::bail!("the container started on a partial tree: {out}"),
            Err(error) => {
                let text = format!("{error:#}");
                anyhow::ensure!(
                    text.contains("cannot be mounted again") && text.contains("registry"),
                    "the failure does not say why: {text}"
                );
            }
        }

        // Once the registry answers, the layer is mounted from it, TOC verified again.
        proxy.clear_faults();
        ensure_sums(&stack, &image.estargz, "remounted", &expected)?;
        let shown = status(&stack)?;
        anyhow::ensure!(
            !shown.contains("NOT MOUNTED"),
            "shoal status still shows the layer unmounted: {shown}"
        );
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.contains("mounted again from the registry"),
            "the daemon log does not report the remount"
        );
        // And the index it persisted again serves the next restart without the registry.
        stack.daemon.stop()?;
        proxy.inject("/blobs/", Fault::Status(500));
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        ensure_sums(&stack, &image.estargz, "restarted", &expected)?;
        Ok(())
    });
}

/// Stands in for mount(8): reports its pid, then holds the daemon's loop mount, which runs
/// after the snapshot's reservation and before its commit, until it is killed.
fn hold_mount_shim(dir: &Path, marker: &Path) -> Result<()> {
    let shim = dir.join("mount");
    let script = format!(
        "#!/bin/sh\necho $$ > '{marker}.tmp' && mv '{marker}.tmp' '{marker}'\nexec sleep 300\n",
        marker = marker.display()
    );
    fs::write(&shim, script).with_context(|| format!("write {}", shim.display()))?;
    fs::set_permissions(&shim, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", shim.display()))
}

/// Why not a stalled registry: `resolve` reads an overlaybd blob's first cache block (tar
/// header, ZFile header, LSMT header) before the reservation, and the ext4 superblock is
/// the LSMT's first data, in that same block, so the mount never asks the registry for it.
#[test]
fn a_daemon_killed_between_reserve_and_commit_leaves_no_snapshot_and_no_mount() {
    privileged!();
    Fixture::run(|fixture| {
        let shim_dir = fixture.mkdir("shim")?;
        let marker = fixture.path("mount-shim.pid");
        hold_mount_shim(&shim_dir, &marker)?;
        let mut stack = overlaybd::Stack::start_with(fixture, |daemon| {
            daemon.set_path_prefix(Some(shim_dir));
        })?;
        let layout = overlaybd::fixture_layout(fixture)?;
        let reference = stack.push_layout(&layout, overlaybd::FIXTURE_TAG, "obd-crash")?;

        let rpull_log = fixture.path("rpull.log");
        fixture.register_log("shoal rpull", &rpull_log);
        let mut command = Command::new(binary::cli()?);
        command
            .arg("--config")
            .arg(stack.daemon.config())
            .arg("rpull")
            .arg("--address")
            .arg(stack.ctd.address())
            .args(["-n", stack.ctd.namespace(), "--plain-http", &reference]);
        let mut rpull = Process::spawn("shoal rpull", &mut command, &rpull_log)?;

        // The create is between its phases: reserved, its disk served, its mount held.
        wait_until("the daemon's loop mount", HOLD_TIMEOUT, || {
            if let Some(status) = rpull.try_status()? {
                anyhow::bail!("rpull ended ({status}) before the mount: {}", rpull.log());
            }
            anyhow::ensure!(stack.daemon.is_running()?, "the daemon died");
            Ok(marker.exists())
        })?;
        let root = stack.daemon.root().to_owned();
        let pending = mount::mounts_under(&root);
        anyhow::ensure!(
            pending.iter().any(|p| p.ends_with("vdisk")),
            "the pending snapshot's disk is not mounted: {pending:?}"
        );
        let listed = stack.daemon.client()?.list_names(&[])?;
        anyhow::ensure!(
            listed.is_empty(),
            "a pending snapshot is visible: {listed:?}"
        );
        let dirs = stack.daemon.snapshot_dirs()?;
        let [pending_fs] = dirs.as_slice() else {
            anyhow::bail!("expected one snapshot directory, found {dirs:?}");
        };
        let pending_dir = pending_fs.parent().context("fs has a parent")?.to_owned();

        stack.daemon.kill()?;
        let shim: i32 = fs::read_to_string(&marker)?.trim().parse()?;
        let _ = kill(Pid::from_raw(shim), Signal::SIGKILL);
        anyhow::ensure!(
            rpull.wait_timeout(HOLD_TIMEOUT)?.is_some(),
            "rpull still runs after the daemon died"
        );

        stack.daemon.set_path_prefix(None);
        stack.daemon.launch()?;
        stack.ctd.wait_for_snapshotter("shoal")?;
        let listed = stack.daemon.client()?.list_names(&[])?;
        anyhow::ensure!(listed.is_empty(), "after the restart: {listed:?}");
        let left = mount::mounts_under(&root);
        anyhow::ensure!(left.is_empty(), "mounts left under the root: {left:?}");
        anyhow::ensure!(
            !pending_dir.exists(),
            "{} is still there",
            pending_dir.display()
        );

        // containerd redials the proxy with a back-off after the kill: its first calls may still
        // fail as unavailable, so only those are tried again.
        let mut out = String::new();
        wait_until("rpull after the restart", HOLD_TIMEOUT, || {
            match stack.rpull(&reference) {
                Ok(pulled) => out = pulled,
                Err(err) if format!("{err:#}").contains("(Unavailable)") => return Ok(false),
                Err(err) => return Err(err),
            }
            Ok(true)
        })?;
        anyhow::ensure!(out.contains("1 layers, 1 lazy"), "not lazy: {out}");
        let out = stack.run_default(&reference, "obd-crash-1")?;
        anyhow::ensure!(out.contains(overlaybd::GREETING), "no greeting: {out}");
        Ok(())
    })
}
