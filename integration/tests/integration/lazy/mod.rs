//! Lazy eStargz pulls end to end. Images built with umoci are converted by stargz-snapshotter's
//! `ctr-remote` (the reference eStargz producer) in a namespace of their own, pushed to the
//! loopback registry and pulled into the namespace under test with `shoal rpull`: every layer is
//! mounted over FUSE, containers see the same tree as an ordinary overlayfs pull, only what they
//! read crosses the network, tampered chunks never reach a container, a wrong TOC digest falls
//! back to a download, registry failures become bounded I/O errors, and restarts need no
//! registry at all.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use containerd_snapshots::api::types::Mount;
use sha2::{Digest, Sha256};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::keeper::Keeper;
use crate::mount;
use crate::process;
use crate::proxy::Fault;
use crate::registry::Registry;
use crate::tree::{self, Op};

mod ahead;
mod integrity;

/// Where source images are pulled and converted, so that the namespace under test starts empty.
const BUILD_NAMESPACE: &str = "shoal-build";
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Applets the checks here use beyond the harness's busybox set.
const EXTRA_APPLETS: &[&str] = &["sha256sum", "dd", "date"];

/// A registry (behind the counting proxy), the daemon, and containerd using it as `shoal`.
pub(crate) struct Stack {
    pub(crate) registry: Registry,
    pub(crate) daemon: Daemon,
    pub(crate) ctd: Containerd,
}

/// An image pushed twice: as umoci built it and as `ctr-remote` converted it to eStargz.
pub(crate) struct Published {
    pub(crate) plain: String,
    pub(crate) estargz: String,
    /// The eStargz manifest's layers, bottom first.
    pub(crate) layers: Vec<Layer>,
}

pub(crate) struct Layer {
    pub(crate) digest: String,
    pub(crate) size: u64,
}

impl Stack {
    /// `registry_settings` are extra keys of the daemon's `[registry]` table.
    pub(crate) fn start(fixture: &Fixture, registry_settings: &str) -> Result<Stack> {
        Stack::start_with(fixture, registry_settings, |_| {})
    }

