//! Pull secrets through the CRI image-service proxy: a registry that wants credentials
//! (docker-registry with htpasswd), a node whose daemon has no docker config, and kubelet's
//! `PullImage` carrying the credentials of a pod's `imagePullSecrets`.
//!
//! containerd's CRI plugin keeps those credentials to itself, so a pull that goes straight to
//! containerd leaves Shoal unable to read the image: every layer's lazy mount fails with "the
//! registry wants credentials and none were found", and containerd downloads the whole image.
//! Pulled through Shoal's proxy (kubelet's `--image-service-endpoint`), the same image is
//! mounted lazily and runs; once kubelet removes it (by its id, as image GC does) the proxy
//! forgets the credentials, and the daemon cannot read the registry with them any more.

use std::fs;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_cri::v1::AuthConfig;

use crate::containerd::{self, Containerd};
use crate::convert;
use crate::cri::{self, Cri, Stack, CRI_NAMESPACE};
use crate::daemon::Daemon;
use crate::fixture::{privileged, wait_until, Fixture};
use crate::image;
use crate::registry::{Registry, PRIVATE_PASSWORD, PRIVATE_USER};

const FALLBACK_LOG: &str = "lazy mount failed; layer is downloaded instead";
const NO_CREDENTIALS: &str = "the registry wants credentials and none were found";
const SNAPSHOTS_GONE_TIMEOUT: Duration = Duration::from_secs(60);

/// The credentials kubelet passes for a pull secret of the private registry.
fn pull_secret() -> AuthConfig {
    AuthConfig {
        username: PRIVATE_USER.to_owned(),
        password: PRIVATE_PASSWORD.to_owned(),
        ..AuthConfig::default()
    }
}

/// Pushes the CRI test image, converted to eStargz by `shoal convert` with credentials of its
/// own (the node under test has none), as `test/private:esgz`.
pub(crate) fn push_private(fixture: &Fixture, registry: &Registry) -> Result<String> {
    let host = registry.host();
    let pusher = fixture.path("pusher-docker-config.json");
    fs::write(
        &pusher,
        format!(
            r#"{{"auths": {{"{host}": {{"username": "{PRIVATE_USER}", "password": "{PRIVATE_PASSWORD}"}}}}}}"#
        ),
    )?;
    fs::write(
        fixture.path("convert.toml"),
        format!("[registry]\ndocker_config = \"{}\"\n", pusher.display()),
    )?;
    let built = image::build(fixture, "private", &cri::layers()?)?;
    let reference = format!("{host}/test/private:esgz");
    convert::convert(fixture, &[], &built.oci(), &reference)?;
    Ok(reference)
}

/// The daemon's log since byte `from`.
fn log_since(daemon: &Daemon, from: usize) -> String {
    daemon.log().get(from..).unwrap_or_default().to_owned()
}

