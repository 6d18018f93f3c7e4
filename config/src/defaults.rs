//! Every default value of Shoal's configuration, in one place.

pub const ROOT: &str = "/var/lib/shoal";
pub const SOCKET: &str = "/run/shoal/shoal.sock";
pub const LOG_LEVEL: &str = "info";
pub const CACHE_CAPACITY: u64 = 10 << 30;
pub const CACHE_BLOCK_SIZE: u64 = 1 << 20;
pub const CACHE_MEMORY: u64 = 256 << 20;
pub const FETCH_MAX_CONCURRENT: usize = 32;
pub const FETCH_PREFETCH: bool = true;
pub const FETCH_BACKGROUND: bool = false;
pub const FETCH_BACKGROUND_RATE: u64 = 20 << 20;
/// Read-triggered completion is off (0): measured, it moves more bytes and starts no faster
/// (README, Benchmark: "Completion started by reads").
pub const FETCH_COMPLETE_AFTER_PERCENT: u8 = 0;
/// Learned prefetch: record the chunks an image's first start reads, prefetch them later.
pub const FETCH_LEARN: bool = true;
/// Pushing traces to registries writes to them: asked for, never by default.
pub const FETCH_LEARN_PUSH: bool = false;
/// A start has settled when no chunk was read for the first time for this long: longer than
/// the pauses between an interpreter's imports, short enough to end before most containers.
pub const FETCH_LEARN_SETTLE_SECS: u64 = 5;
/// Compressed chunk bytes one layer's trace names at most: a start that reads the whole of a
/// large layer does not make every later start fetch all of it ahead.
pub const FETCH_LEARN_MAX_BYTES: u64 = 256 << 20;
pub const REGISTRY_TIMEOUT_SECS: u64 = 30;
pub const REGISTRY_RETRIES: u32 = 4;
pub const REGISTRY_DEADLINE_SECS: u64 = 60;
pub const DOCKER_CONFIG: &str = "/root/.docker/config.json";
pub const PEERS_LISTEN: &str = "0.0.0.0:7420";
pub const PEERS_REFRESH_SECS: u64 = 10;
pub const PEERS_PROBE_INTERVAL_MS: u64 = 500;
/// A member that answers its probe within this long is alive, however loaded it is.
pub const PEERS_PROBE_TIMEOUT_MS: u64 = 2000;
pub const PEERS_OWNERS: usize = 2;
pub const PEERS_UPLOAD_RATE: u64 = 100 << 20;
pub const PEERS_MAX_UPLOADS: usize = 16;
pub const PEERS_LATENCY_BUDGET_MS: u64 = 2000;
pub const PEERS_LEASE_SECS: u64 = 60;
/// Memory the index of the blobs a node owns may take; the least recently announced are
/// forgotten first.
pub const PEERS_INDEX_MEMORY: u64 = 64 << 20;
pub const HANDOVER_ENABLED: bool = true;
pub const HANDOVER_HOLDER_SOCKET: &str = "/run/shoal/fdholder.sock";
/// How long the fd holder keeps connections with no daemon attached: long enough for any
/// restart or upgrade, short enough that a node whose daemon is gone for good lets go.
pub const HANDOVER_ORPHAN_AFTER_SECS: u64 = 3600;
/// systemd's fd store where systemd offers one, the fd holder elsewhere.
pub const HANDOVER_STORE: &str = "auto";
/// Where the CRI image-service proxy listens, for kubelet's `--image-service-endpoint`.
pub const CRI_PROXY_LISTEN: &str = "/run/shoal/cri.sock";
/// containerd's socket, which serves its CRI plugin.
pub const CRI_PROXY_CONTAINERD: &str = "/run/containerd/containerd.sock";

/// The preheat API (`[preheat]`): Dragonfly manager's open API subset Harbor calls.
pub const PREHEAT_LISTEN: &str = "127.0.0.1:7430";
