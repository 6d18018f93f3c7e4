//! The virtual disk over the reference-converted hello-world layer, read through in-memory
//! tiers whose cache holds the blob and whose registry holds nothing, so nothing can come
//! from the network; the fetcher's trust decisions run as in the daemon.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use shoal_fetcher::trust::Tiers;
use shoal_fetcher::{BlobRef, Digest, ImageRef, MemoryBlobs};

use super::*;
use crate::FsError;
use shoal_formats::overlaybd::lsmt::{Mapping, RECORD_SIZE};
use shoal_formats::overlaybd::{tar_wrapper, BlockSource, Disk, LayerError, Window, ZFileReader};

const LAYER: &str = "022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d";
const EXT4_MAGIC: [u8; 2] = [0x53, 0xef];

/// The overlaybd fixtures, found as `shoal-formats`' own fixture tests find them.
fn fixtures() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHOAL_FIXTURES") {
        return Path::new(&dir).join("overlaybd");
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/overlaybd");
    if beside.is_dir() {
        return beside;
    }
    PathBuf::from("/work/shared/fixtures/overlaybd")
}

pub(super) fn fixture_blob() -> Vec<u8> {
    let blobs = fixtures().join("hello-world/blobs/sha256");
    std::fs::read(blobs.join(LAYER)).expect("fixture blob")
}

/// Blobs whose cache holds `blob` and whose registry has nothing.
pub(super) fn cached(blob: &[u8]) -> (MemoryBlobs, BlobRef) {
    let blobs = MemoryBlobs::default();
    let digest = Digest::parse(&format!("sha256:{LAYER}")).unwrap();
    blobs.cache(&digest, blob.to_vec());
    let image = ImageRef::parse("127.0.0.1:1/test/hello:1").unwrap();
    let size = blob.len() as u64;
    (blobs, BlobRef::new(image, digest, size))
}

/// Opens the layer as one made by another converter: no block digest table.
pub(super) async fn open(blobs: &MemoryBlobs, blob: BlobRef) -> Result<DiskLayer, FsError> {
    let checks = LayerChecks::new(blobs, Err(NO_TABLE.to_owned()));
    DiskLayer::open(blobs, blob, checks).await
}

/// The same disk through the pure, synchronous readers.
fn reference_disk(blob: Vec<u8>) -> Disk<ZFileReader<Window<Vec<u8>>>> {
    let size = blob.len() as u64;
    let payload = tar_wrapper::locate(&blob[..tar_wrapper::PROBE_LEN], size).unwrap();
    let window = Window::new(blob, payload.offset, payload.len).unwrap();
    Disk::open(vec![ZFileReader::open(window).unwrap()]).unwrap()
}

#[tokio::test]
async fn the_fixture_disk_reads_the_same_through_the_cache_and_after_reopening() {
    let blob = fixture_blob();
    let (blobs, blob_ref) = cached(&blob);
    let layer = open(&blobs, blob_ref).await.unwrap();
    assert_eq!(layer.meta().payload_offset, 1536);
    assert_eq!(layer.lsmt().index_records(), 768);
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
    assert_eq!(disk.size(), 64 << 30);

    let superblock = disk.read_cached(&blobs, 1024, 1024).unwrap();
    assert_eq!(superblock[0x38..0x3a], EXT4_MAGIC);

    let reference = reference_disk(blob);
    let reopened = VirtualDisk::from_persisted(&disk.persist(), &blobs).unwrap();
    for (offset, len) in [
        (0, 4096),
        (1024, 131_072),
        (4 << 20, 65_536),
        (40 << 30, 4096),
    ] {
        let mut want = vec![0u8; len];
        reference.read_exact_at(offset, &mut want).unwrap();
        assert_eq!(disk.read_cached(&blobs, offset, len as u64).unwrap(), want);
        assert_eq!(disk.read(&blobs, offset, len as u64).await.unwrap(), want);
        assert_eq!(
            reopened.read(&blobs, offset, len as u64).await.unwrap(),
            want
        );
    }
    // Reads are clipped at the end of the disk.
    let tail = disk.read(&blobs, disk.size() - 10, 4096).await.unwrap();
    assert_eq!(tail, vec![0; 10]);
}

