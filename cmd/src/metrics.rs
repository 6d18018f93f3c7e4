//! The observability endpoint: `/metrics` in Prometheus text format and `/status` as JSON
//! (what `shoal status` shows). GET only, one small response per connection.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;
use shoal_fetcher::peer::PeerStats;
use shoal_fetcher::Fetcher;
use shoal_fuse::layer::ChunkReader;
use shoal_snapshotter::ShoalSnapshotter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// What the endpoint reports on.
#[derive(Clone)]
pub struct Observed {
    pub snapshotter: ShoalSnapshotter,
    pub fetcher: Fetcher,
    pub reader: Arc<ChunkReader>,
}

/// The daemon's own view, served at `/status`.
#[derive(Debug, Serialize, serde::Deserialize, Default)]
pub struct DaemonStatus {
    pub version: String,
    pub snapshots_committed: usize,
    pub snapshots_active: usize,
    pub snapshots_view: usize,
    pub lazy_layers_mounted: u64,
    pub lazy_fallbacks: std::collections::BTreeMap<String, u64>,
    pub remount_failures: u64,
    pub cache_bytes: u64,
    pub cache_capacity: u64,
    pub cache_blocks: u64,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_cache: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub fetch_errors: u64,
    pub fetches_in_flight: u64,
    pub verify_failures: u64,
    pub read_failures: u64,
    /// The peer network's counters, when `[peers]` is configured.
    #[serde(default)]
    pub peers: Option<PeerStats>,
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
            snapshots_committed: counts.committed,
            snapshots_active: counts.active,
            snapshots_view: counts.view,
            lazy_layers_mounted: lazy.mounted(),
            lazy_fallbacks: lazy
                .fallbacks()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            remount_failures: lazy.remount_failures(),
            cache_bytes: cache.bytes,
            cache_capacity: cache.capacity,
            cache_blocks: cache.blocks,
            bytes_from_registry: fetch.bytes_from_registry,
            bytes_from_peers: fetch.bytes_from_peers,
            bytes_from_cache: fetch.bytes_from_cache,
            cache_hits: fetch.cache_hits,
            cache_misses: fetch.cache_misses,
            fetch_errors: fetch.fetch_errors,
            fetches_in_flight: fetch.in_flight,
            verify_failures: reader.verify_failures,
            read_failures: reader.read_failures,
            peers: self.fetcher.peers().map(|peers| peers.stats()),
        }
    }
}

/// Prometheus text exposition of `status`.
pub fn render(status: &DaemonStatus) -> String {
    let mut out = String::new();
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
        "lazy_layers_mounted_total",
        "counter",
        "Layers mounted lazily.",
        &[("", status.lazy_layers_mounted)],
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
        "Chunks that failed their digest (then refetched).",
        &[("", status.verify_failures)],
    );
    metric(
        "read_failures_total",
        "counter",
        "FUSE reads answered with EIO.",
        &[("", status.read_failures)],
    );
    if let Some(peers) = &status.peers {
        render_peers(&mut out, peers);
    }
    out
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
    let one = |value: u64| [(String::new(), value)];
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
        "fallbacks_total",
        "counter",
        "Blocks that waited on peers, then came from the registry.",
        &one(peers.fallbacks),
    );
    metric(
        "busy_answers_total",
        "counter",
        "Busy answers received from peers.",
        &one(peers.busy_answers),
    );
    metric(
        "verify_failures_total",
        "counter",
        "Blocks from peers that failed verification.",
        &one(peers.verify_failures),
    );
    metric(
        "uploaded_bytes_total",
        "counter",
        "Block bytes served to peers.",
        &one(peers.bytes_uploaded),
    );
    metric(
        "uploads_refused_total",
        "counter",
        "Block requests from peers answered busy.",
        &one(peers.uploads_refused),
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

/// Serves the endpoint until the runtime shuts down.
pub async fn serve(address: SocketAddr, observed: Observed) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("bind metrics address {address}"))?;
    info!(%address, "serving /metrics and /status");
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, peer)) = listener.accept().await else {
                continue;
            };
            let observed = observed.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut request),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let line = String::from_utf8_lossy(&request[..n]);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                debug!(%peer, path, "metrics request");
                let (code, kind, body) = match path {
                    "/metrics" => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        render(&observed.status()),
                    ),
                    "/status" => (
                        "200 OK",
                        "application/json",
                        serde_json::to_string(&observed.status()).unwrap_or_default(),
                    ),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let head = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut status = DaemonStatus {
            bytes_from_registry: 42,
            ..Default::default()
        };
        status.lazy_fallbacks.insert("not_lazy_format".into(), 2);
        let text = render(&status);
        assert!(text.contains("shoal_read_bytes_total{source=\"registry\"} 42"));
        assert!(text.contains("shoal_lazy_fallbacks_total{reason=\"not_lazy_format\"} 2"));
        assert!(text.contains("# TYPE shoal_cache_bytes gauge"));
    }
}
