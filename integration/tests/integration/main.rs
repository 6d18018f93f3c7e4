//! End-to-end tests of Shoal: the daemon driven over its gRPC socket, by a real containerd
//! (Debian's 1.6), with images served by a real registry on loopback.
//!
//! One test binary, many modules. The harness modules (`fixture`, `process`, `binary`, `mount`,
//! `tree`, `proxy`, `registry`, `image`, `containerd`, `daemon`, `client`) start and clean up
//! the real parts; the test modules use them. Tests that need root and /dev/fuse skip loudly
//! without them, and fail instead under `CI=true`. The daemon and CLI binaries must be built
//! first: `cargo build -p shoal-cmd --bins`.

mod binary;
mod client;
mod containerd;
mod cri_client;
mod daemon;
mod delay;
mod deploy_image;
mod dns;
mod fixture;
mod image;
mod keeper;
mod mount;
mod netns;
mod process;
mod proxy;
mod registry;
mod service_manager;
mod tree;

mod bad_input;
mod bench;
mod bench_cli;
mod cli;
mod concurrent;
mod conformance;
mod convert;
mod credential_provider;
mod cri;
mod cri_annotations;
mod ctr;
mod disk_accounting;
mod handover;
mod harness;
mod hostile;
mod install;
mod k8s_manifests;
mod lazy;
mod metrics;
mod node_setup;
mod optimize;
mod overlaybd;
mod overlaybd_learned;
mod p2p;
mod partial_reads;
mod permissions;
mod pull_secrets;
mod read_completion;
mod reload;
mod resilience;
mod rpull;
mod stargz_compat;
mod systemd_store;