#[tokio::test]
async fn corrupt_cached_blocks_are_never_served() {
    let blob = fixture_blob();
    let (blobs, blob_ref) = cached(&blob);
    let layer = open(&blobs, blob_ref.clone()).await.unwrap();
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();

    // Every compressed data block goes bad after the metadata was read.
    let mut bad = blob.clone();
    let end = bad.len() - 4096;
    for byte in &mut bad[2048..end] {
        *byte ^= 0x5a;
    }
    blobs.cache(&blob_ref.digest, bad);
    assert!(
        disk.read_cached(&blobs, 1024, 1024).is_none(),
        "a block failing its crc is left to the refetching path"
    );
    // The refetch has nowhere to go (the registry is unreachable): an error, not data.
    let err = disk.read(&blobs, 1024, 1024).await.unwrap_err();
    assert!(matches!(err, FsError::ReadBlock { .. }), "{err}");
    // Unmapped ranges need no block at all: the first gap between data runs.
    let runs: Vec<(u64, u64)> = disk
        .stack()
        .data_pieces()
        .map(|(at, piece)| (at, at + piece.len()))
        .collect();
    let gap = runs
        .windows(2)
        .find(|w| w[1].0 - w[0].1 >= 512)
        .map(|w| w[0].1)
        .unwrap();
    assert_eq!(disk.read_cached(&blobs, gap, 512).unwrap(), vec![0; 512]);
}

#[tokio::test]
async fn blocks_a_read_decoded_are_served_again_from_memory() {
    let blob = fixture_blob();
    let (blobs, blob_ref) = cached(&blob);
    let layer = open(&blobs, blob_ref.clone()).await.unwrap();
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
    assert_eq!(disk.memory_bytes(), 0);
    let superblock = disk.read(&blobs, 1024, 1024).await.unwrap();
    let held = disk.memory_bytes();
    assert!(held > 0, "the superblock's block is kept");

    // The cache now holds only damaged bytes: whatever is served comes from memory.
    let mut bad = blob.clone();
    let end = bad.len() - 4096;
    for byte in &mut bad[2048..end] {
        *byte ^= 0x5a;
    }
    blobs.cache(&blob_ref.digest, bad);
    assert_eq!(disk.read_cached(&blobs, 1024, 1024).unwrap(), superblock);
    assert_eq!(
        disk.read(&blobs, 1024, 512).await.unwrap(),
        superblock[..512]
    );
    assert!(
        disk.read_cached(&blobs, 4 << 20, 4096).is_none(),
        "a block never read is not in memory"
    );
    assert_eq!(disk.memory_bytes(), held);
}

/// The persisted record of the fixture disk as JSON, to tamper with.
async fn persisted_json() -> serde_json::Value {
    let (blobs, blob_ref) = cached(&fixture_blob());
    let layer = open(&blobs, blob_ref).await.unwrap();
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
    serde_json::from_slice(&disk.persist()).unwrap()
}

fn edit_bytes(json: &mut serde_json::Value, field: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let slot = &mut json["layers"][0][field];
    let mut bytes = STANDARD.decode(slot.as_str().unwrap()).unwrap();
    edit(&mut bytes);
    *slot = STANDARD.encode(bytes).into();
}

fn reopen(json: &serde_json::Value) -> Result<VirtualDisk, FsError> {
    VirtualDisk::from_persisted(&serde_json::to_vec(json).unwrap(), &MemoryBlobs::default())
}

