//! The trust decisions over in-memory tiers that lie: a peer that sends wrong bytes, a
//! registry that sends wrong bytes once, and both. The caller sees right bytes or an error.

use std::ops::Range;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::digest::Digest;
use crate::reference::{BlobRef, ImageRef};

const SIZE: usize = 4096;

fn blob_of(bytes: &[u8]) -> BlobRef {
    let image = ImageRef::parse("registry.test/team/app:1").unwrap();
    BlobRef::new(image, Digest::of(bytes), bytes.len() as u64)
}

fn content() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 7 % 251) as u8).collect()
}

fn wrong(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| b ^ 0x5a).collect()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Bytes as stored are bytes as presented: the check is the digest alone.
fn raw(bytes: &Bytes) -> Result<Bytes, Rejection> {
    Ok(bytes.clone())
}

const CHUNK: Range<u64> = 1000..3000;

async fn read_chunk(blobs: &MemoryBlobs, blob: &BlobRef, digest: [u8; 32]) -> Option<Bytes> {
    let expect = Expect::Sha256 {
        digest,
        decode: &raw,
    };
    blobs.read(blob, CHUNK, expect).await.ok()
}

#[tokio::test]
async fn a_peer_sending_wrong_bytes_is_refetched_from_the_registry() {
    let data = content();
    let blob = blob_of(&data);
    let digest = sha256(&data[1000..3000]);
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, wrong(&data));
    blobs.registry_serves(&blob.digest, data.clone());

    let got = read_chunk(&blobs, &blob, digest).await.unwrap();
    assert_eq!(got, data[1000..3000]);
    assert_eq!((blobs.peer_fetches(), blobs.refetches()), (1, 1));
    // Only the registry's bytes, which matched, vouch for anything.
    assert_eq!(blobs.passed(&blob.digest), [CHUNK]);
    // The right bytes are what the cache now holds.
    let cached = Expect::Sha256 {
        digest,
        decode: &raw,
    };
    assert_eq!(blobs.read_cached(&blob, CHUNK, cached).unwrap(), got);
}

#[tokio::test]
async fn a_registry_sending_wrong_bytes_once_is_asked_again() {
    let data = content();
    let blob = blob_of(&data);
    let digest = sha256(&data[1000..3000]);
    let blobs = MemoryBlobs::default();
    blobs.registry_serves(&blob.digest, data.clone());
    blobs.registry_sends_once(&blob.digest, wrong(&data));

    let got = read_chunk(&blobs, &blob, digest).await.unwrap();
    assert_eq!(got, data[1000..3000]);
    assert_eq!((blobs.peer_fetches(), blobs.refetches()), (0, 1));
}

#[tokio::test]
async fn a_lying_peer_and_a_registry_lying_once_fail_the_read_then_it_recovers() {
    let data = content();
    let blob = blob_of(&data);
    let digest = sha256(&data[1000..3000]);
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, wrong(&data));
    blobs.registry_serves(&blob.digest, data.clone());
    blobs.registry_sends_once(&blob.digest, wrong(&data));

    let expect = Expect::Sha256 {
        digest,
        decode: &raw,
    };
    let err = blobs.read(&blob, CHUNK, expect).await.unwrap_err();
    assert!(matches!(err, FetchError::CheckRead { .. }), "{err}");
    assert!(blobs.passed(&blob.digest).is_empty(), "nothing vouched for");
    // The wrong bytes the registry left in the cache are never served from it...
    assert!(blobs.read_cached(&blob, CHUNK, expect).is_none());
    // ...and the next read drops them and gets the registry's right ones.
    let got = read_chunk(&blobs, &blob, digest).await.unwrap();
    assert_eq!(got, data[1000..3000]);
}

#[tokio::test]
async fn bytes_under_a_forgeable_check_never_come_from_peers() {
    let data = content();
    let blob = blob_of(&data);
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, wrong(&data));
    blobs.registry_serves(&blob.digest, data.clone());
    let first_byte_kept = |bytes: &Bytes| -> Result<Bytes, Rejection> {
        match bytes.first() {
            Some(&b) if b == data[1000] => Ok(bytes.clone()),
            _ => Err("crc mismatch".into()),
        }
    };
    let got = blobs
        .read(&blob, CHUNK, Expect::Embedded(&first_byte_kept))
        .await
        .unwrap();
    assert_eq!(got, data[1000..3000]);
    blobs
        .prefetch(&blob, 0..64, Checked::BlobDigest)
        .await
        .unwrap();
    assert_eq!(blobs.peer_fetches(), 0);
    assert!(
        blobs.passed(&blob.digest).is_empty(),
        "a crc vouches for nothing"
    );
}

/// A toy indexed format: the last 8 bytes are the index's offset, the index runs up to them.
struct Trailer;

impl Anchor for Trailer {
    fn tail_len(&self, _blob_size: u64) -> u64 {
        8
    }

    fn locate(&self, tail: &Bytes, blob_size: u64) -> Result<Range<u64>, Rejection> {
        let offset = u64::from_le_bytes(tail[..8].try_into()?);
        if offset > blob_size - 8 {
            return Err("index offset past the end".into());
        }
        Ok(offset..blob_size - 8)
    }

