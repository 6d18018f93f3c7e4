//! `shoal rpull` against a real containerd with Shoal as its `shoal` proxy snapshotter and the
//! layered image on the loopback registry: the pull unpacks every layer through containerd's
//! Diff service, the image runs, the Prepare labels reach containerd, a second pull touches
//! no layer blob, and the usual mistakes get clear errors.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::process;
use crate::registry::Registry;

const RPULL_TIMEOUT: Duration = Duration::from_secs(120);

/// The registry with the layered image, the daemon, and containerd using it as `shoal`;
/// nothing pulled yet.
struct Stack {
    fixture_dir: PathBuf,
    reference: String,
    registry: Registry,
    ctd: Containerd,
    daemon: Daemon,
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
        // Every default but the daemon's socket, and nothing read from /etc/shoal.
        let config = format!("socket = \"{}\"\n", daemon.socket().display());
        fs::write(fixture.path("rpull.toml"), config).context("write rpull.toml")?;
        Ok(Stack {
            fixture_dir: fixture.dir().to_owned(),
            reference,
            registry,
            ctd,
            daemon,
        })
    }

    /// `shoal rpull` of `reference` into the test's containerd.
    fn rpull(&self, reference: &str) -> Result<String> {
        // Where `containerd::Containerd::start` puts containerd's gRPC socket.
        let address = self.fixture_dir.join("containerd/c.sock");
        anyhow::ensure!(address.exists(), "no socket at {}", address.display());
        self.rpull_with(&address, &[], reference)
    }

    /// `shoal rpull --address <address> <extra...> <reference>`: stdout, or the failure.
    fn rpull_with(&self, address: &Path, extra: &[&str], reference: &str) -> Result<String> {
        let mut command = Command::new(binary::cli()?);
        command
            .arg("--config")
            .arg(self.fixture_dir.join("rpull.toml"))
            .arg("rpull")
            .arg("--address")
            .arg(address)
            .args(["-n", self.ctd.namespace(), "--plain-http"])
            .args(extra)
            .arg(reference);
        process::run(&mut command, RPULL_TIMEOUT)
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

    /// Requests the registry answered for any of `digests`' blobs.
    fn blob_requests(&self, digests: &[String]) -> u64 {
        self.registry
            .proxy()
            .stats()
            .iter()
            .filter(|(path, _)| digests.iter().any(|digest| path.ends_with(digest.as_str())))
            .map(|(_, stats)| stats.requests)
            .sum()
    }

    /// The labels of every committed snapshot of `shoal`, as containerd reports them.
    fn committed_labels(&self) -> Result<Vec<serde_json::Value>> {
        let listed = self
            .ctd
            .ctr(&["snapshots", "--snapshotter", "shoal", "ls"])?;
        let mut labels = Vec::new();
        for line in listed.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.last() != Some(&"Committed") {
                continue;
            }
            let info = self
                .ctd
                .ctr(&["snapshots", "--snapshotter", "shoal", "info", fields[0]])?;
            let info: serde_json::Value =
                serde_json::from_str(&info).with_context(|| format!("parse {info}"))?;
            labels.push(info["Labels"].clone());
        }
        Ok(labels)
    }
}

/// How many per-layer lines of rpull's output contain `text`.
fn layer_lines(out: &str, text: &str) -> usize {
    out.lines()
        .filter(|line| line.starts_with("layer ") && line.contains(text))
        .count()
}

