//! Fuzzes LSMT parsing and everything built on a parsed index: stacking (the input as the upper
//! layer over a fixed lower layer), range resolution and virtual-disk reads. Any input must
//! yield `Ok` or `Err`, never a panic, hang or unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_formats::overlaybd::lsmt::{Extent, LsmtFile, Writer, SECTOR};
use shoal_formats::overlaybd::{BlockSource, Disk, Piece, Stack};

fuzz_target!(|data: &[u8]| {
    let Ok(upper) = LsmtFile::open(data) else {
        return;
    };
    let mut sorted = upper.mappings().windows(2);
    assert!(sorted.all(|w| w[0].end() <= w[1].offset));

    let lower_data = vec![0x5a; 8 * SECTOR as usize];
    let lower = Writer::new(upper.virtual_size().max(8 * SECTOR))
        .write(&[Extent {
            offset: 0,
            data: &lower_data,
        }])
        .expect("fixed lower layer");
    let lower_file = LsmtFile::open(lower.as_slice()).expect("lower layer parses");
    let Ok(stack) = Stack::from_files(&[&upper, &lower_file]) else {
        return;
    };
    let size = stack.virtual_size();
    for (offset, len) in [(0, 4096), (size / 2, 777), (size.saturating_sub(100), 100)] {
        let len = len.min(size - offset.min(size));
        if let Ok(pieces) = stack.resolve(offset, len) {
            assert_eq!(pieces.iter().map(Piece::len).sum::<u64>(), len);
        }
    }
    let Ok(disk) = Disk::new(stack, vec![data, lower.as_slice()]) else {
        return;
    };
    let mut buf = vec![0u8; 4096.min(disk.size()) as usize];
    let _ = disk.read_exact_at(0, &mut buf);
});
