//! The crate's error type: one variant per operation that failed, with the context to act on it.

use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::BlockKey;
use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("parse digest `{text}`: {reason}")]
    ParseDigest { text: String, reason: String },

    #[error("parse image reference `{text}`: {reason}")]
    ParseReference { text: String, reason: String },

    #[error("build http client for {host}")]
    BuildClient {
        host: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("read ca file {}", path.display())]
    ReadCaFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parse ca file {}", path.display())]
    ParseCaFile {
        path: PathBuf,
        #[source]
        source: reqwest::Error,
    },

    #[error("read peer tls file {}", path.display())]
    ReadPeerTls {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parse peer tls file {}: {reason}", path.display())]
    ParsePeerTls { path: PathBuf, reason: String },

    #[error("bind peer listener {address}")]
    BindPeerListener {
        address: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("read docker config {}", path.display())]
    ReadDockerConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parse docker config {}: {reason}", path.display())]
    ParseDockerConfig { path: PathBuf, reason: String },

    #[error("fetch manifest {url}: {cause}")]
    FetchManifest { url: String, cause: HttpFailure },

    #[error("fetch blob {url}: {cause}")]
    FetchBlob { url: String, cause: HttpFailure },

    #[error("fetch range {}..{} of {url}: {cause}", range.start, range.end)]
    FetchRange {
        url: String,
        range: Range<u64>,
        cause: HttpFailure,
    },

    #[error("check blob {url}: {cause}")]
    CheckBlob { url: String, cause: HttpFailure },

    #[error("push blob {digest} via {url}: {cause}")]
    PushBlob {
        url: String,
        digest: Digest,
        cause: HttpFailure,
    },

    #[error("read blob {digest} to upload from {}", path.display())]
    ReadUpload {
        digest: Digest,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("push manifest {url}: {cause}")]
    PushManifest { url: String, cause: HttpFailure },

    #[error("fetch token {url}: {cause}")]
    FetchToken { url: String, cause: HttpFailure },

    #[error("verify {url}: expected {expected}, got {actual}")]
    VerifyDigest {
        url: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("read range {}..{} of blob {digest}: blob has {size} bytes", range.start, range.end)]
    RangeOutOfBounds {
        digest: Digest,
        range: Range<u64>,
        size: u64,
    },

    #[error("blob {digest} of {size} bytes exceeds the limit of {limit} bytes")]
    BlobTooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },

    #[error("open cache {}", path.display())]
    OpenCache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("create cache files of blob {digest} in {}", path.display())]
    CreateCacheFiles {
        digest: Digest,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cache blob {digest}: cached as {cached} bytes, asked as {asked}")]
    CacheBlobSize {
        digest: Digest,
        cached: u64,
        asked: u64,
    },

    #[error("cache block {block}: {len} bytes given, block holds {expected}")]
    CacheBlockLength {
        block: BlockKey,
        len: u64,
        expected: u64,
    },

    #[error("cache block {block}: no space left in {}", path.display())]
    CacheNoSpace { block: BlockKey, path: PathBuf },

    #[error("cache block {block}: every block is in use, none can be evicted")]
    CacheFull { block: BlockKey },

    #[error("write cache block {block} to {}", path.display())]
    WriteBlock {
        block: BlockKey,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("read cache block {block} from {}", path.display())]
    ReadBlock {
        block: BlockKey,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("persist cache bitmap {}", path.display())]
    PersistBitmap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("get credentials for {host} from credential helper `{helper}`: {reason}")]
    CredentialHelper {
        helper: String,
        host: String,
        reason: String,
    },

    #[error("save the shareable blocks to {}", path.display())]
    PersistShareable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("evict cache block {block} from {}", path.display())]
    EvictBlock {
        block: BlockKey,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cache task for block {block} did not finish: {reason}")]
    CacheTask { block: BlockKey, reason: String },

    /// The fetch a block's readers shared failed; every reader gets the same cause.
    #[error("fetch block {block}: {cause}")]
    JoinFetch {
        block: BlockKey,
        cause: Arc<FetchError>,
    },

    #[error("fetch block {block}: the fetching task ended without an answer")]
    AbandonedFetch { block: BlockKey },

    /// Bytes failed their check twice: as first read, and fetched again from the registry.
    #[error("check bytes {range:?} of {blob}")]
    CheckRead {
        blob: Digest,
        range: Range<u64>,
        #[source]
        source: crate::trust::Rejection,
    },

    /// A layer's index failed its check twice: as first read, and from the registry.
    #[error("check the index of {blob}")]
    CheckIndex {
        blob: Digest,
        #[source]
        source: crate::trust::Rejection,
    },

    #[error(
        "decoded bytes have sha256 {}, expected {}",
        hex::encode(actual),
        hex::encode(expected)
    )]
    Sha256Mismatch {
        expected: [u8; 32],
        actual: [u8; 32],
    },

    #[error("blob {blob} has digest {actual}")]
    BlobDigestMismatch { blob: Digest, actual: String },

    /// An in-memory store ([`crate::trust::MemoryBlobs`]) has no tier holding the bytes.
    #[error("no tier holds bytes {range:?} of {blob}")]
    NoTier { blob: Digest, range: Range<u64> },
}

