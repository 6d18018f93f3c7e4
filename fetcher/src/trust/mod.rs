//! Trust: what the bytes of a read must match before anyone above the fetcher sees them, where
//! they may come from, and what happens when they do not match. Every such decision is made
//! here, over the [`Tiers`] below (cache, peers, registry), and nowhere else:
//!
//! - **allow**: peers are asked for bytes checked against a digest that did not come from them
//!   ([`Expect::Sha256`]: an eStargz chunk from the verified TOC, the TOC against its layer
//!   annotation; [`Expect::UnitDigests`]: every unit of an overlaybd blob against the block
//!   digest table its manifest names). Bytes whose check travels with them
//!   ([`Expect::Embedded`], a ZFile block's forgeable CRC32C) come from peers only when every
//!   peer proved itself a member (mutual TLS), and the whole blob's digest, checked once it is
//!   complete, vouches for them later; bytes parsed and kept at once, which that later check
//!   could not take back ([`Expect::EmbeddedKept`], [`Expect::BlobDigest`]: a layer's
//!   metadata), come from the cache and the registry alone.
//! - **verify**: a read's bytes are decoded and checked before they are returned, from the
//!   cache as from the network.
//! - **reject and refetch once**: bytes that fail are dropped from the cache, their sending
//!   peer is blamed, and they are fetched once more from the registry alone; if those fail
//!   too, the read fails (the FUSE layer answers EIO).
//! - **share**: bytes that passed a [`Expect::Sha256`] or [`Expect::UnitDigests`] check, or a
//!   blob whose whole digest matched, make the peer-sent blocks under them shareable; nothing
//!   else does (blocks fetched from the registry are shareable as they land, see
//!   [`crate::peer`]).
//! - **blame per blob**: a blob whose digest does not match loses every block a peer sent,
//!   and those peers are blamed ([`BlobRead::verify_blob`]).
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
    /// anyone can forge it, so peers supply them only when every peer is authenticated
    /// (mutual TLS), and only the whole blob's digest, later, vouches for them
    /// ([`BlobRead::verify_blob`]); otherwise only the cache and the registry.
    Embedded(&'a dyn Decode),
    /// As [`Expect::Embedded`], for bytes the reader parses and keeps at once (a layer's
    /// metadata), which a later check of the whole blob could not take back: only the cache
    /// and the registry.
    EmbeddedKept(&'a dyn Decode),
    /// Nothing per read: the raw bytes, covered only by a later check of the whole blob
    /// against its digest ([`BlobRead::verify_blob`]). Only the cache and the registry.
    BlobDigest,
    /// Every unit of raw bytes the read touches has the sha256 `table` lists (a table the
    /// manifest anchors, never the sender's): peers may supply them. The read is widened to
    /// whole units, each checked, before `decode` sees the bytes asked for.
    UnitDigests {
        table: UnitDigests<'a>,
        decode: &'a dyn Decode,
    },
}

/// The sha256 of every `unit` bytes of a blob's raw bytes (aligned; the last unit shorter).
#[derive(Clone, Copy)]
pub struct UnitDigests<'a> {
    pub unit: u64,
    pub digests: &'a [[u8; 32]],
}

impl UnitDigests<'_> {
    /// `range` of a blob of `size` bytes, widened to whole units.
    fn widen(&self, range: &Range<u64>, size: u64) -> Range<u64> {
        let unit = self.unit.max(1);
        let start = range.start / unit * unit;
        let end = range.end.div_ceil(unit).saturating_mul(unit).min(size);
        start.min(end)..end
    }

    /// Checks `raw`, bytes `at` of the blob (whole units), unit by unit.
    fn check(&self, raw: &[u8], at: &Range<u64>) -> Result<(), Rejection> {
        let unit = self.unit.max(1);
        for (i, part) in raw.chunks(unit as usize).enumerate() {
            let index = at.start / unit + i as u64;
            let expected = self.digests.get(index as usize).ok_or_else(|| {
                Box::new(FetchError::UnitOutsideTable {
                    index,
                    units: self.digests.len() as u64,
                }) as Rejection
            })?;
            let actual: [u8; 32] = Sha256::digest(part).into();
            if actual != *expected {
                let start = index * unit;
                return Err(Box::new(FetchError::UnitDigestMismatch {
                    range: Box::new(start..start + part.len() as u64),
                    expected: hex::encode(expected),
                    actual: hex::encode(actual),
                }));
            }
        }
        Ok(())
    }
}

