//! `shoal convert` against the real registry on loopback: the layered image, from its OCI
//! layout and from the registry, becomes an eStargz image that skopeo accepts, whose layers
//! unpack with `tar xzf` to the same trees as the originals and whose config names the new
//! diff IDs; `shoal rpull` mounts it lazily through a real containerd and it runs; bad sources
//! and layers get clear errors and push no tag.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::process;
use crate::registry::Registry;
use crate::tree;

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
pub(crate) const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
const ESTARGZ_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Entries the eStargz builder adds to every layer.
const ESTARGZ_ENTRIES: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// `shoal [--config <empty>] convert --plain-http <extra...> <source> <destination>`.
pub(crate) fn convert(
    fixture: &Fixture,
    extra: &[&str],
    source: &str,
    destination: &str,
) -> Result<String> {
    let config = fixture.path("convert.toml");
    if !config.exists() {
        // An empty configuration: every default, and nothing read from /etc/shoal.
        fs::write(&config, "").context("write convert.toml")?;
    }
    let mut command = Command::new(binary::cli()?);
    command
        .arg("--config")
        .arg(&config)
        .args(["convert", "--plain-http"])
        .args(extra)
        .args([source, destination]);
    process::run(&mut command, TOOL_TIMEOUT)
}

pub(crate) fn skopeo(args: &[&str]) -> Result<String> {
    process::run(Command::new("skopeo").args(args), TOOL_TIMEOUT)
}

/// The layers of `reference`'s manifest in its registry: (digest, size), bottom first.
/// `shoal rpull --plain-http reference` with the fixture's daemon config, into `ctd`'s
/// namespace: its output.
pub(crate) fn rpull_in_fixture(
    fixture: &Fixture,
    ctd: &Containerd,
    reference: &str,
) -> Result<String> {
    let mut rpull = Command::new(binary::cli()?);
    rpull
        .arg("--config")
        .arg(fixture.path("shoal.toml"))
        .arg("rpull")
        .arg("--address")
        .arg(fixture.path("containerd/c.sock"))
        .args(["-n", ctd.namespace(), "--plain-http", reference]);
    process::run(&mut rpull, TOOL_TIMEOUT)
}

pub(crate) fn manifest_layers(reference: &str) -> Result<Vec<(String, u64)>> {
    inspect_raw(reference, false)?["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|layer| {
            Ok((
                layer["digest"].as_str().context("no digest")?.to_owned(),
                layer["size"].as_u64().context("no size")?,
            ))
        })
        .collect()
}

pub(crate) fn inspect_raw(reference: &str, config: bool) -> Result<Value> {
    let docker = format!("docker://{reference}");
    let mut args = vec!["inspect", "--tls-verify=false", "--raw"];
    if config {
        args.push("--config");
    }
    args.push(&docker);
    let text = skopeo(&args)?;
    serde_json::from_str(&text).with_context(|| format!("parse {text}"))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The path of blob `sha256:<hex>` in the OCI layout at `layout`.
pub(crate) fn layout_blob(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs").join(digest.replacen(':', "/", 1))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// The single manifest of the OCI layout at `layout`.
pub(crate) fn layout_manifest(layout: &Path) -> Result<Value> {
    let index = read_json(&layout.join("index.json"))?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json without a manifest")?;
    read_json(&layout_blob(layout, digest))
}

pub(crate) fn layer_digests(manifest: &Value) -> Result<Vec<String>> {
    manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .map(|layer| {
            layer["digest"]
                .as_str()
                .map(str::to_owned)
                .context("layer without digest")
        })
        .collect()
}

/// Unpacks `blob` with the system's `tar xzf` into a new directory `name`.
pub(crate) fn untar(fixture: &Fixture, blob: &Path, name: &str) -> Result<PathBuf> {
    let target = fixture.mkdir(name)?;
    let mut command = Command::new("tar");
    command
        .arg("-xzf")
        .arg(blob)
        .arg("-C")
        .arg(&target)
        .arg("--numeric-owner");
    process::run(&mut command, TOOL_TIMEOUT)?;
    Ok(target)
}

/// The uncompressed tar of a gzip blob, by `gzip -dc`.
fn gunzip(blob: &Path) -> Result<Vec<u8>> {
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(blob)
        .output()
        .context("run gzip -dc")?;
    anyhow::ensure!(
        out.status.success(),
        "gzip -dc {}: {}",
        blob.display(),
        out.status
    );
    Ok(out.stdout)
}

/// The chain ID of each layer prefix, from the diff IDs in order.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chains: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let chain = match chains.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                sha256_hex(format!("{parent} {diff_id}").as_bytes())
            ),
        };
        chains.push(chain);
    }
    chains
}

