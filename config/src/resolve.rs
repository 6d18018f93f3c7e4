//! Resolution of [`RawConfig`] into a validated [`Config`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bytesize::ByteSize;
use crate::cri_proxy::{self, CriProxyConfig};
use crate::defaults;
use crate::error::ConfigError;
use crate::peers::{resolve_peers, PeersConfig};
use crate::preheat::{self, PreheatConfig};
use crate::raw::{RawByteSize, RawConfig, RawHandover, RawHost};

/// Shoal's validated configuration. Build it with [`Config::load`] or [`Config::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory for snapshots, metadata and the chunk cache.
    pub root: PathBuf,
    /// Unix socket containerd connects to.
    pub socket: PathBuf,
    pub log: LogConfig,
    pub cache: CacheConfig,
    pub fetch: FetchConfig,
    pub registry: RegistryConfig,
    pub metrics: MetricsConfig,
    /// Peer-to-peer chunk sharing; `None` (no `[peers]` section) keeps every read local or
    /// from the registry.
    pub peers: Option<PeersConfig>,
    pub handover: HandoverConfig,
    /// The CRI image-service proxy that records kubelet's pull secrets; `None` (no
    /// `[cri_proxy]` section): no proxy.
    pub cri_proxy: Option<CriProxyConfig>,
    /// The preheat API Harbor (as a Dragonfly provider) and `shoal preheat` call; `None`
    /// (no `[preheat]` section): no listener.
    pub preheat: Option<PreheatConfig>,
}

/// Keeping lazy mounts serving across restarts of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverConfig {
    /// Each FUSE connection is kept in the fd holder, so a stop or crash of the daemon does
    /// not break running containers; off: a stop ends every lazy mount.
    pub enabled: bool,
    /// Where the fd holder listens; the daemon starts one there if none answers.
    pub holder_socket: PathBuf,
    /// With no daemon attached for this long, the holder lets every connection go.
    pub orphan_after: Duration,
    /// Which process keeps the connections.
    pub store: HandoverStore,
}