#[tokio::test]
async fn damaged_persisted_records_are_refused() {
    assert!(matches!(
        VirtualDisk::from_persisted(b"not json", &MemoryBlobs::default()),
        Err(FsError::PersistedDisk { .. })
    ));
    let good = persisted_json().await;
    assert!(reopen(&good).is_ok());

    let mut version = good.clone();
    version["version"] = 99.into();
    assert!(matches!(
        reopen(&version),
        Err(FsError::PersistedIndex { .. })
    ));

    let mut table = good.clone();
    edit_bytes(&mut table, "jump_table", |b| b[10] ^= 1);
    let err = reopen(&table).unwrap_err();
    assert!(
        err.to_string().contains("jump table crc"),
        "wrong jump-table crc: {err}"
    );

    let mut header = good.clone();
    edit_bytes(&mut header, "zfile_trailer", |b| b[100] ^= 1);
    assert!(matches!(
        reopen(&header),
        Err(FsError::OpenLayer(LayerError::ZFile(_)))
    ));

    let mut index = good.clone();
    edit_bytes(&mut index, "lsmt_index", |b| {
        let record: &mut [u8; RECORD_SIZE] = (&mut b[..RECORD_SIZE]).try_into().unwrap();
        let mut mapping = Mapping::decode(record);
        mapping.moffset = 1 << 40;
        *record = mapping.encode();
    });
    let err = reopen(&index).unwrap_err();
    assert!(
        matches!(err, FsError::OpenLayer(LayerError::Lsmt(_))),
        "{err}"
    );

    let mut truncated = good.clone();
    truncated["layers"][0]["size"] = 1000.into();
    assert!(matches!(
        reopen(&truncated),
        Err(FsError::OpenLayer(LayerError::Wrapper(_)))
    ));
}

#[tokio::test]
async fn a_whole_blob_is_checked_against_its_digest_and_dropped_when_wrong() {
    let blob = fixture_blob();
    let (blobs, blob_ref) = cached(&blob);
    let layer = open(&blobs, blob_ref.clone()).await.unwrap();
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
    fetch_and_verify(&blobs, &disk, 0, None).await.unwrap();

    // One byte differs in the tar padding: no CRC covers it, the digest does.
    let mut bad = blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    blobs.cache(&blob_ref.digest, bad);
    let err = fetch_and_verify(&blobs, &disk, 0, Some(1 << 30))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            FsError::FetchBlob {
                source: shoal_fetcher::FetchError::BlobDigestMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        blobs.cached(&blob_ref, 0..512).is_none(),
        "the blob's cached blocks are dropped"
    );
}

/// `blob` with data block `index` of its ZFile rewritten (its last compressed byte, a literal
/// in LZ4) and its CRC recomputed: it passes its CRC and decodes to other bytes.
fn forged_block(blob: &[u8], layer: &DiskLayer, index: u64) -> Vec<u8> {
    use shoal_formats::overlaybd::zfile::{crc32c_raw, BLOCK_CRC_SEED};
    let at = layer.meta().payload_offset;
    let block = layer.layer().zfile().block_range(index).unwrap();
    let (start, end) = ((at + block.start) as usize, (at + block.end) as usize);
    let mut forged = blob.to_vec();
    forged[end - 5] ^= 0x01;
    let crc = crc32c_raw(BLOCK_CRC_SEED, &forged[start..end - 4]);
    forged[end - 4..end].copy_from_slice(&crc.to_le_bytes());
    forged
}

