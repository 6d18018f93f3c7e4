//! Fuzzes the overlaybd blob front end: tar wrapper detection, ZFile header/trailer/jump-table
//! parsing and block verification + decompression. Any input must yield `Ok` or `Err`, never a
//! panic, hang or unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_formats::overlaybd::{tar_wrapper, zfile::ZFile, BlockSource, Window, ZFileReader};

/// Blocks decoded per input: enough to reach CRC and decompression paths, bounded in time.
const MAX_BLOCKS: u64 = 16;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let head = &data[..data.len().min(tar_wrapper::PROBE_LEN)];
    let Ok(payload) = tar_wrapper::locate(head, size) else {
        return;
    };
    let Ok(window) = Window::new(data, payload.offset, payload.len) else {
        return;
    };
    // The split-bytes entry point must agree with the source-based one.
    if window.size() >= 1024 {
        let payload = &data[payload.offset as usize..(payload.offset + payload.len) as usize];
        let (header, rest) = payload.split_at(512);
        let (table, trailer) = rest.split_at(rest.len() - 512);
        let _ = ZFile::parse(header, trailer, table);
    }
    let Ok(reader) = ZFileReader::open(window) else {
        return;
    };
    let zfile = reader.zfile().clone();
    for index in 0..zfile.block_count().min(MAX_BLOCKS) {
        if let Ok(block) = reader.read_block(index) {
            assert_eq!(block.len() as u64, zfile.block_len(index).unwrap());
        }
    }
    let mut buf = vec![0u8; 4096.min(reader.size()) as usize];
    let _ = reader.read_exact_at(reader.size() - buf.len() as u64, &mut buf);
});
