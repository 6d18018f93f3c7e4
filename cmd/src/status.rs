//! `shoal status`: is the daemon answering, what does it hold, how much disk does it use.

mod learned;

use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use shoal_snapshotter::api::snapshots::v1::{ListSnapshotsRequest, UsageRequest};

use crate::client;

/// What `shoal status` reports.
#[derive(Debug, Default, serde::Serialize)]
pub struct Status {
    pub socket: String,
    pub reachable: bool,
    pub snapshots: usize,
    pub committed: usize,
    pub active: usize,
    pub view: usize,
    /// Sum of every snapshot's own usage, in bytes.
    pub disk_bytes: i64,
    pub inodes: i64,
    pub error: Option<String>,
    /// Whether the config names the daemon's metrics listener, where `daemon` comes from.
    pub metrics_configured: bool,
    /// The daemon's own counters, when its metrics endpoint is configured.
    pub daemon: Option<crate::metrics::DaemonStatus>,
}

pub async fn gather(socket: &Path, metrics: Option<std::net::SocketAddr>) -> Status {
    let mut status = Status {
        socket: socket.display().to_string(),
        metrics_configured: metrics.is_some(),
        ..Status::default()
    };
    if let Err(err) = fill(socket, &mut status).await {
        status.error = Some(format!("{err:#}"));
    }
    if let Some(address) = metrics {
        match fetch_daemon_status(address).await {
            Ok(daemon) => status.daemon = Some(daemon),
            Err(err) => status.error = Some(format!("{err:#}")),
        }
    }
    status
}

async fn fetch_daemon_status(
    address: std::net::SocketAddr,
) -> anyhow::Result<crate::metrics::DaemonStatus> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /status HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .context("metrics endpoint timed out")?
        .with_context(|| format!("query {address}/status"))?;
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| &response[at + 4..])
        .context("malformed /status response")?;
    serde_json::from_slice(body).context("decode /status")
}

