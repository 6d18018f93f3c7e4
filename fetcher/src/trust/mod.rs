//! Trust: what the bytes of a read must match before anyone above the fetcher sees them, where
//! they may come from, and what happens when they do not match. Every such decision is made
//! here, over the [`Tiers`] below (cache, peers, registry), and nowhere else:
//!
//! - **allow**: peers are asked only for bytes checked against a digest that did not come from
//!   them ([`Expect::Sha256`]: an eStargz chunk from the verified TOC, the TOC against its
//!   layer annotation). Bytes whose check travels with them ([`Expect::Embedded`], a ZFile
//!   block's forgeable CRC32C) or that only a later whole-blob digest covers
//!   ([`Expect::BlobDigest`]) come from the cache and the registry alone.
//! - **verify**: a read's bytes are decoded and checked before they are returned, from the
//!   cache as from the network.
//! - **reject and refetch once**: bytes that fail are dropped from the cache, their sending
//!   peer is blamed, and they are fetched once more from the registry alone; if those fail
//!   too, the read fails (the FUSE layer answers EIO).
//! - **share**: bytes that passed a [`Expect::Sha256`] check make the peer-sent blocks under
//!   them shareable; nothing else does (blocks fetched from the registry are shareable as
//!   they land, see [`crate::peer`]).
//!
//! The layers above hand over what to check against and how to decode; they never report
//! back what they checked.

mod memory;
mod tiers;

#[cfg(test)]
mod tests;

use std::error::Error;
use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use tracing::warn;

use crate::error::FetchError;
use crate::reference::BlobRef;

pub use memory::MemoryBlobs;
pub use tiers::{Route, Tiers};

/// Why a decoder refused bytes: the format's own error, kept as the cause.
pub type Rejection = Box<dyn Error + Send + Sync>;

/// Step of a whole-blob digest check: bounded memory, large enough to coalesce.
const BLOB_CHECK_STEP: u64 = 4 << 20;

/// Turns the raw blob bytes of a read into what the reader presents (a gunzipped chunk, a
/// decompressed ZFile block), or refuses them. Pure: no I/O.
pub trait Decode: Sync {
    fn decode(&self, raw: &Bytes) -> Result<Bytes, Rejection>;
}

impl<F> Decode for F
where
    F: Fn(&Bytes) -> Result<Bytes, Rejection> + Sync,
{
    fn decode(&self, raw: &Bytes) -> Result<Bytes, Rejection> {
        self(raw)
    }
}

/// What the bytes of one read must be checked against.
#[derive(Clone, Copy)]
pub enum Expect<'a> {
    /// The sha256 of the decoded bytes is `digest`, taken from an index that was itself
    /// verified (never from whoever sends the bytes): peers may supply them.
    Sha256 {
        digest: [u8; 32],
        decode: &'a dyn Decode,
    },
    /// The decoder checks something that travels with the bytes (a ZFile block's CRC32C):
    /// anyone can forge it, so only the cache and the registry supply them.
    Embedded(&'a dyn Decode),
    /// Nothing per read: the raw bytes, covered only by a later check of the whole blob
    /// against its digest ([`BlobRead::verify_blob`]). Only the cache and the registry.
    BlobDigest,
}

/// How the reads of some bytes are checked, which decides where a prefetch may take them from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Every chunk against a digest from a verified index ([`Expect::Sha256`]).
    ChunkDigests,
    /// By a check that travels with the bytes ([`Expect::Embedded`]).
    Embedded,
    /// By the whole blob's digest alone ([`Expect::BlobDigest`]).
    BlobDigest,
}

impl Expect<'_> {
    pub fn checked(&self) -> Checked {
        match self {
            Expect::Sha256 { .. } => Checked::ChunkDigests,
            Expect::Embedded(_) => Checked::Embedded,
            Expect::BlobDigest => Checked::BlobDigest,
        }
    }
}

