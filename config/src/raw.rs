//! The configuration file as written: every key optional, unknown keys rejected.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// A byte size as TOML allows it: an integer, or a string such as `"10GiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawByteSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub root: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub log: Option<RawLog>,
    pub cache: Option<RawCache>,
    pub fetch: Option<RawFetch>,
    pub registry: Option<RawRegistry>,
    pub metrics: Option<RawMetrics>,
    pub peers: Option<RawPeers>,
    pub handover: Option<RawHandover>,
    pub cri_proxy: Option<RawCriProxy>,
    pub preheat: Option<RawPreheat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCriProxy {
    pub listen: Option<PathBuf>,
    pub containerd: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPreheat {
    pub listen: Option<String>,
    pub token: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHandover {
    pub enabled: Option<bool>,
    pub holder_socket: Option<PathBuf>,
    pub orphan_after_secs: Option<i64>,
    pub store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub address: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub capacity: Option<RawByteSize>,
    pub block_size: Option<RawByteSize>,
    pub memory: Option<RawByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFetch {
    pub max_concurrent: Option<i64>,
    pub prefetch: Option<bool>,
    pub background: Option<bool>,
    pub background_rate: Option<RawByteSize>,
    pub complete_after_percent: Option<i64>,
    pub learn: Option<bool>,
    pub learn_settle_secs: Option<i64>,
    pub learn_max_bytes: Option<RawByteSize>,
    pub learn_push: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistry {
    pub timeout_secs: Option<i64>,
    pub retries: Option<i64>,
    pub deadline_secs: Option<i64>,
    pub docker_config: Option<PathBuf>,
    pub credential_provider_config: Option<PathBuf>,
    pub credential_provider_bin_dir: Option<PathBuf>,
    #[serde(default)]
    pub hosts: BTreeMap<String, RawHost>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub plain_http: Option<bool>,
    pub insecure_skip_verify: Option<bool>,
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub mirrors: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeers {
    pub listen: Option<String>,
    #[serde(rename = "static", default)]
    pub static_peers: Vec<String>,
    pub dns: Option<String>,
    pub refresh_secs: Option<i64>,
    pub probe_interval_ms: Option<i64>,
    pub probe_timeout_ms: Option<i64>,
    pub owners: Option<i64>,
    pub upload_rate: Option<RawByteSize>,
    pub max_uploads: Option<i64>,
    pub latency_budget_ms: Option<i64>,
    pub lease_secs: Option<i64>,
    pub index_memory: Option<RawByteSize>,
    pub insecure: Option<bool>,
    pub tls: Option<RawPeerTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeerTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}
