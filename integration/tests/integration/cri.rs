//! Kubernetes-style pulls: containerd's CRI plugin set up as a node using Shoal is
//! (`snapshotter = "shoal"`, `disable_snapshot_annotations = false`) pulls over the CRI
//! ImageService. An eStargz image (converted by stargz-snapshotter's `ctr-remote`) gets its
//! layers mounted lazily by Shoal, so containerd never downloads them; a plain OCI image pulled
//! the same way is downloaded and unpacked as usual. Both then run from Shoal's snapshots.
//!
//! No pod sandbox is started: that needs a pause image and CNI plugins, which this machine lacks.

use std::collections::BTreeMap;
use std::fs;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::containerd::{self, Containerd};
use crate::convert;
pub(crate) use crate::cri_client::Cri;
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::process;
use crate::registry::Registry;
use crate::tree::{self, Op};

/// The namespace the CRI plugin keeps images, content and snapshots in.
pub(crate) const CRI_NAMESPACE: &str = "k8s.io";
const CONVERT_TIMEOUT: Duration = Duration::from_secs(180);
/// A file large enough that its layer spans many cache blocks; no test reads it, so a lazy
/// pull fetches only a small part of that layer.
pub(crate) const BIG_FILE: &str = "/data/big";
pub(crate) const BIG_FILE_BYTES: usize = 8 << 20;

/// What containerd stored of an image the CRI plugin pulled.
pub(crate) struct PulledImage {
    /// The repository on the registry, e.g. `test/plain`.
    repository: String,
    manifest: String,
    pub(crate) layers: Vec<Layer>,
    /// The chainID of each layer: the name of its committed snapshot.
    pub(crate) chains: Vec<String>,
}

pub(crate) struct Layer {
    pub(crate) digest: String,
    pub(crate) size: u64,
}

/// The loopback registry with the plain test image, Shoal, and containerd whose CRI plugin
/// pulls into Shoal.
pub(crate) struct Stack {
    pub(crate) registry: Registry,
    pub(crate) ctd: Containerd,
    pub(crate) daemon: Daemon,
    pub(crate) cri: Cri,
    /// The plain OCI image (gzip layers), pushed through the counting proxy.
    pub(crate) plain: String,
}

