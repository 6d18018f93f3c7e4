//! Command layer of Shoal: the `shoal-snapshotter` daemon and the `shoal` CLI.
//!
//! This is the only crate that builds the tokio runtime ([`runtime`]), installs tracing
//! ([`logging`]), parses arguments, and uses `anyhow`. Everything below it receives a validated
//! `shoal_config::Config` and returns typed errors.
//!
//! - [`daemon`]: socket ownership, serving the Snapshots API, graceful shutdown.
//! - [`client`]: a Snapshots gRPC client over the daemon's unix socket.
//! - [`status`]: `shoal status`.
//! - [`pull`]: `shoal rpull`, pulling through containerd with remote-snapshot labels.
//! - [`convert`]: `shoal convert`, rebuilding an image as eStargz and pushing it.
//! - [`bench`]: `shoal bench`, cold starts of an image: overlayfs against Shoal.
//! - [`cri_proxy`]: the CRI image-service proxy that records kubelet's pull secrets.
//! - [`preheat`]: the preheat API (Dragonfly open API subset Harbor calls) and `shoal preheat`.
//! - [`reload`]: SIGHUP in the daemon, `shoal reload` in the CLI.
//! - [`node`]: `shoal node-setup`, the Kubernetes node's containerd config merge and readiness.
//! - [`misconfiguration`]: containerd settings the fallback counters show to be missing.
//! - [`version`]: the one version line every binary prints.

pub mod bench;
pub mod client;
pub mod convert;
pub mod cri_proxy;
pub mod daemon;
pub mod handover;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod misconfiguration;
pub mod node;
pub mod preheat;
pub mod pull;
pub mod reload;
pub mod runtime;
pub mod status;
pub mod version;

use std::path::Path;

use anyhow::Context;
use shoal_config::Config;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/shoal/config.toml";

/// Loads `path`; the default path may be absent (then every default applies), an explicit one
/// may not.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Config::load(path).with_context(|| format!("load {}", path.display())),
        None if Path::new(DEFAULT_CONFIG).exists() => Config::load(Path::new(DEFAULT_CONFIG))
            .with_context(|| format!("load {DEFAULT_CONFIG}")),
        None => Ok(Config::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_typo_is_reported_once_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[cache]\ncapacty = \"1GiB\"\n").unwrap();
        let error = format!("{:#}", load_config(Some(&path)).unwrap_err());
        assert_eq!(
            error.matches("unknown field `capacty`").count(),
            1,
            "{error}"
        );
        assert!(error.contains("line 2"), "{error}");
        assert!(error.starts_with(&format!("load {}: parse config: ", path.display())));
    }
}