impl Checked {
    /// The one place that decides which tiers may supply bytes.
    fn route(self) -> Route {
        match self {
            Checked::ChunkDigests => Route::Peers,
            Checked::Embedded | Checked::BlobDigest => Route::Registry,
        }
    }
}

/// An index found from a blob's tail and anchored by a digest from elsewhere (an eStargz
/// footer and TOC, the TOC's digest from the layer annotation). Pure: no I/O.
pub trait Anchor: Sync {
    /// How many bytes at the end of a blob of `blob_size` bytes say where the index is.
    fn tail_len(&self, blob_size: u64) -> u64;
    /// The blob range holding the index, from the tail's bytes.
    fn locate(&self, tail: &Bytes, blob_size: u64) -> Result<Range<u64>, Rejection>;
    /// The bytes the anchoring digest covers, from the index range's raw bytes.
    fn decode(&self, region: &Bytes) -> Result<Bytes, Rejection>;
}

/// A verified index: where it lies in the blob, and its decoded bytes.
#[derive(Debug, Clone)]
pub struct Anchored {
    pub region: Range<u64>,
    pub decoded: Bytes,
}

/// Blob bytes as the layers above see them: every read says what its bytes must match, and
/// gets bytes that matched or an error.
pub trait BlobRead: Send + Sync {
    /// Bytes `range` of `blob`, decoded and checked as `expect` says, if the cache holds all
    /// of them and they pass; never waits on the network. `None`: [`read`](Self::read) must
    /// fetch them (or fetch a bad cached copy again).
    fn read_cached(&self, blob: &BlobRef, range: Range<u64>, expect: Expect<'_>) -> Option<Bytes>;

    /// Bytes `range` of `blob`, decoded and checked as `expect` says, from the tiers it
    /// allows; bytes that fail are fetched once more from the registry, then the read fails.
    fn read<'a>(
        &'a self,
        blob: &'a BlobRef,
        range: Range<u64>,
        expect: Expect<'a>,
    ) -> BoxFuture<'a, Result<Bytes, FetchError>>;

    /// Several parts of `blob`, all within `span`, fetched together (one range, where the
    /// tiers allow) from the tiers every part's check allows; each part is decoded and checked
    /// as its `Expect` says, and a part that fails is fetched once more alone from the
    /// registry before the read fails. For a prefetch of many small checked parts.
    fn read_parts<'a>(
        &'a self,
        blob: &'a BlobRef,
        span: Range<u64>,
        parts: &'a [(Range<u64>, Expect<'a>)],
    ) -> BoxFuture<'a, Result<Vec<Bytes>, FetchError>>;

    /// The index `anchor` locates in `blob`, whose decoded bytes must have sha256 `digest`;
    /// read once more from the registry alone if they do not.
    fn read_index<'a>(
        &'a self,
        blob: &'a BlobRef,
        anchor: &'a dyn Anchor,
        digest: [u8; 32],
    ) -> BoxFuture<'a, Result<Anchored, FetchError>>;

    /// Brings `range` of `blob` into the cache from the tiers reads `checked` so may use.
    fn prefetch<'a>(
        &'a self,
        blob: &'a BlobRef,
        range: Range<u64>,
        checked: Checked,
    ) -> BoxFuture<'a, Result<(), FetchError>>;

    /// Checks all of `blob` against its digest; a blob that fails is dropped from the cache,
    /// so that nothing of it is served or shared again.
    fn verify_blob<'a>(&'a self, blob: &'a BlobRef) -> BoxFuture<'a, Result<(), FetchError>>;
}

impl<T: Tiers> BlobRead for T {
    fn read_cached(&self, blob: &BlobRef, range: Range<u64>, expect: Expect<'_>) -> Option<Bytes> {
        let raw = self.cached(blob, range.clone())?;
        // A bad cached copy is left to `read`, which drops and refetches it.
        let decoded = check(expect, &raw).ok()?;
        passed(self, blob, range, expect);
        Some(decoded)
    }

