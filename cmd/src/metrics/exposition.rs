//! The Prometheus text exposition of a [`DaemonStatus`] (format 0.0.4).

use std::fmt::Write as _;

use shoal_fetcher::peer::PeerStats;
use shoal_fetcher::HistogramSnapshot;

use super::status::{DaemonStatus, LayerStatus};
#[cfg(test)]
use super::status::{LayerReads, UnmountedLayerStatus};

/// Samples with owned labels, borrowed as the exposition's `metric` takes them.
fn labelled(samples: &[(String, u64)]) -> Vec<(&str, u64)> {
    samples.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}

/// Prometheus text exposition of `status`.
pub fn render(status: &DaemonStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP shoal_build_info The daemon's version and commit."
    );
    let _ = writeln!(out, "# TYPE shoal_build_info gauge");
    let _ = writeln!(
        out,
        "shoal_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        label_value(&status.version),
        label_value(&status.commit)
    );
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP shoal_{name} {help}");
        let _ = writeln!(out, "# TYPE shoal_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "shoal_{name}{labels} {value}");
        }
    };
    metric(
        "snapshots",
        "gauge",
        "Snapshots by kind.",
        &[
            ("{kind=\"committed\"}", status.snapshots_committed as u64),
            ("{kind=\"active\"}", status.snapshots_active as u64),
            ("{kind=\"view\"}", status.snapshots_view as u64),
        ],
    );
    metric(
        "lazy_layers_mounted",
        "gauge",
        "Remote layers mounted now, every format's.",
        &[("", status.lazy_layers_mounted)],
    );
    metric(
        "lazy_layers_mounted_total",
        "counter",
        "Remote layers mounted by a Prepare since start (remounts at start-up not counted).",
        &[("", status.lazy_mounts_total)],
    );
    let fallbacks: Vec<(String, u64)> = status
        .lazy_fallbacks
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n))
        .collect();
    let fallbacks: Vec<(&str, u64)> = fallbacks.iter().map(|(l, n)| (l.as_str(), *n)).collect();
    metric(
        "lazy_fallbacks_total",
        "counter",
        "Layers downloaded instead of mounted lazily, by reason.",
        &fallbacks,
    );
    metric(
        "remount_failures_total",
        "counter",
        "Remote layers that could not be mounted again at start.",
        &[("", status.remount_failures)],
    );
    metric(
        "handover_connections_carried_total",
        "counter",
        "FUSE connections taken over from an earlier daemon at start.",
        &[("", status.handover.carried)],
    );
    metric(
        "handover_connections_not_carried_total",
        "counter",
        "FUSE connections that could not be taken over or kept for the next daemon.",
        &[("", status.handover.not_carried.len() as u64)],
    );
    metric(
        "handover_resend_unsupported_total",
        "counter",
        "Connections taken over on a kernel that cannot resend unanswered requests.",
        &[("", status.handover.resend_unsupported)],
    );
    metric(
        "handover_requests_resent_total",
        "counter",
        "Requests the kernel resent to connections taken over: read and not answered before.",
        &[("", status.handover.resent)],
    );
    metric(
        "remote_layers_unmounted",
        "gauge",
        "Remote layers not mounted now; each is mounted from the registry before use.",
        &[("", status.unmounted_layers.len() as u64)],
    );
    metric(
        "read_bytes_total",
        "counter",
        "Compressed blob bytes read, by source.",
        &[
            ("{source=\"registry\"}", status.bytes_from_registry),
            ("{source=\"peer\"}", status.bytes_from_peers),
            ("{source=\"cache\"}", status.bytes_from_cache),
        ],
    );
    metric(
        "cache_hits_total",
        "counter",
        "Cache blocks found.",
        &[("", status.cache_hits)],
    );
    metric(
        "cache_misses_total",
        "counter",
        "Cache blocks fetched.",
        &[("", status.cache_misses)],
    );
    metric(
        "cache_bytes",
        "gauge",
        "Bytes held by the chunk cache.",
        &[("", status.cache_bytes)],
    );
    metric(
        "cache_capacity_bytes",
        "gauge",
        "The chunk cache's cap.",
        &[("", status.cache_capacity)],
    );
    metric(
        "cache_evictions_total",
        "counter",
        "Cache blocks evicted to stay under the cap.",
        &[("", status.cache_evictions)],
    );
    metric(
        "cache_no_space_total",
        "counter",
        "Blocks served but not cached because the cache's disk was full.",
        &[("", status.cache_no_space)],
    );
    metric(
        "cache_refetched_after_eviction_total",
        "counter",
        "Blocks stored again within a minute of their eviction: the cache is smaller than the working set.",
        &[("", status.cache_refetched_after_eviction)],
    );
    metric(
        "fetch_errors_total",
        "counter",
        "Remote fetches that failed after retries.",
        &[("", status.fetch_errors)],
    );
    metric(
        "fetches_in_flight",
        "gauge",
        "Remote fetches under way.",
        &[("", status.fetches_in_flight)],
    );
    metric(
        "verify_failures_total",
        "counter",
        "Reads whose bytes failed their check (then refetched from the registry).",
        &[("", status.verify_failures)],
    );
    metric(
        "fill_bytes_total",
        "counter",
        "Registry bytes fetched in the background to complete blocks reads left partial.",
        &[("", status.bytes_filled)],
    );
    metric(
        "fill_pending_blocks",
        "gauge",
        "Partly read blocks waiting for their background fill, or being filled.",
        &[("", status.fill_pending_blocks)],
    );
    metric(
        "read_failures_total",
        "counter",
        "FUSE reads answered with EIO.",
        &[("", status.read_failures)],
    );
    let layer_samples = |value: fn(&LayerStatus) -> u64| -> Vec<(String, u64)> {
        status
            .layers
            .iter()
            .map(|l| (format!("{{digest=\"{}\"}}", l.digest), value(l)))
            .collect()
    };
    let sizes = layer_samples(|l| l.size);
    let cached = layer_samples(|l| l.cached_bytes);
    metric(
        "layer_size_bytes",
        "gauge",
        "Compressed size of each lazily mounted blob.",
        &labelled(&sizes),
    );
    metric(
        "layer_cached_bytes",
        "gauge",
        "Bytes of each lazily mounted blob held by the chunk cache.",
        &labelled(&cached),
    );
    let overlaybd = status.layers.iter().filter(|l| !l.verified.is_empty());
    let per_block: Vec<(String, u64)> = overlaybd
        .map(|l| {
            (
                format!("{{digest=\"{}\"}}", l.digest),
                u64::from(l.verified == "per_block"),
            )
        })
        .collect();
    metric(
        "layer_verified_per_block",
        "gauge",
        "1 for an overlaybd blob whose blocks are each checked against its block digest table, 0 for one checked per blob only (CRCs, then its digest).",
        &labelled(&per_block),
    );
    let reads: Vec<(String, u64)> = status
        .layer_reads
        .iter()
        .flat_map(|l| {
            [
                ("registry", l.bytes_from_registry),
                ("peer", l.bytes_from_peers),
                ("cache", l.bytes_from_cache),
            ]
            .map(|(source, n)| {
                (
                    format!("{{digest=\"{}\",source=\"{source}\"}}", l.digest),
                    n,
                )
            })
        })
        .collect();
    metric(
        "layer_read_bytes_total",
        "counter",
        "Compressed bytes read of each blob, by source (the most recently read few thousand blobs).",
        &labelled(&reads),
    );
    let by_source: Vec<(String, &HistogramSnapshot)> = status
        .fetch_latency
        .iter()
        .map(|(source, h)| (format!("source=\"{source}\""), h))
        .collect();
    histogram(
        &mut out,
        "fetch_duration_seconds",
        "Block reads by source: cache reads, and remote range requests.",
        &by_source,
    );
    histogram(
        &mut out,
        "fuse_read_duration_seconds",
        "FUSE read requests of lazy layers, from request to reply.",
        &[(String::new(), &status.fuse_read_latency)],
    );
    super::learned::render(&mut out, &status.learn);
    if let Some(peers) = &status.peers {
        render_peers(&mut out, peers);
    }
    out
}

