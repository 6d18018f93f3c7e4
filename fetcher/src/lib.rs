//! Data-plane layer of Shoal: blob bytes by range, from the node-local chunk cache, peer
//! nodes or the registry.
//!
//! - [`BlobRead`] is the front door the layers above see: each read says what its bytes must
//!   match ([`Expect`]), and [`trust`] decides where they may come from, checks them, and
//!   refetches, blames or shares. [`Fetcher`] implements it over the real tiers: it serves
//!   `(blob, range)` from the [`ChunkCache`] or fetches what is missing, coalesced,
//!   single-flight, bounded: whole blocks where peers may be asked, else just the bytes
//!   read, whose blocks a background fill then completes; [`MemoryBlobs`] implements it in memory, for tests.
//! - [`RegistryClient`] speaks the OCI distribution API: manifests, small blobs, byte ranges,
//!   with bearer/basic auth, mirrors, retries and credential-safe redirects; it also pushes
//!   blobs ([`BlobContent`]) and manifests.
//! - [`ChunkCache`] keeps aligned blocks ([`BlockKey`], cut as [`BlockGeometry`] says) on
//!   disk, durable before visible, bounded by LRU eviction with pinning; and, in memory
//!   only, the written parts of blocks not yet whole.
//! - [`peer::Peers`] asks other nodes for blocks before the registry (rendezvous-placed
//!   index owners, announcements, HTTP/2 block requests), and serves them this node's.
//! - [`Digest`] (and its `Copy` bytes, [`RawDigest`]), [`ImageRef`] and [`BlobRef`] name
//!   what is fetched.
//! - Errors: each part has its own ([`CacheError`], [`RegistryError`] with [`HttpFailure`],
//!   [`PushError`], [`CredentialsError`], [`PeerError`], [`ParseError`]); [`FetchError`], the
//!   boundary's, joins them with the read path's own failures.
//!
//! Nothing here knows about FUSE or containerd, and nothing builds a runtime: the async API
//! runs on the caller's tokio runtime, and the `read_cached` paths are synchronous.

mod cache;
mod causes;
mod completion;
mod digest;
mod error;
mod fetcher;
mod flight;
mod latency;
mod parse_error;
pub mod peer;
mod pieces;
pub mod private;
mod reference;
pub mod referrer;
mod registry;
mod runs;
mod stats;
pub mod traces;
pub mod trust;

pub use cache::{
    BlockGeometry, BlockKey, CacheError, CacheUsage, ChunkCache, MAX_CACHED_BLOB_BYTES,
};
pub use causes::with_causes;
pub use completion::{read_most, Completion};
pub use digest::{Digest, RawDigest};
pub use error::FetchError;
pub use fetcher::Fetcher;
pub use latency::{FetchLatency, Histogram, HistogramSnapshot, BUCKET_BOUNDS};
pub use parse_error::ParseError;
pub use peer::PeerError;
pub use reference::{BlobRef, ImageRef};
pub use registry::{
    image_key, BlobContent, Credential, CredentialProviders, CredentialSources, Credentials,
    CredentialsError, HttpFailure, LentAuthorization, Manifest, PullSecrets, PushError, Pushed,
    PushedManifest, RegistryClient, RegistryError, RetryPolicy, MANIFEST_MEDIA_TYPES,
    MAX_WHOLE_BLOB_BYTES,
};
pub use stats::{BlobBytes, FetchStats, Source, MAX_COUNTED_BLOBS};
pub use traces::{FoundTrace, TraceBook, TraceOrigin, TraceStore, TraceStoreError};
pub use trust::{
    Anchor, Anchored, BlobRead, Checked, Decode, Expect, MemoryBlobs, Rejection, UnitDigests,
    Verification,
};