    fn read<'a>(
        &'a self,
        blob: &'a BlobRef,
        range: Range<u64>,
        expect: Expect<'a>,
    ) -> BoxFuture<'a, Result<Bytes, FetchError>> {
        Box::pin(read(self, blob, range, expect))
    }

    fn read_parts<'a>(
        &'a self,
        blob: &'a BlobRef,
        span: Range<u64>,
        parts: &'a [(Range<u64>, Expect<'a>)],
    ) -> BoxFuture<'a, Result<Vec<Bytes>, FetchError>> {
        Box::pin(read_parts(self, blob, span, parts))
    }

    fn read_index<'a>(
        &'a self,
        blob: &'a BlobRef,
        anchor: &'a dyn Anchor,
        digest: [u8; 32],
    ) -> BoxFuture<'a, Result<Anchored, FetchError>> {
        Box::pin(read_index(self, blob, anchor, digest))
    }

    fn prefetch<'a>(
        &'a self,
        blob: &'a BlobRef,
        range: Range<u64>,
        checked: Checked,
    ) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(self.fill(blob, range, checked.route()))
    }

    fn verify_blob<'a>(&'a self, blob: &'a BlobRef) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(verify_blob(self, blob))
    }
}

async fn read<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    range: Range<u64>,
    expect: Expect<'_>,
) -> Result<Bytes, FetchError> {
    let raw = tiers
        .fetch(blob, range.clone(), expect.checked().route())
        .await?;
    checked_or_refetched(tiers, blob, range, expect, &raw).await
}

async fn read_parts<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    span: Range<u64>,
    parts: &[(Range<u64>, Expect<'_>)],
) -> Result<Vec<Bytes>, FetchError> {
    if let Some((range, _)) = parts.iter().find(|(range, _)| {
        range.start < span.start || range.end > span.end || range.start > range.end
    }) {
        return Err(FetchError::RangeOutOfBounds {
            digest: blob.digest.clone(),
            range: range.clone(),
            size: span.end,
        });
    }
    // The narrowest route any part's check allows.
    let route = if parts
        .iter()
        .all(|(_, expect)| expect.checked() == Checked::ChunkDigests)
    {
        Route::Peers
    } else {
        Route::Registry
    };
    let raw = tiers.fetch(blob, span.clone(), route).await?;
    let mut decoded = Vec::with_capacity(parts.len());
    for (range, expect) in parts {
        let at = (range.start - span.start) as usize..(range.end - span.start) as usize;
        let part = raw.slice(at);
        decoded.push(checked_or_refetched(tiers, blob, range.clone(), *expect, &part).await?);
    }
    Ok(decoded)
}

/// `raw`, the bytes `range` of `blob` as fetched, decoded and checked; if they fail, fetched
/// once more from the registry alone and checked again.
async fn checked_or_refetched<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    range: Range<u64>,
    expect: Expect<'_>,
    raw: &Bytes,
) -> Result<Bytes, FetchError> {
    let first = match check(expect, raw) {
        Ok(decoded) => {
            passed(tiers, blob, range, expect);
            return Ok(decoded);
        }
        Err(first) => first,
    };
    warn!(blob = %blob.digest, ?range, error = %first, "bytes failed verification; fetching them again from the registry");
    let again = tiers.refetch(blob, range.clone()).await?;
    match check(expect, &again) {
        Ok(decoded) => {
            passed(tiers, blob, range, expect);
            Ok(decoded)
        }
        Err(source) => Err(FetchError::CheckRead {
            blob: blob.digest.clone(),
            range,
            source,
        }),
    }
}

/// Why an attempt at an index failed: fetching (final), or its bytes (worth a refetch).
enum IndexFailure {
    Fetch(FetchError),
    Check(Rejection),
}