impl Stack {
    pub(crate) fn start(fixture: &Fixture) -> Result<Stack> {
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "cri", &layers()?)?;
        let plain = built.push(&registry.host(), "test/plain")?;
        let host = registry.host();
        // Both reach the loopback registry over plain HTTP: Shoal by its config, the CRI
        // plugin by a mirror entry.
        let daemon = Daemon::start_plain_http(fixture, &[&host])?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            cri: true,
            cri_snapshotter: Some("shoal".to_owned()),
            cri_plain_http: vec![host],
            cri_without_annotations: false,
        };
        let ctd = Containerd::start(fixture, &options)?;
        let cri = Cri::connect(ctd.address())?;
        cri.wait_ready()?;
        Ok(Stack {
            registry,
            ctd,
            daemon,
            cri,
            plain,
        })
    }

    /// Converts the plain image to eStargz with `ctr-remote` (in the test namespace, away from
    /// the CRI plugin's) and pushes it as `test/estargz`; returns its reference.
    pub(crate) fn push_estargz(&self) -> Result<String> {
        let estargz = self.plain.replace("/test/plain:", "/test/estargz:");
        self.ctd
            .ctr(&["image", "pull", "--plain-http", &self.plain])?;
        let mut convert = Command::new("ctr-remote");
        convert
            .arg("--address")
            .arg(self.ctd.address())
            .args([
                "-n",
                self.ctd.namespace(),
                "image",
                "convert",
                "--estargz",
                "--oci",
            ])
            .args([&self.plain, &estargz]);
        process::run(&mut convert, CONVERT_TIMEOUT).context("convert with ctr-remote")?;
        self.ctd.ctr(&["image", "push", "--plain-http", &estargz])?;
        // containerd shares content between namespaces: with these blobs still stored, a CRI
        // pull would find every layer without the registry and prove nothing about laziness.
        self.ctd
            .ctr(&["images", "rm", "--sync", &self.plain, &estargz])?;
        let left = self.ctd.ctr(&["content", "ls", "-q"])?;
        anyhow::ensure!(
            left.trim().is_empty(),
            "content left after the conversion: {left}"
        );
        Ok(estargz)
    }

    /// Pulls over CRI and checks that ImageStatus and ListImages then report the image.
    pub(crate) fn pull_and_find(&self, reference: &str) -> Result<String> {
        let id = self.cri.pull(reference)?;
        anyhow::ensure!(id.starts_with("sha256:"), "PullImage answered {id:?}");
        let status = self
            .cri
            .status(reference)?
            .with_context(|| format!("ImageStatus does not know {reference}"))?;
        anyhow::ensure!(
            status.id == id && status.repo_tags.iter().any(|tag| tag == reference),
            "ImageStatus of {reference}: {status:#?}"
        );
        anyhow::ensure!(status.size > 0, "ImageStatus size: {status:#?}");
        let listed = self.cri.list()?;
        anyhow::ensure!(
            listed
                .iter()
                .any(|image| image.id == id && image.repo_tags.iter().any(|t| t == reference)),
            "ListImages lacks {reference}: {listed:#?}"
        );
        Ok(id)
    }

    /// The manifest, layers and chainIDs of `reference` (whose config is `config_digest`), from
    /// what containerd stored in `k8s.io`.
    pub(crate) fn layers_of(&self, reference: &str, config_digest: &str) -> Result<PulledImage> {
        let config = self.json_content(config_digest)?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .context("config without rootfs.diff_ids")?
            .iter()
            .map(|id| {
                id.as_str()
                    .map(str::to_owned)
                    .context("diff_id is not a string")
            })
            .collect::<Result<_>>()?;
        let manifest = self.image_target(reference)?;
        let layers: Vec<Layer> = self.json_content(&manifest)?["layers"]
            .as_array()
            .context("manifest without layers")?
            .iter()
            .map(|layer| {
                Ok(Layer {
                    digest: layer["digest"].as_str().context("layer digest")?.to_owned(),
                    size: layer["size"].as_u64().context("layer size")?,
                })
            })
            .collect::<Result<_>>()?;
        anyhow::ensure!(
            layers.len() == diff_ids.len(),
            "{} layers but {} diff_ids",
            layers.len(),
            diff_ids.len()
        );
        let repository = reference
            .split_once('/')
            .and_then(|(_, path)| path.rsplit_once(':'))
            .map(|(repository, _)| repository.to_owned())
            .with_context(|| format!("{reference} is not host/repository:tag"))?;
        Ok(PulledImage {
            repository,
            manifest,
            layers,
            chains: chain_ids(&diff_ids),
        })
    }

    /// The manifest digest `ctr images ls` shows for `reference` in `k8s.io`.
    fn image_target(&self, reference: &str) -> Result<String> {
        let listed = self.ctd.ctr_in(CRI_NAMESPACE, &["images", "ls"])?;
        listed
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.first() == Some(&reference))
                    .then(|| fields.iter().find(|f| f.starts_with("sha256:")).copied())
                    .flatten()
            })
            .map(str::to_owned)
            .with_context(|| format!("{reference} not in images ls: {listed}"))
    }

    fn json_content(&self, digest: &str) -> Result<serde_json::Value> {
        let text = self
            .ctd
            .ctr_in(CRI_NAMESPACE, &["content", "get", digest])?;
        serde_json::from_str(&text).with_context(|| format!("parse {digest}: {text}"))
    }

    /// The labels containerd reports for Shoal's snapshot `name` in `k8s.io`.
    pub(crate) fn snapshot_labels(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let info = self.ctd.ctr_in(
            CRI_NAMESPACE,
            &["snapshots", "--snapshotter", "shoal", "info", name],
        )?;
        let info: serde_json::Value =
            serde_json::from_str(&info).with_context(|| format!("parse {info}"))?;
        anyhow::ensure!(info["Kind"] == "Committed", "snapshot {name}: {info:#}");
        match &info["Labels"] {
            serde_json::Value::Null => Ok(BTreeMap::new()),
            labels => serde_json::from_value(labels.clone())
                .with_context(|| format!("labels of snapshot {name}: {labels}")),
        }
    }

    /// Runs the layered check in a container of `reference` from the `k8s.io` namespace.
    pub(crate) fn run_check(&self, reference: &str, id: &str) -> Result<()> {
        let out = self.ctd.ctr_in(
            CRI_NAMESPACE,
            &[
                "run",
                "--rm",
                "--snapshotter",
                "shoal",
                reference,
                id,
                "sh",
                "-c",
                &format!("{} && stat -c %s {BIG_FILE}", image::LAYERED_CHECK),
            ],
        )?;
        let expected = format!("layered-ok\n{BIG_FILE_BYTES}");
        anyhow::ensure!(out.trim() == expected, "container {id} printed {out:?}");
        Ok(())
    }

    /// Body bytes the registry has sent for `layer`'s blob of `image` since the last reset.
    pub(crate) fn fetched(&self, image: &PulledImage, layer: &Layer) -> u64 {
        let path = format!("/v2/{}/blobs/{}", image.repository, layer.digest);
        self.registry
            .proxy()
            .stats()
            .get(&path)
            .map_or(0, |stats| stats.response_bytes)
    }
}

