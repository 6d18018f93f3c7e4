//! Damage a restart meets and a registry that misbehaves: a layer whose persisted index is
//! refused is mounted again from the registry or refused clearly, never stacked empty.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::fixture::{privileged, Fixture};
use crate::lazy::{data_image, ensure_all_lazy, ensure_sums, sha256_hex, Stack};
use crate::process;
use crate::proxy::Fault;

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
