//! Compatibility tests against blobs produced by the reference overlaybd tools
//! (`shared/fixtures/overlaybd` beside the project, see its README).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::*;

const EXT4_MAGIC: u16 = 0xef53;

/// The overlaybd fixtures: `$SHOAL_FIXTURES/overlaybd`, else `../shared/fixtures/overlaybd`
/// from the project root, else where the workplace keeps them.
pub(crate) fn fixtures() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHOAL_FIXTURES") {
        return Path::new(&dir).join("overlaybd");
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/overlaybd");
    if beside.is_dir() {
        return beside;
    }
    PathBuf::from("/work/shared/fixtures/overlaybd")
}

fn layout() -> PathBuf {
    fixtures().join("hello-world")
}

fn blob(digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(layout().join("blobs/sha256").join(hex)).expect("fixture blob")
}

fn json(digest: &str) -> Value {
    serde_json::from_slice(&blob(digest)).expect("fixture json")
}

/// The overlaybd layer descriptors of the manifest tagged `amd64-converted`, bottom first.
fn converted_layers() -> Vec<Value> {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout().join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "amd64-converted")
        .expect("amd64-converted manifest");
    let manifest = json(manifest["digest"].as_str().unwrap());
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["annotations"].get(ANNOTATION_BLOB_DIGEST).is_some())
        .cloned()
        .collect()
}

/// The decompressing reader of one converted layer, after checking its annotations.
fn open_layer(layer: &Value) -> ZFileReader<Window<Vec<u8>>> {
    let annotations = &layer["annotations"];
    assert_eq!(annotations[ANNOTATION_VERSION], "0.1.0");
    let digest = annotations[ANNOTATION_BLOB_DIGEST].as_str().unwrap();
    assert_eq!(layer["digest"].as_str(), Some(digest));
    let data = blob(digest);
    let size: u64 = annotations[ANNOTATION_BLOB_SIZE]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(data.len() as u64, size);

    let payload = tar_wrapper::locate(&data[..tar_wrapper::PROBE_LEN], size).unwrap();
    assert_eq!(
        (payload.offset, payload.len, payload.wrapped),
        (1536, 639_491, true)
    );
    let window = Window::new(data, payload.offset, payload.len).unwrap();
    ZFileReader::open(window).unwrap()
}

#[test]
fn hello_world_layer_is_a_verified_zfile_around_an_lsmt_ext4_disk() {
    let layers = converted_layers();
    assert_eq!(
        layers.len(),
        1,
        "the converted image has one overlaybd layer"
    );
    let reader = open_layer(&layers[0]);

    let zfile = reader.zfile();
    assert_eq!(zfile.algorithm(), zfile::Algorithm::Lz4);
    assert_eq!(zfile.block_size(), 4096);
    assert_eq!(zfile.block_count(), 17_463);
    assert_eq!(zfile.uncompressed_size(), 71_528_448);
    assert!(zfile.trailer().verify && zfile.trailer().has_digest());
    // Every block's CRC verifies and every block decompresses to its full length.
    let mut total = 0u64;
    for index in 0..zfile.block_count() {
        total += reader.read_block(index).unwrap().len() as u64;
    }
    assert_eq!(total, zfile.uncompressed_size());

    let lsmt = LsmtFile::open(&reader).unwrap();
    assert_eq!(lsmt.virtual_size(), 64 << 30);
    assert_eq!(lsmt.index_records(), 768);
    // 768 on-disk records: 515 mappings plus 253 padding records filling the last 4 KiB page.
    assert_eq!(lsmt.mappings().len(), 515);

    let disk = Disk::open(vec![reader]).unwrap();
    assert_eq!(disk.size(), 64 << 30);
    let mut superblock = [0u8; 1024];
    disk.read_exact_at(1024, &mut superblock).unwrap();
    assert_eq!(
        u16::from_le_bytes([superblock[56], superblock[57]]),
        EXT4_MAGIC
    );
    // ext4 s_log_block_size: 4 KiB blocks.
    assert_eq!(superblock[24], 2);
    let mut tail = [0xffu8; 4096];
    disk.read_exact_at((64 << 30) - 4096, &mut tail).unwrap();

    debugfs_lists_hello(&disk);
}

#[test]
fn writer_layer_stacks_over_the_hello_world_layer() {
    let reader = open_layer(&converted_layers()[0]);
    let lower = LsmtFile::open(&reader).unwrap();
    // The upper layer replaces sector 2 (the superblock's first half) with a pattern and
    // zeroes sector 3; everything else must still come from the converted layer.
    let mut sectors = vec![0x42u8; 1024];
    sectors[512..].fill(0);
    let upper = lsmt::Writer::new(lower.virtual_size())
        .write(&[lsmt::Extent {
            offset: 1024,
            data: &sectors,
        }])
        .unwrap();
    let upper_file = LsmtFile::open(upper.as_slice()).unwrap();
    let stack = Stack::from_files(&[&upper_file, &lower]).unwrap();
    let layers: Vec<Box<dyn BlockSource>> = vec![Box::new(upper), Box::new(reader)];
    let disk = Disk::new(stack, layers).unwrap();
    let mut head = [0u8; 4096];
    disk.read_exact_at(0, &mut head).unwrap();
    assert!(head[1024..1536].iter().all(|&b| b == 0x42));
    assert!(head[1536..2048].iter().all(|&b| b == 0));
    let reader = open_layer(&converted_layers()[0]);
    let single = Disk::open(vec![reader]).unwrap();
    let mut original = [0u8; 4096];
    single.read_exact_at(0, &mut original).unwrap();
    assert_eq!(head[..1024], original[..1024]);
    assert_eq!(head[2048..], original[2048..]);
    assert_ne!(original[1536..2048], [0u8; 512]);
}