/// The layered test image plus a layer holding one big incompressible file.
pub(crate) fn layers() -> Result<Vec<Vec<Op>>> {
    let mut layers = image::layered()?;
    layers.push(vec![tree::file(BIG_FILE, noise(BIG_FILE_BYTES), 0o644)]);
    Ok(layers)
}

/// Deterministic bytes gzip cannot shrink (xorshift64).
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// OCI chainIDs: the first is the first diff_id, each next one
/// `sha256(previous + " " + diff_id)`.
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(previous) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{previous} {diff_id}")))
            ),
        };
        chain.push(next);
    }
    chain
}

#[test]
fn cri_pull_of_an_estargz_image_mounts_its_layers_lazily() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture)?;
        let reference = stack.push_estargz()?;
        stack.registry.proxy().reset();

        let id = stack.pull_and_find(&reference)?;
        let image = stack.layers_of(&reference, &id)?;
        anyhow::ensure!(image.layers.len() == 4, "expected 4 layers");

        // Every layer's chain is a snapshot Shoal provided itself, located by the CRI labels.
        for (position, (layer, chain)) in image.layers.iter().zip(&image.chains).enumerate() {
            let labels = stack.snapshot_labels(chain)?;
            let expect = |key: &str, value: &str| -> Result<()> {
                anyhow::ensure!(
                    labels.get(key).map(String::as_str) == Some(value),
                    "{key} of layer {position} ({chain}) is not {value}: {labels:#?}"
                );
                Ok(())
            };
            expect("containerd.io/snapshot/remote", "shoal")?;
            expect("containerd.io/snapshot/cri.image-ref", &reference)?;
            expect("containerd.io/snapshot/cri.layer-digest", &layer.digest)?;
            expect(
                "containerd.io/snapshot/cri.manifest-digest",
                &image.manifest,
            )?;
            anyhow::ensure!(
                labels
                    .get("containerd.io/snapshot/stargz/toc.digest")
                    .is_some_and(|toc| toc.starts_with("sha256:")),
                "no TOC digest annotation on layer {position}: {labels:#?}"
            );
        }

        // containerd downloaded no layer: none is in its content store, and the registry sent
        // only a small part of the big one (its footer and TOC, read by Shoal).
        let content = stack.ctd.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"])?;
        for layer in &image.layers {
            anyhow::ensure!(
                !content.contains(&layer.digest),
                "containerd stored layer {}: {content}",
                layer.digest
            );
        }
        let big = image
            .layers
            .iter()
            .max_by_key(|layer| layer.size)
            .context("no layers")?;
        anyhow::ensure!(
            big.size > BIG_FILE_BYTES as u64,
            "the big layer is only {} bytes",
            big.size
        );
        let fetched = stack.fetched(&image, big);
        anyhow::ensure!(
            fetched < big.size / 2,
            "the pull fetched {fetched} of the big layer's {} bytes",
            big.size
        );

        stack.run_check(&reference, "cri-estargz")?;
        let fetched = stack.fetched(&image, big);
        anyhow::ensure!(
            fetched < big.size / 2,
            "running the image fetched {fetched} of the big layer's {} bytes; it reads none",
            big.size
        );
        anyhow::ensure!(stack.daemon.is_running()?, "the daemon exited");
        Ok(())
    });
}