    /// [`Stack::start`] with `prepare` applied to the daemon before its first launch.
    pub(crate) fn start_with(
        fixture: &Fixture,
        registry_settings: &str,
        prepare: impl FnOnce(&mut Daemon),
    ) -> Result<Stack> {
        let registry = Registry::start(fixture)?;
        let extra = format!(
            "\n[registry]\n{registry_settings}\n[registry.hosts.\"{}\"]\nplain_http = true\n",
            registry.host()
        );
        let mut daemon = Daemon::configure_with(fixture, &extra)?;
        prepare(&mut daemon);
        daemon.launch()?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            ..containerd::Options::default()
        };
        let ctd = Containerd::start(fixture, &options)?;
        Ok(Stack {
            registry,
            daemon,
            ctd,
        })
    }

    /// Builds `layers`, pushes the image as `test/<name>:latest`, converts it with
    /// `ctr-remote image convert --estargz --oci` and pushes that as `test/<name>:esgz`.
    pub(crate) fn publish(
        &self,
        fixture: &Fixture,
        name: &str,
        layers: &[Vec<Op>],
    ) -> Result<Published> {
        let built = image::build(fixture, name, layers)?;
        let plain = built.push(&self.registry.host(), &format!("test/{name}"))?;
        let estargz = format!("{}/test/{name}:esgz", self.registry.host());
        self.ctd
            .ctr_in(BUILD_NAMESPACE, &["images", "pull", "--plain-http", &plain])?;
        let mut convert = Command::new("ctr-remote");
        convert
            .arg("--address")
            .arg(self.ctd.address())
            .args([
                "-n",
                BUILD_NAMESPACE,
                "image",
                "convert",
                "--estargz",
                "--oci",
            ])
            .args([&plain, &estargz]);
        process::run(&mut convert, TOOL_TIMEOUT).context("convert with ctr-remote")?;
        self.ctd.ctr_in(
            BUILD_NAMESPACE,
            &["images", "push", "--plain-http", &estargz],
        )?;
        let manifest = self.manifest(BUILD_NAMESPACE, &estargz)?;
        let layers = manifest["layers"]
            .as_array()
            .context("manifest without layers")?
            .iter()
            .map(|layer| {
                anyhow::ensure!(
                    layer["annotations"][TOC_DIGEST].is_string(),
                    "ctr-remote left a layer without {TOC_DIGEST}: {layer}"
                );
                Ok(Layer {
                    digest: layer["digest"].as_str().context("no digest")?.to_owned(),
                    size: layer["size"].as_u64().context("no size")?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Published {
            plain,
            estargz,
            layers,
        })
    }

    fn content(&self, namespace: &str, digest: &str) -> Result<serde_json::Value> {
        let text = self.ctd.ctr_in(namespace, &["content", "get", digest])?;
        serde_json::from_str(&text).with_context(|| format!("parse {digest}: {text}"))
    }

    /// The image manifest of `reference` in `namespace` (the first one, under an index).
    fn manifest(&self, namespace: &str, reference: &str) -> Result<serde_json::Value> {
        let listed = self.ctd.ctr_in(namespace, &["images", "ls"])?;
        let digest = listed
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.first() == Some(&reference))
            .and_then(|fields| fields.get(2).map(|digest| (*digest).to_owned()))
            .with_context(|| format!("{reference} not in `ctr images ls`: {listed}"))?;
        let top = self.content(namespace, &digest)?;
        match top["manifests"][0]["digest"].as_str() {
            Some(child) => self.content(namespace, child),
            None => Ok(top),
        }
    }

    /// The chainID of the whole image `reference`, from its config's diff IDs.
    fn chain_id(&self, namespace: &str, reference: &str) -> Result<String> {
        let manifest = self.manifest(namespace, reference)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .context("manifest without config")?;
        let config = self.content(namespace, config_digest)?;
        let diff_ids = config["rootfs"]["diff_ids"]
            .as_array()
            .context("config without diff_ids")?;
        let mut chain = String::new();
        for diff_id in diff_ids {
            let diff_id = diff_id.as_str().context("diff_id is not a string")?;
            chain = if chain.is_empty() {
                diff_id.to_owned()
            } else {
                let digest = Sha256::digest(format!("{chain} {diff_id}"));
                format!("sha256:{}", hex::encode(digest))
            };
        }
        Ok(chain)
    }

    /// `shoal rpull` of `reference` into the namespace under test, with the daemon's config.
    pub(crate) fn rpull(&self, reference: &str) -> Result<String> {
        self.rpull_with(&[], reference)
    }

    /// [`rpull`](Self::rpull) with more flags.
    pub(crate) fn rpull_with(&self, flags: &[&str], reference: &str) -> Result<String> {
        let mut command = Command::new(binary::cli()?);
        command
            .arg("--config")
            .arg(self.daemon.config())
            .arg("rpull")
            .arg("--address")
            .arg(self.ctd.address())
            .args(["-n", self.ctd.namespace(), "--plain-http"])
            .args(flags)
            .arg(reference);
        process::run(&mut command, TOOL_TIMEOUT)
    }

    /// `ctr run --rm` on Shoal of `reference` running `script`: the container's stdout.
    pub(crate) fn run(&self, reference: &str, id: &str, script: &str) -> Result<String> {
        self.ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            reference,
            id,
            "sh",
            "-c",
            script,
        ])
    }

    /// Mounts a read-only view of `chain_id` from `snapshotter` on `views/<name>`.
    fn mount_view(
        &self,
        fixture: &Fixture,
        snapshotter: &str,
        chain_id: &str,
        name: &str,
    ) -> Result<PathBuf> {
        let out = self.ctd.ctr(&[
            "snapshots",
            "--snapshotter",
            snapshotter,
            "view",
            "--mounts",
            &format!("view-{name}"),
            chain_id,
        ])?;
        let mounts = parse_mounts(&out)?;
        let target = fixture.mkdir(&format!("views/{name}"))?;
        mount::mount_all(&mounts, &target)?;
        Ok(target)
    }

    /// Body bytes the registry sent for layer blobs since the proxy was last reset.
    fn blob_bytes(&self) -> u64 {
        self.registry.proxy().response_bytes_for("/blobs/")
    }
}