/// Writes the merged disk sparsely and asks e2fsprogs' debugfs for the root directory.
fn debugfs_lists_hello<S: BlockSource>(disk: &Disk<S>) {
    if Command::new("debugfs").arg("-V").output().is_err() {
        eprintln!("SKIPPED: debugfs (e2fsprogs) is not installed; not listing the ext4 root");
        return;
    }
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(disk.size()).unwrap();
    let mut buf = Vec::new();
    for (offset, piece) in disk.stack().data_pieces() {
        buf.resize(piece.len() as usize, 0);
        disk.read_exact_at(offset, &mut buf).unwrap();
        use std::os::unix::fs::FileExt;
        file.as_file().write_all_at(&buf, offset).unwrap();
    }
    file.flush().unwrap();
    let out = Command::new("debugfs")
        .arg("-R")
        .arg("ls -l /")
        .arg(file.path())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "debugfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        listing.split_whitespace().any(|word| word == "hello"),
        "root listing lacks hello:\n{listing}"
    );
}

#[test]
fn hello_world_block_corruption_is_caught_and_named() {
    let layers = converted_layers();
    let digest = layers[0]["annotations"][ANNOTATION_BLOB_DIGEST]
        .as_str()
        .unwrap();
    let mut data = blob(digest);
    let size = data.len() as u64;
    let payload = tar_wrapper::locate(&data[..tar_wrapper::PROBE_LEN], size).unwrap();
    let zfile =
        ZFile::open(&Window::new(data.as_slice(), payload.offset, payload.len).unwrap()).unwrap();
    let range = zfile.block_range(100).unwrap();
    data[(payload.offset + range.start + 1) as usize] ^= 0x01;
    let reader = ZFileReader::new(
        zfile,
        Window::new(data, payload.offset, payload.len).unwrap(),
    );
    let err = reader.read_block(100).unwrap_err();
    assert!(
        matches!(err, ZFileError::BlockChecksum { index: 100, .. }),
        "{err}"
    );
    reader.read_block(99).unwrap();
}

#[test]
fn hello_world_truncated_blob_is_an_error() {
    let layers = converted_layers();
    let digest = layers[0]["annotations"][ANNOTATION_BLOB_DIGEST]
        .as_str()
        .unwrap();
    let data = blob(digest);
    let cut = &data[..data.len() / 2];
    let err = tar_wrapper::locate(&cut[..tar_wrapper::PROBE_LEN], cut.len() as u64).unwrap_err();
    assert!(matches!(err, TarWrapperError::Truncated { .. }), "{err}");
    // Ignoring the wrapper's size, the ZFile itself is missing its trailer.
    let window = Window::new(cut, 1536, cut.len() as u64 - 1536).unwrap();
    assert!(ZFile::open(&window).is_err());
}

/// The empty 64 GiB ext4 base layer: an older ZFile writer (garbage in the unsealed header's
/// fields and unused flag bits, no digests) and no tar wrapper.
#[test]
fn legacy_ext4_base_layer_reads_through_its_trailer() {
    let gz = std::fs::File::open(fixtures().join("ext4_64.tar.gz")).unwrap();
    let mut archive = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut archive)
        .unwrap();
    // A one-file GNU tar: the ZFile follows the first 512-byte header.
    let size = 4_737_695u64;
    let blob = archive[512..512 + size as usize].to_vec();
    let payload = tar_wrapper::locate(&blob[..tar_wrapper::PROBE_LEN], size).unwrap();
    assert!(!payload.wrapped);

    let reader = ZFileReader::open(blob).unwrap();
    let zfile = reader.zfile();
    assert!(!zfile.trailer().has_digest());
    assert_eq!(zfile.block_size(), 4096);
    assert_eq!(zfile.block_count(), 132_309);
    assert_eq!(zfile.uncompressed_size(), 541_937_664);
    let lsmt = LsmtFile::open(&reader).unwrap();
    assert_eq!(lsmt.virtual_size(), 64 << 30);
    let disk = Disk::open(vec![reader]).unwrap();
    let mut superblock = [0u8; 1024];
    disk.read_exact_at(1024, &mut superblock).unwrap();
    assert_eq!(
        u16::from_le_bytes([superblock[56], superblock[57]]),
        EXT4_MAGIC
    );
}