fn diff_ids(config: &Value) -> Result<Vec<String>> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .context("config without diff_ids")?
        .iter()
        .map(|d| {
            d.as_str()
                .map(str::to_owned)
                .context("diff_id is not a string")
        })
        .collect()
}

#[test]
fn convert_pushes_an_estargz_image_with_the_same_layer_trees() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "layered", &image::layered()?)?;
        let plain = built.push(&registry.host(), "test/layered")?;
        let layout = fixture.path("images/layered");
        let destination = format!("{}/test/layered-esgz:v1", registry.host());

        let out = convert(
            fixture,
            &[],
            &format!("oci:{}:latest", layout.display()),
            &destination,
        )?;
        for position in 1..=3 {
            let line = out
                .lines()
                .find(|line| line.starts_with(&format!("layer {position}/3: ")))
                .with_context(|| format!("no line for layer {position}: {out}"))?;
            anyhow::ensure!(
                line.contains(" eStargz, toc sha256:"),
                "layer {position}: {line}"
            );
        }
        anyhow::ensure!(
            out.contains(&format!("pushed {destination}@sha256:")),
            "summary: {out}"
        );

        // skopeo accepts the image, and the manifest carries what lazy pulls need.
        let inspected: Value = serde_json::from_str(&skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{destination}"),
        ])?)?;
        anyhow::ensure!(
            inspected["Layers"].as_array().map(Vec::len) == Some(3),
            "skopeo inspect: {inspected:#}"
        );
        let manifest = inspect_raw(&destination, false)?;
        for layer in manifest["layers"].as_array().context("no layers")? {
            anyhow::ensure!(layer["mediaType"] == ESTARGZ_LAYER, "layer {layer:#}");
            let toc = layer["annotations"][TOC_DIGEST]
                .as_str()
                .unwrap_or_default();
            anyhow::ensure!(
                toc.starts_with("sha256:") && toc.len() == 71,
                "toc digest of {layer:#}"
            );
            let size = layer["annotations"][UNCOMPRESSED_SIZE]
                .as_str()
                .unwrap_or_default();
            anyhow::ensure!(
                size.parse::<u64>().is_ok(),
                "uncompressed size of {layer:#}"
            );
        }

        // Each converted layer unpacks to the original's tree plus the eStargz entries, and
        // the config's diff IDs are the converted tars' digests.
        let copied = fixture.path("images/copied");
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{destination}"),
            &format!("oci:{}:v1", copied.display()),
        ])?;
        let original = layout_manifest(&layout)?;
        let converted = layout_manifest(&copied)?;
        let config = read_json(&layout_blob(
            &copied,
            converted["config"]["digest"]
                .as_str()
                .context("no config")?,
        ))?;
        let new_diff_ids = diff_ids(&config)?;
        let old_config = read_json(&layout_blob(
            &layout,
            original["config"]["digest"].as_str().context("no config")?,
        ))?;
        anyhow::ensure!(
            config["config"] == old_config["config"] && config["history"] == old_config["history"],
            "the config changed beyond its diff IDs: {config:#}"
        );
        let pairs = layer_digests(&original)?
            .into_iter()
            .zip(layer_digests(&converted)?);
        for (i, (before, after)) in pairs.enumerate() {
            let before_blob = layout_blob(&layout, &before);
            let after_blob = layout_blob(&copied, &after);
            let expected = untar(fixture, &before_blob, &format!("trees/{i}-original"))?;
            let actual = untar(fixture, &after_blob, &format!("trees/{i}-estargz"))?;
            anyhow::ensure!(
                actual.join("stargz.index.json").is_file(),
                "layer {i} has no TOC entry"
            );
            for entry in ESTARGZ_ENTRIES {
                let _ = fs::remove_file(actual.join(entry));
            }
            tree::assert_same(&expected, &actual).with_context(|| format!("layer {i}"))?;
            let diff_id = format!("sha256:{}", sha256_hex(&gunzip(&after_blob)?));
            anyhow::ensure!(
                new_diff_ids[i] == diff_id,
                "diff_id {i}: config says {}, tar is {diff_id}",
                new_diff_ids[i]
            );
        }

        // The same image read from the registry converts to the same bytes.
        let from_registry = format!("{}/test/layered-esgz:from-registry", registry.host());
        let again = convert(fixture, &[], &plain, &from_registry)?;
        let digest_of = |out: &str| out.rsplit_once('@').map(|(_, rest)| rest[..71].to_owned());
        anyhow::ensure!(
            digest_of(&again).is_some() && digest_of(&again) == digest_of(&out),
            "registry and layout conversions differ:\n{out}\n{again}"
        );
        Ok(())
    });
}