/// `value` escaped for a label: backslash, double quote and newline.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one Prometheus histogram with a series per label set (`label="value"`, or empty).
fn histogram(out: &mut String, name: &str, help: &str, series: &[(String, &HistogramSnapshot)]) {
    let _ = writeln!(out, "# HELP shoal_{name} {help}");
    let _ = writeln!(out, "# TYPE shoal_{name} histogram");
    for (labels, snapshot) in series {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in snapshot.cumulative() {
            let le = if bound.is_infinite() {
                "+Inf".to_string()
            } else {
                bound.to_string()
            };
            let _ = writeln!(
                out,
                "shoal_{name}_bucket{{{labels}{sep}le=\"{le}\"}} {count}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = snapshot.sum_nanos as f64 / 1e9;
        let _ = writeln!(out, "shoal_{name}_sum{braces} {sum}");
        let _ = writeln!(out, "shoal_{name}_count{braces} {}", snapshot.count());
    }
}

/// The peer network's counters, with per-peer series labelled `peer="addr"`.
fn render_peers(out: &mut String, peers: &PeerStats) {
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP shoal_peer_{name} {help}");
        let _ = writeln!(out, "# TYPE shoal_peer_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "shoal_peer_{name}{labels} {value}");
        }
    };
    metric(
        "members",
        "gauge",
        "Peers named by the configuration, by state.",
        &[
            ("{state=\"known\"}".into(), peers.members_known),
            ("{state=\"live\"}".into(), peers.members_live),
        ],
    );
    metric(
        "lookups_total",
        "counter",
        "Index lookups made, failed, and answered for others.",
        &[
            ("{outcome=\"made\"}".into(), peers.lookups),
            ("{outcome=\"failed\"}".into(), peers.lookup_failures),
            ("{outcome=\"answered\"}".into(), peers.lookups_answered),
        ],
    );
    metric(
        "index",
        "gauge",
        "The owner index (capped by peers.index_memory): blobs, and bytes they cost.",
        &[
            ("{unit=\"blobs\"}".into(), peers.index_blobs),
            ("{unit=\"bytes\"}".into(), peers.index_bytes),
        ],
    );
    metric(
        "insecure",
        "gauge",
        "1 when the listener is plain HTTP on a non-loopback address (peers.insecure).",
        &[(String::new(), u64::from(peers.insecure))],
    );
    // Counters without labels: one line of name, help and value each.
    let counters: [(&str, &str, u64); 13] = [
        (
            "private_refused_total",
            "Requests for blocks of a private repository refused (403) without a proof of pull access the registry accepts.",
            peers.private_refused,
        ),
        (
            "pull_checks_total",
            "Peers' proofs of pull access checked with one HEAD at the registry.",
            peers.pull_checks,
        ),
        (
            "index_evictions_total",
            "Blobs the owner index forgot to stay under peers.index_memory.",
            peers.index_evictions,
        ),
        (
            "requests_refused_total",
            "Peer requests refused (403) as not from a member.",
            peers.requests_refused,
        ),
        (
            "fallbacks_total",
            "Blocks that waited on peers, then came from the registry.",
            peers.fallbacks,
        ),
        (
            "busy_answers_total",
            "Busy answers received from peers.",
            peers.busy_answers,
        ),
        (
            "hedges_total",
            "Block requests also sent to a second holder because the first was slow.",
            peers.hedges,
        ),
        (
            "grant_renewals_total",
            "Renewals of this node's right to fetch blocks that other nodes wait for.",
            peers.renewals,
        ),
        (
            "owners_avoided_total",
            "Index owners avoided for naming holders that did not hold the blocks.",
            peers.owners_avoided,
        ),
        (
            "reshared_blocks_total",
            "Blocks received from peers, checked byte for byte, and shared on.",
            peers.blocks_reshared,
        ),
        (
            "verify_failures_total",
            "Blocks from peers that failed verification.",
            peers.verify_failures,
        ),
        (
            "uploaded_bytes_total",
            "Block bytes served to peers.",
            peers.bytes_uploaded,
        ),
        (
            "uploads_refused_total",
            "Block requests from peers answered busy.",
            peers.uploads_refused,
        ),
    ];
    for (name, help, value) in counters {
        metric(name, "counter", help, &[(String::new(), value)]);
    }
    metric(
        "uploads_in_flight",
        "gauge",
        "Block uploads to peers under way.",
        &[(String::new(), peers.uploads_in_flight)],
    );
    let per_peer = |value: fn(&shoal_fetcher::peer::PerPeer) -> u64| {
        peers
            .per_peer
            .iter()
            .map(|(peer, stats)| (format!("{{peer=\"{peer}\"}}"), value(stats)))
            .collect::<Vec<_>>()
    };
    metric(
        "received_bytes_total",
        "counter",
        "Block bytes received, by peer.",
        &per_peer(|p| p.bytes),
    );
    metric(
        "requests_total",
        "counter",
        "Block requests answered with bytes, by peer.",
        &per_peer(|p| p.requests),
    );
    metric(
        "request_micros_total",
        "counter",
        "Time spent on block requests answered with bytes, by peer, in microseconds.",
        &per_peer(|p| p.latency_micros),
    );
    metric(
        "errors_total",
        "counter",
        "Block requests that failed, by peer.",
        &per_peer(|p| p.errors),
    );
    metric(
        "peer_busy_total",
        "counter",
        "Busy answers, by peer.",
        &per_peer(|p| p.busy),
    );
    metric(
        "bad_blocks_total",
        "counter",
        "Blocks that failed verification, by the peer that sent them.",
        &per_peer(|p| p.verify_failures),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut status = DaemonStatus {
            bytes_from_registry: 42,
            cache_no_space: 7,
            ..Default::default()
        };
        status.lazy_fallbacks.insert("not_lazy_format".into(), 2);
        status
            .unmounted_layers
            .push(UnmountedLayerStatus::default());
        let text = render(&status);
        assert!(text.contains("shoal_cache_no_space_total 7"), "{text}");
        assert!(text.contains("shoal_remote_layers_unmounted 1"), "{text}");
        assert!(text.contains("shoal_read_bytes_total{source=\"registry\"} 42"));
        assert!(text.contains("shoal_lazy_fallbacks_total{reason=\"not_lazy_format\"} 2"));
        assert!(text.contains("# TYPE shoal_cache_bytes gauge"));
    }

    #[test]
    fn build_info_names_version_and_commit_escaped() {
        let status = DaemonStatus {
            version: "0.1.0".into(),
            commit: "abc\"1".into(),
            ..Default::default()
        };
        let text = render(&status);
        assert!(
            text.contains("shoal_build_info{version=\"0.1.0\",commit=\"abc\\\"1\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn renders_histograms_and_layers() {
        let mut status = DaemonStatus::default();
        let mut registry = HistogramSnapshot {
            counts: vec![0; shoal_fetcher::BUCKET_BOUNDS.len() + 1],
            sum_nanos: 1_500_000_000,
        };
        registry.counts[3] = 2;
        registry.counts[shoal_fetcher::BUCKET_BOUNDS.len()] = 1;
        status.fetch_latency.insert("registry".into(), registry);
        status.layers.push(LayerStatus {
            digest: "sha256:ab".into(),
            repository: "reg.example/team/app".into(),
            size: 100,
            cached_bytes: 40,
            mounts: 1,
            carried_over: false,
            verified: "per_block".into(),
            verified_why: String::new(),
            peers_allowed: true,
        });
        status.layer_reads.push(LayerReads {
            digest: "sha256:ab".into(),
            bytes_from_registry: 60,
            bytes_from_peers: 0,
            bytes_from_cache: 25,
        });
        let text = render(&status);
        assert!(text.contains("# TYPE shoal_layer_read_bytes_total counter"));
        assert!(text
            .contains("shoal_layer_read_bytes_total{digest=\"sha256:ab\",source=\"registry\"} 60"));
        assert!(
            text.contains("shoal_layer_read_bytes_total{digest=\"sha256:ab\",source=\"cache\"} 25")
        );
        assert!(text.contains("# TYPE shoal_fetch_duration_seconds histogram"));
        assert!(text
            .contains("shoal_fetch_duration_seconds_bucket{source=\"registry\",le=\"0.001\"} 2"));
        assert!(
            text.contains("shoal_fetch_duration_seconds_bucket{source=\"registry\",le=\"+Inf\"} 3")
        );
        assert!(text.contains("shoal_fetch_duration_seconds_sum{source=\"registry\"} 1.5"));
        assert!(text.contains("shoal_fetch_duration_seconds_count{source=\"registry\"} 3"));
        assert!(text.contains("shoal_fuse_read_duration_seconds_count 0"));
        assert!(text.contains("shoal_layer_cached_bytes{digest=\"sha256:ab\"} 40"));
        assert!(text.contains("shoal_layer_verified_per_block{digest=\"sha256:ab\"} 1"));
    }

    #[test]
    fn renders_peer_metrics_only_with_peers() {
        let mut status = DaemonStatus::default();
        assert!(!render(&status).contains("shoal_peer_"));
        let mut peers = PeerStats {
            members_known: 4,
            members_live: 3,
            fallbacks: 2,
            index_evictions: 7,
            index_bytes: 4096,
            insecure: true,
            ..Default::default()
        };
        peers.per_peer.insert(
            "10.0.0.2:7420".into(),
            shoal_fetcher::peer::PerPeer {
                bytes: 1024,
                verify_failures: 1,
                ..Default::default()
            },
        );
        status.peers = Some(peers);
        let text = render(&status);
        assert!(text.contains("shoal_peer_members{state=\"live\"} 3"));
        assert!(text.contains("shoal_peer_fallbacks_total 2"));
        assert!(text.contains("shoal_peer_index_evictions_total 7"));
        assert!(text.contains("shoal_peer_index{unit=\"bytes\"} 4096"));
        assert!(text.contains("shoal_peer_insecure 1"));
        assert!(text.contains("shoal_peer_received_bytes_total{peer=\"10.0.0.2:7420\"} 1024"));
        assert!(text.contains("shoal_peer_bad_blocks_total{peer=\"10.0.0.2:7420\"} 1"));
        // What `shoal status` reads back is what the daemon wrote.
        let json = serde_json::to_string(&status).unwrap();
        let back: DaemonStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back.peers, status.peers);
    }
}
