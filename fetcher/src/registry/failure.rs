//! [`HttpFailure`]: why one HTTP exchange with a registry failed, whatever the operation.
//!
//! It travels inline in the message of the operation's error ([`RegistryError`] and
//! [`PushError`] variants carry it as `cause`), for the operation names what was asked and
//! this says what the registry did: read together they are one sentence.
//!
//! [`RegistryError`]: super::RegistryError
//! [`PushError`]: super::PushError

use std::time::Duration;

use crate::causes::with_causes;

/// Why one HTTP operation failed.
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