async fn fill(socket: &Path, status: &mut Status) -> anyhow::Result<()> {
    let mut client = client::connect(socket).await?;
    let mut stream = client
        .list(ListSnapshotsRequest::default())
        .await
        .context("list snapshots")?
        .into_inner();
    status.reachable = true;
    let mut keys = Vec::new();
    while let Some(page) = stream.next().await {
        for info in page.context("list snapshots")?.info {
            match info.kind {
                // containerd.services.snapshots.v1.Kind: 1 view, 2 active, 3 committed.
                1 => status.view += 1,
                2 => status.active += 1,
                3 => status.committed += 1,
                _ => {}
            }
            keys.push(info.name);
        }
    }
    status.snapshots = keys.len();
    for key in keys {
        // A snapshot removed between List and Usage is simply not counted.
        if let Ok(usage) = client
            .usage(UsageRequest {
                snapshotter: String::new(),
                key,
            })
            .await
        {
            let usage = usage.into_inner();
            status.disk_bytes += usage.size;
            status.inodes += usage.inodes;
        }
    }
    Ok(())
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.reachable {
            writeln!(f, "daemon:     unreachable at {}", self.socket)?;
            if let Some(err) = &self.error {
                writeln!(f, "error:      {err}")?;
            }
            return Ok(());
        }
        writeln!(f, "daemon:     running at {}", self.socket)?;
        writeln!(
            f,
            "snapshots:  {} ({} committed, {} active, {} view)",
            self.snapshots, self.committed, self.active, self.view
        )?;
        writeln!(
            f,
            "disk use:   {} in {} inodes",
            shoal_config::ByteSize(self.disk_bytes.max(0) as u64),
            self.inodes
        )?;
        if let Some(d) = &self.daemon {
            let fallbacks: Vec<String> = d
                .lazy_fallbacks
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(
                f,
                "lazy:       {} layers mounted, fallbacks: {}",
                d.lazy_layers_mounted,
                if fallbacks.is_empty() {
                    "none".into()
                } else {
                    fallbacks.join(", ")
                }
            )?;
            for (i, fix) in crate::misconfiguration::fixes(&d.lazy_fallbacks)
                .iter()
                .enumerate()
            {
                let head = if i == 0 {
                    "fix:        "
                } else {
                    "            "
                };
                writeln!(f, "{head}{fix}")?;
            }
            if !d.pull_secrets.is_empty() {
                writeln!(
                    f,
                    "pull secrets: {} image(s) pulled through the CRI proxy: {}",
                    d.pull_secrets.len(),
                    d.pull_secrets.join(", ")
                )?;
            }
            writeln!(
                f,
                "cache:      {} of {} ({} blocks, {} evicted){}",
                shoal_config::ByteSize(d.cache_bytes),
                shoal_config::ByteSize(d.cache_capacity),
                d.cache_blocks,
                d.cache_evictions,
                [
                    (d.cache_no_space > 0)
                        .then(|| format!(", {} not stored: disk full", d.cache_no_space)),
                    (d.cache_refetched_after_eviction > 0).then(|| format!(
                        ", {} fetched again soon after eviction: the cache is smaller than \
                         what is read",
                        d.cache_refetched_after_eviction
                    )),
                ]
                .into_iter()
                .flatten()
                .collect::<String>()
            )?;
            writeln!(
                f,
                "bytes:      {} from registry, {} from peers, {} from cache",
                shoal_config::ByteSize(d.bytes_from_registry),
                shoal_config::ByteSize(d.bytes_from_peers),
                shoal_config::ByteSize(d.bytes_from_cache)
            )?;
            writeln!(
                f,
                "integrity:  {} verification failures, {} failed reads",
                d.verify_failures, d.read_failures
            )?;
            if let Some(peers) = &d.peers {
                write_peers(f, peers)?;
            }
            if let Some(reads) = d.fetch_latency.get("registry").filter(|h| h.count() > 0) {
                writeln!(
                    f,
                    "fetches:    {} from registry, {:.1} ms mean, {} in flight",
                    reads.count(),
                    reads.sum_nanos as f64 / reads.count() as f64 / 1e6,
                    d.fetches_in_flight
                )?;
            }
            write_handover(f, &d.handover)?;
            for (i, layer) in d.unmounted_layers.iter().enumerate() {
                writeln!(
                    f,
                    "{}{} ({}) NOT MOUNTED: {}",
                    if i == 0 {
                        "unmounted:  "
                    } else {
                        "            "
                    },
                    layer.digest,
                    layer.key,
                    layer.reason
                )?;
            }
            if d.layers.is_empty() {
                writeln!(f, "layers:     none mounted lazily")?;
            }
            for (i, layer) in d.layers.iter().enumerate() {
                let percent = if layer.size == 0 {
                    100.0
                } else {
                    layer.cached_bytes as f64 * 100.0 / layer.size as f64
                };
                writeln!(
                    f,
                    "{}{} ({})  {} of {} cached ({percent:.0}%), {} mount(s){}",
                    if i == 0 {
                        "layers:     "
                    } else {
                        "            "
                    },
                    layer.digest,
                    layer.repository,
                    shoal_config::ByteSize(layer.cached_bytes),
                    shoal_config::ByteSize(layer.size),
                    layer.mounts,
                    if layer.carried_over {
                        ", carried over from an earlier daemon"
                    } else {
                        ""
                    }
                )?;
                let peers = match layer.peers_allowed {
                    true => "blocks from peers too",
                    false => "blocks from the cache and the registry only",
                };
                match layer.verified.as_str() {
                    "per_block" => writeln!(
                        f,
                        "              verified per block (block digest table); {peers}"
                    )?,
                    "per_blob" => writeln!(
                        f,
                        "              verified per blob only ({}): CRC per block, the blob's \
                         digest once complete; {peers}",
                        layer.verified_why
                    )?,
                    _ => {}
                }
                if let Some(learned) = d.learned.iter().find(|l| l.digest == layer.digest) {
                    writeln!(f, "              {}", learned::line(learned))?;
                }
                if let Some(reads) = d.layer_reads.iter().find(|r| r.digest == layer.digest) {
                    writeln!(
                        f,
                        "              read {} from registry, {} from peers, {} from cache",
                        shoal_config::ByteSize(reads.bytes_from_registry),
                        shoal_config::ByteSize(reads.bytes_from_peers),
                        shoal_config::ByteSize(reads.bytes_from_cache)
                    )?;
                }
            }
        }
        if !self.metrics_configured {
            writeln!(
                f,
                "details:    none: the config names no metrics listener, where lazy mounts, \
                 cache, bytes and peers are read from; set `[metrics] address = \
                 \"127.0.0.1:9464\"` in the daemon's config (and pass it with --config)"
            )?;
        }
        if let Some(err) = &self.error {
            writeln!(f, "warning:    {err}")?;
        }
        Ok(())
    }
}