/// How the reads of an overlaybd blob are verified, decided here for the reader (which builds
/// its [`Expect`] from it) and for `shoal status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Every unit of the blob against its block digest table: peers may send any block.
    PerBlock,
    /// Each block by its embedded CRC, the blob by its digest once complete. `peers`: blocks
    /// may come from peers meanwhile (they all proved membership with mutual TLS), so the blob
    /// is completed in the background at once; `why`: why not per block.
    PerBlob { peers: bool, why: String },
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
    /// Every unit against a block digest table ([`Expect::UnitDigests`]).
    UnitDigests,
}

impl Expect<'_> {
    pub fn checked(&self) -> Checked {
        match self {
            Expect::Sha256 { .. } => Checked::ChunkDigests,
            Expect::Embedded(_) => Checked::Embedded,
            Expect::BlobDigest | Expect::EmbeddedKept(_) => Checked::BlobDigest,
            Expect::UnitDigests { .. } => Checked::UnitDigests,
        }
    }

    /// The raw bytes a read of `range` of a blob of `size` bytes fetches and checks.
    fn span(&self, range: &Range<u64>, size: u64) -> Range<u64> {
        match self {
            Expect::UnitDigests { table, .. } => table.widen(range, size),
            _ => range.clone(),
        }
    }
}

impl Checked {
    /// The one place that decides which tiers may supply bytes.
    fn route<T: Tiers>(self, tiers: &T) -> Route {
        match self {
            Checked::ChunkDigests | Checked::UnitDigests => Route::Peers,
            // A forgeable check: only from peers that all hold a certificate of the cluster's
            // CA, and the blob's digest, checked once it is complete, blames them later.
            Checked::Embedded if tiers.peers_authenticated() => Route::Peers,
            Checked::Embedded | Checked::BlobDigest => Route::Registry,
        }
    }

    /// Whether bytes that passed this check may be shared on.
    fn vouches(self) -> bool {
        matches!(self, Checked::ChunkDigests | Checked::UnitDigests)
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

    /// Checks all of `blob` against its digest. A blob that passes makes the blocks peers
    /// sent of it shareable. One that fails loses every block a peer sent (and those peers are
    /// blamed), or, when no peer sent any, is dropped from the cache whole, so that nothing
    /// wrong of it is served or shared again.
    fn verify_blob<'a>(&'a self, blob: &'a BlobRef) -> BoxFuture<'a, Result<(), FetchError>>;

    /// How the reads of an overlaybd blob whose block digest table has units of `unit` bytes
    /// (`Err(why)`: it has none, or none that can be used) are verified.
    fn verification(&self, unit: Result<u64, String>) -> Verification;

    /// Whether reads are fetching bytes a container waits for now: background work yields
    /// to them.
    fn foreground_fetching(&self) -> bool;

    /// Bytes of `blob` the cache holds (whole blocks): how much of it has been brought in.
    fn cached_bytes(&self, blob: &BlobRef) -> u64;
}

impl<T: Tiers> BlobRead for T {
    fn read_cached(&self, blob: &BlobRef, range: Range<u64>, expect: Expect<'_>) -> Option<Bytes> {
        let span = expect.span(&range, blob.size);
        let raw = self.cached(blob, span.clone())?;
        // A bad cached copy is left to `read`, which drops and refetches it.
        let decoded = check(expect, &raw, &span, &range).ok()?;
        passed(self, blob, span, expect);
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
        Box::pin(self.fill(blob, range, checked.route(self)))
    }

    fn verify_blob<'a>(&'a self, blob: &'a BlobRef) -> BoxFuture<'a, Result<(), FetchError>> {
        Box::pin(verify_blob(self, blob))
    }

    fn foreground_fetching(&self) -> bool {
        Tiers::foreground_fetching(self)
    }

    fn cached_bytes(&self, blob: &BlobRef) -> u64 {
        Tiers::cached_bytes(self, blob)
    }

