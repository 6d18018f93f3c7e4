//! A kubelet credential provider plugin as the daemon's only source of credentials: a
//! registry that wants them (htpasswd), a node with no docker config, and a
//! `CredentialProviderConfig` whose plugin (a shell script) answers for the registry. `shoal
//! rpull` mounts every layer lazily and a container reads its files, the daemon's reads
//! authenticated by the plugin's answer, which it runs once and then caches.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::daemon::Daemon;
use crate::fixture::{privileged, Fixture};
use crate::image;
use crate::process;
use crate::pull_secrets::push_private;
use crate::registry::{Registry, PRIVATE_PASSWORD, PRIVATE_USER};

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn a_credential_provider_plugin_authenticates_lazy_reads_of_a_private_image() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start_private(fixture)?;
        let host = registry.host();
        let reference = push_private(fixture, &registry)?;

        let bin_dir = fixture.mkdir("credential-providers")?;
        let calls = fixture.path("provider-calls");
        let plugin = bin_dir.join("test-provider");
        fs::write(
            &plugin,
            format!(
                "#!/bin/sh\ncat >> {calls}; echo >> {calls}\n\
                 printf '%s' '{{\"kind\": \"CredentialProviderResponse\", \
                 \"apiVersion\": \"credentialprovider.kubelet.k8s.io/v1\", \
                 \"cacheKeyType\": \"Registry\", \"cacheDuration\": \"1h\", \
                 \"auth\": {{\"{host}\": {{\"username\": \"{PRIVATE_USER}\", \
                 \"password\": \"'\"$PROVIDER_SECRET\"'\"}}}}}}'\n",
                calls = calls.display()
            ),
        )?;
        fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755))?;
        let provider_config = fixture.path("credential-provider.yaml");
        fs::write(
            &provider_config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\n\
                 providers:\n  - name: test-provider\n    matchImages: [\"{host}\"]\n    \
                 defaultCacheDuration: \"10m\"\n    \
                 apiVersion: credentialprovider.kubelet.k8s.io/v1\n    env:\n      \
                 - name: PROVIDER_SECRET\n        value: {PRIVATE_PASSWORD}\n"
            ),
        )?;
        let mut daemon = Daemon::configure_with(
            fixture,
            &format!(
                "\n[registry]\ndocker_config = \"{}\"\n\
                 credential_provider_config = \"{}\"\ncredential_provider_bin_dir = \"{}\"\n\
                 [registry.hosts.\"{host}\"]\nplain_http = true\n",
                fixture.path("no-docker-config.json").display(),
                provider_config.display(),
                bin_dir.display()
            ),
        )?;
        daemon.launch()?;
        let ctd = Containerd::start(
            fixture,
            &containerd::Options {
                shoal_socket: Some(daemon.socket().to_owned()),
                ..containerd::Options::default()
            },
        )?;

        let mut rpull = Command::new(binary::cli()?);
        rpull
            .arg("--config")
            .arg(daemon.config())
            .arg("rpull")
            .arg("--address")
            .arg(ctd.address())
            .args([
                "-n",
                ctd.namespace(),
                "--plain-http",
                "--require-lazy",
                &reference,
            ]);
        let out = process::run(&mut rpull, TOOL_TIMEOUT)
            .with_context(|| format!("rpull; the daemon's log:\n{}", daemon.log()))?;
        anyhow::ensure!(out.contains("4 layers, 4 lazy"), "rpull: {out}");
        let run = ctd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "shoal",
            &reference,
            "provided",
            "sh",
            "-c",
            image::LAYERED_CHECK,
        ])?;
        anyhow::ensure!(run.contains("layered-ok"), "the container printed {run:?}");

        // The plugin was asked for the image as kubelet asks; the daemon ran it once (its
        // answer is cached for the registry) and rpull, with the same config, once more.
        let asked: Vec<serde_json::Value> = fs::read_to_string(&calls)?
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(
            (1..=2).contains(&asked.len())
                && asked.iter().all(|call| {
                    call["kind"] == "CredentialProviderRequest"
                        && call["image"] == format!("{host}/test/private")
                }),
            "the plugin was asked {asked:?}"
        );
        anyhow::ensure!(
            !daemon.log().contains(PRIVATE_PASSWORD),
            "the daemon logged the password"
        );
        Ok(())
    });
}
