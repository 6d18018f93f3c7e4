//! What the daemon reports about itself: [`DaemonStatus`], gathered from its parts'
//! own state on every request.

use std::sync::Arc;

use serde::Serialize;
use shoal_fetcher::peer::PeerStats;
use shoal_fetcher::{Fetcher, HistogramSnapshot, Source, Verification};
use shoal_fuse::layer::{ChunkReader, LayerLearning, LearnStats, Learning};
use shoal_snapshotter::ShoalSnapshotter;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Observed {
    pub snapshotter: ShoalSnapshotter,
    pub fetcher: Fetcher,
    pub reader: Arc<ChunkReader>,
    /// Learned prefetch: what each layer recorded or replayed.
    pub learning: Arc<Learning>,
    /// Turns true when the daemon starts draining for a stop: it is no longer ready.
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// The daemon's own view, served at `/status`.
#[derive(Debug, Serialize, serde::Deserialize, Default)]
pub struct DaemonStatus {
    pub version: String,
    /// The commit the daemon was built from.
    #[serde(default)]
    pub commit: String,
    /// Upper bounds in seconds of every latency histogram's buckets: `counts[i]` holds the
    /// observations at most `bounds[i]` above the previous bound, the last count those above
    /// every bound.
    #[serde(default)]
    pub histogram_bounds_seconds: Vec<f64>,
    pub snapshots_committed: usize,
    pub snapshots_active: usize,
    pub snapshots_view: usize,
    /// Remote layers mounted now, from the mounter's own table.
    pub lazy_layers_mounted: u64,
    /// Remote layers mounted by a Prepare since start (not the remounts at start-up).
    #[serde(default)]
    pub lazy_mounts_total: u64,
    pub lazy_fallbacks: std::collections::BTreeMap<String, u64>,
    pub remount_failures: u64,
    /// Remote layers not mounted now (their start-up remount failed), with why.
    #[serde(default)]
    pub unmounted_layers: Vec<UnmountedLayerStatus>,
    pub cache_bytes: u64,
    pub cache_capacity: u64,
    pub cache_blocks: u64,
    /// Blocks evicted to stay under the cache's cap since start.
    pub cache_evictions: u64,
    /// Blocks served but not cached since start because the cache's disk was full.
    #[serde(default)]
    pub cache_no_space: u64,
    /// Blocks stored again within a minute of their eviction since start.
    #[serde(default)]
    pub cache_refetched_after_eviction: u64,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_cache: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub fetch_errors: u64,
    pub fetches_in_flight: u64,
    pub verify_failures: u64,
    /// Of `bytes_from_registry`, those background fills of partly read blocks fetched.
    #[serde(default)]
    pub bytes_filled: u64,
    /// Partly read blocks waiting for their fill, or being filled.
    #[serde(default)]
    pub fill_pending_blocks: u64,
    pub read_failures: u64,
    /// Block read latency by source (`cache`, `registry`, `peer`).
    #[serde(default)]
    pub fetch_latency: std::collections::BTreeMap<String, HistogramSnapshot>,
    /// FUSE read requests of lazily mounted layers, from arrival to reply.
    #[serde(default)]
    pub fuse_read_latency: HistogramSnapshot,
    /// Blobs served by mounted lazy layers.
    #[serde(default)]
    pub layers: Vec<LayerStatus>,
    /// Bytes read per blob by source, mounted now or not (the fetcher keeps the
    /// [most recent few thousand](shoal_fetcher::MAX_COUNTED_BLOBS)), by digest.
    #[serde(default)]
    pub layer_reads: Vec<LayerReads>,
    /// The peer network's counters, when `[peers]` is configured.
    #[serde(default)]
    pub peers: Option<PeerStats>,
    /// Lazy mounts kept across restarts of the daemon.
    #[serde(default)]
    pub handover: HandoverStatus,
    /// Images whose pull credentials the CRI proxy keeps for lazy reads (references only).
    #[serde(default)]
    pub pull_secrets: Vec<String>,
    /// Learned prefetch's counters since start.
    #[serde(default)]
    pub learn: LearnStats,
    /// What learned prefetch did for each layer blob mounted since start.
    #[serde(default)]
    pub learned: Vec<LearnedLayer>,
}

/// Learned prefetch of one layer blob.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Eq)]
pub struct LearnedLayer {
    pub digest: String,
    #[serde(flatten)]
    pub learning: LayerLearning,
}

/// What keeping lazy mounts across restarts did for this daemon.
#[derive(Debug, Serialize, serde::Deserialize, Default, Clone, PartialEq, Eq)]
pub struct HandoverStatus {
    /// Where FUSE connections wait between daemons; empty: nowhere, a stop ends every mount.
    pub store: String,
    /// Connections taken over from an earlier daemon at this one's start.
    pub carried: u64,
    /// Of those, on a kernel that could not resend the requests the earlier daemon had read
    /// and not answered (before Linux 6.9): those requests wait until their mount goes.
    pub resend_unsupported: u64,
    /// Requests the kernel resent to those connections: the earlier daemon had read them and
    /// not answered.
    #[serde(default)]
    pub resent: u64,
    /// Connections that could not be taken over or kept, with why.
    pub not_carried: Vec<NotCarried>,
}

#[derive(Debug, Serialize, serde::Deserialize, Default, Clone, PartialEq, Eq)]
pub struct NotCarried {
    pub mountpoint: String,
    pub reason: String,
}

/// A remote layer that is not mounted: containers cannot stack it until it is mounted again.
#[derive(Debug, Serialize, serde::Deserialize, Default, Clone, PartialEq, Eq)]
pub struct UnmountedLayerStatus {
    /// The snapshot's key (the layer's chainID).
    pub key: String,
    pub digest: String,
    pub reason: String,
}

/// One lazily mounted blob and how much of it the cache holds.
#[derive(Debug, Serialize, serde::Deserialize, Default, Clone)]
pub struct LayerStatus {
    pub digest: String,
    /// The registry repository the layer was mounted from.
    pub repository: String,
    pub size: u64,
    pub cached_bytes: u64,
    pub mounts: u32,
    /// Served over a connection an earlier daemon left.
    #[serde(default)]
    pub carried_over: bool,
    /// How an overlaybd blob's reads are verified: `per_block` (every block against the
    /// layer's block digest table) or `per_blob` (ZFile CRCs, and the whole blob's digest once
    /// complete); empty for other formats (eStargz: every chunk against the verified TOC).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub verified: String,
    /// Why only per blob.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub verified_why: String,
    /// Whether peers may send its blocks (overlaybd: with a table, or over mutual TLS).
    #[serde(default)]
    pub peers_allowed: bool,
}

/// The bytes of one blob served, by source, since the daemon started.
#[derive(Debug, Serialize, serde::Deserialize, Default, Clone, PartialEq, Eq)]
pub struct LayerReads {
    pub digest: String,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_cache: u64,
}

impl Observed {
    pub fn status(&self) -> DaemonStatus {
        let counts = self.snapshotter.counts().unwrap_or_default();
        let lazy = self.snapshotter.lazy_stats();
        let fetch = self.fetcher.stats();
        let cache = self.fetcher.cache().usage();
        let reader = self.reader.stats();
        DaemonStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            commit: crate::version::COMMIT.into(),
            histogram_bounds_seconds: shoal_fetcher::BUCKET_BOUNDS.to_vec(),
            snapshots_committed: counts.committed,
            snapshots_active: counts.active,
            snapshots_view: counts.view,
            lazy_layers_mounted: self.snapshotter.mounted_layers() as u64,
            lazy_mounts_total: lazy.mounted(),
            lazy_fallbacks: lazy
                .fallbacks()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            remount_failures: lazy.remount_failures(),
            unmounted_layers: self
                .snapshotter
                .unmounted_layers()
                .into_iter()
                .map(|layer| UnmountedLayerStatus {
                    key: layer.key,
                    digest: layer.layer,
                    reason: layer.reason,
                })
                .collect(),
            cache_bytes: cache.bytes,
            cache_capacity: cache.capacity,
            cache_blocks: cache.blocks,
            cache_evictions: cache.evictions,
            cache_no_space: cache.no_space_failures,
            cache_refetched_after_eviction: cache.refetched_after_eviction,
            bytes_from_registry: fetch.bytes_from_registry,
            bytes_from_peers: fetch.bytes_from_peers,
            bytes_from_cache: fetch.bytes_from_cache,
            cache_hits: fetch.cache_hits,
            cache_misses: fetch.cache_misses,
            fetch_errors: fetch.fetch_errors,
            fetches_in_flight: fetch.in_flight,
            verify_failures: fetch.verify_failures,
            bytes_filled: fetch.bytes_filled,
            fill_pending_blocks: self.fetcher.fill_pending(),
            read_failures: reader.read_failures,
            fetch_latency: [
                ("cache", Source::Cache),
                ("registry", Source::Registry),
                ("peer", Source::Peer),
            ]
            .into_iter()
            .map(|(name, source)| {
                let latency = self.fetcher.latency().of(source).snapshot();
                (name.to_string(), latency)
            })
            .collect(),
            fuse_read_latency: self.reader.read_latency(),
            layers: self
                .snapshotter
                .mounted_blobs()
                .into_iter()
                .map(|blob| LayerStatus {
                    verified: match &blob.verification {
                        Some(Verification::PerBlock) => "per_block".into(),
                        Some(Verification::PerBlob { .. }) => "per_blob".into(),
                        None => String::new(),
                    },
                    verified_why: match &blob.verification {
                        Some(Verification::PerBlob { why, .. }) => why.clone(),
                        _ => String::new(),
                    },
                    peers_allowed: self.fetcher.peers().is_some()
                        && match &blob.verification {
                            Some(Verification::PerBlob { peers, .. }) => *peers,
                            _ => true,
                        },
                    cached_bytes: self.fetcher.cache().cached_bytes(&blob.digest),
                    digest: blob.digest.to_string(),
                    repository: blob.repository.clone(),
                    size: blob.size,
                    mounts: blob.mounts,
                    carried_over: blob.carried_over,
                })
                .collect(),
            layer_reads: {
                let mut reads: Vec<LayerReads> = self
                    .fetcher
                    .blob_stats()
                    .into_iter()
                    .map(|(digest, bytes)| LayerReads {
                        digest: digest.to_string(),
                        bytes_from_registry: bytes.from_registry,
                        bytes_from_peers: bytes.from_peers,
                        bytes_from_cache: bytes.from_cache,
                    })
                    .collect();
                reads.sort_by(|a, b| a.digest.cmp(&b.digest));
                reads
            },
            peers: self.fetcher.peers().map(|peers| peers.stats()),
            handover: {
                let report = self.snapshotter.handover();
                HandoverStatus {
                    store: report.store,
                    carried: report.carried,
                    resend_unsupported: report.resend_unsupported,
                    resent: report.resent,
                    not_carried: report
                        .not_carried
                        .into_iter()
                        .map(|(path, reason)| NotCarried {
                            mountpoint: path.display().to_string(),
                            reason,
                        })
                        .collect(),
                }
            },
            pull_secrets: self.fetcher.pull_secrets().images(),
            learn: self.learning.stats(),
            learned: self
                .learning
                .layers()
                .into_iter()
                .map(|(digest, learning)| LearnedLayer { digest, learning })
                .collect(),
        }
    }
}