    fn verification(&self, unit: Result<u64, String>) -> Verification {
        let per_blob = |why: String| Verification::PerBlob {
            peers: Checked::Embedded.route(self) == Route::Peers,
            why,
        };
        match unit {
            // Peers trade whole cache blocks: each must be a whole number of units, so that
            // a bad block is found, and its sender blamed, on its own.
            Ok(unit) if unit <= self.block_size() => Verification::PerBlock,
            Ok(unit) => per_blob(format!(
                "its block digest table's {unit}-byte units are larger than cache.block_size ({} bytes)",
                self.block_size()
            )),
            Err(why) => per_blob(why),
        }
    }
}

async fn read<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    range: Range<u64>,
    expect: Expect<'_>,
) -> Result<Bytes, FetchError> {
    let span = expect.span(&range, blob.size);
    let raw = tiers
        .fetch(blob, span.clone(), expect.checked().route(tiers))
        .await?;
    checked_or_refetched(tiers, blob, range, span, expect, &raw).await
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
    // Each part's check may need more than the part (whole units of a table): fetch them all.
    let spans: Vec<Range<u64>> = parts
        .iter()
        .map(|(range, expect)| expect.span(range, blob.size))
        .collect();
    let fetched = spans.iter().fold(span.clone(), |all, s| {
        all.start.min(s.start)..all.end.max(s.end)
    });
    // The narrowest route any part's check allows.
    let route = if parts
        .iter()
        .all(|(_, expect)| expect.checked().route(tiers) == Route::Peers)
    {
        Route::Peers
    } else {
        Route::Registry
    };
    let raw = tiers.fetch(blob, fetched.clone(), route).await?;
    let mut decoded = Vec::with_capacity(parts.len());
    for ((range, expect), part_span) in parts.iter().zip(spans) {
        let at =
            (part_span.start - fetched.start) as usize..(part_span.end - fetched.start) as usize;
        let part = raw.slice(at);
        decoded.push(
            checked_or_refetched(tiers, blob, range.clone(), part_span, *expect, &part).await?,
        );
    }
    Ok(decoded)
}

/// `raw`, the bytes `span` of `blob` as fetched, checked and the decoded bytes of `range`
/// returned; if they fail, `span` is fetched once more from the registry alone and checked
/// again.
async fn checked_or_refetched<T: Tiers>(
    tiers: &T,
    blob: &BlobRef,
    range: Range<u64>,
    span: Range<u64>,
    expect: Expect<'_>,
    raw: &Bytes,
) -> Result<Bytes, FetchError> {
    let first = match check(expect, raw, &span, &range) {
        Ok(decoded) => {
            passed(tiers, blob, span, expect);
            return Ok(decoded);
        }
        Err(first) => first,
    };
    warn!(blob = %blob.digest, ?range, error = %first, "bytes failed verification; fetching them again from the registry");
    let again = tiers.refetch(blob, span.clone()).await?;
    match check(expect, &again, &span, &range) {
        Ok(decoded) => {
            passed(tiers, blob, span, expect);
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
        // Every byte checked out: what peers sent of it may go on to others.
        tiers.passed(blob, 0..blob.size);
        return Ok(());
    }
    // The registry is the root of trust: when peers sent any of it, their blocks are the
    // suspects, dropped with their senders blamed; otherwise the cached copy itself is bad.
    let dropped = match tiers.drop_peer_blocks(blob) {
        Ok(0) => tiers.discard(blob),
        Ok(blocks) => {
            warn!(blob = %blob.digest, blocks, "blob failed its digest; dropped the blocks peers sent of it and blamed them");
            Ok(())
        }
        Err(error) => Err(error),
    };
    if let Err(error) = dropped {
        warn!(blob = %blob.digest, %error, "could not drop a blob that failed its digest");
    }
    Err(FetchError::BlobDigestMismatch {
        blob: blob.digest.clone(),
        actual: format!("sha256:{actual}"),
    })
}

/// Decodes `raw` (bytes `span` of the blob) and checks it as `expect` says; the decoded
/// bytes of `wanted`, which `span` covers.
fn check(
    expect: Expect<'_>,
    raw: &Bytes,
    span: &Range<u64>,
    wanted: &Range<u64>,
) -> Result<Bytes, Rejection> {
    match expect {
        Expect::Sha256 { digest, decode } => {
            let decoded = decode.decode(raw)?;
            sha256_matches(&decoded, digest)?;
            Ok(decoded)
        }
        Expect::Embedded(decode) | Expect::EmbeddedKept(decode) => decode.decode(raw),
        Expect::BlobDigest => Ok(raw.clone()),
        Expect::UnitDigests { table, decode } => {
            table.check(raw, span)?;
            let from = (wanted.start - span.start) as usize;
            let to = (wanted.end - span.start) as usize;
            decode.decode(&raw.slice(from..to))
        }
    }
}

fn sha256_matches(bytes: &[u8], expected: [u8; 32]) -> Result<(), Rejection> {
    let actual: [u8; 32] = Sha256::digest(bytes).into();
    if actual == expected {
        return Ok(());
    }
    Err(Box::new(FetchError::Sha256Mismatch { expected, actual }))
}

/// Bytes that passed: only a check against a digest from a verified index or table vouches
/// for peer-sent blocks.
fn passed<T: Tiers>(tiers: &T, blob: &BlobRef, range: Range<u64>, expect: Expect<'_>) {
    if expect.checked().vouches() {
        tiers.passed(blob, range);
    }
}
