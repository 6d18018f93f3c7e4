//! The registry client's errors: [`RegistryError`] for reads and client set-up,
//! [`PushError`] for pushes, [`CredentialsError`] for finding credentials. Each variant is
//! an operation that failed; an HTTP exchange's [`HttpFailure`] goes inline as its `cause`.

use std::io;
use std::ops::Range;
use std::path::PathBuf;

use super::failure::HttpFailure;
use crate::digest::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
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

    #[error("fetch manifest {url}: {cause}")]
    FetchManifest { url: String, cause: HttpFailure },

    #[error("list referrers {url}: {cause}")]
    FetchReferrers { url: String, cause: HttpFailure },

    #[error("fetch blob {url}: {cause}")]
    FetchBlob { url: String, cause: HttpFailure },

    #[error("fetch range {}..{} of {url}: {cause}", range.start, range.end)]
    FetchRange {
        url: String,
        range: Range<u64>,
        cause: HttpFailure,
    },

    #[error("fetch token {url}: {cause}")]
    FetchToken { url: String, cause: HttpFailure },

    #[error("check a peer's pull access at {url}: {cause}")]
    CheckPullAccess { url: String, cause: HttpFailure },

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

    /// The docker config or a credential helper failed, while building the client or while
    /// answering a registry's challenge.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
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

    /// Authenticating the push failed: a token fetch, or finding credentials.
    #[error(transparent)]
    Authenticate(#[from] RegistryError),
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("read docker config {}", path.display())]
    ReadDockerConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parse docker config {}: {reason}", path.display())]
    ParseDockerConfig { path: PathBuf, reason: String },

    #[error("read credential provider config {}", path.display())]
    ReadProviderConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parse credential provider config {}: {reason}", path.display())]
    ParseProviderConfig { path: PathBuf, reason: String },

    #[error("get credentials for {image} from credential provider `{provider}`: {reason}")]
    CredentialProvider {
        provider: String,
        image: String,
        reason: String,
    },

    #[error("get credentials for {host} from credential helper `{helper}`: {reason}")]
    CredentialHelper {
        helper: String,
        host: String,
        reason: String,
    },
}
