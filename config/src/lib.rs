//! Configuration layer of Shoal: TOML text in, a validated [`Config`] out.
//!
//! The file is parsed into [`raw::RawConfig`], whose every section rejects unknown keys, and then
//! resolved into [`Config`], where each value has been checked and every default filled in from
//! one place ([`defaults`]). Errors ([`ConfigError`]) name the offending field by its TOML path,
//! e.g. `cache.block_size`.
//!
//! Architecture Invariant: no other crate reads TOML or knows a default; they receive `Config`.

mod bytesize;
mod cri_proxy;
pub mod defaults;
mod error;
mod exposure;
mod log_filter;
mod peers;
mod preheat;
pub mod raw;
mod resolve;
mod salvage;

pub use bytesize::ByteSize;
pub use cri_proxy::CriProxyConfig;
pub use error::ConfigError;
pub use peers::{PeerTls, PeersConfig};
pub use preheat::{PreheatAuth, PreheatConfig};
pub use resolve::{
    CacheConfig, Config, CredentialProvidersConfig, FetchConfig, HandoverConfig, HandoverStore,
    HostConfig, LogConfig, LogFormat, MetricsConfig, RegistryConfig,
};
