//! Tests of the harness itself, against containerd's built-in overlayfs snapshotter: they
//! prove the fixtures (registry, proxy, images, containerd) before Shoal is involved.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

use crate::containerd::{self, Containerd};
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::registry::Registry;
use crate::tree;

/// `(digest, size)` of every layer of the image at `layout` (an OCI layout with one manifest).
fn layer_blobs(layout: &Path) -> Result<Vec<(String, u64)>> {
    let read_json = |path: &Path| -> Result<serde_json::Value> {
        let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let blob = |digest: &str| layout.join("blobs").join(digest.replacen(':', "/", 1));
    let index = read_json(&layout.join("index.json"))?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json without a manifest")?;
    let manifest = read_json(&blob(manifest_digest))?;
    manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|layer| {
            let digest = layer["digest"].as_str().context("layer without digest")?;
            let size = layer["size"].as_u64().context("layer without size")?;
            Ok((digest.to_owned(), size))
        })
        .collect()
}

#[test]
fn overlayfs_runs_the_layered_image_through_the_counting_proxy() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "layered", &image::layered()?)?;
        let reference = built.push(&registry.direct_host(), "test/layered")?;
        let reference = reference.replace(&registry.direct_host(), &registry.host());
        registry.proxy().reset();
        let ctd = Containerd::start(fixture, &containerd::Options::default())?;
        ctd.ctr(&["image", "pull", "--plain-http", &reference])?;
        let out = ctd.ctr(&[
            "run",
            "--rm",
            &reference,
            "check",
            "sh",
            "-c",
            image::LAYERED_CHECK,
        ])?;
        anyhow::ensure!(out.trim() == "layered-ok", "layered check printed {out:?}");

        // Every layer blob went through the proxy exactly once, counted to the byte.
        let blobs = layer_blobs(&fixture.path("images/layered"))?;
        anyhow::ensure!(blobs.len() == 3, "expected 3 layers, found {blobs:?}");
        let stats = registry.proxy().stats();
        let total: u64 = blobs.iter().map(|(_, size)| size).sum();
        let config_and_layers = registry.proxy().response_bytes_for("/blobs/");
        anyhow::ensure!(
            config_and_layers > total,
            "blob bytes {config_and_layers} do not cover the layers' {total} plus the config"
        );
        for (digest, size) in blobs {
            let path = format!("/v2/test/layered/blobs/{digest}");
            let counted = stats
                .get(&path)
                .with_context(|| format!("{path} not counted: {stats:#?}"))?;
            anyhow::ensure!(
                counted.response_bytes == size && counted.requests == 1,
                "{path}: counted {counted:?}, blob is {size} bytes"
            );
        }
        Ok(())
    });
}

#[test]
fn tree_comparison_reports_each_difference() {
    Fixture::run(|fixture| {
        let ops = vec![
            tree::dir("/a", 0o755),
            tree::file("/a/f", "same\n", 0o644),
            tree::symlink("f", "/a/l"),
        ];
        let left = fixture.mkdir("left")?;
        let right = fixture.mkdir("right")?;
        tree::apply(&left, &ops)?;
        tree::apply(&right, &ops)?;
        tree::assert_same(&left, &right)?;

        tree::apply(
            &right,
            &[
                tree::file("/a/f", "same\n", 0o600),
                tree::file("/extra", "", 0o644),
            ],
        )?;
        let err = tree::assert_same(&left, &right)
            .expect_err("trees differ")
            .to_string();
        anyhow::ensure!(
            err.contains("differs a/f"),
            "mode change not reported: {err}"
        );
        anyhow::ensure!(
            err.contains("unexpected extra"),
            "extra file not reported: {err}"
        );
        Ok(())
    });
}
