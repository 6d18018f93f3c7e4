//! The block map against the independent reference composition (a [`Disk`] over per-layer
//! [`ZFileReader`]s), over two layers built by the writers.

use super::*;
use crate::overlaybd::lsmt::{Extent, Writer, HEADER_SIZE as LSMT_RECORD, SECTOR};
use crate::overlaybd::zfile::{compress, Algorithm, ZFileInfo, ZFileReader, HEADER_SIZE};
use crate::overlaybd::{tar_wrapper, Disk, LayerMeta, Window};

const VIRTUAL: u64 = 1 << 20;
const BLOCK: u32 = 1024;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed ^ (i / 3) as u8).collect()
}

/// A wrapped overlaybd blob whose LSMT file holds `extents`.
fn blob(extents: &[Extent<'_>], algorithm: Algorithm) -> Vec<u8> {
    let lsmt = Writer::new(VIRTUAL).write(extents).unwrap();
    tar_wrapper::wrap(&compress(&lsmt, BLOCK, algorithm).unwrap())
}

fn payload(blob: &[u8]) -> Window<&[u8]> {
    let head = &blob[..tar_wrapper::PROBE_LEN.min(blob.len())];
    let payload = tar_wrapper::locate(head, blob.len() as u64).unwrap();
    Window::new(blob, payload.offset, payload.len).unwrap()
}

/// The metadata a reader takes from `blob`, read through the reference readers.
fn meta(blob: &[u8]) -> LayerMeta {
    let head = &blob[..tar_wrapper::PROBE_LEN.min(blob.len())];
    let at = tar_wrapper::locate(head, blob.len() as u64).unwrap();
    let zfile = &blob[at.offset as usize..(at.offset + at.len) as usize];
    let record = HEADER_SIZE;
    let (header, trailer) = (&zfile[..record], &zfile[zfile.len() - record..]);
    let table = ZFileInfo::parse(header, trailer)
        .unwrap()
        .jump_table_range(at.len)
        .unwrap();
    let reader = ZFileReader::open(payload(blob)).unwrap();
    let size = reader.size();
    let read = |range: Range<u64>| read_vec(&reader, range.start, range.end - range.start).unwrap();
    let lsmt_header = read(0..LSMT_RECORD as u64);
    let lsmt_trailer = read(size - LSMT_RECORD as u64..size);
    let (_, index) =
        crate::overlaybd::LsmtFile::locate_index(&lsmt_header, &lsmt_trailer, size).unwrap();
    LayerMeta {
        payload_offset: at.offset,
        payload_len: at.len,
        zfile_header: header.to_vec(),
        zfile_trailer: trailer.to_vec(),
        jump_table: zfile[table.start as usize..table.end as usize].to_vec(),
        lsmt_header,
        lsmt_trailer,
        lsmt_index: read(index),
    }
}

struct Fixture {
    blobs: Vec<Vec<u8>>,
    map: BlockMap,
}

/// An upper layer (zstd) over a lower one (lz4): the upper shadows part of the lower's data
/// and zeroes a run of it; the disk beyond both is unmapped.
fn fixture() -> Fixture {
    let lower_data = pattern(0x11, 64 * SECTOR as usize);
    let upper_data = pattern(0x77, 8 * SECTOR as usize);
    let zeros = vec![0u8; 4 * SECTOR as usize];
    let lower = blob(
        &[Extent {
            offset: 0,
            data: &lower_data,
        }],
        Algorithm::Lz4,
    );
    let upper = blob(
        &[
            Extent {
                offset: 10 * SECTOR,
                data: &upper_data,
            },
            Extent {
                offset: 30 * SECTOR,
                data: &zeros,
            },
        ],
        Algorithm::Zstd,
    );
    let layers = [&upper, &lower].map(|b| Layer::parse(&meta(b), b.len() as u64).unwrap());
    let map = BlockMap::new(&[&layers[0], &layers[1]]).unwrap();
    Fixture {
        blobs: vec![upper, lower],
        map,
    }
}

#[test]
fn plans_read_the_same_bytes_as_the_reference_disk() {
    let Fixture { blobs, map } = fixture();
    let reference = Disk::open(
        blobs
            .iter()
            .map(|b| ZFileReader::open(payload(b)).unwrap())
            .collect(),
    )
    .unwrap();
    assert_eq!(map.size(), VIRTUAL);
    let blobs: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
    for (offset, len) in [
        (0, 512),
        (1000, 9000),
        (10 * SECTOR - 7, 8 * SECTOR as usize + 14),
        (29 * SECTOR, 6 * SECTOR as usize),
        (60 * SECTOR, 8 * SECTOR as usize),
        (VIRTUAL - 100, 100),
    ] {
        let mut want = vec![0xa5; len];
        reference.read_exact_at(offset, &mut want).unwrap();
        let mut got = vec![0x5a; len];
        map.read_from(&blobs, offset, &mut got).unwrap();
        assert_eq!(got, want, "{len} bytes at {offset}");
    }
}

#[test]
fn a_plan_names_each_layers_blocks_and_the_zeros_between() {
    let Fixture { map, .. } = fixture();
    // Sectors 8..40: lower data, upper data, lower data, upper zeros, lower data.
    let steps = map.plan(8 * SECTOR, 32 * SECTOR).unwrap();
    let layers: Vec<Option<usize>> = steps
        .iter()
        .map(|step| match step {
            Step::Zero { .. } => None,
            Step::Blocks { layer, .. } => Some(*layer),
        })
        .collect();
    assert_eq!(layers, [Some(1), Some(0), Some(1), None, Some(1)]);
    assert_eq!(steps.iter().map(Step::len).sum::<u64>(), 32 * SECTOR);
    for step in &steps {
        if let Step::Blocks { layer, span } = step {
            let blocks = &map.layers[*layer];
            assert!(span.compressed.start >= blocks.payload_offset + HEADER_SIZE as u64);
            assert!(
                !span.blocks.is_empty()
                    && span.keep.end as u64
                        <= (span.blocks.end - span.blocks.start) * u64::from(BLOCK)
            );
        }
    }
    assert!(matches!(
        map.plan(VIRTUAL - 1, 2),
        Err(BlockMapError::Resolve { .. })
    ));
}

#[test]
fn a_damaged_block_is_refused_not_decoded() {
    let Fixture { blobs, map } = fixture();
    let steps = map.plan(0, 512).unwrap();
    let [Step::Blocks { layer, span }] = steps.as_slice() else {
        panic!("one span of the lower layer: {steps:?}");
    };
    let range = span.compressed.start as usize..span.compressed.end as usize;
    let mut compressed = blobs[*layer][range].to_vec();
    assert!(map.decode(*layer, span, &compressed).is_ok());
    compressed[1] ^= 1;
    let err = map.decode(*layer, span, &compressed).unwrap_err();
    assert!(
        matches!(
            err,
            BlockMapError::Decode {
                source: ZFileError::BlockChecksum { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        map.decode(*layer, span, &compressed[1..]),
        Err(BlockMapError::Decode {
            source: ZFileError::CompressedLength { .. },
            ..
        })
    ));
}