#[tokio::test]
async fn with_a_block_digest_table_a_block_forged_with_its_crc_is_never_served() {
    use shoal_formats::overlaybd::BlockDigests;
    let blob = fixture_blob();
    let (blobs, blob_ref) = cached(&blob);
    let table = BlockDigests::of(&blob, 4096).unwrap();
    let checks = LayerChecks::new(&blobs, Ok(table.clone()));
    assert_eq!(
        checks.verification(),
        &shoal_fetcher::Verification::PerBlock
    );
    let layer = DiskLayer::open(&blobs, blob_ref.clone(), checks)
        .await
        .unwrap();
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
    let superblock = disk.read_cached(&blobs, 1024, 1024).unwrap();
    assert_eq!(superblock[0x38..0x3a], EXT4_MAGIC);

    // The table persists with the disk, and reads go on being checked against it.
    let reopened = VirtualDisk::from_persisted(&disk.persist(), &blobs).unwrap();
    assert!(reopened.layers()[0].checks().table().is_some());

    // The superblock's ZFile block, forged with a matching CRC.
    let layer = &reopened.layers()[0];
    let plain = open(&blobs, blob_ref.clone()).await.unwrap();
    let map = shoal_formats::overlaybd::BlockMap::new(&[layer.layer()]).unwrap();
    let plan = map.plan(0, 4096).unwrap();
    let index = plan
        .iter()
        .find_map(|step| match step {
            shoal_formats::overlaybd::Step::Blocks { span, .. } => Some(span.blocks.start),
            _ => None,
        })
        .unwrap();
    let forged = forged_block(&blob, layer, index);
    blobs.cache(&blob_ref.digest, forged.clone());
    let unchecked = VirtualDisk::new(vec![plain], FsType::Ext4).unwrap();
    let seen = unchecked.read_cached(&blobs, 0, 4096);
    assert!(
        seen.is_some_and(|bytes| bytes != reopened_reference(&blob)),
        "without a table the forgery passes its CRC"
    );
    assert!(
        reopened.read_cached(&blobs, 0, 4096).is_none(),
        "the table catches what the CRC does not"
    );
    // The refetch has nowhere to go here: an error, never the forged bytes.
    assert!(reopened.read(&blobs, 0, 4096).await.is_err());

    // A table whose unit is larger than a cache block cannot check blocks one by one: per blob.
    let coarse = BlockDigests::of(&blob, 2 << 20).unwrap();
    let checks = LayerChecks::new(&blobs, Ok(coarse));
    assert!(checks.table().is_none());
    assert!(matches!(
        checks.verification(),
        shoal_fetcher::Verification::PerBlob { why, .. } if why.contains("cache.block_size")
    ));
}

/// The first 4 KiB of the fixture disk.
fn reopened_reference(blob: &[u8]) -> Vec<u8> {
    let mut want = vec![0u8; 4096];
    reference_disk(blob.to_vec())
        .read_exact_at(0, &mut want)
        .unwrap();
    want
}

#[tokio::test]
async fn without_a_table_peers_blocks_are_checked_by_the_blob_digest_and_dropped_when_wrong() {
    let blob = fixture_blob();
    let blobs = MemoryBlobs::default();
    blobs.peers_use_tls();
    let digest = Digest::parse(&format!("sha256:{LAYER}")).unwrap();
    let image = ImageRef::parse("127.0.0.1:1/test/hello:1").unwrap();
    let blob_ref = BlobRef::new(image, digest.clone(), blob.len() as u64);
    blobs.registry_serves(&digest, blob.clone());
    let layer = open(&blobs, blob_ref.clone()).await.unwrap();
    assert_eq!(
        blobs.peer_fetches(),
        0,
        "a layer's metadata never comes from a peer"
    );

    // Data blocks may: a peer forges the superblock's block with a matching CRC.
    let map = shoal_formats::overlaybd::BlockMap::new(&[layer.layer()]).unwrap();
    let index = map
        .plan(0, 4096)
        .unwrap()
        .iter()
        .find_map(|step| match step {
            shoal_formats::overlaybd::Step::Blocks { span, .. } => Some(span.blocks.start),
            _ => None,
        })
        .unwrap();
    let forged = forged_block(&blob, &layer, index);
    let disk = VirtualDisk::new(vec![layer], FsType::Ext4).unwrap();
    blobs.discard(&blob_ref).unwrap();
    blobs.peer_serves(&digest, forged);
    let want = reopened_reference(&blob);
    let seen = disk.read(&blobs, 0, 4096).await.unwrap();
    assert_ne!(seen, want, "the CRC passed: the forgery was read");
    assert_eq!(blobs.peer_fetches(), 1);

    // The background completion finds the blob's digest wrong, drops what the peer sent and
    // blames it, forgets what was decoded of it, and completes the blob from the registry.
    fetch_and_verify(&blobs, &disk, 0, None).await.unwrap();
    assert_eq!(blobs.blamed(), 1);
    assert_eq!(disk.read(&blobs, 0, 4096).await.unwrap(), want);
}