/// The layer digests of the image at `layout` (an OCI layout with one manifest).
fn layer_digests(layout: &Path) -> Result<Vec<String>> {
    let read = |path: PathBuf| -> Result<serde_json::Value> {
        let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let blob = |digest: &str| layout.join("blobs").join(digest.replacen(':', "/", 1));
    let index = read(layout.join("index.json"))?;
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json without a manifest")?;
    read(blob(manifest))?["layers"]
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

#[test]
fn rpull_unpacks_every_layer_and_the_image_runs() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let layers = layer_digests(&fixture.path("images/layered"))?;
        anyhow::ensure!(layers.len() == 3, "expected 3 layers: {layers:?}");

        let out = stack.rpull(&stack.reference)?;
        // Shoal mounts nothing lazily yet, so each layer is fetched and applied.
        for position in 1..=3 {
            let line = out
                .lines()
                .find(|line| line.starts_with(&format!("layer {position}/3 ")))
                .with_context(|| format!("no line for layer {position}: {out}"))?;
            anyhow::ensure!(
                line.contains("fetched") && line.contains("applied in"),
                "layer {position}: {line}"
            );
        }
        anyhow::ensure!(
            out.contains(&format!("pulled {}", stack.reference))
                && out.contains("3 layers, 0 lazy, 3 fetched and applied"),
            "summary: {out}"
        );
        anyhow::ensure!(
            stack.blob_requests(&layers) >= 3,
            "the layer blobs were not fetched: {:#?}",
            stack.registry.proxy().stats()
        );

        let images = stack.ctd.ctr(&["images", "ls"])?;
        anyhow::ensure!(images.contains(&stack.reference), "images ls: {images}");
        stack.run_check("after-rpull")?;

        // The GC references containerd's own pull sets, and no lease left behind.
        let content = stack.ctd.ctr(&["content", "ls"])?;
        for label in [
            format!("containerd.io/gc.ref.content.l.2={}", layers[2]),
            "containerd.io/gc.ref.content.config=sha256:".to_owned(),
            "containerd.io/gc.ref.snapshot.shoal=sha256:".to_owned(),
            "containerd.io/uncompressed=sha256:".to_owned(),
        ] {
            anyhow::ensure!(
                content.contains(&label),
                "no {label} in content ls: {content}"
            );
        }
        let leases = stack.ctd.ctr(&["leases", "ls", "-q"])?;
        anyhow::ensure!(leases.trim().is_empty(), "leases left: {leases}");

        // Each committed layer carries the labels the Prepare sent.
        let labels = stack.committed_labels()?;
        let described: BTreeSet<&str> = labels
            .iter()
            .filter_map(|l| l["containerd.io/snapshot/cri.layer-digest"].as_str())
            .collect();
        let expected: BTreeSet<&str> = layers.iter().map(String::as_str).collect();
        anyhow::ensure!(described == expected, "labels {labels:#?}");
        for label in &labels {
            for key in [
                "containerd.io/snapshot/cri.image-ref",
                "containerd.io/snapshot/remote/stargz.reference",
            ] {
                anyhow::ensure!(
                    label[key].as_str() == Some(stack.reference.as_str()),
                    "{key} in {label:#}"
                );
            }
            let digest = label["containerd.io/snapshot/cri.layer-digest"].as_str();
            anyhow::ensure!(
                label["containerd.io/snapshot/remote/stargz.digest"].as_str() == digest,
                "stargz.digest in {label:#}"
            );
        }
        let bottom = labels
            .iter()
            .find(|l| l["containerd.io/snapshot/cri.layer-digest"].as_str() == Some(&layers[0]))
            .context("no snapshot of the bottom layer")?;
        anyhow::ensure!(
            bottom["containerd.io/snapshot/cri.image-layers"].as_str()
                == Some(layers.join(",").as_str()),
            "image-layers of the bottom layer: {bottom:#}"
        );

        // A second pull finds every chain committed and downloads no layer.
        stack.registry.proxy().reset();
        let again = stack.rpull(&stack.reference)?;
        anyhow::ensure!(
            layer_lines(&again, "already unpacked") == 3,
            "second rpull: {again}"
        );
        anyhow::ensure!(
            stack.blob_requests(&layers) == 0,
            "the second rpull fetched layers: {:#?}",
            stack.registry.proxy().stats()
        );
        stack.run_check("after-second-rpull")?;
        Ok(())
    });
}

#[test]
fn rpull_after_image_removal_reuses_the_committed_snapshots() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let layers = layer_digests(&fixture.path("images/layered"))?;
        stack.rpull(&stack.reference)?;
        // A container keeps the layer snapshots alive when the image and its content are
        // collected, as a node's running containers do.
        stack.ctd.ctr(&[
            "containers",
            "create",
            "--snapshotter",
            "shoal",
            &stack.reference,
            "keeper",
        ])?;
        stack
            .ctd
            .ctr(&["images", "rm", "--sync", &stack.reference])?;
        let images = stack.ctd.ctr(&["images", "ls", "-q"])?;
        anyhow::ensure!(!images.contains(&stack.reference), "not removed: {images}");

        stack.registry.proxy().reset();
        let out = stack.rpull(&stack.reference)?;
        anyhow::ensure!(
            layer_lines(&out, "already unpacked") == 3,
            "the committed chains were not reused: {out}"
        );
        anyhow::ensure!(
            stack.blob_requests(&layers) == 0,
            "layers were fetched again: {:#?}",
            stack.registry.proxy().stats()
        );
        let images = stack.ctd.ctr(&["images", "ls", "-q"])?;
        anyhow::ensure!(images.contains(&stack.reference), "not listed: {images}");
        stack.run_check("after-re-pull")?;
        Ok(())
    });
}