    fn decode(&self, region: &Bytes) -> Result<Bytes, Rejection> {
        Ok(region.clone())
    }
}

fn indexed() -> (Vec<u8>, [u8; 32]) {
    let mut data = content();
    let index = b"{\"entries\":[]}";
    let offset = data.len() as u64;
    data.extend_from_slice(index);
    data.extend_from_slice(&offset.to_le_bytes());
    (data, sha256(index))
}

#[tokio::test]
async fn an_index_a_peer_forged_is_read_again_from_the_registry() {
    let (data, digest) = indexed();
    let blob = blob_of(&data);
    let blobs = MemoryBlobs::default();
    let mut forged = data.clone();
    let at = forged.len() - 9;
    forged[at] ^= 1;
    blobs.peer_serves(&blob.digest, forged.clone());
    blobs.registry_serves(&blob.digest, data.clone());

    let index = blobs.read_index(&blob, &Trailer, digest).await.unwrap();
    assert_eq!(index.decoded, &data[SIZE..data.len() - 8]);
    assert_eq!(
        blobs.refetches(),
        2,
        "the tail and the index, from the registry"
    );
    assert_eq!(
        blobs.passed(&blob.digest).len(),
        2,
        "the index and its tail"
    );

    // Forged by the peer and once by the registry: an error, not the forged index.
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, forged.clone());
    blobs.registry_serves(&blob.digest, data.clone());
    blobs.registry_sends_once(&blob.digest, forged.clone());
    blobs.registry_sends_once(&blob.digest, forged);
    let err = blobs.read_index(&blob, &Trailer, digest).await.unwrap_err();
    assert!(matches!(err, FetchError::CheckIndex { .. }), "{err}");
    assert!(blobs.passed(&blob.digest).is_empty());
}

#[tokio::test]
async fn a_blob_failing_its_digest_is_dropped_from_the_cache() {
    let data = content();
    let blob = blob_of(&data);
    let blobs = MemoryBlobs::default();
    blobs.cache(&blob.digest, data.clone());
    blobs.verify_blob(&blob).await.unwrap();

    blobs.cache(&blob.digest, wrong(&data));
    let err = blobs.verify_blob(&blob).await.unwrap_err();
    assert!(
        matches!(err, FetchError::BlobDigestMismatch { .. }),
        "{err}"
    );
    assert!(blobs
        .read_cached(&blob, 0..64, Expect::BlobDigest)
        .is_none());
}

const UNIT: u64 = 1024;
/// The whole units under [`CHUNK`].
const CHUNK_UNITS: Range<u64> = 0..3072;
const WHOLE: Range<u64> = 0..SIZE as u64;

fn unit_digests(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes.chunks(UNIT as usize).map(sha256).collect()
}

/// A forged copy whose every "embedded check" still passes: the decoder accepts anything, as
/// a ZFile block with a recomputed CRC passes its CRC.
fn forged_unit(data: &[u8], unit: usize) -> Vec<u8> {
    let mut forged = data.to_vec();
    forged[unit * UNIT as usize + 10] ^= 0xff;
    forged
}

#[tokio::test]
async fn units_under_a_table_come_from_peers_and_a_forged_one_is_refetched() {
    let data = content();
    let blob = blob_of(&data);
    let digests = unit_digests(&data);
    let table = UnitDigests {
        unit: UNIT,
        digests: &digests,
    };
    let expect = Expect::UnitDigests {
        table,
        decode: &raw,
    };

    // An honest peer: its bytes are used, and the whole units read vouch for its blocks.
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, data.clone());
    blobs.registry_serves(&blob.digest, data.clone());
    let got = blobs.read(&blob, CHUNK, expect).await.unwrap();
    assert_eq!(got, data[1000..3000]);
    assert_eq!((blobs.peer_fetches(), blobs.refetches()), (1, 0));
    assert_eq!(blobs.passed(&blob.digest), [CHUNK_UNITS]);
    assert_eq!(blobs.read_cached(&blob, CHUNK, expect).unwrap(), got);

    // A peer forging a unit the read touches, with every embedded check right: caught by the
    // table, fetched again from the registry (which blames the sender).
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, forged_unit(&data, 2));
    blobs.registry_serves(&blob.digest, data.clone());
    assert!(
        blobs.read_cached(&blob, CHUNK, expect).is_none(),
        "nothing cached yet"
    );
    let got = blobs.read(&blob, CHUNK, expect).await.unwrap();
    assert_eq!(got, data[1000..3000]);
    assert_eq!((blobs.peer_fetches(), blobs.refetches()), (1, 1));
    assert_eq!(
        blobs.passed(&blob.digest),
        [CHUNK_UNITS],
        "only the registry's bytes"
    );

    // A forged unit in the cache is never served from it.
    let blobs = MemoryBlobs::default();
    blobs.cache(&blob.digest, forged_unit(&data, 0));
    assert!(blobs.read_cached(&blob, CHUNK, expect).is_none());

    // The blob's last bytes; and a table too short for the blob refuses the read.
    let blobs = MemoryBlobs::default();
    blobs.registry_serves(&blob.digest, data.clone());
    let tail = SIZE as u64 - 10..SIZE as u64;
    let got = blobs.read(&blob, tail.clone(), expect).await.unwrap();
    assert_eq!(got, data[SIZE - 10..]);
    let short = UnitDigests {
        unit: UNIT,
        digests: &digests[..2],
    };
    let expect = Expect::UnitDigests {
        table: short,
        decode: &raw,
    };
    let err = blobs.read(&blob, CHUNK, expect).await.unwrap_err();
    assert!(matches!(err, FetchError::CheckRead { .. }), "{err}");
}

