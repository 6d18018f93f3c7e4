//! [`FetchError`], the crate's boundary error: what a read, a fetch or a check failed at, or
//! the error of the part below that failed, passed through as it is.
//!
//! Each part has its own enum ([`CacheError`], [`RegistryError`], [`PushError`],
//! [`PeerError`], [`ParseError`]; credentials are the registry's, [`CredentialsError`]), and
//! returns it; the read path (the fetcher and the trust module) sits on top of them all, so
//! its own failures are variants here, next to the parts' errors it passes on.
//!
//! [`CredentialsError`]: crate::CredentialsError

use std::ops::Range;
use std::sync::Arc;

use crate::cache::{BlockKey, CacheError};
use crate::digest::Digest;
use crate::parse_error::ParseError;
use crate::peer::PeerError;
use crate::registry::{PushError, RegistryError};

/// The registry's and the cache's errors are boxed: each is larger than any of the read
/// path's own, and every `Result<_, FetchError>` would pay for the largest.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Parse(#[from] ParseError),

    #[error(transparent)]
    Registry(Box<RegistryError>),

    #[error(transparent)]
    Push(Box<PushError>),

    #[error(transparent)]
    Cache(Box<CacheError>),

    #[error(transparent)]
    Peer(#[from] PeerError),

    #[error("read range {}..{} of blob {digest}: blob has {size} bytes", range.start, range.end)]
    RangeOutOfBounds {
        digest: Digest,
        range: Range<u64>,
        size: u64,
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

    /// The fetch of a byte range its readers shared failed; every reader gets the same cause.
    #[error("fetch bytes {range:?}: {cause}")]
    JoinRangeFetch {
        range: Range<u64>,
        cause: Arc<FetchError>,
    },

    #[error("fetch bytes {range:?}: the fetching task ended without an answer")]
    AbandonedRangeFetch { range: Range<u64> },

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

    /// Digests in hex: the variant stays as small as the others.
    #[error("blob bytes {range:?} have sha256 {actual}, their block digest table says {expected}")]
    UnitDigestMismatch {
        range: Box<Range<u64>>,
        expected: String,
        actual: String,
    },

    #[error("unit {index} is outside the block digest table's {units} units")]
    UnitOutsideTable { index: u64, units: u64 },

    #[error("blob {blob} has digest {actual}")]
    BlobDigestMismatch { blob: Digest, actual: String },

    /// An in-memory store ([`crate::trust::MemoryBlobs`]) has no tier holding the bytes.
    #[error("no tier holds bytes {range:?} of {blob}")]
    NoTier { blob: Digest, range: Range<u64> },
}

impl From<RegistryError> for FetchError {
    fn from(error: RegistryError) -> FetchError {
        FetchError::Registry(Box::new(error))
    }
}

impl From<PushError> for FetchError {
    fn from(error: PushError) -> FetchError {
        FetchError::Push(Box::new(error))
    }
}

impl From<CacheError> for FetchError {
    fn from(error: CacheError) -> FetchError {
        FetchError::Cache(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_error_is_no_larger_than_before_the_split() {
        // 80 bytes when one enum held every part's variants: results on the read path must
        // not grow because the parts have their own enums now.
        assert!(std::mem::size_of::<FetchError>() <= 80);
    }
}
