//! A node set up without Shoal's CRI settings: containerd 1.6's CRI plugin unpacks into Shoal
//! but keeps its default `disable_snapshot_annotations = true`, so every layer's Prepare asks
//! for a remote snapshot without the labels that locate the layer. The eStargz image is then
//! downloaded whole, and `shoal status` names the setting to change (containerd 2.x's
//! `enable_remote_snapshot_annotations` gives the same symptom and the same line).

use std::process::Command;
use std::time::Duration;

use crate::binary;
use crate::containerd::{self, Containerd};
use crate::cri::{Cri, Stack};
use crate::daemon::Daemon;
use crate::fixture::{loopback_addr, privileged, Fixture};
use crate::image;
use crate::process;
use crate::registry::Registry;

#[test]
fn cri_pulls_without_annotations_download_and_status_names_the_setting() {
    privileged!();
    Fixture::run(|fixture| {
        let registry = Registry::start(fixture)?;
        let host = registry.host();
        let built = image::build(fixture, "cri", &crate::cri::layers()?)?;
        let plain = built.push(&host, "test/plain")?;
        let metrics = loopback_addr(9464);
        let daemon = {
            let mut daemon = Daemon::configure_with(
                fixture,
                &format!(
                    "\n[registry.hosts.\"{host}\"]\nplain_http = true\n\
                     [metrics]\naddress = \"{metrics}\"\n"
                ),
            )?;
            daemon.launch()?;
            daemon
        };
        let options = containerd::Options {
            shoal_socket: Some(daemon.socket().to_owned()),
            cri: true,
            cri_snapshotter: Some("shoal".to_owned()),
            cri_plain_http: vec![host],
            cri_without_annotations: true,
        };
        let ctd = Containerd::start(fixture, &options)?;
        let cri = Cri::connect(ctd.address())?;
        cri.wait_ready()?;
        let stack = Stack {
            registry,
            ctd,
            daemon,
            cri,
            plain,
        };
        let reference = stack.push_estargz()?;
        stack.registry.proxy().reset();
        let id = stack.pull_and_find(&reference)?;
        let image = stack.layers_of(&reference, &id)?;
        for (position, (layer, chain)) in image.layers.iter().zip(&image.chains).enumerate() {
            let labels = stack.snapshot_labels(chain)?;
            anyhow::ensure!(
                !labels.contains_key("containerd.io/snapshot/remote"),
                "layer {position} is remote without annotations: {labels:#?}"
            );
            let fetched = stack.fetched(&image, layer);
            anyhow::ensure!(
                fetched >= layer.size,
                "layer {position}: {fetched} of {} bytes downloaded",
                layer.size
            );
        }

        let mut status = Command::new(binary::cli()?);
        status
            .arg("--config")
            .arg(stack.daemon.config())
            .arg("status");
        let out = process::run(&mut status, Duration::from_secs(30))?;
        let count = image.layers.len();
        anyhow::ensure!(
            out.contains(&format!(
                "fix:        {count} layer(s) arrived without the annotations"
            )) && out.contains("disable_snapshot_annotations = false")
                && out.contains("enable_remote_snapshot_annotations"),
            "shoal status does not name the fix:\n{out}\n{}",
            stack.daemon.log()
        );
        Ok(())
    });
}