/// `ctr snapshots view --mounts` prints Go's `[]mount.Mount` as JSON.
fn parse_mounts(json: &str) -> Result<Vec<Mount>> {
    let parsed: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("parse mounts {json}"))?;
    let field = |entry: &serde_json::Value, name: &str| -> serde_json::Value {
        let lower = name.to_ascii_lowercase();
        entry
            .get(name)
            .or_else(|| entry.get(&lower))
            .cloned()
            .unwrap_or_default()
    };
    parsed
        .as_array()
        .with_context(|| format!("mounts are not a list: {json}"))?
        .iter()
        .map(|entry| {
            let text = |name| field(entry, name).as_str().map(str::to_owned);
            Ok(Mount {
                r#type: text("Type").context("mount without type")?,
                source: text("Source").context("mount without source")?,
                options: field(entry, "Options")
                    .as_array()
                    .map(|options| {
                        options
                            .iter()
                            .filter_map(|o| o.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                ..Mount::default()
            })
        })
        .collect()
}

pub(crate) fn random_bytes(len: usize) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(len);
    fs::File::open("/dev/urandom")
        .context("open /dev/urandom")?
        .take(len as u64)
        .read_to_end(&mut bytes)
        .context("read /dev/urandom")?;
    Ok(bytes)
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256sum` output as path → hash.
pub(crate) fn sums(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| line.split_once("  "))
        .map(|(hash, path)| (path.trim().to_owned(), hash.to_owned()))
        .collect()
}

/// The busybox layer with the extra applets, as the first layer of every image here.
fn base_layer() -> Result<Vec<Op>> {
    let mut ops = image::busybox_layer()?;
    for applet in EXTRA_APPLETS {
        ops.push(tree::symlink("busybox", format!("/bin/{applet}")));
    }
    ops.push(tree::file("/etc/greeting", "hello from shoal\n", 0o644));
    Ok(ops)
}

/// An image's layers and every data file's path with its sha256.
pub(crate) type DataImage = (Vec<Vec<Op>>, BTreeMap<String, String>);

/// A two-layer image: the base, then `/data/<name>` of `size` random bytes for each file.
pub(crate) fn data_image(files: &[(&str, usize)]) -> Result<DataImage> {
    let mut data = vec![tree::dir("/data", 0o755)];
    let mut expected = BTreeMap::new();
    for (name, size) in files {
        let bytes = random_bytes(*size)?;
        expected.insert(format!("/data/{name}"), sha256_hex(&bytes));
        data.push(tree::file(format!("/data/{name}"), bytes, 0o644));
    }
    Ok((vec![base_layer()?, data], expected))
}

/// Where the daemon's log says it mounted eStargz blob `digest` (its `layer mounted` lines).
pub(crate) fn mountpoints_of(log: &str, digest: &str) -> Vec<PathBuf> {
    let blob = format!("blob={digest} ");
    log.lines()
        .filter(|line| line.contains(" layer mounted ") && line.contains(&blob))
        .filter_map(|line| line.split("mountpoint=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(PathBuf::from)
        .collect()
}

/// Fails unless rpull's output shows all `count` layers mounted lazily.
pub(crate) fn ensure_all_lazy(out: &str, count: usize) -> Result<()> {
    let lazy = out
        .lines()
        .filter(|line| line.starts_with("layer ") && line.contains(" lazy"))
        .count();
    anyhow::ensure!(
        lazy == count && out.contains(&format!("{count} layers, {count} lazy")),
        "expected {count} lazy layers: {out}"
    );
    Ok(())
}

/// Runs `sha256sum` of `paths` in a new container and fails unless every hash is `expected`.
pub(crate) fn ensure_sums(
    stack: &Stack,
    reference: &str,
    id: &str,
    expected: &BTreeMap<String, String>,
) -> Result<()> {
    let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
    let out = stack.run(reference, id, &format!("sha256sum {}", paths.join(" ")))?;
    let got = sums(&out);
    anyhow::ensure!(
        &got == expected,
        "container {id}: {got:#?}, expected {expected:#?}"
    );
    Ok(())
}

/// The harness's layered image (whiteouts, an opaque directory, links, an xattr) and a fourth
/// layer of owners, special modes, odd names and a file of several eStargz chunks.
fn compat_layers() -> Result<Vec<Vec<Op>>> {
    let mut layers = image::layered()?;
    let applets = EXTRA_APPLETS
        .iter()
        .map(|applet| tree::symlink("busybox", format!("/bin/{applet}")));
    layers[0].extend(applets);
    layers.push(vec![
        tree::dir("/srv/owned", 0o750),
        tree::chown("/srv/owned", 1000, 1000),
        tree::file("/srv/owned/secret", "mine\n", 0o600),
        tree::chown("/srv/owned/secret", 1000, 100),
        tree::file("/srv/setuid", "#!/bin/sh\n", 0o4755),
        tree::dir("/srv/sticky", 0o1777),
        tree::file("/srv/empty", "", 0o644),
        tree::file("/srv/with space", "spaced\n", 0o644),
        tree::symlink("/etc/greeting", "/srv/absolute-link"),
        tree::symlink("nowhere", "/srv/dangling"),
        tree::dir("/srv/deep/a/b/c", 0o755),
        tree::file("/srv/deep/a/b/c/leaf", "leaf\n", 0o644),
        tree::xattr("/srv/deep", "user.dir", "on a directory"),
        // Larger than ctr-remote's 4 MiB chunks, so reads cross chunk boundaries.
        tree::file("/srv/multi-chunk", random_bytes(9 << 20)?, 0o640),
        tree::xattr("/srv/empty", "user.file", "on an empty file"),
        // A whiteout of a file with an xattr, two layers down.
        tree::remove_all("/data/xattr"),
    ]);
    Ok(layers)
}

#[test]
fn ctr_remote_images_mount_lazily_with_the_same_tree_as_overlayfs() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "")?;
        let image = stack.publish(fixture, "compat", &compat_layers()?)?;
        anyhow::ensure!(image.layers.len() == 4, "4 layers expected");

        // The reference: the original image pulled the ordinary way, onto overlayfs.
        stack
            .ctd
            .ctr(&["images", "pull", "--plain-http", &image.plain])?;
        let plain_chain = stack.chain_id(stack.ctd.namespace(), &image.plain)?;
        let expected = stack.mount_view(fixture, "overlayfs", &plain_chain, "overlayfs")?;

        let out = stack.rpull(&image.estargz)?;
        ensure_all_lazy(&out, 4)?;
        let chain = stack.chain_id(stack.ctd.namespace(), &image.estargz)?;
        let info = stack
            .ctd
            .ctr(&["snapshots", "--snapshotter", "shoal", "info", &chain])?;
        let info: serde_json::Value = serde_json::from_str(&info)?;
        anyhow::ensure!(
            info["Labels"]["containerd.io/snapshot/remote"].as_str() == Some("shoal"),
            "the top layer is not a remote snapshot: {info:#}"
        );

        let lazy = stack.mount_view(fixture, "shoal", &chain, "shoal")?;
        tree::assert_same(&expected, &lazy)?;
        mount::unmount(&lazy)?;
        mount::unmount(&expected)?;

        let out = stack.run(&image.estargz, "layered", image::LAYERED_CHECK)?;
        anyhow::ensure!(out.trim() == "layered-ok", "layered check printed {out:?}");
        Ok(())
    });
}

#[test]
fn a_container_reading_a_few_megabytes_of_a_large_image_fetches_little() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture, "")?;
        // 8 x 26 MiB of random data nobody reads, and 3 MiB the container reads.
        let mut data = vec![tree::dir("/data", 0o755), tree::dir("/app", 0o755)];
        for index in 0..8 {
            data.push(tree::file(
                format!("/data/unread-{index}"),
                random_bytes(26 << 20)?,
                0o644,
            ));
        }
        let mut expected = BTreeMap::new();
        for index in 0..3 {
            let bytes = random_bytes(1 << 20)?;
            expected.insert(format!("/app/read-{index}"), sha256_hex(&bytes));
            data.push(tree::file(format!("/app/read-{index}"), bytes, 0o644));
        }
        let built = Instant::now();
        let image = stack.publish(fixture, "large", &[base_layer()?, data])?;
        let image_bytes: u64 = image.layers.iter().map(|layer| layer.size).sum();
        eprintln!(
            "large image: {image_bytes} bytes in {} layers, built and converted in {:?}",
            image.layers.len(),
            built.elapsed()
        );
        anyhow::ensure!(image_bytes >= 200 << 20, "only {image_bytes} bytes");

        stack.registry.proxy().reset();
        let started = Instant::now();
        let out = stack.rpull(&image.estargz)?;
        let pulled = started.elapsed();
        let pull_bytes = stack.registry.proxy().response_bytes_for("/");
        ensure_all_lazy(&out, 2)?;
        ensure_sums(&stack, &image.estargz, "reader", &expected)?;
        let total = started.elapsed();
        let served = stack.registry.proxy().response_bytes_for("/");
        let blobs = stack.blob_bytes();
        eprintln!(
            "large image: rpull {pulled:?} ({pull_bytes} bytes served), rpull + container \
             {total:?}: registry served {served} bytes ({blobs} of blobs), {:.2}% of the image",
            served as f64 * 100.0 / image_bytes as f64
        );
        anyhow::ensure!(
            served * 10 < image_bytes,
            "the registry served {served} bytes, not under 10% of {image_bytes}: {:#?}",
            stack.registry.proxy().stats()
        );
        Ok(())
    });
}

#[test]
fn restarted_daemons_serve_cached_layers_without_the_registry() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture, "")?;
        let (layers, mut expected) = data_image(&[("first", 2 << 20), ("second", 3 << 20)])?;
        expected.insert("/etc/greeting".into(), sha256_hex(b"hello from shoal\n"));
        let image = stack.publish(fixture, "restart", &layers)?;
        ensure_all_lazy(&stack.rpull(&image.estargz)?, 2)?;

        // A long-lived container reads every file once, caching it.
        let keeper = Keeper::start(&stack.ctd, &image.estargz, "keeper")?;
        let paths: Vec<&str> = expected.keys().map(String::as_str).collect();
        let read = sums(&keeper.sums("read", &paths)?);
        anyhow::ensure!(read == expected, "keeper read {read:#?}");

        for (how, signal) in [("SIGTERM", true), ("SIGKILL", false)] {
            if signal {
                let status = stack.daemon.stop()?;
                eprintln!("daemon stopped by SIGTERM: {status}");
            } else {
                stack.daemon.kill()?;
            }
            stack.registry.proxy().reset();
            stack.daemon.launch()?;
            stack.ctd.wait_for_snapshotter("shoal")?;
            ensure_sums(&stack, &image.estargz, &format!("after-{how}"), &expected)?;
            let stats = stack.registry.proxy().stats();
            anyhow::ensure!(
                stats.is_empty(),
                "after {how} the registry was asked for {stats:#?}"
            );
        }
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.matches("remote layers mounted again").count() >= 2,
            "the daemon log does not report remounting twice"
        );
        Ok(())
    });
}