async fn read_index<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    anchor: &dyn Anchor,
    digest: [u8; 32],
) -> Result<Anchored, FetchError> {
    let first = match index_attempt(tiers, blob, anchor, digest, false).await {
        Ok(anchored) => return Ok(anchored),
        Err(IndexFailure::Fetch(error)) => return Err(error),
        Err(IndexFailure::Check(first)) => first,
    };
    warn!(blob = %blob.digest, error = %first, "layer index did not check out; reading it again from the registry");
    match index_attempt(tiers, blob, anchor, digest, true).await {
        Ok(anchored) => Ok(anchored),
        Err(IndexFailure::Fetch(error)) => Err(error),
        Err(IndexFailure::Check(source)) => Err(FetchError::CheckIndex {
            blob: blob.digest.clone(),
            source,
        }),
    }
}

/// One reading of the tail and the index it locates, from every tier the index may come
/// from, or (`refetch`) from the registry alone.
async fn index_attempt<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    anchor: &dyn Anchor,
    digest: [u8; 32],
    refetch: bool,
) -> Result<Anchored, IndexFailure> {
    let get = |range: Range<u64>| async move {
        let got = if refetch {
            tiers.refetch(blob, range).await
        } else {
            tiers.fetch(blob, range, Route::Index).await
        };
        got.map_err(IndexFailure::Fetch)
    };
    let tail_len = anchor.tail_len(blob.size).min(blob.size);
    let tail_range = blob.size - tail_len..blob.size;
    let tail = get(tail_range.clone()).await?;
    let region = anchor
        .locate(&tail, blob.size)
        .map_err(IndexFailure::Check)?;
    let raw = get(region.clone()).await?;
    let decoded = anchor.decode(&raw).map_err(IndexFailure::Check)?;
    sha256_matches(&decoded, digest).map_err(IndexFailure::Check)?;
    // The index matched its anchor, and the tail said where it was: both may be shared.
    tiers.passed(blob, region.clone());
    tiers.passed(blob, tail_range);
    Ok(Anchored { region, decoded })
}

async fn verify_blob<T: Tiers>(tiers: &T, blob: &BlobRef) -> Result<(), FetchError> {
    let mut hasher = Sha256::new();
    let mut offset = 0;
    while offset < blob.size {
        let end = (offset + BLOB_CHECK_STEP).min(blob.size);
        let bytes = tiers.fetch(blob, offset..end, Route::Registry).await?;
        hasher.update(&bytes);
        offset = end;
    }
    let actual = hex::encode(hasher.finalize());
    if actual == blob.digest.hex() {
        return Ok(());
    }
    if let Err(error) = tiers.discard(blob) {
        warn!(blob = %blob.digest, %error, "could not drop a blob that failed its digest");
    }
    Err(FetchError::BlobDigestMismatch {
        blob: blob.digest.clone(),
        actual: format!("sha256:{actual}"),
    })
}

/// Decodes `raw` and checks it as `expect` says.
fn check(expect: Expect<'_>, raw: &Bytes) -> Result<Bytes, Rejection> {
    match expect {
        Expect::Sha256 { digest, decode } => {
            let decoded = decode.decode(raw)?;
            sha256_matches(&decoded, digest)?;
            Ok(decoded)
        }
        Expect::Embedded(decode) => decode.decode(raw),
        Expect::BlobDigest => Ok(raw.clone()),
    }
}

fn sha256_matches(bytes: &[u8], expected: [u8; 32]) -> Result<(), Rejection> {
    let actual: [u8; 32] = Sha256::digest(bytes).into();
    if actual == expected {
        return Ok(());
    }
    Err(Box::new(FetchError::Sha256Mismatch { expected, actual }))
}

/// Bytes that passed: only a check against a digest from a verified index vouches for
/// peer-sent blocks.
fn passed<T: Tiers>(tiers: &T, blob: &BlobRef, range: Range<u64>, expect: Expect<'_>) {
    if expect.checked() == Checked::ChunkDigests {
        tiers.passed(blob, range);
    }
}
