//! `shoal node-setup`: what the Kubernetes DaemonSet (`deploy/kubernetes/`) runs on each node
//! besides the daemon: merging Shoal's settings into containerd's config
//! ([`containerd_config`]), and the readiness probe ([`ready`]).

pub mod containerd_config;
pub mod ready;
