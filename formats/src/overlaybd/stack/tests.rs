use super::*;
use crate::overlaybd::lsmt::{Extent, Writer};
use crate::overlaybd::source::BlockSource;
use crate::overlaybd::Disk;

fn data(offset: u64, len: u32, moffset: u64) -> Mapping {
    Mapping {
        offset,
        len,
        moffset,
        zeroed: false,
    }
}

fn zeroed(offset: u64, len: u32) -> Mapping {
    Mapping {
        offset,
        len,
        moffset: 0,
        zeroed: true,
    }
}

#[test]
fn upper_layers_shadow_lower_ones() {
    // Sectors: lower maps 0..10, upper maps 2..4 with data and 6..7 zeroed.
    let lower = [data(0, 10, 100)];
    let upper = [data(2, 2, 50), zeroed(6, 1)];
    let stack = Stack::new(&[&upper, &lower], 20 * SECTOR).unwrap();
    let pieces = stack.resolve(0, 12 * SECTOR).unwrap();
    assert_eq!(
        pieces,
        vec![
            Piece::Data {
                layer: 1,
                moffset: 100 * SECTOR,
                len: 2 * SECTOR
            },
            Piece::Data {
                layer: 0,
                moffset: 50 * SECTOR,
                len: 2 * SECTOR
            },
            Piece::Data {
                layer: 1,
                moffset: 104 * SECTOR,
                len: 2 * SECTOR
            },
            Piece::Zero { len: SECTOR },
            Piece::Data {
                layer: 1,
                moffset: 107 * SECTOR,
                len: 3 * SECTOR
            },
            Piece::Zero { len: 2 * SECTOR },
        ]
    );
    assert_eq!(pieces.iter().map(Piece::len).sum::<u64>(), 12 * SECTOR);
}

#[test]
fn unaligned_ranges_resolve_to_exact_bytes() {
    let stack = Stack::new(&[&[data(1, 2, 10)]], 8 * SECTOR).unwrap();
    assert_eq!(
        stack.resolve(SECTOR + 7, 3).unwrap(),
        vec![Piece::Data {
            layer: 0,
            moffset: 10 * SECTOR + 7,
            len: 3
        }]
    );
    assert_eq!(
        stack.resolve(100, 500).unwrap(),
        vec![
            Piece::Zero { len: 412 },
            Piece::Data {
                layer: 0,
                moffset: 10 * SECTOR,
                len: 88
            }
        ]
    );
    assert_eq!(stack.resolve(8 * SECTOR, 0).unwrap(), vec![]);
    assert!(matches!(
        stack.resolve(8 * SECTOR - 1, 2),
        Err(StackError::PastEnd { .. })
    ));
    assert!(stack.resolve(u64::MAX, 2).is_err());
}

#[test]
fn layer_limits_are_enforced() {
    assert_eq!(Stack::new(&[], 0).unwrap_err(), StackError::NoLayers);
    let empty: &[Mapping] = &[];
    let many = vec![empty; MAX_LAYERS + 1];
    assert_eq!(
        Stack::new(&many, 0).unwrap_err(),
        StackError::TooManyLayers {
            count: MAX_LAYERS + 1
        }
    );
    let mut full = vec![empty; MAX_LAYERS];
    let bottom = [data(0, 1, 8)];
    full[MAX_LAYERS - 1] = &bottom;
    let stack = Stack::new(&full, SECTOR).unwrap();
    assert_eq!(
        stack.resolve(0, SECTOR).unwrap(),
        vec![Piece::Data {
            layer: MAX_LAYERS - 1,
            moffset: 8 * SECTOR,
            len: SECTOR
        }]
    );
}

/// Reference model: the last write of each byte wins, unwritten bytes are zero.
fn model(size: usize, layers_bottom_up: &[Vec<(u64, Vec<u8>)>]) -> Vec<u8> {
    let mut disk = vec![0u8; size];
    for layer in layers_bottom_up {
        for (offset, bytes) in layer {
            let at = *offset as usize;
            disk[at..at + bytes.len()].copy_from_slice(bytes);
        }
    }
    disk
}

#[test]
fn disk_over_written_layers_matches_a_flat_model() {
    const SIZE: u64 = 64 * SECTOR;
    // Deterministic pseudo-random layers (xorshift), bottom first.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut layers: Vec<Vec<(u64, Vec<u8>)>> = Vec::new();
    for layer in 0..4u8 {
        let mut extents = Vec::new();
        let mut sector = next() % 4;
        while sector < SIZE / SECTOR {
            let len = 1 + next() % 5;
            let len = len.min(SIZE / SECTOR - sector);
            // Some extents are all zeros, to exercise zeroed mappings shadowing data.
            let bytes: Vec<u8> = if next() % 4 == 0 {
                vec![0; (len * SECTOR) as usize]
            } else {
                (0..len * SECTOR)
                    .map(|i| (layer * 16 + 1) ^ (i as u8 & 1))
                    .collect()
            };
            extents.push((sector * SECTOR, bytes));
            sector += len + next() % 6;
        }
        layers.push(extents);
    }
    let files: Vec<Vec<u8>> = layers
        .iter()
        .rev()
        .map(|extents| {
            let extents: Vec<Extent<'_>> = extents
                .iter()
                .map(|(offset, data)| Extent {
                    offset: *offset,
                    data,
                })
                .collect();
            Writer::new(SIZE).write(&extents).unwrap()
        })
        .collect();
    let disk = Disk::open(files).unwrap();
    let expected = model(SIZE as usize, &layers);
    let mut whole = vec![0u8; SIZE as usize];
    disk.read_exact_at(0, &mut whole).unwrap();
    assert_eq!(whole, expected);
    for (offset, len) in [(1u64, 700usize), (511, 2), (5000, 9000), (SIZE - 3, 3)] {
        let mut buf = vec![0u8; len];
        disk.read_exact_at(offset, &mut buf).unwrap();
        assert_eq!(
            buf,
            expected[offset as usize..offset as usize + len],
            "at {offset}"
        );
    }
    assert!(disk.read_exact_at(SIZE - 1, &mut [0u8; 2]).is_err());
}