#[test]
fn cri_pull_of_a_plain_image_downloads_its_layers() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let reference = stack.plain.clone();
        stack.registry.proxy().reset();

        let id = stack.pull_and_find(&reference)?;
        let image = stack.layers_of(&reference, &id)?;
        anyhow::ensure!(image.layers.len() == 4, "expected 4 layers");
        for (position, (layer, chain)) in image.layers.iter().zip(&image.chains).enumerate() {
            let labels = stack.snapshot_labels(chain)?;
            anyhow::ensure!(
                !labels.contains_key("containerd.io/snapshot/remote"),
                "layer {position} ({chain}) claims to be remote: {labels:#?}"
            );
            // containerd downloaded the whole blob to unpack it.
            let fetched = stack.fetched(&image, layer);
            anyhow::ensure!(
                fetched >= layer.size,
                "layer {position}: {fetched} of {} bytes fetched",
                layer.size
            );
        }
        // Shoal saw each layer's Prepare and chose to let containerd download it.
        let log = fs::read_to_string(fixture.path("shoal-snapshotter.log"))
            .context("read the daemon's log")?;
        let downloaded = log
            .lines()
            .filter(|line| line.contains("layer is downloaded, not lazily mounted"))
            .count();
        anyhow::ensure!(
            downloaded == image.layers.len(),
            "{downloaded} download fallbacks logged for {} layers:\n{log}",
            image.layers.len()
        );
        stack.run_check(&reference, "cri-plain")?;
        Ok(())
    });
}

#[test]
fn cri_pull_of_an_overlaybd_image_mounts_its_layers_lazily() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture)?;
        let reference = stack.plain.replace("/test/plain:", "/test/overlaybd:");
        convert::convert(
            fixture,
            &["--format", "overlaybd"],
            &stack.plain,
            &reference,
        )?;
        stack.registry.proxy().reset();

        let id = stack.pull_and_find(&reference)?;
        let image = stack.layers_of(&reference, &id)?;
        anyhow::ensure!(image.layers.len() == 4, "expected 4 layers");
        // The CRI labels and the layers' overlaybd annotations reach Shoal's Prepare, which
        // answers with its own remote snapshots.
        for (position, chain) in image.chains.iter().enumerate() {
            let labels = stack.snapshot_labels(chain)?;
            anyhow::ensure!(
                labels
                    .get("containerd.io/snapshot/remote")
                    .map(String::as_str)
                    == Some("shoal"),
                "layer {position} ({chain}) is not a remote snapshot: {labels:#?}"
            );
            anyhow::ensure!(
                labels.contains_key("containerd.io/snapshot/overlaybd/blob-digest"),
                "no overlaybd annotation on layer {position}: {labels:#?}"
            );
        }
        let content = stack.ctd.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"])?;
        for layer in &image.layers {
            anyhow::ensure!(
                !content.contains(&layer.digest),
                "containerd stored layer {}: {content}",
                layer.digest
            );
        }
        let big = image
            .layers
            .iter()
            .max_by_key(|layer| layer.size)
            .context("no layers")?;
        stack.run_check(&reference, "cri-overlaybd")?;
        let fetched = stack.fetched(&image, big);
        anyhow::ensure!(
            fetched < big.size,
            "running the image fetched all {fetched} bytes of its biggest layer"
        );
        anyhow::ensure!(stack.daemon.is_running()?, "the daemon exited");
        Ok(())
    });
}
