//! Read-triggered completion (`fetch.complete_after_percent`): once a container's reads have
//! brought in half of a layer, the rest of it comes in the background, each byte once, so the
//! reads still to come find it cached; a layer read only a little is never completed. For
//! eStargz and overlaybd layers alike.

use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::convert::manifest_layers;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::lazy::{data_image, mountpoints_of, Stack};
use crate::overlaybd::{self, random_bytes, sha256_hex};

const COMPLETED: &str = "layer fully fetched in the background";
const WAIT: Duration = Duration::from_secs(60);
/// Beyond the blob once: its footer and TOC, read when it is opened.
const SLACK: u64 = 512 << 10;

#[test]
fn a_layer_read_half_through_is_completed_once_and_one_read_a_little_is_not() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "[fetch]\ncomplete_after_percent = 50\n")?;
        let completed = |digest: &str| {
            let blob = format!("blob={digest} ");
            stack
                .daemon
                .log()
                .lines()
                .any(|line| line.contains(COMPLETED) && line.contains(&blob))
        };
        let read = |digest: &str, file: &str| -> Result<String> {
            let mounted = mountpoints_of(&stack.daemon.log(), digest);
            let [mountpoint] = mounted.as_slice() else {
                anyhow::bail!("{digest} mounted at {mounted:?}");
            };
            Ok(hex::encode(Sha256::digest(std::fs::read(
                mountpoint.join(file.trim_start_matches('/')),
            )?)))
        };

        // 8 of 12 MiB read: two thirds of the layer.
        let (layers, expected) = data_image(&[("a", 8 << 20), ("b", 4 << 20)])?;
        let most = stack.publish(fixture, "most", &layers)?;
        stack.rpull(&most.estargz)?;
        let layer = &most.layers[1];
        let blob_bytes = || {
            stack
                .registry
                .proxy()
                .response_bytes_for(&format!("/blobs/{}", layer.digest))
        };
        assert_eq!(read(&layer.digest, "/data/a")?, expected["/data/a"]);
        wait_until("the read layer's completion", WAIT, || {
            Ok(completed(&layer.digest))
        })?;
        let sent = blob_bytes();
        // The completion starts at its first look after reads cached half the layer, while the
        // read of /data/a may still be fetching the rest of it: those last bytes the two may
        // both fetch (README, "Completion started by reads"). What was cached before it started
        // is never fetched again, which would cost the first half of /data/a once more.
        let overlap = (8 << 20) - layer.size / 2;
        assert!(
            sent <= layer.size + overlap + SLACK,
            "{sent} bytes of a {}-byte blob: completion fetched what reads had cached",
            layer.size
        );
        // The rest is cached: reading it asks the registry for nothing.
        stack.registry.proxy().reset();
        assert_eq!(read(&layer.digest, "/data/b")?, expected["/data/b"]);
        assert_eq!(blob_bytes(), 0, "{:#?}", stack.registry.proxy().stats());

        // 1 of 12 MiB read: never completed, however long it is left.
        let (layers, expected) = data_image(&[("rest", 11 << 20), ("small", 1 << 20)])?;
        let little = stack.publish(fixture, "little", &layers)?;
        stack.rpull(&little.estargz)?;
        let layer = &little.layers[1];
        assert_eq!(read(&layer.digest, "/data/small")?, expected["/data/small"]);
        // Twelve looks at the cache (READ_POLL is 250 ms).
        std::thread::sleep(Duration::from_secs(3));
        let sent = stack
            .registry
            .proxy()
            .response_bytes_for(&format!("/blobs/{}", layer.digest));
        assert!(
            !completed(&layer.digest),
            "a layer read a twelfth was completed"
        );
        assert!(sent < 3 << 20, "{sent} bytes sent for a 1 MiB read");
        Ok(())
    });
}

/// The same for an overlaybd layer: its reads bring in two thirds of it, the rest is fetched
/// and the blob verified in the background, and later reads ask the registry for nothing.
#[test]
fn an_overlaybd_layer_read_half_through_is_completed_and_verified() {
    privileged!();
    Fixture::run(|fixture| {
        let stack =
            overlaybd::Stack::start_settings(fixture, "[fetch]\ncomplete_after_percent = 50\n")?;
        let (a, b) = (random_bytes(8 << 20)?, random_bytes(4 << 20)?);
        let reference = overlaybd::publish_converted(
            fixture,
            &stack,
            "obd-most",
            &[("/data/a", &a), ("/data/b", &b)],
        )?;
        let layers = manifest_layers(&reference)?;
        let (data_layer, _) = layers.last().context("no layers")?;
        let out = stack.rpull(&reference)?;
        anyhow::ensure!(out.contains("2 layers, 2 lazy"), "not all lazy: {out}");
        let sum = |id: &str, path: &str| {
            stack.ctd.ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "shoal",
                &reference,
                id,
                "sha256sum",
                path,
            ])
        };
        let out = sum("obd-a", "/data/a")?;
        anyhow::ensure!(out.contains(&sha256_hex(&a)), "wrong sum: {out}");
        let blob = format!("blob={data_layer} ");
        wait_until("the read overlaybd layer's completion", WAIT, || {
            Ok(stack.daemon.log().lines().any(|line| {
                line.contains("overlaybd layer fetched and its digest verified")
                    && line.contains(&blob)
            }))
        })?;
        stack.registry.proxy().reset();
        crate::metrics::drop_page_cache()?;
        let out = sum("obd-b", "/data/b")?;
        anyhow::ensure!(out.contains(&sha256_hex(&b)), "wrong sum: {out}");
        let sent = stack
            .registry
            .proxy()
            .response_bytes_for(&format!("/blobs/{data_layer}"));
        anyhow::ensure!(sent == 0, "{sent} bytes of the completed layer sent");
        Ok(())
    });
}