/// Which process keeps the lazy mounts' connections between daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverStore {
    /// systemd's fd store when systemd offers the service one (`$FDSTORE`, systemd 254 and
    /// later, with `$NOTIFY_SOCKET`); the fd holder otherwise.
    Auto,
    /// Shoal's fd holder, `shoal-fdholder`.
    Holder,
    /// systemd's fd store, even where systemd does not say its size (before 254).
    Systemd,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where `/metrics` (Prometheus) and `/status` (JSON) are served; none when unset.
    pub address: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter directive, e.g. `info` or `shoal_fetcher=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Upper bound of compressed bytes kept on disk.
    pub capacity: ByteSize,
    /// Cache unit: an aligned block of a blob. A power of two.
    pub block_size: ByteSize,
    /// Upper bound of decompressed chunk bytes kept in memory.
    pub memory: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Fetches from the network in flight at once, over all layers.
    pub max_concurrent: usize,
    /// Fetch the files before a layer's `.prefetch.landmark` right after it is mounted.
    pub prefetch: bool,
    /// Fetch whole layers in the background after mounting them.
    pub background: bool,
    /// Bytes per second the background fetch may use.
    pub background_rate: ByteSize,
    /// Complete a layer in the background, as fast as the link goes, once reads have brought
    /// in this share of it (1..=100); `None`: only with `background`.
    pub complete_after_percent: Option<u8>,
    /// Learned prefetch: record the chunks each image's first start reads from each layer,
    /// and fetch them right at mount on later starts (here or on peers).
    pub learn: bool,
    /// A recording ends once no chunk was read for the first time for this long.
    pub learn_settle: Duration,
    /// A recording ends once it names this many compressed bytes.
    pub learn_max_bytes: ByteSize,
    /// Push each recorded trace to the image's registry as an OCI referrer artifact.
    pub learn_push: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Deadline of one attempt: connect, headers and body.
    pub timeout: Duration,
    pub retries: u32,
    /// Deadline of one whole request: every attempt, backoff and mirror together.
    pub deadline: Duration,
    /// Docker `config.json` whose `auths` supply credentials.
    pub docker_config: PathBuf,
    /// kubelet's credential provider plugins, asked after the docker config.
    pub credential_providers: Option<CredentialProvidersConfig>,
    /// Per-host settings, keyed by `host[:port]`.
    pub hosts: BTreeMap<String, HostConfig>,
}

/// kubelet's `--image-credential-provider-config` and `--image-credential-provider-bin-dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialProvidersConfig {
    pub config: PathBuf,
    pub bin_dir: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub plain_http: bool,
    pub insecure_skip_verify: bool,
    pub ca: Option<PathBuf>,
    /// Hosts tried, in order, before this one.
    pub mirrors: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_raw(RawConfig::default()).expect("defaults are valid")
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            source: Box::new(source),
        })?;
        Config::from_raw(raw)
    }

    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let root = absolute("root", raw.root.unwrap_or_else(|| defaults::ROOT.into()))?;
        let socket = absolute(
            "socket",
            raw.socket.unwrap_or_else(|| defaults::SOCKET.into()),
        )?;
        if socket.as_os_str().len() >= 108 {
            return Err(ConfigError::invalid(
                "socket",
                "a unix socket path must be shorter than 108 bytes",
            ));
        }

        let log = raw.log.unwrap_or_default();
        let level = log.level.unwrap_or_else(|| defaults::LOG_LEVEL.into());
        crate::log_filter::check(&level)
            .map_err(|reason| ConfigError::invalid("log.level", reason))?;
        let format = match log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "log.format",
                    format!("`{other}` is neither `text` nor `json`"),
                ))
            }
        };

        let cache = raw.cache.unwrap_or_default();
        let block_size = byte_size(
            "cache.block_size",
            cache.block_size,
            defaults::CACHE_BLOCK_SIZE,
        )?;
        if !block_size.0.is_power_of_two() || !(4096..=64 << 20).contains(&block_size.0) {
            return Err(ConfigError::invalid(
                "cache.block_size",
                "must be a power of two between 4KiB and 64MiB",
            ));
        }
        let capacity = byte_size("cache.capacity", cache.capacity, defaults::CACHE_CAPACITY)?;
        if capacity.0 < block_size.0 {
            return Err(ConfigError::invalid(
                "cache.capacity",
                "must hold at least one block (cache.block_size)",
            ));
        }
        let memory = byte_size("cache.memory", cache.memory, defaults::CACHE_MEMORY)?;

        let fetch = raw.fetch.unwrap_or_default();
        let max_concurrent = positive(
            "fetch.max_concurrent",
            fetch.max_concurrent,
            defaults::FETCH_MAX_CONCURRENT as i64,
            4096,
        )? as usize;
        let background_rate = byte_size(
            "fetch.background_rate",
            fetch.background_rate,
            defaults::FETCH_BACKGROUND_RATE,
        )?;
        if background_rate.0 == 0 {
            return Err(ConfigError::invalid(
                "fetch.background_rate",
                "must be greater than zero",
            ));
        }

        let complete_after_percent = match fetch
            .complete_after_percent
            .unwrap_or(defaults::FETCH_COMPLETE_AFTER_PERCENT.into())
        {
            0 => None,
            percent @ 1..=100 => Some(percent as u8),
            other => {
                return Err(ConfigError::invalid(
                    "fetch.complete_after_percent",
                    format!("{other} is outside 0..=100 (0: never)"),
                ))
            }
        };

        let learn_settle = positive(
            "fetch.learn_settle_secs",
            fetch.learn_settle_secs,
            defaults::FETCH_LEARN_SETTLE_SECS as i64,
            3600,
        )?;
        let learn_max_bytes = byte_size(
            "fetch.learn_max_bytes",
            fetch.learn_max_bytes,
            defaults::FETCH_LEARN_MAX_BYTES,
        )?;
        if learn_max_bytes.0 == 0 {
            return Err(ConfigError::invalid(
                "fetch.learn_max_bytes",
                "must be greater than zero",
            ));
        }

        let registry = raw.registry.unwrap_or_default();
        let timeout = positive(
            "registry.timeout_secs",
            registry.timeout_secs,
            defaults::REGISTRY_TIMEOUT_SECS as i64,
            3600,
        )?;
        let retries = match registry.retries {
            None => defaults::REGISTRY_RETRIES,
            Some(n) if (0..=20).contains(&n) => n as u32,
            Some(n) => {
                return Err(ConfigError::invalid(
                    "registry.retries",
                    format!("{n} is outside 0..=20"),
                ))
            }
        };
        let deadline = positive(
            "registry.deadline_secs",
            registry.deadline_secs,
            defaults::REGISTRY_DEADLINE_SECS as i64,
            3600,
        )?;
        let mut hosts = BTreeMap::new();
        for (name, host) in registry.hosts {
            let resolved = resolve_host(&name, host)?;
            hosts.insert(name, resolved);
        }

        let metrics = MetricsConfig {
            address: match raw.metrics.unwrap_or_default().address {
                None => None,
                Some(text) => Some(text.parse().map_err(|_| {
                    ConfigError::invalid(
                        "metrics.address",
                        format!("`{text}` is not an address such as 127.0.0.1:9464"),
                    )
                })?),
            },
        };

        Ok(Config {
            root,
            socket,
            log: LogConfig { level, format },
            cache: CacheConfig {
                capacity,
                block_size,
                memory,
            },
            fetch: FetchConfig {
                max_concurrent,
                prefetch: fetch.prefetch.unwrap_or(defaults::FETCH_PREFETCH),
                background: fetch.background.unwrap_or(defaults::FETCH_BACKGROUND),
                background_rate,
                complete_after_percent,
                learn: fetch.learn.unwrap_or(defaults::FETCH_LEARN),
                learn_settle: Duration::from_secs(learn_settle as u64),
                learn_max_bytes,
                learn_push: fetch.learn_push.unwrap_or(defaults::FETCH_LEARN_PUSH),
            },
            registry: RegistryConfig {
                timeout: Duration::from_secs(timeout as u64),
                retries,
                deadline: Duration::from_secs(deadline as u64),
                docker_config: registry
                    .docker_config
                    .unwrap_or_else(|| defaults::DOCKER_CONFIG.into()),
                credential_providers: match (
                    registry.credential_provider_config,
                    registry.credential_provider_bin_dir,
                ) {
                    (None, None) => None,
                    (Some(config), Some(bin_dir)) => Some(CredentialProvidersConfig {
                        config: absolute("registry.credential_provider_config", config)?,
                        bin_dir: absolute("registry.credential_provider_bin_dir", bin_dir)?,
                    }),
                    (None, Some(_)) | (Some(_), None) => {
                        return Err(ConfigError::invalid(
                            "registry.credential_provider_config",
                            "set both `credential_provider_config` and \
                             `credential_provider_bin_dir`, as kubelet takes both",
                        ))
                    }
                },
                hosts,
            },
            metrics,
            peers: raw.peers.map(resolve_peers).transpose()?,
            handover: resolve_handover(raw.handover.unwrap_or_default())?,
            cri_proxy: raw.cri_proxy.map(cri_proxy::resolve).transpose()?,
            preheat: raw.preheat.map(preheat::resolve).transpose()?,
        })
    }

    /// Settings for `host`, or the defaults when the file names none.
    pub fn host(&self, host: &str) -> HostConfig {
        self.registry.hosts.get(host).cloned().unwrap_or_default()
    }
}