/// The handover lines of `shoal status`: where connections wait between daemons, and what
/// this daemon took over.
fn write_handover(
    f: &mut std::fmt::Formatter<'_>,
    handover: &crate::metrics::HandoverStatus,
) -> std::fmt::Result {
    if handover.store.is_empty() {
        return writeln!(
            f,
            "handover:   off (a stop of the daemon ends every lazy mount)"
        );
    }
    write!(
        f,
        "handover:   {}; {} connection(s) carried over at start",
        handover.store, handover.carried
    )?;
    if handover.resent > 0 {
        write!(f, ", {} request(s) resent to them", handover.resent)?;
    }
    if handover.resend_unsupported > 0 {
        write!(
            f,
            ", {} on a kernel without FUSE_NOTIFY_RESEND (reads in flight at the stop wait until unmounted)",
            handover.resend_unsupported
        )?;
    }
    writeln!(f)?;
    for not in &handover.not_carried {
        writeln!(
            f,
            "            NOT CARRIED {}: {}",
            not.mountpoint, not.reason
        )?;
    }
    Ok(())
}

/// The peer lines of `shoal status`: membership, traffic both ways, and each peer's record.
fn write_peers(
    f: &mut std::fmt::Formatter<'_>,
    peers: &shoal_fetcher::peer::PeerStats,
) -> std::fmt::Result {
    writeln!(
        f,
        "peers:      {} of {} live, {} uploaded ({} refused busy, {} under way), {} lookups answered",
        peers.members_live,
        peers.members_known,
        shoal_config::ByteSize(peers.bytes_uploaded),
        peers.uploads_refused,
        peers.uploads_in_flight,
        peers.lookups_answered
    )?;
    writeln!(
        f,
        "            {} lookups ({} failed), {} fallbacks to the registry, {} busy answers, {} bad blocks",
        peers.lookups, peers.lookup_failures, peers.fallbacks, peers.busy_answers, peers.verify_failures
    )?;
    writeln!(
        f,
        "            index {} blobs in {} ({} forgotten), {} requests refused as not from members",
        peers.index_blobs,
        shoal_config::ByteSize(peers.index_bytes),
        peers.index_evictions,
        peers.requests_refused
    )?;
    writeln!(
        f,
        "            private repositories: {} requests refused without proof of pull access, {} proofs checked with the registry",
        peers.private_refused, peers.pull_checks
    )?;
    if peers.insecure {
        writeln!(
            f,
            "            INSECURE: plain HTTP on a non-loopback address (peers.insecure)"
        )?;
    }
    for (peer, stats) in &peers.per_peer {
        let mean_ms = if stats.requests == 0 {
            0.0
        } else {
            stats.latency_micros as f64 / stats.requests as f64 / 1000.0
        };
        writeln!(
            f,
            "            {peer}: {} in {} requests ({mean_ms:.1} ms mean), {} errors, {} busy, {} bad",
            shoal_config::ByteSize(stats.bytes),
            stats.requests,
            stats.errors,
            stats.busy,
            stats.verify_failures
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{DaemonStatus, LayerReads, LayerStatus, UnmountedLayerStatus};

    #[test]
    fn names_the_fix_for_layers_that_came_without_annotations() {
        let status = Status {
            reachable: true,
            daemon: Some(DaemonStatus {
                lazy_fallbacks: [("missing_labels".to_owned(), 3)].into(),
                pull_secrets: vec!["reg.example/team/app:1".into()],
                ..DaemonStatus::default()
            }),
            ..Status::default()
        };
        let text = status.to_string();
        assert!(
            text.contains("fix:        3 layer(s) arrived without the annotations")
                && text.contains("enable_remote_snapshot_annotations"),
            "{text}"
        );
        assert!(
            text.contains(
                "pull secrets: 1 image(s) pulled through the CRI proxy: reg.example/team/app:1"
            ),
            "{text}"
        );
    }

    #[test]
    fn shows_each_mounted_layer_with_its_cached_share() {
        let status = Status {
            reachable: true,
            daemon: Some(DaemonStatus {
                cache_bytes: 3 << 20,
                cache_capacity: 10 << 30,
                layers: vec![LayerStatus {
                    digest: "sha256:aa".into(),
                    repository: "reg.example/team/app".into(),
                    size: 4 << 20,
                    cached_bytes: 1 << 20,
                    mounts: 2,
                    carried_over: true,
                    verified: "per_blob".into(),
                    verified_why: "no block digest table (made by another converter)".into(),
                    peers_allowed: false,
                }],
                handover: crate::metrics::HandoverStatus {
                    store: "fd holder at /run/shoal/fdholder.sock".into(),
                    carried: 2,
                    resend_unsupported: 0,
                    resent: 3,
                    not_carried: vec![crate::metrics::NotCarried {
                        mountpoint: "/var/lib/shoal/snapshots/9/fs".into(),
                        reason: "its mount is gone".into(),
                    }],
                },
                layer_reads: vec![LayerReads {
                    digest: "sha256:aa".into(),
                    bytes_from_registry: 1 << 20,
                    bytes_from_peers: 0,
                    bytes_from_cache: 2 << 20,
                }],
                ..DaemonStatus::default()
            }),
            ..Status::default()
        };
        let text = status.to_string();
        assert!(text.contains("sha256:aa (reg.example/team/app)"), "{text}");
        assert!(
            text.contains("(25%), 2 mount(s), carried over from an earlier daemon"),
            "{text}"
        );
        assert!(
            text.contains(
                "handover:   fd holder at /run/shoal/fdholder.sock; 2 connection(s) carried over \
                 at start, 3 request(s) resent to them"
            ),
            "{text}"
        );
        assert!(
            text.contains("NOT CARRIED /var/lib/shoal/snapshots/9/fs: its mount is gone"),
            "{text}"
        );
        assert!(
            text.contains("read 1.0 MiB from registry, 0 B from peers, 2.0 MiB from cache"),
            "{text}"
        );
        assert!(text.contains("cache:      3.0 MiB of 10.0 GiB"), "{text}");
        assert!(
            text.contains(
                "verified per blob only (no block digest table (made by another converter)): \
                 CRC per block, the blob's digest once complete; blocks from the cache and the \
                 registry only"
            ),
            "{text}"
        );

        let idle = Status {
            reachable: true,
            daemon: Some(DaemonStatus::default()),
            ..Status::default()
        };
        assert!(idle.to_string().contains("none mounted lazily"));
        assert!(!idle.to_string().contains("NOT MOUNTED"));
        assert!(idle.to_string().contains("handover:   off"));
    }

    #[test]
    fn shows_layers_that_are_not_mounted_and_why() {
        let status = Status {
            reachable: true,
            daemon: Some(DaemonStatus {
                unmounted_layers: vec![UnmountedLayerStatus {
                    key: "sha256:chain".into(),
                    digest: "sha256:bb".into(),
                    reason: "its persisted index was refused: bad TOC".into(),
                }],
                ..DaemonStatus::default()
            }),
            ..Status::default()
        };
        let text = status.to_string();
        assert!(
            text.contains("unmounted:  sha256:bb (sha256:chain) NOT MOUNTED: its persisted index"),
            "{text}"
        );
    }
}