#[test]
fn prioritized_files_lead_their_layer() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "layered", &image::layered()?)?;
        built.push(&registry.host(), "test/layered")?;
        let list = fixture.path("prioritize.list");
        fs::write(&list, "# read at start-up\n/data/third\n/no/such/file\n")?;
        let destination = format!("{}/test/layered-esgz:prio", registry.host());
        let out = convert(
            fixture,
            &[
                "--prioritize",
                "/etc/greeting",
                "--prioritize-list",
                &list.to_string_lossy(),
            ],
            &format!("{}/test/layered:latest", registry.host()),
            &destination,
        )?;
        anyhow::ensure!(
            out.contains("prioritized but in no layer: /no/such/file"),
            "{out}"
        );
        let copied = fixture.path("images/prio");
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{destination}"),
            &format!("oci:{}:prio", copied.display()),
        ])?;
        let layers = layer_digests(&layout_manifest(&copied)?)?;
        // Tar order: `tar tzf` lists entries as they sit in the blob.
        let names = |digest: &str| -> Result<Vec<String>> {
            let mut command = Command::new("tar");
            command.arg("-tzf").arg(layout_blob(&copied, digest));
            let listed = process::run(&mut command, TOOL_TIMEOUT)?;
            Ok(listed
                .lines()
                .map(|l| l.trim_start_matches("./").to_owned())
                .collect())
        };
        let bottom = names(&layers[0])?;
        let landmark = bottom.iter().position(|n| n == ".prefetch.landmark");
        let greeting = bottom.iter().position(|n| n == "etc/greeting");
        anyhow::ensure!(
            greeting.is_some() && landmark.is_some() && greeting < landmark,
            "bottom layer order: {bottom:?}"
        );
        let top = names(&layers[2])?;
        anyhow::ensure!(
            top.iter().position(|n| n == "data/third")
                < top.iter().position(|n| n == ".prefetch.landmark"),
            "top layer order: {top:?}"
        );
        // The middle layer has none of the files: its landmark leads, as the reference
        // builder lays out a layer that a prioritize list misses.
        let middle = names(&layers[1])?;
        anyhow::ensure!(
            middle.first().map(String::as_str) == Some(".prefetch.landmark"),
            "middle layer: {middle:?}"
        );
        Ok(())
    });
}

#[test]
fn converted_image_is_mounted_lazily_and_runs() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let built = image::build(fixture, "layered", &image::layered()?)?;
        let layout = fixture.path("images/layered");
        let reference = format!("{}/test/layered-esgz:lazy", registry.host());
        convert(
            fixture,
            &[],
            &format!("oci:{}", layout.display()),
            &reference,
        )?;
        drop(built);

        // The daemon fetches from the loopback registry over plain HTTP.
        let daemon = Daemon::start_plain_http(fixture, &[&registry.host()])?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            ..containerd::Options::default()
        };
        let ctd = Containerd::start(fixture, &options)?;

        registry.proxy().reset();
        let out = rpull_in_fixture(fixture, &ctd, &reference)?;
        anyhow::ensure!(out.contains("3 layers, 3 lazy"), "rpull: {out}");
        let run = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &reference,
            "converted",
            "sh",
            "-c",
            image::LAYERED_CHECK,
        ])?;
        anyhow::ensure!(run.trim() == "layered-ok", "container printed {run:?}");
        // Counted before the checks below, whose skopeo calls go through the same proxy.
        let fetched = registry.proxy().response_bytes_for("/blobs/");

        // Every layer's snapshot is Shoal's remote one, not an unpacked download.
        let config = inspect_raw(&reference, true)?;
        for chain in chain_ids(&diff_ids(&config)?) {
            let info = ctd.ctr(&["snapshots", "--snapshotter", "shoal", "info", &chain])?;
            let info: Value = serde_json::from_str(&info).with_context(|| info.clone())?;
            anyhow::ensure!(
                info["Labels"]["containerd.io/snapshot/remote"] == "shoal",
                "snapshot {chain} is not remote: {info:#}"
            );
        }
        let manifest = inspect_raw(&reference, false)?;
        let total: u64 = manifest["layers"]
            .as_array()
            .context("no layers")?
            .iter()
            .filter_map(|layer| layer["size"].as_u64())
            .sum();
        let config_size = manifest["config"]["size"]
            .as_u64()
            .context("no config size")?;
        // Lazy reads, prefetch and background fetch share one cache: no layer byte crosses
        // the network twice.
        anyhow::ensure!(
            fetched <= total + config_size,
            "fetched {fetched} blob bytes; the layers have {total}, the config {config_size}"
        );
        Ok(())
    });
}