#[tokio::test]
async fn with_mutual_tls_crc_checked_blocks_come_from_peers_and_a_bad_blob_blames_them() {
    let data = content();
    let blob = blob_of(&data);
    let blobs = MemoryBlobs::default();
    blobs.peers_use_tls();
    let forged = forged_unit(&data, 1);
    blobs.peer_serves(&blob.digest, forged.clone());
    blobs.registry_serves(&blob.digest, data.clone());
    let crc_passes = |bytes: &Bytes| -> Result<Bytes, Rejection> { Ok(bytes.clone()) };

    // Bytes parsed and kept at once (a layer's metadata): never from a peer, even so.
    let kept = blobs
        .read(&blob, CHUNK, Expect::EmbeddedKept(&crc_passes))
        .await
        .unwrap();
    assert_eq!(kept, data[1000..3000]);
    assert_eq!(blobs.peer_fetches(), 0);
    blobs.discard(&blob).unwrap();

    // The forgery passes the embedded check: it is read, never vouched for...
    let got = blobs
        .read(&blob, CHUNK, Expect::Embedded(&crc_passes))
        .await
        .unwrap();
    assert_eq!(got, forged[1000..3000]);
    assert_eq!(blobs.peer_fetches(), 1);
    assert!(blobs.passed(&blob.digest).is_empty());
    // ...and the whole blob's digest finds it out: the peer's blocks go, and it is blamed.
    let err = blobs.verify_blob(&blob).await.unwrap_err();
    assert!(
        matches!(err, FetchError::BlobDigestMismatch { .. }),
        "{err}"
    );
    assert_eq!(blobs.blamed(), 1);
    assert!(blobs
        .read_cached(&blob, 0..64, Expect::BlobDigest)
        .is_none());

    // From the registry, the blob checks out and vouches for all of itself.
    blobs
        .prefetch(&blob, 0..SIZE as u64, Checked::BlobDigest)
        .await
        .unwrap();
    blobs.verify_blob(&blob).await.unwrap();
    assert_eq!(blobs.passed(&blob.digest), [WHOLE]);
    assert_eq!(blobs.blamed(), 1);
}

#[test]
fn a_table_is_used_when_its_units_fit_in_a_cache_block() {
    let blobs = MemoryBlobs::default();
    assert_eq!(blobs.verification(Ok(64 << 10)), Verification::PerBlock);
    assert_eq!(blobs.verification(Ok(1 << 20)), Verification::PerBlock);
    let Verification::PerBlob { peers, why } = blobs.verification(Ok(2 << 20)) else {
        panic!("units larger than a block cannot check a block");
    };
    assert!(!peers, "no mutual TLS");
    assert!(why.contains("cache.block_size"), "{why}");
    blobs.peers_use_tls();
    assert_eq!(
        blobs.verification(Err("no block digest table".into())),
        Verification::PerBlob {
            peers: true,
            why: "no block digest table".into()
        }
    );
}

#[tokio::test]
async fn parts_read_together_are_each_checked_and_a_bad_one_refetched_alone() {
    let data = content();
    let blob = blob_of(&data);
    let mut lied = data.clone();
    // The peer's copy is right for the first part and wrong for the second.
    lied[2500..2600].iter_mut().for_each(|b| *b ^= 0x5a);
    let blobs = MemoryBlobs::default();
    blobs.peer_serves(&blob.digest, lied);
    blobs.registry_serves(&blob.digest, data.clone());
    let (first, second) = (100..900, 2000..3000);
    let parts = [
        (
            first.clone(),
            Expect::Sha256 {
                digest: sha256(&data[100..900]),
                decode: &raw,
            },
        ),
        (
            second.clone(),
            Expect::Sha256 {
                digest: sha256(&data[2000..3000]),
                decode: &raw,
            },
        ),
    ];
    let got = blobs.read_parts(&blob, 0..3000, &parts).await.unwrap();
    assert_eq!(got, [&data[100..900], &data[2000..3000]]);
    // One fetch of the span from the peer, one refetch of the bad part alone.
    assert_eq!((blobs.peer_fetches(), blobs.refetches()), (1, 1));
    assert_eq!(blobs.passed(&blob.digest), [first, second]);
    let outside = [(
        2900..3100,
        Expect::Sha256 {
            digest: [0; 32],
            decode: &raw,
        },
    )];
    assert!(blobs.read_parts(&blob, 0..3000, &outside).await.is_err());
}