/// Every regular file under `dir` that holds `needle`, leaving out the snapshot directories
/// (lazy mounts: reading them would read the registry).
fn files_holding(dir: &Path, needle: &[u8]) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() && entry.file_name() != "snapshots" {
                pending.push(path);
            } else if kind.is_file() {
                let bytes = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
                if bytes.windows(needle.len()).any(|window| window == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    Ok(found)
}

#[test]
fn a_pull_through_the_cri_proxy_lends_its_credentials_to_the_lazy_reads_until_removed() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start_private(fixture)?;
        let host = registry.host();
        let reference = push_private(fixture, &registry)?;

        let proxy_socket = fixture.path("run/cri.sock");
        let containerd_socket = fixture.path("containerd/c.sock");
        let absent = fixture.path("no-docker-config.json");
        let mut daemon = Daemon::configure_with(
            fixture,
            &format!(
                "\n[registry]\ndocker_config = \"{}\"\n\
                 [registry.hosts.\"{host}\"]\nplain_http = true\n\
                 [cri_proxy]\nlisten = \"{}\"\ncontainerd = \"{}\"\n",
                absent.display(),
                proxy_socket.display(),
                containerd_socket.display()
            ),
        )?;
        daemon.launch()?;
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            cri: true,
            cri_snapshotter: Some("shoal".to_owned()),
            cri_plain_http: vec![host.clone()],
            cri_without_annotations: false,
        };
        let ctd = Containerd::start(fixture, &options)?;
        anyhow::ensure!(
            ctd.address() == containerd_socket,
            "containerd listens at {}, the proxy forwards to {}",
            ctd.address().display(),
            containerd_socket.display()
        );
        // kubelet: runtime calls to containerd, image calls to the proxy.
        let kubelet = Cri::connect(ctd.address())?.with_image_service(&proxy_socket)?;
        kubelet.wait_ready()?;
        let stack = Stack {
            registry,
            ctd,
            daemon,
            cri: Cri::connect(&containerd_socket)?,
            plain: reference.clone(),
        };

        // Through the proxy: every layer is Shoal's own snapshot, none was downloaded, and a
        // container reads its files.
        stack.registry.proxy().reset();
        let id = kubelet.pull_with(&reference, Some(pull_secret()))?;
        let image = stack.layers_of(&reference, &id)?;
        anyhow::ensure!(image.layers.len() == 4, "expected 4 layers");
        for (position, chain) in image.chains.iter().enumerate() {
            let labels = stack.snapshot_labels(chain)?;
            anyhow::ensure!(
                labels
                    .get("containerd.io/snapshot/remote")
                    .map(String::as_str)
                    == Some("shoal"),
                "layer {position} ({chain}) is not a remote snapshot: {labels:#?}\n{}",
                stack.daemon.log()
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
        stack.run_check(&reference, "pull-secret")?;
        let big = image
            .layers
            .iter()
            .max_by_key(|layer| layer.size)
            .context("no layers")?;
        let fetched = stack.fetched(&image, big);
        anyhow::ensure!(
            big.size > cri::BIG_FILE_BYTES as u64 && fetched < big.size / 2,
            "pulling and running fetched {fetched} of the big layer's {} bytes; it reads none",
            big.size
        );
        let log = stack.daemon.log();
        anyhow::ensure!(
            log.contains("pull secret recorded for lazy reads") && !log.contains(NO_CREDENTIALS),
            "{log}"
        );

        // kubelet's image GC removes the image by its id: the proxy forgets the credentials
        // once containerd has removed it (and with it Shoal's snapshots).
        let before_removal = stack.daemon.log().len();
        kubelet.remove(&id)?;
        anyhow::ensure!(
            kubelet.status(&reference)?.is_none(),
            "the image is still there"
        );
        wait_until(
            "containerd to remove the image's snapshots from Shoal",
            SNAPSHOTS_GONE_TIMEOUT,
            || {
                let listed = stack.ctd.ctr_in(
                    CRI_NAMESPACE,
                    &["snapshots", "--snapshotter", "shoal", "ls"],
                )?;
                Ok(image
                    .chains
                    .iter()
                    .all(|chain| !listed.contains(chain.as_str())))
            },
        )?;
        anyhow::ensure!(
            log_since(&stack.daemon, before_removal).contains("pull secret forgotten"),
            "{}",
            stack.daemon.log()
        );

        // The same pull straight to containerd, as without the proxy: containerd has the
        // credentials, Shoal has none, so every layer is downloaded whole.
        let before_pull = stack.daemon.log().len();
        stack.registry.proxy().reset();
        let again = stack.cri.pull_with(&reference, Some(pull_secret()))?;
        anyhow::ensure!(again == id, "the image changed: {again} after {id}");
        let refused = log_since(&stack.daemon, before_pull)
            .lines()
            .filter(|line| line.contains(FALLBACK_LOG) && line.contains(NO_CREDENTIALS))
            .count();
        anyhow::ensure!(
            refused == image.layers.len(),
            "{refused} of {} layers fell back for want of credentials:\n{}",
            image.layers.len(),
            stack.daemon.log()
        );
        for (position, (layer, chain)) in image.layers.iter().zip(&image.chains).enumerate() {
            let labels = stack.snapshot_labels(chain)?;
            anyhow::ensure!(
                !labels.contains_key("containerd.io/snapshot/remote"),
                "layer {position} ({chain}) is remote without credentials: {labels:#?}"
            );
            let fetched = stack.fetched(&image, layer);
            anyhow::ensure!(
                fetched >= layer.size,
                "layer {position}: {fetched} of {} bytes downloaded",
                layer.size
            );
        }
        stack.run_check(&reference, "no-pull-secret")?;

        // The credentials were kept in memory only.
        let needle = PRIVATE_PASSWORD.as_bytes();
        anyhow::ensure!(
            !stack.daemon.log().contains(PRIVATE_PASSWORD),
            "the daemon logged the password"
        );
        for dir in [stack.daemon.root(), &fixture.path("run")] {
            let holding = files_holding(dir, needle)?;
            anyhow::ensure!(holding.is_empty(), "the password is in {holding:?}");
        }
        Ok(())
    });
}