#[test]
fn rpull_errors_name_the_problem() {
    privileged!();
    Fixture::run(|fixture| {
        let mut stack = Stack::start(fixture)?;
        let address = fixture.path("containerd/c.sock");
        let expect_failure = |extra: &[&str], reference: &str, needle: &str| -> Result<()> {
            match stack.rpull_with(&address, extra, reference) {
                Ok(out) => anyhow::bail!("rpull {extra:?} {reference} succeeded: {out}"),
                Err(err) => {
                    let text = format!("{err:#}");
                    anyhow::ensure!(text.contains(needle), "expected {needle:?} in: {text}");
                    Ok(())
                }
            }
        };
        expect_failure(
            &["--snapshotter", "nope"],
            &stack.reference,
            "containerd has no snapshotter `nope`",
        )?;
        let missing = format!("{}/test/missing:latest", stack.registry.host());
        expect_failure(&[], &missing, &format!("image {missing} not found"))?;
        let nowhere = Path::new("/nonexistent/containerd.sock");
        match stack.rpull_with(nowhere, &[], &stack.reference) {
            Ok(out) => anyhow::bail!("rpull without containerd succeeded: {out}"),
            Err(err) => {
                let text = format!("{err:#}");
                anyhow::ensure!(
                    text.contains("connect to containerd at /nonexistent/containerd.sock"),
                    "{text}"
                );
            }
        }
        let images = stack.ctd.ctr(&["images", "ls", "-q"])?;
        anyhow::ensure!(
            images.trim().is_empty(),
            "failed pulls left images: {images}"
        );

        // The daemon down: said before anything is pulled, with the socket containerd dials.
        stack.daemon.stop()?;
        match stack.rpull_with(&address, &[], &stack.reference) {
            Ok(out) => anyhow::bail!("rpull without the daemon succeeded: {out}"),
            Err(err) => {
                let text = format!("{err:#}");
                let socket = stack.daemon.socket().display().to_string();
                anyhow::ensure!(
                    text.contains(&format!(
                        "snapshotter `shoal` at {socket}, where nothing answers"
                    )) && text.contains("is shoal-snapshotter running?"),
                    "{text}"
                );
            }
        }
        Ok(())
    });
}

/// rpull compares how it reads the image's registry with how the daemon does (the settings
/// the daemon leaves beside its socket) and says what differs and how to fix it: here its own
/// config has `plain_http` and credentials for the registry that the daemon's lacks. Once the
/// daemon's config says the same and is reloaded, the warning is gone.
#[test]
fn rpull_warns_when_the_daemon_reads_the_registry_otherwise() {
    privileged!();
    Fixture::run(|fixture| {
        let stack = Stack::start(fixture)?;
        let host = stack.registry.host();
        let auth = fixture.path("auth.json");
        // The registry asks for nothing; the credential only has to be there.
        fs::write(
            &auth,
            format!(r#"{{"auths": {{"{host}": {{"auth": "dTpw"}}}}}}"#),
        )?;
        let registry = format!(
            "\n[registry]\ndocker_config = \"{}\"\n[registry.hosts.\"{host}\"]\nplain_http = true\n",
            auth.display()
        );
        let config = fixture.path("rpull-own.toml");
        fs::write(
            &config,
            format!(
                "socket = \"{}\"\n{registry}",
                stack.daemon.socket().display()
            ),
        )?;
        let rpull = || -> Result<String> {
            let output = Command::new(binary::cli()?)
                .arg("--config")
                .arg(&config)
                .arg("rpull")
                .arg("--address")
                .arg(stack.ctd.address())
                .args([
                    "-n",
                    stack.ctd.namespace(),
                    "--plain-http",
                    &stack.reference,
                ])
                .output()?;
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            anyhow::ensure!(output.status.success(), "rpull failed: {stderr}");
            Ok(stderr)
        };

        let warned = rpull()?;
        let expected = [
            format!("warning: the daemon reads registry {host} differently from this rpull"),
            format!("this rpull {}", config.display()),
            "plain_http: the daemon false, this rpull true (--plain-http)".to_owned(),
            format!(
                "credentials: the daemon none, this rpull docker config {}",
                auth.display()
            ),
            format!(
                "in {} and run `shoal reload`",
                stack.daemon.config().display()
            ),
        ];
        for needle in &expected {
            anyhow::ensure!(
                warned.contains(needle.as_str()),
                "no {needle:?} in: {warned}"
            );
        }
        anyhow::ensure!(!warned.contains("dTpw"), "a secret was printed: {warned}");
        anyhow::ensure!(
            warned.matches("warning:").count() == 1,
            "one warning expected: {warned}"
        );

        // The fix the warning names: the same settings in the daemon's config, and a reload.
        let mut daemon_config = fs::read_to_string(stack.daemon.config())?;
        daemon_config.push_str(&registry);
        fs::write(stack.daemon.config(), daemon_config)?;
        let mut reload = Command::new(binary::cli()?);
        reload
            .arg("--socket")
            .arg(stack.daemon.socket())
            .arg("reload");
        process::run(&mut reload, RPULL_TIMEOUT)?;
        let quiet = rpull()?;
        anyhow::ensure!(!quiet.contains("warning"), "still warned: {quiet}");
        Ok(())
    });
}