/// Writes an OCI layout whose one layer is `layer` with `media_type`.
fn write_layout(dir: &Path, media_type: &str, layer: &[u8]) -> Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<Value> {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes)?;
        Ok(json!({"digest": format!("sha256:{hex}"), "size": bytes.len()}))
    };
    let layer_descriptor = put(layer)?;
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_descriptor["digest"]]},
    });
    let mut config_descriptor = put(config.to_string().as_bytes())?;
    config_descriptor["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
    let mut layer_descriptor = layer_descriptor;
    layer_descriptor["mediaType"] = json!(media_type);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": [layer_descriptor],
    });
    let mut manifest_descriptor = put(manifest.to_string().as_bytes())?;
    manifest_descriptor["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
    let index = json!({"schemaVersion": 2, "manifests": [manifest_descriptor]});
    fs::write(dir.join("index.json"), index.to_string())?;
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

#[test]
fn convert_errors_name_the_problem() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let destination = format!("{}/test/never:latest", registry.host());
        let expect_failure = |source: &str, needle: &str| -> Result<()> {
            match convert(fixture, &[], source, &destination) {
                Ok(out) => anyhow::bail!("convert {source} succeeded: {out}"),
                Err(err) => {
                    let text = format!("{err:#}");
                    anyhow::ensure!(text.contains(needle), "expected {needle:?} in: {text}");
                    Ok(())
                }
            }
        };
        expect_failure("oci:/nonexistent/layout", "is not an OCI image layout")?;
        let missing = format!("{}/test/missing:latest", registry.host());
        expect_failure(&missing, &format!("image {missing} not found"))?;

        let mut zstd = vec![0x28, 0xb5, 0x2f, 0xfd];
        zstd.extend_from_slice(&[0u8; 64]);
        let cases: BTreeMap<&str, (&str, Vec<u8>, &str)> = BTreeMap::from([
            (
                "zstd-type",
                (
                    "application/vnd.oci.image.layer.v1.tar+zstd",
                    zstd.clone(),
                    "zstd-compressed",
                ),
            ),
            (
                "zstd-bytes",
                (
                    "application/vnd.oci.image.layer.v1.tar",
                    zstd,
                    "zstd-compressed",
                ),
            ),
            (
                "not-tar",
                (
                    "application/vnd.oci.image.layer.v1.tar",
                    vec![0x5a; 4096],
                    "is it a tar",
                ),
            ),
            (
                "not-gzip",
                (
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    vec![0x5a; 4096],
                    "is not gzip data",
                ),
            ),
            (
                "not-a-layer",
                (
                    "application/vnd.oci.image.config.v1+json",
                    b"{}".to_vec(),
                    "not a tar layer",
                ),
            ),
        ]);
        for (name, (media_type, layer, needle)) in &cases {
            let dir = fixture.mkdir(&format!("bad/{name}"))?;
            write_layout(&dir, media_type, layer)?;
            expect_failure(&format!("oci:{}", dir.display()), needle)
                .with_context(|| format!("case {name}"))?;
        }
        let pinned = format!("{}/test/x@sha256:{}", registry.host(), "0".repeat(64));
        match convert(fixture, &[], "oci:/nonexistent/layout", &pinned) {
            Ok(out) => anyhow::bail!("a digest destination was accepted: {out}"),
            Err(err) => anyhow::ensure!(format!("{err:#}").contains("names a digest"), "{err:#}"),
        }
        // No failed conversion left a tag behind.
        anyhow::ensure!(
            skopeo(&[
                "inspect",
                "--tls-verify=false",
                &format!("docker://{destination}")
            ])
            .is_err(),
            "a failed conversion pushed {destination}"
        );
        Ok(())
    });
}
