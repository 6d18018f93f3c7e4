//! The `[peers]` table resolved: membership, placement, limits and the listener's security
//! (mutual TLS, or `insecure` asked for in so many words; see [`crate::exposure`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::bytesize::ByteSize;
use crate::defaults;
use crate::error::ConfigError;
use crate::raw::RawPeers;
use crate::resolve::{absolute, byte_size, positive};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeersConfig {
    /// The peer listener (HTTP/2: health, index and block requests).
    pub listen: std::net::SocketAddr,
    /// `host:port` of every node, this one included (it finds itself by probing).
    pub static_peers: Vec<String>,
    /// `name:port` resolving to every node (a Kubernetes headless Service).
    pub dns: Option<String>,
    /// How often `static` names and `dns` are resolved again.
    pub refresh: Duration,
    /// How often every member's `/health` is probed; one missed probe marks it dead.
    pub probe_interval: Duration,
    /// How long one probe may take; three missed in a row and a member leaves.
    pub probe_timeout: Duration,
    /// Index owners per blob (rendezvous hashing over live members).
    pub owners: usize,
    /// Bytes per second this node uploads to its peers, in all.
    pub upload_rate: ByteSize,
    /// Uploads served at once; beyond that requesters are told "busy".
    pub max_uploads: usize,
    /// How long one peer request may take before its blocks are asked elsewhere; also how
    /// long a fetch grant lasts unless its holder renews it.
    pub latency_budget: Duration,
    /// How long an owner believes an announcement without hearing it again.
    pub lease: Duration,
    /// Bytes the owner index may take in memory; the least recently announced blobs are
    /// forgotten first.
    pub index_memory: ByteSize,
    /// A listener without TLS on a non-loopback address, serving members by their address
    /// alone: asked for in so many words (`insecure = true`), never a default.
    pub insecure: bool,
    pub tls: Option<PeerTls>,
}

/// Mutual TLS between peers: both sides present a certificate signed by `ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub(crate) fn resolve_peers(raw: RawPeers) -> Result<PeersConfig, ConfigError> {
    let listen_text = raw
        .listen
        .unwrap_or_else(|| defaults::PEERS_LISTEN.to_owned());
    let listen = listen_text.parse().map_err(|_| {
        ConfigError::invalid(
            "peers.listen",
            format!("`{listen_text}` is not an address such as 0.0.0.0:7420"),
        )
    })?;
    for entry in &raw.static_peers {
        check_host_port("peers.static", entry)?;
    }
    if let Some(dns) = &raw.dns {
        check_host_port("peers.dns", dns)?;
    }
    if raw.static_peers.is_empty() && raw.dns.is_none() {
        return Err(ConfigError::invalid(
            "peers.static",
            "name at least one peer in `peers.static` or a `peers.dns` name",
        ));
    }
    let millis = |field: &str, value: Option<i64>, default: u64, max: i64| {
        positive(field, value, default as i64, max).map(|ms| Duration::from_millis(ms as u64))
    };
    let upload_rate = byte_size(
        "peers.upload_rate",
        raw.upload_rate,
        defaults::PEERS_UPLOAD_RATE,
    )?;
    if upload_rate.0 < 4096 {
        return Err(ConfigError::invalid(
            "peers.upload_rate",
            "must be at least 4KiB per second",
        ));
    }
    let tls = match raw.tls {
        None => None,
        Some(tls) => {
            let path = |key: &str, value: Option<PathBuf>| {
                let field = format!("peers.tls.{key}");
                let value = value.ok_or_else(|| {
                    ConfigError::invalid(&field, "mutual TLS needs `ca`, `cert` and `key`")
                })?;
                absolute(&field, value)
            };
            Some(PeerTls {
                ca: path("ca", tls.ca)?,
                cert: path("cert", tls.cert)?,
                key: path("key", tls.key)?,
            })
        }
    };
    let index_memory = byte_size(
        "peers.index_memory",
        raw.index_memory,
        defaults::PEERS_INDEX_MEMORY,
    )?;
    if index_memory.0 < 1 << 20 {
        return Err(ConfigError::invalid(
            "peers.index_memory",
            "must be at least 1MiB",
        ));
    }
    let insecure = raw.insecure.unwrap_or(false);
    let peers = PeersConfig {
        listen,
        static_peers: raw.static_peers,
        dns: raw.dns,
        refresh: Duration::from_secs(positive(
            "peers.refresh_secs",
            raw.refresh_secs,
            defaults::PEERS_REFRESH_SECS as i64,
            3600,
        )? as u64),
        probe_interval: millis(
            "peers.probe_interval_ms",
            raw.probe_interval_ms,
            defaults::PEERS_PROBE_INTERVAL_MS,
            60_000,
        )?,
        probe_timeout: millis(
            "peers.probe_timeout_ms",
            raw.probe_timeout_ms,
            defaults::PEERS_PROBE_TIMEOUT_MS,
            60_000,
        )?,
        owners: positive(
            "peers.owners",
            raw.owners,
            defaults::PEERS_OWNERS as i64,
            16,
        )? as usize,
        upload_rate,
        max_uploads: positive(
            "peers.max_uploads",
            raw.max_uploads,
            defaults::PEERS_MAX_UPLOADS as i64,
            4096,
        )? as usize,
        latency_budget: millis(
            "peers.latency_budget_ms",
            raw.latency_budget_ms,
            defaults::PEERS_LATENCY_BUDGET_MS,
            60_000,
        )?,
        lease: Duration::from_secs(positive(
            "peers.lease_secs",
            raw.lease_secs,
            defaults::PEERS_LEASE_SECS as i64,
            86_400,
        )? as u64),
        index_memory,
        insecure,
        tls,
    };
    crate::exposure::check(&peers)?;
    Ok(peers)
}

/// `host:port` with a numeric port, as peers are written.
fn check_host_port(field: &str, entry: &str) -> Result<(), ConfigError> {
    let valid = entry.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if valid {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("`{entry}` must be `host:port`"),
        ))
    }
}