fn resolve_host(name: &str, raw: RawHost) -> Result<HostConfig, ConfigError> {
    let field = |key: &str| format!("registry.hosts.\"{name}\".{key}");
    if name.is_empty() || name.contains('/') || name.contains("://") {
        return Err(ConfigError::invalid(
            format!("registry.hosts.\"{name}\""),
            "a host is written as `name[:port]`, without scheme or path",
        ));
    }
    for mirror in &raw.mirrors {
        if mirror.is_empty() || mirror.contains("://") {
            return Err(ConfigError::invalid(
                field("mirrors"),
                format!("`{mirror}` must be `name[:port]`, without scheme"),
            ));
        }
    }
    if let Some(ca) = &raw.ca {
        if !ca.is_absolute() {
            return Err(ConfigError::invalid(
                field("ca"),
                "must be an absolute path",
            ));
        }
    }
    Ok(HostConfig {
        plain_http: raw.plain_http.unwrap_or(false),
        insecure_skip_verify: raw.insecure_skip_verify.unwrap_or(false),
        ca: raw.ca,
        mirrors: raw.mirrors,
    })
}

fn resolve_handover(raw: RawHandover) -> Result<HandoverConfig, ConfigError> {
    let orphan_after = positive(
        "handover.orphan_after_secs",
        raw.orphan_after_secs,
        defaults::HANDOVER_ORPHAN_AFTER_SECS as i64,
        30 * 24 * 3600,
    )?;
    Ok(HandoverConfig {
        enabled: raw.enabled.unwrap_or(defaults::HANDOVER_ENABLED),
        holder_socket: raw
            .holder_socket
            .unwrap_or_else(|| defaults::HANDOVER_HOLDER_SOCKET.into()),
        orphan_after: Duration::from_secs(orphan_after as u64),
        store: match raw.store.as_deref().unwrap_or(defaults::HANDOVER_STORE) {
            "auto" => HandoverStore::Auto,
            "holder" => HandoverStore::Holder,
            "systemd" => HandoverStore::Systemd,
            other => {
                return Err(ConfigError::invalid(
                    "handover.store",
                    format!("`{other}` is not one of auto, holder, systemd"),
                ))
            }
        },
    })
}

pub(crate) fn absolute(field: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(ConfigError::invalid(
            field,
            format!("`{}` must be an absolute path", path.display()),
        ))
    }
}

pub(crate) fn byte_size(
    field: &str,
    raw: Option<RawByteSize>,
    default: u64,
) -> Result<ByteSize, ConfigError> {
    match raw {
        None => Ok(ByteSize(default)),
        Some(RawByteSize::Bytes(n)) => Ok(ByteSize(n)),
        Some(RawByteSize::Text(text)) => {
            ByteSize::parse(&text).map_err(|reason| ConfigError::invalid(field, reason))
        }
    }
}

pub(crate) fn positive(
    field: &str,
    raw: Option<i64>,
    default: i64,
    max: i64,
) -> Result<i64, ConfigError> {
    let value = raw.unwrap_or(default);
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{value} is outside 1..={max}"),
        ))
    }
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