impl FetchError {
    /// Whether the cache's disk is full (as opposed to broken): storing a block failed with
    /// ENOSPC.
    pub fn is_no_space(&self) -> bool {
        let enospc = |source: &io::Error| source.raw_os_error() == Some(nix::libc::ENOSPC);
        match self {
            FetchError::CacheNoSpace { .. } => true,
            FetchError::CreateCacheFiles { source, .. }
            | FetchError::PersistBitmap { source, .. } => enospc(source),
            _ => false,
        }
    }
}

/// Why one HTTP operation failed, carried by the `Fetch*` variants of [`FetchError`].
#[derive(Debug, thiserror::Error)]
pub enum HttpFailure {
    #[error("status {status}")]
    Status { status: u16 },

    #[error("credentials rejected (status 401)")]
    Unauthorized,

    /// The registry asked for credentials (401) and none were sent, for none were found.
    #[error(
        "the registry wants credentials and none were found for {} (looked in {})",
        searched.host,
        searched.looked_in
    )]
    NoCredentials { searched: Box<CredentialSearch> },

    /// An `https` request was answered in plain HTTP: the host needs `plain_http`.
    #[error(
        "{host} answered plain HTTP to an HTTPS request: set `plain_http = true` under \
         `[registry.hosts.\"{host}\"]` in the daemon's config (`shoal rpull --plain-http` for the \
         pull alone)"
    )]
    PlainHttp { host: String },

    #[error("unsupported authentication challenge `{header}`")]
    Challenge { header: String },

    #[error("timed out after {after:?}")]
    TimedOut { after: Duration },

    /// The whole request's deadline ran out with retries left; `last` is the last attempt's.
    #[error(
        "gave up after {attempts} attempts, at the {deadline:?} deadline of the request: {last}"
    )]
    Deadline {
        deadline: Duration,
        attempts: u32,
        last: Box<HttpFailure>,
    },

    // The chain goes in the message, not `source`: `cause` is printed inline by its parent.
    #[error("{}", with_causes(error))]
    Transport { error: reqwest::Error },

    #[error("redirect: {reason}")]
    Redirect { reason: String },

    #[error("response has {actual} bytes, expected {expected}")]
    Length { expected: u64, actual: u64 },

    #[error("unexpected content-range `{header}`")]
    ContentRange { header: String },

    #[error("response exceeds {limit} bytes")]
    TooLarge { limit: u64 },

    #[error("malformed response: {reason}")]
    Malformed { reason: String },
}

/// Where credentials for a host were looked for, when none were found (boxed in
/// [`HttpFailure::NoCredentials`], which would otherwise make every error larger).
#[derive(Debug)]
pub struct CredentialSearch {
    pub host: String,
    pub looked_in: String,
}

impl HttpFailure {
    /// Whether another attempt may succeed: transport trouble, timeouts, 408, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            HttpFailure::Status { status } => {
                matches!(status, 408 | 429) || (500..600).contains(status)
            }
            HttpFailure::TimedOut { .. } | HttpFailure::Transport { .. } => true,
            _ => false,
        }
    }
}

/// `err`'s message followed by its causes', each once, `: `-separated: what a log line or a
/// fallback label shows of an error whose causes are `#[source]`s. A cause an older message
/// already spells out is not repeated.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}
